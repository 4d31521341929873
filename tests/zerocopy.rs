//! Big READs of the file plugin go out with `sendfile` (the reply header,
//! then the file's pages straight into the socket): the data is the
//! file's over Unix and TCP, in simple and structured replies, holes stay
//! holes, a file that shrinks under a READ gives EIO or a closed
//! connection (never bytes that are not the file's, never a crash), and a
//! client that stops reading in the middle of a 64 MiB reply neither
//! stalls other clients nor keeps the server from stopping.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const EIO: u32 = 5;

/// The file's content at byte offsets `[off, off+len)`: each 8-byte word
/// holds a hash of its own offset, so a byte from anywhere else shows.
fn pattern_at(off: u64, len: usize) -> Vec<u8> {
    assert!(off.is_multiple_of(8) && len.is_multiple_of(8));
    let mut v = Vec::with_capacity(len);
    for w in 0..(len / 8) as u64 {
        let mut x = (off / 8 + w).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
        x ^= x >> 29;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes the pattern over `[0, len)` of `f`, 8 MiB at a time.
fn fill(f: &File, len: u64) {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(8 * MIB);
        f.write_all_at(&pattern_at(off, n as usize), off).unwrap();
        off += n;
    }
}

/// A server on TCP loopback (the harness's `Server` is Unix only).
struct TcpServer {
    child: Child,
    port: u16,
}

impl TcpServer {
    fn start(args: &[&str]) -> TcpServer {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new(nbdkit_bin())
                .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return TcpServer { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: another one
                }
                assert!(Instant::now() < deadline, "server did not listen");
                thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("no free port");
    }
    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }
    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A client of either transport, negotiated.
fn connect(unix: Option<&Server>, tcp: Option<&TcpServer>, sr: bool) -> Box<dyn Stream> {
    let mut s: Box<dyn Stream> = match (unix, tcp) {
        (Some(u), _) => Box::new(u.connect()),
        (_, Some(t)) => Box::new(t.connect()),
        _ => unreachable!(),
    };
    go(&mut s, sr);
    s
}

/// What a READ got.
#[derive(Debug, PartialEq)]
enum Got {
    Data(Vec<u8>),
    /// Structured: one hole chunk over the whole range.
    Hole,
    Error(u32),
    /// The server closed the connection in the middle of the reply.
    Closed,
}

fn read_exact_or_closed(s: &mut dyn Stream, n: usize) -> Option<Vec<u8>> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).ok().map(|()| v)
}

/// Reads the reply to a READ of `len` bytes with cookie `cookie`.
fn reply(s: &mut dyn Stream, sr: bool, cookie: u64, offset: u64, len: usize) -> Got {
    if !sr {
        let Some(h) = read_exact_or_closed(s, 16) else { return Got::Closed };
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let e = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if e != 0 {
            return Got::Error(e);
        }
        return read_exact_or_closed(s, len).map_or(Got::Closed, Got::Data);
    }
    let mut data = vec![0; len];
    let mut hole_only = true;
    loop {
        let Some(h) = read_exact_or_closed(s, 20) else { return Got::Closed };
        assert_eq!(&h[..4], &0x668e_33efu32.to_be_bytes(), "not a structured reply");
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let plen = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let Some(p) = read_exact_or_closed(s, plen) else { return Got::Closed };
        match typ {
            1 => {
                let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                data[at..at + plen - 8].copy_from_slice(&p[8..]);
                hole_only = false;
            }
            2 => {
                let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                data[at..at + n].fill(0);
            }
            0x8001 => return Got::Error(u32::from_be_bytes(p[..4].try_into().unwrap())),
            0 => {}
            t => panic!("unexpected chunk type {t:#x}"),
        }
        if flags & 1 != 0 {
            return if hole_only { Got::Hole } else { Got::Data(data) };
        }
    }
}

fn read(s: &mut dyn Stream, sr: bool, flags: u16, cookie: u64, offset: u64, len: u32) -> Got {
    send_request(&mut &mut *s, flags, 0, cookie, offset, len, b"");
    reply(s, sr, cookie, offset, len as usize)
}

/// A file of `data` bytes of the pattern, then a hole up to `size`.
fn sparse_file(dir: &TempDir, data: u64, size: u64) -> (std::path::PathBuf, File) {
    let path = dir.path("disk.img");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    fill(&f, data);
    f.set_len(size).unwrap();
    (path, f)
}

