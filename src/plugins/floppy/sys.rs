//! The system calls the read path needs beyond std, each behind a safe
//! function with one small `unsafe` block.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The file's size, by `fstat` without the rest of `Metadata`'s work.
#[allow(unsafe_code)]
pub fn size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: zeroed is a valid `stat`; fstat only writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to our struct.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

fn offset(offset: u64) -> io::Result<i64> {
    i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `pread`: how many bytes were read (0 at the end of the file).
#[allow(unsafe_code)]
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let o = offset(at)?;
    // SAFETY: `buf` is valid for writes of its length for the call.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), o) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `preadv2(RWF_NOWAIT)`: `Ok(true)` if all of `buf` was read from the
/// page cache, `Ok(false)` if some of it is not there (EAGAIN, a short read).
#[allow(unsafe_code)]
pub fn pread_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], at: u64) -> io::Result<bool> {
    let o = offset(at)?;
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec describing `buf`, which outlives the call.
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, o, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) { Ok(false) } else { Err(e) };
    }
    Ok(n as usize == buf.len())
}

/// `preadv2` of `buf` then `extra` (scratch space past `buf`, never read
/// here: it may stay uninitialized) at `at`, with `flags` (0 or
/// `RWF_NOWAIT`): how many bytes were read.
#[allow(unsafe_code)]
pub fn pread_extra(fd: BorrowedFd<'_>, buf: &mut [u8], extra: &mut [std::mem::MaybeUninit<u8>], at: u64,
                   flags: libc::c_int) -> io::Result<usize> {
    let o = offset(at)?;
    let iov = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
               libc::iovec { iov_base: extra.as_mut_ptr().cast(), iov_len: extra.len() }];
    // SAFETY: two iovecs describing `buf` and `extra`, which outlive the
    // call; the kernel only writes into them.
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), iov.as_ptr(), 2, o, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Moves the calling thread to SCHED_IDLE: it runs only when its core has
/// nothing else to run. Best effort. (The raw system call: musl's
/// `sched_setscheduler` is a stub, POSIX makes it per process.)
#[allow(unsafe_code)]
pub fn idle_priority() {
    // SAFETY: zeroed is a valid sched_param (priority 0, as SCHED_IDLE needs).
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel reads the struct we pass; pid 0 is this thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, libc::SCHED_IDLE, &param as *const libc::sched_param) };
    if r != 0 {
        crate::debug!("floppy: SCHED_IDLE: {}", io::Error::last_os_error());
    }
}

/// True if every page of `[at, at+len)` is in the page cache (the file
/// plugin's `cachestat(2)`); false if not, or if the kernel cannot tell.
pub fn cached(fd: BorrowedFd<'_>, at: u64, len: u64) -> bool {
    crate::plugins::file::sys::cached(fd, at, len).unwrap_or(false)
}

/// What the scan keeps of a `stat`.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub mode: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
}

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

impl From<&std::fs::Metadata> for Stat {
    fn from(m: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat { mode: m.mode(), size: m.size(), dev: m.dev(), ino: m.ino(), atime: m.atime(), mtime: m.mtime(), ctime: m.ctime() }
    }
}

/// `open(path, O_DIRECTORY | O_NOFOLLOW)`.
#[allow(unsafe_code)]
pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; without O_CREAT no mode is read.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `getdents64` into `buf`: how many bytes of records (0 at the end).
#[allow(unsafe_code)]
pub fn getdents(dir: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd() as libc::c_long, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The names in `getdents64` records (`struct linux_dirent64`: 8 bytes of
/// inode, 8 of offset, 2 of record length, 1 of type, then the name and
/// its NUL). Stops at a malformed record.
pub fn dirent_names(mut recs: &[u8]) -> impl Iterator<Item = &CStr> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(recs.get(16..18)?.try_into().ok()?));
        let rec = recs.get(..len)?;
        recs = &recs[len..];
        CStr::from_bytes_until_nul(rec.get(19..)?).ok()
    })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
#[allow(unsafe_code)]
pub fn lstat_at(dir: &OwnedFd, name: &CStr) -> io::Result<Stat> {
    // SAFETY: zeroed is a valid `stat`; fstatat only writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, a NUL-terminated name, our struct.
    if unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Stat {
        mode: st.st_mode,
        size: st.st_size as u64,
        dev: st.st_dev,
        ino: st.st_ino,
        atime: st.st_atime,
        mtime: st.st_mtime,
        ctime: st.st_ctime,
    })
}
