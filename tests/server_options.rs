//! Server options through the real binary and real clients (nbdinfo,
//! nbdsh, qemu-img): `--print-uri`, `-U -`, `--run` and its variables,
//! `-s`, TCP (`-p`, `-i`, `-4`, `--keepalive`), `-r`, `-t`, `-o`,
//! `--no-sr`, `--no-mc`, `--mask-handshake`, `-e`, `-v`/`-D`, `--log`,
//! `--timeout`, and the one-line errors of user mistakes.
//! nbdkit-behaviour.md A.1–A.13 as amended by nbdkit-behaviour-1.44.md.

mod common;
mod proc_util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use proc_util::*;

const M: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The value of the first `"key": value` line of nbdinfo's JSON.
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let line = json.lines().find_map(|l| l.trim().strip_prefix(&pat)).unwrap_or_else(|| panic!("no {key} in {json}"));
    line.trim_end_matches(',').trim_matches('"')
}

/// A foreground server on `SOCK` with `opts` before the plugin, `-v`
/// output (stderr) going to the file `err`.
fn server_logged(opts: &[&str], args: &[&str]) -> (Guard, TempDir) {
    let dir = TempDir::new("opt");
    let sock = dir.path("sock");
    let mut c = nbdkit(&["-f", "-U", s(&sock)]);
    c.args(opts).args(args).stderr(std::fs::File::create(dir.path("err")).unwrap());
    let mut g = Guard::spawn(c);
    wait_unix(&mut g, &sock);
    (g, dir)
}

/// `/tmp/nbdkitXXXXXX/socket` (mkdtemp's six characters).
fn is_private_socket(p: &str) -> bool {
    p.strip_prefix("/tmp/nbdkit")
        .and_then(|r| r.strip_suffix("/socket"))
        .is_some_and(|x| x.len() == 6 && x.chars().all(|c| c.is_ascii_alphanumeric()))
}

// ---------------------------------------------------------------------------
// --print-uri, -U -

#[test]
fn print_uri_with_a_private_socket_then_removed_at_exit() {
    require!("nbdinfo", "--version");
    let mut c = nbdkit(&["-f", "-U", "-", "--print-uri", "memory", "1M"]);
    c.stdout(Stdio::piped());
    let mut g = Guard::spawn(c);
    let lines = read_lines(g.0.stdout.take().unwrap(), 4, 20);
    let uri = lines[0].clone();
    let path = uri.strip_prefix("nbd+unix://?socket=").unwrap_or_else(|| panic!("URI line {uri:?}"));
    assert!(is_private_socket(path), "{path}");
    assert_eq!(lines[1], format!("Shell-quoted URI: \"{uri}\""));
    assert_eq!(lines[2], "Command to query the NBD endpoint:");
    assert_eq!(lines[3], format!("  nbdinfo \"{uri}\""));
    // The URI works as printed, and a client can use the socket.
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "1048576");
    let dir = Path::new(path).parent().unwrap().to_path_buf();
    assert!(Path::new(path).exists());
    kill("TERM", g.pid());
    assert_eq!(g.wait_exit(6.0).expect("SIGTERM: no exit").code(), Some(0));
    assert!(!dir.exists(), "the private dir {dir:?} must be removed at exit");
}

// ---------------------------------------------------------------------------
// --run

#[test]
fn run_variables_with_an_explicit_socket() {
    let dir = TempDir::new("run");
    let sock = dir.path("sock");
    let (st, out, err) = run_for(
        nbdkit(&["-U", s(&sock), "memory", "1M", "--run", "echo uri=$uri; echo port=$port; echo socket=$unixsocket"]),
        20.0,
    );
    assert!(st.success(), "{err}");
    let sock = sock.display();
    assert_eq!(out, format!("uri=nbd+unix://?socket={sock}\nport=\nsocket={sock}\n"));
    // The rest of the prelude: $nbd is $uri, $exportname empty without -e.
    let sock = dir.path("sock2");
    let (st, out, err) = run_for(
        nbdkit(&[
            "-U",
            s(&sock),
            "memory",
            "1M",
            "--run",
            r#"echo "nbd=$nbd"; echo "exportname=[$exportname]"; echo "tls=[$tls]""#,
        ]),
        20.0,
    );
    assert!(st.success(), "{err}");
    assert_eq!(out, format!("nbd=nbd+unix://?socket={}\nexportname=[]\ntls=[]\n", sock.display()));
}

