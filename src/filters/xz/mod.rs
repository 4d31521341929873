//! `xz`: serve the expansion of an `.xz`-compressed image, with random
//! access through the xz index (`nbdkit --filter=xz file disk.img.xz`).
//!
//! As nbdkit: the layer below is opened read-only; at open the file's
//! streams are walked backwards (footer, index, header; stream padding and
//! concatenated streams allowed) into a block map (`format.rs`); a read
//! decompresses the blocks it touches with liblzma (`decode.rs`);
//! `xz-max-block` (default 512M) refuses files with bigger blocks and
//! `xz-max-depth` (default 8) bounds the cache.
//!
//! Beyond nbdkit, which decompresses on the requesting thread one request
//! at a time per connection, with a cache per connection:
//! * The thread model is parallel: requests for different blocks
//!   decompress at the same time, requests for a block being decompressed
//!   wait for that one decompression.
//! * One cache of decompressed blocks for every connection (keyed by
//!   export name, file size and a hash of every header, footer and index),
//!   bounded to `xz-max-depth` × the largest block, least recently used
//!   out first; decompressions in flight are bounded by the number of
//!   CPUs (at least 2).
//! * Sequential reads (a block after the one before) read ahead: the next
//!   block is decompressed in the background.
//! * Every decompressed block leaves a map of its zero 4 KiB runs, kept
//!   for good (a bit per 4 KiB): BLOCK_STATUS reports them as holes, so
//!   `nbdcopy` and `qemu-img convert` skip them, and reads of zero runs
//!   need no decompression. All-zero blocks take no cache space.
//! * Reads answered from the cache run on the connection's reading thread
//!   (`pread_nowait`).

mod decode;
mod format;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::backend::extents::{HOLE, ZERO};
use crate::backend::{BlockSize, Caps, Extents, Filter, FilterEntry, Flags, Handle, Next, Param, Support, ThreadModel};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse;

use format::Layout;

/// Default `xz-max-block`.
const DEFAULT_MAX_BLOCK: u64 = 512 << 20;
/// Default `xz-max-depth`.
const DEFAULT_DEPTH: u64 = 8;
/// Granularity of the zero maps.
const ZCHUNK: u64 = 4096;
/// Shortest zero run (in [`ZCHUNK`]s) block status reports as a hole:
/// shorter ones would cut data into small requests for no gain.
const MIN_HOLE: usize = 16;
/// Images (files) whose layout and zero maps are remembered.
const IMAGES_MAX: usize = 16;

/// Blocks decompressed since start (for the debug line at close).
static DECODED: AtomicU64 = AtomicU64::new(0);

/// False if a layer below is not parallel (then nothing but requests calls it).
static READ_AHEAD: AtomicBool = AtomicBool::new(true);

struct Xz {
    max_block: u64,
    depth: u64,
}

impl Default for Xz {
    fn default() -> Xz {
        Xz { max_block: DEFAULT_MAX_BLOCK, depth: DEFAULT_DEPTH }
    }
}

