//! Running one method of a script: spawn it without copying the server
//! (posix_spawn, in a process group of its own), feed stdin while both
//! stdout and stderr are drained (one `poll` loop, so a 64 MiB pwrite or
//! pread cannot deadlock on a full pipe), then reap it.
//!
//! A call that waits on its script also watches the client's socket and
//! the server's shutdown flag: if the client hangs up the script's whole
//! process group is killed at once; if the server stops it gets
//! [`STOP_GRACE`] to finish. Either way the child is reaped: no zombie.
//! Every descriptor the server opens is close-on-exec (std opens them so),
//! so the script inherits only its three pipes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::util::shutdown;

/// How long a script may still run once the server has begun to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// How often a waiting call looks at the shutdown flag.
const TICK: i32 = 200;

/// Most of a script's stdout kept (pread's buffer aside): a script that
/// prints more is killed and the call fails.
const MAX_STDOUT: usize = 64 << 20;

/// Most of a script's stderr kept; the rest is read and dropped.
const MAX_STDERR: usize = 1 << 20;

/// One executable: a script file, run directly (its `#!` line, or a
/// binary) or, for a file without one, by `/bin/sh` as `execvp` does.
#[derive(Debug)]
pub struct Script {
    /// The path, as `$0` and in messages.
    pub path: PathBuf,
    /// Run it with `/bin/sh` (learnt from the first ENOEXEC).
    via_sh: AtomicBool,
}

impl Script {
    /// A script at `path`; `via_sh` if it is known to have no `#!` line.
    pub fn new(path: PathBuf, via_sh: bool) -> Script {
        Script { path, via_sh: AtomicBool::new(via_sh) }
    }

    /// The name in messages (`SCRIPT: message`).
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// How the script ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// exit(N).
    Code(i32),
    /// Killed by signal N.
    Signal(i32),
}

/// What a finished script left.
#[derive(Debug)]
pub struct Done {
    /// How it ended.
    pub status: Status,
    /// Its stdout (empty when it went into the caller's buffer).
    pub stdout: Vec<u8>,
    /// Bytes it printed on stdout in all.
    pub stdout_len: u64,
    /// Its stderr (at most [`MAX_STDERR`] bytes).
    pub stderr: Vec<u8>,
}

/// Where stdout goes.
pub enum Out<'a> {
    /// Into a vector.
    Collect,
    /// Into this buffer (pread); bytes beyond it are counted, not kept.
    Into(&'a mut [u8]),
}

/// Runs `script args…` with `tmpdir` in its environment, writing `stdin`
/// (or nothing: stdin is then /dev/null) and capturing its output.
/// Errors are for the server's side of things (the client left, the
/// server stopped, poll failed); a script that cannot be executed ends
/// like nbdkit's child whose execvp failed: status 1 and the reason on
/// stderr.
pub fn run(script: &Script, args: &[&str], tmpdir: &Path, stdin: Option<&[u8]>, out: Out<'_>) -> Result<Done> {
    crate::debug!("calling: {}", quoted_command(&script.path, args));
    let child = match spawn(script, args, tmpdir, stdin.is_some()) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{}: {}\n", script.name(), strip_os(&e));
            return Ok(Done { status: Status::Code(1), stdout: Vec::new(), stdout_len: 0, stderr: msg.into_bytes() });
        }
    };
    let done = Running::new(child, stdin, out).finish(script)?;
    if let Status::Code(c) = done.status {
        crate::debug!("completed: {} {}: status {c}", script.name(), args.first().copied().unwrap_or(""));
    }
    Ok(done)
}

fn spawn(script: &Script, args: &[&str], tmpdir: &Path, stdin: bool) -> io::Result<Child> {
    let go = |via_sh: bool| {
        let mut c = if via_sh {
            let mut c = Command::new("/bin/sh");
            c.arg(&script.path);
            c
        } else {
            Command::new(&script.path)
        };
        // No pre_exec closure, uid or PATH change: std uses posix_spawn
        // (vfork semantics), resets SIGPIPE to its default, and makes the
        // child the leader of a new process group.
        c.args(args)
            .env("tmpdir", tmpdir)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        c.spawn()
    };
    if script.via_sh.load(Ordering::Relaxed) {
        return go(true);
    }
    match go(false) {
        Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
            // No #! line: execvp's fallback, remembered for next time.
            script.via_sh.store(true, Ordering::Relaxed);
            go(true)
        }
        r => r,
    }
}

