//! Entry points for the fuzz targets (`fuzz/`) and the property tests
//! (`tests/proto_props.rs`): each runs the pure protocol code on arbitrary
//! bytes the way the server's drivers do (`server::connection` for the
//! handshake, `server::transmission` for requests) and panics when an
//! invariant breaks. A panic here is a bug, in the codec or in the checks.
//!
//! * [`request`]: an 11-byte export-state prefix, then request headers
//!   and payloads.
//! * [`option`]: one option header and payload, through the decoders.
//! * [`negotiate`]: the client's bytes after the greeting (client flags,
//!   options, then requests), through the whole negotiation under several
//!   server configurations and a fake export side.

use crate::backend::{BlockSize, Caps, Export, Support};
use crate::proto::codec::{DecodeError, Put, Reader};
use crate::proto::handshake::{OptionHeader, OPTION_HEADER_LEN};
use crate::proto::negotiate::{
    parse_info_go, parse_meta, ExportInfo, Exports, Intake, Negotiation, Payload, Policy, Step, MAX_GO_LEN, MAX_META_LEN,
    MAX_OPTIONS, MAX_OPTION_LEN,
};
use crate::proto::request::{self, Request, EXT_REQUEST_LEN, REQUEST_LEN};
use crate::proto::wire::{
    cflag, cmd, cmdflag, eflag, errno, gflag, info, opt, rep, BASE_ALLOCATION, EXT_REQUEST_MAGIC, IHAVEOPT,
    MAX_REQUEST_SIZE, MAX_STRING, REP_MAGIC, REQUEST_MAGIC,
};

/// Length of the export-state prefix of a [`request`] input.
pub const REQUEST_PREFIX_LEN: usize = 11;

/// Splits `n` bytes off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Some(a)
}

/// The export state a [`request`] input starts with: byte 0 bit 0 extended
/// headers, bit 1 structured replies, bit 2 base:allocation; bytes 1-2 the
/// transmission flags; bytes 3-10 the size (all big endian).
pub fn export_from_prefix(p: &[u8; REQUEST_PREFIX_LEN]) -> request::Export {
    let extended = p[0] & 1 != 0;
    request::Export {
        extended,
        // Extended headers imply structured replies (the negotiation
        // never gives one without the other).
        structured: extended || p[0] & 2 != 0,
        base_allocation: p[0] & 4 != 0,
        eflags: u16::from_be_bytes([p[1], p[2]]),
        size: u64::from_be_bytes(p[3..11].try_into().expect("8 bytes")),
    }
}

/// How a run of [`requests`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestsEnd {
    /// The input ran out (mid-header or mid-payload).
    Eof,
    /// A header with a wrong magic: the server closes.
    BadMagic,
    /// NBD_CMD_DISC.
    Disconnect,
    /// A payload too big to drain: the server closes.
    TooBig,
}

/// What a run of [`requests`] did.
#[derive(Debug, Clone, Default)]
pub struct RequestsRun {
    /// Requests that passed validation.
    pub accepted: u32,
    /// Requests refused with an error reply, and the errno of each.
    pub refused: Vec<u32>,
}

/// The fuzz target `request`: the export-state prefix, then requests.
pub fn request(data: &[u8]) {
    let mut d = data;
    let Some(p) = take(&mut d, REQUEST_PREFIX_LEN) else { return };
    let export = export_from_prefix(p.try_into().expect("prefix"));
    let _ = requests(&export, d);
}

