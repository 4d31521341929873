//! The rest of bad-input.md's R, L and P cases that apply to what exists:
//! R04 huge memory exports, R07 sockets that never negotiate, R08 10,000
//! pipelined requests, L02 SIGTERM during a delayed request, L03 a signal
//! storm during I/O, P02 half the requests failing while a client retries,
//! P18 a backing file truncated while served. Each ends with a health check.

mod common;
mod hostile_util;
mod proc_util;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_util::*;
use proc_util::*;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

#[test]
fn r04_last_sector_of_1t_and_2_63_minus_1_memory_exports() {
    for size in ["1T", "9223372036854775807"] {
        let mut srv = Server::start(&["memory", size]);
        let (mut s, esize, _) = client(&srv, true, false);
        let last = (esize - 512) & !511;
        let data = pattern(512, 4);
        write_ok(&mut s, 1, last, &data);
        assert_eq!(read_ok(&mut s, true, 2, last, 512), data, "{size}");
        // Sparse: the server did not allocate anything like the size.
        assert!(rss_kib(srv.child.id()) < 200 * 1024);
        drop(s);
        srv.health_check();
    }
}

#[test]
fn r07_sockets_that_never_negotiate_are_closed_by_the_timeout() {
    let mut srv = Server::start_with(&["--timeout=1"], &["memory", "1M"]);
    let mut socks: Vec<UnixStream> = (0..200).map(|_| srv.connect()).collect();
    let t = Instant::now();
    // A new client is served at once meanwhile.
    srv.health_check();
    for s in &mut socks {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0; 18];
        s.read_exact(&mut greeting).unwrap();
        let mut b = [0; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "still open");
    }
    let secs = t.elapsed().as_secs_f64();
    assert!(secs < 8.0, "closing 200 idle sockets took {secs:.1} s");
    srv.health_check();
}

#[test]
fn r08_ten_thousand_pipelined_requests_are_all_answered() {
    let mut srv = Server::start(&["memory", "16M"]);
    let (s, _, _) = client(&srv, false, false);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut batch = Vec::new();
        for i in 0..10_000u64 {
            batch.extend(request_bytes(0, CMD_READ, i, (i % 4096) * 4096, 4096));
        }
        w.write_all(&batch).unwrap();
    });
    let mut r = std::io::BufReader::new(s);
    let mut seen = vec![false; 10_000];
    for _ in 0..10_000 {
        let mut h = [0; 16];
        r.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        let cookie = u64::from_be_bytes(h[8..].try_into().unwrap()) as usize;
        assert!(!seen[cookie], "cookie {cookie} answered twice");
        seen[cookie] = true;
        let mut d = vec![0; 4096];
        r.read_exact(&mut d).unwrap();
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&x| x));
    srv.health_check();
}

#[test]
fn l02_sigterm_during_a_delayed_request_does_not_wait_out_the_delay() {
    let dir = TempDir::new("l02");
    let sock = dir.path("sock");
    let mut c = Command::new(nbdkit_bin());
    c.args(["-f", "-U"]).arg(&sock).args(["--filter=delay", "memory", "1M", "rdelay=30"]);
    let mut g = Guard::spawn(c);
    while UnixStream::connect(&sock).is_err() {
        thread::sleep(Duration::from_millis(10));
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    go(&mut s, false);
    request(&mut s, 0, CMD_READ, 1, 0, 512, b"");
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    kill("TERM", g.pid());
    // The sleeping read ends with ESHUTDOWN (or the connection closes).
    let mut h = [0; 16];
    if s.read_exact(&mut h).is_ok() {
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 108, "ESHUTDOWN");
    }
    let st = g.wait_exit(6.0).expect("server still running after SIGTERM");
    assert_eq!(st.code(), Some(0));
    assert!(t.elapsed() < Duration::from_secs(6));
}

