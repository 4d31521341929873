//! Hostile requests: bad-input.md §3.2, cases T01–T33 that apply to the
//! memory/null/file plugins and the readonly/delay/error filters, each
//! through raw bytes on the Unix socket (nbdsh where libnbd says it more
//! clearly), asserting the "Ours" column, ending with the health check and,
//! where data was written, a comparison of the whole export with a model.
//! Also the plugin/filter faults of §3.3 these layers can produce: P01,
//! P11, P15 (readonly half, in T20) and P19.
//!
//! Not here: T21 (FUA not advertised needs `eval can_fua=none`), T23
//! (misalignment needs the blocksize-policy filter) and T32 (a plugin that
//! returns success without filling the buffer needs sh/eval); T22 only in
//! the forms these plugins allow (see its test).

mod common;
mod hostile_util;

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_util::*;

fn memory() -> Server {
    start(&["memory", "100M"])
}

/// Both reply modes: simple (false) and structured (true).
const MODES: [bool; 2] = [false, true];

#[test]
fn t01_bad_request_magic_closes() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        let mut r = request_bytes(0, CMD_READ, 1, 0, 512);
        r[3] = 0x14; // 0x25609514, a reserved magic
        send_raw(&mut s, &r);
        assert!(eof_without_data(&mut s));
    }
    srv.health_check();
}