#[test]
fn run_without_a_socket_option_uses_a_private_socket() {
    require!("nbdinfo", "--version");
    // -i alone does not stop --run from using a private Unix socket.
    for extra in [&[][..], &["-i", "127.0.0.1"][..]] {
        let mut c = nbdkit(extra);
        c.args([
            "memory",
            "1M",
            "--run",
            r#"echo "$unixsocket"; echo "$uri"; test -S "$unixsocket" && echo is-a-socket; nbdinfo --size "$uri""#,
        ]);
        let (st, out, err) = run_for(c, 20.0);
        assert!(st.success(), "{extra:?}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(is_private_socket(lines[0]), "{extra:?}: {out}");
        assert_eq!(lines[1], format!("nbd+unix://?socket={}", lines[0]));
        assert_eq!(lines[2..], ["is-a-socket", "1048576"]);
        let dir = Path::new(lines[0]).parent().unwrap();
        assert!(!dir.exists(), "{dir:?} must be removed at exit");
    }
}

#[test]
fn run_exit_status_is_nbdkits_and_the_server_exits_after_it() {
    let dir = TempDir::new("run");
    let sock = dir.path("sock");
    let t = Instant::now();
    let (st, _, err) = run_for(nbdkit(&["-U", s(&sock), "memory", "1M", "--run", "exit 3"]), 20.0);
    assert_eq!(st.code(), Some(3), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "the server must exit right after the command");
    assert!(UnixStream::connect(&sock).is_err(), "nobody listens after --run ended");
    let (st, _, err) = run_for(nbdkit(&["memory", "1M", "--run", "true"]), 20.0);
    assert_eq!(st.code(), Some(0), "{err}");
    // A command killed by signal S gives 128+S.
    let (st, _, err) = run_for(nbdkit(&["memory", "1M", "--run", "kill -KILL $$"]), 20.0);
    assert_eq!(st.code(), Some(128 + 9), "{err}");
    // --run implies -f: nbdkit returns only after the command, and the
    // server whose PID is in the pidfile is gone by then.
    let pidfile = dir.path("pid");
    let (st, out, err) = run_for(nbdkit(&["-P", s(&pidfile), "memory", "1M", "--run", "sleep 0.3; echo done"]), 20.0);
    assert!(st.success(), "{err}");
    assert_eq!(out, "done\n");
    let pid = read_pidfile(&pidfile);
    assert!(wait_pid_gone(pid, 2.0), "server {pid} still running after --run ended");
}

#[test]
fn run_command_reads_nbdkits_stdin_and_ends_the_server_with_a_client_connected() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("run");
    let input = dir.path("in");
    std::fs::write(&input, "hello\n").unwrap();
    let mut c = nbdkit(&[
        "memory",
        "1M",
        "--run",
        r#"(nbdsh -u "$uri" -c "import time; time.sleep(4)" >/dev/null 2>&1 &); sleep 0.5; cat"#,
    ]);
    c.stdin(std::fs::File::open(&input).unwrap());
    let t = Instant::now();
    let (st, out, err) = run_for(c, 20.0);
    assert!(st.success(), "{err}");
    assert_eq!(out, "hello\n", "the command reads nbdkit's stdin");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(3000), "nbdkit waited for the idle client: {took:?}");
}

#[test]
fn run_server_killed_first_still_waits_for_the_command_and_returns_its_status() {
    // A.5/A.10: the server (the pidfile's PID) dies first; nbdkit still
    // waits for the command, whose status (3) wins as it is not 0.
    let dir = TempDir::new("run");
    let (pidfile, sock) = (dir.path("pid"), dir.path("sock"));
    let mut c = nbdkit(&["-P", s(&pidfile), "-U", s(&sock), "memory", "1M", "--run", "sleep 1.5; echo after; exit 3"]);
    c.stdout(Stdio::piped());
    let mut g = Guard::spawn(c);
    let out = g.0.stdout.take().unwrap();
    let t = Instant::now();
    let server = read_pidfile(&pidfile);
    wait_unix(&mut g, &sock);
    kill("TERM", server);
    let st = g.wait_exit(10.0).expect("nbdkit did not return");
    let took = t.elapsed();
    assert_eq!(read_lines(out, 1, 5), ["after"], "the command ran to its end before nbdkit returned");
    assert_eq!(st.code(), Some(3), "the command's status, after {took:?}");
    assert!(took >= Duration::from_millis(1400), "returned after {took:?}, before the command ended");
}

#[test]
fn run_with_export_name() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("run");
    let sock = dir.path("sock");
    let (st, out, err) = run_for(
        nbdkit(&[
            "-e",
            "foo",
            "-U",
            s(&sock),
            "memory",
            "1M",
            "--run",
            r#"echo "$exportname"; echo "$uri"; nbdinfo --size "$uri""#,
        ]),
        20.0,
    );
    assert!(st.success(), "{err}");
    assert_eq!(out, format!("foo\nnbd+unix:///foo?socket={}\n1048576\n", sock.display()));
    // uri-quoting of the name; shell quoting keeps it one word.
    let (st, out, err) = run_for(
        nbdkit(&["--export-name", "a b", "memory", "1M", "--run", r#"echo "[$exportname]"; echo "$uri""#]),
        20.0,
    );
    assert!(st.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "[a b]");
    assert!(lines[1].starts_with("nbd+unix:///a%20b?socket=/tmp/nbdkit"), "{out}");
}

#[test]
fn run_with_tcp_port() {
    require!("nbdinfo", "--version");
    let port = free_port().to_string();
    let (st, out, err) = run_for(
        nbdkit(&[
            "-p",
            &port,
            "memory",
            "1M",
            "--run",
            r#"echo "$uri"; echo "$port"; echo "[$unixsocket]"; nbdinfo --size "$uri""#,
        ]),
        20.0,
    );
    assert!(st.success(), "{err}");
    assert_eq!(out, format!("nbd://localhost:{port}\n{port}\n[]\n1048576\n"));
}

#[test]
fn export_name_does_not_change_what_is_served() {
    require!("nbdinfo", "--version");
    let names = |opts: &[&str]| {
        let srv = Server::start_with(opts, &["memory", "1M"]);
        let json = run_ok("nbdinfo", &["--list", "--json", &srv.uri()]);
        let names: Vec<String> =
            json.split("\"export-name\": ").skip(1).map(|e| e.split('"').nth(1).unwrap().to_string()).collect();
        // The default export is served as before.
        assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri()]).trim(), "1048576");
        names
    };
    let plain = names(&["-n"]);
    assert_eq!(plain, [""]);
    assert_eq!(names(&["-n", "-e", "foo"]), plain, "-e changes only the --run environment");
}

