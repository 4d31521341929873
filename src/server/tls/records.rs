//! The TLS record layer once the handshake is over: TLS 1.2 (RFC 5246,
//! RFC 5288, RFC 7905) and TLS 1.3 (RFC 8446 §5) record protection with
//! AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305 on *ring*.
//!
//! The one record layer of every engine's traffic phase: the handshake
//! (rustls for X.509, psk12.rs, psk13/) hands over the traffic keys, the
//! sequence numbers and, for TLS 1.3, a [`Schedule`] that derives the
//! next keys on a KeyUpdate. A [`Session`] is two halves that share only
//! the schedule: [`Rx`] decrypts (one reader, no lock) and [`Tx`] seals
//! (the writers, under their lock); what the receive half needs sent
//! (alerts, the answer to a KeyUpdate) it hands to the send half as
//! [`Event`]s ([`Tx::apply`]). Built for throughput: a record is
//! decrypted in place right where the caller's plaintext goes (one copy
//! from the read buffer, no allocation per record), and records are
//! sealed in place in one output buffer, the plaintext of several
//! `encrypt` calls sharing a record (up to 16 KiB) until the next flush.
//!
//! Every failure queues a fatal alert (bad_record_mac, record_overflow,
//! unexpected_message, decode_error…) and ends the session; a client's
//! close_notify ends it quietly.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

/// The largest plaintext of a record (2^14).
pub const MAX_PLAIN: usize = 16384;
const TAG: usize = 16;
const HEADER: usize = 5;
/// TLS 1.2 AES-GCM's explicit nonce (RFC 5288 §3).
const EXPLICIT: usize = 8;

/// Content types.
pub mod ct {
    /// change_cipher_spec
    pub const CCS: u8 = 20;
    /// alert
    pub const ALERT: u8 = 21;
    /// handshake
    pub const HANDSHAKE: u8 = 22;
    /// application_data
    pub const DATA: u8 = 23;
}

/// Alert descriptions.
pub mod alert {
    /// close_notify
    pub const CLOSE_NOTIFY: u8 = 0;
    /// unexpected_message
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    /// bad_record_mac
    pub const BAD_RECORD_MAC: u8 = 20;
    /// record_overflow
    pub const RECORD_OVERFLOW: u8 = 22;
    /// illegal_parameter
    pub const ILLEGAL_PARAMETER: u8 = 47;
    /// decode_error
    pub const DECODE_ERROR: u8 = 50;
    /// protocol_version
    pub const PROTOCOL_VERSION: u8 = 70;
    /// internal_error
    pub const INTERNAL_ERROR: u8 = 80;
    /// user_canceled
    pub const USER_CANCELED: u8 = 90;
    /// no_renegotiation
    pub const NO_RENEGOTIATION: u8 = 100;
}

const HS_CLIENT_HELLO: u8 = 1;
const HS_KEY_UPDATE: u8 = 24;

/// The protocol version of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// TLS 1.2: explicit nonce for AES-GCM, the sequence number in the AAD.
    Tls12,
    /// TLS 1.3: inner content type, nonce = iv ⊕ sequence number.
    Tls13,
}

/// The AEAD of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM
    Aes128Gcm,
    /// AES-256-GCM
    Aes256Gcm,
    /// ChaCha20-Poly1305
    Chacha20Poly1305,
}

