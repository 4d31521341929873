//! Test harness: start the real `nbdkit` binary on a private Unix socket
//! (one per test, so tests run in parallel), run real clients against it,
//! and kill it on drop. nbdkit's `requires` / `start_nbdkit` /
//! `cleanup_fn`, as Rust.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Skip with a visible SKIP line; with NBDKIT_TEST_STRICT=1 (CI) fail instead.
#[macro_export]
macro_rules! require {
    ($prog:literal $(, $arg:literal)*) => {
        if !$crate::common::available($prog, &[$($arg),*]) {
            if std::env::var_os("NBDKIT_TEST_STRICT").is_some() {
                panic!("{} is required (NBDKIT_TEST_STRICT is set)", $prog);
            }
            eprintln!("SKIP: {} not available", $prog);
            return;
        }
    };
}

/// PATH with /usr/bin first: the first python3 on this machine's PATH has
/// no libnbd module, and nbdsh runs `python3`.
pub fn path_env() -> String {
    format!("/usr/bin:/usr/sbin:/bin:/sbin:{}", std::env::var("PATH").unwrap_or_default())
}

/// True if `prog args…` runs and exits 0.
pub fn available(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .env("PATH", path_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The binary under test (`NBDKIT_BIN` overrides, e.g. the static build).
pub fn nbdkit_bin() -> PathBuf {
    std::env::var_os("NBDKIT_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_nbdkit").into())
}

/// A fresh private directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "nbdkit-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server on a private Unix socket.
pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl Server {
    /// `args` are what follows `nbdkit` on a command line: `["null", "1M"]`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(&[], args)
    }

    /// Like `start`, with extra server options before the plugin (`-r`, `-o`…).
    pub fn start_with(opts: &[&str], args: &[&str]) -> Server {
        let dir = TempDir::new("srv");
        let sock = dir.path("sock");
        let child = Command::new(nbdkit_bin())
            .args(["--foreground", "--unix"])
            .arg(&sock)
            .args(opts)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run the nbdkit binary");
        let mut srv = Server { child, sock, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket file exists between bind() and listen(): wait for a
        // connect that succeeds, not just for the file.
        while UnixStream::connect(&srv.sock).is_err() {
            if let Ok(Some(st)) = srv.child.try_wait() {
                panic!("nbdkit {args:?} exited early: {st}");
            }
            assert!(Instant::now() < deadline, "server did not create {:?}", srv.sock);
            thread::sleep(Duration::from_millis(10));
        }
        srv
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn uri_export(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.sock.display())
    }

    /// A raw connection to the socket.
    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The health check of bad-input.md: the server is alive, and a fresh
    /// client negotiates (GO) and reads 512 bytes.
    pub fn health_check(&mut self) {
        assert!(self.alive(), "server died");
        let out = nbdsh(self, "assert len(h.pread(512, 0)) == 512");
        assert!(out.status.success(), "health check failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(self.alive(), "server died");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill(); // cleanup_fn, as RAII
        let _ = self.child.wait();
    }
}

/// Runs a command with the test PATH, returning its output.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).env("PATH", path_env()).output().unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a Python script with `h` connected to the server (`nbdsh -u URI -c`).
pub fn nbdsh(srv: &Server, script: &str) -> Output {
    run("nbdsh", &["-u", &srv.uri(), "-c", script])
}

/// Like `nbdsh`, must succeed; returns stdout.
pub fn nbdsh_ok(srv: &Server, script: &str) -> String {
    let o = nbdsh(srv, script);
    assert!(o.status.success(), "nbdsh failed:\n{}\n{}", script, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Python helper for libnbd scripts: `fails(ERRNO, f, *args)` asserts that
/// the call fails with that errno name.
pub const PY_FAILS: &str = r#"def fails(name, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errno == name, "expected %s, got %s (%s)" % (name, e.errno, e.string)
        return
    raise AssertionError("expected %s, the call succeeded" % name)
"#;

/// Runs a Python 3 script (with libnbd importable) that must succeed.
pub fn python_ok(script: &str) -> String {
    let o = run("/usr/bin/python3", &["-c", script]);
    assert!(o.status.success(), "python failed:\n{}\n{}", script, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads exactly `n` bytes or panics.
pub fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).expect("read");
    v
}

/// True if the peer closed the connection (EOF or reset) within 10 s.
pub fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Fixed-newstyle handshake up to the option phase: reads the greeting,
/// sends client flags 3 (fixed newstyle, no zeroes).
pub fn newstyle(s: &mut (impl Read + Write)) {
    let g = read_n(s, 18);
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// Sends an option.
pub fn send_option(s: &mut impl Write, option: u32, payload: &[u8]) {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v).unwrap();
}

/// Reads one option reply: (option, type, payload).
pub fn read_option_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    (opt, typ, read_n(s, len as usize))
}

/// GO payload for `name` with no info requests.
pub fn go_payload(name: &[u8]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

/// Negotiates with GO "" (optionally structured replies first), reading
/// replies up to the ACK; returns (size, eflags).
pub fn go(s: &mut (impl Read + Write), structured: bool) -> (u64, u16) {
    newstyle(s);
    if structured {
        send_option(s, 8, b"");
        assert_eq!(read_option_reply(s).1, 1);
    }
    send_option(s, 7, &go_payload(b""));
    let mut info = (0, 0);
    loop {
        let (_, typ, p) = read_option_reply(s);
        match typ {
            3 if p[..2] == [0, 0] => {
                info = (u64::from_be_bytes(p[2..10].try_into().unwrap()), u16::from_be_bytes(p[10..12].try_into().unwrap()))
            }
            3 => {}
            1 => return info,
            t => panic!("GO failed: reply type 0x{t:x}"),
        }
    }
}

/// Sends a compact request header (+ payload).
pub fn send_request(s: &mut impl Write, flags: u16, cmd: u16, cookie: u64, offset: u64, count: u32, payload: &[u8]) {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    v.extend_from_slice(payload);
    s.write_all(&v).unwrap();
}

/// Reads a simple reply: (error, cookie).
pub fn read_simple_reply(s: &mut impl Read) -> (u32, u64) {
    let h = read_n(s, 16);
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "not a simple reply");
    (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
}

/// Reads one structured chunk: (flags, type, cookie, payload).
pub fn read_chunk(s: &mut impl Read) -> (u16, u16, u64, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(&h[..4], &0x668e_33efu32.to_be_bytes(), "not a structured reply");
    let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
    let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    (flags, typ, cookie, read_n(s, len as usize))
}

/// sha256 of a file, via sha256sum.
pub fn sha256(path: &Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()]).split_whitespace().next().unwrap().to_string()
}

/// A server whose stderr goes to `dir/log` (with -v), for tests that read
/// the server's messages; stopped with SIGTERM when dropped.
pub fn start_logged_term(opts: &[&str], args: &[&str]) -> (Term, PathBuf) {
    let dir = TempDir::new("shsrv");
    let sock = dir.path("sock");
    let log = dir.path("log");
    let child = Command::new(nbdkit_bin())
        .args(["--foreground", "-v", "--unix"])
        .arg(&sock)
        .args(opts)
        .args(args)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut srv = Term(Server { child, sock, dir });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&srv.sock).is_err() {
        if let Ok(Some(st)) = srv.child.try_wait() {
            panic!("nbdkit exited early: {st}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "server did not start");
        thread::sleep(Duration::from_millis(10));
    }
    (srv, log)
}

/// A server stopped with SIGTERM at the end of the test (a SIGKILL, as
/// `Server`'s drop sends, would leave the plugin's `$tmpdir` behind).
pub struct Term(pub Server);

impl std::ops::Deref for Term {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl std::ops::DerefMut for Term {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        if self.0.alive() {
            let _ = Command::new("kill").args(["-TERM", &self.0.child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.0.alive() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