#[test]
fn t02_unknown_command() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        for cmd in [99u16, 8, 0xFFFF] {
            request(&mut s, 0, cmd, 77, 0, 512, b"");
            expect_simple(&mut s, 77, EINVAL);
        }
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn t03_unknown_flag_bits() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        for flag in [0x100u16, 0x40, 0x8000] {
            expect_fail(&mut s, sr, flag, CMD_READ, 0, 512, b"", EINVAL);
            // A WRITE with a bad flag: its payload is drained, nothing written.
            expect_fail(&mut s, sr, flag, CMD_WRITE, 0, 512, &[0xEE; 512], EINVAL);
        }
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t04_flag_on_the_wrong_command() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, eflags) = client(&srv, sr, false);
        assert_ne!(eflags & EF_SEND_FAST_ZERO, 0);
        expect_fail(&mut s, sr, FLAG_NO_HOLE, CMD_READ, 0, 512, b"", EINVAL);
        expect_fail(&mut s, sr, FLAG_FAST_ZERO, CMD_WRITE, 0, 512, &[0xEE; 512], EINVAL);
        expect_fail(&mut s, sr, FLAG_REQ_ONE, CMD_READ, 0, 512, b"", EINVAL);
        expect_fail(&mut s, sr, FLAG_DF, CMD_WRITE, 0, 512, &[0xEE; 512], EINVAL);
        expect_fail(&mut s, sr, FLAG_NO_HOLE, CMD_TRIM, 0, 512, b"", EINVAL);
        expect_fail(&mut s, sr, FLAG_DF, CMD_WRITE_ZEROES, 0, 512, b"", EINVAL);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t05_read_past_the_end() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        expect_fail(&mut s, sr, 0, CMD_READ, size - 256, 512, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_READ, size, 1, b"", EINVAL);
        assert_eq!(read_ok(&mut s, sr, 1, size - 512, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn t06_offset_plus_length_overflows() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, sr);
        let wrap = u64::MAX - 511; // 2^64-512, + 1024 wraps
        expect_fail(&mut s, sr, 0, CMD_READ, wrap, 1024, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_READ, 1 << 63, 512, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_WRITE, wrap, 1024, &[0xEE; 1024], ENOSPC);
        expect_fail(&mut s, sr, 0, CMD_WRITE_ZEROES, wrap, 1024, b"", ENOSPC);
        expect_fail(&mut s, sr, 0, CMD_TRIM, wrap, 1024, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_CACHE, wrap, 1024, b"", EINVAL);
        if sr {
            expect_fail(&mut s, sr, 0, CMD_BLOCK_STATUS, wrap, 1024, b"", EINVAL);
            expect_fail(&mut s, sr, 0, CMD_BLOCK_STATUS, u64::MAX, u32::MAX, b"", EINVAL);
        }
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t07_read_of_length_0() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        expect_fail(&mut s, sr, 0, CMD_READ, 0, 0, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_READ, size, 0, b"", EINVAL);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn t08_write_of_length_0() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        for offset in [0, size] {
            request(&mut s, 0, CMD_WRITE, 8, offset, 0, b"");
            let (e, c) = read_simple_reply(&mut s);
            assert_eq!(c, 8);
            assert!(e == ENOSPC || e == EINVAL, "zero-length WRITE: error {e}");
        }
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t09_write_past_the_end() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        // Nothing of it lands, not even the part inside the export.
        expect_fail(&mut s, sr, 0, CMD_WRITE, size - 256, 512, &[0xEE; 512], ENOSPC);
        expect_fail(&mut s, sr, 0, CMD_WRITE_ZEROES, size - 256, 512, b"", ENOSPC);
        assert_eq!(read_ok(&mut s, sr, 1, size - 512, 512), vec![0; 512]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t10_read_of_33m_is_served_up_to_the_advertised_maximum() {
    let mut srv = memory();
    let mut s = srv.connect();
    newstyle(&mut s);
    send_option(&mut s, OPT_GO, &info_payload(b"", &[INFO_BLOCK_SIZE]));
    let infos = read_infos(&mut s, OPT_GO);
    let bs = infos.iter().find(|i| i.0 == INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE advertised");
    assert_eq!(bs.1.len(), 12);
    let max = u32::from_be_bytes(bs.1[8..12].try_into().unwrap());
    assert_eq!(max, 64 << 20, "maximum payload");
    let mut m = Model::new(SIZE_100M);
    let data = pattern(33 << 20, 10);
    write_ok(&mut s, 1, MIB, &data);
    m.write(MIB, &data);
    assert!(read_ok(&mut s, false, 2, MIB, 33 << 20) == data, "33 MiB read back");
    let whole = read_ok(&mut s, false, 3, 0, max);
    assert!(whole[MIB as usize..][..data.len()] == data[..]);
    expect_fail(&mut s, false, 0, CMD_READ, 0, max + 1, b"", EINVAL);
    assert_eq!(read_ok(&mut s, false, 4, 0, 512), vec![0; 512]);
    srv.health_check();
    m.verify(&srv);
}

#[test]
fn t11_read_of_65m_is_einval() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        expect_fail(&mut s, sr, 0, CMD_READ, 0, 65 << 20, b"", EINVAL);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn t12_write_of_65m_is_drained_then_einval() {
    let mut srv = memory();
    let (mut s, _, _) = client(&srv, false, false);
    let rss = rss_kib(srv.child.id());
    let big = pattern(65 << 20, 12);
    expect_fail(&mut s, false, 0, CMD_WRITE, 0, big.len() as u32, &big, EINVAL);
    // Exactly 128 MiB, the most that is drained, is still drained.
    let huge = vec![0xEEu8; 128 << 20];
    expect_fail(&mut s, false, 0, CMD_WRITE, 0, huge.len() as u32, &huge, EINVAL);
    let grown = rss_kib(srv.child.id()).saturating_sub(rss);
    assert!(grown < 48 * 1024, "draining must not buffer the payload (RSS grew {grown} KiB)");
    // In sync, and nothing landed.
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    let data = pattern(4096, 121);
    write_ok(&mut s, 2, 4096, &data);
    drop(s);
    srv.health_check();
    let mut m = Model::new(SIZE_100M);
    m.write(4096, &data);
    m.verify(&srv);
}

#[test]
fn t13_write_header_claiming_3g_closes_at_once() {
    let mut srv = start(&["memory", "8G"]);
    for claim in [3u32 << 30, (128 << 20) + 1, u32::MAX] {
        let (mut s, _, _) = client(&srv, false, false);
        let rss = rss_kib(srv.child.id());
        send_raw(&mut s, &request_bytes(0, CMD_WRITE, 1, 0, claim));
        assert_closed_quickly(&mut s, 3);
        let grown = rss_kib(srv.child.id()).saturating_sub(rss);
        assert!(grown < 16 * 1024, "RSS grew by {grown} KiB for a {claim}-byte claim");
    }
    srv.health_check();
}

#[test]
fn t14_df_without_structured_replies() {
    let mut srv = memory();
    let (mut s, _, eflags) = client(&srv, false, false);
    assert_eq!(eflags & EF_SEND_DF, 0);
    expect_fail(&mut s, false, FLAG_DF, CMD_READ, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn t15_block_status_without_sr_or_context() {
    let mut srv = memory();
    let (mut s, _, _) = client(&srv, false, false);
    expect_fail(&mut s, false, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    let (mut s, _, _) = client(&srv, true, false);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn t16_block_status_4g_minus_1_on_8g() {
    const G8: u64 = 8 << 30;
    let configs: [&[&str]; 7] = [
        &["memory", "8G"],
        &["null", "8G"],
        &["--filter=readonly", "memory", "8G"],
        &["--filter=delay", "memory", "8G", "delay-extents=1ms"],
        &["--filter=error", "memory", "8G", "error-trim-rate=1"],
        &["--filter=readonly", "--filter=delay", "--filter=error", "null", "8G", "rdelay=1ms", "error-zero-rate=1"],
        &["--filter=error", "--filter=delay", "--filter=readonly", "memory", "8G", "delay-extents=1ms"],
    ];
    for args in configs {
        let mut srv = start(args);
        let (mut s, size, eflags) = client(&srv, true, true);
        assert_eq!(size, G8);
        let data = pattern(4096, 16);
        let wrote = eflags & EF_READ_ONLY == 0 && args.contains(&"memory");
        if wrote {
            write_ok(&mut s, 1, (4 << 30) + 65536, &data);
        }
        let mut cookie = 100;
        for offset in [0, 1 << 32, 4096, G8 - u64::from(u32::MAX)] {
            for req_one in [false, true] {
                cookie += 1;
                let flags = if req_one { FLAG_REQ_ONE } else { 0 };
                request(&mut s, flags, CMD_BLOCK_STATUS, cookie, offset, u32::MAX, b"");
                let (f, typ, c, p) = read_chunk(&mut s);
                assert_eq!((f, typ, c), (FLAG_DONE, CHUNK_BLOCK_STATUS, cookie), "{args:?} offset {offset} req_one {req_one}");
                let d = descriptors(&p);
                check_descriptors(&d, offset, u32::MAX, size, req_one);
                assert!(d.iter().all(|&(l, _)| l <= 0xFFFF_0000), "{args:?}: extents clamped to 0xFFFF0000: {d:?}");
                if offset == 0 {
                    // [0, 4G+64K) is one hole: a single clamped descriptor.
                    assert_eq!(d, vec![(0xFFFF_0000, 3)], "{args:?} req_one {req_one}");
                }
                if offset == 1 << 32 && wrote {
                    assert_eq!(d[0], (65536, 3), "{args:?}: hole before the written block");
                    if !req_one {
                        assert_eq!(d[1].1, 0, "{args:?}: the written block is data");
                    }
                }
            }
        }
        // Past the end is still EINVAL.
        expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, G8 - 512, u32::MAX, b"", EINVAL);
        if wrote {
            assert_eq!(read_ok(&mut s, true, 2, (4 << 30) + 65536, 4096), data);
        }
        drop(s);
        srv.health_check();
    }
}

#[test]
fn t17_block_status_of_length_0() {
    let mut srv = memory();
    let (mut s, _, _) = client(&srv, true, true);
    expect_fail(&mut s, true, 0, CMD_BLOCK_STATUS, 0, 0, b"", EINVAL);
    expect_fail(&mut s, true, FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4096, 0, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn t18_flush_with_offset_or_length() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        expect_fail(&mut s, sr, 0, CMD_FLUSH, 1, 0, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_FLUSH, 0, 1, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_FLUSH, u64::MAX, u32::MAX, b"", EINVAL);
        request(&mut s, 0, CMD_FLUSH, 5, 0, 0, b"");
        expect_simple(&mut s, 5, 0);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn t19_trim_4g_past_end_and_zero_whole_export() {
    let mut srv = memory();
    let (mut s, size, _) = client(&srv, false, false);
    let mut m = Model::new(SIZE_100M);
    for (i, off) in [0, 50 * MIB + 7, size - 4096].into_iter().enumerate() {
        let d = pattern(4096, 190 + i as u64);
        write_ok(&mut s, 1, off, &d);
        m.write(off, &d);
    }
    expect_fail(&mut s, false, 0, CMD_TRIM, 0, u32::MAX, b"", EINVAL);
    assert_eq!(read_ok(&mut s, false, 2, 0, 4096), m.expected()[..4096]);
    // WRITE_ZEROES longer than the maximum payload is fine.
    request(&mut s, 0, CMD_WRITE_ZEROES, 3, 0, size as u32, b"");
    expect_simple(&mut s, 3, 0);
    m.zero(0, size);
    request(&mut s, FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, size as u32, b"");
    expect_simple(&mut s, 4, 0);
    assert_eq!(read_ok(&mut s, false, 5, size - 4096, 4096), vec![0; 4096]);
    drop(s);
    srv.health_check();
    m.verify(&srv);
}

/// Write-like requests on a read-only export fail with EPERM, payloads are
/// drained, nothing lands.
fn read_only_case(srv: &mut Server) {
    for sr in MODES {
        let (mut s, _, eflags) = client(srv, sr, false);
        assert_ne!(eflags & EF_READ_ONLY, 0);
        expect_fail(&mut s, sr, 0, CMD_WRITE, 0, 4096, &[0xEE; 4096], EPERM);
        expect_fail(&mut s, sr, 0, CMD_TRIM, 0, 4096, b"", EPERM);
        expect_fail(&mut s, sr, 0, CMD_WRITE_ZEROES, 0, 4096, b"", EPERM);
        // Straddling the end by one byte: read-only is checked first.
        expect_fail(&mut s, sr, 0, CMD_WRITE, SIZE_100M - 511, 512, &[0xEE; 512], EPERM);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 4096), vec![0; 4096]);
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(srv);
}

#[test]
fn t20_writes_on_a_read_only_export() {
    read_only_case(&mut start_with(&["-r"], &["memory", "100M"]));
    read_only_case(&mut start(&["--filter=readonly", "memory", "100M"]));
    // The readonly filter under nbdsh too (libnbd refuses to send writes to
    // a read-only export, so check the flag it sees).
    let srv = start(&["--filter=readonly", "memory", "100M"]);
    nbdsh_ok(&srv, "assert h.is_read_only()");
}

#[test]
fn t22_unadvertised_features() {
    // Every plugin here advertises FLUSH, TRIM, CACHE and WRITE_ZEROES, so
    // the unadvertised-command cases need eval; the flag forms remain.
    // The file plugin does not advertise FAST_ZERO.
    let dir = TempDir::new("t22");
    let file = dir.path("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut srv = start(&["file", &format!("file={}", file.display())]);
    let (mut s, _, eflags) = client(&srv, false, false);
    assert_eq!(eflags & EF_SEND_FAST_ZERO, 0);
    expect_fail(&mut s, false, FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 4096, b"", EINVAL);
    assert_eq!(read_ok(&mut s, false, 1, 0, 512), vec![0; 512]);
    drop(s);
    srv.health_check();
    // A read-only export does not advertise FUA.
    let mut srv = start_with(&["-r"], &["memory", "100M"]);
    let (mut s, _, eflags) = client(&srv, true, false);
    assert_eq!(eflags & EF_SEND_FUA, 0);
    expect_fail(&mut s, true, FLAG_FUA, CMD_READ, 0, 512, b"", EINVAL);
    expect_fail(&mut s, true, FLAG_FUA, CMD_FLUSH, 0, 0, b"", EINVAL);
    expect_fail(&mut s, true, FLAG_FUA, CMD_CACHE, 0, 512, b"", EINVAL);
    assert_eq!(read_ok(&mut s, true, 1, 0, 512), vec![0; 512]);
    srv.health_check();
}

#[test]
fn t24_truncated_request_header_then_eof() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        let mut r = request_bytes(0, CMD_WRITE_ZEROES, 1, 0, 4096);
        r.truncate(16);
        s.write_all(&r).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(eof_without_data(&mut s));
    }
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t25_write_payload_cut_short_then_eof() {
    let mut srv = memory();
    let (mut s, _, _) = client(&srv, false, false);
    let mut r = request_bytes(0, CMD_WRITE, 1, 0, 1 << 20);
    r.extend_from_slice(&[0xEE; 100]);
    s.write_all(&r).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(eof_without_data(&mut s));
    srv.health_check();
    Model::new(SIZE_100M).verify(&srv);
}

#[test]
fn t26_request_header_inside_a_write_payload() {
    let mut srv = memory();
    // The payload starts with a complete WRITE request for 512 bytes at 8192.
    let mut payload = request_bytes(0, CMD_WRITE, 0xBAD, 8192, 512);
    payload.extend_from_slice(&[0xAA; 512]);
    payload.resize(2048, 0xCC);
    // Cut off mid-payload, just after the embedded request: never parsed.
    let (mut s, _, _) = client(&srv, false, false);
    let mut r = request_bytes(0, CMD_WRITE, 1, 0, payload.len() as u32);
    r.extend_from_slice(&payload[..28 + 512]);
    s.write_all(&r).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(eof_without_data(&mut s));
    // Sent whole: it is data, stored at 0, and 8192 stays untouched.
    let (mut s, _, _) = client(&srv, false, false);
    write_ok(&mut s, 2, 0, &payload);
    assert_eq!(read_ok(&mut s, false, 3, 8192, 512), vec![0; 512]);
    drop(s);
    srv.health_check();
    let mut m = Model::new(SIZE_100M);
    m.write(0, &payload);
    m.verify(&srv);
}

#[test]
fn t27_pipelined_reads_then_hang_up() {
    for args in [&["memory", "100M"][..], &["--filter=delay", "memory", "100M", "rdelay=1ms"]] {
        let mut srv = start(args);
        let (mut s, _, _) = client(&srv, false, false);
        let data = pattern(64 << 20, 27);
        for (i, c) in data.chunks(16 << 20).enumerate() {
            write_ok(&mut s, 1, (i as u64) << 24, c);
        }
        drop(s);
        for sr in MODES {
            for (n, len) in [(32u32, 1u32 << 20), (16, 4 << 20)] {
                for round in 0..3u64 {
                    let (mut s, _, _) = client(&srv, sr, false);
                    let mut batch = Vec::new();
                    for i in 0..n {
                        let off = (u64::from(i) * u64::from(len) + round * 4096) % (60 << 20);
                        batch.extend(request_bytes(0, CMD_READ, u64::from(i), off, len));
                    }
                    s.write_all(&batch).unwrap();
                    if round == 1 {
                        read_n(&mut s, 100); // part of the first reply
                    }
                    drop(s); // hang up with replies pending
                }
            }
        }
        thread::sleep(Duration::from_millis(200));
        srv.health_check();
        let (mut s, _, _) = client(&srv, true, false);
        assert!(read_ok(&mut s, true, 1, 5 << 20, 1 << 20) == data[5 << 20..6 << 20]);
        drop(s);
        let mut m = Model::new(SIZE_100M);
        m.write(0, &data);
        m.verify(&srv);
    }
}

#[test]
fn t28_disc_then_junk() {
    disc_then_junk(memory(), false);
    // READs still sleeping in the delay filter when DISC arrives are
    // answered before the close, but DISC interrupts the sleep (nbdkit's
    // nbdkit_nanosleep wakes when the connection leaves the active state),
    // so ESHUTDOWN is an allowed answer there.
    disc_then_junk(start(&["--filter=delay", "memory", "100M", "rdelay=200ms"]), true);
}

fn disc_then_junk(mut srv: Server, interruptible: bool) {
    let data = pattern(8192, 28);
    let mut m = Model::new(SIZE_100M);
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        write_ok(&mut s, 1, 0, &data);
        m.write(0, &data);
        let mut b = request_bytes(0, CMD_READ, 10, 0, 4096);
        b.extend(request_bytes(0, CMD_READ, 11, 4096, 4096));
        b.extend(request_bytes(0, CMD_DISC, 12, 0, 0));
        // Junk: a valid WRITE that must not run, then garbage.
        b.extend(request_bytes(0, CMD_WRITE, 13, 0, 512));
        b.extend_from_slice(&[0xEE; 512]);
        b.extend_from_slice(&pattern(1000, 281));
        send_raw(&mut s, &b);
        let mut seen = Vec::new();
        for _ in 0..2 {
            match read_any_reply(&mut s) {
                AnyReply::Simple(0, c) => {
                    let off = (c - 10) as usize * 4096;
                    assert_eq!(read_n(&mut s, 4096), data[off..off + 4096]);
                    seen.push(c);
                }
                AnyReply::Chunk(f, CHUNK_OFFSET_DATA, c, p) => {
                    assert_eq!(f, FLAG_DONE);
                    let off = (c - 10) as usize * 4096;
                    assert_eq!(p[8..], data[off..off + 4096]);
                    seen.push(c);
                }
                AnyReply::Simple(108, c) if interruptible => seen.push(c),
                AnyReply::Chunk(f, CHUNK_ERROR, c, p) if interruptible && p[..4] == 108u32.to_be_bytes() => {
                    assert_eq!(f, FLAG_DONE);
                    seen.push(c);
                }
                r => panic!("unexpected reply {r:?}"),
            }
        }
        seen.sort();
        assert_eq!(seen, vec![10, 11], "both READs answered before the close");
        assert!(eof_without_data(&mut s), "nothing after the replies to requests before DISC");
    }
    srv.health_check();
    m.verify(&srv);
}

#[test]
fn t29_cookies_are_echoed_unchanged() {
    let mut srv = start(&["--filter=delay", "memory", "100M", "rdelay=20ms"]);
    let cookies = [0u64, u64::MAX, 0xDEAD_BEEF, 0xDEAD_BEEF, 0, 0x0102_0304_0506_0708, 0x8000_0000_0000_0000];
    for sr in MODES {
        let (mut s, _, _) = client(&srv, sr, false);
        let mut b = Vec::new();
        for (i, c) in cookies.iter().enumerate() {
            b.extend(request_bytes(0, CMD_READ, *c, i as u64 * 4096, 4096));
        }
        // A failing READ reusing a cookie in flight, and a FLUSH.
        const FLUSH_COOKIE: u64 = 0xF1F1_0000_0000_F1F1;
        b.extend(request_bytes(0, CMD_READ, u64::MAX, SIZE_100M, 512));
        b.extend(request_bytes(0, CMD_FLUSH, FLUSH_COOKIE, 0, 0));
        s.write_all(&b).unwrap();
        let mut got = Vec::new();
        let mut errors = 0;
        for _ in 0..cookies.len() + 2 {
            match read_any_reply(&mut s) {
                AnyReply::Simple(0, c) => {
                    if !sr && c != FLUSH_COOKIE {
                        assert_eq!(read_n(&mut s, 4096), vec![0; 4096]);
                    }
                    got.push(c);
                }
                AnyReply::Simple(e, c) => {
                    assert_eq!((e, c), (EINVAL, u64::MAX));
                    errors += 1;
                }
                AnyReply::Chunk(f, typ, c, _) => {
                    assert_eq!(f & FLAG_DONE, FLAG_DONE);
                    if typ == CHUNK_ERROR {
                        assert_eq!(c, u64::MAX);
                        errors += 1;
                    } else {
                        assert_eq!(typ, CHUNK_OFFSET_HOLE);
                        got.push(c);
                    }
                }
            }
        }
        assert_eq!(errors, 1);
        let mut want = cookies.to_vec();
        want.push(FLUSH_COOKIE);
        want.sort();
        got.sort();
        assert_eq!(got, want, "cookies echoed byte for byte");
    }
    srv.health_check();
}

#[test]
fn t30_parallel_mixed_requests_never_interleave() {
    // The delay filter makes requests block, so they run in parallel.
    let mut srv = start(&["--filter=delay", "memory", "100M", "rdelay=1ms", "wdelay=1ms", "delay-extents=1ms"]);
    let (mut s, _, _) = client(&srv, true, true);
    let mut m = Model::new(SIZE_100M);
    let a = pattern(8 << 20, 30);
    write_ok(&mut s, 1, 0, &a);
    m.write(0, &a);

    #[derive(Clone, Copy)]
    enum Kind {
        Read(u64, u32),
        Write,
        Status,
        Flush,
    }
    let mut kinds = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let cookie = 1000 + i;
        match i % 4 {
            0 => {
                let len = (64 << 10) * (1 + (i as u32 % 8));
                let off = (i * 37 * 1024) % ((8 << 20) - u64::from(len));
                batch.extend(request_bytes(0, CMD_READ, cookie, off, len));
                kinds.insert(cookie, Kind::Read(off, len));
            }
            1 => {
                let d = pattern(256 << 10, 300 + i);
                let off = (16 << 20) + i * MIB;
                batch.extend(request_bytes(0, CMD_WRITE, cookie, off, d.len() as u32));
                batch.extend_from_slice(&d);
                m.write(off, &d);
                kinds.insert(cookie, Kind::Write);
            }
            2 => {
                batch.extend(request_bytes(0, CMD_BLOCK_STATUS, cookie, 0, 16 << 20));
                kinds.insert(cookie, Kind::Status);
            }
            _ if i % 8 == 3 => {
                let off = (90 << 20) + i * 4096;
                batch.extend(request_bytes(0, CMD_READ, cookie, off, 4096));
                kinds.insert(cookie, Kind::Read(off, 4096));
            }
            _ => {
                batch.extend(request_bytes(0, CMD_FLUSH, cookie, 0, 0));
                kinds.insert(cookie, Kind::Flush);
            }
        }
    }
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&batch).unwrap());
    let expected = m.expected();
    let mut done = HashMap::new();
    while done.len() < 64 {
        match read_any_reply(&mut s) {
            AnyReply::Simple(e, c) => {
                assert_eq!(e, 0, "cookie {c}");
                assert!(matches!(kinds[&c], Kind::Write | Kind::Flush), "simple reply for cookie {c}");
                assert!(done.insert(c, ()).is_none(), "second reply for {c}");
            }
            AnyReply::Chunk(f, typ, c, p) => {
                assert_eq!(f, FLAG_DONE, "one chunk per reply here");
                match (kinds[&c], typ) {
                    (Kind::Read(off, len), CHUNK_OFFSET_DATA) => {
                        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), off);
                        assert!(p[8..] == expected[off as usize..][..len as usize], "data of cookie {c}");
                    }
                    (Kind::Read(off, len), CHUNK_OFFSET_HOLE) => {
                        assert_eq!(p.len(), 12);
                        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), off);
                        assert_eq!(u32::from_be_bytes(p[8..].try_into().unwrap()), len);
                        assert!(expected[off as usize..][..len as usize].iter().all(|&b| b == 0));
                    }
                    (Kind::Status, CHUNK_BLOCK_STATUS) => check_descriptors(&descriptors(&p), 0, 16 << 20, SIZE_100M, false),
                    (_, t) => panic!("chunk type 0x{t:x} for cookie {c}"),
                }
                assert!(done.insert(c, ()).is_none(), "second reply for {c}");
            }
        }
    }
    writer.join().unwrap();
    assert_eq!(read_ok(&mut s, true, 1, 16 << 20, 4096), expected[16 << 20..][..4096]);
    drop(s);
    srv.health_check();
    m.verify(&srv);
}

