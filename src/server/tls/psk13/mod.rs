//! The PSK handshake in TLS 1.3 (RFC 8446) with an external PSK, mode
//! `psk_dhe_ke` only: every session has its own ECDHE secret (X25519 or
//! P-256), so a key file that leaks later does not decrypt a recorded
//! session (forward secrecy). rustls has no external PSK; this is the
//! server side of what GnuTLS clients (libnbd, qemu) negotiate, on
//! *ring*'s primitives, which rustls already brings in.
//!
//! Suites TLS_AES_128_GCM_SHA256 (the server's choice when offered),
//! TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, the one whose
//! hash is the binder's; a HelloRetryRequest when the client supports
//! X25519 or P-256 but sent no share for them; the middlebox
//! compatibility ChangeCipherSpec. No 0-RTT (early data is skipped), no
//! session tickets, no certificates. Every failure sends a fatal alert
//! and ends the session. After the client's Finished the application
//! traffic keys go to the record layer (records.rs), as X.509 sessions'
//! do, with the key schedule for KeyUpdates ([`schedule::Updates`]): the
//! client's are followed (and answered when it asks); the server updates
//! its own key itself before 2^24 records, well inside RFC 8446 §5.5's
//! limit for AES-GCM; a client that sends 2^24.5 records under one key
//! is disconnected.

pub mod hello;
pub mod schedule;
#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::sync::Arc;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::digest;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::engine::Engine;
use super::psk::{no_session, Keys};
use super::records::{self, Session};
use hello::Hello;
use schedule::{Dir, Secret, Suite, SUITES};

const CT_CCS: u8 = 20;
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_DATA: u8 = 23;

const HS_CLIENT_HELLO: u8 = 1;
const HS_SERVER_HELLO: u8 = 2;
const HS_ENCRYPTED_EXTENSIONS: u8 = 8;
const HS_FINISHED: u8 = 20;
const HS_MESSAGE_HASH: u8 = 254;

/// The largest plaintext of a record (2^14) and ciphertext (2^14 + 256).
pub const MAX_PLAIN: usize = 16384;
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// The largest handshake message taken (a ClientHello with big key shares
/// is a few KiB).
const MAX_HANDSHAKE: usize = 64 * 1024;
/// Early data (0-RTT) the server skips before giving up.
const EARLY_BUDGET: usize = 256 * 1024;

/// Records sent under one key before the server updates it (2^24).
pub const WRITE_LIMIT: u64 = 1 << 24;
/// Records received under one key before the session ends: 2^24.5, the
/// AES-GCM limit of RFC 8446 §5.5.
pub const READ_LIMIT: u64 = 23_726_566;

pub const X25519: u16 = 0x001d;
pub const SECP256R1: u16 = 0x0017;
/// The groups, in the server's order of preference.
const GROUPS: [u16; 2] = [X25519, SECP256R1];

/// The random of a HelloRetryRequest: SHA-256("HelloRetryRequest").
pub const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91, 0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb,
    0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

// Alert descriptions.
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const HANDSHAKE_FAILURE: u8 = 40;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const DECRYPT_ERROR: u8 = 51;
const PROTOCOL_VERSION: u8 = 70;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;
const MISSING_EXTENSION: u8 = 109;
const UNKNOWN_PSK_IDENTITY: u8 = 115;

const LOG: &str = "tls::psk13";

/// The group's name as GnuTLS prints it.
pub fn group_name(g: u16) -> &'static str {
    match g {
        X25519 => "X25519",
        SECP256R1 => "SECP256R1",
        _ => "?",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the ClientHello.
    Hello,
    /// A HelloRetryRequest was sent: waiting for the second ClientHello.
    Hello2,
    /// Waiting for the client's Finished.
    Finished,
    Traffic,
    Failed,
}

/// What the HelloRetryRequest fixed.
struct Retry {
    suite: u16,
    group: u16,
    session_id: Vec<u8>,
    /// message_hash(ClientHello1) and the HelloRetryRequest.
    transcript: digest::Context,
}