impl Cipher {
    fn alg(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// Records one key may seal (RFC 8446 §5.5: AES-GCM 2^24.5; rustls
    /// uses 2^24 as well). ChaCha20-Poly1305 has no practical limit.
    fn limit(self) -> u64 {
        match self {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => 1 << 24,
            Cipher::Chacha20Poly1305 => u64::MAX,
        }
    }
}

/// One direction's traffic key and IV (for TLS 1.2 AES-GCM: the 4-byte
/// salt followed by 8 bytes whose XOR with the sequence number gives the
/// explicit nonce, as rustls lays it out).
pub struct Secret {
    /// The AEAD.
    pub cipher: Cipher,
    /// The key (16 or 32 bytes).
    pub key: Vec<u8>,
    /// The IV.
    pub iv: [u8; 12],
}

/// Derives the next TLS 1.3 traffic secrets after a KeyUpdate (rustls'
/// key schedule for X.509 sessions).
pub trait Schedule: Send {
    /// The client's next keys (it sent a KeyUpdate).
    fn next_rx(&mut self) -> Result<Secret, String>;
    /// Our next keys (we sent a KeyUpdate).
    fn next_tx(&mut self) -> Result<Secret, String>;
}

/// One direction: key, IV, sequence number.
pub struct Dir {
    key: LessSafeKey,
    iv: [u8; 12],
    /// Records protected with this key so far.
    pub seq: u64,
    /// Records this key may protect.
    pub limit: u64,
}

impl Dir {
    fn new(s: &Secret, seq: u64) -> io::Result<Dir> {
        let key = UnboundKey::new(s.cipher.alg(), &s.key).map_err(|_| io::Error::other("TLS: bad traffic key length"))?;
        Ok(Dir { key: LessSafeKey::new(key), iv: s.iv, seq, limit: s.cipher.limit() })
    }

    /// iv ⊕ (0⁴ ‖ seq), RFC 8446 §5.3 and RFC 7905 §2; for TLS 1.2 AES-GCM
    /// the last 8 bytes are the explicit nonce sent.
    fn nonce_bytes(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

/// TLS 1.2's additional data: seq ‖ type ‖ version ‖ plaintext length.
fn aad12(seq: u64, typ: u8, len: usize) -> Aad<[u8; 13]> {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&[3, 3]);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    Aad::from(a)
}

/// The key schedule, shared by the two halves (used only on a KeyUpdate).
type Shared = Arc<Mutex<Box<dyn Schedule>>>;

fn next_secret(schedule: &Option<Shared>, rx: bool) -> Option<Secret> {
    let mut s = schedule.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
    if rx { s.next_rx() } else { s.next_tx() }.ok()
}

/// What the receive half asks the send half to do (see [`Tx::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Send an alert (level, description); a fatal one ends the session.
    Alert(u8, u8),
    /// The peer asked for a KeyUpdate (TLS 1.3): send ours, take new keys.
    KeyUpdate,
    /// The peer sent a fatal alert: nothing more goes out.
    PeerFailed,
}

/// The receive half of a session: decrypts what the peer sent. One
/// reader uses it, without a lock; what it needs sent goes to the send
/// half as [`Event`]s.
pub struct Rx {
    version: Version,
    explicit: bool,
    /// The peer's key, IV, sequence number.
    pub dir: Dir,
    schedule: Option<Shared>,
    /// Records the peer may send under one key before the session ends.
    pub limit: u64,
    /// The start of a record that the last feed did not complete.
    pending: Vec<u8>,
    /// Post-handshake handshake bytes not yet a whole message.
    hs: Vec<u8>,
    /// For the send half, oldest first.
    events: Vec<Event>,
    failed: bool,
    peer_closed: bool,
}

/// The send half of a session: seals records into its buffer, written
/// out by whoever holds it (under the send lock, so records leave in the
/// order they were sealed).
pub struct Tx {
    version: Version,
    explicit: bool,
    /// Our key, IV, sequence number and limit.
    pub dir: Dir,
    schedule: Option<Shared>,
    /// Records to send.
    pub out: Vec<u8>,
    /// Where the application data record being filled starts in `out`.
    open: Option<usize>,
    failed: bool,
    sent_close: bool,
}

/// A protected session, both halves (the handshake engines and the
/// tests drive it as one; the transmission phase splits it).
pub struct Session {
    /// Receiving.
    pub rx: Rx,
    /// Sending.
    pub tx: Tx,
}

impl Session {
    /// A session from the handshake's keys and sequence numbers; `out`
    /// holds what the handshake still has to send (sent first).
    pub fn new(version: Version, rx: (u64, Secret), tx: (u64, Secret), schedule: Option<Box<dyn Schedule>>, out: Vec<u8>) -> io::Result<Session> {
        let explicit = version == Version::Tls12 && tx.1.cipher != Cipher::Chacha20Poly1305;
        let schedule: Option<Shared> = schedule.map(|s| Arc::new(Mutex::new(s)));
        Ok(Session {
            rx: Rx {
                version,
                explicit,
                dir: Dir::new(&rx.1, rx.0)?,
                schedule: schedule.clone(),
                limit: u64::MAX,
                pending: Vec::new(),
                hs: Vec::new(),
                events: Vec::new(),
                failed: false,
                peer_closed: false,
            },
            tx: Tx { version, explicit, dir: Dir::new(&tx.1, tx.0)?, schedule, out, open: None, failed: false, sent_close: false },
        })
    }

