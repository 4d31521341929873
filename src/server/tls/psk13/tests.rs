//! The TLS 1.3 PSK server against a small client written here (its own
//! key schedule on the same primitives), the key schedule against known
//! vectors, and hostile input.

use std::sync::Arc;

use proptest::prelude::*;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::digest;
use ring::hmac;
use ring::rand::SystemRandom;

use super::schedule::{Dir, Suite, SUITES};
use super::*;
use crate::server::tls::engine::Engine;
use crate::server::tls::psk::{self, Keys, Version};

const ALICE_KEY: &[u8] = &[0x11; 32];
const SECP384R1: u16 = 0x0018;

fn keys() -> Arc<Keys> {
    Arc::new(Keys { keys: vec![("alice".into(), ALICE_KEY.to_vec()), ("bob".into(), vec![0x22; 16])] })
}

fn suite(id: u16) -> &'static Suite {
    SUITES.iter().find(|s| s.id == id).unwrap()
}

/// What the client offers.
#[derive(Clone)]
struct Opts {
    suites: Vec<u16>,
    groups: Vec<u16>,
    shares: Vec<u16>,
    ids: Vec<(Vec<u8>, Vec<u8>)>,
    session_id: Vec<u8>,
    modes: Vec<u8>,
    early: bool,
    /// The suite whose hash the binders use.
    binder: u16,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            // GnuTLS' order.
            suites: vec![0x1302, 0x1303, 0x1301],
            groups: vec![X25519, SECP256R1],
            shares: vec![X25519],
            ids: vec![(b"alice".to_vec(), ALICE_KEY.to_vec())],
            session_id: vec![7; 32],
            modes: vec![1],
            early: false,
            binder: 0x1301,
        }
    }
}