/// A TLS 1.3 PSK server session on memory buffers (see [`Engine`]).
pub struct Psk13 {
    keys: Arc<Keys>,
    state: State,
    input: Vec<u8>,
    hs: Vec<u8>,
    out: Vec<u8>,
    read: Option<Dir>,
    write: Option<Dir>,
    retry: Option<Retry>,
    ccs_sent: bool,
    ccs_seen: bool,
    /// Early data the server may still skip.
    early: usize,
    /// The client's Finished: its key and the transcript hash it signs.
    client_finished: Option<(hmac::Key, digest::Digest)>,
    client_traffic: Option<Secret>,
    server_traffic: Option<Secret>,
    /// The record layer, after the handshake.
    session: Option<Box<Session>>,
    suite: Option<&'static Suite>,
    group: u16,
    user: String,
    closed: bool,
    /// Records under one write key before a KeyUpdate (tests lower it).
    write_limit: u64,
    /// Records under one read key before the session ends.
    read_limit: u64,
}

fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "PSK: session failed")
}

impl Psk13 {
    /// A session that will look up client identities in `keys`.
    pub fn new(keys: Arc<Keys>) -> Psk13 {
        Psk13 {
            keys,
            state: State::Hello,
            input: Vec::new(),
            hs: Vec::new(),
            out: Vec::new(),
            read: None,
            write: None,
            retry: None,
            ccs_sent: false,
            ccs_seen: false,
            early: 0,
            client_finished: None,
            client_traffic: None,
            server_traffic: None,
            session: None,
            suite: None,
            group: 0,
            user: String::new(),
            closed: false,
            write_limit: WRITE_LIMIT,
            read_limit: READ_LIMIT,
        }
    }

    /// Queues a fatal alert and fails the session.
    fn fail(&mut self, desc: u8, why: &str) -> io::Error {
        if self.state != State::Failed {
            log::debug!(target: LOG, "sending fatal alert {desc}: {why}");
            let _ = self.record(CT_ALERT, &[2, desc]);
            self.state = State::Failed;
        }
        io::Error::new(io::ErrorKind::InvalidData, format!("PSK: {why}"))
    }

    /// Appends one record, protected once the server has keys.
    fn record(&mut self, typ: u8, body: &[u8]) -> Result<(), ()> {
        match &mut self.write {
            None => {
                self.out.extend_from_slice(&[typ, 3, 3]);
                self.out.extend_from_slice(&(body.len() as u16).to_be_bytes());
                self.out.extend_from_slice(body);
                Ok(())
            }
            Some(w) => w.seal(&mut self.out, typ, body).map_err(|_| ()),
        }
    }

    fn sealed(&mut self, typ: u8, body: &[u8]) -> io::Result<()> {
        if self.record(typ, body).is_err() {
            return Err(self.fail(INTERNAL_ERROR, "cannot encrypt"));
        }
        Ok(())
    }

    /// Takes in complete records from `input`.
    fn process(&mut self) -> io::Result<()> {
        let mut input = std::mem::take(&mut self.input);
        let mut at = 0;
        let r = self.records(&mut input, &mut at);
        input.drain(..at);
        self.input = input;
        r
    }

    fn records(&mut self, input: &mut [u8], at: &mut usize) -> io::Result<()> {
        loop {
            if self.state == State::Failed {
                return Err(failed());
            }
            // After the handshake, the rest is the record layer's.
            if self.closed || self.state == State::Traffic {
                return Ok(());
            }
            let rest = &input[*at..];
            if rest.len() < 5 {
                return Ok(());
            }
            let (typ, len) = (rest[0], u16::from_be_bytes([rest[3], rest[4]]) as usize);
            if !(CT_CCS..=CT_DATA).contains(&typ) {
                return Err(self.fail(UNEXPECTED_MESSAGE, "not a TLS record"));
            }
            if rest[1] != 3 {
                return Err(self.fail(PROTOCOL_VERSION, "not a TLS record"));
            }
            if len > MAX_CIPHER || (self.read.is_none() && len > MAX_PLAIN) {
                return Err(self.fail(RECORD_OVERFLOW, "record too long"));
            }
            if rest.len() < 5 + len {
                return Ok(());
            }
            let rec = &mut input[*at..*at + 5 + len];
            *at += 5 + len;
            self.record_in(typ, rec)?;
        }
    }

