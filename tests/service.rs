//! Service modes through the real binary: systemd socket activation
//! (`systemd-socket-activate`, as a user runs it, and hand-made
//! `LISTEN_*` variables for the error cases), `-u`/`-g` checked from
//! /proc as root, `--swap`, `--selinux-label`, `--vsock`.
//! nbdkit-behaviour.md A.1, A.4; bad-input.md L05 (socket activation).

mod common;
mod proc_util;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use proc_util::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `systemd-socket-activate -l L1 [-l L2…] nbdkit ARGS…`, stderr to
/// `dir/err`. The listeners exist at once; nbdkit is exec'd (same PID)
/// at the first connection.
fn activate(dir: &TempDir, listen: &[&str], args: &[&str]) -> Guard {
    let mut c = Command::new("systemd-socket-activate");
    for l in listen {
        c.args(["-l", l]);
    }
    c.arg(nbdkit_bin()).args(args).env("PATH", path_env()).stdin(Stdio::null());
    c.stdout(std::fs::File::create(dir.path("out")).unwrap());
    c.stderr(std::fs::File::create(dir.path("err")).unwrap());
    Guard::spawn(c)
}

/// Waits until the path exists (systemd-socket-activate bound it).
fn wait_path(g: &mut Guard, p: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !p.exists() {
        assert!(g.alive(), "systemd-socket-activate exited");
        assert!(std::time::Instant::now() < deadline, "{p:?} never appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn socket_activation_serves_every_unix_socket_passed() {
    require!("systemd-socket-activate", "--version");
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sa");
    let (a, b) = (dir.path("a"), dir.path("b"));
    let mut g = activate(&dir, &[s(&a), s(&b)], &["-v", "--print-uri", "memory", "3M"]);
    wait_path(&mut g, &b);
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&a)]).trim(), "3145728");
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&b)]).trim(), "3145728");
    // Both at once, and data written through one is read through the other.
    let script = format!(
        "h2 = nbd.NBD(); h2.connect_uri('{}'); h.pwrite(b'x' * 512, 4096); assert h2.pread(512, 4096) == b'x' * 512",
        unix_uri(&b)
    );
    run_ok("nbdsh", &["-u", &unix_uri(&a), "-c", &script]);
    assert!(g.alive());
    let err = read(&dir.path("err"));
    assert!(err.contains("nbdkit: debug: using socket activation, nr_socks = 2\n"), "{err}");
    // No URI under socket activation: --print-uri prints nothing.
    assert!(!read(&dir.path("out")).contains("nbd"), "{}", read(&dir.path("out")));
    // Never forks: the PID systemd-socket-activate exec'd is the server.
    let exe = std::fs::read_link(format!("/proc/{}/exe", g.pid())).unwrap();
    assert_eq!(exe, nbdkit_bin().canonicalize().unwrap());
}

#[test]
fn socket_activation_over_tcp_and_clean_exit_on_sigterm() {
    require!("systemd-socket-activate", "--version");
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sat");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // As root, also drop to nobody: the sockets came ready-made.
    let args: &[&str] = if euid() == 0 { &["-u", "nobody", "-g", "nogroup", "null", "1M"] } else { &["null", "1M"] };
    let mut g = activate(&dir, &[&addr], args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(g.alive() && std::time::Instant::now() < deadline, "never listened on {addr}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let uri = format!("nbd://{addr}");
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "1048576");
    if euid() == 0 {
        assert_eq!(ids(g.pid()).0, "65534 65534 65534 65534");
        assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "1048576");
    }
    kill("TERM", g.pid());
    let st = g.wait_exit(10.0).expect("still running 10 s after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", read(&dir.path("err")));
}

/// `sh -c 'LISTEN_PID=$$ LISTEN_FDS=N exec nbdkit ARGS'` with `fds`
/// descriptors open from 3 on (copies of a Unix listener).
fn hand_activated(n: &str, fds: usize, args: &str) -> (std::process::ExitStatus, String, String) {
    let dir = TempDir::new("sah");
    let l = std::os::unix::net::UnixListener::bind(dir.path("sock")).unwrap();
    let mut redirs = String::new();
    for i in 0..fds {
        redirs.push_str(&format!(" {}<&0", 3 + i));
    }
    let script = format!("LISTEN_PID=$$ LISTEN_FDS={n} LISTEN_FDNAMES=x exec {} {args}{redirs}", nbdkit_bin().display());
    let mut c = Command::new("sh");
    c.args(["-c", &script]).env("PATH", path_env());
    // The listener is stdin, duplicated to 3… by the shell.
    c.stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)));
    run_for(c, 10.0)
}

