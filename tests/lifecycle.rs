//! The server process's life through the real binary: forking into the
//! background (`-f` or not), `-P`, signals (L01), SIGPIPE (T27/L07) and
//! `--exit-with-parent` (L04).

mod common;
mod proc_util;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use proc_util::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn background_by_default_pidfile_serves_and_sigterm_ends_it() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("life");
    let (pidfile, sock) = (dir.path("pid"), dir.path("sock"));
    let started = Instant::now();
    let mut parent = nbdkit(&["-P", s(&pidfile), "-U", s(&sock), "memory", "1M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let parent_pid = parent.id();
    // The command returns at once with 0, and the daemon does not keep
    // our pipes open (stdout/stderr go to /dev/null without -v).
    let (st, out, err) = {
        let st = wait_child(&mut parent, 10.0).expect("nbdkit without -f did not return");
        let mut out = String::new();
        let mut err = String::new();
        let (mut o, mut e) = (parent.stdout.take().unwrap(), parent.stderr.take().unwrap());
        std::io::Read::read_to_string(&mut o, &mut out).unwrap();
        std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        (st, out, err)
    };
    assert_eq!(st.code(), Some(0), "stdout {out:?} stderr {err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pid = read_pidfile(&pidfile);
    let _daemon = Daemon(pid);
    assert_ne!(pid, parent_pid, "the pidfile must hold the daemon's PID");
    assert!(pid_alive(pid), "daemon {pid} not running");
    // A daemon: in / and with stdio on /dev/null.
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(), std::path::Path::new("/"));
    for fd in 0..3 {
        let l = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(l, std::path::Path::new("/dev/null"), "daemon fd {fd}");
    }
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&sock)]).trim(), "1048576");
    kill("TERM", pid);
    assert!(wait_pid_gone(pid, 5.0), "daemon {pid} still running 5 s after SIGTERM");
    assert!(UnixStream::connect(&sock).is_err(), "nobody should listen any more");
}

#[test]
fn verbose_daemon_keeps_stderr() {
    let dir = TempDir::new("life");
    let (pidfile, sock, log) = (dir.path("pid"), dir.path("sock"), dir.path("err"));
    let st = nbdkit(&["-v", "-P", s(&pidfile), "-U", s(&sock), "memory", "1M"])
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let pid = read_pidfile(&pidfile);
    let _daemon = Daemon(pid);
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap(), log, "-v keeps stderr");
    kill("TERM", pid);
    assert!(wait_pid_gone(pid, 5.0));
}

#[test]
fn daemon_with_a_private_socket_removes_it_at_exit() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("life");
    let (pidfile, out) = (dir.path("pid"), dir.path("out"));
    let st = nbdkit(&["-P", s(&pidfile), "-U", "-", "--print-uri", "memory", "1M"])
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let pid = read_pidfile(&pidfile);
    let _daemon = Daemon(pid);
    let text = std::fs::read_to_string(&out).unwrap();
    let uri = text.lines().next().unwrap_or_default();
    let sock = uri.strip_prefix("nbd+unix://?socket=").unwrap_or_else(|| panic!("{text}"));
    assert_eq!(run_ok("nbdinfo", &["--size", uri]).trim(), "1048576");
    let private = std::path::Path::new(sock).parent().unwrap();
    assert!(private.starts_with("/tmp") && private.is_dir());
    kill("TERM", pid);
    assert!(wait_pid_gone(pid, 5.0));
    assert!(!private.exists(), "{private:?} must be removed when the daemon exits");
}

#[test]
fn foreground_stays_and_pidfile_holds_its_pid() {
    let dir = TempDir::new("life");
    let (pidfile, sock) = (dir.path("pid"), dir.path("sock"));
    let mut g = Guard::spawn(nbdkit(&["-f", "-P", s(&pidfile), "-U", s(&sock), "memory", "1M"]));
    let pid = read_pidfile(&pidfile);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), format!("{}\n", g.pid()));
    assert_eq!(pid, g.pid());
    wait_unix(&mut g, &sock);
    assert!(g.wait_exit(0.3).is_none(), "-f must not return while serving");
    // --foreground and --no-fork are the same option.
    for opt in ["--foreground", "--no-fork"] {
        let sock2 = dir.path(opt);
        let mut g2 = Guard::spawn(nbdkit(&[opt, "-U", s(&sock2), "memory", "1M"]));
        wait_unix(&mut g2, &sock2);
        assert!(g2.alive(), "{opt}");
    }
}

