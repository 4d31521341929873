//! One open file, block device or dup'd fd per connection: the data path,
//! and nbdkit 1.44's zero and trim strategies with a per-handle memo of the
//! methods the file turned out not to support.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use super::evict::Windows;
use super::sys;
use crate::backend::{extents, BlockSize, Caps, Extents, Flags, Handle, Support};
use crate::error::{Error, ErrorKind, Result};

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// A method that works until the file says ENOTSUP (or ENOTTY) once.
#[derive(Debug)]
pub struct Method(AtomicBool);

impl Method {
    fn new(on: bool) -> Method {
        Method(AtomicBool::new(on))
    }
    /// Still worth trying.
    pub fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// Never try it again on this handle.
    pub fn disable(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// How often a read that must not wait is worth trying: after a miss the
/// next 1, 3, 7 … 63 reads skip it, so a cold cache (where each try is a
/// wasted system call) costs next to nothing; a hit makes every read try
/// again. (Relaxed and racy between a connection's workers: only a hint.)
#[derive(Debug, Default)]
struct Backoff {
    skip: AtomicU32,
    after_miss: AtomicU32,
}

impl Backoff {
    fn try_now(&self) -> bool {
        let skip = self.skip.load(Ordering::Relaxed);
        if skip > 0 {
            self.skip.store(skip - 1, Ordering::Relaxed);
        }
        skip == 0
    }
    fn hit(&self) {
        self.after_miss.store(0, Ordering::Relaxed);
    }
    fn missed(&self) {
        let n = (self.after_miss.load(Ordering::Relaxed) * 2 + 1).min(63);
        self.after_miss.store(n, Ordering::Relaxed);
        self.skip.store(n, Ordering::Relaxed);
    }
}

/// Which zero/trim methods (and no-wait reads) are still worth trying on
/// this handle.
#[derive(Debug)]
pub struct Memo {
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    pub punch_hole: Method,
    /// fallocate(ZERO_RANGE).
    pub zero_range: Method,
    /// Plain fallocate, to re-allocate a punched range.
    pub fallocate: Method,
    /// ioctl(BLKZEROOUT), block devices only.
    pub zeroout: Method,
    /// ioctl(BLKDISCARD), block devices only.
    pub blkdiscard: Method,
    /// preadv2(RWF_NOWAIT), for reads the server runs on its own thread.
    nowait: Method,
    /// cachestat(2), to tell whether a `sendfile` would wait for a disk.
    cachestat: Method,
    nowait_backoff: Backoff,
    /// Debug messages already printed once.
    trim_warned: AtomicBool,
    zero_warned: AtomicBool,
}

/// nbdkit 1.40's use of BLKIOMIN/BLKIOOPT: an optimal size of 0 (what most
/// Linux drivers report) becomes `max(min, 4096)`; the pair is used only if
/// min ≥ 512, both are powers of 2 and opt ≥ min. We also drop pairs the
/// server would refuse (min > 64 KiB, preferred > 32 MiB) instead of
/// failing the connection.
pub fn block_size_from_io(min: u32, opt: u32) -> Option<BlockSize> {
    let opt = if opt == 0 { min.max(4096) } else { opt };
    let bs = BlockSize { min, preferred: opt, max: u32::MAX };
    let sane = min >= 512 && min.is_power_of_two() && opt >= min && opt.is_power_of_two();
    (sane && bs.is_valid()).then_some(bs)
}

/// The per-connection handle.
pub struct FileHandle {
    file: Arc<File>,
    /// For messages: the file name, the export name, or `fd=N`.
    name: String,
    is_block: bool,
    /// Regular files: st_size at open (nbdkit's device_size()).
    st_size: u64,
    /// Alignment needed by BLKDISCARD / BLKZEROOUT (BLKSSZGET, else 4096).
    sector_size: u64,
    can_write: bool,
    rotational: bool,
    block_size: Option<BlockSize>,
    /// `Some` with cache=none: the plugin's write windows.
    evict: Option<Arc<Windows>>,
    pub(super) memo: Memo,
}

impl FileHandle {
    /// Inspect a freshly opened file; `fadvise` is applied (errors ignored).
    pub fn new(file: File, name: String, can_write: bool, fadvise: Option<libc::c_int>,
               evict: Option<Arc<Windows>>) -> Result<FileHandle> {
        let meta = file.metadata().map_err(|e| Error::os(format_args!("fstat: {name}"), e))?;
        if let Some(advice) = fadvise {
            let _ = sys::fadvise(&file, 0, 0, advice); // only a hint
        }
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(Error::invalid(format!("file is not regular or block device: {name}")));
        }
        let (mut sector_size, mut rotational, mut block_size) = (4096, false, None);
        if is_block {
            match sys::sector_size(&file) {
                Ok(n) if n > 0 => sector_size = u64::from(n),
                Ok(_) => {}
                Err(e) => crate::debug!("cannot get sector size: {name}: {}", Error::from(e)),
            }
            match sys::io_sizes(&file) {
                Ok((min, opt)) => block_size = block_size_from_io(min, opt),
                Err(e) => crate::debug!("cannot get BLKIOMIN/BLKIOOPT: {name}: {}", Error::from(e)),
            }
            match sys::rotational(&file) {
                Ok(r) => rotational = r,
                Err(e) => crate::debug!("cannot get BLKROTATIONAL: {name}: {}", Error::from(e)),
            }
        }
        let cache_none = evict.is_some();
        Ok(FileHandle {
            file: Arc::new(file),
            name,
            is_block,
            st_size: meta.len(),
            sector_size,
            can_write,
            rotational,
            block_size,
            evict,
            memo: Memo {
                punch_hole: Method::new(true),
                zero_range: Method::new(true),
                fallocate: Method::new(true),
                zeroout: Method::new(is_block),
                blkdiscard: Method::new(is_block),
                // cache=none evicts after each read: not for the fast path.
                nowait: Method::new(!cache_none),
                cachestat: Method::new(!cache_none),
                nowait_backoff: Backoff::default(),
                trim_warned: AtomicBool::new(false),
                zero_warned: AtomicBool::new(false),
            },
        })
    }

    fn at(&self, op: &str, offset: u64, count: u64) -> String {
        format!("{op}: {}: offset={offset}, count={count}", self.name)
    }

    /// BLKDISCARD / BLKZEROOUT need sector-aligned ranges.
    fn aligned(&self, offset: u64, count: u64) -> bool {
        self.is_block && (offset | count).is_multiple_of(self.sector_size)
    }

    /// Ok(true) if `r` succeeded; Ok(false) after disabling `m` if the error
    /// says the method is unsupported; otherwise the error, in `ctx`.
    fn attempt(m: &Method, r: io::Result<()>, unsupported: fn(&io::Error) -> bool,
               ctx: impl FnOnce() -> String) -> Result<bool> {
        match r {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                m.disable();
                Ok(false)
            }
            Err(e) => Err(Error::os(ctx(), e)),
        }
    }