    /// The two halves.
    pub fn split(self) -> (Rx, Tx) {
        (self.rx, self.tx)
    }

    /// Takes in bytes from the peer (see [`Rx::feed`]); what that asks of
    /// the send half is done at once.
    pub fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let r = self.rx.feed(raw, plain);
        let applied = self.tx.apply(&mut self.rx);
        let closed = r?;
        applied?;
        Ok(closed)
    }

    /// See [`Tx::encrypt`].
    pub fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        self.tx.encrypt(data)
    }

    /// See [`Tx::flush_to`].
    pub fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        self.tx.flush_to(w)
    }

    /// See [`Tx::close`].
    pub fn close(&mut self) {
        self.tx.close()
    }

    /// See [`Tx::key_update`].
    pub fn key_update(&mut self, request: bool) -> io::Result<()> {
        self.tx.key_update(request)
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        self.rx.version
    }
}

fn dead() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "TLS: the session has failed")
}

impl Rx {
    /// The largest record body accepted from the peer.
    fn max_body(&self) -> usize {
        match self.version {
            Version::Tls13 => MAX_PLAIN + 256,
            Version::Tls12 => MAX_PLAIN + 2048,
        }
    }

    /// Asks for a fatal alert (once) and fails the session.
    fn fail(&mut self, desc: u8, why: &str) -> io::Error {
        if !self.failed {
            self.events.push(Event::Alert(2, desc));
            self.failed = true;
        }
        io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {why}"))
    }

    /// True when the send half has something to do ([`Tx::apply`]).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Takes in bytes read from the peer, appending the application data
    /// they carried to `plain`. `Ok(true)` once the peer sent close_notify.
    pub fn feed(&mut self, mut raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        if self.failed {
            return Err(dead());
        }
        if !self.pending.is_empty() {
            let mut rec = std::mem::take(&mut self.pending);
            let fill = |rec: &mut Vec<u8>, raw: &mut &[u8], upto: usize| {
                let n = upto.saturating_sub(rec.len()).min(raw.len());
                rec.extend_from_slice(&raw[..n]);
                *raw = &raw[n..];
            };
            fill(&mut rec, &mut raw, HEADER);
            if rec.len() < HEADER {
                self.pending = rec;
                return Ok(self.peer_closed);
            }
            let len = self.header(&rec)?;
            fill(&mut rec, &mut raw, HEADER + len);
            if rec.len() < HEADER + len {
                self.pending = rec;
                return Ok(self.peer_closed);
            }
            let r = self.open_record(&rec, plain);
            rec.clear();
            self.pending = rec;
            r?;
        }
        while !self.peer_closed && raw.len() >= HEADER {
            let len = self.header(raw)?;
            if raw.len() < HEADER + len {
                break;
            }
            let (rec, rest) = raw.split_at(HEADER + len);
            self.open_record(rec, plain)?;
            raw = rest;
        }
        if !self.peer_closed {
            self.pending.extend_from_slice(raw);
        }
        Ok(self.peer_closed)
    }

    /// Checks a record header; the body's length.
    fn header(&mut self, h: &[u8]) -> io::Result<usize> {
        if h[1] != 3 {
            return Err(self.fail(alert::PROTOCOL_VERSION, "not a TLS record"));
        }
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if len > self.max_body() {
            return Err(self.fail(alert::RECORD_OVERFLOW, "record too long"));
        }
        Ok(len)
    }

