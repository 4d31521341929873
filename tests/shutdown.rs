//! L06 (bad-input.md): a plugin asks the server to shut down
//! (`nbdkit_shutdown`; the sh and eval plugins do it when a script exits
//! with 4). The request that asked gets its reply, requests in flight on
//! other connections finish, new clients are refused, and the server
//! exits 0 promptly with the plugin cleaned up (`$tmpdir` removed); under
//! `--run` the command goes on and its status is the server's, as in
//! nbdkit. Every expectation here was checked against Debian's nbdkit
//! 1.32.5 (`NBDKIT_BIN=/usr/bin/nbdkit cargo test --test shutdown`).

mod common;
mod proc_util;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use proc_util::*;

/// Where the script exits 4.
#[derive(Clone, Copy, PartialEq)]
enum At {
    /// `pread` at offset 0, after writing its data.
    Pread,
    /// `open` (the handshake's NBD_OPT_GO).
    Open,
    /// `get_size` (the handshake, after `open`).
    GetSize,
}

/// The methods of a plugin serving 1 MiB of `x`, parallel, that records
/// its `$tmpdir` in `dir/tmpdir` (at start-up) and exits 4 `at`; a `pread` at offset
/// 4096 first creates `dir/slow` and sleeps 1 s (a request in flight).
fn methods(dir: &TempDir, at: At) -> Vec<(&'static str, String)> {
    let d = dir.0.display();
    let exit = |here: At| if here == at { "; exit 4" } else { "" };
    vec![
        ("thread_model", format!("echo \"$tmpdir\" > {d}/tmpdir; echo parallel")),
        ("get_size", format!("echo 1M{}", exit(At::GetSize))),
        ("open", format!("true{}", exit(At::Open))),
        (
            "pread",
            format!(
                "if [ \"$4\" = 4096 ]; then touch {d}/slow; sleep 1; fi; head -c \"$3\" /dev/zero | tr '\\0' x; \
                 if [ \"$4\" = 0 ]; then true{}; fi",
                exit(At::Pread)
            ),
        ),
    ]
}

/// The arguments after `nbdkit … -U SOCK`: the sh plugin with a script
/// file, or the eval plugin with one argument per method.
fn plugin(dir: &TempDir, at: At, eval: bool) -> Vec<String> {
    let m = methods(dir, at);
    if eval {
        let mut args = vec!["eval".to_string()];
        args.extend(m.into_iter().map(|(k, v)| format!("{k}={v}")));
        return args;
    }
    let mut body = String::from("#!/bin/sh\ncase \"$1\" in\n");
    for (k, v) in m {
        body.push_str(&format!("  {k}) {v} ;;\n"));
    }
    body.push_str("  *) exit 2 ;;\nesac\n");
    let p = dir.path("plugin.sh");
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    vec!["sh".to_string(), p.display().to_string()]
}

/// `nbdkit -f -U SOCK PLUGIN…`, listening.
fn serve(dir: &TempDir, args: &[String]) -> (Guard, PathBuf) {
    let sock = dir.path("sock");
    let mut c = nbdkit(&["-f", "-U", sock.to_str().unwrap()]);
    c.args(args);
    let mut g = Guard::spawn(c);
    wait_unix(&mut g, &sock);
    (g, sock)
}

/// nbdsh on `uri` running `code`.
fn nbdsh_at(uri: &str, code: &str) -> std::process::Output {
    run("nbdsh", &["-u", uri, "-c", code])
}

/// Reads 512 bytes at `offset` and prints whether they are the plugin's.
fn pread_code(offset: u64) -> String {
    format!("print(h.pread(512, {offset}) == b'x' * 512)")
}