impl Filter for Xz {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "xz-max-block" => self.max_block = parse::parse_size(value)?,
            "xz-max-depth" => {
                let d = parse::parse_unsigned("xz-max-depth", value, u64::from(u32::MAX))?;
                if d == 0 {
                    return Err(Error::invalid("'xz-max-depth' parameter must be >= 1"));
                }
                self.depth = d;
            }
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }

    fn get_ready(&mut self, model: ThreadModel) -> Result<()> {
        // Read-ahead calls the layer below from a thread of its own: only
        // if the whole chain allows calls in parallel.
        READ_AHEAD.store(model == ThreadModel::Parallel, Ordering::Relaxed);
        Ok(())
    }

    fn open(&self, next: &dyn Next, _readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let next: Arc<dyn Handle> = Arc::from(next.open(true, export, is_tls)?);
        let file_size = next.size()?;
        let layout = format::parse(file_size, &mut |buf, off| {
            next.pread(buf, off, Flags::NONE).map_err(|e| format!("xz: read: {}", e.message()))
        })
        .map_err(|e| Error::io(e.0))?;
        crate::debug!("xz: size {} bytes ({:.1}M)", layout.size, layout.size as f64 / 1048576.0);
        crate::debug!("xz: {} streams, {} blocks", layout.streams, layout.blocks.len());
        crate::debug!(
            "xz: maximum uncompressed block size {} bytes ({:.1}M)",
            layout.max_block,
            layout.max_block as f64 / 1048576.0
        );
        if layout.max_block > self.max_block {
            return Err(Error::invalid(format!(
                "xz file largest block is bigger than xz-max-block\n\
                 Either recompress the xz file with smaller blocks (see nbdkit-xz-filter(1))\n\
                 or make xz-max-block parameter bigger.\n\
                 Current xz-max-block = {} (bytes)\n\
                 Largest block in xz file = {} (bytes)",
                self.max_block, layout.max_block
            )));
        }
        let image = Image::get(export, layout);
        {
            let mut c = cache();
            c.per_handle = c.per_handle.max(self.depth.saturating_mul(image.layout.max_block));
            c.handles += 1;
        }
        let mem_limit = self.max_block.max(64 << 20) + (2 << 20);
        Ok(Box::new(XzHandle {
            shared: Arc::new(Shared { next, image, mem_limit }),
            last: AtomicUsize::new(usize::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }))
    }
}

// ---- images: the layout and zero maps of one file, shared ----

/// One `.xz` file as connections see it.
struct Image {
    /// Key in the cache.
    id: u64,
    /// Export name it was opened under.
    export: String,
    layout: Layout,
    /// Zero map of each block, once it was decompressed.
    zero_maps: Vec<OnceLock<ZeroMap>>,
}

/// The images, most recently opened last.
static IMAGES: Mutex<Vec<Arc<Image>>> = Mutex::new(Vec::new());

impl Image {
    /// The image for this export and layout: the one already known if the
    /// file has not changed, else a new one.
    fn get(export: &str, layout: Layout) -> Arc<Image> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut images = lock(&IMAGES);
        let same = |i: &Arc<Image>| {
            i.export == export && i.layout.fingerprint == layout.fingerprint && i.layout.size == layout.size
                && i.layout.blocks.len() == layout.blocks.len()
        };
        if let Some(pos) = images.iter().position(same) {
            let img = images.remove(pos);
            images.push(img.clone());
            return img;
        }
        let zero_maps = (0..layout.blocks.len()).map(|_| OnceLock::new()).collect();
        let img = Arc::new(Image { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), export: export.to_string(), layout, zero_maps });
        images.push(img.clone());
        if images.len() > IMAGES_MAX {
            let old = images.remove(0);
            cache().forget(old.id);
        }
        img
    }
}

/// Which 4 KiB runs of a block are all zero (a bit each, relative to the
/// start of the block; the last run may be shorter).
struct ZeroMap {
    /// Zero runs, for reads.
    bits: Box<[u64]>,
    /// Zero runs of at least [`MIN_HOLE`] runs, for block status.
    holes: Box<[u64]>,
    all_zero: bool,
}

