//! TLS: X.509 (rustls) and PSK, STARTTLS, and the transmission phase over
//! TLS, with real clients (nbdinfo, nbdcopy, nbdsh, qemu-img) over Unix
//! sockets and TCP, and the hostile cases S01–S17 of bad-input.md. The
//! keys are made by certtool and psktool in each test.

mod common;
use common::*;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs certtool with a template; panics on failure.
fn certtool(args: &[&str], template: Option<(&Path, &str)>, out: &Path) {
    if let Some((t, text)) = template {
        std::fs::write(t, text).unwrap();
    }
    let o = Command::new("certtool").args(args).output().expect("certtool");
    assert!(o.status.success(), "certtool {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(out, &o.stdout).unwrap();
}

/// A certificates directory as nbdkit and libnbd want it: `ca-cert.pem`,
/// `server-cert.pem`/`server-key.pem` for localhost and 127.0.0.1, and
/// `client-cert.pem`/`client-key.pem`, all from a fresh CA.
fn make_pki(dir: &Path) {
    require_tools();
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n);
    let key = |n: &str| certtool(&["--generate-privkey", "--bits=2048"], None, &p(n));
    key("ca-key.pem");
    certtool(
        &["--generate-self-signed", "--load-privkey", s(&p("ca-key.pem")), "--template", s(&p("ca.info"))],
        Some((&p("ca.info"), "cn = Test CA\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 3650\n")),
        &p("ca-cert.pem"),
    );
    for (who, extra) in [("server", "dns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n"), ("client", "tls_www_client\n")] {
        key(&format!("{who}-key.pem"));
        let info = p(&format!("{who}.info"));
        certtool(
            &[
                "--generate-certificate",
                "--load-ca-certificate", s(&p("ca-cert.pem")),
                "--load-ca-privkey", s(&p("ca-key.pem")),
                "--load-privkey", s(&p(&format!("{who}-key.pem"))),
                "--template", s(&info),
            ],
            Some((&info, &format!("organization = Test\ncn = {who}\n{extra}encryption_key\nsigning_key\nexpiration_days = 3650\n"))),
            &p(&format!("{who}-cert.pem")),
        );
    }
}

fn require_tools() {
    for t in ["certtool", "psktool"] {
        if !available(t, &["--version"]) {
            panic!("{t} (gnutls-bin) is required");
        }
    }
}

/// The URI of a TLS server on a Unix socket, with libnbd's certificates.
fn tls_uri(srv: &Server, pki: &Path) -> String {
    format!("nbds+unix:///?socket={}&tls-certificates={}", srv.sock.display(), pki.display())
}

/// Runs a libnbd script connected to `uri` (nbdsh -u refuses URIs that
/// name local files such as tls-certificates=).
fn nbdsh_uri(uri: &str, script: &str) -> std::process::Output {
    let full = format!("h.set_uri_allow_local_file(True)\nh.add_meta_context('base:allocation')\nh.connect_uri({uri:?})\n{script}");
    run("nbdsh", &["-c", &full])
}