#[test]
fn t31_read_errors_keep_the_stream_in_sync() {
    let dir = TempDir::new("t31");
    let trigger = dir.path("trigger");
    let mut srv = start(&[
        "--filter=error",
        "memory",
        "100M",
        "error-pread-rate=1",
        &format!("error-pread-file={}", trigger.display()),
    ]);
    let data = pattern(4096, 31);
    let mut m = Model::new(SIZE_100M);
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        write_ok(&mut s, 1, 0, &data);
        m.write(0, &data);
        // A request error: no payload after the error.
        expect_fail(&mut s, sr, 0, CMD_READ, size - 256, 4096, b"", EINVAL);
        assert_eq!(read_ok(&mut s, sr, 2, 0, 4096), data);
        // A plugin error: the same.
        std::fs::write(&trigger, b"").unwrap();
        expect_fail(&mut s, sr, 0, CMD_READ, 0, 4096, b"", EIO);
        expect_fail(&mut s, sr, 0, CMD_READ, 0, 4096, b"", EIO);
        request(&mut s, 0, CMD_FLUSH, 3, 0, 0, b"");
        expect_simple(&mut s, 3, 0);
        std::fs::remove_file(&trigger).unwrap();
        assert_eq!(read_ok(&mut s, sr, 4, 0, 4096), data);
    }
    srv.health_check();
    m.verify(&srv);
}

