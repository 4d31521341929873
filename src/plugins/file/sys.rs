//! The Linux calls std does not wrap (fallocate, block-device ioctls,
//! SEEK_DATA/SEEK_HOLE, posix_fadvise, sync_file_range, openat, readdir),
//! each behind a safe function with one small `unsafe` block.

use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use libc::{c_int, c_uint, c_ushort, Ioctl};

/// `_IO(0x12, nr)`, built on libc's `BLKSSZGET` (= `_IO(0x12, 104)`) so the
/// direction bits are right for the architecture.
const fn blk_io(nr: Ioctl) -> Ioctl {
    (libc::BLKSSZGET & !0xff) | nr
}

/// Discard a byte range of a block device (`u64[2]` = offset, length).
pub const BLKDISCARD: Ioctl = blk_io(119);
/// Write zeroes to a byte range of a block device (`u64[2]`).
pub const BLKZEROOUT: Ioctl = blk_io(127);
/// Is the device rotational (`unsigned short`).
const BLKROTATIONAL: Ioctl = blk_io(126);
/// Device size in bytes: `_IOR(0x12, 114, size_t)`.
#[cfg(any(target_arch = "mips", target_arch = "mips64", target_arch = "powerpc",
          target_arch = "powerpc64", target_arch = "sparc", target_arch = "sparc64"))]
const BLKGETSIZE64: Ioctl = 0x4008_1272_u32 as Ioctl;
#[cfg(not(any(target_arch = "mips", target_arch = "mips64", target_arch = "powerpc",
              target_arch = "powerpc64", target_arch = "sparc", target_arch = "sparc64")))]
const BLKGETSIZE64: Ioctl = 0x8008_1272_u32 as Ioctl;

fn cvt(r: c_int) -> io::Result<c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn off(n: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// True for ENOTSUP/EOPNOTSUPP (the same number on Linux).
pub fn is_enotsup(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// `fallocate(2)`. ENODEV (old kernels on block devices) is reported as
/// EOPNOTSUPP, as nbdkit does, so callers only test for one errno.
pub fn fallocate(f: &File, mode: c_int, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: plain syscall on an fd we own; no pointers involved.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, o, l) };
    let r = cvt(r);
    if crate::util::log::debug_flag("file", "zero") > 0 {
        let errno = r.as_ref().err().and_then(io::Error::raw_os_error).unwrap_or(0);
        crate::debug!("fallocate (fd, 0x{mode:x}, {offset}, {len}) = {} (errno {errno})", if r.is_ok() { 0 } else { -1 });
    }
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        r => r.map(drop),
    }
}

/// `ioctl(fd, req, &u64[2] { offset, len })`: BLKDISCARD, BLKZEROOUT.
pub fn blk_range(f: &File, req: Ioctl, offset: u64, len: u64) -> io::Result<()> {
    debug_assert!(req == BLKDISCARD || req == BLKZEROOUT);
    let range: [u64; 2] = [offset, len];
    // SAFETY: both requests read exactly two u64 from the pointer, which
    // points at a live local array.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), req, range.as_ptr()) }).map(drop)
}

/// # Safety
/// `T` must have the size and layout of what the kernel writes for `req`.
unsafe fn ioctl_get<T: Copy + Default>(f: &File, req: Ioctl) -> io::Result<T> {
    let mut v = T::default();
    // SAFETY: the caller guarantees the kernel writes exactly a T.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v as *mut T) })?;
    Ok(v)
}

/// BLKGETSIZE64: the size of a block device in bytes.
pub fn device_size(f: &File) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes a u64.
    unsafe { ioctl_get::<u64>(f, BLKGETSIZE64) }
}