fn nbdsh_uri_ok(uri: &str, script: &str) -> String {
    let o = nbdsh_uri(uri, script);
    assert!(o.status.success(), "nbdsh {uri}: {script}\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The health check of bad-input.md over TLS: a fresh client negotiates
/// with TLS and reads 512 bytes.
fn tls_health_check(srv: &mut Server, uri: &str) {
    assert!(srv.alive(), "server died");
    let o = nbdsh_uri(uri, "assert h.get_tls_negotiated()\nassert len(h.pread(512, 0)) == 512");
    assert!(o.status.success(), "TLS health check failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(srv.alive(), "server died");
}

/// A free TCP port on 127.0.0.1 (bound and released; the server binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server on TCP 127.0.0.1:port, killed on drop.
struct TcpServer {
    child: Child,
    port: u16,
}

impl TcpServer {
    fn start(opts: &[&str]) -> TcpServer {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(nbdkit_bin())
                .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
                .args(opts)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TcpServer { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                assert!(Instant::now() < deadline, "server did not listen");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("could not start a TCP server");
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nbdkit's output (stderr) and status for a command line that must fail.
fn start_fails(args: &[&str]) -> String {
    let o = Command::new(nbdkit_bin()).args(["-f", "-U", "-"]).args(args).stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{args:?} should exit 1: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn x509_unix_nbdinfo_and_plaintext_refused() {
    let d = TempDir::new("tls-x509");
    let pki = d.path("pki");
    make_pki(&pki);
    let mut srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["memory", "1M"]);
    let uri = tls_uri(&srv, &pki);
    let out = run_ok("nbdinfo", &[&uri]);
    assert!(out.contains("with TLS"), "{out}");
    // S01: a plaintext client gets TLS_REQD for everything but STARTTLS and ABORT.
    let o = run("nbdinfo", &[&srv.uri()]);
    assert!(!o.status.success());
    let o = run("nbdinfo", &["--list", &srv.uri()]);
    assert!(!o.status.success());
    tls_health_check(&mut srv, &uri);
}

#[test]
fn x509_tcp_client_verifies_the_server() {
    let d = TempDir::new("tls-tcp");
    let (pki, other) = (d.path("pki"), d.path("other"));
    make_pki(&pki);
    make_pki(&other);
    let srv = TcpServer::start(&["--tls=require", "--tls-certificates", s(&pki), "memory", "1M"]);
    let uri = format!("nbds://localhost:{}/?tls-certificates={}", srv.port, pki.display());
    let out = nbdsh_uri_ok(&uri, "h.pwrite(b'x' * 512, 0); print(h.pread(1, 0))");
    assert!(out.contains("b'x'"), "{out}");
    let ip = format!("nbds://127.0.0.1:{}/?tls-certificates={}", srv.port, pki.display());
    run_ok("nbdinfo", &[&ip]);
    // S11: a client checking the server against another CA refuses it.
    let wrong = format!("nbds://localhost:{}/?tls-certificates={}", srv.port, other.display());
    let o = run("nbdinfo", &[&wrong]);
    assert!(!o.status.success(), "a client trusting another CA connected");
    run_ok("nbdinfo", &[&uri]);
    // Big WRITEs and READs over TLS on TCP (the low-mark path is off).
    let src = pki.join("big.img");
    std::fs::write(&src, (0..8u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let fill = format!("nbds://localhost:{}/?tls-certificates={}", srv.port, pki.display());
    let big = TcpServer::start(&["--tls=require", "--tls-certificates", s(&pki), "memory", "8M"]);
    let big_uri = fill.replace(&srv.port.to_string(), &big.port.to_string());
    run_ok("nbdcopy", &[s(&src), &big_uri]);
    let back = pki.join("back.img");
    run_ok("nbdcopy", &[&big_uri, s(&back)]);
    assert_eq!(sha256(&src), sha256(&back));
}

#[test]
fn single_mode_over_tls() {
    let d = TempDir::new("tls-single");
    let pki = d.path("pki");
    make_pki(&pki);
    let out = python_ok(&format!(
        r#"
import nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates({pki:?})
h.set_tls_verify_peer(False)
h.connect_command([{bin:?}, '-s', '--tls=require', '--tls-certificates={pki}', 'memory', '1M'])
h.pwrite(b'a' * 100000, 0)
assert h.pread(100000, 0) == b'a' * 100000
print('ok', h.get_tls_negotiated())
"#,
        pki = s(&pki),
        bin = nbdkit_bin().display().to_string(),
    ));
    assert!(out.contains("ok True"), "{out}");
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients() {
    let d = TempDir::new("tls-on");
    let pki = d.path("pki");
    make_pki(&pki);
    let mut srv = Server::start_with(&["--tls=on", "--tls-certificates", s(&pki)], &["memory", "1M"]);
    let plain = run_ok("nbdinfo", &[&srv.uri()]);
    assert!(plain.contains("without TLS"), "{plain}");
    let uri = tls_uri(&srv, &pki);
    let tls = run_ok("nbdinfo", &[&uri]);
    assert!(tls.contains("with TLS"), "{tls}");
    // At once: a TLS client writes, a plaintext one reads it back.
    let tls_client = Command::new("nbdsh")
        .env("PATH", path_env())
        .args(["-c", &format!("h.set_uri_allow_local_file(True)\nh.connect_uri({uri:?})\nimport time\nh.pwrite(b'T' * 4096, 0)\nh.flush()\nfor i in range(400):\n    if h.pread(1, 4096) == b'P': break\n    time.sleep(0.05)\nassert h.pread(1, 4096) == b'P'")])
        .spawn()
        .unwrap();
    // The plaintext client waits for the TLS client's write, then answers.
    nbdsh_ok(
        &srv,
        "import time\nfor i in range(400):\n    if h.pread(4096, 0) == b'T' * 4096: break\n    time.sleep(0.05)\nassert h.pread(4096, 0) == b'T' * 4096\nh.pwrite(b'P' * 512, 4096)",
    );
    let st = tls_client.wait_with_output().unwrap();
    assert!(st.status.success());
    srv.health_check();
    tls_health_check(&mut srv, &uri);
}

/// Every command over TLS, structured replies, block status, many
/// requests in flight answered out of order, and big READs and WRITEs.
#[test]
fn nbdsh_every_command_over_tls() {
    let d = TempDir::new("tls-cmds");
    let pki = d.path("pki");
    make_pki(&pki);
    let mut srv = Server::start_with(
        &["--tls=require", "--tls-certificates", s(&pki)],
        &["--filter=delay", "memory", "64M", "rdelay=1ms", "delay-write=1ms"],
    );
    let uri = tls_uri(&srv, &pki);
    let script = r#"
assert h.get_tls_negotiated()
assert h.get_structured_replies_negotiated()
big = bytes(range(256)) * (32 * 1024 * 4)  # 32 MiB
h.pwrite(big, 1 << 20)
assert h.pread(len(big), 1 << 20) == big
h.pwrite(b'\x01' * 65536, 0, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(4096, 0)
assert h.pread(4096, 0) == b'\0' * 4096
h.zero(4096, 8192)
h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE) if h.can_fast_zero() else None
h.cache(65536, 0)
seen = []
def ext(meta, off, entries, err):
    seen.append((meta, entries))
    return 0
h.block_status(1 << 20, 0, ext)
assert seen and seen[0][0] == 'base:allocation', seen
# many requests in flight, replies in completion order (delays vary)
bufs = []
for i in range(64):
    b = nbd.Buffer(4096)
    h.aio_pread(b, (1 << 20) + i * 4096)
    bufs.append(b)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b in enumerate(bufs):
    assert b.to_bytearray() == big[i * 4096:(i + 1) * 4096], i
# reads with DF off and on a hole
assert h.pread(512, 60 << 20) == b'\0' * 512
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, status))
    return 0
h.pread_structured(4096, 1 << 20, chunk)
assert chunks == [((1 << 20), nbd.READ_DATA)], chunks
try:
    h.pread(512, 64 << 20)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == 'EINVAL', e.errno
print('ok')
"#;
    let out = nbdsh_uri_ok(&uri, script);
    assert!(out.contains("ok"), "{out}");
    tls_health_check(&mut srv, &uri);
}

#[test]
fn nbdcopy_round_trip_over_tls_multi_conn() {
    let d = TempDir::new("tls-copy");
    let pki = d.path("pki");
    make_pki(&pki);
    let src = d.path("src.img");
    let out = d.path("out.img");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut r = std::fs::File::open("/dev/urandom").unwrap().take(64 << 20);
        std::io::copy(&mut r, &mut f).unwrap();
    }
    let srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["memory", "64M"]);
    let uri = tls_uri(&srv, &pki);
    run_ok("nbdcopy", &["--connections=4", s(&src), &uri]);
    run_ok("nbdcopy", &["--connections=4", &uri, s(&out)]);
    assert_eq!(sha256(&src), sha256(&out));
    // And through a filter and the file plugin (the copying paths).
    let file = d.path("file.img");
    std::fs::File::create(&file).unwrap().set_len(64 << 20).unwrap();
    let srv2 = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["file", s(&file)]);
    let uri2 = tls_uri(&srv2, &pki);
    run_ok("nbdcopy", &[s(&src), &uri2]);
    run_ok("nbdcopy", &[&uri2, s(&out)]);
    assert_eq!(sha256(&src), sha256(&out));
}

#[test]
fn qemu_img_with_tls_creds_x509() {
    require!("qemu-img", "--version");
    let d = TempDir::new("tls-qemu");
    let pki = d.path("pki");
    make_pki(&pki);
    let srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["memory", "8M"]);
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display());
    let img = format!("driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost", srv.sock.display());
    let out = run_ok("qemu-img", &["info", "--object", &obj, "--image-opts", &img]);
    assert!(out.contains("8 MiB"), "{out}");
    let src = d.path("src.raw");
    std::fs::write(&src, vec![0x5au8; 1 << 20]).unwrap();
    run_ok("qemu-img", &["convert", "-n", "--object", &obj, "-f", "raw", s(&src), "--target-image-opts", &img]);
    let back = d.path("back.raw");
    run_ok("qemu-img", &["convert", "--object", &obj, "--image-opts", &img, "-O", "raw", s(&back)]);
    let got = std::fs::read(&back).unwrap();
    assert!(got[..1 << 20].iter().all(|&b| b == 0x5a) && got[1 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn verify_peer_accepts_the_right_client_only() {
    let d = TempDir::new("tls-peer");
    let (pki, other) = (d.path("pki"), d.path("other"));
    make_pki(&pki);
    make_pki(&other);
    let mut srv =
        Server::start_with(&["--tls=require", "--tls-verify-peer", "--tls-certificates", s(&pki), "-D", "nbdkit.tls.session=1", "-v"], &["memory", "1M"]);
    let uri = tls_uri(&srv, &pki);
    run_ok("nbdinfo", &[&uri]);
    // S10: no client certificate.
    let none = d.path("none");
    std::fs::create_dir_all(&none).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), none.join("ca-cert.pem")).unwrap();
    let o = run("nbdinfo", &[&format!("nbds+unix:///?socket={}&tls-certificates={}", srv.sock.display(), none.display())]);
    assert!(!o.status.success(), "a client without a certificate connected");
    // S10: a client certificate from another CA.
    let foreign = d.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    std::fs::copy(other.join("client-cert.pem"), foreign.join("client-cert.pem")).unwrap();
    std::fs::copy(other.join("client-key.pem"), foreign.join("client-key.pem")).unwrap();
    let o = run("nbdinfo", &[&format!("nbds+unix:///?socket={}&tls-certificates={}", srv.sock.display(), foreign.display())]);
    assert!(!o.status.success(), "a client certified by another CA connected");
    tls_health_check(&mut srv, &uri);
}

#[test]
fn revoked_client_certificate_is_refused() {
    let d = TempDir::new("tls-crl");
    let pki = d.path("pki");
    make_pki(&pki);
    let p = |n: &str| pki.join(n);
    certtool(
        &[
            "--generate-crl",
            "--load-ca-privkey", s(&p("ca-key.pem")),
            "--load-ca-certificate", s(&p("ca-cert.pem")),
            "--load-certificate", s(&p("client-cert.pem")),
            "--template", s(&p("crl.info")),
        ],
        Some((&p("crl.info"), "crl_next_update = 365\ncrl_number = 1\n")),
        &p("ca-crl.pem"),
    );
    let mut srv = Server::start_with(&["--tls=require", "--tls-verify-peer", "--tls-certificates", s(&pki)], &["memory", "1M"]);
    let o = run("nbdinfo", &[&tls_uri(&srv, &pki)]);
    assert!(!o.status.success(), "a revoked client certificate was accepted");
    assert!(srv.alive());
}

#[test]
fn run_and_print_uri_give_nbds_uris() {
    let d = TempDir::new("tls-run");
    let pki = d.path("pki");
    make_pki(&pki);
    let o = Command::new(nbdkit_bin())
        .args(["-U", "-", "--tls=require", "--tls-certificates", s(&pki), "--run"])
        .arg("echo \"uri=$uri\"; echo \"tls=$tls\"; echo \"certs=$tls_certificates\"; echo \"psk=$tls_psk\"; nbdinfo \"$uri\" >/dev/null && echo connected")
        .args(["memory", "1M"])
        .env("PATH", path_env())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out} {}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("uri=nbds+unix://?socket="), "{out}");
    assert!(out.contains(&format!("&tls-certificates={}\n", pki.display())), "{out}");
    assert!(out.contains("tls=2\n") && out.contains(&format!("certs={}\n", pki.display())) && out.contains("psk=\n"), "{out}");
    assert!(out.contains("connected"), "{out}");
}

#[test]
fn bad_certificates_at_start_up() {
    let d = TempDir::new("tls-bad");
    let pki = d.path("pki");
    make_pki(&pki);
    // Nothing to load: --tls=require fails with nbdkit's message.
    let empty = d.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = start_fails(&["--tls=require", "--tls-certificates", s(&empty), "null"]);
    assert!(e.starts_with("nbdkit: --tls=require but could not load TLS certificates.\n"), "{e}");
    // A missing file (S17).
    let partial = d.path("partial");
    std::fs::create_dir_all(&partial).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.join(f), partial.join(f)).unwrap();
    }
    let e = start_fails(&["--tls=require", "--tls-certificates", s(&partial), "null"]);
    assert!(e.contains("could not load TLS certificates"), "{e}");
    // A malformed key or certificate: one clear line, whatever --tls says.
    for (f, tls) in [("server-key.pem", "--tls=require"), ("server-cert.pem", "--tls=on")] {
        let bad = d.path(&format!("bad-{f}"));
        std::fs::create_dir_all(&bad).unwrap();
        for g in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(pki.join(g), bad.join(g)).unwrap();
        }
        std::fs::write(bad.join(f), "garbage\n").unwrap();
        let e = start_fails(&[tls, "--tls-certificates", s(&bad), "null"]);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.starts_with("nbdkit: TLS error: loading server certificate and key ("), "{e}");
        assert!(e.contains(f), "{e}");
    }
    // A key that belongs to another certificate.
    let other = d.path("other");
    make_pki(&other);
    let mixed = d.path("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    std::fs::copy(pki.join("server-cert.pem"), mixed.join("server-cert.pem")).unwrap();
    std::fs::copy(other.join("server-key.pem"), mixed.join("server-key.pem")).unwrap();
    let e = start_fails(&["--tls=require", "--tls-certificates", s(&mixed), "null"]);
    assert!(e.starts_with("nbdkit: TLS error: "), "{e}");
    // --tls=on without certificates: a warning, and plaintext is served.
    let mut srv = Server::start_with(&["--tls=on", "--tls-certificates", s(&empty)], &["memory", "1M"]);
    srv.health_check();
    // A missing PSK file, a PSK file with bad hex or a long line (S17).
    let e = start_fails(&["--tls-psk", s(&d.path("nokeys")), "null"]);
    assert_eq!(e, format!("{}: No such file or directory\n", d.path("nokeys").display()));
    for (text, why) in [("alice:zz\n", "line 1: key is not"), (&format!("bob:{}\n", "0".repeat(4096)) as &str, "line 1: line too long")] {
        let f = d.path("bad.psk");
        std::fs::write(&f, text).unwrap();
        let e = start_fails(&["--tls=require", "--tls-psk", s(&f), "null"]);
        assert!(e.starts_with(&format!("nbdkit: {}: {why}", f.display())), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

/// Python: a raw newstyle client for the STARTTLS cases, with the ssl
/// module for the upgrade.
const PY_RAW: &str = r#"
import socket, ssl, struct, sys, time
NBDMAGIC = b'NBDMAGIC'; IHAVEOPT = 0x49484156454F5054
ACK, TLS_REQD, INVALID, POLICY = 1, 0x80000005, 0x80000003, 0x80000002
STARTTLS, LIST, INFO, GO, SR, SETMETA, ABORT = 5, 3, 6, 7, 8, 10, 2
def conn(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(path)
    g = rd(s, 18); assert g[:8] == NBDMAGIC
    s.sendall(struct.pack('>I', 3)); return s
def rd(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError
        b += c
    return b
def opt(s, o, payload=b''):
    s.sendall(struct.pack('>QII', IHAVEOPT, o, len(payload)) + payload)
def reply(s):
    m, o, t, n = struct.unpack('>QIII', rd(s, 20)); return o, t, rd(s, n)
def final(s):
    while True:
        o, t, p = reply(s)
        if t != 3 and t != 4: return t
def go(s, o=GO):
    opt(s, o, struct.pack('>I', 0) + struct.pack('>H', 0)); return final(s)
def upgrade(s, ca):
    opt(s, STARTTLS); o, t, p = reply(s); assert t == ACK, hex(t)
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.load_verify_locations(ca)
    return c.wrap_socket(s)
def closed(s):
    # Anything the server still sends (a TLS alert) is drained: the
    # connection must then end.
    try:
        while s.recv(4096) != b'':
            pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True
"#;

fn python(script: &str) -> String {
    python_ok(&format!("{PY_RAW}\n{script}"))
}

#[test]
fn starttls_rules_s01_to_s07() {
    let d = TempDir::new("tls-starttls");
    let pki = d.path("pki");
    make_pki(&pki);
    let mut srv = Server::start_with(
        &["--tls=require", "--tls-certificates", s(&pki), "--timeout", "2"],
        &["memory", "1M"],
    );
    let (sock, ca) = (srv.sock.display().to_string(), pki.join("ca-cert.pem").display().to_string());
    let out = python(&format!(
        r#"
P, CA = '{sock}', '{ca}'
# S01: before STARTTLS everything but STARTTLS and ABORT is TLS_REQD.
s = conn(P)
opt(s, LIST); assert final(s) == TLS_REQD
opt(s, SR); assert final(s) == TLS_REQD
assert go(s, INFO) == TLS_REQD
assert go(s) == TLS_REQD
opt(s, ABORT); assert reply(s)[1] == ACK
# S02: INFO with a 100-byte payload, LIST, then STARTTLS, then GO.
s = conn(P)
opt(s, INFO, b'x' * 100); assert final(s) == TLS_REQD
opt(s, LIST); assert final(s) == TLS_REQD
t = upgrade(s, CA)
assert go(t) == ACK
# S03: structured replies and a meta context before STARTTLS are forgotten.
from_plain = struct.pack('>I', 0) + struct.pack('>I', 1) + struct.pack('>I', 15) + b'base:allocation'
srv2 = None
s = conn(P)
opt(s, SR); assert final(s) == TLS_REQD  # refused anyway in require mode
t = upgrade(s, CA)
assert go(t) == ACK
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, 7, 0, 512))   # READ
m, err, cookie = struct.unpack('>IIQ', rd(t, 16))
assert m == 0x67446698 and err == 0 and cookie == 7, hex(m)   # a simple reply
rd(t, 512)
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 7, 8, 0, 512))   # BLOCK_STATUS
m, err, cookie = struct.unpack('>IIQ', rd(t, 16))
assert m == 0x67446698 and err == 22 and cookie == 8, (hex(m), err)
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 2, 9, 0, 0))   # DISC
# S04: STARTTLS twice; S05: STARTTLS with a payload.
s = conn(P)
opt(s, STARTTLS, b'xyz'); assert final(s) == INVALID
t = upgrade(s, CA)
opt(t, STARTTLS); assert final(t) == INVALID
assert go(t) == ACK
# S13: a client without fixed newstyle is dropped.
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(P); rd(s, 18)
s.sendall(struct.pack('>I', 0)); opt(s, 1, b'')
assert closed(s)
# S06: garbage after STARTTLS.
s = conn(P); opt(s, STARTTLS); assert reply(s)[1] == ACK
s.sendall(b'GET / HTTP/1.0\r\n\r\n' * 10)
assert closed(s)
# S07: silence after STARTTLS: dropped at the handshake timeout (2 s).
s = conn(P); opt(s, STARTTLS); assert reply(s)[1] == ACK
t0 = time.time(); assert closed(s); took = time.time() - t0
assert 0.3 < took < 15, took
# S12: TLS 1.0 and 1.1 are refused.
for v in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
    s = conn(P); opt(s, STARTTLS); assert reply(s)[1] == ACK
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.load_verify_locations(CA)
    c.set_ciphers('DEFAULT@SECLEVEL=0'); c.minimum_version = v; c.maximum_version = v
    try:
        c.wrap_socket(s)
        raise AssertionError("TLS version %s accepted" % v)
    except (ssl.SSLError, ConnectionError):
        pass
# S16: records written a byte at a time (TLS 1.2: bytes of each record).
s = conn(P)
t = upgrade(s, CA)
raw = struct.pack('>QII', IHAVEOPT, GO, 6) + struct.pack('>I', 0) + struct.pack('>H', 0)
for b in raw:
    t.sendall(bytes([b]))
assert final(t) == ACK
# S16: a whole TLS session whose bytes reach the server one at a time.
s = conn(P); opt(s, STARTTLS); assert reply(s)[1] == ACK
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.load_verify_locations(CA)
inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
o = c.wrap_bio(inc, outg)
def pump():
    data = outg.read()
    for b in data:
        s.sendall(bytes([b]))
while True:
    try:
        o.do_handshake(); break
    except ssl.SSLWantReadError:
        pump(); inc.write(s.recv(65536))
pump()
o.write(struct.pack('>QII', IHAVEOPT, GO, 6) + struct.pack('>I', 0) + struct.pack('>H', 0))
pump()
got, done = b'', False
while not done:
    try:
        got += o.read(65536)
    except ssl.SSLWantReadError:
        inc.write(s.recv(65536)); continue
    while len(got) >= 20 and len(got) >= 20 + struct.unpack('>I', got[16:20])[0]:
        typ = struct.unpack('>I', got[12:16])[0]
        assert typ in (ACK, 3), hex(typ)
        done = done or typ == ACK
        got = got[20 + struct.unpack('>I', got[16:20])[0]:]
print('ok')
"#
    ));
    assert!(out.contains("ok"), "{out}");
    let uri = tls_uri(&srv, &pki);
    tls_health_check(&mut srv, &uri);
}

