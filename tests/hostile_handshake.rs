//! Hostile handshakes: bad-input.md §3.1, cases H01–H35 (and H33b), each
//! through raw bytes on the Unix socket, asserting the "Ours" column and
//! ending with the health check.
//!
//! Not here: H33 (slowloris closed at `--timeout`) needs `--timeout`, which
//! the temporary command line does not have yet; the default handshake
//! timeout (10 s) is too slow for this suite. H33b needs no timeout (a new
//! client must be greeted while others idle in the handshake), so it is here.

mod common;
mod hostile_util;

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::*;
use hostile_util::*;

fn memory() -> Server {
    start(&["memory", "100M"])
}

/// After a handshake case: GO "" on the same connection and read 512 bytes.
fn go_and_read(s: &mut std::os::unix::net::UnixStream) {
    send_option(s, OPT_GO, &go_payload(b""));
    let infos = read_infos(s, OPT_GO);
    assert_eq!(export_info(&infos).0, SIZE_100M);
    assert_eq!(read_ok(s, false, 1, 0, 512), vec![0; 512]);
}

#[test]
fn h01_unknown_client_flags_close() {
    let mut srv = memory();
    for flags in [0xFFFF_FFFFu32, 1 | 4, 0x8000_0000] {
        let mut s = srv.connect();
        let g = read_n(&mut s, 18);
        assert_eq!(&g[16..], &[0, 3], "handshake flags FIXED_NEWSTYLE|NO_ZEROES");
        s.write_all(&flags.to_be_bytes()).unwrap();
        assert!(eof_without_data(&mut s), "flags {flags:#x} must close");
    }
    srv.health_check();
}

#[test]
fn h02_non_fixed_client_gets_only_export_name() {
    let mut srv = memory();
    let mut s = srv.connect();
    read_n(&mut s, 18);
    s.write_all(&0u32.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_GO, &go_payload(b""));
    expect_reply(&mut s, OPT_GO, ERR_INVALID);
    // No structured replies, no TLS, no meta contexts.
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, ERR_INVALID);
    send_option(&mut s, OPT_STARTTLS, b"");
    expect_reply(&mut s, OPT_STARTTLS, ERR_INVALID);
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, ERR_INVALID);
    send_option(&mut s, OPT_LIST, b"");
    expect_reply(&mut s, OPT_LIST, ERR_INVALID);
    // EXPORT_NAME is honoured: size, flags and 124 zeroes (no NO_ZEROES).
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    let r = read_n(&mut s, 134);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE_100M);
    let eflags = u16::from_be_bytes([r[8], r[9]]);
    assert_eq!(eflags & EF_SEND_DF, 0, "no DF without structured replies");
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(read_ok(&mut s, false, 7, 0, 512), vec![0; 512]);
    expect_fail(&mut s, false, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    srv.health_check();
}

#[test]
fn h03_bad_option_magic_closes() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    let mut bad = option_bytes(OPT_GO, 6, &go_payload(b""));
    bad[7] = b'X'; // IHAVEOPX
    send_raw(&mut s, &bad);
    assert!(eof_without_data(&mut s));
    // Also after a good option.
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, REP_ACK);
    let mut bad = option_bytes(OPT_LIST, 0, b"");
    bad[0] = 0;
    send_raw(&mut s, &bad);
    assert!(eof_without_data(&mut s));
    srv.health_check();
}

#[test]
fn h04_optlen_4g_closes_at_once() {
    let mut srv = memory();
    let rss = rss_kib(srv.child.id());
    for option in [OPT_GO, OPT_INFO, OPT_LIST, OPT_SET_META, OPT_LIST_META, 0x1234] {
        let mut s = srv.connect();
        newstyle(&mut s);
        send_raw(&mut s, &option_bytes(option, u32::MAX, b""));
        assert_closed_quickly(&mut s, 3);
    }
    let grown = rss_kib(srv.child.id()).saturating_sub(rss);
    assert!(grown < 16 * 1024, "server RSS grew by {grown} KiB");
    srv.health_check();
}