/// A foreground server with two idle clients: one negotiated, one in the
/// middle of the handshake (greeting read, client flags sent).
fn idle_client_server(tag: &str) -> (Guard, [UnixStream; 2], TempDir) {
    let dir = TempDir::new(tag);
    let sock = dir.path("sock");
    let mut g = Guard::spawn(nbdkit(&["-f", "-U", s(&sock), "memory", "1M"]));
    wait_unix(&mut g, &sock);
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(go(&mut c, false).0, 1 << 20);
    let mut n = UnixStream::connect(&sock).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    newstyle(&mut n);
    (g, [c, n], dir)
}

#[test]
fn l01_signals_end_a_server_with_idle_clients_cleanly() {
    // The four signals in parallel: an idle client in the handshake may
    // hold the exit for the 5 s grace period.
    let runs: Vec<_> = ["TERM", "INT", "HUP", "QUIT"]
        .into_iter()
        .map(|sig| {
            std::thread::spawn(move || {
                let (mut g, _clients, _dir) = idle_client_server("sig");
                let t = Instant::now();
                kill(sig, g.pid());
                let st = g.wait_exit(6.0).unwrap_or_else(|| panic!("SIG{sig}: still running after 6 s"));
                assert_eq!(st.code(), Some(0), "SIG{sig}: {st}");
                eprintln!("SIG{sig}: exited in {:?}", t.elapsed());
            })
        })
        .collect();
    for r in runs {
        r.join().unwrap();
    }
}

#[test]
fn l01_option_after_sigterm_gets_err_shutdown_and_the_server_exits() {
    let (mut g, [_idle, mut negotiating], _dir) = idle_client_server("sig");
    kill("TERM", g.pid());
    std::thread::sleep(Duration::from_millis(200));
    send_option(&mut negotiating, 7, &go_payload(b""));
    let (opt, typ, _) = read_option_reply(&mut negotiating);
    assert_eq!((opt, typ), (7, 0x8000_0007), "NBD_REP_ERR_SHUTDOWN");
    let st = g.wait_exit(2.0).expect("no exit once the last client was answered");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn t27_l07_client_closing_with_replies_pending_does_not_kill_the_server() {
    require!("nbdsh", "--version");
    let mut srv = Server::start(&["memory", "64M"]);
    for round in 0..4 {
        let mut c = srv.connect();
        go(&mut c, round % 2 == 1);
        let mut reqs = Vec::new();
        for i in 0..32u64 {
            reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            reqs.extend_from_slice(&0u16.to_be_bytes());
            reqs.extend_from_slice(&0u16.to_be_bytes()); // READ
            reqs.extend_from_slice(&i.to_be_bytes());
            reqs.extend_from_slice(&(i << 20).to_be_bytes());
            reqs.extend_from_slice(&(1u32 << 20).to_be_bytes());
        }
        c.write_all(&reqs).unwrap();
        drop(c); // gone with 32 MiB of replies to come: EPIPE / ECONNRESET
    }
    std::thread::sleep(Duration::from_millis(300));
    srv.health_check();
}

/// `sh -c 'nbdkit OPTS -P pid -U sock memory 1M & (wait for the pidfile);
/// nbdinfo; exit'`: returns the server's PID once its parent (sh) is gone.
fn orphan(dir: &TempDir, opts: &str) -> u32 {
    let (pidfile, sock) = (dir.path("pid"), dir.path("sock"));
    let script = format!(
        "'{bin}' {opts} -P '{pid}' -U '{sock}' memory 1M </dev/null >/dev/null 2>'{err}' & \
         while [ ! -s '{pid}' ]; do sleep 0.05; done; \
         nbdinfo --size 'nbd+unix:///?socket={sock}'; exit 0",
        bin = nbdkit_bin().display(),
        pid = pidfile.display(),
        sock = sock.display(),
        err = dir.path("server.err").display()
    );
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(script).env("PATH", path_env()).stdin(Stdio::null());
    let (st, out, err) = run_for(c, 20.0);
    assert!(st.success(), "{err}");
    assert_eq!(out.trim(), "1048576", "the server served before its parent died; {err}");
    read_pidfile(&pidfile)
}

#[test]
fn l04_exit_with_parent() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("ewp");
    let pid = orphan(&dir, "--exit-with-parent");
    let _d = Daemon(pid);
    assert!(wait_pid_gone(pid, 2.5), "--exit-with-parent: server {pid} outlived its parent by 2.5 s");
}

#[test]
fn without_exit_with_parent_a_foreground_server_outlives_its_parent() {
    // The control for l04 (nbdkit 1.36+: PDEATHSIG only on request).
    require!("nbdinfo", "--version");
    let dir = TempDir::new("ewp");
    let pid = orphan(&dir, "-f");
    let _d = Daemon(pid);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(pid_alive(pid), "server {pid} died with its parent without --exit-with-parent");
    kill("TERM", pid);
    assert!(wait_pid_gone(pid, 5.0));
}