#[test]
fn socket_activation_errors_as_nbdkit() {
    for n in ["0", "17", "0x20"] {
        let (st, _, err) = hand_activated(n, 1, "-f null");
        assert_eq!(st.code(), Some(1));
        assert_eq!(err, format!("nbdkit: socket activation: LISTEN_FDS={n} out of range\n"));
    }
    let (st, _, err) = hand_activated("2", 1, "-f null");
    assert_eq!(st.code(), Some(1));
    assert_eq!(err, "nbdkit: socket activation: invalid file descriptor fd = 4: Bad file descriptor\n");
    for (opt, flag) in [("-U /x", "-U"), ("-p 1", "-p"), ("-i ::1", "-i"), ("-s", "-s"), ("--run true", "--run"),
                        ("--vsock", "--vsock")] {
        let (st, _, err) = hand_activated("1", 1, &format!("{opt} null"));
        assert_eq!(st.code(), Some(1));
        assert_eq!(err, format!("nbdkit: cannot use socket activation with {flag} flag\n"));
    }
    // LISTEN_PID of another process: ignored with a note, served as usual.
    let dir = TempDir::new("sap");
    let sock = dir.path("sock");
    let mut c = nbdkit(&["-f", "-U", s(&sock), "null"]);
    c.env("LISTEN_PID", "1").env("LISTEN_FDS", "1").stderr(std::fs::File::create(dir.path("err")).unwrap());
    let mut g = Guard::spawn(c);
    wait_unix(&mut g, &sock);
    assert_eq!(read(&dir.path("err")), "nbdkit: LISTEN_PID was not for us (ignored)\n");
}

#[test]
fn socket_activation_variables_do_not_reach_children() {
    // No plugin here runs children; what a child would inherit is the
    // server's environment, which -D nbdkit.environ=1 prints (after the
    // command line is read, before the sockets are taken).
    let dir = TempDir::new("sae");
    let l = std::os::unix::net::UnixListener::bind(dir.path("sock")).unwrap();
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec {} -v -D nbdkit.environ=1 null 3<&0",
        nbdkit_bin().display()
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script]).stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)));
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut g = Guard(child);
    // Read up to the line that follows the environment.
    let mut lines = Vec::new();
    let mut r = std::io::BufReader::new(stderr);
    loop {
        let mut l = String::new();
        assert!(std::io::BufRead::read_line(&mut r, &mut l).unwrap() > 0, "stderr ended: {lines:?}");
        let done = l.contains("using socket activation, nr_socks = 1");
        lines.push(l);
        if done {
            break;
        }
    }
    // Served: the signal handlers are in place by now.
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&dir.path("sock"))]).trim(), "0");
    kill("TERM", g.pid());
    assert_eq!(g.wait_exit(10.0).and_then(|s| s.code()), Some(0));
    let err = lines.concat();
    assert!(err.contains("nbdkit: debug: PATH="), "{err}");
    assert!(!err.contains("LISTEN_"), "{err}");
}

// ---------------------------------------------------------------------------
// -u / -g

fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// The Uid, Gid and Groups lines of /proc/PID/status.
fn ids(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let get = |k: &str| {
        status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
    };
    (get("Uid:"), get("Gid:"), get("Groups:"))
}

/// The server binds a privileged port as root, then runs as nobody.
#[test]
fn user_and_group_dropped_after_binding_a_low_port() {
    require!("nbdinfo", "--version");
    if euid() != 0 {
        // Not root: changing the groups is refused, with nbdkit's error.
        let (st, _, err) = run_for(nbdkit(&["-f", "-U", "-", "-g", "0", "null"]), 10.0);
        assert_eq!(st.code(), Some(1));
        assert_eq!(err, "nbdkit: error: setgroups: Operation not permitted\n");
        panic!("this test needs root (CI runs as root)");
    }
    let dir = TempDir::new("ug");
    // A port below 1024 that is free on 127.0.0.1.
    let port = (700..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("no free port below 1024");
    let p = port.to_string();
    let mut c = nbdkit(&["-f", "-v", "-u", "nobody", "-g", "nogroup", "-i", "127.0.0.1", "-p", &p, "memory", "1M"]);
    c.stderr(std::fs::File::create(dir.path("err")).unwrap());
    let mut g = Guard::spawn(c);
    wait_tcp(&mut g, format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(run_ok("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}")]).trim(), "1048576");
    let (uid, gid, groups) = ids(g.pid());
    assert_eq!(uid, "65534 65534 65534 65534");
    assert_eq!(gid, "65534 65534 65534 65534");
    assert_eq!(groups, "65534");
    // Every thread, not only the main one.
    for t in std::fs::read_dir(format!("/proc/{}/task", g.pid())).unwrap() {
        let t = t.unwrap().file_name().into_string().unwrap();
        let st = std::fs::read_to_string(format!("/proc/{}/task/{t}/status", g.pid())).unwrap();
        assert!(st.contains("\nUid:\t65534\t65534\t65534\t65534\n"), "thread {t}: {st}");
    }
    let err = read(&dir.path("err"));
    assert!(err.contains("debug: changed group to nogroup\n") && err.contains("debug: changed user to nobody\n"), "{err}");
}

