//! Property tests over the pure protocol code, the same code and the same
//! checks as the fuzz targets (`fuzz/`, `nbdkit::fuzzing`): the request
//! decoder and validation, the option decoders, and the whole negotiation
//! state machine driven by arbitrary and by structured option sequences.
//! Also replays the fuzz seeds (real client transcripts) and every saved
//! fuzz regression input.

use std::path::Path;

use nbdkit::fuzzing::{self, configs, drive, info_go_payload, option_bytes, NegotiationEnd, RequestsEnd};
use nbdkit::proto::codec::Put;
use nbdkit::proto::negotiate::{parse_info_go, parse_meta, MAX_OPTIONS};
use nbdkit::proto::request::{self, in_bounds, validate, Request};
use nbdkit::proto::wire::{cmd, cmdflag, eflag, opt, rep, MAX_REQUEST_SIZE};
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------
// Seeds and regressions

/// Runs `f` on every file of fuzz/<kind>/<target>/; returns how many.
fn replay(kind: &str, target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else { return 0 };
    let mut n = 0;
    for e in rd {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{} fails", p.display());
        n += 1;
    }
    n
}

#[test]
fn seeds_and_regressions_replay() {
    for (t, f) in [
        ("request", fuzzing::request as fn(&[u8])),
        ("option", fuzzing::option),
        ("negotiate", fuzzing::negotiate),
    ] {
        assert!(replay("seeds", t, f) > 0, "no seeds for {t}: run fuzz/capture-seeds.sh");
        replay("regressions", t, f);
    }
}

/// The real clients' transcripts reach the transmission phase (or end
/// with ABORT) under the standard configuration: the harness drives the
/// state machine the way the server does.
#[test]
fn real_client_transcripts_negotiate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/negotiate");
    let cfg = &configs()[0];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = drive(cfg, &std::fs::read(&p).unwrap());
        if name.starts_with("nbdinfo-list") || name.starts_with("nbdsh-abort") {
            assert_eq!(r.end, NegotiationEnd::Closed, "{name}");
            continue;
        }
        let NegotiationEnd::Transmission(end) = r.end else { panic!("{name}: {:?}", r.end) };
        assert!(matches!(end, RequestsEnd::Disconnect | RequestsEnd::Eof), "{name}: {end:?}");
        assert!(r.requests.refused.is_empty(), "{name}: a real client's request was refused: {:?}", r.requests);
        assert!(r.requests.accepted > 0 || name.contains("size") || name.contains("info"), "{name}");
    }
}

// ---------------------------------------------------------------------
// Strategies

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"".to_vec()),
        2 => Just(b"b".to_vec()),
        1 => Just(b"default".to_vec()),
        1 => Just(b"nonexistent".to_vec()),
        1 => Just(vec![b'n'; 4096]),
        1 => Just(vec![b'n'; 4097]),
        2 => vec(prop_oneof![Just(0u8), any::<u8>()], 0..12),
    ]
}

fn query() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"base:allocation".to_vec()),
        1 => Just(b"base:".to_vec()),
        1 => Just(b"qemu:dirty-bitmap:x".to_vec()),
        1 => Just(vec![b'q'; 4097]),
        2 => vec(any::<u8>(), 0..20),
    ]
}


fn meta_payload(name: &[u8], queries: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    p.put_u32(name.len() as u32);
    p.extend_from_slice(name);
    p.put_u32(queries.len() as u32);
    for q in queries {
        p.put_u32(q.len() as u32);
        p.extend_from_slice(q);
    }
    p
}

/// Damages a payload: truncates it, appends junk, or flips a byte.
fn damage(p: Vec<u8>, how: u8, at: usize, byte: u8) -> Vec<u8> {
    let mut p = p;
    match how % 8 {
        0 if !p.is_empty() => p.truncate(at % p.len()),
        1 => p.push(byte),
        2 if !p.is_empty() => {
            let i = at % p.len();
            p[i] ^= byte | 1;
        }
        _ => {}
    }
    p
}

