//! The two system calls the read path needs beyond std, each behind a
//! safe function with one small `unsafe` block.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The file's size, by `fstat` without the rest of `Metadata`'s work.
#[allow(unsafe_code)]
pub fn size(f: &File) -> io::Result<u64> {
    // SAFETY: zeroed is a valid `stat`; fstat only writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to our struct.
    if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// `preadv2(RWF_NOWAIT)`: `Ok(true)` if all of `buf` was read from the
/// page cache, `Ok(false)` if some of it is not there (EAGAIN, a short read).
#[allow(unsafe_code)]
pub fn pread_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let o = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: one iovec describing `buf`, which outlives the call.
    let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, o, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EAGAIN) { Ok(false) } else { Err(e) };
    }
    Ok(n as usize == buf.len())
}