#[test]
fn user_alone_takes_the_users_primary_group_and_numbers_work() {
    require!("nbdinfo", "--version");
    if euid() != 0 {
        let (st, _, err) = run_for(nbdkit(&["-f", "-U", "-", "-u", "0", "null"]), 10.0);
        assert_eq!(st.code(), Some(1));
        assert_eq!(err, "nbdkit: error: setgroups: Operation not permitted\n");
        panic!("this test needs root (CI runs as root)");
    }
    let dir = TempDir::new("u");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = dir.path("sock");
    let mut g = Guard::spawn(nbdkit(&["-f", "-u", "nobody", "-U", s(&sock), "memory", "1M"]));
    wait_unix(&mut g, &sock);
    // The socket listens before the privileges go (nbdkit's order); a
    // connection is served only after: ask /proc once one has been.
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&sock)]).trim(), "1048576");
    assert_eq!(ids(g.pid()), ("65534 65534 65534 65534".into(), "65534 65534 65534 65534".into(), "65534".into()));
    drop(g);
    // Numeric ids with no passwd entry.
    let sock2 = dir.path("sock2");
    let mut g = Guard::spawn(nbdkit(&["-f", "-u", "4242", "-g", "4343", "-U", s(&sock2), "null"]));
    wait_unix(&mut g, &sock2);
    assert_eq!(run_ok("nbdinfo", &["--size", &unix_uri(&sock2)]).trim(), "0");
    assert_eq!(ids(g.pid()), ("4242 4242 4242 4242".into(), "4343 4343 4343 4343".into(), "4343".into()));
}

#[test]
fn unknown_user_or_group_is_one_line_and_exit_1() {
    let (st, _, err) = run_for(nbdkit(&["-f", "-U", "-", "-u", "no-such-user-x", "null"]), 10.0);
    assert_eq!(st.code(), Some(1));
    assert_eq!(err, "nbdkit: -u option: no-such-user-x is not a valid user name or uid\n");
    let (st, _, err) = run_for(nbdkit(&["-f", "-U", "-", "-g", "no-such-group-x", "null"]), 10.0);
    assert_eq!(st.code(), Some(1));
    assert_eq!(err, "nbdkit: -g option: no-such-group-x is not a valid group name or gid\n");
}

// ---------------------------------------------------------------------------
// --vsock, --swap, --selinux-label

/// Binds a vsock stream socket on every CID at `port` (what the server
/// does), to see whether the port is taken.
fn vsock_bind(port: u32) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None)?;
    s.bind(&socket2::SockAddr::vsock(libc::VMADDR_CID_ANY, port))?;
    s.listen(1)?;
    Ok(s)
}

/// A vsock port nobody listens on now.
fn free_vsock_port() -> Option<u32> {
    (0..50).map(|i| 20000 + (std::process::id() % 20000) + i * 7).find(|p| vsock_bind(*p).is_ok())
}