    /// nbdkit 1.44's zero chain; Ok(false) if no method worked.
    fn try_zero(&self, count: u64, offset: u64, may_trim: bool) -> Result<bool> {
        let (m, f) = (&self.memo, &*self.file);
        let zctx = || self.at("zero", offset, count);
        let enotsup = sys::is_enotsup;

        // (1) A punched hole reads as zeroes, if the client lets us deallocate.
        if may_trim && m.punch_hole.on()
            && Self::attempt(&m.punch_hole, sys::fallocate(f, PUNCH_HOLE, offset, count), enotsup, zctx)?
        {
            return Ok(true);
        }
        // (2) Block devices: zero, then discard (a discard alone need not zero).
        if may_trim && self.aligned(offset, count) && m.zero_range.on() && m.blkdiscard.on() {
            // nbdkit also clears can_fallocate here; plain fallocate never
            // works on block devices anyway.
            if Self::attempt(&m.zero_range, sys::fallocate(f, libc::FALLOC_FL_ZERO_RANGE, offset, count),
                             enotsup, zctx)?
            {
                Self::attempt(&m.blkdiscard, sys::blk_range(f, sys::BLKDISCARD, offset, count), enotsup,
                              || format!("{}: BLKDISCARD", self.at("ioctl", offset, count)))?;
                return Ok(true);
            }
        }
        // (3) Zero in place.
        if m.zero_range.on()
            && Self::attempt(&m.zero_range, sys::fallocate(f, libc::FALLOC_FL_ZERO_RANGE, offset, count),
                             enotsup, zctx)?
        {
            return Ok(true);
        }
        // (4) Punch a hole, then allocate it again: still cheaper than writing.
        if m.punch_hole.on() && m.fallocate.on()
            && Self::attempt(&m.punch_hole, sys::fallocate(f, PUNCH_HOLE, offset, count), enotsup, zctx)?
            && Self::attempt(&m.fallocate, sys::fallocate(f, 0, offset, count), enotsup, zctx)?
        {
            return Ok(true);
        }
        // (5) Block devices: let the kernel (or device) write the zeroes.
        if m.zeroout.on() && self.aligned(offset, count)
            && Self::attempt(&m.zeroout, sys::blk_range(f, sys::BLKZEROOUT, offset, count),
                             |e| e.raw_os_error() == Some(libc::ENOTTY),
                             || format!("{}: BLKZEROOUT", self.at("ioctl", offset, count)))?
        {
            return Ok(true);
        }
        Ok(false)
    }