    /// One record from the client.
    fn record_in(&mut self, typ: u8, rec: &mut [u8]) -> io::Result<()> {
        let (hdr, body) = rec.split_at_mut(5);
        if typ == CT_CCS {
            // RFC 8446 §5: one unprotected change_cipher_spec (0x01) may
            // come between the first ClientHello and the client's Finished.
            let during = matches!(self.state, State::Hello2 | State::Finished);
            if during && !self.ccs_seen && body == [1] && self.hs.is_empty() {
                self.ccs_seen = true;
                return Ok(());
            }
            return Err(self.fail(UNEXPECTED_MESSAGE, "unexpected change_cipher_spec"));
        }
        if typ == CT_DATA && self.state == State::Hello2 && self.early > 0 && self.early >= body.len() {
            // Early data sent with the first ClientHello: skipped.
            self.early -= body.len();
            return Ok(());
        }
        if self.read.is_none() {
            if typ == CT_DATA {
                return Err(self.fail(UNEXPECTED_MESSAGE, "encrypted record before the keys"));
            }
            if body.is_empty() {
                return Err(self.fail(UNEXPECTED_MESSAGE, "empty record"));
            }
            return self.content(typ, body);
        }
        if typ != CT_DATA {
            if typ == CT_ALERT && self.state == State::Finished {
                // A client that could not take the ServerHello alerts in the clear.
                return self.content(typ, body);
            }
            return Err(self.fail(UNEXPECTED_MESSAGE, "unprotected record"));
        }
        let Some(opened) = self.read.as_mut().map(|r| r.open(hdr, body)) else {
            return Err(self.fail(INTERNAL_ERROR, "no keys"));
        };
        match opened {
            Ok((inner, n)) => {
                self.early = 0;
                if n > MAX_PLAIN {
                    return Err(self.fail(RECORD_OVERFLOW, "record too long"));
                }
                if n == 0 && inner != CT_DATA {
                    return Err(self.fail(UNEXPECTED_MESSAGE, "empty record"));
                }
                self.content(inner, &body[..n])
            }
            Err(false) => Err(self.fail(UNEXPECTED_MESSAGE, "record without a content type")),
            Err(true) if self.state == State::Finished && self.early > 0 && self.early >= body.len() => {
                // 0-RTT data under a key the server does not have: skipped.
                self.early -= body.len();
                Ok(())
            }
            Err(true) => Err(self.fail(BAD_RECORD_MAC, "bad record MAC")),
        }
    }

    /// One record's content (decrypted).
    fn content(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        if !self.hs.is_empty() && typ != CT_HANDSHAKE {
            return Err(self.fail(UNEXPECTED_MESSAGE, "a record inside a handshake message"));
        }
        match typ {
            CT_ALERT => {
                if data.len() != 2 {
                    return Err(self.fail(DECODE_ERROR, "malformed alert"));
                }
                match data[1] {
                    0 => {
                        log::debug!(target: LOG, "close_notify received");
                        self.closed = true;
                        Ok(())
                    }
                    USER_CANCELED => Ok(()),
                    d => {
                        self.state = State::Failed;
                        Err(io::Error::new(io::ErrorKind::InvalidData, format!("PSK: the client sent alert {d}")))
                    }
                }
            }
            CT_HANDSHAKE => {
                self.hs.extend_from_slice(data);
                self.handshake()
            }
            _ => Err(self.fail(UNEXPECTED_MESSAGE, "unexpected record")),
        }
    }