#[test]
fn vsock_listens_and_gives_nbd_vsock_uris() {
    // No AF_VSOCK at all here: the server must say so at start-up.
    if socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None).is_err() {
        let (st, _, err) = run_for(nbdkit(&["-f", "--vsock", "null"]), 10.0);
        assert_eq!(st.code(), Some(1));
        assert!(err.starts_with("nbdkit: error: --vsock: socket: "), "{err}");
        return;
    }
    let port = free_vsock_port().expect("no free vsock port");
    let p = port.to_string();
    let dir = TempDir::new("vs");
    let mut c = nbdkit(&["-f", "-v", "--vsock", "-p", &p, "--print-uri", "-e", "a b", "null"]);
    c.stdout(Stdio::piped()).stderr(std::fs::File::create(dir.path("err")).unwrap());
    let mut child = c.spawn().unwrap();
    let lines = read_lines(child.stdout.take().unwrap(), 4, 20);
    let mut g = Guard(child);
    let err = read(&dir.path("err"));
    if err.contains("no vsock transport") {
        // vsock without a transport: a clear error, and exit 1.
        assert_eq!(g.wait_exit(10.0).and_then(|s| s.code()), Some(1), "{err}");
        return;
    }
    assert_eq!(lines[0], format!("nbd+vsock://1:{port}/a%20b"));
    assert_eq!(lines[3], format!("  nbdinfo \"nbd+vsock://1:{port}/a%20b\""));
    assert!(err.contains(&format!("nbdkit: debug: bound to vsock any:{port}\n")), "{err}");
    // The server holds the port (no vsock loopback transport here to
    // connect through: binding it is how we see the listener).
    assert_eq!(vsock_bind(port).unwrap_err().raw_os_error(), Some(libc::EADDRINUSE));
    assert!(g.alive());
    // A second server on the same port: one clear line.
    let (st, _, err) = run_for(nbdkit(&["-f", "--vsock", "-p", &p, "null"]), 10.0);
    assert_eq!(st.code(), Some(1));
    // strerror(EADDRINUSE): glibc "Address already in use", musl "Address in use".
    let want = format!("nbdkit: error: --vsock: bind: port {port}: Address ");
    assert!(err.starts_with(&want) && err.ends_with(" in use\n") && err.lines().count() == 1, "{err}");
    wait_sigterm_caught(g.pid());
    kill("TERM", g.pid());
    assert_eq!(g.wait_exit(10.0).and_then(|s| s.code()), Some(0));
    assert!(vsock_bind(port).is_ok(), "port still taken after exit");

    // --run sees the vsock URI and the port; without -p the URI has none.
    let (st, out, _) = run_for(nbdkit(&["--vsock", "-p", &p, "--run", "echo $uri $port; echo u=$unixsocket", "null"]), 20.0);
    assert!(st.success());
    assert_eq!(out, format!("nbd+vsock://1:{port} {port}\nu=\n"));
    // The port must be a number.
    let (st, _, err) = run_for(nbdkit(&["-f", "--vsock", "-p", "nbd", "null"]), 10.0);
    assert_eq!(st.code(), Some(1));
    assert_eq!(err, "nbdkit: error: port: could not parse number: \"nbd\": Invalid argument\n");
}

/// Waits until PID catches SIGTERM (its handlers are installed once the
/// sockets are bound: no client can tell when over vsock here).
fn wait_sigterm_caught(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mask = st.lines().find_map(|l| l.strip_prefix("SigCgt:")).unwrap().trim();
        if u64::from_str_radix(mask, 16).unwrap() & (1 << (libc::SIGTERM - 1)) != 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "SIGTERM never caught");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn vsock_conflicts_with_unix_and_stdin() {
    for args in [&["--vsock", "-U", "-", "null"][..], &["--vsock", "-s", "null"]] {
        let (st, _, err) = run_for(nbdkit(args), 10.0);
        assert_eq!(st.code(), Some(1));
        assert_eq!(err, "nbdkit: --dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination\n");
    }
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = st.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn swap_locks_all_memory_or_says_why_not() {
    require!("setpriv", "--version");
    require!("prlimit", "--version");
    let dir = TempDir::new("sw");
    let sock = dir.path("sock");
    // Without the right to lock memory (no CAP_IPC_LOCK, RLIMIT_MEMLOCK 0).
    let mut c = Command::new("prlimit");
    c.args(["--memlock=0:0", "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]);
    c.arg(nbdkit_bin()).args(["-f", "--swap", "-U", s(&sock), "null"]);
    let (st, _, err) = run_for(c, 10.0);
    assert_eq!(st.code(), Some(1));
    assert!(err == "nbdkit: --swap: mlockall: Operation not permitted\n"
            || err == "nbdkit: --swap: mlockall: Cannot allocate memory\n", "{err}");
    assert!(!sock.exists(), "bound before locking memory");
    // With it (root has it; a user may have a big enough RLIMIT_MEMLOCK).
    if euid() == 0 {
        let mut g = Guard::spawn(nbdkit(&["-f", "--swap", "-U", s(&sock), "memory", "1M"]));
        wait_unix(&mut g, &sock);
        let (lck, rss) = (status_kb(g.pid(), "VmLck:"), status_kb(g.pid(), "VmRSS:"));
        assert!(lck > 0 && lck >= rss / 2, "VmLck {lck} kB, VmRSS {rss} kB");
        let out = run_ok("nbdinfo", &["--size", &unix_uri(&sock)]);
        assert_eq!(out.trim(), "1048576");
    }
}

#[test]
fn selinux_label_needs_selinux() {
    let dir = TempDir::new("se");
    let sock = dir.path("sock");
    let args = ["-f", "--selinux-label=system_u:object_r:svirt_socket_t:s0", "-U", s(&sock), "null"];
    if Path::new("/sys/fs/selinux").exists() {
        // An SELinux machine: the label is applied and the server runs.
        let mut g = Guard::spawn(nbdkit(&args));
        wait_unix(&mut g, &sock);
        return;
    }
    let (st, _, err) = run_for(nbdkit(&args), 10.0);
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        err,
        "nbdkit: error: --selinux-label: SELinux is not enabled on this machine \
         (/proc/thread-self/attr/sockcreate: Invalid argument)\n"
    );
    assert!(!sock.exists());
}