/// The transmission driver's read loop over `input`: decode, drain or
/// refuse oversized payloads, validate, skip the payload; checks every
/// decision against the NBD rules.
pub fn requests(e: &request::Export, input: &[u8]) -> (RequestsEnd, RequestsRun) {
    let mut run = RequestsRun::default();
    let mut d = input;
    let hlen = if e.extended { EXT_REQUEST_LEN } else { REQUEST_LEN };
    loop {
        let Some(hdr) = take(&mut d, hlen) else { return (RequestsEnd::Eof, run) };
        // A short buffer is an error, never a panic.
        assert!(Request::decode(&hdr[..hlen - 1], e.extended).is_err());
        let req = match Request::decode(hdr, e.extended) {
            Ok(r) => r,
            Err(err) => {
                let magic = u32::from_be_bytes(hdr[..4].try_into().expect("4 bytes"));
                assert_eq!(err, DecodeError::BadMagic(magic.into()));
                assert_ne!(magic, if e.extended { EXT_REQUEST_MAGIC } else { REQUEST_MAGIC });
                return (RequestsEnd::BadMagic, run);
            }
        };
        let mut enc = Vec::new();
        req.encode(e.extended, &mut enc);
        assert_eq!(enc, hdr, "a decoded header encodes back to the same bytes");
        if req.cmd == cmd::DISC {
            return (RequestsEnd::Disconnect, run);
        }
        let plen = req.payload_len(e.extended);
        if req.cmd == cmd::WRITE {
            assert_eq!(plen, req.count);
        }
        if !e.extended {
            assert!(req.count <= u64::from(u32::MAX));
            assert!(plen == 0 || req.cmd == cmd::WRITE);
        }
        let check = if plen > u64::from(MAX_REQUEST_SIZE) {
            if plen > 2 * u64::from(MAX_REQUEST_SIZE) {
                return (RequestsEnd::TooBig, run);
            }
            Err(errno::EINVAL)
        } else {
            let v = request::validate(&req, e);
            // Deterministic, and blind to the cookie.
            assert_eq!(v, request::validate(&Request { cookie: !req.cookie, ..req }, e));
            v
        };
        match check {
            Ok(()) => {
                check_valid(&req, e);
                run.accepted += 1;
            }
            Err(n) => {
                assert!(matches!(n, errno::EINVAL | errno::EPERM | errno::ENOSPC), "unexpected errno {n}");
                run.refused.push(n);
            }
        }
        if take(&mut d, plen.try_into().unwrap_or(usize::MAX)).is_none() {
            return (RequestsEnd::Eof, run);
        }
    }
}

/// What must hold of a request that `validate` let through (the NBD
/// spec's MUSTs and SHOULDs, written independently of `validate`).
pub fn check_valid(r: &Request, e: &request::Export) {
    let has = |f: u16| e.eflags & f != 0;
    assert!(
        matches!(
            r.cmd,
            cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
        ),
        "unknown command {} accepted",
        r.cmd
    );
    if matches!(r.cmd, cmd::FLUSH) {
        assert_eq!((r.offset, r.count), (0, 0), "FLUSH with offset or length");
        assert!(has(eflag::SEND_FLUSH));
    } else {
        assert!(r.count > 0, "zero-length {} accepted", cmd::name(r.cmd));
        let end = r.offset.checked_add(r.count).expect("offset + count overflows");
        assert!(end <= e.size, "range past the end accepted");
    }
    if matches!(r.cmd, cmd::READ | cmd::WRITE) {
        assert!(r.count <= u64::from(MAX_REQUEST_SIZE), "oversized I/O accepted");
    }
    if matches!(r.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
        assert!(!has(eflag::READ_ONLY), "write to a read-only export accepted");
    }
    match r.cmd {
        cmd::TRIM => assert!(has(eflag::SEND_TRIM)),
        cmd::WRITE_ZEROES => assert!(has(eflag::SEND_WRITE_ZEROES)),
        cmd::CACHE => assert!(has(eflag::SEND_CACHE)),
        cmd::BLOCK_STATUS => assert!((e.structured || e.extended) && e.base_allocation),
        _ => {}
    }
    let f = r.flags;
    let mut known = cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::DF | cmdflag::REQ_ONE | cmdflag::FAST_ZERO;
    if e.extended {
        known |= cmdflag::PAYLOAD_LEN;
    }
    assert_eq!(f & !known, 0, "unknown flag bits accepted");
    if f & cmdflag::FUA != 0 {
        assert!(has(eflag::SEND_FUA));
    }
    if f & cmdflag::NO_HOLE != 0 {
        assert_eq!(r.cmd, cmd::WRITE_ZEROES);
    }
    if f & cmdflag::FAST_ZERO != 0 {
        assert!(r.cmd == cmd::WRITE_ZEROES && has(eflag::SEND_FAST_ZERO));
    }
    if f & cmdflag::DF != 0 {
        assert!(r.cmd == cmd::READ && has(eflag::SEND_DF));
    }
    if f & cmdflag::REQ_ONE != 0 {
        assert_eq!(r.cmd, cmd::BLOCK_STATUS);
    }
    if f & cmdflag::PAYLOAD_LEN != 0 {
        assert_eq!(r.cmd, cmd::WRITE);
    }
}

