//! Load and resource limits (bad-input.md §3.4): R01 1000 concurrent
//! connections, R03 connect/handshake/close churn with a fifth aborted
//! mid-handshake (fds and RSS back to baseline), R09 a client that queues
//! 2000 × 1 MiB READs and never reads a reply. Each is bounded to about
//! 20 s on the 2-core test machine; every one ends with a health check
//! through a fresh raw connection.

mod common;
mod hostile_util;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_util::*;

/// Raises this process's RLIMIT_NOFILE soft limit to at least `want`
/// (up to the hard limit); the server inherits it.
fn raise_nofile(want: u64) {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_cur < want {
            rl.rlim_cur = want.min(rl.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
        }
    }
    assert!(rl.rlim_cur >= want, "RLIMIT_NOFILE hard limit {} is below {want}", rl.rlim_max);
}

/// Peak resident set size of a process, in KiB.
fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Threads of a process.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// Client flags (fixed newstyle, no zeroes) and GO "" with no info
/// requests: what a client sends after the greeting.
fn go_bytes() -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend(option_bytes(OPT_GO, 6, &info_payload(b"", &[])));
    v
}

/// Reads the greeting and the replies to GO up to the ACK.
fn read_go(s: &mut UnixStream) -> io::Result<()> {
    let g = read_exact_n(s, 18)?;
    if &g[..16] != b"NBDMAGICIHAVEOPT" {
        return Err(io::Error::other("bad greeting"));
    }
    loop {
        let h = read_exact_n(s, 20)?;
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        read_exact_n(s, len as usize)?;
        match typ {
            REP_ACK => return Ok(()),
            REP_INFO => {}
            t => return Err(io::Error::other(format!("GO failed: 0x{t:x}"))),
        }
    }
}

/// Reads a simple reply to READ with `len` bytes of data.
fn read_simple_data(s: &mut UnixStream, cookie: u64, len: usize) -> io::Result<Vec<u8>> {
    let h = read_exact_n(s, 16)?;
    if h[..4] != 0x6744_6698u32.to_be_bytes() || h[4..8] != [0; 4] || h[8..16] != cookie.to_be_bytes() {
        return Err(io::Error::other(format!("bad READ reply {h:02x?}")));
    }
    read_exact_n(s, len)
}

/// The health check, with raw bytes (no client program needed): a fresh
/// connection negotiates, reads 512 bytes, and they are `want`.
fn raw_health(srv: &mut Server, offset: u64, want: &[u8]) {
    assert!(srv.alive(), "server died");
    let mut s = srv.connect();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&go_bytes()).unwrap();
    read_go(&mut s).expect("health check: GO");
    s.write_all(&request_bytes(0, CMD_READ, 9, offset, want.len() as u32)).unwrap();
    let got = read_simple_data(&mut s, 9, want.len()).expect("health check: READ");
    assert!(got == want, "health check: wrong data");
    assert!(srv.alive(), "server died");
}

/// Fills the export with `pattern(size, seed)` through one connection.
fn fill(srv: &Server, size: u64, seed: u64) -> Vec<u8> {
    let data = pattern(size as usize, seed);
    let (mut s, _, _) = client(srv, false, false);
    for (i, c) in data.chunks(1 << 20).enumerate() {
        write_ok(&mut s, i as u64, (i as u64) << 20, c);
    }
    data
}