/// BLKSSZGET: logical sector size.
pub fn sector_size(f: &File) -> io::Result<u32> {
    // SAFETY: BLKSSZGET writes an int.
    let n = unsafe { ioctl_get::<c_int>(f, libc::BLKSSZGET) }?;
    u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// BLKIOMIN and BLKIOOPT: minimum and optimal I/O sizes.
pub fn io_sizes(f: &File) -> io::Result<(u32, u32)> {
    // SAFETY: both requests write an unsigned int.
    let min = unsafe { ioctl_get::<c_uint>(f, libc::BLKIOMIN) }?;
    // SAFETY: as above.
    let opt = unsafe { ioctl_get::<c_uint>(f, libc::BLKIOOPT) }?;
    Ok((min, opt))
}

/// BLKROTATIONAL: true for spinning disks.
pub fn rotational(f: &File) -> io::Result<bool> {
    // SAFETY: BLKROTATIONAL writes an unsigned short.
    unsafe { ioctl_get::<c_ushort>(f, BLKROTATIONAL) }.map(|r| r != 0)
}

/// `lseek(fd, offset, whence)` for SEEK_DATA / SEEK_HOLE. Only the return
/// value is used (all I/O is positional), so racing seeks do not matter.
pub fn seek(f: &File, offset: u64, whence: c_int) -> io::Result<u64> {
    debug_assert!(whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE);
    let o = off(offset)?;
    // SAFETY: plain syscall, no pointers.
    let r = unsafe { libc::lseek(f.as_raw_fd(), o, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// `posix_fadvise(2)`; it returns the error number instead of setting errno.
pub fn fadvise(f: &File, offset: u64, len: u64, advice: c_int) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: plain syscall, no pointers.
    match unsafe { libc::posix_fadvise(f.as_raw_fd(), o, l, advice) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// `preadv2(RWF_NOWAIT)`: reads all of `buf` at `offset` if it is in the
/// page cache. `Ok(false)` if some of it is not (EAGAIN, or a short read
/// that the caller redoes the usual way).
pub fn pread_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let o = off(offset)?;
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec describing `buf`, which outlives the call.
    let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, o, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) { Ok(false) } else { Err(e) };
    }
    Ok(n as usize == buf.len())
}

/// The size of a regular file now (`fstat`).
pub fn file_size(f: &File) -> io::Result<u64> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the stat buffer given on success.
    cvt(unsafe { libc::fstat(f.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so the buffer is initialized.
    Ok(unsafe { st.assume_init() }.st_size as u64)
}

/// `cachestat(2)` (Linux 6.5), not in libc yet: the same number on every
/// architecture (the unified syscall table).
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// True if every page of `[offset, offset+len)` is in the page cache
/// (`cachestat(2)`: one call, nothing copied). ENOSYS on older kernels.
pub fn cached(f: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let range = CachestatRange { off: offset, len };
    let mut cs = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `cs`, both live and of
    // the layout cachestat(2) defines; flags must be 0.
    let r = unsafe {
        libc::syscall(SYS_CACHESTAT, f.as_raw_fd() as libc::c_long, &range as *const CachestatRange,
                      &mut cs as *mut Cachestat, 0 as libc::c_long)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let page = page_size();
    let pages = (offset + len - 1) / page - offset / page + 1;
    Ok(cs.nr_cache >= pages)
}

/// The system's page size.
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf reads no memory of ours.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// `sync_file_range(2)`.
pub fn sync_file_range(f: &File, offset: u64, len: u64, flags: c_uint) -> io::Result<()> {
    let (o, l) = (off(offset)?, off(len)?);
    // SAFETY: plain syscall, no pointers.
    cvt(unsafe { libc::sync_file_range(f.as_raw_fd(), o, l, flags) }).map(drop)
}

/// `openat(dir, name, flags | O_CLOEXEC | O_NOCTTY)`; `dir` may be `AT_FDCWD`.
pub fn openat(dir: RawFd, name: &CStr, flags: c_int) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated; without O_CREAT no mode is read.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) })?;
    // SAFETY: openat just returned this fd and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of an inherited fd (`F_DUPFD_CLOEXEC`).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on a number; an invalid fd gives EBADF.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fcntl just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The access mode of an open file (`O_RDONLY`, `O_WRONLY` or `O_RDWR`).
pub fn access_mode(f: &File) -> io::Result<c_int> {
    // SAFETY: plain syscall, no pointers.
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) }).map(|fl| fl & libc::O_ACCMODE)
}

/// An open directory stream, closed on drop.
struct Dir(*mut libc::DIR);

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: self.0 came from fdopendir and is closed only here.
        unsafe { libc::closedir(self.0) };
    }
}

/// The names of the regular files and block devices directly inside the
/// directory `dfd`, in readdir order, following symlinks (d_type first,
/// fstatat when it is a link or unknown). `dfd` itself is left open.
pub fn list_files(dfd: RawFd) -> io::Result<Vec<OsString>> {
    let fd = dup(dfd)?.into_raw_fd();
    // SAFETY: fd is ours; on success the stream owns it.
    let dir = unsafe { libc::fdopendir(fd) };
    if dir.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so fd is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return Err(e);
    }
    let dir = Dir(dir);
    // The duplicate shares its offset with dfd: start from the beginning.
    // SAFETY: dir.0 is a valid stream.
    unsafe { libc::rewinddir(dir.0) };
    let mut names = Vec::new();
    loop {
        // readdir reports errors only through errno, so clear it first.
        // SAFETY: errno is thread-local and always writable.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dir.0 is a valid stream.
        let ent = unsafe { libc::readdir(dir.0) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(0) { Ok(names) } else { Err(e) };
        }
        // SAFETY: a non-null entry stays valid until the next readdir on
        // this stream, and d_name is NUL-terminated.
        let (typ, name) = unsafe { ((*ent).d_type, CStr::from_ptr((*ent).d_name.as_ptr())) };
        let wanted = match typ {
            libc::DT_REG | libc::DT_BLK => true,
            libc::DT_LNK | libc::DT_UNKNOWN => is_file_at(dfd, name),
            _ => false,
        };
        if wanted {
            names.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
        }
    }
}

/// True if `name` in `dfd` is (or links to) a regular file or block device.
fn is_file_at(dfd: RawFd, name: &CStr) -> bool {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: name is NUL-terminated and st is large enough for a stat.
    if unsafe { libc::fstatat(dfd, name.as_ptr(), st.as_mut_ptr(), 0) } != 0 {
        return false;
    }
    // SAFETY: fstatat succeeded, so it filled st in.
    let mode = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    mode == libc::S_IFREG || mode == libc::S_IFBLK
}
