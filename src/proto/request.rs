//! Transmission-phase requests: decoding the compact (28-byte) and
//! extended (32-byte) headers, and nbdkit's validation rules.

use super::codec::{DecodeError, Reader};
use super::wire::{cmd, cmdflag, eflag, errno, EXT_REQUEST_MAGIC, MAX_REQUEST_SIZE, REQUEST_MAGIC};

/// Compact header length.
pub const REQUEST_LEN: usize = 28;
/// Extended header length.
pub const EXT_REQUEST_LEN: usize = 32;

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (wire bits).
    pub flags: u16,
    /// Command type.
    pub cmd: u16,
    /// Cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length: payload length for writes, effect length otherwise.
    pub count: u64,
}

impl Request {
    /// Decodes a header (compact unless `extended`). Never reads the write
    /// payload, never allocates.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Request, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        let want = if extended { EXT_REQUEST_MAGIC } else { REQUEST_MAGIC };
        if magic != want {
            return Err(DecodeError::BadMagic(magic.into()));
        }
        let flags = r.u16()?;
        let cmd = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let count = if extended { r.u64()? } else { u64::from(r.u32()?) };
        Ok(Request { flags, cmd, cookie, offset, count })
    }

    /// Encodes the header (for tests and clients).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        use super::codec::Put;
        out.put_u32(if extended { EXT_REQUEST_MAGIC } else { REQUEST_MAGIC });
        out.put_u16(self.flags);
        out.put_u16(self.cmd);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.count);
        } else {
            out.put_u32(self.count as u32);
        }
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self, extended: bool) -> u64 {
        // With extended headers a WRITE's length is its payload length
        // whether or not PAYLOAD_LEN is set (qemu does not set it).
        if self.cmd == cmd::WRITE || (extended && self.flags & cmdflag::PAYLOAD_LEN != 0) {
            self.count
        } else {
            0
        }
    }
}

/// What validation needs to know about the connection.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    /// Export size.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub eflags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    /// base:allocation selected for this export.
    pub base_allocation: bool,
}

/// True if `[offset, offset+count)` is a non-empty range inside `size`.
/// Cannot overflow, whatever the client sends.
pub fn in_bounds(offset: u64, count: u64, size: u64) -> bool {
    count > 0 && offset <= size && count <= size - offset
}

/// Why a request is invalid, in nbdkit's words (`invalid request: …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    UnknownCommand(u16),
    ReadOnly(u16),
    OutOfRange(u16, u64, u64),
    NotZero(u16),
    UnknownFlags(u16),
    FlagNeeds(&'static str, &'static str),
    NoStructured(u16),
    NotSupported(&'static str),
    TooLarge(u16, u64),
    NoBaseAllocation(u16),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = cmd::name;
        match *self {
            Invalid::UnknownCommand(c) => write!(f, "unknown command ({c}) ignored"),
            Invalid::ReadOnly(c) => write!(f, "{}: write request on readonly connection", n(c)),
            Invalid::OutOfRange(c, o, k) => {
                write!(f, "{}: offset and count are out of range: offset={o} count={k}", n(c))
            }
            Invalid::NotZero(c) => write!(f, "{}: expecting offset and count = 0", n(c)),
            Invalid::UnknownFlags(x) => write!(f, "unknown flag (0x{x:x})"),
            Invalid::FlagNeeds(flag, c) => write!(f, "{flag} flag needs {c} request"),
            Invalid::NoStructured(c) => write!(f, "{}: structured replies was not negotiated", n(c)),
            Invalid::NotSupported(what) => write!(f, "{what} not supported"),
            Invalid::TooLarge(c, k) => write!(f, "{}: data request is too large ({k} > {MAX_REQUEST_SIZE})", n(c)),
            Invalid::NoBaseAllocation(c) => write!(f, "{}: base:allocation was not negotiated", n(c)),
        }
    }
}

/// nbdkit's request validation: `Ok` or the NBD error to reply with.
/// The caller has already dealt with a payload too big to drain.
pub fn validate(r: &Request, e: &Export) -> Result<(), u32> {
    check(r, e).map_err(|(errno, _)| errno)
}

