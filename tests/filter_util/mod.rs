//! Helpers shared by the partition, protect and cow tests: servers (ours
//! or Debian's nbdkit, the reference) whose stderr goes to a file the
//! test can read, and nbdinfo comparisons between the two.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{nbdkit_bin, path_env, run, Server, TempDir};

/// Debian's nbdkit 1.32.5, the reference.
pub const REFERENCE: &str = "/usr/bin/nbdkit";

/// Starts `bin` (ours if `None`) with `args`, stderr to `log()`.
pub fn start_logged(bin: Option<&str>, args: &[&str]) -> Server {
    let dir = TempDir::new("fsrv");
    let sock = dir.path("sock");
    let log = std::fs::File::create(dir.path("stderr")).unwrap();
    let bin = bin.map(PathBuf::from).unwrap_or_else(nbdkit_bin);
    let child = Command::new(&bin)
        .args(["--foreground", "--unix"])
        .arg(&sock)
        .args(args)
        .env("PATH", path_env())
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cannot run nbdkit");
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&srv.sock).is_err() {
        if let Ok(Some(st)) = srv.child.try_wait() {
            panic!("{} {args:?} exited early: {st}: {}", bin.display(), log_of(&srv));
        }
        assert!(Instant::now() < deadline, "server did not start");
        thread::sleep(Duration::from_millis(10));
    }
    srv
}

/// What the server wrote to stderr so far.
pub fn log_of(srv: &Server) -> String {
    std::fs::read_to_string(srv.dir.path("stderr")).unwrap_or_default()
}

/// Runs nbdinfo with `args` then the server's URI; returns stdout, or
/// stderr prefixed with "ERROR: " if it failed.
pub fn nbdinfo(srv: &Server, args: &[&str]) -> String {
    let mut a = args.to_vec();
    let uri = srv.uri();
    a.push(&uri);
    let o = run("nbdinfo", &a);
    let sock = srv.sock.to_str().unwrap();
    if o.status.success() {
        String::from_utf8_lossy(&o.stdout).replace(sock, "SOCKET")
    } else {
        format!("ERROR: {}", String::from_utf8_lossy(&o.stderr).replace(sock, "SOCKET"))
    }
}

/// `nbdinfo --json` and `--map` from ours and the reference on the same
/// command line, with `fix` applied to the reference's JSON (documented
/// 1.44 differences), must be equal.
pub fn same_as_reference(args: &[&str], fix: impl Fn(String) -> String) {
    let ours = start_logged(None, args);
    let theirs = start_logged(Some(REFERENCE), args);
    let (a, b) = (nbdinfo(&ours, &["--json"]), fix(nbdinfo(&theirs, &["--json"])));
    assert_eq!(a, b, "nbdinfo --json differs for {args:?}");
    assert!(!a.starts_with("ERROR"), "{a}");
    let (a, b) = (nbdinfo(&ours, &["--map"]), nbdinfo(&theirs, &["--map"]));
    assert_eq!(a, b, "nbdinfo --map differs for {args:?}");
}

/// Waits until `log_of(srv)` contains `needle` (the log is written
/// asynchronously), for up to 5 s.
pub fn wait_log(srv: &Server, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if log_of(srv).contains(needle) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