    fn fua(&self, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FUA) {
            self.flush(Flags::NONE)?;
        }
        Ok(())
    }
}

impl Handle for FileHandle {
    /// Writes land in the page cache, except with cache=none (each window
    /// of writes waits for the one before to reach the disk).
    fn brief(&self) -> bool {
        self.evict.is_none()
    }

    fn size(&self) -> Result<u64> {
        if !self.is_block {
            return Ok(self.st_size);
        }
        sys::device_size(&self.file).map_err(|e| Error::os(format_args!("device_size: {}", self.name), e))
    }

    fn caps(&self) -> Result<Caps> {
        // SEEK_HOLE fails on filesystems (and block devices) that cannot
        // report holes; decided per connection, as nbdkit does.
        let extents = match sys::seek(&self.file, 0, libc::SEEK_HOLE) {
            Ok(_) => true,
            Err(e) => {
                crate::debug!("extents disabled: lseek: SEEK_HOLE: {}", Error::from(e));
                false
            }
        };
        Ok(Caps {
            write: self.can_write,
            flush: true,
            rotational: self.rotational,
            trim: true,
            zero: Support::Native,
            fast_zero: false,
            extents,
            fua: Support::Native,
            multi_conn: true,
            cache: Support::Native,
        })
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.block_size)
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let (mut done, len) = (0, buf.len() as u64);
        while done < buf.len() {
            let pos = offset + done as u64;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => return Err(Error::io(format!("pread: {}: unexpected end of file", self.name))),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::os(self.at("pread", pos, (buf.len() - done) as u64), e)),
            }
        }
        if self.evict.is_some() {
            // cache=none: drop what we just read from the page cache.
            let _ = sys::fadvise(&self.file, offset, len, libc::POSIX_FADV_DONTNEED);
        }
        Ok(())
    }

    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        if !self.memo.nowait.on() || !self.memo.nowait_backoff.try_now() {
            return None;
        }
        match sys::pread_nowait(&self.file, buf, offset) {
            Ok(true) => {
                self.memo.nowait_backoff.hit();
                Some(Ok(()))
            }
            Ok(false) => {
                self.memo.nowait_backoff.missed();
                None
            }
            // Not supported here (old kernel, some file systems): never
            // again on this handle. Other errors: `pread` reports them.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)) => {
                self.memo.nowait.disable();
                None
            }
            Err(_) => None,
        }
    }

    /// The file itself, for `sendfile` (not with cache=none: those reads
    /// evict what they read, and go through `pread`). Regular files are
    /// checked against their size now, so that a read past the end of a
    /// file that shrank takes `pread` and gets its error reply.
    fn pread_fd(&self, count: usize, offset: u64, cached_only: bool) -> Option<(RawFd, u64)> {
        if self.evict.is_some() {
            return None;
        }
        let end = offset.checked_add(count as u64)?;
        if !self.is_block && sys::file_size(&self.file).ok()? < end {
            return None;
        }
        if cached_only {
            if !self.memo.cachestat.on() {
                return None;
            }
            match sys::cached(std::os::fd::AsFd::as_fd(&self.file), offset, count as u64) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)) {
                        self.memo.cachestat.disable();
                    }
                    return None;
                }
            }
        }
        Some((self.file.as_raw_fd(), offset))
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let left = (buf.len() - done) as u64;
            match self.file.write_at(&buf[done..], pos) {
                Ok(0) => return Err(Error::io(format!("{}: wrote 0 bytes", self.at("pwrite", pos, left)))),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::os(self.at("pwrite", pos, left), e)),
            }
        }
        self.fua(flags)?;
        if let Some(w) = &self.evict {
            w.evict_after_write(&self.file, offset, buf.len() as u64)?;
        }
        Ok(())
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::os(format_args!("fdatasync: {}", self.name), e))
    }

    /// nbdkit 1.44: punch a hole, else (block devices, aligned) BLKDISCARD;
    /// unsupported methods are skipped, other errors are real.
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (m, f) = (&self.memo, &*self.file);
        let mut trimmed = m.punch_hole.on()
            && Self::attempt(&m.punch_hole, sys::fallocate(f, PUNCH_HOLE, offset, count), sys::is_enotsup,
                             || self.at("fallocate", offset, count))?;
        // Like nbdkit 1.45 (1.44.x discards again after a successful punch).
        if !trimmed && m.blkdiscard.on() && self.aligned(offset, count) {
            trimmed = Self::attempt(&m.blkdiscard, sys::blk_range(f, sys::BLKDISCARD, offset, count),
                                    sys::is_enotsup,
                                    || format!("{}: BLKDISCARD", self.at("ioctl", offset, count)))?;
        }
        if !trimmed {
            // Trim is advisory: succeed, but say so once (and skip FUA).
            if !m.trim_warned.swap(true, Ordering::Relaxed) {
                crate::debug!("{}: could not trim, no trim methods worked", self.name);
            }
            return Ok(());
        }
        self.fua(flags)
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if !self.try_zero(count, offset, flags.contains(Flags::MAY_TRIM))? {
            if !self.memo.zero_warned.swap(true, Ordering::Relaxed) {
                crate::debug!("{}: zero falling back to writing", self.name);
            }
            // The checking layer writes zeroes instead.
            return Err(Error::new(ErrorKind::NotSupported,
                                  format!("{}: no zero method worked", self.at("zero", offset, count))));
        }
        self.fua(flags)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        let req_one = flags.contains(Flags::REQ_ONE);
        let end = offset.saturating_add(count);
        let mut offset = offset;
        while offset < end {
            let pos = match sys::seek(&self.file, offset, libc::SEEK_DATA) {
                Ok(p) => p,
                // ENXIO: offset is inside the final hole of the file.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(Error::os(format_args!("lseek: {}: SEEK_DATA: {offset}", self.name), e)),
            };
            if pos > offset {
                ext.add(offset, pos - offset, extents::HOLE | extents::ZERO)?;
                if req_one {
                    break;
                }
            }
            offset = pos;
            if offset >= end {
                break;
            }
            let pos = sys::seek(&self.file, offset, libc::SEEK_HOLE)
                .map_err(|e| Error::os(format_args!("lseek: {}: SEEK_HOLE: {offset}", self.name), e))?;
            if pos > offset {
                ext.add(offset, pos - offset, 0)?;
                if req_one {
                    break;
                }
            }
            offset = pos;
        }
        Ok(())
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        sys::fadvise(&self.file, offset, count, libc::POSIX_FADV_WILLNEED)
            .map_err(|e| Error::os(self.at("posix_fadvise", offset, count), e))
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::Backoff;

    /// How many of the next `n` reads try.
    fn tries(b: &Backoff, n: usize) -> usize {
        (0..n).filter(|_| b.try_now()).count()
    }

    #[test]
    fn misses_space_the_tries_out_and_a_hit_ends_that() {
        let b = Backoff::default();
        assert_eq!(tries(&b, 10), 10);
        b.missed(); // skip 1
        assert!(!b.try_now());
        assert!(b.try_now());
        b.missed(); // skip 3
        assert_eq!(tries(&b, 4), 1);
        for _ in 0..10 {
            b.missed();
        }
        // Capped: one try in 64 reads.
        assert_eq!(tries(&b, 64), 1);
        b.missed();
        b.hit();
        assert_eq!(tries(&b, 63), 0); // the skips already set still run out
        assert_eq!(tries(&b, 10), 10);
    }
}