/// The fuzz target `option`: one option header, then its payload, through
/// `OptionHeader::decode`, `Negotiation::intake`, `parse_info_go` and
/// `parse_meta`.
pub fn option(data: &[u8]) {
    let hdr = OptionHeader::decode(data);
    match &hdr {
        Ok(h) => {
            assert!(data.len() >= OPTION_HEADER_LEN && data[..8] == IHAVEOPT.to_be_bytes());
            assert_eq!(h.option, u32::from_be_bytes(data[8..12].try_into().expect("4")));
            assert_eq!(h.len, u32::from_be_bytes(data[12..16].try_into().expect("4")));
        }
        Err(DecodeError::Short) => assert!(data.len() < OPTION_HEADER_LEN),
        Err(DecodeError::BadMagic(m)) => assert_ne!(*m, IHAVEOPT),
        Err(e) => panic!("OptionHeader::decode: unexpected {e:?}"),
    }
    let payload = data.get(OPTION_HEADER_LEN..).unwrap_or(data);
    if let Ok(h) = hdr {
        for (gflags, cflags) in [(3, 3), (3, 0)] {
            let n = Negotiation::new(Policy::default(), gflags, cflags).expect("valid flags");
            check_intake(&n, h.option, h.len);
        }
    }
    check_info_go(payload);
    check_meta(payload);
}

/// `intake` never buffers more than a known option's structural maximum.
fn check_intake(n: &Negotiation, option: u32, len: u32) {
    let i = n.intake(option, len);
    match i {
        Intake::Buffer => {
            let cap = match option {
                opt::EXPORT_NAME => MAX_STRING as u32,
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => MAX_META_LEN,
                opt::INFO | opt::GO => MAX_GO_LEN,
                _ => 0,
            };
            assert!(len <= cap, "option {option} of {len} bytes would be buffered");
        }
        Intake::Discard => {
            assert!(len <= MAX_OPTION_LEN);
            assert!(!matches!(option, opt::EXPORT_NAME | opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT));
        }
        Intake::Close => assert!(len > MAX_STRING as u32),
    }
}

fn check_info_go(payload: &[u8]) {
    let Some((name, infos)) = parse_info_go(payload) else { return };
    assert!(name.len() <= MAX_STRING && !name.contains(&0));
    assert_eq!(infos.len() % 2, 0);
    let mut enc = Vec::new();
    enc.put_u32(name.len() as u32);
    enc.extend_from_slice(name);
    enc.put_u16((infos.len() / 2) as u16);
    enc.extend_from_slice(infos);
    assert_eq!(enc, payload, "parse_info_go accepted bytes it does not account for");
}

fn check_meta(payload: &[u8]) {
    let Some((name, queries)) = parse_meta(payload) else { return };
    assert!(name.len() <= MAX_STRING && !name.contains(&0));
    let mut enc = Vec::new();
    enc.put_u32(name.len() as u32);
    enc.extend_from_slice(name);
    enc.put_u32(queries.len() as u32);
    for q in &queries {
        assert!(q.len() <= MAX_STRING);
        enc.put_u32(q.len() as u32);
        enc.extend_from_slice(q);
    }
    assert_eq!(enc, payload, "parse_meta accepted bytes it does not account for");
}