#[test]
fn big_reads_are_the_files_bytes_holes_stay_holes_and_a_shrunk_file_gives_eio() {
    let dir = TempDir::new("zc-holes");
    let (path, f) = sparse_file(&dir, 4 * MIB, 12 * MIB);
    let p = path.to_str().unwrap();
    let unix = Server::start(&["file", p]);
    let tcp = TcpServer::start(&["file", p]);
    for sr in [false, true] {
        for on_tcp in [false, true] {
            let what = format!("sr={sr} tcp={on_tcp}");
            let mut s = if on_tcp { connect(None, Some(&tcp), sr) } else { connect(Some(&unix), None, sr) };
            // Data, twice (the second from the page cache for sure).
            for c in 0..2 {
                assert_eq!(read(&mut *s, sr, 0, c, MIB / 2, MIB as u32), Got::Data(pattern_at(MIB / 2, MIB as usize)), "{what}");
            }
            // Straddling the end of the data: data then zeroes.
            let mut want = pattern_at(3 * MIB + MIB / 2, (MIB / 2) as usize);
            want.resize(MIB as usize, 0);
            assert_eq!(read(&mut *s, sr, 0, 3, 3 * MIB + MIB / 2, MIB as u32), Got::Data(want), "{what}");
            // Within the hole up to the end of the file (past its last
            // data): one hole chunk in structured mode, zeroes otherwise,
            // and zeroes with DF.
            let hole = read(&mut *s, sr, 0, 4, 10 * MIB, 2 * MIB as u32);
            if sr {
                assert_eq!(hole, Got::Hole, "{what}");
                assert_eq!(read(&mut *s, sr, 4, 5, 10 * MIB, 2 * MIB as u32), Got::Data(vec![0; 2 << 20]), "{what}");
            } else {
                assert_eq!(hole, Got::Data(vec![0; 2 << 20]), "{what}");
            }
            // Pipelined big and small reads come back whole.
            let offs = [0, 4096, MIB, 5 * MIB, 2 * MIB + 512];
            for (i, &o) in offs.iter().enumerate() {
                let n = if i % 2 == 0 { MIB as u32 } else { 4096 };
                send_request(&mut s, 0, 0, 100 + i as u64, o, n, b"");
            }
            for (i, &o) in offs.iter().enumerate() {
                let n = if i % 2 == 0 { MIB as usize } else { 4096 };
                let mut want = if o < 4 * MIB { pattern_at(o, n.min((4 * MIB - o) as usize)) } else { vec![] };
                want.resize(n, 0);
                match reply(&mut *s, sr, 100 + i as u64, o, n) {
                    Got::Data(d) => assert!(d == want, "{what}: read {i}"),
                    Got::Hole => assert!(want.iter().all(|&b| b == 0), "{what}: read {i}"),
                    g => panic!("{what}: read {i}: {g:?}"),
                }
            }
        }
    }
    // The file shrinks under clients connected before: reads past its new
    // end are EIO (the size is checked before the header goes out), reads
    // before it still work, and the server lives on.
    let mut clients = Vec::new();
    for sr in [false, true] {
        for on_tcp in [false, true] {
            clients.push((sr, if on_tcp { connect(None, Some(&tcp), sr) } else { connect(Some(&unix), None, sr) }));
        }
    }
    f.set_len(6 * MIB).unwrap();
    for (sr, mut s) in clients {
        {
            assert_eq!(read(&mut *s, sr, 0, 1, 8 * MIB, MIB as u32), Got::Error(EIO));
            assert_eq!(read(&mut *s, sr, 0, 2, 5 * MIB + MIB / 2, MIB as u32), Got::Error(EIO));
            assert_eq!(read(&mut *s, sr, 0, 3, 0, MIB as u32), Got::Data(pattern_at(0, MIB as usize)));
        }
    }
    let mut unix = unix;
    unix.health_check();
}

