//! The option-haggling state machine of fixed newstyle negotiation.
//!
//! Pure: `Negotiation::handle` takes one option and its payload, asks the
//! export side through the [`Exports`] trait, appends the reply bytes and
//! says what happens next. The server's driver does the socket I/O.

use super::codec::{DecodeError, Put, Reader};
use super::handshake::option_reply;
use super::wire::{cflag, eflag, gflag, info, opt, rep, Named, BASE_ALLOCATION, BASE_ALLOCATION_ID, MAX_REQUEST_SIZE, MAX_STRING};
use crate::backend::{BlockSize, Caps, Export, Support};

/// A debug line about negotiation, in nbdkit's wording, handed to the
/// driver through [`Exports::note`]; formatted only when the driver is
/// verbose.
macro_rules! note {
    ($ex:expr, $($arg:tt)*) => {
        if $ex.verbose() {
            $ex.note(&format!($($arg)*));
        }
    };
}

/// Appends an ACK or error reply and notes it as nbdkit does
/// (`replying to NBD_OPT_… with NBD_REP_…`).
fn reply(ex: &mut dyn Exports, out: &mut Vec<u8>, option: u32, typ: u32, payload: &[u8]) {
    option_reply(out, option, typ, payload);
    note!(ex, "replying to {} with {}", Named::opt(option), Named::rep(typ));
}

/// Options a client may send before choosing an export (nbdkit's
/// MAX_NR_OPTIONS); each export listed by LIST adds as many again.
pub const MAX_OPTIONS: u32 = 32;
/// Options longer than this close the connection (nbdkit's MAX_REQUEST_SIZE).
pub const MAX_OPTION_LEN: u32 = 64 * 1024 * 1024;
/// Largest well-formed INFO/GO payload: name, count, 65535 info types.
pub const MAX_GO_LEN: u32 = 4 + MAX_STRING as u32 + 2 + 2 * 65535;
/// Meta-context options are buffered up to this, then the client is dropped.
pub const MAX_META_LEN: u32 = 1024 * 1024;

/// What the negotiation learns about an export it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (the default export's real name for "").
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Capabilities after the checking layer.
    pub caps: Caps,
    /// Block size constraints, if any layer has them.
    pub block_size: Option<BlockSize>,
    /// Description, if any.
    pub description: Option<String>,
}

/// The export side, as negotiation needs it.
pub trait Exports {
    /// The export list (LIST).
    fn list(&mut self) -> Result<Vec<Export>, String>;
    /// Open `name` ("" = the default export) and keep it open.
    fn open(&mut self, name: &str) -> Result<ExportInfo, String>;
    /// Close what `open` opened (after INFO).
    fn close(&mut self);
    /// Completes the `NBD_INFO_*` item `what` (block size, description)
    /// of the export `open` opened, when the client asks for it: asked
    /// then, as nbdkit asks. The default keeps what `open` returned.
    fn details(&mut self, _info: &mut ExportInfo, _what: u16) -> Result<(), String> {
        Ok(())
    }
    /// True if [`Exports::note`] wants the debug lines (`-v`): they are
    /// not even formatted otherwise.
    fn verbose(&self) -> bool {
        false
    }
    /// One debug line about what negotiation does, in nbdkit's wording,
    /// at the point it happens (between the export side's own calls).
    fn note(&mut self, _msg: &str) {}
}

/// Server policy for this connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// `--no-sr`: refuse structured replies.
    pub no_sr: bool,
    /// `--no-mc`: refuse meta contexts.
    pub no_mc: bool,
    /// Multi-conn may be advertised (thread model above serialize_connections).
    pub multi_conn: bool,
    /// Extended headers are offered.
    pub extended_headers: bool,
}

/// The payload of an option, or just its length when it was too big to
/// buffer and has been discarded.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The bytes.
    Bytes(&'a [u8]),
    /// Discarded unread.
    Dropped,
}

/// What the driver does after an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send the reply and read the next option.
    Continue,
    /// Send the reply, then close.
    Close,
    /// Send the reply; the transmission phase begins.
    Transmission,
}

/// What the driver does with an option header before reading the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Read the payload and call `handle` with it.
    Buffer,
    /// Skip the payload and call `handle` with `Payload::Dropped`.
    Discard,
    /// Close the connection at once.
    Close,
}