/// A fake export side for negotiation: a fixed export list, every
/// failure it can report, and a record of what was opened.
#[derive(Debug, Clone)]
pub struct FakeExports {
    /// What LIST returns (names and descriptions at most 4096 bytes, as
    /// `backend::Export` requires).
    pub exports: Vec<Export>,
    /// LIST fails with this message.
    pub list_error: Option<String>,
    /// Messages of failed opens are this long (longer than 4096 tests
    /// the clipping of option error messages).
    pub error_len: usize,
    /// Capabilities of every export.
    pub caps: Caps,
    /// Block size of every export.
    pub block_size: Option<BlockSize>,
    /// An export is open now.
    pub open: bool,
    /// Successful opens so far.
    pub opens: u32,
}

impl FakeExports {
    /// Two exports ("" is the default, named "default"; "b" has a
    /// description), read-write, every feature.
    pub fn standard() -> FakeExports {
        FakeExports {
            exports: vec![Export::new("default"), Export { name: "b".into(), description: Some("disk b".into()) }],
            list_error: None,
            error_len: 20,
            caps: Caps {
                write: true,
                flush: true,
                rotational: false,
                trim: true,
                zero: Support::Native,
                fast_zero: true,
                extents: true,
                fua: Support::Native,
                multi_conn: true,
                cache: Support::Emulate,
            },
            block_size: Some(BlockSize { min: 1, preferred: 4096, max: u32::MAX }),
            open: false,
            opens: 0,
        }
    }

    /// One read-only export with nothing optional; LIST fails and error
    /// messages are too long to send.
    pub fn hostile() -> FakeExports {
        FakeExports {
            exports: vec![Export::new("default")],
            list_error: Some("x".repeat(MAX_STRING + 1)),
            error_len: MAX_STRING + 1,
            caps: Caps::default(),
            block_size: None,
            open: false,
            opens: 0,
        }
    }

    /// Many exports with maximal names and descriptions.
    pub fn crowded() -> FakeExports {
        let long = |c: char| c.to_string().repeat(MAX_STRING);
        let mut exports = vec![Export::new("default"), Export { name: long('n'), description: Some(long('d')) }];
        exports.extend((0..8).map(|i| Export::new(format!("e{i}"))));
        FakeExports { exports, ..FakeExports::standard() }
    }
}

impl Exports for FakeExports {
    fn list(&mut self) -> Result<Vec<Export>, String> {
        match &self.list_error {
            Some(m) => Err(m.clone()),
            None => Ok(self.exports.clone()),
        }
    }

    fn open(&mut self, name: &str) -> Result<ExportInfo, String> {
        self.open = false;
        let canonical = if name.is_empty() { "default" } else { name };
        let Some(e) = self.exports.iter().find(|e| e.name == canonical) else {
            return Err("e".repeat(self.error_len));
        };
        self.open = true;
        self.opens += 1;
        Ok(ExportInfo {
            name: e.name.clone(),
            size: 1 << 20,
            caps: self.caps,
            block_size: self.block_size,
            description: e.description.clone(),
        })
    }

    fn close(&mut self) {
        self.open = false;
    }
}

/// One server configuration for [`drive`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Server policy.
    pub policy: Policy,
    /// Handshake flags in the greeting (after `--mask-handshake`).
    pub gflags: u16,
    /// The export side.
    pub exports: FakeExports,
}