#[test]
fn starttls_refused_when_off_and_reset_when_on() {
    let d = TempDir::new("tls-off");
    let pki = d.path("pki");
    make_pki(&pki);
    let srv = Server::start_with(&["--tls=off"], &["memory", "1M"]);
    let sock = srv.sock.display().to_string();
    python(&format!(
        r#"
s = conn('{sock}')
opt(s, STARTTLS); assert final(s) == POLICY
assert go(s) == ACK
"#
    ));
    // --tls=on: SR and a meta context negotiated in plaintext do not
    // survive the upgrade (CVE-2021-3716).
    let mut on = Server::start_with(&["--tls=on", "--tls-certificates", s(&pki)], &["memory", "1M"]);
    let (sock, ca) = (on.sock.display().to_string(), pki.join("ca-cert.pem").display().to_string());
    python(&format!(
        r#"
s = conn('{sock}')
opt(s, SR); assert final(s) == ACK
meta = struct.pack('>I', 0) + struct.pack('>I', 1) + struct.pack('>I', 15) + b'base:allocation'
opt(s, SETMETA, meta); assert final(s) == ACK
t = upgrade(s, '{ca}')
assert go(t) == ACK
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, 7, 0, 512))
m, err, cookie = struct.unpack('>IIQ', rd(t, 16))
assert m == 0x67446698 and err == 0, hex(m)   # simple, not structured
rd(t, 512)
t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 7, 8, 0, 512))
m, err, cookie = struct.unpack('>IIQ', rd(t, 16))
assert err == 22, err   # no block status without SR and the context
"#
    ));
    on.health_check();
    let uri = tls_uri(&on, &pki);
    tls_health_check(&mut on, &uri);
}

