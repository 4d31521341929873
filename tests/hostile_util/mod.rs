//! Helpers shared by the hostile-input tests (bad-input.md §3.1 and §3.2):
//! wire constants written out from the NBD spec (not taken from the
//! server, so a wrong server constant cannot hide), option and request
//! builders, reply readers, and a shadow model of the export.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_SR: u32 = 8;
pub const OPT_LIST_META: u32 = 9;
pub const OPT_SET_META: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_POLICY: u32 = 0x8000_0002;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 0x10;

// Transmission flags.
pub const EF_HAS_FLAGS: u16 = 1;
pub const EF_READ_ONLY: u16 = 2;
pub const EF_SEND_FUA: u16 = 8;
pub const EF_SEND_DF: u16 = 0x80;
pub const EF_SEND_FAST_ZERO: u16 = 0x800;

// Chunks.
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const FLAG_DONE: u16 = 1;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub const MIB: u64 = 1 << 20;
pub const SIZE_100M: u64 = 100 * MIB;

/// Writes, ignoring errors: for bytes sent to a server that may already
/// have closed the connection (EPIPE is then expected, not a failure).
pub fn send_raw(s: &mut UnixStream, b: &[u8]) {
    let _ = s.write_all(b);
}

/// An option with an arbitrary length field (which may lie about the payload).
pub fn option_bytes(option: u32, len_field: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&len_field.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Reads one option reply and checks its option and type; returns the payload.
pub fn expect_reply(s: &mut UnixStream, option: u32, typ: u32) -> Vec<u8> {
    let (o, t, p) = read_option_reply(s);
    assert_eq!((o, t), (option, typ), "option reply: got option {o} type 0x{t:x}, wanted option {option} type 0x{typ:x}");
    p
}

/// INFO/GO payload with info requests.
pub fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    nbdkit::fuzzing::info_go_payload(name, infos)
}

/// LIST_/SET_META_CONTEXT payload.
pub fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name);
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q);
    }
    p
}

/// Reads the replies to INFO/GO up to the ACK: the (info type, body) of
/// each NBD_REP_INFO. Panics on anything but INFO and a final ACK.
pub fn read_infos(s: &mut UnixStream, option: u32) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    loop {
        let (o, t, p) = read_option_reply(s);
        assert_eq!(o, option);
        match t {
            REP_INFO => {
                assert!(p.len() >= 2, "short NBD_REP_INFO");
                v.push((u16::from_be_bytes([p[0], p[1]]), p[2..].to_vec()));
            }
            REP_ACK => return v,
            t => panic!("unexpected reply 0x{t:x} to option {option}"),
        }
    }
}

/// Size and flags from an INFO_EXPORT body.
pub fn export_info(infos: &[(u16, Vec<u8>)]) -> (u64, u16) {
    let (t, b) = &infos[0];
    assert_eq!(*t, INFO_EXPORT, "the first NBD_REP_INFO must be NBD_INFO_EXPORT");
    assert_eq!(b.len(), 10);
    (u64::from_be_bytes(b[..8].try_into().unwrap()), u16::from_be_bytes([b[8], b[9]]))
}

/// Newstyle, optionally SR and SET_META base:allocation, then GO `name`.
/// Returns (size, eflags).
pub fn negotiate(s: &mut UnixStream, sr: bool, meta: bool, name: &[u8]) -> (u64, u16) {
    newstyle(s);
    if sr {
        send_option(s, OPT_SR, b"");
        expect_reply(s, OPT_SR, REP_ACK);
    }
    if meta {
        send_option(s, OPT_SET_META, &meta_payload(name, &[b"base:allocation"]));
        let p = expect_reply(s, OPT_SET_META, REP_META_CONTEXT);
        assert_eq!(&p[..4], &1u32.to_be_bytes());
        assert_eq!(&p[4..], b"base:allocation");
        expect_reply(s, OPT_SET_META, REP_ACK);
    }
    send_option(s, OPT_GO, &info_payload(name, &[]));
    export_info(&read_infos(s, OPT_GO))
}