// ---------------------------------------------------------------------------
// -s

#[test]
fn single_serves_stdin_stdout_via_connect_command() {
    require!("nbdsh", "--version");
    // --print-uri prints nothing with -s (stdout is the client).
    for opts in ["'-s'", "'--single', '--print-uri'", "'--stdin', '-v'"] {
        let bin = nbdkit_bin().display().to_string();
        let script = format!(
            "h.connect_command([{bin:?}, {opts}, 'memory', '1M'])\n\
         assert h.get_size() == 1048576\n\
         h.pwrite(b'abcd' * 128, 4096)\n\
         assert h.pread(512, 4096) == b'abcd' * 128\n\
         assert h.pread(512, 0) == bytearray(512)\n\
         h.shutdown()\n\
         print('ok')"
        );
        let out = run_ok("nbdsh", &["-c", &script]);
        assert_eq!(out.trim(), "ok", "{opts}");
    }
}

#[test]
fn single_exits_after_its_one_connection() {
    require!("nbdsh", "--version");
    let script = format!(
        r#"
import socket, subprocess, nbd
a, b = socket.socketpair()
p = subprocess.Popen([{bin:?}, "-s", "memory", "1M"], stdin=b, stdout=b)
b.close()
h = nbd.NBD()
h.connect_socket(a.detach())
assert h.get_size() == 1048576
assert h.pread(512, 0) == bytearray(512)
h.shutdown()
del h
try:
    print("exit", p.wait(timeout=5))
except subprocess.TimeoutExpired:
    p.kill()
    print("still running")
"#,
        bin = nbdkit_bin().display().to_string()
    );
    assert_eq!(python_ok(&script).trim(), "exit 0");
}

#[test]
fn single_applies_the_handshake_timeout() {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let mut c = nbdkit(&["-s", "--timeout=1", "memory", "1M"]);
    c.stdin(std::os::fd::OwnedFd::from(theirs.try_clone().unwrap())).stdout(std::os::fd::OwnedFd::from(theirs));
    let t = Instant::now();
    let mut g = Guard::spawn(c);
    ours.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    read_n(&mut ours, 18);
    // Stall: the server must give up on us, and then exit.
    let closed_after = seconds_to_close(&mut ours, t);
    assert!((0.8..3.5).contains(&closed_after), "closed after {closed_after:.2} s");
    let st = g.wait_exit(3.0).expect("-s: still running after the timeout");
    assert_eq!(st.code(), Some(0));
}

/// The client's side of a whole session: fixed newstyle, GO "", READ 512
/// at 0 (cookie 7, simple reply), DISC.
fn recorded_session() -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&7u32.to_be_bytes());
    let go = go_payload(b"");
    v.extend_from_slice(&(go.len() as u32).to_be_bytes());
    v.extend_from_slice(&go);
    for (cmd, cookie, count) in [(0u16, 7u64, 512u32), (2, 8, 0)] {
        v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&count.to_be_bytes());
    }
    v
}

#[test]
fn single_replays_a_session_from_a_file() {
    // nbdkit's fuzzing idiom: `nbdkit -s memory 1M < testcase > out`.
    let dir = TempDir::new("single");
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::write(&input, recorded_session()).unwrap();
    let mut c = nbdkit(&["-s", "memory", "1M"]);
    c.stdin(std::fs::File::open(&input).unwrap())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(std::fs::File::create(dir.path("err")).unwrap());
    let st = Guard::spawn(c).wait_exit(10.0).expect("-s: no exit after DISC");
    let err = std::fs::read_to_string(dir.path("err")).unwrap();
    assert_eq!(st.code(), Some(0), "{err}");
    let out = std::fs::read(&output).unwrap();
    assert!(out.starts_with(b"NBDMAGICIHAVEOPT\0\x03"), "greeting: {out:?}; {err}");
    let mut tail = 0x6744_6698u32.to_be_bytes().to_vec();
    tail.extend_from_slice(&0u32.to_be_bytes());
    tail.extend_from_slice(&7u64.to_be_bytes());
    tail.extend_from_slice(&[0; 512]);
    assert!(out.ends_with(&tail), "the READ's reply ends the output ({} bytes); {err}", out.len());
}