    /// Checks a whole record (header included) before decrypting it:
    /// where its ciphertext starts in the body and how long it is
    /// (without the tag).
    fn check(&mut self, rec: &[u8]) -> io::Result<(usize, usize)> {
        let (typ, body) = (rec[0], &rec[HEADER..]);
        if self.dir.seq >= self.limit {
            return Err(self.fail(alert::INTERNAL_ERROR, "the peer did not update its key in time"));
        }
        match self.version {
            Version::Tls13 => {
                if typ != ct::DATA {
                    return Err(self.fail(alert::UNEXPECTED_MESSAGE, "unprotected record after the handshake"));
                }
                if body.len() < TAG + 1 {
                    return Err(self.fail(alert::BAD_RECORD_MAC, "record too short"));
                }
                Ok((0, body.len() - TAG))
            }
            Version::Tls12 => {
                let extra = if self.explicit { EXPLICIT } else { 0 };
                if body.len() < extra + TAG {
                    return Err(self.fail(alert::BAD_RECORD_MAC, "record too short"));
                }
                let plen = body.len() - extra - TAG;
                if plen > MAX_PLAIN {
                    return Err(self.fail(alert::RECORD_OVERFLOW, "record too long"));
                }
                Ok((extra, plen))
            }
        }
    }

    /// Decrypts one whole record (header included, checked) whose
    /// ciphertext has been copied to `buf` (exactly its length): the
    /// length of the application data it carried, at the start of `buf`
    /// (0 for anything else, which is dealt with here).
    fn open_placed(&mut self, rec: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        let mut hdr = [0u8; HEADER];
        hdr.copy_from_slice(&rec[..HEADER]);
        let body = &rec[HEADER..];
        let mut tag = [0u8; TAG];
        tag.copy_from_slice(&body[body.len() - TAG..]);
        let mut explicit = [0u8; EXPLICIT];
        if self.explicit {
            explicit.copy_from_slice(&body[..EXPLICIT]);
        }
        self.open_at(hdr, explicit, tag, buf, 0)
    }