#[test]
fn h05_optlen_65m_closes_without_waiting_for_data() {
    let mut srv = memory();
    let rss = rss_kib(srv.child.id());
    for option in [OPT_GO, OPT_INFO, 0x1234] {
        let mut s = srv.connect();
        newstyle(&mut s);
        send_raw(&mut s, &option_bytes(option, 65 << 20, b""));
        assert_closed_quickly(&mut s, 3);
    }
    // Meta-context options are capped at 1 MiB.
    let mut s = srv.connect();
    newstyle(&mut s);
    send_raw(&mut s, &option_bytes(OPT_SET_META, (1 << 20) + 1, b""));
    assert_closed_quickly(&mut s, 3);
    let grown = rss_kib(srv.child.id()).saturating_sub(rss);
    assert!(grown < 16 * 1024, "server RSS grew by {grown} KiB");

    // Under the cap: an unknown option's payload is streamed away, and a
    // GO longer than its structural maximum is invalid; both stay in sync.
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, 0x1234, &pattern(8 << 20, 5));
    expect_reply(&mut s, 0x1234, ERR_UNSUP);
    let mut go = go_payload(b"");
    go.resize(200_000, 0);
    send_option(&mut s, OPT_GO, &go);
    expect_reply(&mut s, OPT_GO, ERR_INVALID);
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h06_eof_at_every_byte_of_a_valid_transcript() {
    let mut srv = memory();
    let pid = srv.child.id();
    // A valid client transcript: flags, SR, SET_META, GO, READ, BLOCK_STATUS, DISC.
    let mut t = 3u32.to_be_bytes().to_vec();
    t.extend(option_bytes(OPT_SR, 0, b""));
    let m = meta_payload(b"", &[b"base:allocation"]);
    t.extend(option_bytes(OPT_SET_META, m.len() as u32, &m));
    t.extend(option_bytes(OPT_GO, 6, &go_payload(b"")));
    t.extend(request_bytes(0, CMD_READ, 1, 0, 512));
    t.extend(request_bytes(0, CMD_BLOCK_STATUS, 2, 0, 4096));
    t.extend(request_bytes(0, CMD_DISC, 3, 0, 0));
    // The first connection sets the baseline (lazy initialisation).
    srv.health_check();
    let fds = fd_count(pid);
    // EOF after 12 of the 16 bytes of the first option header is k = 4 + 12.
    for k in 0..=t.len() {
        let mut s = srv.connect();
        read_n(&mut s, 18);
        s.write_all(&t[..k]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(closed(&mut s), "server kept the connection open after EOF at byte {k}");
        assert!(srv.alive(), "server died after EOF at byte {k}");
    }
    eventually("descriptors back to baseline", || fd_count(pid) <= fds);
    srv.health_check();
}

#[test]
fn h07_unknown_option_skipped_then_list_works() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, 0x1234, b"0123456789");
    expect_reply(&mut s, 0x1234, ERR_UNSUP);
    send_option(&mut s, OPT_LIST, b"");
    let mut servers = 0;
    loop {
        let (o, t, p) = read_option_reply(&mut s);
        assert_eq!(o, OPT_LIST);
        match t {
            REP_SERVER => {
                let n = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
                assert!(4 + n <= p.len());
                servers += 1;
            }
            REP_ACK => break,
            t => panic!("LIST reply 0x{t:x}"),
        }
    }
    assert!(servers >= 1);
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h08_list_with_payload_is_invalid_and_consumed() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_LIST, b"IHAVEOPT\0\0\0\x07\0\0\0\x06");
    expect_reply(&mut s, OPT_LIST, ERR_INVALID);
    send_option(&mut s, OPT_LIST, b"");
    assert_eq!(read_option_reply(&mut s).1, REP_SERVER);
    expect_reply(&mut s, OPT_LIST, REP_ACK);
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h09_abort_acks_then_closes() {
    let mut srv = memory();
    for payload in [&b""[..], &[0x55; 100][..]] {
        let mut s = srv.connect();
        newstyle(&mut s);
        send_option(&mut s, OPT_ABORT, payload);
        expect_reply(&mut s, OPT_ABORT, REP_ACK);
        assert!(eof_without_data(&mut s));
    }
    srv.health_check();
}

