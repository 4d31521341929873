//! `cow`: a copy-on-write layer. Writes go to a temporary overlay; the
//! plugin below is opened read-only and never written; the overlay is
//! thrown away when the server exits.
//!
//! As nbdkit 1.44: one overlay (file, block states, size) per export
//! name, created at the first open of that export in `$TMPDIR` (default
//! `/var/tmp`) and kept until the server exits; blocks of
//! `cow-block-size` (64 KiB) are absent (read from the plugin), allocated
//! (in the overlay) or trimmed (read as zeroes); a write of part of a
//! block reads the rest first; past the plugin's end a block reads as
//! zeroes; `cow-on-read` and `cow-on-cache` copy blocks up as they are
//! read or cached; flush and FUA do nothing (the overlay is throwaway);
//! FAST_ZERO fails at once.
//!
//! Unlike nbdkit, which takes one global lock around every
//! read-modify-write, the blocks are locked by stripes (`overlay.rs`) and
//! reads take no lock at all, so requests on different blocks run in
//! parallel; a zero of whole blocks is a `FALLOC_FL_ZERO_RANGE` on the
//! overlay instead of written zeroes; and warm reads are answered
//! without waiting (`pread_nowait`). Also unlike nbdkit 1.32 (which inherits
//! `can_zero` from the plugin it opened read-only, so it never zeroes),
//! write zeroes is advertised and done here, as the filter's own `zero`
//! intends.

mod overlay;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::backend::extents::{HOLE, ZERO};
use crate::backend::{BlockSize, Caps, Extents, Filter, FilterEntry, Flags, Handle, Next, Param, Support};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse::{parse_bool, parse_size};
use overlay::{Overlay, States, ABSENT, ALLOCATED, MAX_RUN, TRIMMED};

/// `cow-on-read`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OnRead {
    Never,
    Always,
    /// While this path exists (checked on every read).
    WhilePath(PathBuf),
}

/// The settings every handle shares.
#[derive(Debug)]
struct Config {
    bs: u64,
    on_cache: bool,
    on_read: OnRead,
}

struct Cow {
    cfg: Arc<Config>,
    /// One overlay per export name, for the life of the server.
    overlays: Mutex<HashMap<String, Arc<Overlay>>>,
}

impl Default for Cow {
    fn default() -> Cow {
        Cow {
            cfg: Arc::new(Config { bs: 65536, on_cache: false, on_read: OnRead::Never }),
            overlays: Mutex::default(),
        }
    }
}

impl Cow {
    fn cfg_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.cfg).expect("config is only changed before the first open")
    }
}

impl Filter for Cow {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "cow-block-size" => {
                let n = parse_size(value)?;
                if !(4096..=u64::from(u32::MAX)).contains(&n) || !n.is_power_of_two() {
                    return Err(Error::invalid("cow-block-size is out of range (4096..2G) or not a power of 2"));
                }
                self.cfg_mut().bs = n;
            }
            "cow-on-cache" => self.cfg_mut().on_cache = parse_bool(value)?,
            "cow-on-read" => {
                self.cfg_mut().on_read = if value.starts_with('/') {
                    OnRead::WhilePath(value.into())
                } else if parse_bool(value)? {
                    OnRead::Always
                } else {
                    OnRead::Never
                };
            }
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn open(&self, next: &dyn Next, _readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        // The plugin is never written.
        let next = next.open(true, export, is_tls)?;
        let size = next.size()?;
        let next_caps = next.caps()?;
        let ov = {
            let mut map = self.overlays.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(export) {
                Some(ov) => {
                    crate::debug!("cow: reusing existing overlay for export \"{export}\"");
                    ov.clone()
                }
                None => {
                    let dir = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
                    let ov = Arc::new(Overlay::new(&dir, self.cfg.bs)?);
                    crate::debug!("cow: allocated new overlay for export \"{export}\"");
                    map.insert(export.to_string(), ov.clone());
                    ov
                }
            }
        };
        ov.ensure_size(size)?;
        Ok(Box::new(CowHandle { next, ov, size, next_caps, cfg: self.cfg.clone() }))
    }