// ---------------------------------------------------------------------------
// TCP

fn tcp_server(opts: &[&str], port: u16, addr: SocketAddr) -> Guard {
    let port = port.to_string();
    let mut c = nbdkit(&["-f", "-p", &port]);
    c.args(opts).args(["memory", "1M"]);
    let mut g = Guard::spawn(c);
    wait_tcp(&mut g, addr);
    g
}

#[test]
fn tcp_port_and_ipaddr_with_nbdinfo_and_qemu_img() {
    require!("nbdinfo", "--version");
    require!("qemu-img", "--version");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _g = tcp_server(&["-i", "127.0.0.1"], port, addr);
    let uri = format!("nbd://127.0.0.1:{port}");
    assert_eq!(run_ok("nbdinfo", &["--size", &uri]).trim(), "1048576");
    let json = run_ok("qemu-img", &["info", "--output=json", &uri]);
    assert_eq!(field(&json, "virtual-size"), "1048576", "{json}");
    // Bound to 127.0.0.1 only: not on another local address.
    if ipv6_loopback() {
        assert!(TcpStream::connect(("::1", port)).is_err(), "-i 127.0.0.1 must not listen on ::1");
    }
}

/// Over TCP a big WRITE's payload is read with the socket's low mark set
/// to its size (transmission/write.rs, `read_into`). The payload here comes in
/// two parts, the first exactly as big as the kernel lets that mark be
/// (half the biggest receive buffer), then a pause, then the last 60 KiB
/// and nothing more until the reply: each read after the first must ask
/// for no more than what is left, or it waits for bytes the client never
/// sends. For the memory plugin (payload read straight into its pages)
/// and the file plugin (payload read into a buffer).
#[test]
fn big_write_payloads_over_tcp_that_arrive_in_parts() {
    let rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").unwrap();
    let rmem_max: usize = rmem.split_whitespace().nth(2).unwrap().parse().unwrap();
    let tail = 60 * 1024;
    let first = (rmem_max / 2).min(64 * M as usize - tail);
    let n = first + tail;
    let dir = TempDir::new("lowat");
    let disk = dir.path("disk");
    std::fs::File::create(&disk).unwrap().set_len(64 * M).unwrap();
    for plugin in [vec!["memory", "64M"], vec!["file", s(&disk)]] {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut c = nbdkit(&["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        c.args(&plugin);
        let mut g = Guard::spawn(c);
        wait_tcp(&mut g, addr);
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        t.set_nodelay(true).unwrap();
        go(&mut t, false);
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect();
        send_request(&mut t, 0, 1, 7, 4096, n as u32, &data[..first]);
        std::thread::sleep(Duration::from_millis(300));
        t.write_all(&data[first..]).unwrap();
        assert_eq!(read_simple_reply(&mut t), (0, 7), "{plugin:?}: the WRITE of {n} bytes");
        // Then a small one right behind a big one, read back.
        send_request(&mut t, 0, 1, 8, 0, 4096, &data[..4096]);
        assert_eq!(read_simple_reply(&mut t), (0, 8), "{plugin:?}");
        send_request(&mut t, 0, 0, 9, 0, (n + 4096) as u32, &[]);
        assert_eq!(read_simple_reply(&mut t), (0, 9), "{plugin:?}");
        let back = read_n(&mut t, n + 4096);
        assert!(back[..4096] == data[..4096] && back[4096..] == data[..], "{plugin:?}: the data read back differs");
        assert!(g.alive());
    }
}

#[test]
fn tcp_print_uri_is_localhost_with_the_port() {
    let port = free_port();
    let mut c = nbdkit(&["-f", "-p", &port.to_string(), "--print-uri", "memory", "1M"]);
    c.stdout(Stdio::piped());
    let mut g = Guard::spawn(c);
    let lines = read_lines(g.0.stdout.take().unwrap(), 4, 20);
    let uri = format!("nbd://localhost:{port}");
    assert_eq!(
        lines,
        [
            uri.clone(),
            format!("Shell-quoted URI: {uri}"),
            "Command to query the NBD endpoint:".into(),
            format!("  nbdinfo {uri}")
        ]
    );
    assert!(g.alive());
}

#[test]
fn ipv4_only() {
    require!("nbdinfo", "--version");
    let port = free_port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _g = tcp_server(&["-4"], port, v4);
    assert_eq!(run_ok("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}")]).trim(), "1048576");
    if ipv6_loopback() {
        assert!(TcpStream::connect(("::1", port)).is_err(), "-4 must not listen on IPv6");
        // Control: without -4 both families are bound.
        let port = free_port();
        let _g = tcp_server(&[], port, format!("127.0.0.1:{port}").parse().unwrap());
        assert!(TcpStream::connect(("::1", port)).is_ok(), "without -4 the server listens on :: too");
    }
}

#[test]
fn ipv6_only() {
    require!("nbdinfo", "--version");
    if !ipv6_loopback() {
        eprintln!("SKIP: no IPv6 loopback");
        return;
    }
    let port = free_port();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let _g = tcp_server(&["-6"], port, v6);
    assert_eq!(run_ok("nbdinfo", &["--size", &format!("nbd://[::1]:{port}")]).trim(), "1048576");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "-6 must not listen on IPv4");
}