    fn handshake(&mut self) -> io::Result<()> {
        while self.hs.len() >= 4 {
            let len = u32::from_be_bytes([0, self.hs[1], self.hs[2], self.hs[3]]) as usize;
            if len > MAX_HANDSHAKE {
                return Err(self.fail(DECODE_ERROR, "handshake message too long"));
            }
            if self.hs.len() < 4 + len {
                return Ok(());
            }
            let msg: Vec<u8> = self.hs.drain(..4 + len).collect();
            log::trace!(target: LOG, "handshake message {} ({} bytes) received", msg[0], len);
            // Every message taken ends a flight or changes keys: nothing
            // may follow it in the same record (RFC 8446 §5.1).
            if !self.hs.is_empty() {
                return Err(self.fail(UNEXPECTED_MESSAGE, "handshake data after a key change"));
            }
            match (self.state, msg[0]) {
                (State::Hello | State::Hello2, HS_CLIENT_HELLO) => self.client_hello(&msg)?,
                (State::Finished, HS_FINISHED) => self.client_finished(&msg)?,
                _ => return Err(self.fail(UNEXPECTED_MESSAGE, "unexpected handshake message")),
            }
        }
        Ok(())
    }

    fn client_hello(&mut self, msg: &[u8]) -> io::Result<()> {
        let h = match hello::parse(msg) {
            Ok(h) => h,
            Err((alert, why)) => return Err(self.fail(alert, why)),
        };
        if !h.versions.contains(&0x0304) {
            return Err(self.fail(PROTOCOL_VERSION, "the client does not offer TLS 1.3"));
        }
        if h.compression != [0] {
            return Err(self.fail(ILLEGAL_PARAMETER, "compression offered"));
        }
        let Some(offered) = &h.psk else {
            return Err(self.fail(MISSING_EXTENSION, "the client offers no pre-shared key"));
        };
        let Some(modes) = &h.psk_modes else {
            return Err(self.fail(MISSING_EXTENSION, "no psk_key_exchange_modes"));
        };
        if !modes.contains(&1) {
            return Err(self.fail(HANDSHAKE_FAILURE, "the client does not offer psk_dhe_ke (PSK without forward secrecy is refused)"));
        }
        let (Some(shares), Some(groups)) = (&h.shares, &h.groups) else {
            return Err(self.fail(MISSING_EXTENSION, "no key_share or supported_groups"));
        };
        // The first identity the server knows.
        let found = offered.identities.iter().enumerate().find_map(|(i, id)| self.keys.get(id).map(|k| (i, Zeroizing::new(k.to_vec()))));
        let Some((index, psk)) = found else {
            let who = String::from_utf8_lossy(&offered.identities[0]).into_owned();
            return Err(self.fail(UNKNOWN_PSK_IDENTITY, &format!("unknown username \"{who}\"")));
        };
        self.user = String::from_utf8_lossy(&offered.identities[index]).into_owned();
        log::debug!(target: LOG, "PSK: client identity \"{}\" (identity {index} of {})", self.user, offered.identities.len());
        // The suite: the server's preferred of those whose hash made the binder.
        let binder = &offered.binders[index];
        let Some(suite) = SUITES.iter().find(|s| h.suites.contains(&s.id) && s.hash_len() == binder.len()) else {
            return Err(self.fail(HANDSHAKE_FAILURE, "no cipher suite in common"));
        };
        if let Some(r) = &self.retry {
            if r.suite != suite.id || r.session_id != h.session_id || h.early_data || shares.len() != 1 || shares[0].0 != r.group {
                return Err(self.fail(ILLEGAL_PARAMETER, "the second ClientHello does not follow the HelloRetryRequest"));
            }
        }
        // The binder, over the ClientHello up to the binders (after the
        // first ClientHello and the HelloRetryRequest, if any).
        let mut transcript = match &self.retry {
            Some(r) => r.transcript.clone(),
            None => digest::Context::new(suite.hash),
        };
        let mut truncated = transcript.clone();
        truncated.update(&msg[..offered.binders_at]);
        let early_secret = suite.extract(b"", &psk);
        let binder_key = suite.derive(&early_secret, b"ext binder", suite.empty_hash().as_ref());
        if hmac::verify(&suite.finished_key(&binder_key), truncated.finish().as_ref(), binder).is_err() {
            return Err(self.fail(DECRYPT_ERROR, &format!("wrong key for username \"{}\" (the binder does not verify)", self.user)));
        }
        // The group: the server's preferred of the shares sent.
        let share = GROUPS.iter().find_map(|g| shares.iter().find(|(sg, _)| sg == g));
        let Some((group, peer)) = share else {
            if self.retry.is_some() {
                return Err(self.fail(ILLEGAL_PARAMETER, "no key share after the HelloRetryRequest"));
            }
            let Some(&g) = GROUPS.iter().find(|g| groups.contains(g)) else {
                return Err(self.fail(HANDSHAKE_FAILURE, "no key exchange group in common (x25519, secp256r1)"));
            };
            self.early = if h.early_data { EARLY_BUDGET } else { 0 };
            return self.hello_retry(suite, g, &h, msg);
        };
        let (group, peer) = (*group, peer.clone());
        self.early = if h.early_data && self.retry.is_none() { EARLY_BUDGET } else { 0 };
        // ECDHE.
        let rng = SystemRandom::new();
        let alg = if group == X25519 { &agreement::X25519 } else { &agreement::ECDH_P256 };
        let mine = EphemeralPrivateKey::generate(alg, &rng);
        let Ok((mine, public)) = mine.and_then(|k| k.compute_public_key().map(|p| (k, p.as_ref().to_vec()))) else {
            return Err(self.fail(INTERNAL_ERROR, "no key pair"));
        };
        let Ok(shared) = agreement::agree_ephemeral(mine, &UnparsedPublicKey::new(alg, &peer), |s| Zeroizing::new(s.to_vec())) else {
            return Err(self.fail(ILLEGAL_PARAMETER, "bad key share"));
        };
        // ServerHello.
        let mut random = [0u8; 32];
        if rng.fill(&mut random).is_err() {
            return Err(self.fail(INTERNAL_ERROR, "no randomness"));
        }
        let mut ext = Vec::new();
        ext.extend_from_slice(&hello::EXT_SUPPORTED_VERSIONS.to_be_bytes());
        ext.extend_from_slice(&[0, 2, 3, 4]);
        ext.extend_from_slice(&hello::EXT_KEY_SHARE.to_be_bytes());
        ext.extend_from_slice(&((4 + public.len()) as u16).to_be_bytes());
        ext.extend_from_slice(&group.to_be_bytes());
        ext.extend_from_slice(&(public.len() as u16).to_be_bytes());
        ext.extend_from_slice(&public);
        ext.extend_from_slice(&hello::EXT_PRE_SHARED_KEY.to_be_bytes());
        ext.extend_from_slice(&[0, 2]);
        ext.extend_from_slice(&(index as u16).to_be_bytes());
        let sh = server_hello(&random, &h.session_id, suite.id, &ext);
        transcript.update(msg);
        transcript.update(&sh);
        self.sealed(CT_HANDSHAKE, &sh)?;
        if !h.session_id.is_empty() && !self.ccs_sent {
            self.sealed(CT_CCS, &[1])?;
            self.ccs_sent = true;
        }
        // Handshake secrets.
        let empty = suite.empty_hash();
        let hs_secret = suite.extract(&suite.derive(&early_secret, b"derived", empty.as_ref()), &shared);
        let th = transcript.clone().finish();
        let c_hs = suite.derive(&hs_secret, b"c hs traffic", th.as_ref());
        let s_hs = suite.derive(&hs_secret, b"s hs traffic", th.as_ref());
        key_log("CLIENT_HANDSHAKE_TRAFFIC_SECRET", &h.random, &c_hs);
        key_log("SERVER_HANDSHAKE_TRAFFIC_SECRET", &h.random, &s_hs);
        let master = suite.extract(&suite.derive(&hs_secret, b"derived", empty.as_ref()), &[0u8; 48][..suite.hash_len()]);
        // EncryptedExtensions (none) and Finished, in one record.
        let mut flight = vec![HS_ENCRYPTED_EXTENSIONS, 0, 0, 2, 0, 0];
        transcript.update(&flight);
        let verify = hmac::sign(&suite.finished_key(&s_hs), transcript.clone().finish().as_ref());
        let at = flight.len();
        flight.extend_from_slice(&[HS_FINISHED, 0, 0, suite.hash_len() as u8]);
        flight.extend_from_slice(verify.as_ref());
        transcript.update(&flight[at..]);
        let th = transcript.finish();
        let c_ap = suite.derive(&master, b"c ap traffic", th.as_ref());
        let s_ap = suite.derive(&master, b"s ap traffic", th.as_ref());
        key_log("CLIENT_TRAFFIC_SECRET_0", &h.random, &c_ap);
        key_log("SERVER_TRAFFIC_SECRET_0", &h.random, &s_ap);
        let (Some(w_hs), Some(r_hs), Some(w_ap)) = (Dir::new(suite, s_hs), Dir::new(suite, c_hs.clone()), Dir::new(suite, s_ap.clone())) else {
            return Err(self.fail(INTERNAL_ERROR, "traffic keys"));
        };
        self.write = Some(w_hs);
        self.sealed(CT_HANDSHAKE, &flight)?;
        self.write = Some(w_ap);
        self.read = Some(r_hs);
        self.client_finished = Some((suite.finished_key(&c_hs), th));
        self.client_traffic = Some(c_ap);
        self.server_traffic = Some(s_ap);
        self.retry = None;
        self.suite = Some(suite);
        self.group = group;
        self.state = State::Finished;
        log::debug!(
            target: LOG,
            "TLS 1.3 handshake: suite {}, group {}, psk_dhe_ke, username \"{}\"",
            suite.name,
            group_name(group),
            self.user
        );
        Ok(())
    }