#[test]
fn h10_structured_reply_twice() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, REP_ACK);
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, ERR_INVALID);
    // Structured replies stay on.
    send_option(&mut s, OPT_GO, &go_payload(b""));
    let (_, eflags) = export_info(&read_infos(&mut s, OPT_GO));
    assert_ne!(eflags & EF_SEND_DF, 0);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h11_structured_reply_with_payload() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_SR, b"x");
    expect_reply(&mut s, OPT_SR, ERR_INVALID);
    // Not enabled: GO has no DF, READ gets a simple reply.
    send_option(&mut s, OPT_GO, &go_payload(b""));
    let (_, eflags) = export_info(&read_infos(&mut s, OPT_GO));
    assert_eq!(eflags & EF_SEND_DF, 0);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h12_starttls_without_tls_is_policy() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_STARTTLS, b"");
    expect_reply(&mut s, OPT_STARTTLS, ERR_POLICY);
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h13_info_go_shorter_than_6() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    for option in [OPT_GO, OPT_INFO] {
        for n in 0..6 {
            send_option(&mut s, option, &[0u8; 6][..n]);
            expect_reply(&mut s, option, ERR_INVALID);
        }
    }
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h14_namelen_beyond_optlen() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    for (namelen, name) in [(9u32, &b"abc"[..]), (4, b"abc"), (1, b"")] {
        let mut p = namelen.to_be_bytes().to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(&0u16.to_be_bytes());
        for option in [OPT_GO, OPT_INFO] {
            send_option(&mut s, option, &p);
            expect_reply(&mut s, option, ERR_INVALID);
        }
    }
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h15_namelen_4g_minus_1() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    for namelen in [u32::MAX, u32::MAX - 5, 0x8000_0000] {
        let mut p = namelen.to_be_bytes().to_vec();
        p.extend_from_slice(b"abc\0\0");
        for option in [OPT_GO, OPT_INFO] {
            send_option(&mut s, option, &p);
            expect_reply(&mut s, option, ERR_INVALID);
        }
    }
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h16_nrinfos_inconsistent_and_65535_infos() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    // 500 declared, 1 present.
    let mut p = info_payload(b"", &[INFO_NAME]);
    p[4..6].copy_from_slice(&500u16.to_be_bytes());
    for option in [OPT_GO, OPT_INFO] {
        send_option(&mut s, option, &p);
        expect_reply(&mut s, option, ERR_INVALID);
    }
    // 0 declared, 1 present.
    let mut p = info_payload(b"", &[INFO_NAME]);
    p[4..6].copy_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, OPT_INFO, &p);
    expect_reply(&mut s, OPT_INFO, ERR_INVALID);
    // A consistent 65535 (every type, known ones included) is fine.
    let all: Vec<u16> = (0..=65534).collect();
    send_option(&mut s, OPT_INFO, &info_payload(b"", &all));
    let infos = read_infos(&mut s, OPT_INFO);
    assert_eq!(export_info(&infos).0, SIZE_100M);
    let types: Vec<u16> = infos.iter().map(|i| i.0).collect();
    assert!(types.iter().all(|t| *t <= INFO_BLOCK_SIZE), "only known info types: {types:?}");
    assert!(types.contains(&INFO_NAME));
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h17_name_lengths_up_to_4096() {
    let mut srv = memory();
    for n in [256usize, 257, 4096] {
        let name = vec![b'n'; n];
        let mut s = srv.connect();
        newstyle(&mut s);
        send_option(&mut s, OPT_GO, &info_payload(&name, &[INFO_NAME]));
        let infos = read_infos(&mut s, OPT_GO);
        assert_eq!(export_info(&infos).0, SIZE_100M, "name of {n} bytes");
        assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    }
    let mut s = srv.connect();
    newstyle(&mut s);
    for option in [OPT_INFO, OPT_GO] {
        send_option(&mut s, option, &go_payload(&[b'n'; 4097]));
        expect_reply(&mut s, option, ERR_INVALID);
    }
    go_and_read(&mut s);
    srv.health_check();
}