/// The kernel's timer column for the server side of our connection in
/// /proc/net/tcp: `02:…` is the keepalive timer.
fn server_side_timer(port: u16, client_port: u16) -> String {
    let local = format!("0100007F:{port:04X}");
    let remote = format!("0100007F:{client_port:04X}");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for l in tcp.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f[1] == local && f[2] == remote {
            return f[5].to_string();
        }
    }
    panic!("no server-side socket {local} <- {remote} in /proc/net/tcp:\n{tcp}");
}

#[test]
fn keepalive_sets_so_keepalive_on_accepted_sockets() {
    for (opts, want) in [(&["--keepalive"][..], true), (&["--keep-alive"][..], true), (&[][..], false)] {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _g = tcp_server(&[&["-i", "127.0.0.1"], opts].concat(), port, addr);
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0; 18];
        c.read_exact(&mut greeting).unwrap(); // accepted, and set up
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        let timer = server_side_timer(port, c.local_addr().unwrap().port());
        assert_eq!(timer.starts_with("02:"), want, "{opts:?}: timer {timer}");
    }
}

// ---------------------------------------------------------------------------
// -r, -t

#[test]
fn readonly() {
    require!("nbdinfo", "--version");
    require!("nbdsh", "--version");
    for opt in ["-r", "--readonly", "--read-only"] {
        let srv = Server::start_with(&[opt], &["memory", "1M"]);
        assert_eq!(run("nbdinfo", &["--is", "readonly", &srv.uri()]).status.code(), Some(0), "{opt}");
        let out = nbdsh_ok(
            &srv,
            "assert h.is_read_only()\n\
             assert h.pread(512, 0) == bytearray(512)\n\
             try:\n    h.pwrite(b'x' * 512, 0)\n    print('written')\n\
             except nbd.Error as e:\n    print(e.errno)",
        );
        assert_eq!(out.trim(), "EPERM", "{opt}");
    }
    let srv = Server::start(&["memory", "1M"]);
    assert_eq!(run("nbdinfo", &["--is", "readonly", &srv.uri()]).status.code(), Some(2), "control");
}

/// 32 parallel 64 KiB aio reads of distinct data through a 50 ms read
/// delay: every buffer must hold its own block. Returns the seconds taken.
fn parallel_reads(threads: &str) -> f64 {
    let srv = Server::start_with(&["-t", threads, "--filter=delay"], &["memory", "2M", "rdelay=50ms"]);
    let out = nbdsh_ok(
        &srv,
        "import time\n\
         N, B = 32, 65536\n\
         for i in range(N): h.pwrite(bytes([i + 1]) * B, i * B)\n\
         t = time.monotonic()\n\
         bufs = [nbd.Buffer(B) for i in range(N)]\n\
         cookies = [h.aio_pread(bufs[i], i * B) for i in range(N)]\n\
         while h.aio_in_flight() > 0: h.poll(-1)\n\
         el = time.monotonic() - t\n\
         for c in cookies: assert h.aio_command_completed(c)\n\
         for i in range(N): assert bufs[i].to_bytearray() == bytes([i + 1]) * B, i\n\
         print(el)",
    );
    out.trim().parse().unwrap()
}

#[test]
fn threads_1_serialises_and_threads_4_overlaps_with_correct_replies() {
    require!("nbdsh", "--version");
    let t1 = parallel_reads("1");
    let t4 = parallel_reads("4");
    eprintln!("32 reads of 50 ms: -t 1 {t1:.2} s, -t 4 {t4:.2} s");
    assert!(t1 >= 1.55, "-t 1 must handle requests one at a time: {t1} s");
    assert!(t4 < 1.2, "-t 4 must overlap requests: {t4} s");
}

// ---------------------------------------------------------------------------
// Protocol variants: -o, --no-sr, --no-mc, --mask-handshake

#[test]
fn oldstyle_with_nbdinfo_qemu_img_and_nbdsh() {
    require!("nbdinfo", "--version");
    require!("qemu-img", "--version");
    for opt in ["-o", "--oldstyle", "--old-style"] {
        let srv = Server::start_with(&[opt], &["memory", "1M"]);
        let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
        assert_eq!(field(&json, "protocol"), "oldstyle", "{opt}: {json}");
        let mut c = srv.connect();
        let g = read_n(&mut c, 16);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..], &0x0000_4202_8186_1253_u64.to_be_bytes(), "oldstyle magic");
    }
    let srv = Server::start_with(&["-o"], &["memory", "1M"]);
    let json = run_ok("qemu-img", &["info", "--output=json", &srv.uri()]);
    assert_eq!(field(&json, "virtual-size"), "1048576", "{json}");
    nbdsh_ok(&srv, "h.pwrite(b'o' * 512, 512)\nassert h.pread(512, 512) == b'o' * 512");
}