/// S14: clients that die in the middle of TLS records, or without
/// close_notify, while requests are in flight.
#[test]
fn client_death_mid_record() {
    let d = TempDir::new("tls-death");
    let pki = d.path("pki");
    make_pki(&pki);
    let mut srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["memory", "16M"]);
    let (sock, ca) = (srv.sock.display().to_string(), pki.join("ca-cert.pem").display().to_string());
    python(&format!(
        r#"
for i in range(5):
    s = conn('{sock}')
    t = upgrade(s, '{ca}')
    assert go(t) == ACK
    # a big WRITE cut off in the middle of its payload
    t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 1, 1, 0, 1 << 20) + b'x' * 100000)
    s2 = socket.socket(fileno=t.detach())
    s2.sendall(b'\x17\x03\x03\x40\x00' + b'z' * 100)   # half a record
    s2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    s2.close()   # RST
"#
    ));
    let uri = tls_uri(&srv, &pki);
    tls_health_check(&mut srv, &uri);
    // The write was cut off: nothing of it reached the disk.
    let o = nbdsh_uri_ok(&tls_uri(&srv, &pki), "print(h.pread(4, 0))");
    assert!(o.contains("b'\\x00\\x00\\x00\\x00'"), "{o}");
}

#[test]
fn tls_with_psk() {
    let d = TempDir::new("tls-psk");
    let keys = d.path("keys.psk");
    let o = Command::new("psktool").args(["-u", "alice", "-p", s(&keys)]).output().unwrap();
    assert!(o.status.success());
    let mut srv = Server::start_with(&["--tls=require", "--tls-psk", s(&keys)], &["memory", "8M"]);
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", srv.sock.display(), keys.display());
    let out = run_ok("nbdinfo", &[&uri]);
    assert!(out.contains("with TLS"), "{out}");
    nbdsh_uri_ok(&uri, "h.pwrite(b'k' * 65536, 0); assert h.pread(65536, 0) == b'k' * 65536");
    // qemu-img with tls-creds-psk (the key file is named keys.psk in a directory).
    if available("qemu-img", &["--version"]) {
        let obj = format!("tls-creds-psk,id=tls0,dir={},endpoint=client,username=alice", d.0.display());
        let img = format!("driver=nbd,path={},tls-creds=tls0", srv.sock.display());
        let info = run_ok("qemu-img", &["info", "--object", &obj, "--image-opts", &img]);
        assert!(info.contains("8 MiB"), "{info}");
    } else {
        require!("qemu-img", "--version");
    }
    // S08: a wrong key; S09: a user the server does not know.
    let wrong = d.path("wrong.psk");
    Command::new("psktool").args(["-u", "alice", "-p", s(&wrong)]).output().unwrap();
    let o = run("nbdinfo", &[&format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", srv.sock.display(), wrong.display())]);
    assert!(!o.status.success(), "a wrong key connected");
    let mallory = d.path("mallory.psk");
    Command::new("psktool").args(["-u", "mallory", "-p", s(&mallory)]).output().unwrap();
    let o = run("nbdinfo", &[&format!("nbds+unix://mallory@/?socket={}&tls-psk-file={}", srv.sock.display(), mallory.display())]);
    assert!(!o.status.success(), "an unknown user connected");
    tls_health_check(&mut srv, &uri);
}

#[test]
fn run_gives_the_psk_uri() {
    let d = TempDir::new("tls-run-psk");
    let keys = d.path("keys.psk");
    // The URI names no user (as nbdkit 1.44's); the client adds ours.
    let me = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let o = Command::new("psktool").args(["-u", me.trim(), "-p", s(&keys)]).output().unwrap();
    assert!(o.status.success());
    let o = Command::new(nbdkit_bin())
        .args(["-U", "-", "--tls=require", "--tls-psk", s(&keys), "--run"])
        // (libnbd takes the user from getlogin(), which needs a terminal.)
        .arg(format!(
            "echo \"uri=$uri\"; echo \"psk=$tls_psk\"; nbdinfo \"$(echo \"$uri\" | sed 's|://|://{}@/|')\" | grep -c 'with TLS'",
            me.trim()
        ))
        .args(["memory", "1M"])
        .env("PATH", path_env())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out} {}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains(&format!("&tls-psk-file={}\n", keys.display())) && out.starts_with("uri=nbds+unix://"), "{out}");
    assert!(out.contains(&format!("psk={}\n", keys.display())) && out.ends_with("1\n"), "{out}");
}