    fn hello_retry(&mut self, suite: &'static Suite, group: u16, h: &Hello, msg: &[u8]) -> io::Result<()> {
        log::debug!(target: LOG, "HelloRetryRequest: the client sent no key share for {}", group_name(group));
        let mut transcript = digest::Context::new(suite.hash);
        transcript.update(&[HS_MESSAGE_HASH, 0, 0, suite.hash_len() as u8]);
        transcript.update(digest::digest(suite.hash, msg).as_ref());
        let mut ext = Vec::new();
        ext.extend_from_slice(&hello::EXT_SUPPORTED_VERSIONS.to_be_bytes());
        ext.extend_from_slice(&[0, 2, 3, 4]);
        ext.extend_from_slice(&hello::EXT_KEY_SHARE.to_be_bytes());
        ext.extend_from_slice(&[0, 2]);
        ext.extend_from_slice(&group.to_be_bytes());
        let hrr = server_hello(&HRR_RANDOM, &h.session_id, suite.id, &ext);
        transcript.update(&hrr);
        self.sealed(CT_HANDSHAKE, &hrr)?;
        if !h.session_id.is_empty() {
            self.sealed(CT_CCS, &[1])?;
            self.ccs_sent = true;
        }
        self.retry = Some(Retry { suite: suite.id, group, session_id: h.session_id.clone(), transcript });
        self.state = State::Hello2;
        Ok(())
    }