/// `io::Error`'s text without Rust's " (os error N)".
fn strip_os(e: &io::Error) -> String {
    let s = e.to_string();
    s.rfind(" (os error ").map_or(s.clone(), |i| s[..i].to_string())
}

/// nbdkit's `shell_quote` of each word, for the `calling:` debug line.
pub fn quoted_command(path: &Path, args: &[&str]) -> String {
    let mut s = shell_quote(&path.display().to_string());
    for a in args {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

/// Safe words as they are; others double-quoted with `$ \` \\ "` escaped.
pub fn shell_quote(w: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || ".-_=,:/".contains(c);
    if !w.is_empty() && w.chars().all(safe) {
        return w.to_string();
    }
    let mut s = String::with_capacity(w.len() + 2);
    s.push('"');
    for c in w.chars() {
        if matches!(c, '$' | '`' | '\\' | '"') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// A spawned script and its pipes.
struct Running<'a> {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    input: &'a [u8],
    stdout: Option<std::process::ChildStdout>,
    stderr: Option<std::process::ChildStderr>,
    out: Out<'a>,
    collected: Vec<u8>,
    out_len: u64,
    err: Vec<u8>,
}

impl<'a> Running<'a> {
    fn new(mut child: Child, stdin: Option<&'a [u8]>, out: Out<'a>) -> Running<'a> {
        let (i, o, e) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        for fd in [i.as_ref().map(|f| f.as_raw_fd()), o.as_ref().map(|f| f.as_raw_fd()), e.as_ref().map(|f| f.as_raw_fd())]
            .into_iter()
            .flatten()
        {
            set_nonblocking(fd);
        }
        let input = stdin.unwrap_or_default();
        // Nothing to write: close it now.
        let i = if input.is_empty() { None } else { i };
        Running { child, stdin: i, input, stdout: o, stderr: e, out, collected: Vec::new(), out_len: 0, err: Vec::new() }
    }

    /// The poll loop, then waitpid.
    fn finish(mut self, script: &Script) -> Result<Done> {
        let mut conn = shutdown::connection_fd();
        let mut stop_at: Option<Instant> = None;
        // The child's exit wakes the loop too (a pidfd), so that a script
        // that closed its stdout and hangs can still be killed; without
        // pidfds (Linux < 5.3) waitpid is polled once the pipes are closed.
        let pidfd = pidfd_open(self.child.id());
        let mut exited = false;
        loop {
            let pipes = self.stdout.is_some() || self.stderr.is_some() || self.stdin.is_some();
            if !pipes {
                if exited {
                    break;
                }
                if pidfd.is_none() {
                    match self.child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) => {}
                    }
                }
            }
            if shutdown::connection_gone() {
                return Err(self.kill(script, "the client disconnected"));
            }
            if shutdown::requested() {
                let t = *stop_at.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                if Instant::now() >= t {
                    return Err(self.kill(script, "the server is shutting down"));
                }
            }
            let mut fds = Vec::with_capacity(4);
            let slot = |fds: &mut Vec<libc::pollfd>, fd: Option<RawFd>, events: i16| {
                fd.map(|fd| {
                    fds.push(libc::pollfd { fd, events, revents: 0 });
                    fds.len() - 1
                })
            };
            let i_in = slot(&mut fds, self.stdin.as_ref().map(|f| f.as_raw_fd()), libc::POLLOUT);
            let i_out = slot(&mut fds, self.stdout.as_ref().map(|f| f.as_raw_fd()), libc::POLLIN);
            let i_err = slot(&mut fds, self.stderr.as_ref().map(|f| f.as_raw_fd()), libc::POLLIN);
            let i_conn = slot(&mut fds, conn, libc::POLLRDHUP);
            let i_pid = slot(&mut fds, pidfd.as_ref().filter(|_| !exited).map(|f| f.as_raw_fd()), libc::POLLIN);
            // Without a pidfd, once the pipes are closed: look again in 1 ms.
            let timeout = if !pipes && pidfd.is_none() { 1 } else { TICK };
            if fds.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if let Err(e) = poll(&mut fds, timeout) {
                return Err(self.kill(script, &format!("poll: {}", strip_os(&e))));
            }
            let ev = |i: Option<usize>| i.map_or(0, |i| fds[i].revents);
            if ev(i_in) != 0 {
                self.write_stdin(script);
            }
            if ev(i_out) != 0 && self.read_stdout() {
                return Err(self.kill(script, "the script printed too much on stdout"));
            }
            if ev(i_err) != 0 {
                self.read_stderr();
            }
            if ev(i_pid) != 0 {
                exited = true;
            }
            if ev(i_conn) & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                // The client hung up, or the server stopped reading from it
                // (shutdown): stop watching the socket, which stays readable.
                conn = None;
                if !shutdown::requested() {
                    return Err(self.kill(script, "the client disconnected"));
                }
            }
        }
        let status = self.child.wait().map_err(|e| Error::io(format!("{}: waitpid: {}", script.name(), strip_os(&e))))?;
        let status = match (status.code(), status.signal()) {
            (Some(c), _) => Status::Code(c),
            (None, Some(s)) => Status::Signal(s),
            (None, None) => Status::Signal(0),
        };
        Ok(Done { status, stdout: self.collected, stdout_len: self.out_len, stderr: self.err })
    }

    fn write_stdin(&mut self, script: &Script) {
        let Some(f) = &self.stdin else { return };
        while !self.input.is_empty() {
            match write_fd(f.as_raw_fd(), self.input) {
                Ok(n) => self.input = &self.input[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // nbdkit ≥ 1.36: a script that does not read all of
                    // its stdin is not an error by itself; its exit status
                    // decides.
                    crate::debug!("{}: write: {} (ignored)", script.name(), strip_os(&e));
                    break;
                }
            }
        }
        self.stdin = None; // all written (or EPIPE): close it
    }

    /// Drains stdout; true once the script has printed far too much.
    fn read_stdout(&mut self) -> bool {
        let Some(f) = &self.stdout else { return false };
        let fd = f.as_raw_fd();
        let mut scratch = [0u8; 64 * 1024];
        loop {
            let pos = self.out_len as usize;
            let (r, into) = match &mut self.out {
                Out::Into(b) if pos < b.len() => (read_fd(fd, &mut b[pos..]), true),
                _ => (read_fd(fd, &mut scratch), false),
            };
            match r {
                Ok(0) => {
                    self.stdout = None;
                    return false;
                }
                Ok(n) => {
                    if !into && matches!(self.out, Out::Collect) {
                        self.collected.extend_from_slice(&scratch[..n]);
                    }
                    self.out_len += n as u64;
                    let limit = match &self.out {
                        Out::Into(b) => b.len() + MAX_STDOUT,
                        Out::Collect => MAX_STDOUT,
                    };
                    if self.out_len > limit as u64 {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.stdout = None;
                    return false;
                }
            }
        }
    }

    fn read_stderr(&mut self) {
        let Some(f) = &self.stderr else { return };
        let fd = f.as_raw_fd();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match read_fd(fd, &mut buf) {
                Ok(0) => {
                    self.stderr = None;
                    return;
                }
                Ok(n) => {
                    let room = MAX_STDERR.saturating_sub(self.err.len());
                    self.err.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.stderr = None;
                    return;
                }
            }
        }
    }

    /// Kills the script's process group, reaps it, and returns the error
    /// for the call (ESHUTDOWN: the request is abandoned, not failed).
    fn kill(mut self, script: &Script, why: &str) -> Error {
        kill_group(self.child.id());
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        let _ = self.child.wait();
        crate::debug!("{}: killed the script: {why}", script.name());
        let kind = if why.starts_with("poll") || why.contains("too much") { ErrorKind::Io } else { ErrorKind::Shutdown };
        Error::new(kind, format!("{}: {why}", script.name()))
    }
}

#[allow(unsafe_code)]
fn kill_group(pid: u32) {
    // SAFETY: kill(2) of the process group our child leads; the child is
    // not reaped yet, so its pid (= pgid) cannot have been reused.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// A pidfd for `pid` (readable once it exits), if the kernel has them.
#[allow(unsafe_code)]
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a descriptor we own from here on.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

#[allow(unsafe_code)]
fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

#[allow(unsafe_code)]
fn poll(fds: &mut [libc::pollfd], timeout: i32) -> io::Result<usize> {
    loop {
        // SAFETY: a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[allow(unsafe_code)]
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a valid buffer of the given length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[allow(unsafe_code)]
fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writing from a valid buffer of the given length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_as_nbdkit() {
        assert_eq!(shell_quote("pread"), "pread");
        assert_eq!(shell_quote("/a/b-c_d.e=f,g:h"), "/a/b-c_d.e=f,g:h");
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("a b$`\\\""), "\"a b\\$\\`\\\\\\\"\"");
    }
}