/// Waits up to `secs` for the server's fd count to come down to `limit`.
fn fds_settle(pid: u32, limit: usize, secs: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = fd_count(pid);
        if n <= limit || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// R01: 1000 connections open at once, each completing GO and reading
/// 4 KiB (checked against what was written); all succeed, quickly, and
/// the server's RSS stays under 200 MB.
#[test]
fn r01_thousand_concurrent_connections() {
    const CONNS: usize = 1000;
    const THREADS: usize = 20;
    const SIZE: u64 = 4 << 20;
    raise_nofile(CONNS as u64 + 256);
    let mut srv = start(&["memory", "4M"]);
    let pid = srv.child.id();
    let data = Arc::new(fill(&srv, SIZE, 1));
    let fd0 = fd_count(pid);
    let t0 = Instant::now();
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (sock, data, barrier) = (srv.sock.clone(), data.clone(), barrier.clone());
            thread::spawn(move || {
                let per = CONNS / THREADS;
                let run = || -> io::Result<Vec<UnixStream>> {
                    let mut conns = Vec::with_capacity(per);
                    for i in 0..per {
                        let mut s = UnixStream::connect(&sock)?;
                        s.set_read_timeout(Some(Duration::from_secs(20)))?;
                        let n = (t * per + i) as u64;
                        let mut b = go_bytes();
                        b.extend(request_bytes(0, CMD_READ, n, (n * 4096) % SIZE, 4096));
                        s.write_all(&b)?;
                        conns.push(s);
                    }
                    for (i, s) in conns.iter_mut().enumerate() {
                        let n = (t * per + i) as u64;
                        read_go(s)?;
                        let got = read_simple_data(s, n, 4096)?;
                        let off = ((n * 4096) % SIZE) as usize;
                        if got[..] != data[off..off + 4096] {
                            return Err(io::Error::other(format!("connection {n}: wrong data")));
                        }
                    }
                    Ok(conns)
                };
                let r = run();
                barrier.wait(); // every connection is still open here
                barrier.wait();
                r.map(|c| c.len())
            })
        })
        .collect();
    barrier.wait();
    let elapsed = t0.elapsed();
    let (rss, fds, nthreads) = (rss_kib(pid), fd_count(pid), threads(pid));
    barrier.wait();
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap().expect("a connection failed")).sum();
    let hwm = hwm_kib(pid);
    eprintln!(
        "r01: {ok} connections in {elapsed:?}; server with all open: RSS {} MiB, peak {} MiB, {fds} fds, {nthreads} threads",
        rss >> 10,
        hwm >> 10
    );
    assert_eq!(ok, CONNS);
    assert!(fds >= CONNS, "the server had only {fds} fds with {CONNS} clients connected");
    assert!(elapsed < Duration::from_secs(15), "1000 connections took {elapsed:?}");
    assert!(hwm < 200 * 1024, "server peak RSS {} MiB", hwm >> 10);
    let after = fds_settle(pid, fd0 + 3, 10);
    assert!(after <= fd0 + 3, "server fds: {fd0} before, {after} after all clients left");
    raw_health(&mut srv, 8192, &data[8192..8192 + 512]);
}

/// One churn cycle. Every fifth one aborts mid-handshake, at one of five
/// points; the others complete GO, some read, some say DISC, some just close.
fn churn_cycle(sock: &Path, i: usize) -> io::Result<()> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    if i.is_multiple_of(5) {
        match (i / 5) % 5 {
            0 => {}
            1 => {
                read_exact_n(&mut s, 18)?;
            }
            2 => {
                read_exact_n(&mut s, 18)?;
                let mut b = 3u32.to_be_bytes().to_vec();
                b.extend_from_slice(&option_bytes(OPT_GO, 100, b"")[..10]);
                s.write_all(&b)?;
            }
            3 => {
                let mut b = 3u32.to_be_bytes().to_vec();
                b.extend(option_bytes(OPT_GO, 100, &[0; 20]));
                s.write_all(&b)?;
                read_exact_n(&mut s, 18)?;
            }
            _ => {
                let mut b = 3u32.to_be_bytes().to_vec();
                b.extend(option_bytes(OPT_SR, 0, b""));
                s.write_all(&b)?;
                read_exact_n(&mut s, 18 + 20)?;
            }
        }
        return Ok(()); // drop: hang up mid-handshake
    }
    let mut b = go_bytes();
    let read = i.is_multiple_of(3);
    if read {
        b.extend(request_bytes(0, CMD_READ, 1, (i as u64 * 512) % (1 << 20), 512));
    }
    if i.is_multiple_of(2) {
        b.extend(request_bytes(0, CMD_DISC, 2, 0, 0));
    }
    s.write_all(&b)?;
    read_go(&mut s)?;
    if read {
        read_simple_data(&mut s, 1, 512)?;
    }
    Ok(())
}