#[test]
fn l03_signal_storm_during_io() {
    let mut srv = Server::start(&["memory", "16M"]);
    let pid = srv.child.id();
    let (mut s, _, _) = client(&srv, false, false);
    let storm = thread::spawn(move || {
        for _ in 0..100 {
            // Signals whose default action is to be ignored (USR1 would
            // kill nbdkit as well: its default action is to terminate).
            for sig in ["WINCH", "CHLD", "URG"] {
                let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
            }
        }
    });
    let data = pattern(64 * 1024, 9);
    for i in 0..200u64 {
        write_ok(&mut s, i, (i % 256) * 65536, &data);
    }
    storm.join().unwrap();
    assert_eq!(read_ok(&mut s, false, 1, 0, 65536), data);
    drop(s);
    srv.health_check();
    // Then a storm of SIGTERM and SIGHUP: one clean exit, no deadlock.
    for _ in 0..100 {
        for sig in ["TERM", "HUP"] {
            let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        if let Ok(Some(st)) = srv.child.try_wait() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "no exit after a SIGTERM storm");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn p02_half_the_requests_fail_and_a_retrying_client_loses_nothing() {
    let mut srv = Server::start(&["--filter=error", "memory", "4M", "error-rate=50%"]);
    let (mut s, size, _) = client(&srv, false, false);
    let chunk = 64 * 1024;
    let mut model = vec![0u8; size as usize];
    let mut failures = 0;
    for i in 0..(size as usize / chunk) {
        let d = pattern(chunk, 100 + i as u64);
        loop {
            request(&mut s, 0, CMD_WRITE, i as u64, (i * chunk) as u64, chunk as u32, &d);
            let (e, c) = read_simple_reply(&mut s);
            assert_eq!(c, i as u64);
            if e == 0 {
                break;
            }
            assert_eq!(e, 5, "EIO");
            failures += 1;
        }
        model[i * chunk..(i + 1) * chunk].copy_from_slice(&d);
    }
    request(&mut s, 0, CMD_FLUSH, 7, 0, 0, b"");
    assert_eq!(read_simple_reply(&mut s).0, 0, "flush is never failed by the error filter");
    // Read back with retries too, and compare with the model.
    for i in 0..(size as usize / chunk) {
        let got = loop {
            request(&mut s, 0, CMD_READ, 9, (i * chunk) as u64, chunk as u32, b"");
            let (e, _) = read_simple_reply(&mut s);
            if e == 0 {
                let mut d = vec![0; chunk];
                s.read_exact(&mut d).unwrap();
                break d;
            }
            failures += 1;
        };
        assert!(got == model[i * chunk..(i + 1) * chunk], "chunk {i}");
    }
    assert!(failures > 20, "only {failures} injected errors at 50%");
    drop(s);
    // The health check, retrying: half of all reads fail by design here.
    assert!(srv.alive());
    let (mut s, _, _) = client(&srv, false, false);
    let got = loop {
        request(&mut s, 0, CMD_READ, 1, 0, 512, b"");
        if read_simple_reply(&mut s).0 == 0 {
            let mut d = vec![0; 512];
            s.read_exact(&mut d).unwrap();
            break d;
        }
    };
    assert!(got == model[..512]);
    assert!(srv.alive());
}

#[test]
fn p18_backing_file_truncated_while_served() {
    let dir = TempDir::new("p18");
    let img = dir.path("disk.img");
    std::fs::write(&img, pattern(1 << 20, 3)).unwrap();
    let mut srv = Server::start(&["file", img.to_str().unwrap()]);
    let (mut s, _, _) = client(&srv, false, false);
    assert_eq!(read_ok(&mut s, false, 1, 0, 4096), pattern(1 << 20, 3)[..4096].to_vec());
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(4096).unwrap();
    // Past the new end: an error reply (EIO), never a crash or SIGBUS.
    request(&mut s, 0, CMD_READ, 2, 512 * 1024, 4096, b"");
    let (e, c) = read_simple_reply(&mut s);
    assert_eq!((e, c), (5, 2));
    assert_eq!(read_ok(&mut s, false, 3, 0, 4096), pattern(1 << 20, 3)[..4096].to_vec());
    drop(s);
    assert!(srv.alive());
    // The export's size is taken at open: a new client sees 4096 bytes.
    let out = run_ok("nbdinfo", &["--size", &srv.uri()]);
    assert_eq!(out.trim(), "4096");
}

/// Big READs of the memory plugin are sent straight from its pages, which
/// stay read-locked while the reply is written. A client that asks for
/// data and then stops reading must not keep them locked: a writer on
/// another connection gets through, and the stalled client, once it reads
/// again, gets complete, well-formed replies (each page old or new data).
#[test]
fn lent_pages_are_not_held_by_a_client_that_stops_reading() {
    let mut srv = Server::start(&["memory", "64M"]);
    let (mut w, _, _) = client(&srv, false, false);
    let old = pattern(8 << 20, 1);
    write_ok(&mut w, 1, 0, &old);
    for sr in [false, true] {
        let (mut r, _, _) = client(&srv, sr, false);
        // 16 × 8 MiB requested, far more than the socket holds; not read.
        let n = 16;
        for i in 0..n {
            request(&mut r, 0, CMD_READ, 100 + i, 0, 8 << 20, b"");
        }
        thread::sleep(Duration::from_millis(300));
        // The writer must not wait for the stalled reader.
        let new = pattern(8 << 20, 2 + u64::from(sr));
        // (A read timeout: the reply must come, not hang the test.)
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write_ok(&mut w, 2, 0, &new);
        let prev = old.clone();
        for i in 0..n {
            let data = if sr {
                read_chunks_data(&mut r, 100 + i, 0, 8 << 20)
            } else {
                expect_simple(&mut r, 100 + i, 0);
                read_n(&mut r, 8 << 20)
            };
            for (p, chunk) in data.chunks(32 << 10).enumerate() {
                let range = p * (32 << 10)..(p + 1) * (32 << 10);
                assert!(chunk == &prev[range.clone()] || chunk == &new[range.clone()] || chunk == &old[range],
                        "reply {i}, page {p}: torn or foreign data");
            }
        }
        write_ok(&mut w, 3, 0, &old);
        drop(r);
    }
    srv.health_check();
}

/// Big WRITE payloads of the memory plugin are read straight into fresh
/// pages, swapped in once the whole payload is there. A client that stalls
/// mid-payload locks nothing meanwhile (others read and write the same
/// pages), and when it goes on, its write lands whole.
#[test]
fn a_stalled_write_payload_holds_no_pages() {
    let mut srv = Server::start(&["memory", "64M"]);
    let (mut other, _, _) = client(&srv, true, false);
    other.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut slow, _, _) = client(&srv, false, false);
    let data = pattern(8 << 20, 7);
    let half = 3 << 20;
    request(&mut slow, 0, CMD_WRITE, 1, 4096, 8 << 20, &data[..half]);
    thread::sleep(Duration::from_millis(200));
    // Meanwhile: the old data (zeroes) reads back, and writes go through.
    assert_eq!(read_ok(&mut other, true, 2, 4096, 1 << 20), vec![0; 1 << 20]);
    write_ok(&mut other, 3, 0, &pattern(8192, 8));
    // The rest of the payload: the whole write, over the other one's data.
    slow.write_all(&data[half..]).unwrap();
    expect_simple(&mut slow, 1, 0);
    let mut want = pattern(8192, 8)[..4096].to_vec();
    want.extend_from_slice(&data);
    assert!(read_ok(&mut other, true, 4, 0, (want.len()) as u32) == want);
    srv.health_check();
}

/// The memory plugin's pages come from its own chunks: a full disk costs
/// about its size in RSS (musl's malloc added 14 %), and trimming it gives
/// the memory back.
#[test]
fn memory_pages_cost_their_size_and_trim_gives_them_back() {
    let mut srv = Server::start(&["memory", "256M"]);
    let (mut s, _, _) = client(&srv, false, false);
    let before = rss_kib(srv.child.id());
    let data = pattern(8 << 20, 3);
    for i in 0..32u64 {
        write_ok(&mut s, i, i * (8 << 20), &data);
    }
    let full = rss_kib(srv.child.id()) - before;
    assert!((256 * 1024..=(256 + 24) * 1024).contains(&full), "256 MiB of data took {full} KiB");
    request(&mut s, 0, 4 /* TRIM */, 99, 0, 256 << 20, b"");
    expect_simple(&mut s, 99, 0);
    let trimmed = rss_kib(srv.child.id()) - before;
    assert!(trimmed < 48 * 1024, "after trimming everything {trimmed} KiB stay");
    assert_eq!(read_ok(&mut s, false, 100, 100 << 20, 4096), vec![0; 4096]);
    srv.health_check();
}