/// The configurations [`negotiate`] runs every input under.
pub fn configs() -> Vec<Config> {
    let full = Policy { no_sr: false, no_mc: false, multi_conn: true, extended_headers: true };
    vec![
        Config { policy: full, gflags: gflag::FIXED_NEWSTYLE | gflag::NO_ZEROES, exports: FakeExports::standard() },
        Config {
            policy: Policy { no_sr: true, no_mc: true, multi_conn: false, extended_headers: true },
            gflags: gflag::FIXED_NEWSTYLE | gflag::NO_ZEROES,
            exports: FakeExports::hostile(),
        },
        Config {
            policy: Policy { extended_headers: false, ..full },
            gflags: gflag::FIXED_NEWSTYLE,
            exports: FakeExports::crowded(),
        },
        Config { policy: full, gflags: 0, exports: FakeExports::standard() },
    ]
}

/// How a negotiation driven by [`drive`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegotiationEnd {
    /// The input ran out.
    Eof,
    /// Client flags with unknown bits: closed.
    BadFlags,
    /// An option header with a wrong magic: closed.
    BadMagic,
    /// An option too long to take in: closed.
    TooLong,
    /// The state machine said Close (ABORT, budget, failed EXPORT_NAME).
    Closed,
    /// An export was chosen; what followed went to [`requests`].
    Transmission(RequestsEnd),
}

/// What [`drive`] saw.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// How it ended.
    pub end: NegotiationEnd,
    /// Options handed to `handle` that were answered (budget not spent).
    pub answered: u32,
    /// Every option reply: (option, type, payload length).
    pub replies: Vec<(u32, u32, usize)>,
    /// The export state of the transmission phase, if reached.
    pub export: Option<request::Export>,
    /// What the transmission phase did.
    pub requests: RequestsRun,
}

/// The server's handshake driver (`server::connection::handshake`) over
/// the client bytes `input` (which start with the client flags), with
/// every reply checked.
pub fn drive(cfg: &Config, input: &[u8]) -> Negotiated {
    let mut ex = cfg.exports.clone();
    let mut d = input;
    let mut res = Negotiated {
        end: NegotiationEnd::Eof,
        answered: 0,
        replies: Vec::new(),
        export: None,
        requests: RequestsRun::default(),
    };
    let Some(cf) = take(&mut d, 4) else { return res };
    let cflags = u32::from_be_bytes(cf.try_into().expect("4 bytes"));
    let mut neg = match Negotiation::new(cfg.policy, cfg.gflags, cflags) {
        Ok(n) => n,
        Err(_) => {
            assert_ne!(cflags & !u32::from(cfg.gflags), 0, "valid client flags refused");
            res.end = NegotiationEnd::BadFlags;
            return res;
        }
    };
    assert_eq!(neg.fixed, cflags & cflag::FIXED_NEWSTYLE != 0);
    let mut listed: Option<u32> = None;
    loop {
        let Some(hdr) = take(&mut d, OPTION_HEADER_LEN) else { return res };
        let h = match OptionHeader::decode(hdr) {
            Ok(h) => h,
            Err(e) => {
                assert!(matches!(e, DecodeError::BadMagic(_)), "{e:?}");
                res.end = NegotiationEnd::BadMagic;
                return res;
            }
        };
        let intake = neg.intake(h.option, h.len);
        check_intake(&neg, h.option, h.len);
        let payload = match intake {
            Intake::Close => {
                res.end = NegotiationEnd::TooLong;
                return res;
            }
            Intake::Discard => {
                if take(&mut d, h.len as usize).is_none() {
                    return res;
                }
                Payload::Dropped
            }
            Intake::Buffer => match take(&mut d, h.len as usize) {
                Some(p) => Payload::Bytes(p),
                None => return res,
            },
        };
        let was = (neg.structured, neg.extended);
        let before = res.replies.len();
        let mut out = Vec::new();
        let step = neg.handle(h.option, payload, &mut ex, &mut out);
        if !out.is_empty() || step == Step::Transmission {
            res.answered += 1;
        }
        // Negotiated state only ever grows.
        assert!(neg.structured >= was.0 && neg.extended >= was.1);
        if neg.structured || neg.extended {
            assert!(!cfg.policy.no_sr);
        }
        if neg.extended {
            assert!(cfg.policy.extended_headers);
        }
        if h.option == opt::EXPORT_NAME && step == Step::Transmission {
            let want = if neg.no_zeroes { 10 } else { 134 };
            assert_eq!(out.len(), want, "EXPORT_NAME reply length");
            assert!(out[10..].iter().all(|&b| b == 0));
        } else {
            check_replies(&mut res, h.option, &out, step, &neg, &ex);
        }
        // A successful LIST adds MAX_OPTIONS per export to the budget, once.
        if h.option == opt::LIST && listed.is_none() && res.replies.len() > before && res.replies.last().is_some_and(|r| r.1 == rep::ACK) {
            listed = Some(ex.exports.len() as u32);
        }
        let budget = MAX_OPTIONS * (1 + listed.unwrap_or(0));
        assert!(res.answered <= budget, "{} options answered, budget {budget}", res.answered);
        match step {
            Step::Continue => {
                assert!(!out.is_empty(), "option {} got no reply", h.option);
                assert!(neg.chosen.is_none());
                if h.option == opt::INFO {
                    assert!(!ex.open, "INFO left the export open");
                }
            }
            Step::Close => {
                res.end = NegotiationEnd::Closed;
                return res;
            }
            Step::Transmission => {
                assert!(matches!(h.option, opt::GO | opt::EXPORT_NAME));
                assert!(ex.open, "transmission without an open export");
                let (info, eflags) = neg.chosen.clone().expect("an export was chosen");
                check_eflags(eflags, &info.caps, &neg, cfg);
                if neg.base_allocation {
                    assert!(neg.structured || neg.extended);
                    assert!(!cfg.policy.no_mc);
                }
                let e = request::Export {
                    size: info.size,
                    eflags,
                    structured: neg.structured || neg.extended,
                    extended: neg.extended,
                    base_allocation: neg.base_allocation,
                };
                let (end, run) = requests(&e, d);
                res.export = Some(e);
                res.requests = run;
                res.end = NegotiationEnd::Transmission(end);
                return res;
            }
        }
    }
}