/// One option as a client sends it: mostly well formed, sometimes damaged.
fn any_option() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        3 => Just((opt::STRUCTURED_REPLY, Vec::new())),
        2 => Just((opt::EXTENDED_HEADERS, Vec::new())),
        2 => Just((opt::LIST, Vec::new())),
        1 => Just((opt::STARTTLS, Vec::new())),
        1 => Just((opt::ABORT, Vec::new())),
        1 => name().prop_map(|n| (opt::EXPORT_NAME, n)),
        4 => (prop_oneof![Just(opt::GO), Just(opt::INFO)], name(), vec(prop_oneof![0u16..4, any::<u16>()], 0..5))
            .prop_map(|(o, n, i)| (o, info_go_payload(&n, &i))),
        4 => (prop_oneof![Just(opt::SET_META_CONTEXT), Just(opt::LIST_META_CONTEXT)], name(), vec(query(), 0..4))
            .prop_map(|(o, n, q)| (o, meta_payload(&n, &q))),
        2 => (any::<u32>(), vec(any::<u8>(), 0..64)),
    ];
    (payload, any::<u8>(), any::<usize>(), any::<u8>())
        .prop_map(|((o, p), how, at, byte)| option_bytes(o, &damage(p, how, at, byte)))
}

fn client_flags() -> impl Strategy<Value = u32> {
    prop_oneof![8 => Just(3u32), 1 => Just(1u32), 1 => Just(2u32), 1 => Just(0u32), 1 => any::<u32>()]
}

fn any_export() -> impl Strategy<Value = request::Export> {
    let size = prop_oneof![Just(0u64), Just(1 << 20), Just(1 << 40), Just(u64::MAX), any::<u64>()];
    let eflags = prop_oneof![Just(0xffffu16), Just(eflag::HAS_FLAGS | eflag::READ_ONLY), any::<u16>()];
    (size, eflags, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(size, eflags, s, x, b)| request::Export {
        size,
        eflags,
        structured: s || x,
        extended: x,
        base_allocation: b,
    })
}

/// A request aimed at the edges: lengths and offsets around the export
/// size, the 64 MiB cap and the u64 limit.
fn any_request(size: u64) -> impl Strategy<Value = Request> {
    let cmd = prop_oneof![8 => 0u16..8, 1 => any::<u16>()];
    let flags = prop_oneof![4 => Just(0u16), 4 => 0u16..0x40, 1 => any::<u16>()];
    let edge = prop_oneof![
        Just(0u64),
        Just(1),
        Just(512),
        Just(size),
        Just(size.wrapping_sub(512)),
        Just(u64::from(MAX_REQUEST_SIZE)),
        Just(u64::from(MAX_REQUEST_SIZE) + 1),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(u64::MAX - 511),
        any::<u64>(),
        0..size.max(1),
    ];
    (cmd, flags, any::<u64>(), edge.clone(), edge)
        .prop_map(|(cmd, flags, cookie, offset, count)| Request { flags, cmd, cookie, offset, count })
}