/// Per-connection negotiation state.
#[derive(Debug)]
pub struct Negotiation {
    policy: Policy,
    /// Client speaks fixed newstyle.
    pub fixed: bool,
    /// Client asked for no zeroes.
    pub no_zeroes: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    meta: Option<(Vec<u8>, bool)>,
    budget: u32,
    listed: bool,
    /// The export chosen by GO or EXPORT_NAME, and its transmission flags.
    pub chosen: Option<(ExportInfo, u16)>,
    /// base:allocation is usable in the transmission phase.
    pub base_allocation: bool,
    /// STARTTLS: 0 refused (`--tls=off`), 1 allowed, 2 required first.
    pub tls_mode: u8,
    /// The connection has been upgraded to TLS.
    pub tls: bool,
    /// Set when STARTTLS was acknowledged: the driver upgrades the
    /// connection after sending the reply, then calls [`Negotiation::tls_started`].
    pub start_tls: bool,
}

impl Negotiation {
    /// Starts after the client flags; unknown flag bits close the connection.
    pub fn new(policy: Policy, gflags: u16, client_flags: u32) -> Result<Negotiation, DecodeError> {
        if client_flags & !u32::from(gflags) != 0 {
            return Err(DecodeError::Invalid("client sent unknown or unadvertised flags"));
        }
        Ok(Negotiation {
            policy,
            fixed: client_flags & cflag::FIXED_NEWSTYLE != 0 && gflags & gflag::FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & cflag::NO_ZEROES != 0,
            structured: false,
            extended: false,
            meta: None,
            budget: MAX_OPTIONS,
            listed: false,
            chosen: None,
            base_allocation: false,
            tls_mode: 0,
            tls: false,
            start_tls: false,
        })
    }