    fn client_finished(&mut self, msg: &[u8]) -> io::Result<()> {
        let Some((key, hash)) = self.client_finished.take() else {
            return Err(self.fail(INTERNAL_ERROR, "no Finished expected"));
        };
        if hmac::verify(&key, hash.as_ref(), &msg[4..]).is_err() {
            return Err(self.fail(DECRYPT_ERROR, "client Finished does not verify"));
        }
        self.read = None;
        self.state = State::Traffic;
        log::debug!(target: LOG, "TLS 1.3 handshake complete");
        Ok(())
    }

    /// The negotiated suite's name and group (once the ServerHello is sent).
    pub fn negotiated(&self) -> Option<(&'static str, &'static str)> {
        self.suite.map(|s| (s.name, group_name(self.group)))
    }
}

/// A ServerHello (or HelloRetryRequest) handshake message.
fn server_hello(random: &[u8; 32], session_id: &[u8], suite: u16, ext: &[u8]) -> Vec<u8> {
    let mut b = vec![HS_SERVER_HELLO, 0, 0, 0, 3, 3];
    b.extend_from_slice(random);
    b.push(session_id.len() as u8);
    b.extend_from_slice(session_id);
    b.extend_from_slice(&suite.to_be_bytes());
    b.push(0);
    b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    b.extend_from_slice(ext);
    let n = (b.len() - 4) as u32;
    b[1..4].copy_from_slice(&n.to_be_bytes()[1..]);
    b
}