#[test]
fn no_sr_refuses_structured_replies() {
    require!("nbdinfo", "--version");
    for opt in ["--no-sr", "--no-structured-replies"] {
        let srv = Server::start_with(&[opt], &["memory", "1M"]);
        let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
        assert_eq!(field(&json, "protocol"), "newstyle-fixed", "{opt}");
        assert_eq!(field(&json, "structured"), "false", "{opt}: {json}");
        assert!(!json.contains("base:allocation"), "{opt}: {json}");
        let mut c = srv.connect();
        newstyle(&mut c);
        send_option(&mut c, 8, b"");
        assert_eq!(read_option_reply(&mut c).1, 0x8000_0001, "{opt}: NBD_REP_ERR_UNSUP");
    }
    // Control.
    let srv = Server::start(&["memory", "1M"]);
    assert_eq!(field(&run_ok("nbdinfo", &["--json", &srv.uri()]), "structured"), "true");
}

#[test]
fn no_mc_offers_no_meta_contexts() {
    require!("nbdinfo", "--version");
    require!("nbdsh", "--version");
    for opt in ["--no-mc", "--no-meta-contexts"] {
        let srv = Server::start_with(&[opt], &["memory", "1M"]);
        let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
        assert_eq!(field(&json, "structured"), "true", "{opt}: structured replies still work");
        assert!(!json.contains("\"contexts\""), "{opt}: {json}");
        let text = run_ok("nbdinfo", &[&srv.uri()]);
        assert!(!text.contains("contexts:"), "{opt}: {text}");
        let out = run("nbdsh", &["-u", &srv.uri(), "-c", "assert not h.can_meta_context('base:allocation')"]);
        assert!(out.status.success(), "{opt}: {}", String::from_utf8_lossy(&out.stderr));
        let mut c = srv.connect();
        newstyle(&mut c);
        let mut q = 0u32.to_be_bytes().to_vec(); // export ""
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        for option in [9, 10] {
            send_option(&mut c, option, &q);
            assert_eq!(read_option_reply(&mut c), (option, 0x8000_0001, Vec::new()), "{opt}: option {option}");
        }
    }
    // Control.
    let srv = Server::start(&["memory", "1M"]);
    assert!(run_ok("nbdinfo", &[&srv.uri()]).contains("base:allocation"));
}

#[test]
fn mask_handshake() {
    require!("nbdinfo", "--version");
    require!("nbdsh", "--version");
    // The greeting's flags are (FIXED_NEWSTYLE|NO_ZEROES) & MASK.
    for (mask, flags) in [("0", 0u16), ("1", 1), ("2", 2), ("3", 3), ("0xff", 3)] {
        let srv = Server::start_with(&[&format!("--mask-handshake={mask}")], &["memory", "1M"]);
        let mut c = srv.connect();
        let g = read_n(&mut c, 18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), flags, "mask {mask}");
    }
    // No fixed newstyle: libnbd still connects (EXPORT_NAME), reads, writes.
    let srv = Server::start_with(&["--mask-handshake=0"], &["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    assert_eq!(field(&json, "protocol"), "newstyle", "{json}");
    nbdsh_ok(&srv, "h.pwrite(b'm' * 512, 0)\nassert h.pread(512, 0) == b'm' * 512\nassert h.get_size() == 1048576");
    // Without NO_ZEROES, EXPORT_NAME's reply ends with 124 zeroes.
    let srv = Server::start_with(&["--mask-handshake=1"], &["memory", "1M"]);
    let mut c = srv.connect();
    read_n(&mut c, 18);
    c.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut c, 1, b"");
    let r = read_n(&mut c, 8 + 2 + 124);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), M);
    assert!(r[10..].iter().all(|&b| b == 0));
    send_request(&mut c, 0, 0, 7, 0, 512, b"");
    assert_eq!(read_simple_reply(&mut c), (0, 7), "a READ right after the 124 zeroes");
    assert_eq!(read_n(&mut c, 512), vec![0; 512]);
}

// ---------------------------------------------------------------------------
// -v, -D, --log

#[test]
fn verbose_traces_and_datapath_flag_hides_reads() {
    require!("nbdsh", "--version");
    let read = |opts: &[&str]| {
        let (mut g, dir) = server_logged(opts, &["memory", "1M"]);
        let out = run("nbdsh", &["-u", &unix_uri(&dir.path("sock")), "-c", "h.pread(512, 4096)\nh.flush()"]);
        assert!(out.status.success());
        kill("TERM", g.pid());
        assert_eq!(g.wait_exit(6.0).and_then(|s| s.code()), Some(0));
        std::fs::read_to_string(dir.path("err")).unwrap()
    };
    let log = read(&["-v"]);
    assert!(log.lines().any(|l| l.starts_with("nbdkit: ") && l.contains("debug: ")), "{log}");
    assert!(log.contains("debug: memory: open readonly=0"), "{log}");
    assert!(log.contains("memory: pread count=512 offset=4096"), "{log}");
    let log = read(&["--verbose", "-D", "nbdkit.backend.datapath=0"]);
    assert!(!log.contains("memory: pread"), "-D nbdkit.backend.datapath=0 hides the pread trace:\n{log}");
    assert!(log.contains("debug: memory: open readonly=0"), "controlpath trace stays:\n{log}");
    assert!(log.contains("debug: memory: flush"), "flush is controlpath in 1.44:\n{log}");
    let log = read(&["-v", "-D", "nbdkit.backend.controlpath=0"]);
    assert!(log.contains("memory: pread count=512 offset=4096"), "{log}");
    assert!(!log.contains("memory: open"), "controlpath=0 hides open:\n{log}");
    assert!(!log.contains("memory: flush"), "controlpath=0 hides flush:\n{log}");
    let log = read(&[]);
    assert!(!log.contains("debug:"), "no debug lines without -v:\n{log}");
}

