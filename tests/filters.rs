//! The readonly, delay and error filters, seen from real clients (nbdinfo
//! and Python libnbd): what they refuse, how long they make requests take,
//! and the errors they inject — including switching at run time with a
//! trigger file.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Python prelude: `h` connected to `uri`, strict mode off (requests reach
/// the server even if the export says they would fail), and
/// `fails(ERRNO, f, *args)`.
fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!(
        r#"import nbd, os, time
h = nbd.NBD()
h.connect_uri({:?})
h.set_strict_mode(0)
{fails}def took(f, *args):
    t = time.monotonic()
    f(*args)
    return time.monotonic() - t
{body}"#,
        srv.uri(),
        fails = PY_FAILS
    ))
}

// ---- readonly ----

#[test]
fn readonly_filter_makes_the_export_read_only() {
    require!("nbdinfo", "--version");
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("filters");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0x42; 1 << 20]).unwrap();
    let mut srv = Server::start(&["--filter=readonly", "file", img.to_str().unwrap()]);
    let code = |args: &[&str]| run("nbdinfo", args).status.code();
    assert_eq!(code(&["--is", "read-only", &srv.uri()]), Some(0));
    assert_eq!(code(&["--can", "write", &srv.uri()]), Some(2));
    py(
        &srv,
        r#"
assert h.is_read_only()
fails("EPERM", h.pwrite, b"x" * 512, 0)
fails("EPERM", h.trim, 512, 0)
fails("EPERM", h.zero, 512, 0)
assert h.pread(512, 0) == b"\x42" * 512
h.flush()
"#,
    );
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x42), "the file changed");
    srv.health_check();
}

#[test]
fn readonly_file_switches_writes_off_and_on_at_run_time() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("filters");
    let trigger = dir.path("readonly-now");
    let srv = Server::start(&["--filter=readonly", "memory", "1M", &format!("readonly-file={}", trigger.display())]);
    py(
        &srv,
        &format!(
            r#"
T = {:?}
assert not h.is_read_only()   # the export stays writable in this mode
h.pwrite(b"a" * 512, 0)
open(T, "w").close()
fails("EPERM", h.pwrite, b"b" * 512, 0)
fails("EPERM", h.trim, 512, 0)
fails("EPERM", h.zero, 512, 0)
assert h.pread(512, 0) == b"a" * 512
os.unlink(T)
h.pwrite(b"c" * 512, 0)
assert h.pread(512, 0) == b"c" * 512
open(T, "w").close()
fails("EPERM", h.pwrite, b"d" * 512, 0)
assert h.pread(512, 0) == b"c" * 512
"#,
            trigger.display().to_string()
        ),
    );
}

// ---- delay ----

#[test]
fn delay_filter_makes_a_read_take_at_least_rdelay() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=delay", "memory", "1M", "rdelay=200ms"]);
    py(
        &srv,
        r#"
d = took(h.pread, 512, 0)
assert d >= 0.2, d
d = took(lambda: [h.pread(512, i * 4096) for i in range(3)])
assert d >= 0.6, d
"#,
    );
}

#[test]
fn delay_filter_rdelay_leaves_writes_alone() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=delay", "memory", "1M", "rdelay=2s"]);
    // Generous bound: a write is normally well under a millisecond.
    py(
        &srv,
        "d = took(h.pwrite, b'x' * 512, 0)\nassert d < 1.0, d\nd = took(h.flush)\nassert d < 1.0, d",
    );
}

#[test]
fn delay_filter_refuses_fast_zero_when_zeroes_are_delayed() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=delay", "memory", "1M", "delay-zero=1s", "delay-fast-zero=false"]);
    py(
        &srv,
        r#"
assert h.can_fast_zero()
d = took(fails, "ENOTSUP", h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert d < 1.0, "fast zero was delayed: %f" % d
d = took(h.zero, 4096, 0)
assert d >= 1.0, d
"#,
    );
}

// ---- error ----

#[test]
fn error_filter_rate_1_on_pread_gives_eio() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start(&["--filter=error", "memory", "1M", "error-pread-rate=1"]);
    py(
        &srv,
        r#"
for off in (0, 4096, 999999):
    fails("EIO", h.pread, 1, off)
h.pwrite(b"ok", 0)
h.zero(512, 4096)
h.trim(512, 8192)
h.flush()
fails("EIO", h.pread, 2, 0)
"#,
    );
    // Reads fail for every client, but the server is fine.
    assert!(srv.alive());
    let o = nbdsh(&srv, "h.pread(1, 0)");
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
        "{o:?}"
    );
}

