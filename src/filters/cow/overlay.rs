//! The cow overlay of one export: an unlinked temporary file holding the
//! blocks written so far, a state per block, and striped locks that order
//! the writes to each block.
//!
//! No lock covers the whole overlay on the data path. The block states
//! are atomics read without locking; a block's state only changes with
//! its stripe lock held, and only after its data is in the file, so a
//! reader that sees `ALLOCATED` finds the data. Writers of a block (a
//! read-modify-write of part of it, a write, zero or trim of all of it,
//! a copy-on-read) take its stripe lock, so two never interleave.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::error::{Error, Result};

/// Never written: read from the plugin.
pub(super) const ABSENT: u8 = 0;
/// In the overlay file.
pub(super) const ALLOCATED: u8 = 1;
/// Trimmed: reads as zeroes.
pub(super) const TRIMMED: u8 = 2;

/// Number of stripe locks (a power of 2).
const STRIPES: usize = 1024;

/// Blocks share a stripe lock in aligned groups of 2^GROUP_SHIFT, so a
/// 1 MiB write of 64 KiB blocks takes one or two locks, not sixteen.
const GROUP_SHIFT: u32 = 4;

/// The stripe of block `blk`: groups are hashed (Fibonacci hashing), so
/// writers at offsets a power of two apart (fio's jobs at 1/4 of the
/// disk each) do not fall on the same stripes.
fn stripe(blk: u64) -> usize {
    ((blk >> GROUP_SHIFT).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - STRIPES.trailing_zeros())) as usize
}

/// Most blocks one write of whole blocks locks at once.
pub(super) const MAX_RUN: u64 = 256;

/// One export's overlay.
pub(super) struct Overlay {
    file: File,
    /// Block size, a power of 2.
    pub bs: u64,
    /// log2(bs).
    shift: u32,
    /// One state per block; only grows (at open). Zero-allocated, so the
    /// pages of blocks never written cost no memory.
    states: RwLock<Box<[AtomicU8]>>,
    stripes: Box<[Mutex<()>]>,
    /// `preadv2(RWF_NOWAIT)` works on this file.
    nowait: AtomicBool,
    /// After a miss, this many tries are skipped (the data is likely on
    /// disk: the page cache was evicted).
    nowait_skip: AtomicU32,
}

/// The block states, read-locked for one request.
pub(super) struct States<'a>(RwLockReadGuard<'a, Box<[AtomicU8]>>);

impl States<'_> {
    /// State of block `blk` (`ABSENT` past the end, which cannot happen
    /// for a range the checking layer let through).
    pub fn get(&self, blk: u64) -> u8 {
        self.0.get(blk as usize).map_or(ABSENT, |s| s.load(Ordering::Acquire))
    }
    /// Sets the state of block `blk`; the caller holds its stripe lock.
    pub fn set(&self, blk: u64, st: u8) {
        if let Some(s) = self.0.get(blk as usize) {
            s.store(st, Ordering::Release);
        }
    }
    /// End of the run of blocks from `blk` in the same state, at most `last`.
    pub fn run_end(&self, blk: u64, last: u64) -> u64 {
        let st = self.get(blk);
        let mut b = blk + 1;
        while b <= last && self.get(b) == st {
            b += 1;
        }
        b
    }
}

impl Overlay {
    /// A new empty overlay in `dir`, with `bs`-byte blocks.
    pub fn new(dir: &Path, bs: u64) -> Result<Overlay> {
        let file = temp_file(dir)?;
        Ok(Overlay {
            file,
            bs,
            shift: bs.trailing_zeros(),
            states: RwLock::new(Box::new([])),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            nowait: AtomicBool::new(true),
            nowait_skip: AtomicU32::new(0),
        })
    }

    /// Block number of byte `offset`.
    pub fn block(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// Makes room for a disk of `size` bytes (the file is sized to whole blocks).
    pub fn ensure_size(&self, size: u64) -> Result<()> {
        let blocks = size.div_ceil(self.bs);
        let n = usize::try_from(blocks).map_err(|_| Error::invalid("cow: disk too large"))?;
        if self.states.read().unwrap_or_else(|e| e.into_inner()).len() >= n {
            return Ok(());
        }
        let mut st = self.states.write().unwrap_or_else(|e| e.into_inner());
        if st.len() < n {
            let new = zeroed_states(n)?;
            for (a, b) in st.iter().zip(new.iter()) {
                b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            *st = new;
            self.file
                .set_len(blocks * self.bs)
                .map_err(|e| Error::os("cow: ftruncate: overlay", e))?;
        }
        Ok(())
    }

    /// The states, for one request.
    pub fn states(&self) -> States<'_> {
        States(self.states.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Locks block `blk` against other writers.
    pub fn lock(&self, blk: u64) -> MutexGuard<'_, ()> {
        self.stripes[stripe(blk)].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks blocks `blk..blk+n` (n ≥ 1): each stripe once, in ascending
    /// order, so that two runs never deadlock.
    pub fn lock_run(&self, blk: u64, n: u64) -> Vec<MutexGuard<'_, ()>> {
        let (g0, g1) = (blk >> GROUP_SHIFT, (blk + n - 1) >> GROUP_SHIFT);
        let mut idx: Vec<usize> = (g0..=g1).map(|g| stripe(g << GROUP_SHIFT)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())).collect()
    }

    /// Reads from the overlay file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::os(format_args!("cow: pread: overlay: offset={offset}"), e))
    }