    /// Decrypts a checked record (header `hdr`, TLS 1.2's explicit nonce,
    /// tag) whose ciphertext is `in_out[src..]`; the plaintext goes to the
    /// start of `in_out`. As [`Rx::open_placed`].
    fn open_at(&mut self, hdr: [u8; HEADER], explicit: [u8; EXPLICIT], tag: [u8; TAG], in_out: &mut [u8], src: usize) -> io::Result<usize> {
        let typ = hdr[0];
        let clen = in_out.len() - src;
        let mut n = self.dir.nonce_bytes();
        let opened = match self.version {
            Version::Tls13 => self.dir.key.open_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(hdr), tag.into(), in_out, src..),
            Version::Tls12 => {
                if self.explicit {
                    n[4..].copy_from_slice(&explicit);
                }
                let aad = aad12(self.dir.seq, typ, clen);
                self.dir.key.open_in_place_separate_tag(Nonce::assume_unique_for_key(n), aad, tag.into(), in_out, src..)
            }
        };
        if opened.is_err() {
            return Err(self.fail(alert::BAD_RECORD_MAC, "bad record MAC"));
        }
        let buf = &mut in_out[..clen];
        self.dir.seq += 1;
        let (content, inner) = match self.version {
            Version::Tls13 => {
                if buf.len() > MAX_PLAIN + 1 {
                    return Err(self.fail(alert::RECORD_OVERFLOW, "record too long"));
                }
                // The inner content type is the last non-zero byte (RFC 8446 §5.4).
                match buf.iter().rposition(|&b| b != 0) {
                    Some(end) => (end, buf[end]),
                    None => return Err(self.fail(alert::UNEXPECTED_MESSAGE, "record without a content type")),
                }
            }
            Version::Tls12 => (buf.len(), typ),
        };
        if self.dir.seq == u64::MAX {
            return Err(self.fail(alert::INTERNAL_ERROR, "sequence number exhausted"));
        }
        if !self.hs.is_empty() && inner != ct::HANDSHAKE {
            // Handshake messages are not interleaved with other records (RFC 8446 §5.1).
            return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a record inside a handshake message"));
        }
        if inner == ct::DATA {
            return Ok(content);
        }
        let msg = buf[..content].to_vec();
        self.received(inner, &msg)?;
        Ok(0)
    }

    /// Decrypts one whole record (header included) to the end of `plain`.
    fn open_record(&mut self, rec: &[u8], plain: &mut Vec<u8>) -> io::Result<()> {
        let (start, len) = self.check(rec)?;
        let at = plain.len();
        plain.extend_from_slice(&rec[HEADER + start..HEADER + start + len]);
        let r = self.open_placed(rec, &mut plain[at..]);
        plain.truncate(at + *r.as_ref().unwrap_or(&0));
        r.map(|_| ())
    }

    /// The length of the whole record at the start of `raw` (header
    /// included), once it is all there.
    pub fn record_len(&mut self, raw: &[u8]) -> io::Result<Option<usize>> {
        if self.failed {
            return Err(dead());
        }
        if raw.len() < HEADER {
            return Ok(None);
        }
        let len = self.header(raw)?;
        Ok((raw.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Decrypts the whole record `rec` (see [`Rx::record_len`]) straight
    /// into `dst` if its ciphertext fits there: the length of the
    /// application data it carried, at the start of `dst`; None (nothing
    /// done) if it does not fit. Whatever else the record held is dealt
    /// with as [`Rx::feed`] does.
    pub fn open_into(&mut self, rec: &[u8], dst: &mut [u8]) -> io::Result<Option<usize>> {
        if self.failed {
            return Err(dead());
        }
        if self.peer_closed {
            return Ok(Some(0));
        }
        let (start, len) = self.check(rec)?;
        let Some(buf) = dst.get_mut(..len) else { return Ok(None) };
        buf.copy_from_slice(&rec[HEADER + start..HEADER + start + len]);
        self.open_placed(rec, buf).map(Some)
    }

    /// Decrypts the whole records at the start of `buf` where they are,
    /// their plaintext moved together at its start (over the headers,
    /// nonces and tags): the plaintext's length, and how much of `buf`
    /// the records took (the rest is the start of a record, or follows
    /// close_notify). Whatever else the records held is dealt with as
    /// [`Rx::feed`] does.
    pub fn open_all(&mut self, buf: &mut [u8]) -> io::Result<(usize, usize)> {
        let (mut out, mut at) = (0, 0);
        while !self.peer_closed {
            let Some(len) = self.record_len(&buf[at..])? else { break };
            let (start, clen) = self.check(&buf[at..at + len])?;
            let mut hdr = [0u8; HEADER];
            hdr.copy_from_slice(&buf[at..at + HEADER]);
            let mut explicit = [0u8; EXPLICIT];
            if self.explicit {
                explicit.copy_from_slice(&buf[at + HEADER..at + HEADER + EXPLICIT]);
            }
            let mut tag = [0u8; TAG];
            tag.copy_from_slice(&buf[at + len - TAG..at + len]);
            let ct = at + HEADER + start;
            out += self.open_at(hdr, explicit, tag, &mut buf[out..ct + clen], ct - out)?;
            at += len;
        }
        Ok((out, at))
    }

    /// True once the peer has sent close_notify.
    pub fn closed(&self) -> bool {
        self.peer_closed
    }

    /// The start of a record that [`Rx::feed`] is waiting to complete
    /// (handed to a reader that frames the records itself).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// A record that is not application data.
    fn received(&mut self, typ: u8, msg: &[u8]) -> io::Result<()> {
        match typ {
            ct::ALERT => {
                let &[level, desc] = msg else {
                    return Err(self.fail(alert::DECODE_ERROR, "malformed alert"));
                };
                match (self.version, level, desc) {
                    (_, _, alert::CLOSE_NOTIFY) => self.peer_closed = true,
                    (_, _, alert::USER_CANCELED) => {}
                    (Version::Tls12, 1, _) => {}
                    _ => {
                        self.failed = true;
                        self.events.push(Event::PeerFailed);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: the peer sent alert {desc}")));
                    }
                }
                Ok(())
            }
            ct::HANDSHAKE => {
                self.hs.extend_from_slice(msg);
                self.handshake()
            }
            _ => Err(self.fail(alert::UNEXPECTED_MESSAGE, "unexpected record type")),
        }
    }

    /// Post-handshake messages: TLS 1.3 KeyUpdate; a TLS 1.2
    /// renegotiation is refused with a warning (RFC 5746 §4.4).
    fn handshake(&mut self) -> io::Result<()> {
        while self.hs.len() >= 4 {
            let len = u32::from_be_bytes([0, self.hs[1], self.hs[2], self.hs[3]]) as usize;
            if len > 64 * 1024 {
                return Err(self.fail(alert::DECODE_ERROR, "handshake message too long"));
            }
            if self.hs.len() < 4 + len {
                return Ok(());
            }
            let msg: Vec<u8> = self.hs.drain(..4 + len).collect();
            match (self.version, msg[0]) {
                (Version::Tls13, HS_KEY_UPDATE) => {
                    let request = match msg[4..] {
                        [0] => false,
                        [1] => true,
                        [_] => return Err(self.fail(alert::ILLEGAL_PARAMETER, "bad KeyUpdate")),
                        _ => return Err(self.fail(alert::DECODE_ERROR, "malformed KeyUpdate")),
                    };
                    if !self.hs.is_empty() {
                        // The new keys start with the next record (RFC 8446 §5.1).
                        return Err(self.fail(alert::UNEXPECTED_MESSAGE, "KeyUpdate not at the end of its record"));
                    }
                    match next_secret(&self.schedule, true) {
                        Some(s) => self.dir = Dir::new(&s, 0)?,
                        None => return Err(self.fail(alert::INTERNAL_ERROR, "no key schedule for KeyUpdate")),
                    }
                    log::debug!(target: "tls::records", "KeyUpdate received (update_requested: {request})");
                    if request {
                        self.events.push(Event::KeyUpdate);
                    }
                }
                (Version::Tls12, HS_CLIENT_HELLO) => self.events.push(Event::Alert(1, alert::NO_RENEGOTIATION)),
                _ => return Err(self.fail(alert::UNEXPECTED_MESSAGE, "unexpected handshake message")),
            }
        }
        Ok(())
    }
}

impl Tx {
    /// Queues a fatal alert (once) and fails the session.
    fn fail(&mut self, desc: u8, why: &str) -> io::Error {
        if !self.failed {
            self.control(ct::ALERT, &[2, desc]);
            self.failed = true;
        }
        io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {why}"))
    }

    /// Does what the receive half asked, in order (the records go out
    /// with the next [`Tx::flush_to`]).
    pub fn apply(&mut self, rx: &mut Rx) -> io::Result<()> {
        let mut r = Ok(());
        for e in rx.events.drain(..) {
            match e {
                Event::Alert(level, desc) => {
                    if !self.failed {
                        self.control(ct::ALERT, &[level, desc]);
                        self.failed = level == 2;
                    }
                }
                Event::PeerFailed => self.failed = true,
                Event::KeyUpdate => {
                    if !self.failed && !self.sent_close {
                        if let Err(e) = self.key_update(false) {
                            r = r.and(Err(e));
                        }
                    }
                }
            }
        }
        r
    }

    /// Sends a KeyUpdate and moves to our next keys (TLS 1.3).
    pub fn key_update(&mut self, request: bool) -> io::Result<()> {
        if self.version != Version::Tls13 || self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS: no KeyUpdate here"));
        }
        self.control(ct::HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, request as u8]);
        match next_secret(&self.schedule, false) {
            Some(s) => {
                let limit = self.dir.limit;
                self.dir = Dir::new(&s, 0)?;
                self.dir.limit = limit;
            }
            None => return Err(self.fail(alert::INTERNAL_ERROR, "no key schedule for KeyUpdate")),
        }
        log::debug!(target: "tls::records", "KeyUpdate sent");
        Ok(())
    }

    /// Starts a record at the end of `out`; where it starts.
    pub fn begin(&mut self, typ: u8, room: usize) -> usize {
        let at = self.out.len();
        self.out.reserve(HEADER + EXPLICIT + room + 1 + TAG);
        self.out.extend_from_slice(&[typ, 3, 3, 0, 0]);
        if self.explicit {
            self.out.extend_from_slice(&[0; EXPLICIT]);
        }
        at
    }

    /// Seals the record at `at` whose plaintext runs to the end of `out`.
    pub fn seal(&mut self, at: usize, typ: u8) {
        let start = at + HEADER + if self.explicit { EXPLICIT } else { 0 };
        let nonce = self.dir.nonce_bytes();
        let r = match self.version {
            Version::Tls13 => {
                self.out.push(typ);
                let len = (self.out.len() - start + TAG) as u16;
                self.out[at..at + HEADER].copy_from_slice(&[ct::DATA, 3, 3, (len >> 8) as u8, len as u8]);
                let mut hdr = [0u8; HEADER];
                hdr.copy_from_slice(&self.out[at..at + HEADER]);
                self.dir.key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(hdr), &mut self.out[start..])
            }
            Version::Tls12 => {
                let plen = self.out.len() - start;
                let len = (self.out.len() - at - HEADER + TAG) as u16;
                self.out[at + 3..at + 5].copy_from_slice(&len.to_be_bytes());
                if self.explicit {
                    self.out[at + HEADER..start].copy_from_slice(&nonce[4..]);
                }
                let aad = aad12(self.dir.seq, typ, plen);
                self.dir.key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, &mut self.out[start..])
            }
        };
        let tag = r.expect("AEAD seal of a record-sized plaintext");
        self.out.extend_from_slice(tag.as_ref());
        self.dir.seq += 1;
    }

    /// Seals the application data record being filled, if any.
    fn close_open(&mut self) {
        if let Some(at) = self.open.take() {
            self.seal(at, ct::DATA);
        }
    }

    /// Queues one record of type `typ` (alerts, handshake messages).
    pub fn control(&mut self, typ: u8, msg: &[u8]) {
        self.close_open();
        let at = self.begin(typ, msg.len());
        self.out.extend_from_slice(msg);
        self.seal(at, typ);
    }

    /// Encrypts `data` as application data; records are filled up to
    /// 16 KiB and sealed when full or at the next flush.
    pub fn encrypt(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.failed || self.sent_close {
            return Err(dead());
        }
        while !data.is_empty() {
            let at = match self.open {
                Some(at) => at,
                None => {
                    if self.dir.seq >= self.dir.limit {
                        match self.version {
                            Version::Tls13 => self.key_update(false)?,
                            Version::Tls12 => {
                                self.close();
                                return Err(io::Error::other("TLS: the key has sealed as many records as it safely may"));
                            }
                        }
                    }
                    let at = self.begin(ct::DATA, data.len().min(MAX_PLAIN));
                    self.open = Some(at);
                    at
                }
            };
            let start = at + HEADER + if self.explicit { EXPLICIT } else { 0 };
            let n = (start + MAX_PLAIN - self.out.len()).min(data.len());
            self.out.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.out.len() == start + MAX_PLAIN {
                self.close_open();
            }
        }
        Ok(())
    }

    /// Writes every queued record to `w`.
    pub fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        self.close_open();
        super::engine::write_out(&mut self.out, w)
    }

    /// Queues close_notify (once).
    pub fn close(&mut self) {
        if !self.failed && !self.sent_close {
            self.control(ct::ALERT, &[1, alert::CLOSE_NOTIFY]);
            self.sent_close = true;
        }
    }
}

#[cfg(test)]
mod tests;
