//! Process-level chores: forking into the background, the pidfile,
//! `--exit-with-parent`, replacing stdio, and turning signals into a
//! clean shutdown.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Forks into the background: the parent exits 0 at once, the child
/// starts a new session, moves to `/` and loses its terminal. Must run
/// before any thread is started.
pub fn daemonize(keep_stderr: bool) -> io::Result<()> {
    // SAFETY: no other thread exists yet (checked by the caller's order).
    match unsafe { libc::fork() } {
        -1 => return Err(io::Error::last_os_error()),
        0 => {}
        _ => std::process::exit(0),
    }
    // SAFETY: plain syscalls without pointers.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    redirect(null.as_raw_fd(), libc::STDIN_FILENO)?;
    redirect(null.as_raw_fd(), libc::STDOUT_FILENO)?;
    if !keep_stderr {
        redirect(null.as_raw_fd(), libc::STDERR_FILENO)?;
    }
    Ok(())
}

fn redirect(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on descriptors we own; `to` is a standard descriptor.
    if unsafe { libc::dup2(from, to) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates a descriptor (close-on-exec), e.g. to keep stdin for `-s`.
pub fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Clears O_NONBLOCK (the async reactor set it) for blocking I/O.
pub fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Points stdin and stdout at /dev/null, as nbdkit does once it serves.
pub fn null_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    redirect(null.as_raw_fd(), libc::STDIN_FILENO)?;
    redirect(null.as_raw_fd(), libc::STDOUT_FILENO)
}

/// Writes `PID\n` to the pidfile.
pub fn write_pidfile(path: &Path) -> io::Result<()> {
    let tmp = format!("{}\n", std::process::id());
    std::fs::write(path, tmp)
}

/// SIGTERM to ourselves when the parent dies (`--exit-with-parent`).
pub fn exit_with_parent() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // The parent may already be gone.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        // SAFETY: raising a signal we handle.
        unsafe { libc::raise(libc::SIGTERM) };
    }
    Ok(())
}

/// Ignores SIGPIPE: a client that hangs up gives EPIPE, not death.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Blocks (`how` = SIG_BLOCK) or unblocks (SIG_UNBLOCK) SIGINT, SIGQUIT,
/// SIGTERM and SIGHUP in the calling thread. The server blocks them from
/// its first step until [`watch_signals`] is in place (after the fork), so
/// a shutdown signal that comes during start-up waits and then stops the
/// server cleanly instead of killing it by the default action (which
/// would leave, say, the sh plugin's `$tmpdir` behind). Threads started
/// meanwhile inherit the mask; children get a clean one from `Command`.
#[allow(unsafe_code)]
pub fn mask_quit_signals(how: libc::c_int) {
    // SAFETY: a sigset_t built with sigemptyset/sigaddset, passed by
    // pointer to pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Starts the thread that turns SIGINT, SIGQUIT, SIGTERM and SIGHUP into
/// `on_quit()` (called once per signal).
pub fn watch_signals(on_quit: impl Fn() + Send + 'static) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGQUIT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for _ in signals.forever() {
            on_quit();
        }
    })?;
    Ok(())
}

/// A private directory for `-U -`, removed with the socket on drop.
#[derive(Debug)]
pub struct PrivateDir {
    /// The directory.
    pub dir: std::path::PathBuf,
}

impl PrivateDir {
    /// Creates `/tmp/nbdkitXXXXXX`.
    pub fn new() -> io::Result<PrivateDir> {
        let mut template = *b"/tmp/nbdkitXXXXXX\0";
        // SAFETY: template is a writable NUL-terminated buffer.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        let s = String::from_utf8_lossy(&template[..template.len() - 1]).into_owned();
        Ok(PrivateDir { dir: s.into() })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