    /// Decides how to take in an option of `len` bytes, before reading it.
    pub fn intake(&self, option: u32, len: u32) -> Intake {
        let cap = match option {
            opt::EXPORT_NAME => return if len as usize > MAX_STRING { Intake::Close } else { Intake::Buffer },
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                return if len > MAX_META_LEN { Intake::Close } else { Intake::Buffer }
            }
            opt::INFO | opt::GO => MAX_GO_LEN,
            _ => 0,
        };
        if len > MAX_OPTION_LEN {
            Intake::Close
        } else if len > cap {
            Intake::Discard
        } else {
            Intake::Buffer
        }
    }

    /// Handles one option, appending the reply to `out`.
    pub fn handle(&mut self, option: u32, payload: Payload<'_>, ex: &mut dyn Exports, out: &mut Vec<u8>) -> Step {
        if self.budget == 0 {
            note!(ex, "client spent too much time negotiating without selecting an export");
            return Step::Close;
        }
        self.budget -= 1;
        let bytes = match payload {
            Payload::Bytes(b) => Some(b),
            Payload::Dropped => None,
        };
        // --tls=require: nothing but STARTTLS and ABORT before the upgrade.
        if self.tls_mode == 2 && !self.tls && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME || !self.fixed {
                return Step::Close; // no way to say TLS_REQD
            }
            reply(ex, out, option, rep::ERR_TLS_REQD, b"");
            return Step::Continue;
        }
        if option == opt::EXPORT_NAME {
            return self.export_name(bytes.unwrap_or_default(), ex, out);
        }
        if !self.fixed {
            // Without fixed newstyle only EXPORT_NAME is honoured.
            note!(ex, "newstyle negotiation: {}: client is not fixed newstyle, only NBD_OPT_EXPORT_NAME is allowed", Named::opt(option));
            reply(ex, out, option, rep::ERR_INVALID, b"");
            return Step::Continue;
        }
        let empty = bytes.is_some_and(|b| b.is_empty());
        if !empty && matches!(option, opt::LIST | opt::STARTTLS | opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS) {
            note!(ex, "ignoring request, client sent unexpected payload: {}", Named::opt(option));
        }
        match option {
            opt::ABORT => {
                reply(ex, out, option, rep::ACK, b"");
                note!(ex, "client sent {} to abort the connection", Named::opt(option));
                Step::Close
            }
            opt::LIST => {
                if !empty || self.listed {
                    if empty {
                        note!(ex, "newstyle negotiation: {}: export list already advertised", Named::opt(option));
                    }
                    reply(ex, out, option, rep::ERR_INVALID, b"");
                    return Step::Continue;
                }
                self.list(ex, out)
            }
            opt::STARTTLS => {
                let typ = if !empty {
                    rep::ERR_INVALID
                } else if self.tls_mode == 0 {
                    rep::ERR_POLICY
                } else if self.tls {
                    rep::ERR_INVALID // not twice
                } else {
                    self.start_tls = true;
                    rep::ACK
                };
                reply(ex, out, option, typ, b"");
                Step::Continue
            }
            opt::INFO | opt::GO => match bytes {
                Some(b) => self.info_go(option, b, ex, out),
                None => {
                    note!(ex, "client option data too long, ignoring {}", Named::opt(option));
                    reply(ex, out, option, rep::ERR_INVALID, b"");
                    Step::Continue
                }
            },
            opt::STRUCTURED_REPLY => {
                let typ = if !empty || self.structured {
                    if empty {
                        note!(ex, "newstyle negotiation: {}: structured replies already in use", Named::opt(option));
                    }
                    rep::ERR_INVALID
                } else if self.policy.no_sr {
                    note!(ex, "newstyle negotiation: {}: structured replies are disabled", Named::opt(option));
                    rep::ERR_UNSUP
                } else if self.extended {
                    note!(ex, "newstyle negotiation: {}: extended headers already negotiated", Named::opt(option));
                    rep::ERR_EXT_HEADER_REQD
                } else {
                    note!(ex, "newstyle negotiation: {}: client requested structured replies", Named::opt(option));
                    self.structured = true;
                    rep::ACK
                };
                reply(ex, out, option, typ, b"");
                Step::Continue
            }
            opt::EXTENDED_HEADERS if self.policy.extended_headers && !self.policy.no_sr => {
                let typ = if !empty || self.extended {
                    if empty {
                        note!(ex, "newstyle negotiation: {}: extended headers already in use", Named::opt(option));
                    }
                    rep::ERR_INVALID
                } else {
                    note!(ex, "newstyle negotiation: {}: client requested extended headers", Named::opt(option));
                    self.extended = true;
                    rep::ACK
                };
                reply(ex, out, option, typ, b"");
                Step::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, bytes.unwrap_or_default(), ex, out);
                Step::Continue
            }
            _ => {
                reply(ex, out, option, rep::ERR_UNSUP, b"");
                Step::Continue
            }
        }
    }

    /// After the TLS handshake: everything negotiated in plaintext is
    /// forgotten (an attacker may have injected it; CVE-2021-3716).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.start_tls = false;
        self.structured = false;
        self.extended = false;
        self.meta = None;
        self.base_allocation = false;
        self.listed = false;
    }

    /// Transmission flags for an export, given what was negotiated.
    pub fn eflags(&self, caps: &Caps) -> u16 {
        let mut f = eflag::HAS_FLAGS;
        let set = |f: &mut u16, cond: bool, bit: u16| {
            if cond {
                *f |= bit;
            }
        };
        set(&mut f, !caps.write, eflag::READ_ONLY);
        set(&mut f, caps.flush, eflag::SEND_FLUSH);
        set(&mut f, caps.fua != Support::None, eflag::SEND_FUA);
        set(&mut f, caps.rotational, eflag::ROTATIONAL);
        set(&mut f, caps.trim, eflag::SEND_TRIM);
        set(&mut f, caps.zero != Support::None, eflag::SEND_WRITE_ZEROES);
        set(&mut f, caps.zero != Support::None && caps.fast_zero, eflag::SEND_FAST_ZERO);
        set(&mut f, self.structured || self.extended, eflag::SEND_DF);
        set(&mut f, caps.multi_conn && self.policy.multi_conn, eflag::CAN_MULTI_CONN);
        set(&mut f, caps.cache != Support::None, eflag::SEND_CACHE);
        f
    }

    fn export_name(&mut self, name: &[u8], ex: &mut dyn Exports, out: &mut Vec<u8>) -> Step {
        if name.len() > MAX_STRING || name.contains(&0) {
            return Step::Close;
        }
        let name = String::from_utf8_lossy(name);
        note!(ex, "newstyle negotiation: {}: client requested export '{name}'", Named::opt(opt::EXPORT_NAME));
        let Ok(info) = ex.open(&name) else { return Step::Close };
        let eflags = self.eflags(&info.caps);
        note!(ex, "newstyle negotiation: flags: export 0x{eflags:x}");
        out.put_u64(info.size);
        out.put_u16(eflags);
        if !self.no_zeroes {
            out.resize(out.len() + 124, 0);
        }
        self.finish(name.as_bytes(), info, eflags, ex);
        Step::Transmission
    }

    fn finish(&mut self, name: &[u8], info: ExportInfo, eflags: u16, ex: &mut dyn Exports) {
        if let Some((n, _)) = self.meta.as_ref().filter(|(n, _)| n.as_slice() != name) {
            note!(
                ex,
                "newstyle negotiation: NBD_OPT_SET_META_CONTEXT export name \"{}\" ≠ final client exportname \"{}\", so discarding the previous context",
                String::from_utf8_lossy(n),
                String::from_utf8_lossy(name)
            );
        }
        self.base_allocation = (self.structured || self.extended)
            && matches!(&self.meta, Some((n, true)) if n.as_slice() == name);
        self.chosen = Some((info, eflags));
    }

    fn list(&mut self, ex: &mut dyn Exports, out: &mut Vec<u8>) -> Step {
        self.listed = true;
        note!(ex, "newstyle negotiation: {}: advertising exports", Named::opt(opt::LIST));
        match ex.list() {
            Err(msg) => reply(ex, out, opt::LIST, rep::ERR_PLATFORM, clip(msg.as_bytes())),
            Ok(exports) => {
                for e in &exports {
                    let mut p = Vec::with_capacity(4 + e.name.len());
                    p.put_u32(e.name.len() as u32);
                    p.extend_from_slice(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        p.extend_from_slice(d.as_bytes());
                    }
                    option_reply(out, opt::LIST, rep::SERVER, &p);
                }
                self.budget = self.budget.saturating_add(MAX_OPTIONS.saturating_mul(exports.len() as u32));
                reply(ex, out, opt::LIST, rep::ACK, b"");
            }
        }
        Step::Continue
    }

    fn info_go(&mut self, option: u32, payload: &[u8], ex: &mut dyn Exports, out: &mut Vec<u8>) -> Step {
        let Some((name, infos)) = parse_info_go(payload) else {
            note!(ex, "newstyle negotiation: {}: invalid option payload (length {}, export name or number of information requests incorrect)", Named::opt(option), payload.len());
            reply(ex, out, option, rep::ERR_INVALID, b"");
            return Step::Continue;
        };
        let name_str = String::from_utf8_lossy(name);
        note!(ex, "newstyle negotiation: {}: client requested export '{name_str}'", Named::opt(option));
        let mut info = match ex.open(&name_str) {
            Ok(i) => i,
            Err(msg) => {
                reply(ex, out, option, rep::ERR_UNKNOWN, clip(msg.as_bytes()));
                return Step::Continue;
            }
        };
        let eflags = self.eflags(&info.caps);
        note!(ex, "newstyle negotiation: flags: export 0x{eflags:x}");
        // The information requests, in the client's order (each type once).
        let mut seen = [false; 4];
        for t in infos.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])) {
            let o = Named::opt(option);
            match t {
                info::DESCRIPTION | info::BLOCK_SIZE if !seen[t as usize] => {
                    seen[t as usize] = true;
                    if let Err(msg) = ex.details(&mut info, t) {
                        ex.close();
                        reply(ex, out, option, rep::ERR_UNKNOWN, clip(msg.as_bytes()));
                        return Step::Continue;
                    }
                    if t == info::DESCRIPTION && info.description.is_none() {
                        note!(ex, "newstyle negotiation: {o}: NBD_INFO_DESCRIPTION: no description to send");
                    }
                    if t == info::BLOCK_SIZE && info.block_size.is_none() {
                        note!(ex, "newstyle negotiation: {o}: NBD_INFO_BLOCK_SIZE: client requested but no plugin or filter provided block size information, ignoring client request");
                    }
                }
                info::EXPORT | info::NAME | info::DESCRIPTION | info::BLOCK_SIZE => {}
                _ => note!(ex, "newstyle negotiation: {o}: ignoring NBD_INFO_* request {t} (unknown)"),
            }
        }
        let mut p = Vec::with_capacity(12);
        p.put_u16(info::EXPORT);
        p.put_u64(info.size);
        p.put_u16(eflags);
        option_reply(out, option, rep::INFO, &p);
        let wants = |t: u16| infos.chunks_exact(2).any(|c| u16::from_be_bytes([c[0], c[1]]) == t);
        if wants(info::NAME) {
            let mut p = Vec::new();
            p.put_u16(info::NAME);
            p.extend_from_slice(info.name.as_bytes());
            option_reply(out, option, rep::INFO, &p);
        }
        if let (true, Some(d)) = (wants(info::DESCRIPTION), &info.description) {
            let mut p = Vec::new();
            p.put_u16(info::DESCRIPTION);
            p.extend_from_slice(d.as_bytes());
            option_reply(out, option, rep::INFO, &p);
        }
        if let (true, Some(b)) = (wants(info::BLOCK_SIZE), info.block_size) {
            let mut p = Vec::new();
            p.put_u16(info::BLOCK_SIZE);
            p.put_u32(b.min);
            p.put_u32(b.preferred);
            // We serve READ/WRITE up to MAX_REQUEST_SIZE: never promise more.
            p.put_u32(b.max.min(MAX_REQUEST_SIZE));
            option_reply(out, option, rep::INFO, &p);
        }
        reply(ex, out, option, rep::ACK, b"");
        if option == opt::INFO {
            ex.close();
            return Step::Continue;
        }
        self.finish(name, info, eflags, ex);
        Step::Transmission
    }

    fn meta_context(&mut self, option: u32, payload: &[u8], ex: &mut dyn Exports, out: &mut Vec<u8>) {
        let set = option == opt::SET_META_CONTEXT;
        let o = Named::opt(option);
        if set {
            self.meta = None; // SET replaces the selection even when it fails
        }
        if self.policy.no_mc {
            note!(ex, "newstyle negotiation: {o}: meta contexts are disabled (--no-mc or --no-sr)");
            reply(ex, out, option, rep::ERR_UNSUP, b"");
            return;
        }
        if set && !(self.structured || self.extended) {
            note!(ex, "newstyle negotiation: {o}: not valid before structured replies or extended headers are negotiated");
            reply(ex, out, option, rep::ERR_INVALID, b"");
            return;
        }
        let Some((name, queries)) = parse_meta(payload) else {
            note!(ex, "newstyle negotiation: {o}: invalid option length: payload of {} bytes", payload.len());
            reply(ex, out, option, rep::ERR_INVALID, b"");
            return;
        };
        let what = if set { "set" } else { "query" };
        if ex.verbose() {
            ex.note(&format!("newstyle negotiation: {o}: client requested export '{}'", String::from_utf8_lossy(name)));
            ex.note(&format!("newstyle negotiation: {o}: {what} count: {}", queries.len()));
            if queries.is_empty() && !set {
                ex.note(&format!("newstyle negotiation: {o}: replying with {BASE_ALLOCATION} id 0"));
            }
            let mut replied = false;
            for q in &queries {
                ex.note(&format!("newstyle negotiation: {o}: {what} {}", String::from_utf8_lossy(q)));
                let hit = *q == BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:");
                if hit && !replied {
                    replied = true;
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    ex.note(&format!("newstyle negotiation: {o}: replying with {BASE_ALLOCATION} id {id}"));
                }
            }
        }
        let base = if set {
            queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
        };
        if base {
            let mut p = Vec::new();
            p.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            p.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option_reply(out, option, rep::META_CONTEXT, &p);
        }
        if set {
            self.meta = Some((name.to_vec(), base));
        }
        reply(ex, out, option, rep::ACK, b"");
        note!(ex, "newstyle negotiation: {o}: reply complete");
    }
}