    fn cleanup(&self) {
        let mut map = self.overlays.lock().unwrap_or_else(|e| e.into_inner());
        for name in map.keys() {
            crate::debug!("cow: freeing overlay for export \"{name}\"");
        }
        map.clear();
    }
}

/// What a write-type request puts in the blocks it covers.
#[derive(Clone, Copy)]
enum Op<'a> {
    /// These bytes (the request's whole payload).
    Write(&'a [u8]),
    Zero,
    Trim,
}

thread_local! {
    /// A block-sized buffer for read-modify-write, reused by each thread.
    static BLOCK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch buffer of `bs` bytes (contents unspecified).
fn with_block<R>(bs: u64, f: impl FnOnce(&mut [u8]) -> Result<R>) -> Result<R> {
    BLOCK.with(|b| {
        let mut b = b.try_borrow_mut().map_err(|_| Error::io("cow: block buffer in use"))?;
        if b.len() < bs as usize {
            b.clear();
            b.try_reserve_exact(bs as usize).map_err(|_| Error::new(ErrorKind::NoMem, "cow: block buffer: out of memory"))?;
            b.resize(bs as usize, 0);
        }
        f(&mut b[..bs as usize])
    })
}

/// A stretch of blocks in one state, as [`CowHandle::each_run`] gives it.
struct Run {
    /// The blocks' state.
    state: u8,
    /// The first block and the one after the last.
    blk: u64,
    end: u64,
    /// Where the run's part of the request starts (inside block `blk`).
    pos: u64,
}

struct CowHandle {
    next: Box<dyn Handle>,
    ov: Arc<Overlay>,
    /// The plugin's size (= this export's size).
    size: u64,
    next_caps: Caps,
    cfg: Arc<Config>,
}

impl CowHandle {
    /// Reads from the plugin; bytes past its end read as zeroes.
    fn read_plugin(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            self.next.pread(&mut buf[..n], offset, Flags::NONE)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Fills `block` with the current contents of block `blk`, in state `st`.
    fn read_block(&self, st: u8, blk: u64, block: &mut [u8]) -> Result<()> {
        let off = blk * self.ov.bs;
        match st {
            ALLOCATED => self.ov.read_at(block, off),
            TRIMMED => {
                block.fill(0);
                Ok(())
            }
            _ => self.read_plugin(block, off),
        }
    }

    /// Walks `buf` (the bytes at `offset`) run by run: each run is a
    /// stretch of blocks in one state, handed to `f` with its part of `buf`;
    /// the first error stops the walk.
    fn each_run<E>(
        &self,
        states: &States<'_>,
        buf: &mut [u8],
        offset: u64,
        mut f: impl FnMut(Run, &mut [u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.ov.bs;
        let end = offset + buf.len() as u64;
        let last = self.ov.block(end - 1);
        let mut pos = offset;
        while pos < end {
            let blk = self.ov.block(pos);
            let run_end = states.run_end(blk, last);
            let hi = end.min(run_end * bs);
            let out = &mut buf[(pos - offset) as usize..(hi - offset) as usize];
            f(Run { state: states.get(blk), blk, end: run_end, pos }, out)?;
            pos = hi;
        }
        Ok(())
    }

    fn copy_on_read(&self) -> bool {
        match &self.cfg.on_read {
            OnRead::Never => false,
            OnRead::Always => true,
            OnRead::WhilePath(p) => p.exists(),
        }
    }

    /// Stores plugin block `blk` in the overlay unless it was written
    /// meanwhile; `data` is the whole block.
    fn copy_up(&self, states: &States<'_>, blk: u64, data: &[u8]) -> Result<()> {
        let _g = self.ov.lock(blk);
        if states.get(blk) == ABSENT {
            self.ov.write_at(data, blk * self.ov.bs)?;
            states.set(blk, ALLOCATED);
        }
        Ok(())
    }

    /// Copies up blocks `first..end` of which `[pos, pos+data.len())`
    /// was just read from the plugin (whole blocks come from `data`).
    fn copy_up_run(&self, states: &States<'_>, first: u64, end: u64, pos: u64, data: &[u8]) -> Result<()> {
        let bs = self.ov.bs;
        for blk in first..end {
            let (a, b) = (blk * bs, blk * bs + bs);
            if a >= pos && b <= pos + data.len() as u64 {
                self.copy_up(states, blk, &data[(a - pos) as usize..(b - pos) as usize])?;
            } else {
                with_block(bs, |block| {
                    self.read_plugin(block, a)?;
                    self.copy_up(states, blk, block)
                })?;
            }
        }
        Ok(())
    }

    /// Part of block `blk`, `[lo, hi)`, gets `data` (`None`: zeroes).
    fn write_partial(&self, states: &States<'_>, blk: u64, lo: u64, hi: u64, data: Option<&[u8]>) -> Result<()> {
        let _g = self.ov.lock(blk);
        let st = states.get(blk);
        if st == ALLOCATED {
            return match data {
                Some(d) => self.ov.write_at(d, lo),
                None => self.ov.zero_at(lo, hi - lo),
            };
        }
        let base = blk * self.ov.bs;
        with_block(self.ov.bs, |block| {
            self.read_block(st, blk, block)?;
            let part = &mut block[(lo - base) as usize..(hi - base) as usize];
            match data {
                Some(d) => part.copy_from_slice(d),
                None => part.fill(0),
            }
            self.ov.write_at(block, base)?;
            states.set(blk, ALLOCATED);
            Ok(())
        })
    }

    /// pwrite, zero and trim: partial blocks one by one, whole blocks in
    /// runs of up to `MAX_RUN`.
    fn write_range(&self, count: u64, offset: u64, op: Op<'_>) -> Result<()> {
        let bs = self.ov.bs;
        let states = self.ov.states();
        let end = offset + count;
        let mut pos = offset;
        while pos < end {
            let blk = self.ov.block(pos);
            let bstart = blk * bs;
            if pos == bstart && end - pos >= bs {
                let n = ((end - pos) / bs).min(MAX_RUN);
                let len = n * bs;
                let _g = self.ov.lock_run(blk, n);
                let st = match op {
                    Op::Write(d) => {
                        let at = (pos - offset) as usize;
                        self.ov.write_at(&d[at..at + len as usize], pos)?;
                        ALLOCATED
                    }
                    Op::Zero => {
                        self.ov.zero_at(pos, len)?;
                        ALLOCATED
                    }
                    Op::Trim => TRIMMED,
                };
                for b in blk..blk + n {
                    states.set(b, st);
                }
                if let Op::Trim = op {
                    self.ov.discard(pos, len);
                }
                pos += len;
            } else {
                let hi = end.min(bstart + bs);
                let data = match op {
                    Op::Write(d) => Some(&d[(pos - offset) as usize..(hi - offset) as usize]),
                    _ => None,
                };
                self.write_partial(&states, blk, pos, hi, data)?;
                pos = hi;
            }
        }
        Ok(())
    }

    /// Block status of the plugin over `[a, b)` (absent blocks) into `ext`.
    fn plugin_extents(&self, a: u64, b: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        let b = b.min(self.size);
        if a >= b {
            return Ok(()); // past the plugin's end: cannot happen within the export
        }
        if !self.next_caps.extents {
            return ext.add(a, b - a, 0);
        }
        let mut p = a;
        while p < b {
            let mut inner = Extents::new(p, b);
            self.next.extents(b - p, p, flags, &mut inner)?;
            for e in inner.list() {
                ext.add(e.offset, e.length, e.typ)?;
            }
            let to = inner.covered_to();
            if to <= p || (flags.contains(Flags::REQ_ONE) && ext.covered_to() > ext.start()) {
                break;
            }
            p = to;
        }
        Ok(())
    }
}

/// A `Handle` rather than a `FilterHandle`: besides the calls it changes,
/// it answers `pread_nowait` (from the overlay's page cache, or the
/// plugin's own `pread_nowait`), which filters do not forward.
impl Handle for CowHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: true,
            flush: true,
            rotational: self.next_caps.rotational,
            trim: true,
            zero: Support::Native,
            fast_zero: true,
            extents: true,
            fua: Support::Native,
            multi_conn: true,
            cache: Support::Native,
        })
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        let bs = self.ov.bs.min(32 << 20) as u32;
        Ok(Some(match self.next.block_size()? {
            None => BlockSize { min: 1, preferred: bs, max: u32::MAX },
            Some(mut b) => {
                if bs <= b.max {
                    b.preferred = b.preferred.max(bs);
                }
                b
            }
        }))
    }

    fn export_description(&self) -> Option<String> {
        self.next.export_description()
    }

    fn blocks(&self) -> bool {
        true
    }

    fn brief(&self) -> bool {
        self.next.brief()
    }

    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        if matches!(self.cfg.on_read, OnRead::Always) {
            return None;
        }
        let states = self.ov.states();
        // Err(()): this part would wait (or fail: pread reports it).
        let walked: std::result::Result<(), ()> = self.each_run(&states, buf, offset, |run, out| {
            let done = match run.state {
                ALLOCATED => self.ov.read_nowait(out, run.pos),
                TRIMMED => {
                    out.fill(0);
                    true
                }
                _ => !self.copy_on_read() && matches!(self.next.pread_nowait(out, run.pos), Some(Ok(()))),
            };
            if done { Ok(()) } else { Err(()) }
        });
        walked.ok().map(Ok)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let states = self.ov.states();
        self.each_run(&states, buf, offset, |run, out| match run.state {
            ALLOCATED => self.ov.read_at(out, run.pos),
            TRIMMED => {
                out.fill(0);
                Ok(())
            }
            _ => {
                self.read_plugin(out, run.pos)?;
                if self.copy_on_read() {
                    self.copy_up_run(&states, run.blk, run.end, run.pos, out)?;
                }
                Ok(())
            }
        })
    }

    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.write_range(buf.len() as u64, offset, Op::Write(buf))
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }

    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.write_range(count, offset, Op::Trim)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::new(ErrorKind::NotSupported, "cow: fast zero is not supported"));
        }
        self.write_range(count, offset, Op::Zero)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        if count == 0 {
            return ext.add(offset, 1, 0);
        }
        let bs = self.ov.bs;
        let states = self.ov.states();
        let end = offset + count;
        let last = self.ov.block(end - 1);
        let mut blk = self.ov.block(offset);
        while blk <= last {
            let run_end = states.run_end(blk, last);
            let (a, b) = (blk * bs, self.size.min(run_end * bs)); // rounded out, as nbdkit
            match states.get(blk) {
                ALLOCATED => ext.add(a, b - a, 0)?,
                TRIMMED => ext.add(a, b - a, HOLE | ZERO)?,
                _ => self.plugin_extents(a, b, flags, ext)?,
            }
            if flags.contains(Flags::REQ_ONE) && ext.count() > 0 {
                break;
            }
            blk = run_end;
        }
        Ok(())
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let bs = self.ov.bs;
        let states = self.ov.states();
        let end = offset + count;
        let last = self.ov.block(end - 1);
        let mut blk = self.ov.block(offset);
        while blk <= last {
            let run_end = states.run_end(blk, last);
            let (a, b) = (blk * bs, run_end * bs);
            match states.get(blk) {
                ALLOCATED => self.ov.will_need(a, b - a),
                TRIMMED => {}
                _ if self.cfg.on_cache => {
                    for x in blk..run_end {
                        with_block(bs, |block| {
                            self.read_plugin(block, x * bs)?;
                            self.copy_up(&states, x, block)
                        })?;
                    }
                }
                _ => {
                    let b = b.min(self.size);
                    if self.next_caps.cache != Support::None && a < b {
                        self.next.cache(b - a, a, Flags::NONE)?;
                    }
                }
            }
            blk = run_end;
        }
        Ok(())
    }
}

inventory::submit! {
    FilterEntry {
        name: "cow",
        alias: None,
        longname: "nbdkit copy-on-write (COW) filter",
        description: "nbdkit copy-on-write (COW) filter: writes go to a throwaway overlay, the plugin is never written",
        help: "cow-block-size=<N>       Set COW block size.\n\
               cow-on-cache=<BOOL>      Copy cache (prefetch) requests to the overlay.\n\
               cow-on-read=<BOOL>|/PATH Copy read requests to the overlay.",
        new: || Box::<Cow>::default(),
    }
}

#[cfg(test)]
mod tests;