/// Nobody serves `sock` any more: connecting fails, or the connection is
/// closed without the greeting.
fn refused(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else { return true };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// The server exits 0 within `secs` and has removed its `$tmpdir`.
fn exits_cleanly(g: &mut Guard, dir: &TempDir, secs: f64) {
    let st = g.wait_exit(secs).unwrap_or_else(|| panic!("the server still runs {secs} s after the shutdown request"));
    assert_eq!(st.code(), Some(0), "{st}");
    let t = std::fs::read_to_string(dir.path("tmpdir")).unwrap();
    assert!(!Path::new(t.trim()).exists(), "$tmpdir {} left behind", t.trim());
}

/// A script exits 4 in `pread`: that READ gets its data, a READ in flight
/// on another connection finishes, a new client is refused, and the
/// server exits 0 once the last reply is out.
fn pread_exit_4(eval: bool) {
    let dir = TempDir::new(if eval { "l06-eval" } else { "l06-sh" });
    let (mut g, sock) = serve(&dir, &plugin(&dir, At::Pread, eval));
    let uri = unix_uri(&sock);
    let slow = {
        let uri = uri.clone();
        std::thread::spawn(move || nbdsh_at(&uri, &pread_code(4096)))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.path("slow").exists() {
        assert!(Instant::now() < deadline, "the slow READ never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = nbdsh_at(&uri, &pread_code(0));
    let asked = Instant::now();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True", "the READ that asked gets its data");
    assert!(refused(&sock), "a client after the shutdown request was served");
    let out = slow.join().unwrap();
    assert!(out.status.success(), "the READ in flight failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True", "the READ in flight gets its data");
    exits_cleanly(&mut g, &dir, 4.0);
    assert!(asked.elapsed() < Duration::from_secs(4));
}

#[test]
fn l06_sh_exit_4_in_pread() {
    require!("nbdsh", "--version");
    pread_exit_4(false);
}

#[test]
fn l06_eval_exit_4_in_pread() {
    require!("nbdsh", "--version");
    pread_exit_4(true);
}

/// A script exits 4 in the handshake (`open`, `get_size`): that call
/// succeeds, so the handshake completes (nbdinfo gets the size, as from
/// nbdkit when a signal comes during `open`), then the connection ends,
/// new clients are refused and the server exits 0.
fn handshake_exit_4(at: At, eval: bool) {
    let dir = TempDir::new("l06-hs");
    let (mut g, sock) = serve(&dir, &plugin(&dir, at, eval));
    let out = run("nbdinfo", &["--size", &unix_uri(&sock)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    exits_cleanly(&mut g, &dir, 4.0);
    assert!(refused(&sock));
}

#[test]
fn l06_exit_4_in_open_and_get_size() {
    require!("nbdinfo", "--version");
    for (at, eval) in [(At::Open, false), (At::GetSize, false), (At::Open, true), (At::GetSize, true)] {
        handshake_exit_4(at, eval);
    }
}

/// A script exits 4 in `config`, before the server serves: the request
/// waits for it, and the server stops as soon as it has started (exit 0,
/// `$tmpdir` removed), as after a signal during start-up.
#[test]
fn l06_exit_4_before_serving() {
    let dir = TempDir::new("l06-cfg");
    let mut args = plugin(&dir, At::Pread, false);
    let p = dir.path("plugin.sh");
    let body = std::fs::read_to_string(&p).unwrap().replace("  *) exit 2 ;;", "  config) exit 4 ;;\n  *) exit 2 ;;");
    std::fs::write(&p, body).unwrap();
    args.push("foo=bar".into());
    let sock = dir.path("sock");
    let mut c = nbdkit(&["-f", "-U", sock.to_str().unwrap()]);
    c.args(&args);
    let mut g = Guard::spawn(c);
    exits_cleanly(&mut g, &dir, 10.0);
    assert!(refused(&sock));
}

/// Under `--run` the command keeps running after the shutdown: its
/// READ got its data, the next client is refused, and nbdkit exits with
/// the command's status once it ends.
#[test]
fn l06_exit_4_under_run() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("l06-run");
    let cmd = format!(
        "nbdsh -u \"$uri\" -c \"{}\"; sleep 0.5; nbdinfo --size \"$uri\" 2>/dev/null || echo refused; exit 3",
        pread_code(0)
    );
    let mut c = nbdkit(&["-U", "-"]);
    c.args(plugin(&dir, At::Pread, false)).args(["--run", &cmd]);
    let (st, out, err) = run_for(c, 20.0);
    assert_eq!(out, "True\nrefused\n", "{err}");
    assert_eq!(st.code(), Some(3), "{err}");
    let t = std::fs::read_to_string(dir.path("tmpdir")).unwrap();
    assert!(!Path::new(t.trim()).exists(), "$tmpdir {} left behind", t.trim());
}