#[test]
fn h18_name_with_nul() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    for option in [OPT_INFO, OPT_GO] {
        send_option(&mut s, option, &go_payload(b"a\0b"));
        expect_reply(&mut s, option, ERR_INVALID);
    }
    go_and_read(&mut s);
    // EXPORT_NAME cannot answer: it closes.
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"a\0b");
    assert!(eof_without_data(&mut s));
    srv.health_check();
}

/// A file-plugin `dir=` layout: base/served/disk (the export directory)
/// and base/exports/disk1 (outside it).
fn file_dir_server() -> (Server, TempDir) {
    let base = TempDir::new("hdir");
    std::fs::create_dir_all(base.path("served")).unwrap();
    std::fs::create_dir_all(base.path("exports")).unwrap();
    std::fs::write(base.path("served/disk"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(base.path("exports/disk1"), vec![0x5Au8; 1 << 20]).unwrap();
    let dir = format!("dir={}", base.path("served").display());
    // Logged to a file: the open errors quote names of up to 4 KiB.
    (start_logged(&[], &["file", &dir]).0, base)
}

#[test]
fn h19_non_utf8_and_dotdot_names() {
    // memory accepts any name (nbdkit parity)…
    let mut srv = memory();
    for name in [&b"\xff\xfe\x80x"[..], b"../exports/disk1", b"../../../etc/passwd"] {
        let mut s = srv.connect();
        newstyle(&mut s);
        send_option(&mut s, OPT_GO, &go_payload(name));
        assert_eq!(export_info(&read_infos(&mut s, OPT_GO)).0, SIZE_100M);
        assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
    // …but a file dir= export never escapes its directory.
    let (mut srv, _base) = file_dir_server();
    let mut s = srv.connect();
    newstyle(&mut s);
    for name in [&b"../exports/disk1"[..], b"..", b".", b"\xff\xfe", b"disk/", b"/etc/passwd"] {
        for option in [OPT_INFO, OPT_GO] {
            send_option(&mut s, option, &go_payload(name));
            let p = expect_reply(&mut s, option, ERR_UNKNOWN);
            assert!(p.len() <= 4096);
        }
    }
    send_option(&mut s, OPT_GO, &go_payload(b"disk"));
    assert_eq!(export_info(&read_infos(&mut s, OPT_GO)).0, 1 << 20);
    health_check_export(&mut srv, "disk");
}

#[test]
fn h20_unknown_info_types_are_ignored() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_INFO, &info_payload(b"", &[0x7777]));
    let infos = read_infos(&mut s, OPT_INFO);
    assert_eq!(infos.iter().map(|i| i.0).collect::<Vec<_>>(), vec![INFO_EXPORT]);
    send_option(&mut s, OPT_GO, &info_payload(b"", &[0x7777, INFO_NAME, 0x7777]));
    let infos = read_infos(&mut s, OPT_GO);
    assert_eq!(infos.iter().map(|i| i.0).collect::<Vec<_>>(), vec![INFO_EXPORT, INFO_NAME]);
    assert_eq!(export_info(&infos).0, SIZE_100M);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h21_unknown_export_stays_negotiating() {
    let (mut srv, _base) = file_dir_server();
    let mut s = srv.connect();
    newstyle(&mut s);
    let long = vec![b'q'; 4096];
    for name in [&b"nope"[..], &long] {
        for option in [OPT_INFO, OPT_GO] {
            send_option(&mut s, option, &go_payload(name));
            let msg = expect_reply(&mut s, option, ERR_UNKNOWN);
            assert!(msg.len() <= 4096, "error text of {} bytes", msg.len());
            assert!(std::str::from_utf8(&msg).is_ok(), "error text must be UTF-8");
        }
    }
    // Still negotiating: a good export works.
    send_option(&mut s, OPT_GO, &go_payload(b"disk"));
    assert_eq!(export_info(&read_infos(&mut s, OPT_GO)).0, 1 << 20);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    health_check_export(&mut srv, "disk");
}

#[test]
fn h22_export_name_of_unknown_export_closes() {
    let (mut srv, _base) = file_dir_server();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert!(eof_without_data(&mut s));
    health_check_export(&mut srv, "disk");
}

#[test]
fn h23_export_name_too_long_closes() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_raw(&mut s, &option_bytes(OPT_EXPORT_NAME, 4097, &[b'e'; 4097]));
    assert!(eof_without_data(&mut s));
    let mut s = srv.connect();
    newstyle(&mut s);
    send_raw(&mut s, &option_bytes(OPT_EXPORT_NAME, u32::MAX, b"eee"));
    assert_closed_quickly(&mut s, 3);
    // 4096 is fine (NO_ZEROES was negotiated by `newstyle`: 10 bytes).
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, &[b'e'; 4096]);
    let r = read_n(&mut s, 10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE_100M);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h24_info_info_go_read_and_open_counts() {
    let dir = TempDir::new("h24");
    let file = dir.path("disk.img");
    let data = pattern(1 << 20, 24);
    std::fs::write(&file, &data).unwrap();
    let file = std::fs::canonicalize(&file).unwrap();
    let (mut srv, log) = start_logged(&[], &["file", &format!("file={}", file.display())]);
    let pid = srv.child.id();
    let opens = || std::fs::read_to_string(&log).unwrap().matches("open readonly=").count();

    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, REP_ACK);
    send_option(&mut s, OPT_LIST, b"");
    while read_option_reply(&mut s).1 != REP_ACK {}
    assert_eq!(opens(), 0, "no backend open before INFO/GO");
    assert_eq!(fds_on(pid, &file), 0);

    for (n, name) in [&b""[..], b"other"].into_iter().enumerate() {
        send_option(&mut s, OPT_INFO, &go_payload(name));
        assert_eq!(export_info(&read_infos(&mut s, OPT_INFO)).0, 1 << 20);
        eventually("one open per INFO", || opens() == n + 1);
        assert_eq!(fds_on(pid, &file), 0, "the backend is closed after INFO");
    }
    send_option(&mut s, OPT_GO, &go_payload(b""));
    assert_eq!(export_info(&read_infos(&mut s, OPT_GO)).0, 1 << 20);
    eventually("one open for GO", || opens() == 3);
    assert_eq!(fds_on(pid, &file), 1, "GO keeps the backend open");
    assert_eq!(read_ok(&mut s, true, 1, 4096, 4096), data[4096..8192]);
    drop(s);
    srv.health_check();
}