fn failing_read(sock: &Path) {
    let out = run("nbdsh", &["-u", &unix_uri(sock), "-c", "h.pread(512, 0)"]);
    assert!(!out.status.success(), "the error filter must fail the read");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));
}

/// `nbdkit: memory[N]: error: injecting EIO error into pread` (N counts
/// connections, including the harness's probe).
fn is_eio_line(l: &str) -> bool {
    l.strip_prefix("nbdkit: memory[")
        .and_then(|r| r.strip_suffix("]: error: injecting EIO error into pread"))
        .is_some_and(|n| n.parse::<u32>().is_ok())
}

#[test]
fn log_to_a_file_appends_error_lines() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("log");
    let log = dir.path("nbdkit.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let opt = format!("--log={}", log.display());
    let (mut g, sdir) = server_logged(&[&opt, "-v", "--filter=error"], &["memory", "1M", "error-pread-rate=1"]);
    failing_read(&sdir.path("sock"));
    kill("TERM", g.pid());
    g.wait_exit(6.0).expect("exit");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"earlier line"), "{text}");
    assert!(lines.iter().any(|l| is_eio_line(l)), "{text}");
    assert!(!text.contains("debug:"), "debug output is not redirected:\n{text}");
    let stderr = std::fs::read_to_string(sdir.path("err")).unwrap();
    assert!(!stderr.contains("error:"), "errors go to the file, not stderr:\n{stderr}");
    assert!(stderr.contains("debug: "), "-v still prints debug lines on stderr:\n{stderr}");
}

#[test]
fn log_null_discards_errors_that_default_prints_on_stderr() {
    require!("nbdsh", "--version");
    for (opts, shown) in [(&["--log=null"][..], false), (&["--log=stderr"][..], true), (&[][..], true)] {
        let (mut g, dir) =
            server_logged(&[opts, &["--filter=error"]].concat(), &["memory", "1M", "error-pread-rate=1"]);
        failing_read(&dir.path("sock"));
        kill("TERM", g.pid());
        g.wait_exit(6.0).expect("exit");
        let stderr = std::fs::read_to_string(dir.path("err")).unwrap();
        assert_eq!(stderr.lines().any(is_eio_line), shown, "{opts:?}: {stderr:?}");
        if !shown {
            assert_eq!(stderr, "", "{opts:?} prints nothing");
        }
    }
}

// ---------------------------------------------------------------------------
// --timeout (H33, H33b, A.4 of the 1.44 delta)

fn unix_client(srv: &Server) -> UnixStream {
    let c = srv.connect();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    c
}

/// Seconds until the server closes `c` (at most 8).
fn seconds_to_close(c: &mut UnixStream, since: Instant) -> f64 {
    let mut b = [0; 64];
    match c.read(&mut b) {
        Ok(0) | Err(_) => since.elapsed().as_secs_f64(),
        Ok(n) => panic!("unexpected bytes from the server: {:?}", &b[..n]),
    }
}

#[test]
fn h33_timeout_closes_stalled_handshakes_only() {
    let srv = Server::start_with(&["--timeout=2"], &["memory", "1M"]);
    let t0 = Instant::now();
    // Stalls after reading the greeting, and after sending client flags.
    let mut stalled = unix_client(&srv);
    read_n(&mut stalled, 18);
    let mut stalled_flags = unix_client(&srv);
    newstyle(&mut stalled_flags);
    // Negotiates at once, then idles past the timeout.
    let mut idle = unix_client(&srv);
    go(&mut idle, false);
    // H33b: meanwhile a new client is greeted at once and reads.
    std::thread::sleep(Duration::from_millis(500));
    let mut fresh = unix_client(&srv);
    fresh.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    go(&mut fresh, false);
    send_request(&mut fresh, 0, 0, 1, 0, 512, b"");
    assert_eq!(read_simple_reply(&mut fresh), (0, 1));
    assert_eq!(read_n(&mut fresh, 512), vec![0; 512]);
    let a = seconds_to_close(&mut stalled, t0);
    let b = seconds_to_close(&mut stalled_flags, t0);
    assert!((1.8..4.5).contains(&a), "stalled after the greeting: closed after {a:.2} s");
    assert!((1.8..4.5).contains(&b), "stalled after client flags: closed after {b:.2} s");
    // The timeout ended with negotiation: the idle client still reads.
    let wait = Duration::from_secs(3).saturating_sub(t0.elapsed());
    std::thread::sleep(wait);
    send_request(&mut idle, 0, 0, 2, 0, 512, b"");
    assert_eq!(read_simple_reply(&mut idle), (0, 2), "negotiated client idle for 3 s");
    assert_eq!(read_n(&mut idle, 512), vec![0; 512]);
}