/// A file truncated and grown back again and again while a client reads
/// it: each reply is the file's bytes (the pattern, or zeroes where it was
/// cut), an EIO error, or a connection closed in the middle of a reply
/// (sendfile came up short after the header went out). Never bytes from
/// anywhere else, and the server never dies (no SIGBUS: nothing is mapped).
#[test]
fn a_file_truncated_while_served_gives_eio_or_a_closed_connection() {
    let dir = TempDir::new("zc-trunc");
    let size = 16 * MIB;
    let (path, f) = sparse_file(&dir, size, size);
    let mut srv = Server::start(&["file", path.to_str().unwrap()]);
    let stop = Arc::new(AtomicBool::new(false));
    // Held while the file is short: clients connect to the whole file
    // (the export's size is the file's at connection time).
    let short = Arc::new(Mutex::new(()));
    let cutter = {
        let (stop, short) = (stop.clone(), short.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let keep = (i * 3 % 14 + 1) * MIB;
                let _short = short.lock().unwrap();
                f.set_len(keep).unwrap();
                thread::sleep(Duration::from_micros(300));
                // Grow it back with the pattern, in 1 MiB steps.
                let mut off = keep;
                while off < size {
                    f.write_all_at(&pattern_at(off, MIB as usize), off).unwrap();
                    off += MIB;
                }
                drop(_short);
                thread::sleep(Duration::from_micros(200));
                i += 1;
            }
        })
    };
    let (mut data, mut errors, mut closed) = (0, 0, 0);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(3) || data < 10 {
        let sr = n % 2 == 1;
        let mut s = {
            let _whole = short.lock().unwrap();
            connect(Some(&srv), None, sr)
        };
        loop {
            n += 1;
            let off = (n * 7 % 13) * MIB + (n % 4) * 8192;
            let len = (2 * MIB) as usize;
            match read(&mut *s, sr, 0, n, off, len as u32) {
                Got::Data(d) => {
                    let want = pattern_at(off, len);
                    for (k, (a, b)) in d.chunks(4096).zip(want.chunks(4096)).enumerate() {
                        assert!(a == b || a.iter().all(|&x| x == 0), "read {n} at {off}: block {k} is not the file's");
                    }
                    data += 1;
                }
                Got::Hole => data += 1,
                Got::Error(e) => {
                    assert_eq!(e, EIO);
                    errors += 1;
                }
                Got::Closed => {
                    closed += 1;
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(3) && data >= 10 {
                break;
            }
        }
        assert!(srv.alive(), "server died");
        assert!(t.elapsed() < Duration::from_secs(60), "too slow: {data} {errors} {closed}");
    }
    stop.store(true, Ordering::Relaxed);
    cutter.join().unwrap();
    eprintln!("replies: {data} data, {errors} EIO, {closed} closed");
    assert!(data >= 10);
    srv.health_check();
}

/// A client that asks for 64 MiB and stops reading after 1 MiB: other
/// clients are served meanwhile; when it reads again it gets the whole,
/// right reply; and a server told to stop while such a client stalls
/// stops (the worker gives up the reply and closes the connection).
#[test]
fn a_client_that_stops_reading_a_64_mib_reply() {
    let dir = TempDir::new("zc-stall");
    let size = 80 * MIB;
    let (path, _f) = sparse_file(&dir, size, size);
    let p = path.to_str().unwrap();
    let mut unix = Server::start(&["file", p]);
    let tcp = TcpServer::start(&["file", p]);
    for on_tcp in [false, true] {
        let sr = on_tcp;
        let mut s = if on_tcp { connect(None, Some(&tcp), sr) } else { connect(Some(&unix), None, sr) };
        let len = 64 * MIB as usize;
        send_request(&mut s, 0, 0, 1, 4 * MIB, len as u32, b"");
        let mut first = vec![0; MIB as usize];
        s.read_exact(&mut first).unwrap();
        thread::sleep(Duration::from_millis(500));
        // Meanwhile others get their data.
        unix.health_check();
        let out = run_ok("nbdsh", &["-u", &tcp.uri(), "-c", "print(len(h.pread(4 << 20, 0)))"]);
        assert_eq!(out.trim(), (4 << 20).to_string());
        // The stalled reply, read at last, is whole and right.
        let mut rest = vec![0; len + if sr { 20 + 8 } else { 16 } - first.len()];
        s.read_exact(&mut rest).unwrap();
        first.extend_from_slice(&rest);
        let head = if sr { 28 } else { 16 };
        assert!(first[head..] == pattern_at(4 * MIB, len), "tcp={on_tcp}: the reply is not the file's");
        // The connection goes on.
        assert_eq!(read(&mut *s, sr, 0, 2, 0, MIB as u32), Got::Data(pattern_at(0, MIB as usize)));
    }
    // Stalled again, and the server is told to stop: it does.
    let mut s = connect(Some(&unix), None, false);
    send_request(&mut s, 0, 0, 3, 0, 64 << 20, b"");
    let mut first = vec![0; MIB as usize];
    s.read_exact(&mut first).unwrap();
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    run_ok("kill", &["-TERM", &unix.child.id().to_string()]);
    while unix.alive() {
        assert!(t.elapsed() < Duration::from_secs(10), "the server does not stop while a client stalls");
        thread::sleep(Duration::from_millis(20));
    }
    drop(s);
}

/// 512 MiB out through the file plugin (Unix), in (TCP) and out again
/// (TCP) with nbdcopy: every checksum is the source's.
#[test]
fn round_trips_of_512_mib_keep_their_checksums() {
    require!("nbdcopy", "--version");
    let dir = TempDir::new("zc-copy");
    let size = 512 * MIB;
    let (src, _f) = sparse_file(&dir, size, size);
    let want = sha256(&src);
    let out1 = dir.path("out1.img");
    {
        let srv = Server::start(&["-r", "file", src.to_str().unwrap()]);
        run_ok("nbdcopy", &[&srv.uri(), out1.to_str().unwrap()]);
    }
    assert_eq!(sha256(&out1), want, "copied out over Unix");
    std::fs::remove_file(&out1).unwrap();
    let dst = dir.path("dst.img");
    File::create(&dst).unwrap().set_len(size).unwrap();
    let tcp = TcpServer::start(&["file", dst.to_str().unwrap()]);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &tcp.uri()]);
    drop(_f);
    std::fs::remove_file(&src).unwrap();
    assert_eq!(sha256(&dst), want, "copied in over TCP");
    let out2 = dir.path("out2.img");
    run_ok("nbdcopy", &[&tcp.uri(), out2.to_str().unwrap()]);
    assert_eq!(sha256(&out2), want, "copied out over TCP");
}