fn check_eflags(f: u16, caps: &Caps, neg: &Negotiation, cfg: &Config) {
    assert_ne!(f & eflag::HAS_FLAGS, 0);
    assert_eq!(f & eflag::READ_ONLY != 0, !caps.write);
    assert_eq!(f & eflag::SEND_DF != 0, neg.structured || neg.extended);
    if f & eflag::CAN_MULTI_CONN != 0 {
        assert!(cfg.policy.multi_conn && caps.multi_conn);
    }
    if f & eflag::SEND_FAST_ZERO != 0 {
        assert_ne!(f & eflag::SEND_WRITE_ZEROES, 0);
    }
}

/// Every reply to one option: framed right, for this option, bounded in
/// size, informational replies first and exactly one final reply last.
fn check_replies(res: &mut Negotiated, option: u32, out: &[u8], step: Step, neg: &Negotiation, ex: &FakeExports) {
    let mut r = Reader::new(out);
    let mut types = Vec::new();
    while r.remaining() > 0 {
        let magic = r.u64().expect("reply header");
        assert_eq!(magic, REP_MAGIC, "option reply magic");
        assert_eq!(r.u32().expect("reply header"), option, "reply for another option");
        let typ = r.u32().expect("reply header");
        let len = r.u32().expect("reply header") as usize;
        let body = r.take(len).expect("reply length field larger than the reply");
        check_reply_body(option, typ, body, ex);
        res.replies.push((option, typ, len));
        types.push(typ);
    }
    let Some((&last, head)) = types.split_last() else {
        // Only Close says nothing (budget spent, or EXPORT_NAME failed).
        assert_eq!(step, Step::Close, "option {option} got no reply");
        return;
    };
    assert!(last == rep::ACK || last & 0x8000_0000 != 0, "last reply 0x{last:x} is not final");
    for &t in head {
        assert!(matches!(t, rep::SERVER | rep::INFO | rep::META_CONTEXT), "reply 0x{t:x} before the final one");
    }
    if !neg.fixed {
        assert_eq!(types, [rep::ERR_INVALID], "non-fixed client got more than ERR_INVALID");
    }
    if step == Step::Transmission {
        assert_eq!(last, rep::ACK);
        assert_eq!(types[0], rep::INFO, "GO must send NBD_INFO_EXPORT");
    }
    if last & 0x8000_0000 != 0 {
        assert!(head.is_empty(), "an error reply after informational replies (partial state)");
    }
    match option {
        opt::LIST if last == rep::ACK => assert!(head.iter().all(|&t| t == rep::SERVER)),
        opt::INFO | opt::GO => assert!(head.iter().all(|&t| t == rep::INFO)),
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            assert!(head.iter().all(|&t| t == rep::META_CONTEXT));
            assert!(head.len() <= 1, "one context at most");
        }
        _ => assert!(head.is_empty()),
    }
}

