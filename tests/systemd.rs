//! contrib/systemd: the units pass `systemd-analyze verify` (without a
//! running systemd: --man=no, and any message counts as a failure), and the
//! service's ExecStart line, run by `systemd-socket-activate` as systemd
//! would run it for nbdkit.socket (Accept=no: one server for all clients),
//! serves clients on the activation socket as the -u user.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn unit(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
}

fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./nbdkit.socket", "./nbdkit@.service"])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require!("systemd-analyze", "--version");
    let d = TempDir::new("sdverify");
    for u in ["nbdkit.socket", "nbdkit@.service"] {
        std::fs::write(d.path(u), unit(u)).unwrap();
    }
    let (ok, text) = verify(&d.0);
    assert!(ok && text.is_empty(), "systemd-analyze verify: {text}");
    // The check can fail: a misspelt hardening option is reported.
    std::fs::write(d.path("nbdkit@.service"), unit("nbdkit@.service").replace("PrivateTmp=yes", "PrivateTmp=maybe"))
        .unwrap();
    let (_, text) = verify(&d.0);
    assert!(text.contains("PrivateTmp") || text.contains("maybe"), "{text}");
    // The pair fits together: Accept=no and the template instance it names.
    let socket = unit("nbdkit.socket");
    assert!(socket.contains("\nAccept=no\n") && socket.contains("\nService=nbdkit@default.service\n"));
}

/// The words of ExecStart, with `${VAR}` (one word) and `$VAR` (split on
/// whitespace) expanded as systemd does, the binary replaced by ours.
fn exec_start(env: &[(&str, &str)]) -> Vec<String> {
    let service = unit("nbdkit@.service");
    let line = service.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).unwrap_or_default();
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        if let Some(v) = w.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(lookup(v));
        } else if let Some(v) = w.strip_prefix('$') {
            words.extend(lookup(v).split_whitespace().map(str::to_string));
        } else {
            words.push(w.to_string());
        }
    }
    assert_eq!(words[0], "/usr/bin/nbdkit");
    words[0] = nbdkit_bin().display().to_string();
    words
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn exec_start_serves_under_socket_activation() {
    require!("systemd-socket-activate", "--version");
    require!("nbdsh", "--version");
    let d = TempDir::new("sdactivate");
    let sock: PathBuf = d.path("nbd.sock");
    let root = effective_uid() == 0;
    let user = if root { "nobody".to_string() } else { run_ok("id", &["-un"]).trim().to_string() };
    let words = exec_start(&[("NBDKIT_USER", &user), ("NBDKIT_ARGS", "memory 4M")]);
    assert!(words.iter().any(|w| w == "-u"), "{words:?}");
    let mut child = Running(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&sock)
            .arg("--")
            .args(&words)
            .stdin(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(child.0.try_wait().unwrap().is_none(), "systemd-socket-activate exited");
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // Two clients, one server: what the first writes, the second reads.
    let out = Command::new("nbdsh")
        .env("PATH", path_env())
        .args(["-u", &uri, "-c", "h.pwrite(b'systemd!' * 64, 4096); h.flush()"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("nbdsh")
        .env("PATH", path_env())
        .args(["-u", &uri, "-c", "assert h.pread(512, 4096) == b'systemd!' * 64; print(h.get_size())"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4194304");
    // systemd-socket-activate exec'd nbdkit in place: it is the -u user now.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    let want = run_ok("id", &["-u", &user]).trim().to_string();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == want), "{uid_line}, want {want}");
    assert!(child.0.try_wait().unwrap().is_none(), "server exited");
}

/// Our effective uid, from /proc (no libc call in tests).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