/// [`validate`], with the reason a request is refused.
pub fn check(r: &Request, e: &Export) -> Result<(), (u32, Invalid)> {
    let has = |f: u16| e.eflags & f != 0;
    let writes = matches!(r.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    match r.cmd {
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
        | cmd::FLUSH | cmd::DISC => {}
        c => return Err((errno::EINVAL, Invalid::UnknownCommand(c))),
    }
    if writes && has(eflag::READ_ONLY) {
        return Err((errno::EPERM, Invalid::ReadOnly(r.cmd)));
    }
    match r.cmd {
        cmd::FLUSH | cmd::DISC if r.offset != 0 || r.count != 0 => {
            return Err((errno::EINVAL, Invalid::NotZero(r.cmd)))
        }
        cmd::FLUSH | cmd::DISC => {}
        _ if !in_bounds(r.offset, r.count, e.size) => {
            let kind = if matches!(r.cmd, cmd::WRITE | cmd::WRITE_ZEROES) { errno::ENOSPC } else { errno::EINVAL };
            return Err((kind, Invalid::OutOfRange(r.cmd, r.offset, r.count)));
        }
        _ => {}
    }
    let mut known = cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::DF | cmdflag::REQ_ONE | cmdflag::FAST_ZERO;
    if e.extended {
        known |= cmdflag::PAYLOAD_LEN;
    }
    let f = r.flags;
    let bad_flag = if f & !known != 0 {
        Some(Invalid::UnknownFlags(f & !known))
    } else if f & cmdflag::NO_HOLE != 0 && r.cmd != cmd::WRITE_ZEROES {
        Some(Invalid::FlagNeeds("NO_HOLE", "WRITE_ZEROES"))
    } else if f & cmdflag::FAST_ZERO != 0 && r.cmd != cmd::WRITE_ZEROES {
        Some(Invalid::FlagNeeds("FAST_ZERO", "WRITE_ZEROES"))
    } else if f & cmdflag::FAST_ZERO != 0 && !has(eflag::SEND_FAST_ZERO) {
        Some(Invalid::NotSupported("FAST_ZERO flag"))
    } else if f & cmdflag::DF != 0 && r.cmd != cmd::READ {
        Some(Invalid::FlagNeeds("DF", "READ"))
    } else if f & cmdflag::DF != 0 && !has(eflag::SEND_DF) {
        Some(Invalid::NoStructured(r.cmd))
    } else if f & cmdflag::REQ_ONE != 0 && r.cmd != cmd::BLOCK_STATUS {
        Some(Invalid::FlagNeeds("REQ_ONE", "BLOCK_STATUS"))
    } else if f & cmdflag::FUA != 0 && !has(eflag::SEND_FUA) {
        Some(Invalid::NotSupported("FUA flag"))
    } else if f & cmdflag::PAYLOAD_LEN != 0 && r.cmd != cmd::WRITE {
        Some(Invalid::FlagNeeds("PAYLOAD_LEN", "WRITE"))
    } else {
        None
    };
    if let Some(why) = bad_flag {
        return Err((errno::EINVAL, why));
    }
    if matches!(r.cmd, cmd::READ | cmd::WRITE) && r.count > u64::from(MAX_REQUEST_SIZE) {
        return Err((errno::EINVAL, Invalid::TooLarge(r.cmd, r.count)));
    }
    let refused = match r.cmd {
        cmd::FLUSH if !has(eflag::SEND_FLUSH) => Some(Invalid::NotSupported("flush operation")),
        cmd::TRIM if !has(eflag::SEND_TRIM) => Some(Invalid::NotSupported("trim operation")),
        cmd::WRITE_ZEROES if !has(eflag::SEND_WRITE_ZEROES) => Some(Invalid::NotSupported("write zeroes operation")),
        cmd::CACHE if !has(eflag::SEND_CACHE) => Some(Invalid::NotSupported("cache operation")),
        cmd::BLOCK_STATUS if !(e.structured || e.extended) => Some(Invalid::NoStructured(r.cmd)),
        cmd::BLOCK_STATUS if !e.base_allocation => Some(Invalid::NoBaseAllocation(r.cmd)),
        _ => None,
    };
    match refused {
        Some(why) => Err((errno::EINVAL, why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: u16 = eflag::HAS_FLAGS | eflag::SEND_FLUSH | eflag::SEND_FUA | eflag::SEND_TRIM
        | eflag::SEND_WRITE_ZEROES | eflag::SEND_DF | eflag::SEND_CACHE | eflag::SEND_FAST_ZERO;

    fn exp(eflags: u16) -> Export {
        Export { size: 1 << 20, eflags, structured: true, extended: false, base_allocation: true }
    }

    fn req(cmd: u16, flags: u16, offset: u64, count: u64) -> Request {
        Request { flags, cmd, cookie: 7, offset, count }
    }

    #[test]
    fn invalid_requests_say_why_in_nbdkits_words() {
        let why = |r: Request, e: Export| check(&r, &e).unwrap_err().1.to_string();
        assert_eq!(
            why(req(cmd::READ, 0, 1 << 30, 512), exp(ALL)),
            "NBD_CMD_READ: offset and count are out of range: offset=1073741824 count=512"
        );
        assert_eq!(why(req(cmd::WRITE, 0, 0, 512), exp(ALL | eflag::READ_ONLY)), "NBD_CMD_WRITE: write request on readonly connection");
        assert_eq!(why(req(cmd::FLUSH, 0, 1, 0), exp(ALL)), "NBD_CMD_FLUSH: expecting offset and count = 0");
        assert_eq!(why(req(99, 0, 0, 512), exp(ALL)), "unknown command (99) ignored");
        assert_eq!(why(req(cmd::READ, 0x400, 0, 512), exp(ALL)), "unknown flag (0x400)");
        assert_eq!(why(req(cmd::READ, cmdflag::REQ_ONE, 0, 512), exp(ALL)), "REQ_ONE flag needs BLOCK_STATUS request");
        assert_eq!(why(req(cmd::WRITE, cmdflag::FUA, 0, 512), exp(ALL & !eflag::SEND_FUA)), "FUA flag not supported");
        assert_eq!(why(req(cmd::TRIM, 0, 0, 512), exp(ALL & !eflag::SEND_TRIM)), "trim operation not supported");
        let mut e = exp(ALL);
        e.base_allocation = false;
        assert_eq!(why(req(cmd::BLOCK_STATUS, 0, 0, 512), e), "NBD_CMD_BLOCK_STATUS: base:allocation was not negotiated");
    }

    proptest! {
        #[test]
        fn check_and_validate_agree(cmd in 0u16..12, flags: u16, offset in 0u64..(2 << 20), count in 0u64..(2 << 20), eflags: u16) {
            let (r, e) = (req(cmd, flags, offset, count), exp(eflags));
            prop_assert_eq!(validate(&r, &e), check(&r, &e).map_err(|x| x.0));
        }
    }

    #[test]
    fn request_round_trips() {
        let r = req(cmd::WRITE, cmdflag::FUA, 4096, 512);
        let mut b = Vec::new();
        r.encode(false, &mut b);
        assert_eq!(b[..4], [0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b, false), Ok(r));
        let mut b = Vec::new();
        r.encode(true, &mut b);
        assert_eq!(b.len(), EXT_REQUEST_LEN);
        assert_eq!(Request::decode(&b, true), Ok(r));
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        assert_eq!(Request::decode(&[0x25, 0x60], false), Err(DecodeError::Short));
        assert_eq!(Request::decode(&[0; REQUEST_LEN], false), Err(DecodeError::BadMagic(0)));
        assert!(!in_bounds(u64::MAX, u64::from(u32::MAX), 512));
        assert!(!in_bounds(0, 0, 512));
        assert!(in_bounds(0, 512, 512));
    }

    #[test]
    fn nbdkit_validation_rules() {
        let e = exp(ALL);
        assert_eq!(validate(&req(99, 0, 0, 1), &e), Err(errno::EINVAL)); // T02
        assert_eq!(validate(&req(cmd::READ, 0x100, 0, 1), &e), Err(errno::EINVAL)); // T03
        assert_eq!(validate(&req(cmd::READ, cmdflag::NO_HOLE, 0, 1), &e), Err(errno::EINVAL)); // T04
        assert_eq!(validate(&req(cmd::WRITE, cmdflag::FAST_ZERO, 0, 1), &e), Err(errno::EINVAL));
        assert_eq!(validate(&req(cmd::READ, cmdflag::REQ_ONE, 0, 1), &e), Err(errno::EINVAL));
        assert_eq!(validate(&req(cmd::WRITE, cmdflag::DF, 0, 1), &e), Err(errno::EINVAL));
        assert_eq!(validate(&req(cmd::READ, 0, (1 << 20) - 256, 512), &e), Err(errno::EINVAL)); // T05
        assert_eq!(validate(&req(cmd::READ, 0, u64::MAX - 511, 1024), &e), Err(errno::EINVAL)); // T06
        assert_eq!(validate(&req(cmd::READ, 0, 0, 0), &e), Err(errno::EINVAL)); // T07
        assert_eq!(validate(&req(cmd::WRITE, 0, 0, 0), &e), Err(errno::ENOSPC)); // T08
        assert_eq!(validate(&req(cmd::WRITE, 0, (1 << 20) - 256, 512), &e), Err(errno::ENOSPC)); // T09
        assert_eq!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 0), &e), Err(errno::EINVAL)); // T17
        assert_eq!(validate(&req(cmd::FLUSH, 0, 1, 0), &e), Err(errno::EINVAL)); // T18
        assert_eq!(validate(&req(cmd::CACHE, 0, 1 << 20, 1), &e), Err(errno::EINVAL)); // T33
        assert_eq!(validate(&req(cmd::READ, cmdflag::DF, 0, 512), &e), Ok(()));
        assert_eq!(validate(&req(cmd::WRITE_ZEROES, cmdflag::NO_HOLE | cmdflag::FAST_ZERO, 0, 512), &e), Ok(()));
        assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &e), Ok(()));
    }

    #[test]
    fn unadvertised_features_are_einval() {
        let e = Export { structured: false, base_allocation: false, ..exp(eflag::HAS_FLAGS) };
        for c in [cmd::FLUSH, cmd::TRIM, cmd::WRITE_ZEROES, cmd::CACHE, cmd::BLOCK_STATUS] {
            let count = if c == cmd::FLUSH { 0 } else { 512 };
            assert_eq!(validate(&req(c, 0, 0, count), &e), Err(errno::EINVAL), "{c}");
        }
        assert_eq!(validate(&req(cmd::WRITE, cmdflag::FUA, 0, 512), &e), Err(errno::EINVAL)); // T21
        assert_eq!(validate(&req(cmd::READ, cmdflag::DF, 0, 512), &e), Err(errno::EINVAL)); // T14
        let ro = exp(ALL | eflag::READ_ONLY);
        for c in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(validate(&req(c, 0, 0, 512), &ro), Err(errno::EPERM)); // T20
        }
    }

    #[test]
    fn oversized_io_is_refused() {
        let e = Export { size: 1 << 40, ..exp(ALL) };
        assert_eq!(validate(&req(cmd::READ, 0, 0, 65 << 20), &e), Err(errno::EINVAL)); // T11
        assert_eq!(validate(&req(cmd::READ, 0, 0, 33 << 20), &e), Ok(())); // T10
        assert_eq!(validate(&req(cmd::WRITE_ZEROES, 0, 0, 1 << 32), &e), Ok(()));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), ext: bool) {
            let _ = Request::decode(&bytes, ext);
        }

        #[test]
        fn validated_ranges_are_inside_the_export(c in 0u16..10, flags: u16, offset: u64, count: u64, size: u64) {
            let e = Export { size, ..exp(ALL) };
            let r = req(c, flags, offset, count);
            if validate(&r, &e).is_ok() && !matches!(c, cmd::FLUSH | cmd::DISC) {
                prop_assert!(offset.checked_add(count).is_some_and(|end| end <= size));
            }
        }
    }
}