/// A connected client in the transmission phase.
pub fn client(srv: &Server, sr: bool, meta: bool) -> (UnixStream, u64, u16) {
    let mut s = srv.connect();
    let (size, eflags) = negotiate(&mut s, sr, meta, b"");
    (s, size, eflags)
}

/// Sends a request with a 64-bit offset and a 32-bit count.
pub fn request(s: &mut UnixStream, flags: u16, cmd: u16, cookie: u64, offset: u64, count: u32, payload: &[u8]) {
    send_request(s, flags, cmd, cookie, offset, count, payload);
}

/// Request header bytes.
pub fn request_bytes(flags: u16, cmd: u16, cookie: u64, offset: u64, count: u32) -> Vec<u8> {
    let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    v
}

/// Reads a simple reply and checks its error and cookie.
pub fn expect_simple(s: &mut UnixStream, cookie: u64, error: u32) {
    let (e, c) = read_simple_reply(s);
    assert_eq!((e, c), (error, cookie), "simple reply: got error {e} cookie {c:#x}, wanted error {error} cookie {cookie:#x}");
}

/// Reads an ERROR chunk flagged DONE (length 6, empty message) with `error`.
pub fn expect_error_chunk(s: &mut UnixStream, cookie: u64, error: u32) {
    let (flags, typ, c, p) = read_chunk(s);
    assert_eq!((typ, c), (CHUNK_ERROR, cookie), "wanted an ERROR chunk for cookie {cookie:#x}, got type 0x{typ:x}");
    assert_eq!(flags & FLAG_DONE, FLAG_DONE, "error chunk must be the last");
    assert!(p.len() >= 6, "error chunk payload too short");
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), error, "error number");
    let msg = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert_eq!(p.len(), 6 + msg, "error message length must fill the chunk");
}

/// The reply to a failed request: an error chunk for READ and BLOCK_STATUS
/// under structured replies, a simple reply otherwise.
pub fn expect_error(s: &mut UnixStream, sr: bool, cmd: u16, cookie: u64, error: u32) {
    if sr && matches!(cmd, CMD_READ | CMD_BLOCK_STATUS) {
        expect_error_chunk(s, cookie, error);
    } else {
        expect_simple(s, cookie, error);
    }
}

/// Reads the chunks of one structured READ reply until DONE and assembles
/// the data (OFFSET_DATA and OFFSET_HOLE); panics on an error chunk.
pub fn read_chunks_data(s: &mut UnixStream, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xA5u8; len];
    let mut covered = 0usize;
    loop {
        let (flags, typ, c, p) = read_chunk(s);
        assert_eq!(c, cookie, "chunk for another cookie");
        match typ {
            CHUNK_OFFSET_DATA => {
                let o = u64::from_be_bytes(p[..8].try_into().unwrap());
                let start = (o - offset) as usize;
                buf[start..start + p.len() - 8].copy_from_slice(&p[8..]);
                covered += p.len() - 8;
            }
            CHUNK_OFFSET_HOLE => {
                assert_eq!(p.len(), 12, "OFFSET_HOLE payload is 12 bytes");
                let o = u64::from_be_bytes(p[..8].try_into().unwrap());
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                assert!(n > 0, "empty hole");
                let start = (o - offset) as usize;
                buf[start..start + n].fill(0);
                covered += n;
            }
            t => panic!("unexpected chunk type 0x{t:x} in a READ reply ({:?})", &p[..p.len().min(8)]),
        }
        if flags & FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, len, "READ chunks must cover the request exactly");
    buf
}

/// A READ that must succeed; returns the data (simple or structured).
pub fn read_ok(s: &mut UnixStream, sr: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    request(s, 0, CMD_READ, cookie, offset, len, b"");
    if sr {
        read_chunks_data(s, cookie, offset, len as usize)
    } else {
        expect_simple(s, cookie, 0);
        read_n(s, len as usize)
    }
}

/// A WRITE that must succeed (simple reply in both modes).
pub fn write_ok(s: &mut UnixStream, cookie: u64, offset: u64, data: &[u8]) {
    request(s, 0, CMD_WRITE, cookie, offset, data.len() as u32, data);
    expect_simple(s, cookie, 0);
}