fn check_reply_body(option: u32, typ: u32, body: &[u8], ex: &FakeExports) {
    let string = |b: &[u8]| assert!(b.len() <= MAX_STRING, "string of {} bytes in a reply", b.len());
    match typ {
        rep::ACK => assert!(body.is_empty()),
        rep::SERVER => {
            let mut r = Reader::new(body);
            let n = r.u32().expect("SERVER reply name length") as usize;
            let name = r.take(n).expect("SERVER name length past the reply");
            string(name);
            string(&body[4 + n..]);
            assert!(ex.exports.iter().any(|e| e.name.as_bytes() == name), "LIST invented an export");
        }
        rep::INFO => {
            assert!(body.len() >= 2);
            let t = u16::from_be_bytes([body[0], body[1]]);
            let b = &body[2..];
            match t {
                info::EXPORT => assert_eq!(b.len(), 10),
                info::NAME | info::DESCRIPTION => string(b),
                info::BLOCK_SIZE => {
                    assert_eq!(b.len(), 12);
                    let v = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4"));
                    let (min, pref, max) = (v(0), v(4), v(8));
                    assert!(min.is_power_of_two() && min <= pref && pref <= max, "block size {min}/{pref}/{max}");
                    assert!(max <= MAX_REQUEST_SIZE, "maximum block size above what is served");
                }
                t => panic!("NBD_INFO type {t} was never asked for by this server"),
            }
        }
        rep::META_CONTEXT => {
            assert!(body.len() >= 4);
            assert_eq!(&body[4..], BASE_ALLOCATION.as_bytes());
            let id = u32::from_be_bytes(body[..4].try_into().expect("4"));
            if option == opt::LIST_META_CONTEXT {
                assert_eq!(id, 0, "LIST_META_CONTEXT ids are 0");
            } else {
                assert_ne!(id, 0);
            }
        }
        t if t & 0x8000_0000 != 0 => {
            assert!(
                (rep::ERR_UNSUP..=rep::ERR_EXT_HEADER_REQD).contains(&t),
                "unknown error reply 0x{t:x}"
            );
            string(body);
        }
        t => panic!("unknown reply type 0x{t:x}"),
    }
}

/// The fuzz target `negotiate`: `input` through [`drive`] under every
/// configuration of [`configs`].
pub fn negotiate(input: &[u8]) {
    for cfg in configs() {
        let _ = drive(&cfg, input);
    }
}

/// Encodes an option as a client sends it (for seeds and tests).
pub fn option_bytes(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + payload.len());
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(payload.len() as u32);
    v.extend_from_slice(payload);
    v
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: export name, then the
/// information requests (for seeds and tests).
pub fn info_go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut p = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    p.put_u32(name.len() as u32);
    p.extend_from_slice(name);
    p.put_u16(infos.len() as u16);
    for i in infos {
        p.put_u16(*i);
    }
    p
}