/// `SSLKEYLOGFILE`, as GnuTLS honours it.
fn key_log(label: &str, client_random: &[u8], secret: &[u8]) {
    use rustls::KeyLog;
    static FILE: std::sync::OnceLock<Option<rustls::KeyLogFile>> = std::sync::OnceLock::new();
    let f = FILE.get_or_init(|| std::env::var_os("SSLKEYLOGFILE").map(|_| rustls::KeyLogFile::new()));
    if let Some(f) = f {
        f.log(label, client_random, secret);
    }
}

impl Psk13 {
    /// The handshake is over: the record layer takes the application
    /// traffic keys, what is still to send and the rest of the input.
    fn switch(&mut self, plain: &mut Vec<u8>) -> io::Result<bool> {
        let keys = match (self.suite, self.client_traffic.take(), self.server_traffic.take()) {
            (Some(suite), Some(client), Some(server)) => {
                let rx = schedule::record_keys(suite, &client);
                let tx = schedule::record_keys(suite, &server);
                rx.zip(tx).map(|k| (k, schedule::Updates { suite, client, server }))
            }
            _ => None,
        };
        let Some(((rx, tx), updates)) = keys else {
            return Err(self.fail(INTERNAL_ERROR, "traffic keys"));
        };
        let seq = self.write.take().map_or(0, |w| w.seq);
        let out = std::mem::take(&mut self.out);
        let mut s = Box::new(Session::new(records::Version::Tls13, (0, rx), (seq, tx), Some(Box::new(updates)), out)?);
        s.rx.limit = self.read_limit;
        s.tx.dir.limit = s.tx.dir.limit.min(self.write_limit);
        let rest = std::mem::take(&mut self.input);
        let closed = s.feed(&rest, plain);
        self.session = Some(s);
        closed
    }
}

impl Engine for Psk13 {
    fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        if let Some(s) = &mut self.session {
            return s.feed(raw, plain);
        }
        self.input.extend_from_slice(raw);
        self.process()?;
        if self.state == State::Traffic {
            return self.switch(plain);
        }
        Ok(self.closed)
    }

    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        self.session.as_mut().ok_or_else(no_session)?.encrypt(data)
    }

    psk_session_methods!();

    fn describe(&self) -> String {
        // GnuTLS nbdkit's lines, and the key exchange mode.
        let cipher = self.suite.map_or("?", |s| s.cipher);
        format!(
            "TLS session: (TLS1.3)--({cipher})\n\
             TLS: authentication: PSK (Pre-Shared Key)\n\
             TLS: PSK username: {}\n\
             TLS: negotiated group: {}\n\
             TLS: PSK key exchange: psk_dhe_ke (ECDHE)",
            self.user,
            group_name(self.group)
        )
    }
}