#[test]
fn t33_cache_past_the_end() {
    let mut srv = memory();
    for sr in MODES {
        let (mut s, size, _) = client(&srv, sr, false);
        expect_fail(&mut s, sr, 0, CMD_CACHE, size - 256, 512, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_CACHE, size, 1, b"", EINVAL);
        expect_fail(&mut s, sr, 0, CMD_CACHE, 0, 0, b"", EINVAL);
        request(&mut s, 0, CMD_CACHE, 5, 0, 1 << 20, b"");
        expect_simple(&mut s, 5, 0);
        assert_eq!(read_ok(&mut s, sr, 1, 0, 512), vec![0; 512]);
    }
    srv.health_check();
}

#[test]
fn p01_injected_eio_keeps_the_connection() {
    let dir = TempDir::new("p01");
    let trigger = dir.path("trigger");
    std::fs::write(&trigger, b"").unwrap();
    let mut srv = start(&[
        "--filter=error",
        "memory",
        "100M",
        "error=EIO",
        "error-pread-rate=1",
        &format!("error-pread-file={}", trigger.display()),
    ]);
    nbdsh_ok(
        &srv,
        "import errno\n\
         for i in range(5):\n\
         \x20   try:\n\
         \x20       h.pread(512, i * 512)\n\
         \x20       assert False, 'read did not fail'\n\
         \x20   except nbd.Error as e:\n\
         \x20       assert e.errnum == errno.EIO, e\n\
         assert h.aio_is_ready()\n\
         h.pwrite(b'\\x5a' * 512, 4096)\n\
         h.flush()\n",
    );
    std::fs::remove_file(&trigger).unwrap();
    srv.health_check();
    let mut m = Model::new(SIZE_100M);
    m.write(4096, &[0x5A; 512]);
    m.verify(&srv);
}