/// The NBD rules for a request, written from the spec and nbdkit's
/// documentation, independently of `request::validate`.
fn spec_ok(r: &Request, e: &request::Export) -> bool {
    let has = |f: u16| e.eflags & f != 0;
    let known = matches!(
        r.cmd,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
    );
    let writes = matches!(r.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    let range = if r.cmd == cmd::FLUSH {
        r.offset == 0 && r.count == 0
    } else {
        r.count > 0 && r.offset.checked_add(r.count).is_some_and(|end| end <= e.size)
    };
    let mut allowed = cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::DF | cmdflag::REQ_ONE | cmdflag::FAST_ZERO;
    if e.extended {
        allowed |= cmdflag::PAYLOAD_LEN;
    }
    let f = |bit: u16| r.flags & bit != 0;
    let flags = r.flags & !allowed == 0
        && (!f(cmdflag::FUA) || has(eflag::SEND_FUA))
        && (!f(cmdflag::NO_HOLE) || r.cmd == cmd::WRITE_ZEROES)
        && (!f(cmdflag::FAST_ZERO) || (r.cmd == cmd::WRITE_ZEROES && has(eflag::SEND_FAST_ZERO)))
        && (!f(cmdflag::DF) || (r.cmd == cmd::READ && has(eflag::SEND_DF)))
        && (!f(cmdflag::REQ_ONE) || r.cmd == cmd::BLOCK_STATUS)
        && (!f(cmdflag::PAYLOAD_LEN) || r.cmd == cmd::WRITE);
    let size_ok = !matches!(r.cmd, cmd::READ | cmd::WRITE) || r.count <= u64::from(MAX_REQUEST_SIZE);
    let advertised = match r.cmd {
        cmd::FLUSH => has(eflag::SEND_FLUSH),
        cmd::TRIM => has(eflag::SEND_TRIM),
        cmd::WRITE_ZEROES => has(eflag::SEND_WRITE_ZEROES),
        cmd::CACHE => has(eflag::SEND_CACHE),
        cmd::BLOCK_STATUS => e.structured && e.base_allocation,
        _ => true,
    };
    known && !(writes && has(eflag::READ_ONLY)) && range && flags && size_ok && advertised
}

// ---------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes after the greeting, under every configuration.
    #[test]
    fn negotiation_survives_arbitrary_bytes(bytes in vec(any::<u8>(), 0..512)) {
        fuzzing::negotiate(&bytes);
    }

    /// The same, with a well-formed start, so the bytes reach the options.
    #[test]
    fn negotiation_survives_arbitrary_option_bytes(cflags in client_flags(), bytes in vec(any::<u8>(), 0..512)) {
        let mut input = cflags.to_be_bytes().to_vec();
        input.extend_from_slice(b"IHAVEOPT");
        input.extend_from_slice(&bytes);
        fuzzing::negotiate(&input);
    }

    /// Structured option sequences, then requests: every reply well formed
    /// and bounded, the option budget respected (checked inside `drive`),
    /// and every option answered until the connection ends.
    #[test]
    fn negotiation_of_option_sequences(
        cflags in client_flags(),
        opts in vec(any_option(), 0..48),
        tail in vec(any::<u8>(), 0..128),
    ) {
        let mut input = cflags.to_be_bytes().to_vec();
        for o in &opts {
            input.extend_from_slice(o);
        }
        input.extend_from_slice(&tail);
        for cfg in configs() {
            let r = drive(&cfg, &input);
            // Replies come in order, for options that were sent.
            let sent: Vec<u32> = opts.iter().map(|o| u32::from_be_bytes(o[8..12].try_into().unwrap())).collect();
            let mut i = 0;
            for (o, _, _) in &r.replies {
                while i < sent.len() && sent[i] != *o {
                    i += 1;
                }
                prop_assert!(i < sent.len(), "reply for option {} out of order", o);
            }
            if let Some(e) = r.export {
                prop_assert!(matches!(r.end, NegotiationEnd::Transmission(_)));
                prop_assert!(e.size == 1 << 20);
            }
        }
    }

    /// Options without an export choice: exactly MAX_OPTIONS are answered,
    /// then the connection closes (bad-input.md H32).
    #[test]
    fn option_budget(n in 0usize..80, option in prop_oneof![Just(0x1234u32), Just(opt::STRUCTURED_REPLY), Just(opt::STARTTLS), any::<u32>()]) {
        prop_assume!(!matches!(option, opt::EXPORT_NAME | opt::ABORT | opt::GO | opt::LIST));
        let mut input = 3u32.to_be_bytes().to_vec();
        for _ in 0..n {
            input.extend_from_slice(&option_bytes(option, b"zz"));
        }
        let r = drive(&configs()[0], &input);
        prop_assert_eq!(r.answered as usize, n.min(MAX_OPTIONS as usize));
        let want = if n > MAX_OPTIONS as usize { NegotiationEnd::Closed } else { NegotiationEnd::Eof };
        prop_assert_eq!(r.end, want);
    }

    /// A successful LIST adds MAX_OPTIONS per listed export, once.
    #[test]
    fn option_budget_after_list(n in 0usize..200, lists in 1usize..4) {
        let mut input = 3u32.to_be_bytes().to_vec();
        for _ in 0..lists {
            input.extend_from_slice(&option_bytes(opt::LIST, b""));
        }
        for _ in 0..n {
            input.extend_from_slice(&option_bytes(0x1234, b""));
        }
        let cfg = &configs()[0];
        let budget = (MAX_OPTIONS * (1 + cfg.exports.exports.len() as u32)) as usize;
        let r = drive(cfg, &input);
        prop_assert_eq!(r.answered as usize, (lists + n).min(budget));
        // The second and later LIST are ERR_INVALID.
        let list_replies: Vec<u32> = r.replies.iter().filter(|x| x.0 == opt::LIST).map(|x| x.1).collect();
        prop_assert_eq!(list_replies.iter().filter(|&&t| t == rep::ERR_INVALID).count(), lists - 1);
    }

    /// validate accepts exactly what the spec rules accept, and what it
    /// accepts lies inside the export.
    #[test]
    fn validate_matches_the_spec_rules((e, r) in any_export().prop_flat_map(|e| (Just(e), any_request(e.size)))) {
        prop_assume!(r.cmd != cmd::DISC);
        let got = validate(&r, &e);
        prop_assert_eq!(got.is_ok(), spec_ok(&r, &e), "validate {:?} on {:?} = {:?}", r, e, got);
        if got.is_ok() {
            fuzzing::check_valid(&r, &e);
        }
        let writes = matches!(r.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && e.eflags & eflag::READ_ONLY != 0 {
            prop_assert_eq!(got, Err(1), "EPERM for writes on a read-only export");
        }
    }

    /// Headers round-trip, and never decode from fewer bytes.
    #[test]
    fn request_headers_round_trip(r in any_request(1 << 20), ext: bool, cut in 0usize..32) {
        let r = if ext { r } else { Request { count: r.count & 0xffff_ffff, ..r } };
        let mut b = Vec::new();
        r.encode(ext, &mut b);
        prop_assert_eq!(Request::decode(&b, ext), Ok(r));
        prop_assert!(Request::decode(&b[..cut.min(b.len() - 1)], ext).is_err());
        prop_assert!(Request::decode(&b, !ext).is_err(), "the other header format has the other magic");
    }

    /// Streams of requests through the transmission driver's loop.
    #[test]
    fn request_streams((e, rs) in any_export().prop_flat_map(|e| (Just(e), vec(any_request(e.size), 0..16))), junk in vec(any::<u8>(), 0..40)) {
        let mut input = Vec::new();
        for r in &rs {
            if r.cmd == cmd::DISC {
                continue;
            }
            let r = if e.extended { *r } else { Request { count: r.count & 0xffff_ffff, ..*r } };
            r.encode(e.extended, &mut input);
            let plen = r.payload_len(e.extended);
            if plen > 4096 {
                break; // the stream ends mid-payload
            }
            input.resize(input.len() + plen as usize, 0xab);
        }
        input.extend_from_slice(&junk);
        let _ = fuzzing::requests(&e, &input);
    }

    #[test]
    fn in_bounds_is_checked_arithmetic(offset: u64, count: u64, size: u64) {
        let want = count > 0 && offset.checked_add(count).is_some_and(|end| end <= size);
        prop_assert_eq!(in_bounds(offset, count, size), want);
    }

    /// Well-formed INFO/GO and meta payloads parse back to what was
    /// encoded; a truncated one never parses.
    #[test]
    fn option_payloads_round_trip(
        n in vec(1u8..=255, 0..64),
        infos in vec(any::<u16>(), 0..8),
        queries in vec(vec(any::<u8>(), 0..32), 0..6),
        cut in any::<usize>(),
    ) {
        let p = info_go_payload(&n, &infos);
        let (name, i) = parse_info_go(&p).expect("well-formed INFO/GO");
        prop_assert_eq!(name, &n[..]);
        prop_assert_eq!(i.len(), 2 * infos.len());
        prop_assert!(parse_info_go(&p[..cut % p.len()]).is_none());
        let m = meta_payload(&n, &queries);
        let (name, qs) = parse_meta(&m).expect("well-formed meta payload");
        prop_assert_eq!(name, &n[..]);
        prop_assert_eq!(qs.len(), queries.len());
        prop_assert!(parse_meta(&m[..cut % m.len()]).is_none());
        fuzzing::option(&option_bytes(opt::GO, &p));
        fuzzing::option(&option_bytes(opt::SET_META_CONTEXT, &m));
    }

    /// Arbitrary bytes through the option decoders.
    #[test]
    fn option_decoders_survive_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256), magic: bool) {
        let mut input = Vec::new();
        if magic {
            input.extend_from_slice(b"IHAVEOPT");
        }
        input.extend_from_slice(&bytes);
        fuzzing::option(&input);
    }

    /// Arbitrary bytes through the request target (prefix included).
    #[test]
    fn request_target_survives_arbitrary_bytes(bytes in vec(any::<u8>(), 0..256)) {
        fuzzing::request(&bytes);
    }
}