fn ext(out: &mut Vec<u8>, typ: u16, data: &[u8]) {
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

fn msg(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![typ];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend_from_slice(body);
    m
}

fn plain_record(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![typ, 3, 1];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// The records in `out`: (type, body).
fn records(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    while out.len() >= 5 {
        let len = u16::from_be_bytes([out[3], out[4]]) as usize;
        v.push((out[0], out[5..5 + len].to_vec()));
        out = &out[5 + len..];
    }
    assert!(out.is_empty(), "a partial record");
    v
}

/// A TLS 1.3 PSK client.
struct Client {
    o: Opts,
    privs: Vec<(u16, EphemeralPrivateKey)>,
    /// The transcript before this ClientHello (after an HRR).
    prefix: Option<digest::Context>,
    transcript: Option<digest::Context>,
    read: Option<Dir>,
    write: Option<Dir>,
    chosen: Option<(u16, u16, u16)>,
    retried: bool,
    /// ChangeCipherSpecs received.
    ccs: usize,
    /// The client sent its ChangeCipherSpec.
    sent_ccs: bool,
    /// Send a Finished that does not verify.
    bad_finished: bool,
}

fn key_pair(g: u16) -> (EphemeralPrivateKey, Vec<u8>) {
    let alg = if g == X25519 { &agreement::X25519 } else { &agreement::ECDH_P256 };
    let k = EphemeralPrivateKey::generate(alg, &SystemRandom::new()).unwrap();
    let p = k.compute_public_key().unwrap().as_ref().to_vec();
    (k, p)
}

impl Client {
    fn new(o: Opts) -> Client {
        Client { o, privs: Vec::new(), prefix: None, transcript: None, read: None, write: None, chosen: None, retried: false, ccs: 0, sent_ccs: false, bad_finished: false }
    }

    /// The ClientHello message (binders computed).
    fn hello(&mut self) -> Vec<u8> {
        let o = self.o.clone();
        let bs = suite(o.binder);
        let mut exts = Vec::new();
        ext(&mut exts, 43, &[4, 3, 4, 3, 3]);
        let mut g = (2 * o.groups.len() as u16).to_be_bytes().to_vec();
        o.groups.iter().for_each(|x| g.extend_from_slice(&x.to_be_bytes()));
        ext(&mut exts, 10, &g);
        let mut ks = Vec::new();
        self.privs.clear();
        for &sg in &o.shares {
            let public = if sg == X25519 || sg == SECP256R1 {
                let (k, p) = key_pair(sg);
                self.privs.push((sg, k));
                p
            } else {
                vec![4; 97]
            };
            ks.extend_from_slice(&sg.to_be_bytes());
            ks.extend_from_slice(&(public.len() as u16).to_be_bytes());
            ks.extend_from_slice(&public);
        }
        let mut ksx = (ks.len() as u16).to_be_bytes().to_vec();
        ksx.extend_from_slice(&ks);
        ext(&mut exts, 51, &ksx);
        let mut m = vec![o.modes.len() as u8];
        m.extend_from_slice(&o.modes);
        ext(&mut exts, 45, &m);
        if o.early {
            ext(&mut exts, 42, &[]);
        }
        // pre_shared_key, binders zero for now.
        let mut ids = Vec::new();
        for (id, _) in &o.ids {
            ids.extend_from_slice(&(id.len() as u16).to_be_bytes());
            ids.extend_from_slice(id);
            ids.extend_from_slice(&[0, 0, 0, 0]);
        }
        let hl = bs.hash_len();
        let blen = o.ids.len() * (1 + hl);
        let mut psk = (ids.len() as u16).to_be_bytes().to_vec();
        psk.extend_from_slice(&ids);
        psk.extend_from_slice(&(blen as u16).to_be_bytes());
        for _ in &o.ids {
            psk.push(hl as u8);
            psk.extend_from_slice(&vec![0; hl]);
        }
        ext(&mut exts, 41, &psk);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[9; 32]);
        body.push(o.session_id.len() as u8);
        body.extend_from_slice(&o.session_id);
        body.extend_from_slice(&(2 * o.suites.len() as u16).to_be_bytes());
        o.suites.iter().for_each(|s| body.extend_from_slice(&s.to_be_bytes()));
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut m = msg(1, &body);
        let binders_at = m.len() - blen - 2;
        let mut t = self.prefix.clone().unwrap_or_else(|| digest::Context::new(bs.hash));
        t.update(&m[..binders_at]);
        let th = t.finish();
        let mut at = binders_at + 2;
        for (_, key) in &o.ids {
            let early = bs.extract(b"", key);
            let bk = bs.derive(&early, b"ext binder", bs.empty_hash().as_ref());
            let b = hmac::sign(&bs.finished_key(&bk), th.as_ref());
            m[at + 1..at + 1 + hl].copy_from_slice(b.as_ref());
            at += 1 + hl;
        }
        m
    }

    /// Takes the server's flight; returns what the client sends next
    /// (the second ClientHello, or its Finished), or the alert.
    fn server_flight(&mut self, ch: &[u8], out: &[u8]) -> Result<Vec<u8>, u8> {
        let mut recs = records(out).into_iter();
        let (t, sh) = recs.next().expect("no ServerHello");
        if t == 21 {
            return Err(sh[1]);
        }
        assert_eq!(t, 22);
        assert_eq!(sh[0], 2);
        let random = &sh[6..38];
        let sid_len = sh[38] as usize;
        assert_eq!(&sh[39..39 + sid_len], &self.o.session_id[..]);
        let mut at = 39 + sid_len;
        let cs = u16::from_be_bytes([sh[at], sh[at + 1]]);
        at += 3;
        let mut e = &sh[at + 2..];
        let (mut group, mut share, mut index, mut version) = (0, Vec::new(), None, 0);
        while !e.is_empty() {
            let (typ, len) = (u16::from_be_bytes([e[0], e[1]]), u16::from_be_bytes([e[2], e[3]]) as usize);
            let d = &e[4..4 + len];
            match typ {
                43 => version = u16::from_be_bytes([d[0], d[1]]),
                51 => {
                    group = u16::from_be_bytes([d[0], d[1]]);
                    if d.len() > 2 {
                        share = d[4..].to_vec();
                    }
                }
                41 => index = Some(u16::from_be_bytes([d[0], d[1]])),
                _ => panic!("unexpected extension {typ}"),
            }
            e = &e[4 + len..];
        }
        assert_eq!(version, 0x0304);
        let s = suite(cs);
        if random == HRR_RANDOM {
            assert!(!self.retried, "two HelloRetryRequests");
            assert!(recs.len() <= 1);
            self.ccs += recs.filter(|r| *r == (20, vec![1])).count();
            self.retried = true;
            let mut t = digest::Context::new(s.hash);
            t.update(&[254, 0, 0, s.hash_len() as u8]);
            t.update(digest::digest(s.hash, ch).as_ref());
            t.update(&sh);
            self.prefix = Some(t);
            self.o.shares = vec![group];
            self.o.early = false;
            return Ok(self.hello());
        }
        let index = index.expect("no pre_shared_key") as usize;
        let key = self.o.ids[index].1.clone();
        let (_, mine) = self.privs.drain(..).find(|(g, _)| *g == group).expect("a group the client sent no share for");
        let alg = if group == X25519 { &agreement::X25519 } else { &agreement::ECDH_P256 };
        let shared = agreement::agree_ephemeral(mine, &UnparsedPublicKey::new(alg, &share), |s| s.to_vec()).unwrap();
        let mut t = self.prefix.take().unwrap_or_else(|| digest::Context::new(s.hash));
        t.update(ch);
        t.update(&sh);
        let early = s.extract(b"", &key);
        let empty = s.empty_hash();
        let hs = s.extract(&s.derive(&early, b"derived", empty.as_ref()), &shared);
        let th = t.clone().finish();
        let c_hs = s.derive(&hs, b"c hs traffic", th.as_ref());
        let s_hs = s.derive(&hs, b"s hs traffic", th.as_ref());
        let master = s.extract(&s.derive(&hs, b"derived", empty.as_ref()), &vec![0; s.hash_len()]);
        let mut rd = Dir::new(s, s_hs.clone()).unwrap();
        let mut hsbuf = Vec::new();
        for (typ, mut body) in recs {
            if typ == 20 {
                assert_eq!(body, [1]);
                self.ccs += 1;
                continue;
            }
            assert_eq!(typ, 23);
            let (inner, n) = rd.open(&[23, 3, 3, (body.len() >> 8) as u8, body.len() as u8], &mut body).expect("decrypts");
            assert_eq!(inner, 22);
            hsbuf.extend_from_slice(&body[..n]);
        }
        // EncryptedExtensions, Finished.
        assert_eq!(&hsbuf[..6], &[8, 0, 0, 2, 0, 0]);
        t.update(&hsbuf[..6]);
        let fin = &hsbuf[6..];
        assert_eq!(fin[0], 20);
        assert_eq!(fin.len(), 4 + s.hash_len());
        hmac::verify(&s.finished_key(&s_hs), t.clone().finish().as_ref(), &fin[4..]).expect("server Finished verifies");
        t.update(fin);
        let th = t.clone().finish();
        let c_ap = s.derive(&master, b"c ap traffic", th.as_ref());
        let s_ap = s.derive(&master, b"s ap traffic", th.as_ref());
        let mut mine = hmac::sign(&s.finished_key(&c_hs), th.as_ref()).as_ref().to_vec();
        if self.bad_finished {
            mine[3] ^= 0x40;
        }
        let mut w = Dir::new(s, c_hs).unwrap();
        let mut out = Vec::new();
        if !self.o.session_id.is_empty() && !self.sent_ccs {
            out.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
            self.sent_ccs = true;
        }
        w.seal(&mut out, 22, &msg(20, &mine)).unwrap();
        self.write = Some(Dir::new(s, c_ap).unwrap());
        self.read = Some(Dir::new(s, s_ap).unwrap());
        self.transcript = Some(t);
        self.chosen = Some((cs, group, index as u16));
        Ok(out)
    }

    fn seal(&mut self, typ: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.write.as_mut().unwrap().seal(&mut out, typ, body).unwrap();
        out
    }

    /// Decrypts the server's records: (inner type, content) each; follows
    /// the server's KeyUpdates.
    fn open(&mut self, out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        for (typ, mut body) in records(out) {
            assert_eq!(typ, 23);
            let hdr = [23, 3, 3, (body.len() >> 8) as u8, body.len() as u8];
            let (inner, n) = self.read.as_mut().unwrap().open(&hdr, &mut body).expect("decrypts");
            body.truncate(n);
            if inner == 22 && body[0] == 24 {
                self.read = self.read.as_ref().unwrap().next();
            }
            v.push((inner, body));
        }
        v
    }
}

/// Runs a handshake of `c` with `e`: Ok(the client) or Err(the alert).
fn handshake(e: &mut dyn Engine, mut c: Client) -> Result<Client, u8> {
    let mut ch = c.hello();
    let mut to_server = plain_record(22, &ch);
    for _ in 0..2 {
        let mut plain = Vec::new();
        let r = e.feed(&to_server, &mut plain);
        let mut out = Vec::new();
        e.flush_to(&mut out).unwrap();
        assert!(plain.is_empty());
        if r.is_err() {
            let recs = records(&out);
            assert_eq!(recs.len(), 1, "one alert");
            assert_eq!(recs[0].0, 21);
            return Err(recs[0].1[1]);
        }
        assert!(e.handshaking());
        let retried = c.retried;
        let next = c.server_flight(&ch, &out)?;
        if c.retried && !retried {
            ch = next;
            to_server = plain_record(22, &ch);
            if !c.o.session_id.is_empty() {
                to_server = [&[20, 3, 3, 0, 1, 1][..], &to_server].concat();
                c.sent_ccs = true;
            }
            continue;
        }
        let mut plain = Vec::new();
        let r = e.feed(&next, &mut plain);
        let mut out = Vec::new();
        e.flush_to(&mut out).unwrap();
        if r.is_err() {
            let mut v = c.open(&out);
            return Err(v.pop().unwrap().1[1]);
        }
        assert!(out.is_empty());
        assert!(!e.handshaking());
        return Ok(c);
    }
    panic!("no handshake");
}

/// Data both ways over an established session.
fn exchange(e: &mut dyn Engine, c: &mut Client) {
    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let mut to_server = c.seal(23, b"hello ");
    to_server.extend(c.seal(23, b""));
    to_server.extend(c.seal(23, b"server"));
    let mut plain = Vec::new();
    assert!(!e.feed(&to_server, &mut plain).unwrap());
    assert_eq!(plain, b"hello server");
    e.encrypt(&big).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let got: Vec<u8> = c.open(&out).into_iter().filter(|(t, _)| *t == 23).flat_map(|(_, b)| b).collect();
    assert_eq!(got, big);
}

fn server() -> Psk13 {
    Psk13::new(keys())
}

#[test]
fn full_handshake_x25519_with_the_servers_suite() {
    let mut e = server();
    let mut c = handshake(&mut e, Client::new(Opts::default())).unwrap();
    assert_eq!(c.chosen, Some((0x1301, X25519, 0)));
    assert_eq!(c.ccs, 1, "middlebox compatibility: one ChangeCipherSpec");
    exchange(&mut e, &mut c);
    assert_eq!(
        e.describe(),
        "TLS session: (TLS1.3)--(AES-128-GCM)\nTLS: authentication: PSK (Pre-Shared Key)\nTLS: PSK username: alice\n\
         TLS: negotiated group: X25519\nTLS: PSK key exchange: psk_dhe_ke (ECDHE)"
    );
    // close_notify.
    let bye = c.seal(21, &[1, 0]);
    assert!(e.feed(&bye, &mut Vec::new()).unwrap());
    e.close();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert_eq!(c.open(&out), vec![(21, vec![1, 0])]);
}

#[test]
fn through_the_version_choice() {
    let mut e = psk::engine(&keys()).unwrap();
    let o = Opts { session_id: vec![], shares: vec![SECP256R1], ..Opts::default() };
    let mut c = handshake(&mut *e, Client::new(o)).unwrap();
    assert_eq!(c.chosen, Some((0x1301, SECP256R1, 0)));
    assert_eq!(c.ccs, 0, "no ChangeCipherSpec without a session id");
    exchange(&mut *e, &mut c);
}

#[test]
fn hello_retry_request() {
    for sid in [vec![], vec![1; 32]] {
        let mut e = server();
        let o = Opts { groups: vec![SECP384R1, SECP256R1], shares: vec![SECP384R1], session_id: sid.clone(), ..Opts::default() };
        let mut c = handshake(&mut e, Client::new(o)).unwrap();
        assert!(c.retried);
        assert_eq!(c.chosen, Some((0x1301, SECP256R1, 0)));
        assert_eq!(c.ccs, usize::from(!sid.is_empty()), "one ChangeCipherSpec, after the HelloRetryRequest");
        exchange(&mut e, &mut c);
    }
    // No group in common.
    let o = Opts { groups: vec![SECP384R1], shares: vec![SECP384R1], ..Opts::default() };
    assert_eq!(handshake(&mut server(), Client::new(o)).err(), Some(HANDSHAKE_FAILURE));
}

#[test]
fn second_hello_must_follow_the_retry() {
    let mut e = server();
    let o = Opts { groups: vec![SECP384R1, SECP256R1], shares: vec![SECP384R1], ..Opts::default() };
    let mut c = Client::new(o);
    let ch = c.hello();
    e.feed(&plain_record(22, &ch), &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let _ = c.server_flight(&ch, &out).unwrap();
    // Again without the share asked for.
    c.o.shares = vec![X25519];
    let ch2 = c.hello();
    assert!(e.feed(&plain_record(22, &ch2), &mut Vec::new()).is_err());
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert_eq!(records(&out), vec![(21, vec![2, ILLEGAL_PARAMETER])]);
}

#[test]
fn suites() {
    for (offered, binder, want) in [
        (vec![0x1303], 0x1303, Ok(0x1303)),
        (vec![0x1302], 0x1302, Ok(0x1302)),
        (vec![0x1302, 0x1303], 0x1303, Ok(0x1303)),
        (vec![0x1302, 0x1301], 0x1302, Ok(0x1302)),
        (vec![0x1302], 0x1301, Err(HANDSHAKE_FAILURE)),
        (vec![0x00a8], 0x1301, Err(HANDSHAKE_FAILURE)),
    ] {
        let o = Opts { suites: offered.clone(), binder, ..Opts::default() };
        let mut e = server();
        let r = handshake(&mut e, Client::new(o));
        match (r, want) {
            (Ok(mut c), Ok(w)) => {
                assert_eq!(c.chosen.unwrap().0, w, "{offered:x?}");
                exchange(&mut e, &mut c);
            }
            (Err(a), Err(w)) => assert_eq!(a, w, "{offered:x?}"),
            (r, w) => panic!("{offered:x?}: {:?} vs {w:?}", r.map(|c| c.chosen)),
        }
    }
}

#[test]
fn identities_and_binders() {
    // A wrong key: decrypt_error.
    let o = Opts { ids: vec![(b"alice".to_vec(), vec![0x12; 32])], ..Opts::default() };
    assert_eq!(handshake(&mut server(), Client::new(o)).err(), Some(DECRYPT_ERROR));
    // An unknown user: unknown_psk_identity.
    let o = Opts { ids: vec![(b"mallory".to_vec(), vec![0x12; 32])], ..Opts::default() };
    assert_eq!(handshake(&mut server(), Client::new(o)).err(), Some(UNKNOWN_PSK_IDENTITY));
    // The first identity the server knows is chosen, by its index.
    let o = Opts { ids: vec![(b"mallory".to_vec(), vec![0x12; 32]), (b"bob".to_vec(), vec![0x22; 16])], ..Opts::default() };
    let mut e = server();
    let mut c = handshake(&mut e, Client::new(o)).unwrap();
    assert_eq!(c.chosen.unwrap().2, 1);
    exchange(&mut e, &mut c);
    // psk_ke alone (no forward secrecy) is refused.
    let o = Opts { modes: vec![0], ..Opts::default() };
    assert_eq!(handshake(&mut server(), Client::new(o)).err(), Some(HANDSHAKE_FAILURE));
}

#[test]
fn a_wrong_client_finished() {
    let mut e = server();
    let mut c = Client::new(Opts { session_id: vec![], ..Opts::default() });
    let ch = c.hello();
    e.feed(&plain_record(22, &ch), &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let mut fin = c.server_flight(&ch, &out).unwrap();
    // Flip a bit of the (encrypted) Finished: the record does not open.
    let n = fin.len();
    fin[n - 20] ^= 1;
    assert!(e.feed(&fin, &mut Vec::new()).is_err());
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert_eq!(c.open(&out), vec![(21, vec![2, BAD_RECORD_MAC])]);
    // A Finished that decrypts but does not verify.
    let mut c = Client::new(Opts::default());
    c.bad_finished = true;
    assert_eq!(handshake(&mut server(), c).err(), Some(DECRYPT_ERROR));
}

#[test]
fn key_update() {
    let mut e = server();
    e.write_limit = 3;
    let mut c = handshake(&mut e, Client::new(Opts::default())).unwrap();
    // update_requested: the server follows and answers.
    let mut to_server = c.seal(22, &[24, 0, 0, 1, 1]);
    c.write = c.write.as_ref().unwrap().next();
    to_server.extend(c.seal(23, b"after"));
    let mut plain = Vec::new();
    e.feed(&to_server, &mut plain).unwrap();
    assert_eq!(plain, b"after");
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert_eq!(c.open(&out), vec![(22, vec![24, 0, 0, 1, 0])]);
    // update_not_requested: no answer.
    let mut to_server = c.seal(22, &[24, 0, 0, 1, 0]);
    c.write = c.write.as_ref().unwrap().next();
    to_server.extend(c.seal(23, b"again"));
    let mut plain = Vec::new();
    e.feed(&to_server, &mut plain).unwrap();
    assert_eq!(plain, b"again");
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert!(out.is_empty());
    // The server's own, at its limit (3 records here).
    e.encrypt(&vec![5; 6 * MAX_PLAIN]).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let recs = c.open(&out);
    let updates = recs.iter().filter(|r| r.0 == 22).count();
    assert_eq!(updates, 1, "{:?}", recs.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(recs.iter().filter(|r| r.0 == 23).map(|r| r.1.len()).sum::<usize>(), 6 * MAX_PLAIN);
    // A malformed KeyUpdate; KeyUpdate and data in one record.
    let bad = c.seal(22, &[24, 0, 0, 1, 2]);
    assert!(e.feed(&bad, &mut Vec::new()).is_err());
    let mut e = server();
    let mut c = handshake(&mut e, Client::new(Opts::default())).unwrap();
    let bad = c.seal(22, &[24, 0, 0, 1, 0, 24, 0, 0]);
    assert!(e.feed(&bad, &mut Vec::new()).is_err());
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    assert_eq!(c.open(&out), vec![(21, vec![2, UNEXPECTED_MESSAGE])]);
}

#[test]
fn the_read_limit_ends_the_session() {
    let mut e = server();
    e.read_limit = 4;
    let mut c = handshake(&mut e, Client::new(Opts::default())).unwrap();
    for i in 0..5 {
        let r = e.feed(&c.seal(23, b"x"), &mut Vec::new());
        assert_eq!(r.is_ok(), i < 4, "record {i}");
    }
}

#[test]
fn early_data_is_skipped() {
    let mut e = server();
    let mut c = Client::new(Opts { early: true, ..Opts::default() });
    let ch = c.hello();
    let mut to_server = plain_record(22, &ch);
    // 0-RTT records (under a key the server never derives).
    to_server.extend_from_slice(&[23, 3, 3, 0, 40]);
    to_server.extend_from_slice(&[0xab; 40]);
    e.feed(&to_server, &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let fin = c.server_flight(&ch, &out).unwrap();
    let more = [&[23, 3, 3, 0, 30][..], &[0xcd; 30]].concat();
    e.feed(&[more, fin].concat(), &mut Vec::new()).unwrap();
    assert!(!e.handshaking());
    exchange(&mut e, &mut c);
    // Without early_data offered, the same record is an error.
    let mut e = server();
    let mut c = Client::new(Opts::default());
    let ch = c.hello();
    e.feed(&plain_record(22, &ch), &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    c.server_flight(&ch, &out).unwrap();
    assert!(e.feed(&[&[23, 3, 3, 0, 30][..], &[0xcd; 30]].concat(), &mut Vec::new()).is_err());
}

#[test]
fn byte_at_a_time_and_fragmented() {
    let mut e = server();
    let mut c = Client::new(Opts::default());
    let ch = c.hello();
    // The ClientHello in two records, fed a byte at a time.
    let (a, b) = ch.split_at(50);
    let to_server = [plain_record(22, a), plain_record(22, b)].concat();
    for byte in &to_server {
        e.feed(&[*byte], &mut Vec::new()).unwrap();
    }
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let fin = c.server_flight(&ch, &out).unwrap();
    for byte in &fin {
        e.feed(&[*byte], &mut Vec::new()).unwrap();
    }
    assert!(!e.handshaking());
    exchange(&mut e, &mut c);
}

#[test]
fn version_choice() {
    let mut c = Client::new(Opts::default());
    let ch = c.hello();
    let rec = plain_record(22, &ch);
    assert_eq!(psk::choose(&rec[..rec.len() - 1]), None);
    assert_eq!(psk::choose(&rec), Some(Version::Tls13));
    // TLS 1.2 only: no extensions at all, the PSK suite.
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x00, 0xa8, 1, 0]);
    let hello12 = msg(1, &body);
    assert_eq!(psk::choose(&plain_record(22, &hello12)), Some(Version::Tls12(false)));
    // TLS 1.3 offered without a PSK: TLS 1.2, marked as a downgrade.
    let mut body13 = body.clone();
    body13.extend_from_slice(&[0, 7, 0, 43, 0, 3, 2, 3, 4]);
    let hello = msg(1, &body13);
    assert_eq!(psk::choose(&plain_record(22, &hello)), Some(Version::Tls12(true)));
    let mut e = psk::engine(&keys()).unwrap();
    e.feed(&plain_record(22, &hello), &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    e.flush_to(&mut out).unwrap();
    let recs = records(&out);
    assert_eq!(recs[0].1[0], 2, "a ServerHello");
    assert_eq!(&recs[0].1[6 + 24..6 + 32], b"DOWNGRD\x01");
    assert_eq!(&recs[0].1[6 + 33..6 + 35], &[0x00, 0xa8]);
    // Not TLS at all: TLS 1.3's alert.
    assert_eq!(psk::choose(b"GET / HTTP/1.1\r\n"), Some(Version::Tls13));
}

/// The key schedule against the vectors rustls tests with (generated by
/// OpenSSL): with a PSK of 32 zero bytes the early secret is that of a
/// handshake without PSK.
#[test]
fn key_schedule_vectors() {
    fn h(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }
    let s = suite(0x1301);
    let hs_start = h("ec147a06dea3c8846c02b2238e41bddc9d89f9aea17b5efd4d7482af75881c0a");
    let hs_full = h("751a3d4a14dfabeb68e92ca5918e2408b9bcb0748982ec9c3230ac30bbeb23e2");
    let ecdhe = h("e7b8fef8903b520cb9a18971b69dd45dca53ce2f12bf3bef9315e31271df4b40");
    let early = s.extract(b"", &[0; 32]);
    let empty = s.empty_hash();
    let hs = s.extract(&s.derive(&early, b"derived", empty.as_ref()), &ecdhe);
    let master = s.extract(&s.derive(&hs, b"derived", empty.as_ref()), &[0; 32]);
    for (secret, label, th, want, key, iv) in [
        (&hs, &b"c hs traffic"[..], &hs_start, "617b35076b9d0e08cf731d94a86614784109ef255551921dd46e040135cf46ab", "62d0dd00f69619d3b8193ab4a09585a7", "fff75df5ad35d5cb3c53f3a9"),
        (&hs, b"s hs traffic", &hs_start, "fcf7dfe64fa2c04f6235387f434e01422336d9c039de6847a0b9ddcf29a88759", "0467f316a805b8c497ee67047bbcbc54", "de83a73e9d814b04c48b7809"),
        (&master, b"c ap traffic", &hs_full, "c14a6d7976d8102b5a0c9951493fee87dcaff82c24cab214e8be71a8206dbda5", "cc9f5f980b5f10306cbad7be98d7572e", "b80929e8d02c70f61162ed6b"),
        (&master, b"s ap traffic", &hs_full, "2c907738d3f83702d1e4598f4848531d9f9365491b9f7f52c822290d4c232192", "0cb29562d8d88f48b02cbfbed7e62bb3", "0db28f988586a1b7e4d5c69c"),
    ] {
        let t = s.derive(secret, label, th);
        assert_eq!(*t, h(want), "{}", String::from_utf8_lossy(label));
        assert_eq!(*s.expand_label(&t, b"key", b"", 16), h(key));
        assert_eq!(*s.expand_label(&t, b"iv", b"", 12), h(iv));
    }
}

/// A handshake's first flight, for mangling.
fn good_hello() -> Vec<u8> {
    plain_record(22, &Client::new(Opts::default()).hello())
}

/// After feeding `input`, the server either waits for more (nothing
/// sent) or has failed with exactly one alert.
fn never_panics(input: &[u8]) -> Result<(), TestCaseError> {
    for e in [&mut server() as &mut dyn Engine, &mut *psk::engine(&keys()).unwrap()] {
        let r = e.feed(input, &mut Vec::new());
        let mut out = Vec::new();
        e.flush_to(&mut out).unwrap();
        if r.is_err() {
            // One plaintext alert (or the ServerHello flight, then one).
            prop_assert!(!out.is_empty());
            if out[0] != 22 {
                prop_assert!(out.len() == 7 && out[0] == 21 && out[5] == 2, "{:?}", out);
            }
            prop_assert!(e.feed(b"more", &mut Vec::new()).is_err());
        } else if e.handshaking() {
            // Waiting, or a ServerHello flight (the mangling kept it valid).
            prop_assert!(out.is_empty() || out[0] == 22);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_bytes(input in proptest::collection::vec(any::<u8>(), 0..600)) {
        never_panics(&input)?;
    }

    #[test]
    fn random_records(typ in 20u8..25, body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut r = vec![typ, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(&body);
        never_panics(&r)?;
    }

    #[test]
    fn mangled_hellos(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>()) {
        let mut h = good_hello();
        for (i, x) in flips {
            let i = i.index(h.len());
            h[i] ^= x | 1;
        }
        never_panics(&h)?;
        let good = good_hello();
        never_panics(&good[..cut.index(good.len())])?;
    }

    #[test]
    fn mangled_records_after_the_handshake(flip in any::<prop::sample::Index>(), x in 1u8..=255, typ in 20u8..25) {
        let mut e = server();
        let mut c = handshake(&mut e, Client::new(Opts::default())).unwrap();
        let mut rec = c.seal(typ, b"some data here");
        let i = flip.index(rec.len());
        rec[i] ^= x;
        let r = e.feed(&rec, &mut Vec::new());
        let mut out = Vec::new();
        e.flush_to(&mut out).unwrap();
        if r.is_err() {
            let got = c.open(&out);
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(got[0].0, 21);
        } else {
            // Only the length (as a prefix) can change and still wait.
            prop_assert!(i < 5 && out.is_empty());
        }
    }
}
