//! The ClientHello (RFC 8446 §4.1.2), parsed once: what the version
//! choice (psk.rs) and the TLS 1.3 server need of it.

/// Extension numbers.
pub const EXT_SUPPORTED_GROUPS: u16 = 10;
pub const EXT_PRE_SHARED_KEY: u16 = 41;
pub const EXT_EARLY_DATA: u16 = 42;
pub const EXT_SUPPORTED_VERSIONS: u16 = 43;
pub const EXT_PSK_MODES: u16 = 45;
pub const EXT_KEY_SHARE: u16 = 51;

/// Alert descriptions the parser may ask for.
pub const ILLEGAL_PARAMETER: u8 = 47;
pub const DECODE_ERROR: u8 = 50;

/// A ClientHello.
#[derive(Debug, Default, Clone)]
pub struct Hello {
    pub legacy_version: u16,
    pub random: [u8; 32],
    pub session_id: Vec<u8>,
    pub suites: Vec<u16>,
    pub compression: Vec<u8>,
    /// supported_versions (empty when absent).
    pub versions: Vec<u16>,
    /// supported_groups, if sent.
    pub groups: Option<Vec<u16>>,
    /// key_share entries (group, key_exchange), if sent.
    pub shares: Option<Vec<(u16, Vec<u8>)>>,
    /// psk_key_exchange_modes, if sent.
    pub psk_modes: Option<Vec<u8>>,
    /// pre_shared_key, if sent.
    pub psk: Option<Offered>,
    /// early_data was offered.
    pub early_data: bool,
}

/// The pre_shared_key extension of a ClientHello.
#[derive(Debug, Default, Clone)]
pub struct Offered {
    /// The identities, in the client's order.
    pub identities: Vec<Vec<u8>>,
    /// One binder per identity.
    pub binders: Vec<Vec<u8>>,
    /// Where the binders list starts in the handshake message (header
    /// included): the ClientHello truncated there is what binders sign.
    pub binders_at: usize,
}

impl Hello {
    /// True if the client offers TLS 1.3 with an external PSK: it gets
    /// the TLS 1.3 server; any other goes to TLS 1.2.
    pub fn wants_tls13(&self) -> bool {
        self.versions.contains(&0x0304) && self.psk.is_some()
    }

    /// True if the client offers TLS 1.3 at all (a TLS 1.2 server then
    /// marks its random as RFC 8446 §4.1.3 says).
    pub fn offers_tls13(&self) -> bool {
        self.versions.contains(&0x0304)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

type Fail = (u8, &'static str);

const DECODE: Fail = (DECODE_ERROR, "malformed ClientHello");

fn list16(b: &[u8]) -> Option<Vec<u16>> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    Some(b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect())
}

/// Parses a ClientHello handshake message (`msg` with its 4-byte header).
/// The error is the alert to send and why.
pub fn parse(msg: &[u8]) -> Result<Hello, Fail> {
    let mut c = Cursor { b: msg, at: 0 };
    let (Some(1), Some(len)) = (c.u8(), c.take(3)) else { return Err(DECODE) };
    if u32::from_be_bytes([0, len[0], len[1], len[2]]) as usize != msg.len() - 4 {
        return Err(DECODE);
    }
    let mut h = Hello { legacy_version: c.u16().ok_or(DECODE)?, ..Hello::default() };
    h.random.copy_from_slice(c.take(32).ok_or(DECODE)?);
    h.session_id = c.vec8().ok_or(DECODE)?.to_vec();
    if h.session_id.len() > 32 {
        return Err((ILLEGAL_PARAMETER, "legacy_session_id longer than 32 bytes"));
    }
    h.suites = c.vec16().and_then(list16).filter(|s| !s.is_empty()).ok_or(DECODE)?;
    h.compression = c.vec8().filter(|v| !v.is_empty()).ok_or(DECODE)?.to_vec();
    if c.done() {
        return Ok(h); // no extensions (TLS 1.2 and older)
    }
    let exts_len = c.u16().ok_or(DECODE)? as usize;
    if c.b.len() - c.at != exts_len {
        return Err(DECODE);
    }
    let mut seen: Vec<u16> = Vec::new();
    while !c.done() {
        let typ = c.u16().ok_or(DECODE)?;
        let data_at = c.at + 2;
        let data = c.vec16().ok_or(DECODE)?;
        if seen.contains(&typ) {
            return Err((ILLEGAL_PARAMETER, "duplicate extension"));
        }
        seen.push(typ);
        if h.psk.is_some() {
            return Err((ILLEGAL_PARAMETER, "pre_shared_key is not the last extension"));
        }
        let mut d = Cursor { b: data, at: 0 };
        match typ {
            EXT_SUPPORTED_VERSIONS => {
                let v = d.vec8().and_then(list16).filter(|v| !v.is_empty()).ok_or(DECODE)?;
                h.versions = v;
            }
            EXT_SUPPORTED_GROUPS => {
                h.groups = Some(d.vec16().and_then(list16).filter(|v| !v.is_empty()).ok_or(DECODE)?);
            }
            EXT_KEY_SHARE => {
                let mut l = Cursor { b: d.vec16().ok_or(DECODE)?, at: 0 };
                let mut shares: Vec<(u16, Vec<u8>)> = Vec::new();
                while !l.done() {
                    let g = l.u16().ok_or(DECODE)?;
                    let k = l.vec16().filter(|k| !k.is_empty()).ok_or(DECODE)?;
                    if shares.iter().any(|(x, _)| *x == g) {
                        return Err((ILLEGAL_PARAMETER, "two key shares for one group"));
                    }
                    shares.push((g, k.to_vec()));
                }
                h.shares = Some(shares);
            }
            EXT_PSK_MODES => {
                h.psk_modes = Some(d.vec8().filter(|v| !v.is_empty()).ok_or(DECODE)?.to_vec());
            }
            EXT_EARLY_DATA => {
                h.early_data = true;
                d.at = d.b.len();
            }
            EXT_PRE_SHARED_KEY => {
                let mut ids = Cursor { b: d.vec16().ok_or(DECODE)?, at: 0 };
                let mut o = Offered { binders_at: data_at + d.at, ..Offered::default() };
                while !ids.done() {
                    let id = ids.vec16().filter(|i| !i.is_empty()).ok_or(DECODE)?;
                    ids.take(4).ok_or(DECODE)?; // obfuscated_ticket_age
                    o.identities.push(id.to_vec());
                }
                let mut bs = Cursor { b: d.vec16().ok_or(DECODE)?, at: 0 };
                while !bs.done() {
                    o.binders.push(bs.vec8().filter(|b| b.len() >= 32).ok_or(DECODE)?.to_vec());
                }
                if o.identities.is_empty() || o.identities.len() != o.binders.len() {
                    return Err((ILLEGAL_PARAMETER, "pre_shared_key: as many binders as identities needed"));
                }
                h.psk = Some(o);
            }
            _ => d.at = d.b.len(),
        }
        if !d.done() {
            return Err(DECODE);
        }
    }
    Ok(h)
}