/// Error messages in option replies are at most 4096 bytes, else empty.
fn clip(msg: &[u8]) -> &[u8] {
    if msg.len() <= MAX_STRING { msg } else { b"" }
}

/// INFO/GO payload: u32 name length, name, u16 count, count × u16 types.
/// `None` for any structural error or an invalid name.
pub fn parse_info_go(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut r = Reader::new(payload);
    let len = r.u32().ok()? as usize;
    if len > MAX_STRING {
        return None;
    }
    let name = r.take(len).ok()?;
    let n = r.u16().ok()? as usize;
    let infos = r.take(2 * n).ok()?;
    if r.remaining() != 0 || name.contains(&0) {
        return None;
    }
    Some((name, infos))
}

/// Meta-context payload: u32 name length, name, u32 count, count ×
/// (u32 length, query). `None` for any structural error.
pub fn parse_meta(payload: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut r = Reader::new(payload);
    let len = r.u32().ok()? as usize;
    if len > MAX_STRING {
        return None;
    }
    let name = r.take(len).ok()?;
    let n = r.u32().ok()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query takes at least 4 bytes, so a huge count ends quickly.
        let l = r.u32().ok()? as usize;
        if l > MAX_STRING {
            return None;
        }
        queries.push(r.take(l).ok()?);
    }
    if r.remaining() != 0 || name.contains(&0) {
        return None;
    }
    Some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Fake {
        opens: u32,
        open: bool,
    }

    impl Exports for Fake {
        fn list(&mut self) -> Result<Vec<Export>, String> {
            Ok(vec![Export::new(""), Export { name: "b".into(), description: Some("disk b".into()) }])
        }
        fn open(&mut self, name: &str) -> Result<ExportInfo, String> {
            if !name.is_empty() && name != "b" {
                return Err(format!("no export {name}"));
            }
            self.opens += 1;
            self.open = true;
            Ok(ExportInfo {
                name: if name.is_empty() { "default".into() } else { name.into() },
                size: 1 << 20,
                caps: Caps { write: true, flush: true, ..Caps::default() },
                block_size: Some(BlockSize { min: 1, preferred: 4096, max: u32::MAX }),
                description: None,
            })
        }
        fn close(&mut self) {
            self.open = false;
        }
    }

    fn neg() -> (Negotiation, Fake) {
        let policy = Policy { multi_conn: true, extended_headers: true, ..Policy::default() };
        (Negotiation::new(policy, 3, 3).unwrap(), Fake { opens: 0, open: false })
    }

    use crate::fuzzing::info_go_payload as go_payload;

    /// Reply types in `out`, in order.
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut r = Reader::new(out);
        let mut v = Vec::new();
        while r.remaining() > 0 {
            r.u64().unwrap();
            r.u32().unwrap();
            v.push(r.u32().unwrap());
            let l = r.u32().unwrap() as usize;
            r.take(l).unwrap();
        }
        v
    }

    fn run(n: &mut Negotiation, f: &mut Fake, option: u32, payload: &[u8]) -> (Step, Vec<u32>) {
        let mut out = Vec::new();
        let s = n.handle(option, Payload::Bytes(payload), f, &mut out);
        (s, reply_types(&out))
    }

    #[test]
    fn unknown_client_flags_close() {
        assert!(Negotiation::new(Policy::default(), 3, 0xffff_ffff).is_err()); // H01
    }

    #[test]
    fn non_fixed_clients_get_only_export_name() {
        let mut n = Negotiation::new(Policy::default(), 3, 0).unwrap();
        let mut f = Fake { opens: 0, open: false };
        let (s, t) = run(&mut n, &mut f, opt::GO, &go_payload(b"", &[]));
        assert_eq!((s, t), (Step::Continue, vec![rep::ERR_INVALID])); // H02
        let mut out = Vec::new();
        assert_eq!(n.handle(opt::EXPORT_NAME, Payload::Bytes(b""), &mut f, &mut out), Step::Transmission);
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    #[test]
    fn option_cases_from_bad_input() {
        let (mut n, mut f) = neg();
        assert_eq!(run(&mut n, &mut f, 0x1234, b"0123456789").1, vec![rep::ERR_UNSUP]); // H07
        assert_eq!(run(&mut n, &mut f, opt::LIST, b"x").1, vec![rep::ERR_INVALID]); // H08
        assert_eq!(run(&mut n, &mut f, opt::STRUCTURED_REPLY, b"x").1, vec![rep::ERR_INVALID]); // H11
        assert_eq!(run(&mut n, &mut f, opt::STRUCTURED_REPLY, b"").1, vec![rep::ACK]);
        assert_eq!(run(&mut n, &mut f, opt::STRUCTURED_REPLY, b"").1, vec![rep::ERR_INVALID]); // H10
        assert_eq!(run(&mut n, &mut f, opt::STARTTLS, b"").1, vec![rep::ERR_POLICY]); // H12
        assert_eq!(run(&mut n, &mut f, opt::GO, b"\0\0\0").1, vec![rep::ERR_INVALID]); // H13
        let mut p = go_payload(b"abc", &[]);
        p[3] = 9;
        assert_eq!(run(&mut n, &mut f, opt::GO, &p).1, vec![rep::ERR_INVALID]); // H14
        p[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(run(&mut n, &mut f, opt::GO, &p).1, vec![rep::ERR_INVALID]); // H15
        let mut p = go_payload(b"", &[1]);
        p[5] = 0xf4; // 500 infos declared, 1 present
        assert_eq!(run(&mut n, &mut f, opt::INFO, &p).1, vec![rep::ERR_INVALID]); // H16
        assert_eq!(run(&mut n, &mut f, opt::GO, &go_payload(&[b'a'; 4097], &[])).1, vec![rep::ERR_INVALID]); // H17
        assert_eq!(run(&mut n, &mut f, opt::GO, &go_payload(b"a\0b", &[])).1, vec![rep::ERR_INVALID]); // H18
        assert_eq!(run(&mut n, &mut f, opt::GO, &go_payload(&[b'a'; 4096], &[])).1, vec![rep::ERR_UNKNOWN]); // H21
        assert_eq!(f.opens, 0);
    }

    #[test]
    fn info_then_go_opens_once_each() {
        let (mut n, mut f) = neg();
        let (s, t) = run(&mut n, &mut f, opt::INFO, &go_payload(b"", &[info::NAME, 0x7777, info::BLOCK_SIZE]));
        assert_eq!(s, Step::Continue);
        assert_eq!(t, vec![rep::INFO, rep::INFO, rep::INFO, rep::ACK]); // H20
        assert!(!f.open);
        let (s, _) = run(&mut n, &mut f, opt::GO, &go_payload(b"", &[]));
        assert_eq!(s, Step::Transmission);
        assert_eq!(f.opens, 2);
        assert!(f.open);
    }

    #[test]
    fn meta_context_rules() {
        let (mut n, mut f) = neg();
        let mut q = Vec::new();
        q.put_u32(0);
        q.put_u32(1);
        q.put_u32(15);
        q.extend_from_slice(b"base:allocation");
        assert_eq!(run(&mut n, &mut f, opt::SET_META_CONTEXT, &q).1, vec![rep::ERR_INVALID]); // H25
        assert_eq!(run(&mut n, &mut f, opt::LIST_META_CONTEXT, &q).1, vec![rep::META_CONTEXT, rep::ACK]);
        run(&mut n, &mut f, opt::STRUCTURED_REPLY, b"");
        assert_eq!(run(&mut n, &mut f, opt::SET_META_CONTEXT, &q).1, vec![rep::META_CONTEXT, rep::ACK]);
        // 3 queries declared, 1 present: error, and the selection is gone (H27).
        let mut bad = q.clone();
        bad[7] = 3;
        assert_eq!(run(&mut n, &mut f, opt::SET_META_CONTEXT, &bad).1, vec![rep::ERR_INVALID]);
        run(&mut n, &mut f, opt::GO, &go_payload(b"", &[]));
        assert!(!n.base_allocation);
    }

    #[test]
    fn meta_context_for_another_export_is_dropped() {
        let (mut n, mut f) = neg();
        run(&mut n, &mut f, opt::STRUCTURED_REPLY, b"");
        let mut q = Vec::new();
        q.put_u32(5);
        q.extend_from_slice(b"other");
        q.put_u32(1);
        q.put_u32(15);
        q.extend_from_slice(b"base:allocation");
        run(&mut n, &mut f, opt::SET_META_CONTEXT, &q);
        run(&mut n, &mut f, opt::GO, &go_payload(b"", &[]));
        assert!(!n.base_allocation); // H31
    }

    #[test]
    fn too_many_options_close() {
        let (mut n, mut f) = neg();
        for _ in 0..MAX_OPTIONS {
            assert_eq!(run(&mut n, &mut f, 0x1234, b"").0, Step::Continue);
        }
        assert_eq!(run(&mut n, &mut f, 0x1234, b"").0, Step::Close); // H32
    }

    #[test]
    fn intake_caps_lengths() {
        let (n, _) = neg();
        assert_eq!(n.intake(opt::GO, u32::MAX), Intake::Close); // H04
        assert_eq!(n.intake(opt::GO, 65 << 20), Intake::Close); // H05
        assert_eq!(n.intake(opt::EXPORT_NAME, 4097), Intake::Close); // H23
        assert_eq!(n.intake(0x1234, 10), Intake::Discard); // H07
        assert_eq!(n.intake(opt::GO, 100), Intake::Buffer);
        assert_eq!(n.intake(opt::SET_META_CONTEXT, 2 << 20), Intake::Close);
    }

    /// Records the notes, as a `-v` driver prints them.
    struct Noted(Fake, Vec<String>, bool);

    impl Exports for Noted {
        fn list(&mut self) -> Result<Vec<Export>, String> {
            self.1.push("(list)".into());
            self.0.list()
        }
        fn open(&mut self, name: &str) -> Result<ExportInfo, String> {
            self.1.push("(open)".into());
            self.0.open(name)
        }
        fn close(&mut self) {
            self.1.push("(close)".into());
            self.0.close()
        }
        fn verbose(&self) -> bool {
            self.2
        }
        fn note(&mut self, msg: &str) {
            self.1.push(msg.into());
        }
    }

    #[test]
    fn notes_follow_nbdkits_wording_and_order() {
        let (mut n, _) = neg();
        let mut ex = Noted(Fake { opens: 0, open: false }, Vec::new(), true);
        let mut out = Vec::new();
        n.handle(0x1234, Payload::Bytes(b"xy"), &mut ex, &mut out);
        n.handle(opt::STRUCTURED_REPLY, Payload::Bytes(b""), &mut ex, &mut out);
        n.handle(opt::INFO, Payload::Bytes(&go_payload(b"", &[info::BLOCK_SIZE, info::DESCRIPTION])), &mut ex, &mut out);
        n.handle(opt::ABORT, Payload::Bytes(b""), &mut ex, &mut out);
        assert_eq!(
            ex.1,
            [
                "replying to unknown (0x1234) with NBD_REP_ERR_UNSUP",
                "newstyle negotiation: NBD_OPT_STRUCTURED_REPLY: client requested structured replies",
                "replying to NBD_OPT_STRUCTURED_REPLY with NBD_REP_ACK",
                "newstyle negotiation: NBD_OPT_INFO: client requested export ''",
                "(open)",
                "newstyle negotiation: flags: export 0x85",
                "newstyle negotiation: NBD_OPT_INFO: NBD_INFO_DESCRIPTION: no description to send",
                "replying to NBD_OPT_INFO with NBD_REP_ACK",
                "(close)",
                "replying to NBD_OPT_ABORT with NBD_REP_ACK",
                "client sent NBD_OPT_ABORT to abort the connection",
            ]
        );
        // Not verbose: the same replies, no note formatted.
        let (mut n, _) = neg();
        let mut quiet = Noted(Fake { opens: 0, open: false }, Vec::new(), false);
        let mut out2 = Vec::new();
        n.handle(0x1234, Payload::Bytes(b"xy"), &mut quiet, &mut out2);
        n.handle(opt::STRUCTURED_REPLY, Payload::Bytes(b""), &mut quiet, &mut out2);
        n.handle(opt::INFO, Payload::Bytes(&go_payload(b"", &[info::BLOCK_SIZE, info::DESCRIPTION])), &mut quiet, &mut out2);
        n.handle(opt::ABORT, Payload::Bytes(b""), &mut quiet, &mut out2);
        assert_eq!(quiet.1, ["(open)", "(close)"]);
        assert_eq!(out, out2);
    }

    proptest! {
        #[test]
        fn any_option_bytes_never_panic(option in 0u32..16, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (mut n, mut f) = neg();
            let mut out = Vec::new();
            let step = n.handle(option, Payload::Bytes(&payload), &mut f, &mut out);
            // A successful EXPORT_NAME answers with size and flags, not an
            // option reply; everything else must be well-formed replies.
            if !(option == opt::EXPORT_NAME && step == Step::Transmission) {
                let _ = reply_types(&out);
            }
        }
    }
}