fn churn(sock: &Path, cycles: usize, threads: usize) {
    let per = cycles / threads;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let sock = sock.to_path_buf();
            thread::spawn(move || {
                for i in t * per..(t + 1) * per {
                    churn_cycle(&sock, i).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

/// R03: 5000 connect/handshake/close cycles from 4 threads, a fifth
/// aborted mid-handshake; the server's fd count and RSS come back to
/// their baseline (after a warm-up of the same load).
///
/// RSS is about 4.5 MiB here and moves by ±600 KiB between rounds of
/// this churn with no trend (8 rounds, 40,000 cycles: 4528, 5128, 4632,
/// 4636, 4892, 4892, 4776, 4904 KiB): allocator and thread-stack noise.
/// So the bound is +5% plus 1 MiB; a leak of 256 bytes a cycle fails it.
#[test]
fn r03_churn_returns_to_baseline() {
    let mut srv = start(&["memory", "1M"]);
    let pid = srv.child.id();
    churn(&srv.sock, 2000, 4); // warm-up: thread pool, allocator
    thread::sleep(Duration::from_millis(1000));
    let fd0 = fds_settle(pid, 0, 0);
    let rss0 = rss_kib(pid);
    let t0 = Instant::now();
    churn(&srv.sock, 5000, 4);
    let elapsed = t0.elapsed();
    let fd1 = fds_settle(pid, fd0 + 2, 5);
    thread::sleep(Duration::from_millis(1000));
    let rss1 = rss_kib(pid);
    eprintln!("r03: 5000 cycles in {elapsed:?}; fds {fd0} -> {fd1}; RSS {rss0} KiB -> {rss1} KiB; peak {} KiB", hwm_kib(pid));
    assert!(fd1 <= fd0 + 2, "fds {fd0} before the churn, {fd1} after");
    assert!(rss1 <= rss0 + rss0 / 20 + 1024, "RSS {rss0} KiB before the churn, {rss1} KiB after (more than +5% +1 MiB)");
    assert!(elapsed < Duration::from_secs(20), "5000 cycles took {elapsed:?}");
    raw_health(&mut srv, 0, &[0; 512]);
}

/// R09: a client queues 2000 × 1 MiB READs and never reads a reply. The
/// server's memory stays bounded (it stops reading requests once the
/// replies stall), other clients are served meanwhile, and nothing breaks
/// when the client hangs up.
#[test]
fn r09_client_that_never_reads_replies() {
    let mut srv = start(&["memory", "64M"]);
    let pid = srv.child.id();
    let data = fill(&srv, 64 << 20, 9);
    thread::sleep(Duration::from_millis(300));
    let fd0 = fd_count(pid);
    let rss0 = rss_kib(pid);
    let (mut s, _, _) = client(&srv, false, false);
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    // One write, so the kernel queues all 2000 headers (28-byte writes
    // each cost a socket buffer of overhead: only ~480 of them fit).
    let mut batch = Vec::with_capacity(2000 * 28);
    for i in 0..2000u64 {
        batch.extend(request_bytes(0, CMD_READ, i, (i % 63) << 20, 1 << 20));
    }
    let mut sent = 0;
    while sent < batch.len() {
        match s.write(&batch[sent..]) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) => panic!("send: {e}"),
        }
    }
    let sent = sent / 28;
    let mut peak = 0;
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(pid));
    }
    // Another client is served while the first one's replies are stuck.
    let t = Instant::now();
    raw_health(&mut srv, 3 << 20, &data[3 << 20..(3 << 20) + 512]);
    let health = t.elapsed();
    let stuck = rss_kib(pid);
    drop(s); // hang up with replies pending
    thread::sleep(Duration::from_millis(500));
    let fd1 = fds_settle(pid, fd0 + 2, 10);
    eprintln!(
        "r09: {sent} requests sent; RSS {rss0} KiB before, {peak} KiB peak while stalled, {stuck} KiB; \
         health check took {health:?}; fds {fd0} -> {fd1}"
    );
    assert!(peak < rss0 + 64 * 1024, "a client that never reads cost {} MiB", (peak - rss0) >> 10);
    assert!(health < Duration::from_secs(5), "health check took {health:?} while a client stalled");
    assert!(fd1 <= fd0 + 2, "fds {fd0} before, {fd1} after the client hung up");
    raw_health(&mut srv, 5 << 20, &data[5 << 20..(5 << 20) + 512]);
}