#[test]
fn psk_nbdcopy_round_trip() {
    let d = TempDir::new("tls-psk-copy");
    let keys = d.path("keys.psk");
    Command::new("psktool").args(["-u", "alice", "-p", s(&keys)]).output().unwrap();
    let src = d.path("src.img");
    let out = d.path("out.img");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut r = std::fs::File::open("/dev/urandom").unwrap().take(32 << 20);
        std::io::copy(&mut r, &mut f).unwrap();
    }
    let (srv, log) = start_logged_term(&["--tls=require", "--tls-psk", s(&keys), "-D", "nbdkit.tls.session=1"], &["memory", "32M"]);
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", srv.sock.display(), keys.display());
    run_ok("nbdcopy", &[s(&src), &uri]);
    run_ok("nbdcopy", &[&uri, s(&out)]);
    assert_eq!(sha256(&src), sha256(&out));
    // Every connection (nbdcopy opens several) was TLS 1.3 with ECDHE.
    let text = std::fs::read_to_string(&log).unwrap();
    let sessions = text.matches("debug: TLS session: ").count();
    assert!(sessions >= 2, "{text}");
    assert_eq!(text.matches("debug: TLS session: (TLS1.3)--(AES-128-GCM)\n").count(), sessions, "{text}");
    assert_eq!(text.matches("debug: TLS: PSK key exchange: psk_dhe_ke (ECDHE)\n").count(), sessions, "{text}");
}