#[test]
fn timeout_zero_disables_it() {
    for opt in ["--timeout=0", "--time-out=0s"] {
        let srv = Server::start_with(&[opt], &["memory", "1M"]);
        let mut c = unix_client(&srv);
        read_n(&mut c, 18);
        std::thread::sleep(Duration::from_millis(if opt == "--timeout=0" { 3000 } else { 100 }));
        c.write_all(&3u32.to_be_bytes()).unwrap();
        send_option(&mut c, 7, &go_payload(b""));
        loop {
            let (_, typ, _) = read_option_reply(&mut c);
            if typ == 1 {
                break;
            }
            assert_eq!(typ, 3, "{opt}: GO after 3 s of silence");
        }
        send_request(&mut c, 0, 0, 3, 0, 512, b"");
        assert_eq!(read_simple_reply(&mut c), (0, 3), "{opt}");
    }
}

// ---------------------------------------------------------------------------
// User mistakes: exit 1 with one error line (and no listener left behind)

/// Runs nbdkit expecting exit 1 and nothing on stdout; returns stderr.
fn fails(args: &[&str]) -> String {
    let (st, out, err) = run_for(nbdkit(args), 20.0);
    assert_eq!(st.code(), Some(1), "{args:?}: {st}\n{err}");
    assert_eq!(out, "", "{args:?}");
    err
}

fn one_line(args: &[&str], want: &str) {
    let err = fails(args);
    assert_eq!(err.lines().count(), 1, "{args:?}: one line expected:\n{err}");
    assert!(err.starts_with("nbdkit: "), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
}

#[test]
fn user_mistakes_fail_with_one_error_line() {
    let dir = TempDir::new("err");
    let sock = dir.path("sock");
    let sock = s(&sock);
    let err = fails(&["-U", sock, "nosuchplugin"]);
    assert!(err.starts_with("nbdkit: error: cannot open plugin \"nosuchplugin\""), "{err}");
    assert!(err.contains("nbdkit(1)"), "{err}");
    one_line(&["-U", sock, "memory"], "nbdkit: error: you must specify size=<SIZE> on the command line");
    one_line(&["-U", sock, "memory", "size=1Q"], "error: could not parse size: unknown suffix 'Q'");
    one_line(&["-U", sock, "file", "file=/nonexistent"], "/nonexistent: No such file or directory");
    one_line(
        &["-s", "-U", sock, "memory", "1M"],
        "--dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination",
    );
    // nbdkit's three lines (tests/tls.rs has the rest of TLS).
    let err = fails(&["--tls=require", "--tls-certificates", "/nonexistent", "-U", sock, "memory", "1M"]);
    assert!(err.starts_with("nbdkit: --tls=require but could not load TLS certificates.\n"), "{err}");
    one_line(&["--log=relative", "-U", sock, "memory", "1M"], "--log must be");
    one_line(&["--timeout=soon", "-U", sock, "memory", "1M"], "timeout");
    assert!(!Path::new(sock).exists(), "no failed start may leave a socket behind");
}

#[test]
fn existing_socket_path_is_a_bind_error() {
    let dir = TempDir::new("err");
    let path = dir.path("taken");
    std::fs::write(&path, "keep me").unwrap();
    one_line(&["-f", "-U", s(&path), "memory", "1M"], "Address already in use");
    assert!(fails(&["-U", s(&path), "memory", "1M"]).contains(s(&path)), "names the path");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me", "the file is not removed");
    // An old socket nobody listens on is not unlinked either.
    let stale = dir.path("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    one_line(&["-f", "-U", s(&stale), "memory", "1M"], "Address already in use");
}

#[test]
fn unwritable_log_file_is_an_error() {
    let err = fails(&["--log=/nonexistent-dir/x.log", "-U", "-", "memory", "1M"]);
    assert!(err.contains("/nonexistent-dir/x.log"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn plugin_debug_flag_file_zero_logs_fallocate_calls() {
    require!("nbdsh", "--version");
    let data = TempDir::new("fzero");
    let img = data.path("disk.img");
    std::fs::write(&img, vec![1u8; 1 << 20]).unwrap();
    let run_zero = |opts: &[&str]| {
        let (mut g, dir) = server_logged(opts, &["file", img.to_str().unwrap()]);
        let out = run("nbdsh", &["-u", &unix_uri(&dir.path("sock")), "-c", "h.zero(65536, 0)"]);
        assert!(out.status.success());
        kill("TERM", g.pid());
        assert_eq!(g.wait_exit(6.0).and_then(|s| s.code()), Some(0));
        std::fs::read_to_string(dir.path("err")).unwrap()
    };
    let log = run_zero(&["-v", "-D", "file.zero=1"]);
    assert!(log.contains("debug: fallocate (fd, 0x"), "{log}");
    let log = run_zero(&["-v"]);
    assert!(!log.contains("fallocate (fd,"), "without -D file.zero=1:\n{log}");
}