/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &st[st.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// R02: more clients than the server has fds (RLIMIT_NOFILE 64). accept()
/// fails with EMFILE: the server backs off (no busy loop), logs at a
/// bounded rate, serves the connections it has, and recovers when
/// clients leave.
#[test]
fn r02_fd_exhaustion_backs_off_and_recovers() {
    let dir = TempDir::new("r02");
    let sock = dir.path("sock");
    let log = dir.path("stderr.log");
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" --foreground --unix \"$1\" memory 1M")
        .arg(nbdkit_bin())
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&srv.sock).is_err() {
        assert!(srv.alive() && Instant::now() < deadline, "server did not start");
        thread::sleep(Duration::from_millis(10));
    }
    let pid = srv.child.id();
    // 100 clients: the first ~50 are accepted, the rest wait in the backlog.
    let conns: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(&srv.sock).unwrap()).collect();
    thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid) - cpu0;
    // Descriptors below the limit in use (an fd inherited from the test
    // runner may sit above it).
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<u32>().is_ok_and(|n| n < 64))
        .count();
    let lines = std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.contains("accept")).count();
    eprintln!("r02: {fds} fds at the limit; {cpu} ticks of CPU in 2 s; {lines} accept log lines");
    assert_eq!(fds, 64, "the server should be using every descriptor it may have");
    assert!(cpu < 50, "the server spun: {cpu} ticks of CPU in 2 s at EMFILE");
    assert!(lines <= 6, "{lines} lines of accept errors in ~2.5 s");
    drop(conns);
    // Clients gone: the server accepts again (the backlog drains first).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = UnixStream::connect(&srv.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&go_bytes()).unwrap();
        if read_go(&mut s).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not recover from EMFILE");
        thread::sleep(Duration::from_millis(100));
    }
    raw_health(&mut srv, 0, &[0; 512]);
}

/// R06: memory amplification across connections. Each connection may
/// hold `-t` (16) requests in flight plus the one it has read, each with
/// a payload or reply buffer of up to 64 MiB: about 1.1 GiB for a client
/// that queues 64 MiB READs and never reads a reply. Per connection that
/// is bounded (R09), but nothing bounds the sum: bad-input.md asks for a
/// global budget on in-flight payload bytes, with back-pressure (stop
/// reading requests) when it is spent. Three such clients here push the
/// server to about 2.7 GiB.
#[test]
fn r06_global_in_flight_budget() {
    const CLIENTS: usize = 3;
    let mut srv = start(&["memory", "1G"]);
    let pid = srv.child.id();
    let rss0 = rss_kib(pid);
    let mut conns = Vec::new();
    for _ in 0..CLIENTS {
        let (mut s, _, _) = client(&srv, false, false);
        let mut batch = Vec::new();
        for i in 0..32u64 {
            batch.extend(request_bytes(0, CMD_READ, i, (i % 15) << 26, 64 << 20));
        }
        s.write_all(&batch).unwrap();
        conns.push(s);
    }
    let mut peak = 0;
    for _ in 0..40 {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(pid));
    }
    drop(conns);
    eprintln!("r06: {CLIENTS} stalled clients: RSS {} MiB -> peak {} MiB", rss0 >> 10, peak >> 10);
    assert!(peak < rss0 + 1024 * 1024, "stalled clients cost {} MiB with no global budget", (peak - rss0) >> 10);
    thread::sleep(Duration::from_millis(500));
    raw_health(&mut srv, 0, &[0; 512]);
}

/// After a burst of large requests, an idle connection should give its
/// buffers back. Each connection's buffer pool keeps up to 8 buffers of
/// any size (up to 64 MiB each) for as long as the connection lives, so a
/// client that once pipelined 16 × 64 MiB READs and then idles pins about
/// 512 MiB of server memory (and N such clients N times that).
#[test]
fn idle_connection_releases_burst_buffers() {
    let mut srv = start(&["memory", "1G"]);
    let pid = srv.child.id();
    let rss0 = rss_kib(pid);
    let (mut s, _, _) = client(&srv, false, false);
    let mut batch = Vec::new();
    for i in 0..16u64 {
        batch.extend(request_bytes(0, CMD_READ, i, i << 26, 64 << 20));
    }
    s.write_all(&batch).unwrap();
    for _ in 0..16 {
        let (e, _) = read_simple_reply(&mut s);
        assert_eq!(e, 0);
        let mut left = 64usize << 20;
        let mut buf = vec![0; 1 << 20];
        while left > 0 {
            let n = s.read(&mut buf[..left.min(1 << 20)]).unwrap();
            assert!(n > 0);
            left -= n;
        }
    }
    thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid);
    eprintln!("burst: RSS {} MiB before, {} MiB with the connection idle", rss0 >> 10, idle >> 10);
    assert!(idle < rss0 + 128 * 1024, "an idle connection pins {} MiB", (idle - rss0) >> 10);
    drop(s);
    raw_health(&mut srv, 0, &[0; 512]);
}