#[test]
fn h25_set_meta_before_structured_replies() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    let q = meta_payload(b"", &[b"base:allocation"]);
    send_option(&mut s, OPT_SET_META, &q);
    expect_reply(&mut s, OPT_SET_META, ERR_INVALID);
    // LIST is allowed without SR (id 0).
    send_option(&mut s, OPT_LIST_META, &q);
    let p = expect_reply(&mut s, OPT_LIST_META, REP_META_CONTEXT);
    assert_eq!(&p[..4], &[0, 0, 0, 0]);
    expect_reply(&mut s, OPT_LIST_META, REP_ACK);
    // Nothing was selected: BLOCK_STATUS fails even once SR is on.
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, REP_ACK);
    send_option(&mut s, OPT_GO, &go_payload(b""));
    read_infos(&mut s, OPT_GO);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    srv.health_check();
}

/// Structured-reply client up to the option phase.
fn sr_client(srv: &Server) -> std::os::unix::net::UnixStream {
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_SR, b"");
    expect_reply(&mut s, OPT_SR, REP_ACK);
    s
}

/// GO "" then a BLOCK_STATUS of 4096 bytes that must succeed.
fn go_and_block_status(s: &mut std::os::unix::net::UnixStream) {
    send_option(s, OPT_GO, &go_payload(b""));
    read_infos(s, OPT_GO);
    request(s, 0, CMD_BLOCK_STATUS, 9, 0, 4096, b"");
    let (flags, typ, cookie, p) = read_chunk(s);
    assert_eq!((flags, typ, cookie), (FLAG_DONE, CHUNK_BLOCK_STATUS, 9));
    assert_eq!(&p[..4], &1u32.to_be_bytes());
    assert_eq!(p.len(), 12);
}