// ---------------------------------------------------------------------
// Block status descriptors (the CVE-2025-47711/47712 arithmetic)

use nbdkit::backend::extents::Extents;
use nbdkit::proto::reply::{descriptors, MAX_EXTENT_32};

/// Extents covering [0, size) in pieces of random lengths and types.
fn partition() -> impl Strategy<Value = (u64, Vec<(u64, u32)>)> {
    let piece = (prop_oneof![1u64..4096, 1u64..(1 << 33), Just(u64::from(u32::MAX)), Just(1u64 << 32)], 0u32..8);
    vec(piece, 1..12).prop_map(|ps| {
        let size = ps.iter().map(|p| p.0).sum();
        (size, ps)
    })
}

proptest! {
    /// Whatever the extents, the descriptors sent for a valid BLOCK_STATUS
    /// follow the spec: at least one, none empty, all but the last inside
    /// the request, REQ_ONE gives one no longer than the request, compact
    /// replies fit in 32 bits, nothing past the end of the export, and
    /// each descriptor has the status of the extent it describes.
    #[test]
    fn block_status_descriptors((size, pieces) in partition(), at in any::<u64>(), len in any::<u64>(), req_one: bool, wide: bool) {
        let offset = at % size;
        let max = if wide { u64::MAX } else { u64::from(u32::MAX) };
        let count = 1 + len % (size - offset).min(max);
        let mut ext = Extents::new(offset, size);
        let mut o = 0;
        for &(l, t) in &pieces {
            ext.add(o, l, t).unwrap();
            o += l;
        }
        let list: Vec<(u64, u64, u32)> = ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect();
        let d = descriptors(&list, offset, count, req_one, wide);
        prop_assert!(!d.is_empty());
        prop_assert!(d.iter().all(|&(l, _)| l > 0));
        let head: u64 = d[..d.len() - 1].iter().map(|&(l, _)| l).sum();
        prop_assert!(head < count, "descriptors before the last leave the request: {:?}", d);
        let total: u64 = d.iter().map(|&(l, _)| l).sum();
        prop_assert!(offset + total <= size, "descriptors past the end: {:?}", d);
        if req_one {
            prop_assert_eq!(d.len(), 1);
            prop_assert!(d[0].0 <= count);
        }
        if !wide {
            prop_assert!(d.iter().all(|&(l, _)| l <= MAX_EXTENT_32));
        }
        let mut pos = offset;
        for &(l, s) in &d {
            let e = list.iter().find(|e| e.0 <= pos && pos < e.0 + e.1).expect("an extent covers each descriptor");
            prop_assert!(pos + l <= e.0 + e.1, "descriptor spans two extents");
            prop_assert_eq!(s, e.2 & 3);
            pos += l;
        }
    }
}