    /// Reads from the overlay file only if all of it is in the page
    /// cache (`preadv2(RWF_NOWAIT)`); false if not (nothing to report:
    /// the caller reads the usual way).
    #[allow(unsafe_code)]
    pub fn read_nowait(&self, buf: &mut [u8], offset: u64) -> bool {
        if !self.nowait.load(Ordering::Relaxed) {
            return false;
        }
        if self.nowait_skip.load(Ordering::Relaxed) > 0 {
            self.nowait_skip.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: one iovec describing `buf`, which outlives the call.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) };
        if n == buf.len() as isize {
            return true;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            if matches!(e, Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)) {
                self.nowait.store(false, Ordering::Relaxed);
                return false;
            }
        }
        self.nowait_skip.store(8, Ordering::Relaxed);
        false
    }

    /// Writes to the overlay file.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::os(format_args!("cow: pwrite: overlay: offset={offset}"), e))
    }

    /// Makes `[offset, offset+len)` of the file read as zeroes without
    /// writing them: `FALLOC_FL_ZERO_RANGE` keeps (or allocates) the
    /// blocks as unwritten extents, so a later write of data there
    /// allocates nothing and the file does not fragment the way punched
    /// holes refilled later do; then a punched hole; then written zeroes.
    #[allow(unsafe_code)]
    pub fn zero_at(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: a plain syscall on an fd we own.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, offset as i64, len as i64) };
        if r == 0 || punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Frees the file space of trimmed blocks (advisory).
    pub fn discard(&self, offset: u64, len: u64) {
        let _ = punch_hole(&self.file, offset, len);
    }

    /// `posix_fadvise(WILLNEED)` on a range of the file (advisory).
    #[allow(unsafe_code)]
    pub fn will_need(&self, offset: u64, len: u64) {
        // SAFETY: a plain syscall on an fd we own.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_WILLNEED) };
    }
}

/// `n` states, all `ABSENT` (0), from zeroed memory: the kernel maps
/// the pages only when a block's state is first set.
#[allow(unsafe_code)]
fn zeroed_states(n: usize) -> Result<Box<[AtomicU8]>> {
    let oom = || Error::new(crate::error::ErrorKind::NoMem, format!("cow: block map of {n} blocks: out of memory"));
    let layout = std::alloc::Layout::array::<AtomicU8>(n).map_err(|_| oom())?;
    if n == 0 {
        return Ok(Box::new([]));
    }
    // SAFETY: the layout has a non-zero size; AtomicU8 has the size,
    // alignment and bit validity of u8, so zeroed memory is `n` valid
    // AtomicU8 (0 = ABSENT), and the Box takes ownership of exactly the
    // allocation made with this layout by the global allocator.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<AtomicU8>();
        if p.is_null() {
            return Err(oom());
        }
        Ok(Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)))
    }
}

#[allow(unsafe_code)]
fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: a plain syscall on an fd we own.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as i64, len as i64)
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// `mkstemp("DIR/cowXXXXXX")` then unlink, as nbdkit does: the overlay
/// disappears with the process.
#[allow(unsafe_code)]
fn temp_file(dir: &Path) -> Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let mut template = dir.join("cowXXXXXX").as_os_str().as_bytes().to_vec();
    template.push(0);
    // SAFETY: `template` is a writable NUL-terminated buffer that mkostemp
    // fills in place.
    let fd = unsafe { libc::mkostemp(template.as_mut_ptr().cast(), libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Error::last_os(format_args!("mkostemp: {}", dir.display())));
    }
    // SAFETY: mkostemp returned a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: `template` now holds the NUL-terminated name created.
    if unsafe { libc::unlink(template.as_ptr().cast()) } < 0 {
        return Err(Error::last_os("cow: unlink: overlay"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_lock_each_stripe_once_and_spread_out() {
        let ov = Overlay::new(&std::env::temp_dir(), 4096).unwrap();
        // Overlapping stripes within a run would deadlock here.
        for start in [0u64, 15, 16, 1000, 4096, u64::MAX / 2] {
            drop(ov.lock_run(start, MAX_RUN));
        }
        assert_eq!(stripe(0), stripe(15));
        // Groups a power of two apart land on different stripes.
        let s: std::collections::HashSet<usize> = (0..4u64).map(|q| stripe(q << 14)).collect();
        assert_eq!(s.len(), 4);
    }
}