#[test]
fn h26_meta_query_longer_than_4096() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    let mut q5000 = b"base:".to_vec();
    q5000.resize(5000, b'x');
    let mut q4097 = b"base:".to_vec();
    q4097.resize(4097, b'x');
    for q in [&q5000, &q4097] {
        for option in [OPT_LIST_META, OPT_SET_META] {
            send_option(&mut s, option, &meta_payload(b"", &[q]));
            expect_reply(&mut s, option, ERR_INVALID);
        }
    }
    // 4096 is a legal (unknown, ignored) query.
    let mut q4096 = b"base:".to_vec();
    q4096.resize(4096, b'x');
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[&q4096]));
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    // In sync: a normal selection works.
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    go_and_block_status(&mut s);
    srv.health_check();
}

#[test]
fn h27_set_meta_short_leaves_no_partial_state() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    let good = meta_payload(b"", &[b"base:allocation"]);
    send_option(&mut s, OPT_SET_META, &good);
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&3u32.to_be_bytes()); // 3 declared, 1 present
    send_option(&mut s, OPT_SET_META, &bad);
    expect_reply(&mut s, OPT_SET_META, ERR_INVALID);
    send_option(&mut s, OPT_GO, &go_payload(b""));
    read_infos(&mut s, OPT_GO);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h28_nr_queries_4g_is_rejected_at_once() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    let mut p = meta_payload(b"", &[]);
    p[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    for option in [OPT_LIST_META, OPT_SET_META] {
        let t = Instant::now();
        send_option(&mut s, option, &p);
        expect_reply(&mut s, option, ERR_INVALID);
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    }
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    go_and_block_status(&mut s);
    srv.health_check();
}

#[test]
fn h29_meta_option_with_trailing_junk() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    let mut p = meta_payload(b"", &[b"base:allocation"]);
    p.extend_from_slice(b"IHAVEOPT\0\0\0\x03\0\0\0\0junk");
    for option in [OPT_LIST_META, OPT_SET_META] {
        send_option(&mut s, option, &p);
        // ERR_INVALID, or accepted with the junk consumed: never out of sync.
        loop {
            let (o, t, _) = read_option_reply(&mut s);
            assert_eq!(o, option);
            match t {
                REP_META_CONTEXT => {}
                REP_ACK | ERR_INVALID => break,
                t => panic!("reply 0x{t:x}"),
            }
        }
    }
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    go_and_block_status(&mut s);
    srv.health_check();
}

#[test]
fn h30_second_set_with_only_unknown_context_clears_selection() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    send_option(&mut s, OPT_SET_META, &meta_payload(b"", &[b"x-unknown:context"]));
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    send_option(&mut s, OPT_GO, &go_payload(b""));
    read_infos(&mut s, OPT_GO);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h31_meta_context_for_another_export() {
    let mut srv = memory();
    let mut s = sr_client(&srv);
    send_option(&mut s, OPT_SET_META, &meta_payload(b"other", &[b"base:allocation"]));
    expect_reply(&mut s, OPT_SET_META, REP_META_CONTEXT);
    expect_reply(&mut s, OPT_SET_META, REP_ACK);
    send_option(&mut s, OPT_GO, &go_payload(b""));
    read_infos(&mut s, OPT_GO);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn h32_too_many_options_close_after_32() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    let mut answered = 0;
    for _ in 0..100 {
        send_raw(&mut s, &option_bytes(0x1234, 0, b""));
        let mut h = [0u8; 20];
        match std::io::Read::read_exact(&mut s, &mut h) {
            Ok(()) => {
                assert_eq!(u32::from_be_bytes(h[12..16].try_into().unwrap()), ERR_UNSUP);
                answered += 1;
            }
            Err(_) => break,
        }
    }
    assert_eq!(answered, 32, "the 33rd option must close the connection");
    assert!(closed(&mut s));
    srv.health_check();
}