/// Big WRITEs of the file plugin (copied: the spliced path was removed,
/// docs/performance.md "round 3") land whole when their payload comes in
/// pieces (Unix and TCP, 128 KiB to 4 MiB), and a payload cut off by the
/// client never reaches the file (T25).
#[test]
fn big_writes_land_whole_and_a_cut_payload_never_reaches_the_file() {
    let dir = TempDir::new("zc-write");
    let size = 16 * MIB;
    let (path, _f) = sparse_file(&dir, 0, size);
    let p = path.to_str().unwrap();
    let unix = Server::start(&["file", p]);
    let tcp = TcpServer::start(&["file", p]);
    let mut at = 0;
    for on_tcp in [false, true] {
        let mut s = if on_tcp { connect(None, Some(&tcp), false) } else { connect(Some(&unix), None, false) };
        for (i, len) in [(1, 256 * 1024), (2, MIB as usize), (3, 4 * MIB as usize), (4, 128 * 1024)] {
            let data = pattern_at(at, len);
            // Header and payload in pieces, as a slow client sends them.
            send_request(&mut s, 0, 1, i, at, len as u32, &data[..1000]);
            thread::sleep(Duration::from_millis(5));
            s.write_all(&data[1000..len / 2]).unwrap();
            thread::sleep(Duration::from_millis(5));
            s.write_all(&data[len / 2..]).unwrap();
            let mut h = [0; 16];
            s.read_exact(&mut h).unwrap();
            assert_eq!(&h[4..8], &[0; 4], "tcp={on_tcp} write {i}: error");
            assert_eq!(read(&mut *s, false, 0, 100 + i, at, len as u32), Got::Data(data), "tcp={on_tcp} write {i}");
            at += len as u64;
        }
    }
    // Cut off after 3/4 of a 1 MiB payload: nothing of it is in the file.
    let before = std::fs::read(&path).unwrap();
    for on_tcp in [false, true] {
        let mut s = if on_tcp { connect(None, Some(&tcp), false) } else { connect(Some(&unix), None, false) };
        let data = vec![0xee; MIB as usize];
        send_request(&mut s, 0, 1, 9, 12 * MIB, MIB as u32, &data[..3 * MIB as usize / 4]);
        thread::sleep(Duration::from_millis(100));
        drop(s);
    }
    thread::sleep(Duration::from_millis(300));
    assert!(std::fs::read(&path).unwrap() == before, "a cut-off payload reached the file");
    let mut unix = unix;
    unix.health_check();
}