// ---------------------------------------------------------------------------
// PSK over TLS 1.3 (psk_dhe_ke), the TLS 1.2 fallback, -D nbdkit.tls.log.

/// A psktool key file for `user` in `d`, and the key in hex.
fn psk_keys(d: &TempDir, user: &str) -> (std::path::PathBuf, String) {
    require_tools();
    let keys = d.path("keys.psk");
    let o = Command::new("psktool").args(["-u", user, "-p", s(&keys)]).output().unwrap();
    assert!(o.status.success(), "psktool: {}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&keys).unwrap();
    let hex = text.trim().split_once(':').unwrap().1.to_string();
    (keys, hex)
}

/// The server's log once it has `what` in it `n` times (10 s at most).
fn wait_for_log(log: &Path, what: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= n || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn psk_clients_negotiate_tls13_with_forward_secrecy() {
    let d = TempDir::new("psk13");
    let (keys, _) = psk_keys(&d, "alice");
    let (srv, log) = start_logged_term(&["--tls=require", "--tls-psk", s(&keys), "-D", "nbdkit.tls.session=1"], &["memory", "8M"]);
    let uri = format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", srv.sock.display(), keys.display());
    let out = run_ok("nbdinfo", &[&uri]);
    assert!(out.contains("with TLS"), "{out}");
    nbdsh_uri_ok(
        &uri,
        "h.pwrite(b'k' * 200000, 0)\nassert h.pread(200000, 0) == b'k' * 200000\nh.flush()\nh.zero(4096, 0)\nassert h.pread(4096, 0) == bytes(4096)",
    );
    let mut clients = 2;
    if available("qemu-img", &["--version"]) {
        let obj = format!("tls-creds-psk,id=tls0,dir={},endpoint=client,username=alice", d.0.display());
        let img = format!("driver=nbd,path={},tls-creds=tls0", srv.sock.display());
        let info = run_ok("qemu-img", &["info", "--object", &obj, "--image-opts", &img]);
        assert!(info.contains("8 MiB"), "{info}");
        clients += 1;
    } else {
        require!("qemu-img", "--version");
    }
    // GnuTLS nbdkit's lines, and the key exchange mode: libnbd and qemu
    // (GnuTLS) send an X25519 share, so no HelloRetryRequest.
    let text = wait_for_log(&log, "debug: TLS: PSK key exchange: ", clients);
    for (line, n) in [
        ("debug: TLS session: (TLS1.3)--(AES-128-GCM)\n", clients),
        ("debug: TLS: authentication: PSK (Pre-Shared Key)\n", clients),
        ("debug: TLS: PSK username: alice\n", clients),
        ("debug: TLS: negotiated group: X25519\n", clients),
        ("debug: TLS: PSK key exchange: psk_dhe_ke (ECDHE)\n", clients),
        ("debug: TLS session: ", clients),
    ] {
        assert_eq!(text.matches(line).count(), n, "{line}: {text}");
    }
    assert!(!text.contains("HelloRetryRequest"), "{text}");
}

/// Drives gnutls-cli through NBD's STARTTLS (`--starttls`: plaintext until
/// SIGALRM): the greeting, client flags and NBD_OPT_STARTTLS in the clear,
/// then the handshake, then NBD_OPT_LIST over TLS. Prints "listed" on
/// success. Arguments: port, user, hex key, priority, log file.
const GNUTLS_NBD: &str = r#"
import os, select, signal, struct, subprocess, sys, time
port, user, key, prio, logfile = sys.argv[1:6]
p = subprocess.Popen(['gnutls-cli', '--starttls', '--logfile', logfile, '-p', port, '--pskusername', user,
                      '--pskkey', key, '--priority', prio, '127.0.0.1'],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
def readn(n):
    buf = b''
    deadline = time.time() + 20
    while len(buf) < n:
        r, _, _ = select.select([p.stdout], [], [], max(0, deadline - time.time()))
        if not r:
            sys.exit('timeout after %r' % buf)
        b = os.read(p.stdout.fileno(), n - len(buf))
        if not b:
            sys.exit('EOF after %r' % buf)
        buf += b
    return buf
def send(b):
    p.stdin.write(b)
    p.stdin.flush()
try:
    g = readn(18)
    assert g[:16] == b'NBDMAGICIHAVEOPT', g
    send(struct.pack('>I', 3) + b'IHAVEOPT' + struct.pack('>II', 5, 0))
    magic, opt, typ, n = struct.unpack('>QIII', readn(20))
    assert (opt, typ, n) == (5, 1, 0), (opt, typ, n)
    p.send_signal(signal.SIGALRM)
    time.sleep(0.5)
    send(b'IHAVEOPT' + struct.pack('>II', 3, 0))
    while True:
        magic, opt, typ, n = struct.unpack('>QIII', readn(20))
        readn(n)
        if typ == 1:
            break
        assert typ == 2, typ
    print('listed')
    p.stdin.close()
    p.wait(timeout=10)
finally:
    if p.poll() is None:
        p.kill()
        p.wait()
"#;

/// A TCP server (gnutls-cli connects over TCP only) logging to `dir/log` with -v.
fn tcp_logged(d: &TempDir, opts: &[&str]) -> (TcpServer, std::path::PathBuf) {
    let log = d.path("log");
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(nbdkit_bin())
            .args(["-f", "-v", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(opts)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (TcpServer { child, port }, log);
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            assert!(Instant::now() < deadline, "server did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("could not start a TCP server");
}

#[test]
fn gnutls_cli_tls12_fallback_retry_and_no_psk_ke() {
    require!("gnutls-cli", "--version");
    let d = TempDir::new("psk13-cli");
    let (keys, hex) = psk_keys(&d, "alice");
    let (srv, log) = tcp_logged(&d, &["--tls=require", "--tls-psk", s(&keys), "-D", "nbdkit.tls.session=1", "memory", "1M"]);
    let cli = |prio: &str, n: usize| {
        let clog = d.path(&format!("cli{n}.log"));
        let o = Command::new("/usr/bin/python3")
            .args(["-c", GNUTLS_NBD, &srv.port.to_string(), "alice", &hex, prio, s(&clog)])
            .env("PATH", path_env())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success() && out.contains("listed"), out, std::fs::read_to_string(&clog).unwrap_or_default())
    };
    // A TLS 1.2-only client gets the TLS 1.2 PSK suite.
    let (ok, out, clog) = cli("NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+PSK", 1);
    assert!(ok, "{out}\n{clog}");
    // (gnutls-cli's description names X.509: it always has certificate credentials.)
    assert!(clog.contains("- Description: (TLS1.2-") && clog.contains(")-(PSK)-(AES-128-GCM)"), "{clog}");
    let text = wait_for_log(&log, "debug: TLS: PSK username: alice\n", 1);
    assert!(text.contains("debug: TLS session: (TLS1.2)-(PSK)-(AES-128-GCM)\n"), "{text}");
    assert!(!text.contains("TLS1.3"), "{text}");
    // A client whose key share is for a group the server does not do
    // (P-384) gets a HelloRetryRequest for P-256.
    let (ok, out, clog) = cli("NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+ECDHE-PSK:-GROUP-ALL:+GROUP-SECP384R1:+GROUP-SECP256R1", 2);
    assert!(ok, "{out}\n{clog}");
    assert!(clog.contains("- Description: (TLS1.3-") && clog.contains(")--(AES-128-GCM)"), "{clog}");
    let text = wait_for_log(&log, "debug: TLS: PSK username: alice\n", 2);
    assert!(text.contains("HelloRetryRequest: the client sent no key share for SECP256R1"), "{text}");
    assert!(text.contains("debug: TLS session: (TLS1.3)--(AES-128-GCM)\n"), "{text}");
    assert!(text.contains("debug: TLS: negotiated group: SECP256R1\n"), "{text}");
    // psk_ke alone (no forward secrecy) is refused.
    let (ok, out, clog) = cli("NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+PSK", 3);
    assert!(!ok, "a psk_ke-only client connected: {out}\n{clog}");
    let text = wait_for_log(&log, "psk_dhe_ke (PSK without forward secrecy is refused)", 1);
    assert!(text.contains("the client does not offer psk_dhe_ke"), "{text}");
}

#[test]
fn tls_log_shows_the_tls_library() {
    let d = TempDir::new("psk13-log");
    let (keys, _) = psk_keys(&d, "alice");
    let pki = d.path("pki");
    make_pki(&pki);
    for level in [None, Some("nbdkit.tls.log=2")] {
        let mut opts = vec!["--tls=require", "--tls-psk", s(&keys)];
        opts.extend(level.map(|l| ["-D", l]).into_iter().flatten());
        let (srv, log) = start_logged_term(&opts, &["memory", "1M"]);
        run_ok("nbdinfo", &[&format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", srv.sock.display(), keys.display())]);
        let text = wait_for_log(&log, "tls::psk13: TLS 1.3 handshake complete", 1);
        // With -v: the PSK handshake's debug lines.
        assert!(text.contains("debug: tls::psk13: PSK: client identity \"alice\""), "{text}");
        assert!(text.contains("debug: tls::psk13: TLS 1.3 handshake: suite TLS_AES_128_GCM_SHA256, group X25519, psk_dhe_ke"), "{text}");
        // With -D nbdkit.tls.log=2: its trace lines too.
        assert_eq!(text.contains("debug: tls::psk13: handshake message 1 ("), level.is_some(), "{level:?}: {text}");
        drop(srv);
        // X.509: rustls' own records (its `logging` feature).
        let mut opts = vec!["--tls=require", "--tls-certificates", s(&pki)];
        opts.extend(level.map(|l| ["-D", l]).into_iter().flatten());
        let (srv, log) = start_logged_term(&opts, &["memory", "1M"]);
        run_ok("nbdinfo", &[&tls_uri(&srv, &pki)]);
        let text = wait_for_log(&log, "rustls::server::hs: decided upon suite", 1);
        assert!(text.contains("debug: rustls::server::hs: decided upon suite"), "{text}");
        assert_eq!(text.contains("debug: rustls::server::hs: we got a clienthello"), level.is_some(), "{level:?}: {text}");
    }
}

/// X.509 sessions on our record layer (records.rs) after rustls'
/// handshake: a random 512 MiB image copied in and out with four
/// connections, over a Unix socket and over TCP, checksums compared.
#[test]
fn x509_nbdcopy_512m_unix_and_tcp_multi_conn() {
    let d = TempDir::new("tls-512m");
    let pki = d.path("pki");
    make_pki(&pki);
    let (src, out) = (d.path("src.img"), d.path("out.img"));
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut r = std::fs::File::open("/dev/urandom").unwrap().take(512 << 20);
        std::io::copy(&mut r, &mut f).unwrap();
    }
    let want = sha256(&src);
    {
        let srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki)], &["memory", "512M"]);
        let uri = tls_uri(&srv, &pki);
        run_ok("nbdcopy", &["--connections=4", s(&src), &uri]);
        run_ok("nbdcopy", &["--connections=4", &uri, s(&out)]);
        assert_eq!(sha256(&out), want, "Unix socket");
    }
    std::fs::remove_file(&out).unwrap();
    let srv = TcpServer::start(&["--tls=require", "--tls-certificates", s(&pki), "memory", "512M"]);
    let uri = format!("nbds://localhost:{}/?tls-certificates={}", srv.port, pki.display());
    run_ok("nbdcopy", &["--connections=4", s(&src), &uri]);
    run_ok("nbdcopy", &["--connections=4", &uri, s(&out)]);
    assert_eq!(sha256(&out), want, "TCP");
}

/// Every TLS 1.2 AEAD (OpenSSL through Python's ssl, which can choose
/// the cipher) and TLS 1.3 with the server's choice, each through the
/// real server: 1 MiB written and read back, then the server's close_notify.
#[test]
fn x509_every_aead_with_openssl() {
    let d = TempDir::new("tls-aeads");
    let pki = d.path("pki");
    make_pki(&pki);
    let srv = Server::start_with(&["--tls=require", "--tls-certificates", s(&pki), "-D", "nbdkit.tls_session=1"], &["memory", "4M"]);
    let (sock, ca) = (srv.sock.display().to_string(), pki.join("ca-cert.pem").display().to_string());
    let out = python(&format!(
        r#"
def session(tls12, cipher):
    s = conn('{sock}')
    opt(s, STARTTLS); o, t, p = reply(s); assert t == ACK
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.load_verify_locations('{ca}')
    if tls12:
        c.maximum_version = ssl.TLSVersion.TLSv1_2
        c.set_ciphers(cipher)
    t = c.wrap_socket(s, suppress_ragged_eofs=False)
    assert go(t) == ACK
    data = bytes((i * 7 + len(cipher)) & 255 for i in range(1 << 20))
    t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 1, 1, 0, len(data)) + data)   # WRITE
    m, err, cookie = struct.unpack('>IIQ', rd(t, 16)); assert (m, err, cookie) == (0x67446698, 0, 1)
    for k in range(4):
        n = [4096, 16384 - 16, 16384, 1 << 20][k]
        t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 0, 2 + k, 0, n))   # READ
        m, err, cookie = struct.unpack('>IIQ', rd(t, 16)); assert (m, err, cookie) == (0x67446698, 0, 2 + k)
        assert rd(t, n) == data[:n]
    t.sendall(struct.pack('>IHHQQI', 0x25609513, 0, 2, 9, 0, 0))   # DISC
    print(t.version(), t.cipher()[0])
    assert t.recv(1) == b''   # the server's close_notify (a bare EOF would raise)
    t.close()
for tls12, cipher in [(1, 'ECDHE-RSA-AES128-GCM-SHA256'), (1, 'ECDHE-RSA-AES256-GCM-SHA384'), (1, 'ECDHE-RSA-CHACHA20-POLY1305'), (0, '')]:
    session(tls12, cipher)
"#
    ));
    for want in ["TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256", "TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384", "TLSv1.2 ECDHE-RSA-CHACHA20-POLY1305", "TLSv1.3 TLS_AES_128_GCM_SHA256"] {
        assert!(out.contains(want), "{want}: {out}");
    }
}