#[test]
fn h33b_idle_handshakes_do_not_block_new_clients() {
    let mut srv = memory();
    // A: connected, never reads the greeting.
    let _a = srv.connect();
    // A2: read the greeting, sent flags, then idle.
    let mut a2 = srv.connect();
    newstyle(&mut a2);
    // A3: idle in the middle of an option.
    let mut a3 = srv.connect();
    newstyle(&mut a3);
    a3.write_all(&option_bytes(OPT_GO, 6, b"\0\0")).unwrap();
    let t = Instant::now();
    let mut b = srv.connect();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let g = read_n(&mut b, 18);
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert!(t.elapsed() < Duration::from_secs(2), "greeting took {:?}", t.elapsed());
    srv.health_check();
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn h34_random_bytes_after_greeting_close() {
    let mut srv = memory();
    // Straight after the greeting (the first 4 bytes are bad client flags).
    let junk = pattern(4096, 34);
    assert_ne!(u32::from_be_bytes(junk[..4].try_into().unwrap()) & !3, 0);
    let mut s = srv.connect();
    read_n(&mut s, 18);
    send_raw(&mut s, &junk);
    assert!(closed(&mut s));
    // After valid client flags (bad option magic).
    let mut s = srv.connect();
    newstyle(&mut s);
    send_raw(&mut s, &junk);
    assert!(closed(&mut s));
    // In the transmission phase (bad request magic).
    let (mut s, _, _) = client(&srv, true, false);
    send_raw(&mut s, &junk);
    assert!(closed(&mut s));
    srv.health_check();
}

#[test]
fn h35_oldstyle_ignores_newstyle_client_bytes() {
    let mut srv = start_with(&["-o"], &["memory", "100M"]);
    let greeting = |s: &mut std::os::unix::net::UnixStream| {
        let g = read_n(s, 152);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], &0x0000_4202_8186_1253u64.to_be_bytes());
        assert_eq!(u64::from_be_bytes(g[16..24].try_into().unwrap()), SIZE_100M);
        assert_eq!(&g[24..26], &[0, 0], "no handshake flags in oldstyle");
        assert!(g[28..].iter().all(|&b| b == 0));
    };
    // A newstyle client: its flags and GO are not a request: close.
    let mut s = srv.connect();
    greeting(&mut s);
    let mut nb = 3u32.to_be_bytes().to_vec();
    nb.extend(option_bytes(OPT_GO, 6, &go_payload(b"")));
    nb.extend(option_bytes(OPT_LIST, 0, b""));
    assert!(nb.len() >= 28, "at least one request header's worth of bytes");
    send_raw(&mut s, &nb);
    assert!(eof_without_data(&mut s));
    // Newstyle bytes sent before reading the greeting.
    let mut s = srv.connect();
    send_raw(&mut s, &nb);
    greeting(&mut s);
    assert!(eof_without_data(&mut s));
    // A client that closes at once, before or after the greeting.
    drop(srv.connect());
    let mut s = srv.connect();
    greeting(&mut s);
    drop(s);
    // A real oldstyle client works.
    let mut s = srv.connect();
    greeting(&mut s);
    let data = pattern(4096, 35);
    write_ok(&mut s, 1, 8192, &data);
    assert_eq!(read_ok(&mut s, false, 2, 8192, 4096), data);
    drop(s);
    srv.health_check();
    let mut m = Model::new(SIZE_100M);
    m.write(8192, &data);
    m.verify(&srv);
}