#[test]
fn p11_delay_abandoned_by_its_client() {
    let (mut srv, log) = start_logged(&[], &["--filter=delay", "memory", "100M", "rdelay=3"]);
    let (mut a, _, _) = client(&srv, false, false);
    request(&mut a, 0, CMD_READ, 1, 0, 512, b"");
    let sent = Instant::now(); // A's read would end at sent + 3 s
    // Others are unaffected while A's read sleeps.
    let (mut b, _, _) = client(&srv, false, false);
    request(&mut b, 0, CMD_FLUSH, 2, 0, 0, b"");
    expect_simple(&mut b, 2, 0);
    assert!(sent.elapsed() < Duration::from_secs(2), "B waited for A's sleep");
    thread::sleep(Duration::from_secs(1).saturating_sub(sent.elapsed()));
    drop(a); // A gives up after 1 s
    // The close aborts the sleep: A's request ends long before 3 s.
    eventually("A's request finished", || std::fs::read_to_string(&log).unwrap().contains("sending error reply"));
    assert!(sent.elapsed() < Duration::from_millis(2500), "sleep not aborted on close ({:?})", sent.elapsed());
    drop(b);
    srv.health_check(); // reads sleep 3 s each: slow but alive
}

#[test]
fn p19_memory_plugin_under_ulimit_v() {
    let mut srv = start_limited("-v 700000", &["memory", "2G"]);
    let (mut s, _, _) = client(&srv, false, false);
    let chunk = 32usize << 20;
    let mut written = Vec::new();
    let mut failed = None;
    for i in 0..40u64 {
        let d = pattern(chunk, 1900 + i);
        request(&mut s, 0, CMD_WRITE, i, i * chunk as u64, chunk as u32, &d);
        let (e, c) = read_simple_reply(&mut s);
        assert_eq!(c, i);
        if e != 0 {
            assert_eq!(e, ENOMEM, "write {i}");
            failed = Some(i);
            break;
        }
        written.push(d);
    }
    assert!(failed.is_some(), "the address-space limit was never hit");
    eprintln!("p19: {} writes of 32 MiB succeeded, then ENOMEM", written.len());
    assert!(written.len() >= 3, "only {} writes of 32 MiB succeeded", written.len());
    assert!(srv.alive());
    // Earlier data intact, read back whole in 1 MiB pieces…
    for (i, d) in written.iter().enumerate() {
        for k in (0..chunk).step_by(1 << 20) {
            let off = (i * chunk + k) as u64;
            assert!(read_ok(&mut s, false, 99, off, 1 << 20) == d[k..k + (1 << 20)], "chunk {i} at {k}");
        }
    }
    drop(s);
    // The failed write may have landed in part (a write error leaves its
    // range unspecified), but only with its own bytes…
    let (mut s, size, _) = client(&srv, true, true);
    let end = (written.len() * chunk) as u64;
    let attempted = pattern(chunk, 1900 + written.len() as u64);
    for k in (0..chunk).step_by(1 << 20) {
        let got = read_ok(&mut s, true, 8, end + k as u64, 1 << 20);
        let want = &attempted[k..k + (1 << 20)];
        assert!(got.iter().zip(want).all(|(g, w)| *g == 0 || g == w), "foreign bytes in the failed write at {k}");
    }
    // …and the rest of the 2 GiB export reads as zeroes (block status says
    // so: a READ of a known-zero extent is all zero).
    let mut pos = end + chunk as u64;
    while pos < size {
        let count = (size - pos).min(1 << 30) as u32;
        request(&mut s, 0, CMD_BLOCK_STATUS, 7, pos, count, b"");
        let (_, typ, _, p) = read_chunk(&mut s);
        assert_eq!(typ, CHUNK_BLOCK_STATUS);
        let d = descriptors(&p);
        check_descriptors(&d, pos, count, size, false);
        assert!(d.iter().all(|&(_, st)| st & 2 != 0), "non-zero extent after the written data at {pos}: {d:?}");
        pos += d.iter().map(|&(l, _)| u64::from(l)).sum::<u64>();
    }
    assert_eq!(read_ok(&mut s, true, 9, end + chunk as u64, 1 << 20), vec![0; 1 << 20]);
    drop(s);
    srv.health_check();
}