#[test]
fn error_filter_chosen_errno() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=error", "memory", "1M", "error=ENOSPC", "error-pwrite-rate=1"]);
    py(&srv, "fails('ENOSPC', h.pwrite, b'x', 0)\nassert h.pread(1, 0) == b'\\0'");
}

#[test]
fn error_file_switches_injection_on_and_off_at_run_time() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("filters");
    let trigger = dir.path("fail-now");
    let srv = Server::start(&[
        "--filter=error",
        "memory",
        "1M",
        "error-rate=1",
        &format!("error-file={}", trigger.display()),
    ]);
    py(
        &srv,
        &format!(
            r#"
T = {:?}
h.pwrite(b"before", 0)
assert h.pread(6, 0) == b"before"
open(T, "w").close()
fails("EIO", h.pread, 6, 0)
fails("EIO", h.pwrite, b"during", 0)
fails("EIO", h.trim, 512, 0)
fails("EIO", h.zero, 512, 0)
h.flush()                   # flush is never injected
os.unlink(T)
assert h.pread(6, 0) == b"before"
h.pwrite(b"after!", 0)
assert h.pread(6, 0) == b"after!"
"#,
            trigger.display().to_string()
        ),
    );
}

#[test]
fn error_rate_0_is_harmless() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=error", "memory", "1M", "error-rate=0", "error=EPERM"]);
    py(
        &srv,
        r#"
for i in range(200):
    h.pwrite(bytes([i]) * 512, i * 512)
    h.zero(1, i * 512 + 511)
for i in range(200):
    assert h.pread(512, i * 512) == bytes([i]) * 511 + b"\0", i
"#,
    );
}

/// Runs `script` (nbdsh, expected to fail) against a server started with
/// `args` and its stderr going to a file; returns that stderr.
fn server_stderr(args: &[&str], script: &str) -> String {
    let dir = TempDir::new("filters");
    let (sock, log) = (dir.path("sock"), dir.path("stderr"));
    let mut child = Command::new(nbdkit_bin())
        .args(["-f", "-U"])
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = run("nbdsh", &["-u", &uri, "-c", script]);
    assert!(!o.status.success(), "{o:?}");
    // Error lines are written before the reply, so they are all in the file.
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn error_filter_logs_each_injected_error_once() {
    require!("nbdsh", "--version");
    let text = server_stderr(&["--filter=error", "memory", "1M", "error-pread-rate=1"], "h.pread(1, 0)");
    // C nbdkit 1.32 prints "nbdkit: memory.1: error: injecting EIO error into pread" once.
    assert_eq!(text.matches("injecting EIO error into pread").count(), 1, "{text}");
}

#[test]
fn request_error_lines_name_the_plugin_and_connection() {
    require!("nbdsh", "--version");
    let script = "for i in range(20):\n    try: h.pread(1, i)\n    except nbd.Error: pass\nh.pread(1, 0)";
    let text = server_stderr(&["--filter=error", "memory", "1M", "error-pread-rate=1"], script);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("error:")).collect();
    assert!(lines.len() >= 21, "{text}");
    // nbdkit 1.44: "nbdkit: NAME[INSTANCE]: error: …" in a connection thread.
    for l in lines {
        assert!(l.starts_with("nbdkit: memory[1]: error: "), "{l:?} in\n{text}");
    }
}

#[test]
fn error_filter_at_50_percent_each_reply_is_its_own() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=error", "memory", "1M", "error-pread-rate=50%"]);
    // 64 reads in flight: each completes with EIO or with its own data,
    // never with another request's, and both outcomes occur.
    py(
        &srv,
        r#"
N = 4096
data = os.urandom(64 * N)
h.pwrite(data, 0)
bufs = [nbd.Buffer(N) for _ in range(64)]
errs = {}
def done(i):
    def cb(err):
        errs[i] = err.value
        return 1
    return cb
for i in range(64):
    h.aio_pread(bufs[i], i * N, done(i))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert sorted(errs) == list(range(64))
for i, e in errs.items():
    if e == 0:
        assert bufs[i].to_bytearray() == data[i * N:(i + 1) * N], i
    else:
        assert e == 5, (i, e)  # EIO
failed = sum(1 for e in errs.values() if e)
assert 0 < failed < 64, failed
"#,
    );
}