impl ZeroMap {
    fn of(data: &[u8]) -> ZeroMap {
        let chunks = data.len().div_ceil(ZCHUNK as usize);
        let mut bits = vec![0u64; chunks.div_ceil(64)].into_boxed_slice();
        let mut all_zero = true;
        for (i, c) in data.chunks(ZCHUNK as usize).enumerate() {
            if is_zero(c) {
                bits[i / 64] |= 1 << (i % 64);
            } else {
                all_zero = false;
            }
        }
        let mut holes = bits.clone();
        let get = |b: &[u64], i: usize| b[i / 64] & (1 << (i % 64)) != 0;
        let mut i = 0;
        while i < chunks {
            if !get(&bits, i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < chunks && get(&bits, i) {
                i += 1;
            }
            if i - start < MIN_HOLE {
                for j in start..i {
                    holes[j / 64] &= !(1 << (j % 64));
                }
            }
        }
        ZeroMap { bits, holes, all_zero }
    }
    fn zero(&self, chunk: u64) -> bool {
        self.bits[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }
    /// True if `chunk` is part of a zero run long enough to report.
    fn hole(&self, chunk: u64) -> bool {
        self.holes[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }
    /// True if `[from, to)` (offsets in the block) is all zero.
    fn range_zero(&self, from: u64, to: u64) -> bool {
        self.all_zero || (from / ZCHUNK..to.div_ceil(ZCHUNK)).all(|c| self.zero(c))
    }
}

/// True if every byte is 0 (memcmp of the slice against itself shifted
/// by one: vectorized by libc).
fn is_zero(c: &[u8]) -> bool {
    match c.split_first() {
        None => true,
        Some((&first, rest)) => first == 0 && rest == &c[..c.len() - 1],
    }
}

// ---- the cache shared by every connection ----

/// What a block decompresses to: its bytes, or nothing if all zero.
type Data = Option<Arc<Vec<u8>>>;
/// A finished decompression, as waiters see it.
type Outcome = std::result::Result<Data, (ErrorKind, String)>;

/// A decompression in flight: those who need the block wait for it.
struct Pending {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

enum Slot {
    /// `read`: a READ has used it (blocks decompressed for block status or
    /// read-ahead and not read yet are evicted last).
    Ready { data: Arc<Vec<u8>>, used: u64, read: bool },
    Loading(Arc<Pending>),
}

#[derive(Default)]
struct Cache {
    slots: HashMap<(u64, usize), Slot>,
    /// Bytes held by `Ready` slots.
    bytes: u64,
    /// Bytes the cache may hold per open connection: `xz-max-depth` × the
    /// largest block (the most of any image opened), as nbdkit's cache
    /// per connection.
    per_handle: u64,
    /// Open connections.
    handles: u64,
    tick: u64,
    /// Decompressions running.
    running: usize,
    /// Buffers of evicted blocks, for reuse.
    spare: Vec<Vec<u8>>,
}

static CACHE: OnceLock<(Mutex<Cache>, Condvar)> = OnceLock::new();

fn cache_pair() -> &'static (Mutex<Cache>, Condvar) {
    CACHE.get_or_init(Default::default)
}

fn cache() -> MutexGuard<'static, Cache> {
    lock(&cache_pair().0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most decompressions at once: one per CPU, at least two.
fn max_running() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()).max(2))
}

impl Cache {
    /// Drops every block of image `id`.
    fn forget(&mut self, id: u64) {
        let mut freed = 0;
        self.slots.retain(|k, s| {
            let keep = k.0 != id || matches!(s, Slot::Loading(_));
            if !keep {
                if let Slot::Ready { data, .. } = s {
                    freed += data.len() as u64;
                }
            }
            keep
        });
        self.bytes -= freed;
    }

    /// The cached block `key`, now the most recently used.
    fn lookup(&mut self, key: (u64, usize)) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        match self.slots.get_mut(&key) {
            Some(Slot::Ready { data, used, read }) => {
                *used = tick;
                *read = true;
                Some(data.clone())
            }
            _ => None,
        }
    }

    /// Inserts a decompressed block and evicts the least recently used
    /// ones beyond the budget.
    fn insert(&mut self, key: (u64, usize), data: Arc<Vec<u8>>) {
        self.tick += 1;
        self.bytes += data.len() as u64;
        self.slots.insert(key, Slot::Ready { data, used: self.tick, read: false });
        self.trim(Some(key));
    }

    /// Keeps an evicted block's buffer for the next decompression of a
    /// block of the same size (its pages are already mapped: no page
    /// faults, no zeroing by the kernel); at most one per decoder.
    fn recycle(&mut self, v: Vec<u8>) {
        if self.spare.len() < max_running() {
            self.spare.push(v);
        }
    }

    /// A spare buffer of exactly `n` bytes, if there is one.
    fn spare(&mut self, n: u64) -> Option<Vec<u8>> {
        let i = self.spare.iter().position(|v| v.len() as u64 == n)?;
        Some(self.spare.swap_remove(i))
    }

