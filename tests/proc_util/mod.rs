//! Process helpers for the server-option and lifecycle tests: servers
//! started with a hand-made command line (killed on drop), daemons known
//! only by the PID in our own pidfile, waiting with deadlines, free TCP
//! ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{nbdkit_bin, path_env};

/// `nbdkit ARGS…` with the test PATH and stdin from /dev/null.
pub fn nbdkit(args: &[&str]) -> Command {
    let mut c = Command::new(nbdkit_bin());
    c.args(args).env("PATH", path_env()).stdin(Stdio::null());
    c
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guard(pub Child);

impl Guard {
    pub fn spawn(mut c: Command) -> Guard {
        Guard(c.spawn().expect("cannot run the nbdkit binary"))
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
    /// Waits up to `secs` for the exit; None if still running then.
    pub fn wait_exit(&mut self, secs: f64) -> Option<ExitStatus> {
        wait_child(&mut self.0, secs)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `secs` for `child` to exit.
pub fn wait_child(child: &mut Child, secs: f64) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `c` to completion with a deadline (killing it past that, which
/// fails the test); returns (status, stdout, stderr).
pub fn run_for(mut c: Command, secs: f64) -> (ExitStatus, String, String) {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let st = wait_child(&mut child, secs);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let st = st.unwrap_or_else(|| panic!("still running after {secs} s; stdout:\n{out}\nstderr:\n{err}"));
    (st, out, err)
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Reads `n` lines from `r` within `secs` (a thread reads; we wait).
pub fn read_lines(r: impl Read + Send + 'static, n: usize, secs: u64) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            if tx.send(l.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut v = Vec::new();
    while v.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => v.push(l),
            Err(_) => panic!("got only {v:?} of {n} lines within {secs} s"),
        }
    }
    v
}

/// The process state letter from /proc/PID/stat, None if no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) S …": COMM may hold spaces and parentheses.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// True if PID is a running (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Waits up to `secs` for PID to be gone (or a zombie); true if it is.
pub fn wait_pid_gone(pid: u32, secs: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Sends `sig` (`TERM`, `INT`…) to `pid` with kill(1).
pub fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Polls up to 10 s for a pidfile holding `PID\n`; returns PID.
pub fn read_pidfile(p: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if s.ends_with('\n') {
                assert_eq!(s.matches('\n').count(), 1, "pidfile {s:?}");
                return s.trim_end().parse().unwrap_or_else(|_| panic!("pidfile content {s:?} is not PID\\n"));
            }
        }
        assert!(Instant::now() < deadline, "no pidfile {p:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon known by the PID in our own pidfile: SIGKILLed on drop if
/// still alive and still our binary.
pub struct Daemon(pub u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.0)).ok();
        if pid_alive(self.0) && exe.is_some_and(|e| e == nbdkit_bin() || e.ends_with("nbdkit")) {
            let _ = Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
        }
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// True if the IPv6 loopback can be used here.
pub fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Waits up to 20 s until `addr` accepts connections (server `g` alive).
/// A connection to itself does not count: with no listener yet, a connect
/// from an ephemeral port to the same port on loopback can meet itself
/// (TCP simultaneous open) and "succeed".
pub fn wait_tcp(g: &mut Guard, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let listening = || match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(s) => s.local_addr().ok() != s.peer_addr().ok(),
        Err(_) => false,
    };
    while !listening() {
        assert!(g.alive(), "server exited before listening on {addr}");
        assert!(Instant::now() < deadline, "server never listened on {addr}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to 20 s until the Unix socket accepts connections.
pub fn wait_unix(g: &mut Guard, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(g.alive(), "server exited before listening on {sock:?}");
        assert!(Instant::now() < deadline, "server never listened on {sock:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// `nbd+unix:///?socket=SOCK`.
pub fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}
