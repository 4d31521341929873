//! A big WRITE's payload moved from the socket into the file's page cache
//! with `splice` (socket → pipe → file): the kernel copies it once, into
//! the page cache, instead of into a user buffer and then again into the
//! page cache. The whole payload is staged in the pipe before any of it
//! goes to the file, so a payload cut off by the client never reaches it
//! (bad-input T25).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The pipe size asked for (`/proc/sys/fs/pipe-max-size` is 1 MiB by
/// default; the kernel gives what it may).
const PIPE_WANT: libc::c_int = 1 << 20;

/// A worker's staging pipe.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Its capacity in bytes: payloads up to this size are staged (if the
    /// socket's data comes in pieces smaller than a page, fewer fit).
    pub cap: usize,
}

/// What staging a payload gave.
pub enum Staged {
    /// All of it is in the pipe.
    Whole,
    /// The pipe filled up first: the first `got` bytes are in it.
    Full(usize),
    /// The client hung up (or the socket broke) mid-payload.
    Cut,
}

impl Pipe {
    /// A new pipe of up to 1 MiB.
    #[allow(unsafe_code)]
    pub fn new() -> std::io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned them and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our own descriptor; a failure leaves the default.
        let cap = unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_WANT);
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        Ok(Pipe { r, w, cap: cap.max(0) as usize })
    }

    /// Stages `n` bytes of payload: `buffered` (already read, at most `n`)
    /// written into the pipe, the rest spliced from socket `sock`.
    #[allow(unsafe_code)]
    pub fn stage(&self, sock: RawFd, buffered: &[u8], n: usize) -> Staged {
        let mut got = 0;
        while got < buffered.len() {
            let b = &buffered[got..];
            // SAFETY: `b` is live; the pipe holds at least `cap` ≥ n bytes
            // of plain writes, so this does not block.
            let k = unsafe { libc::write(self.w.as_raw_fd(), b.as_ptr().cast(), b.len()) };
            if k <= 0 {
                if k < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Staged::Full(got);
            }
            got += k as usize;
        }
        let mut polled = false;
        while got < n {
            // SAFETY: splice between two descriptors, no offsets.
            let k = unsafe {
                libc::splice(sock, std::ptr::null_mut(), self.w.as_raw_fd(), std::ptr::null_mut(), n - got,
                             libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK)
            };
            if k > 0 {
                got += k as usize;
                polled = false;
                continue;
            }
            if k == 0 {
                return Staged::Cut;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => {}
                // The socket said it had data and the pipe took none: full.
                std::io::ErrorKind::WouldBlock if polled => return Staged::Full(got),
                std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    let r = unsafe { libc::poll(&mut pfd, 1, -1) };
                    if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        return Staged::Cut;
                    }
                    polled = r > 0;
                }
                _ => return Staged::Cut,
            }
        }
        Staged::Whole
    }

    /// Moves what the pipe holds (`n` bytes) into `buf` (the fallback when
    /// the pipe filled up before the payload was whole).
    #[allow(unsafe_code)]
    pub fn drain_into(&self, buf: &mut [u8]) -> bool {
        let mut at = 0;
        while at < buf.len() {
            let b = &mut buf[at..];
            // SAFETY: `b` is live and writable for its length.
            let k = unsafe { libc::read(self.r.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            if k <= 0 {
                if k < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            at += k as usize;
        }
        true
    }

    /// Splices the `n` staged bytes into `fd` at `off`.
    #[allow(unsafe_code)]
    pub fn commit(&self, fd: RawFd, off: u64, n: usize) -> std::io::Result<()> {
        let mut pos = libc::loff_t::try_from(off).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mut left = n;
        while left > 0 {
            // SAFETY: splice from the pipe into the file at `pos`, a live loff_t.
            let k = unsafe {
                libc::splice(self.r.as_raw_fd(), std::ptr::null_mut(), fd, &mut pos, left, libc::SPLICE_F_MOVE)
            };
            if k > 0 {
                left -= k as usize;
                continue;
            }
            if k == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}