/// Sends a request and checks that it fails with `error` (the arguments
/// are the request's wire fields).
#[allow(clippy::too_many_arguments)]
pub fn expect_fail(s: &mut UnixStream, sr: bool, flags: u16, cmd: u16, offset: u64, count: u32, payload: &[u8], error: u32) {
    let cookie = 0x1000 + u64::from(cmd);
    request(s, flags, cmd, cookie, offset, count, payload);
    expect_error(s, sr, cmd, cookie, error);
}

/// True if the server closes without sending a single byte (EOF or reset
/// within 10 s).
pub fn eof_without_data(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("server sent {n} unexpected bytes before closing: {:02x?}", &b[..n]),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

/// Asserts that the connection is closed with no reply, within `secs`.
pub fn assert_closed_quickly(s: &mut UnixStream, secs: u64) {
    let t = Instant::now();
    assert!(eof_without_data(s), "server did not close the connection");
    assert!(t.elapsed() < Duration::from_secs(secs), "closing took {:?}", t.elapsed());
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    // Never all zero, so reads of it are data, not holes.
    if let Some(b) = v.first_mut() {
        *b |= 1;
    }
    v
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB field of /proc/PID/status (`VmRSS:`, `VmHWM:`…).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Number of a process's descriptors open on `path`.
pub fn fds_on(pid: u32, path: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l == path)
        .count()
}

/// Waits up to 5 s for `f` to hold.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `Server::start`, then waits until the socket accepts connections: the
/// harness waits only for the socket file, which exists between bind() and
/// listen(), so a first connect can be refused (ECONNREFUSED) under load.
pub fn start(args: &[&str]) -> Server {
    start_with(&[], args)
}

/// `Server::start_with`, then waits until the socket accepts connections.
pub fn start_with(opts: &[&str], args: &[&str]) -> Server {
    let mut srv = Server::start_with(opts, args);
    wait_listening(&mut srv);
    srv
}

fn wait_listening(srv: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&srv.sock).is_err() {
        assert!(srv.alive(), "server exited");
        assert!(Instant::now() < deadline, "server never listened on {:?}", srv.sock);
        thread::sleep(Duration::from_millis(5));
    }
}

/// Starts the server with `-v`, its stderr going to a log file.
pub fn start_logged(opts: &[&str], args: &[&str]) -> (Server, PathBuf) {
    let dir = TempDir::new("hsrv");
    let sock = dir.path("sock");
    let log = dir.path("stderr.log");
    let child = Command::new(nbdkit_bin())
        .args(["--foreground", "-v", "--unix"])
        .arg(&sock)
        .args(opts)
        .args(args)
        .stdin(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("cannot run the nbdkit binary");
    let mut srv = Server { child, sock, dir };
    wait_for_socket(&mut srv);
    (srv, log)
}

/// Starts the server through `sh -c 'ulimit …; exec nbdkit …'` (same pid).
pub fn start_limited(ulimit: &str, args: &[&str]) -> Server {
    let dir = TempDir::new("hsrv");
    let sock = dir.path("sock");
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" --foreground --unix \"$@\""))
        .arg(nbdkit_bin())
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot run sh");
    let mut srv = Server { child, sock, dir };
    wait_for_socket(&mut srv);
    srv
}

fn wait_for_socket(srv: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !srv.sock.exists() {
        if let Ok(Some(st)) = srv.child.try_wait() {
            panic!("nbdkit exited early: {st}");
        }
        assert!(Instant::now() < deadline, "server did not create {:?}", srv.sock);
        thread::sleep(Duration::from_millis(10));
    }
    wait_listening(srv);
}