    /// Evicts blocks (but `keep`) until the cache is within `per_handle` ×
    /// open connections: least recently used first, those read before
    /// those not read yet.
    fn trim(&mut self, keep: Option<(u64, usize)>) {
        let budget = self.per_handle.saturating_mul(self.handles.max(1));
        while self.bytes > budget {
            let victim = self
                .slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Ready { used, read, .. } if Some(*k) != keep => Some((!*read, *used, *k)),
                    _ => None,
                })
                .min();
            let Some((_, _, k)) = victim else { break };
            if let Some(Slot::Ready { data, .. }) = self.slots.remove(&k) {
                self.bytes -= data.len() as u64;
                if let Ok(v) = Arc::try_unwrap(data) {
                    self.recycle(v);
                }
            }
        }
    }
}

// ---- per connection ----

/// What a connection shares with its read-ahead threads.
struct Shared {
    next: Arc<dyn Handle>,
    image: Arc<Image>,
    mem_limit: u64,
}

impl Shared {
    /// The decompressed block `i`: from the cache, from a decompression in
    /// flight, or decompressed now. Returns whether it was a hit too.
    fn fetch(self: &Arc<Self>, i: usize, for_read: bool) -> Result<(Data, bool)> {
        let key = (self.image.id, i);
        let (c_lock, c_cv) = cache_pair();
        let mut c = lock(c_lock);
        c.tick += 1;
        let tick = c.tick;
        let pending = match c.slots.get_mut(&key) {
            Some(Slot::Ready { data, used, read }) => {
                *used = tick;
                *read |= for_read;
                return Ok((Some(data.clone()), true));
            }
            Some(Slot::Loading(p)) => Some(p.clone()),
            None => None,
        };
        if let Some(p) = pending {
            drop(c);
            let d = wait(&p)?;
            if for_read {
                self.mark_read(key);
            }
            return Ok((d, true));
        }
        if self.image.zero_maps[i].get().is_some_and(|z| z.all_zero) {
            return Ok((None, true));
        }
        let p = Arc::new(Pending { outcome: Mutex::new(None), done: Condvar::new() });
        c.slots.insert(key, Slot::Loading(p.clone()));
        while c.running >= max_running() {
            c = c_cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.running += 1;
        drop(c);
        self.decode_into(i, &p);
        let d = wait(&p)?;
        if for_read {
            self.mark_read(key);
        }
        Ok((d, false))
    }

    /// Notes that a READ used cached block `key`.
    fn mark_read(&self, key: (u64, usize)) {
        if let Some(Slot::Ready { read, .. }) = cache().slots.get_mut(&key) {
            *read = true;
        }
    }


    /// Starts decompressing block `i` in the background if it is neither
    /// known to be zero, nor cached, nor on its way, and a decoder is free.
    fn read_ahead(self: &Arc<Self>, i: usize) {
        if !READ_AHEAD.load(Ordering::Relaxed)
            || i >= self.image.layout.blocks.len()
            || self.image.zero_maps[i].get().is_some_and(|z| z.all_zero)
        {
            return;
        }
        let key = (self.image.id, i);
        let mut c = cache();
        if c.slots.contains_key(&key) || c.running >= max_running() {
            return;
        }
        let p = Arc::new(Pending { outcome: Mutex::new(None), done: Condvar::new() });
        c.slots.insert(key, Slot::Loading(p.clone()));
        c.running += 1;
        drop(c);
        let me = self.clone();
        let ctx = crate::util::log::context();
        let spawned = std::thread::Builder::new().name("xz-readahead".into()).spawn(move || {
            crate::util::log::set_context(ctx);
            me.decode_into(i, &p);
        });
        if spawned.is_err() {
            // No thread: undo; a reader will decompress it.
            let mut c = cache();
            c.running -= 1;
            c.slots.remove(&key);
            drop(c);
            cache_pair().1.notify_all();
        }
    }

    /// Decompresses block `i` (a decoder slot is already taken), records
    /// its zero map, fills the cache slot and wakes the waiters.
    fn decode_into(&self, i: usize, p: &Pending) {
        let b = self.image.layout.blocks[i];
        DECODED.fetch_add(1, Ordering::Relaxed);
        // (A panic must still wake the waiters and free the decoder slot.)
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<Data> {
            let spare = cache().spare(b.usize);
            let mut out = spare.or_else(|| zeroed(b.usize)).ok_or_else(|| {
                Error::new(ErrorKind::NoMem, format!("malloc ({} bytes): Cannot allocate memory", b.usize))
            })?;
            let read = |buf: &mut [u8], off: u64| self.next.pread(buf, off, Flags::NONE);
            decode::decode_block(&read, &b, &mut out, self.mem_limit)?;
            let zm = self.image.zero_maps[i].get_or_init(|| ZeroMap::of(&out));
            Ok(if zm.all_zero {
                cache().recycle(out);
                None
            } else {
                Some(Arc::new(out))
            })
        }))
        .unwrap_or_else(|_| Err(Error::io("xz: panic while decompressing")));
        crate::debug!("xz: block {i} decompressed: {}", match &result {
            Ok(None) => "all zero",
            Ok(Some(_)) => "cached",
            Err(_) => "error",
        });
        let key = (self.image.id, i);
        let outcome = result.map_err(|e| (e.kind(), format!("xz: block {i} at file offset {}: {}", b.coffset, e.message())));
        {
            let mut c = cache();
            c.running -= 1;
            c.slots.remove(&key);
            if let Ok(Some(data)) = &outcome {
                c.insert(key, data.clone());
            }
        }
        cache_pair().1.notify_all();
        *lock(&p.outcome) = Some(outcome);
        p.done.notify_all();
    }
}

