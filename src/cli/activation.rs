//! systemd socket activation (`sd_listen_fds`), as nbdkit's
//! `get_socket_activation` does it: once `LISTEN_PID` is ours and
//! `LISTEN_FDS` a number, the descriptors 3 … 3+N-1 are the listening
//! sockets. `LISTEN_FDNAMES` only names them; nbdkit ignores it, and so
//! do we (each descriptor is served the same way whatever its name).

#![allow(unsafe_code)]

use crate::util::parse::parse_unsigned;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: i32 = 3;
/// nbdkit's limit on the number of descriptors.
pub const MAX_FDS: u64 = 16;

/// Takes over the activation descriptors: checks `LISTEN_FDS` (already
/// known to parse) is 1..16, marks each descriptor close-on-exec (so
/// `--run` commands and plugins' children do not inherit them; failing
/// means the descriptor is not open) and removes the variables from the
/// environment. Returns the count, or the message to print before exit 1.
pub(super) fn take(listen_fds: &str) -> Result<u32, String> {
    let n = parse_unsigned("LISTEN_FDS", listen_fds, u32::MAX.into()).map_err(|e| format!("nbdkit: error: {}\n", e.message()))?;
    if !(1..=MAX_FDS).contains(&n) {
        return Err(format!("nbdkit: socket activation: LISTEN_FDS={listen_fds} out of range\n"));
    }
    // So these are not passed to any child process.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDNAMES");
    for i in 0..n as i32 {
        let fd = FIRST_FD + i;
        // SAFETY: fcntl with integer arguments on a descriptor number; an
        // unopened one gives EBADF.
        let ok = unsafe {
            let f = libc::fcntl(fd, libc::F_GETFD);
            f != -1 && libc::fcntl(fd, libc::F_SETFD, f | libc::FD_CLOEXEC) != -1
        };
        if !ok {
            let e = crate::error::strip_os_suffix(&std::io::Error::last_os_error());
            return Err(format!("nbdkit: socket activation: invalid file descriptor fd = {fd}: {e}\n"));
        }
    }
    Ok(n as u32)
}