/// The health check, for servers whose default export does not exist
/// (file `dir=`): alive, and a fresh client GOes to `export` and reads 512 bytes.
pub fn health_check_export(srv: &mut Server, export: &str) {
    assert!(srv.alive(), "server died");
    let o = run("nbdsh", &["-u", &srv.uri_export(export), "-c", "assert len(h.pread(512, 0)) == 512"]);
    assert!(o.status.success(), "health check failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(srv.alive(), "server died");
}

/// A shadow model of the export: what every byte must read back as.
pub struct Model {
    pub size: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model { size, writes: Vec::new() }
    }
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.writes.push((offset, vec![0; len as usize]));
    }
    pub fn expected(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        for (o, d) in &self.writes {
            v[*o as usize..*o as usize + d.len()].copy_from_slice(d);
        }
        v
    }
    /// Copies the whole export out with nbdcopy and compares it with the model.
    pub fn verify(&self, srv: &Server) {
        self.verify_export(srv, "");
    }
    pub fn verify_export(&self, srv: &Server, export: &str) {
        let out = srv.dir.path("export-copy.img");
        let _ = std::fs::remove_file(&out);
        run_ok("nbdcopy", &[&srv.uri_export(export), out.to_str().unwrap()]);
        let got = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        let want = self.expected();
        assert_eq!(got.len(), want.len(), "export size");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("export differs from the model at byte {i}: got {:#04x}, want {:#04x}", got[i], want[i]);
        }
    }
}

/// Any transmission reply header (with a chunk's payload).
#[derive(Debug)]
pub enum AnyReply {
    /// error, cookie (a READ's data, if any, is still unread).
    Simple(u32, u64),
    /// flags, type, cookie, payload.
    Chunk(u16, u16, u64, Vec<u8>),
}

/// Reads one simple reply header or one structured chunk, whichever comes.
pub fn read_any_reply(s: &mut UnixStream) -> AnyReply {
    let m = read_n(s, 4);
    match u32::from_be_bytes(m[..].try_into().unwrap()) {
        0x6744_6698 => {
            let h = read_n(s, 12);
            AnyReply::Simple(u32::from_be_bytes(h[..4].try_into().unwrap()), u64::from_be_bytes(h[4..].try_into().unwrap()))
        }
        0x668e_33ef => {
            let h = read_n(s, 16);
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let typ = u16::from_be_bytes([h[2], h[3]]);
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            AnyReply::Chunk(flags, typ, cookie, read_n(s, len as usize))
        }
        m => panic!("reply frame with bad magic {m:#010x}: replies interleaved or out of sync"),
    }
}

/// Block-status descriptors (length, status) of a BLOCK_STATUS chunk
/// payload for context id 1.
pub fn descriptors(p: &[u8]) -> Vec<(u32, u32)> {
    assert!(p.len() >= 12 && (p.len() - 4).is_multiple_of(8), "block status payload of {} bytes", p.len());
    assert_eq!(&p[..4], &1u32.to_be_bytes(), "context id of base:allocation");
    p[4..]
        .chunks_exact(8)
        .map(|d| (u32::from_be_bytes(d[..4].try_into().unwrap()), u32::from_be_bytes(d[4..].try_into().unwrap())))
        .collect()
}

/// The spec's shape rules for a block status reply to `[offset, offset+count)`
/// on an export of `size` bytes: at least one descriptor, none empty, the
/// first n-1 inside the request, REQ_ONE gives one no longer than the
/// request, nothing past the end of the export, reserved bits clear.
pub fn check_descriptors(d: &[(u32, u32)], offset: u64, count: u32, size: u64, req_one: bool) {
    assert!(!d.is_empty(), "no descriptor");
    assert!(d.iter().all(|&(l, _)| l > 0), "empty descriptor in {d:?}");
    assert!(d.iter().all(|&(_, s)| s & !3 == 0), "reserved status bits in {d:?}");
    let head: u64 = d[..d.len() - 1].iter().map(|&(l, _)| u64::from(l)).sum();
    assert!(head < u64::from(count), "descriptors before the last must stay inside the request: {d:?}");
    let total: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
    assert!(offset + total <= size, "descriptors run past the end of the export: {d:?}");
    if req_one {
        assert_eq!(d.len(), 1, "REQ_ONE must give one descriptor: {d:?}");
        assert!(d[0].0 <= count, "REQ_ONE descriptor longer than the request: {d:?}");
    }
}