/// A zeroed buffer of `n` bytes (n > 0) without touching its pages
/// (calloc: fresh pages from the kernel are already zero), so a block
/// that lies about its size costs the memory of what it really holds, or
/// None if there is no memory for it.
#[allow(unsafe_code)]
fn zeroed(n: u64) -> Option<Vec<u8>> {
    let n = usize::try_from(n).ok().filter(|&n| n > 0 && n <= isize::MAX as usize)?;
    let layout = std::alloc::Layout::array::<u8>(n).ok()?;
    // SAFETY: `layout` has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` was allocated by the global allocator with the layout of
    // `[u8; n]`, is initialized (zeroed), and is owned by nobody else.
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// Waits for a decompression in flight.
fn wait(p: &Pending) -> Result<Data> {
    let mut o = lock(&p.outcome);
    loop {
        match &*o {
            Some(Ok(d)) => return Ok(d.clone()),
            Some(Err((kind, msg))) => return Err(Error::new(*kind, msg.clone())),
            None => o = p.done.wait(o).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

struct XzHandle {
    shared: Arc<Shared>,
    /// Last block read, for read-ahead.
    last: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Drop for XzHandle {
    fn drop(&mut self) {
        {
            let mut c = cache();
            c.handles = c.handles.saturating_sub(1);
            c.trim(None);
        }
        crate::debug!(
            "xz: cache: hits = {}, misses = {}, blocks decompressed by all connections = {}",
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            DECODED.load(Ordering::Relaxed)
        );
    }
}

impl XzHandle {
    fn layout(&self) -> &Layout {
        &self.shared.image.layout
    }

    /// Notes a read of block `i`; reads ahead after two in a row.
    fn sequential(&self, i: usize) {
        let prev = self.last.swap(i, Ordering::Relaxed);
        if prev == i || prev.wrapping_add(1) == i {
            self.shared.read_ahead(i + 1);
        }
    }

    /// Reads `buf` at `offset`; with `nowait`, gives up (None) as soon as
    /// a block would need decompressing.
    fn read(&self, buf: &mut [u8], offset: u64, nowait: bool) -> Option<Result<()>> {
        let layout = self.layout();
        let mut done = 0usize;
        let mut last = None;
        while done < buf.len() {
            let off = offset + done as u64;
            let Some(i) = layout.find(off) else {
                return Some(Err(Error::io(format!("cannot find offset {off} in the xz file"))));
            };
            let b = &layout.blocks[i];
            let within = off - b.uoffset;
            let n = ((b.usize - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            last = Some(i);
            done += n;
            if self.shared.image.zero_maps[i].get().is_some_and(|z| z.range_zero(within, within + n as u64)) {
                piece.fill(0);
                continue;
            }
            let data = if nowait {
                cache().lookup((self.shared.image.id, i)).map(|d| (Some(d), true))
            } else {
                match self.shared.fetch(i, true) {
                    Ok(d) => Some(d),
                    Err(e) => return Some(Err(e)),
                }
            };
            let (data, hit) = data?;
            if hit {
                self.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            match data {
                Some(d) => piece.copy_from_slice(&d[within as usize..within as usize + n]),
                None => piece.fill(0),
            }
        }
        if let Some(i) = last {
            self.sequential(i);
        }
        Some(Ok(()))
    }
}

impl Handle for XzHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.layout().size)
    }
    fn caps(&self) -> Result<Caps> {
        let c = self.shared.next.caps()?;
        Ok(Caps { write: false, extents: true, multi_conn: true, cache: Support::Native, ..c }.normalized())
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.shared.next.block_size()
    }
    fn export_description(&self) -> Option<String> {
        let d = self.shared.next.export_description()?;
        Some(format!("expansion of xz-compressed image: {d}"))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.read(buf, offset, false).unwrap_or_else(|| Err(Error::io("xz: read interrupted")))
    }
    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        self.read(buf, offset, true)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.shared.next.flush(flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        let layout = self.layout();
        let end = offset.saturating_add(count).min(layout.size);
        let mut off = offset;
        let mut last = None;
        while off < end {
            let Some(i) = layout.find(off) else { break };
            let b = layout.blocks[i];
            let zm = match self.shared.image.zero_maps[i].get() {
                Some(z) => z,
                // Decompress the first block whose map is unknown; stop
                // before any other (the client asks again from there).
                None if last.is_none() => {
                    self.shared.fetch(i, false)?;
                    self.shared.image.zero_maps[i].get().ok_or_else(|| Error::io("xz: no zero map"))?
                }
                None => break,
            };
            last = Some(i);
            let stop = end.min(b.uoffset + b.usize);
            if zm.all_zero {
                ext.add(off, stop - off, HOLE | ZERO)?;
            } else {
                let mut c = (off - b.uoffset) / ZCHUNK;
                while b.uoffset + c * ZCHUNK < stop {
                    let from = (b.uoffset + c * ZCHUNK).max(off);
                    let to = (b.uoffset + (c + 1) * ZCHUNK).min(stop);
                    let typ = if zm.hole(c) { HOLE | ZERO } else { 0 };
                    if flags.contains(Flags::REQ_ONE) && ext.list().last().is_some_and(|l| l.typ != typ) {
                        break;
                    }
                    ext.add(from, to - from, typ)?;
                    c += 1;
                }
            }
            off = stop;
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
        }
        // Read ahead inside the range asked for only: a client that
        // splits the image between connections (nbdcopy) asks for the
        // extents of its part before reading it.
        if let Some(i) = last {
            if layout.blocks.get(i + 1).is_some_and(|b| b.uoffset < end) {
                self.shared.read_ahead(i + 1);
            }
        }
        Ok(())
    }
    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let layout = self.layout();
        let end = offset.saturating_add(count).min(layout.size);
        let mut off = offset;
        while off < end {
            let Some(i) = layout.find(off) else { break };
            self.shared.fetch(i, false)?;
            let b = &layout.blocks[i];
            off = b.uoffset + b.usize;
        }
        Ok(())
    }
}

inventory::submit! {
    FilterEntry {
        name: "xz",
        alias: None,
        longname: "nbdkit XZ filter",
        description: "nbdkit XZ filter: serve the expansion of an xz-compressed image, with random access",
        help: "xz-max-block=<SIZE> (optional) Maximum block size allowed (default: 512M)\n\
               xz-max-depth=<N>    (optional) Maximum blocks in cache (default: 8)",
        new: || Box::<Xz>::default(),
    }
}

#[cfg(test)]
mod tests;
