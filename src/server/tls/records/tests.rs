//! The record layer: round trips for every version and AEAD, against
//! itself and against rustls' own record layer (a rustls client talking
//! to the X.509 engine), KeyUpdates both ways, and hostile records.

use std::io::{Read, Write};
use std::sync::Arc;

use proptest::prelude::*;
use ring::digest;

use super::*;
use crate::server::tls::engine::Engine;

const ALL: [(Version, Cipher); 6] = [
    (Version::Tls12, Cipher::Aes128Gcm),
    (Version::Tls12, Cipher::Aes256Gcm),
    (Version::Tls12, Cipher::Chacha20Poly1305),
    (Version::Tls13, Cipher::Aes128Gcm),
    (Version::Tls13, Cipher::Aes256Gcm),
    (Version::Tls13, Cipher::Chacha20Poly1305),
];

/// Deterministic keys: generation `gen` of direction `label`.
fn secret(cipher: Cipher, label: &str, gen: u32) -> Secret {
    let mut c = digest::Context::new(&digest::SHA256);
    c.update(label.as_bytes());
    c.update(&gen.to_be_bytes());
    let d = c.finish();
    let n = if cipher == Cipher::Aes128Gcm { 16 } else { 32 };
    let mut iv = [0u8; 12];
    iv.copy_from_slice(&d.as_ref()[20..32]);
    Secret { cipher, key: d.as_ref()[..n].to_vec(), iv }
}

/// A stand-in for the TLS 1.3 key schedule: the next generation.
struct Gen {
    cipher: Cipher,
    rx: (&'static str, u32),
    tx: (&'static str, u32),
}

impl Schedule for Gen {
    fn next_rx(&mut self) -> Result<Secret, String> {
        self.rx.1 += 1;
        Ok(secret(self.cipher, self.rx.0, self.rx.1))
    }
    fn next_tx(&mut self) -> Result<Secret, String> {
        self.tx.1 += 1;
        Ok(secret(self.cipher, self.tx.0, self.tx.1))
    }
}

/// (server, client): each one's rx is the other's tx.
fn pair(v: Version, c: Cipher) -> (Session, Session) {
    let side = |rx: &'static str, tx: &'static str, seq: u64| {
        let sched: Option<Box<dyn Schedule>> = (v == Version::Tls13).then(|| Box::new(Gen { cipher: c, rx: (rx, 0), tx: (tx, 0) }) as _);
        Session::new(v, (seq, secret(c, rx, 0)), (seq, secret(c, tx, 0)), sched, Vec::new()).unwrap()
    };
    // TLS 1.2 starts after the Finished messages: sequence number 1.
    let seq = if v == Version::Tls12 { 1 } else { 0 };
    (side("c2s", "s2c", seq), side("s2c", "c2s", seq))
}

fn wire(s: &mut Session) -> Vec<u8> {
    let mut w = Vec::new();
    s.flush_to(&mut w).unwrap();
    w
}

/// The records in `w`: (outer type, body length).
fn records(mut w: &[u8]) -> Vec<(u8, usize)> {
    let mut v = Vec::new();
    while w.len() >= 5 {
        let len = u16::from_be_bytes([w[3], w[4]]) as usize;
        v.push((w[0], len));
        w = &w[5 + len..];
    }
    assert!(w.is_empty(), "trailing bytes");
    v
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn round_trips_every_version_and_cipher() {
    for (v, c) in ALL {
        let (mut s, mut cl) = pair(v, c);
        for n in [0, 1, 15, 16383, 16384, 16385, 65536 + 16, 200_000] {
            let msg = data(n);
            // Client to server, fed in odd pieces.
            cl.encrypt(&msg).unwrap();
            let w = wire(&mut cl);
            let mut plain = Vec::new();
            for piece in w.chunks(4093) {
                assert!(!s.feed(piece, &mut plain).unwrap());
            }
            assert_eq!(plain, msg, "{v:?} {c:?} {n}");
            // Server to client, the reply header and data in one record
            // when they fit (the way NBD replies go out).
            s.encrypt(&[9; 16]).unwrap();
            s.encrypt(&msg).unwrap();
            let w = wire(&mut s);
            let recs = records(&w);
            assert_eq!(recs.len(), (n + 16).div_ceil(MAX_PLAIN), "{v:?} {c:?} {n}: {recs:?}");
            let overhead = match (v, c) {
                (Version::Tls13, _) => 1 + TAG,
                (Version::Tls12, Cipher::Chacha20Poly1305) => TAG,
                (Version::Tls12, _) => EXPLICIT + TAG,
            };
            assert!(recs.iter().all(|&(t, len)| t == ct::DATA && len <= MAX_PLAIN + overhead));
            assert_eq!(recs.iter().map(|r| r.1).sum::<usize>(), n + 16 + recs.len() * overhead);
            let mut back = Vec::new();
            cl.feed(&w, &mut back).unwrap();
            assert_eq!(&back[..16], &[9; 16]);
            assert_eq!(&back[16..], &msg[..]);
        }
        // close_notify ends the session quietly.
        cl.close();
        let w = wire(&mut cl);
        let mut plain = Vec::new();
        assert!(s.feed(&w, &mut plain).unwrap());
        assert!(cl.encrypt(b"x").is_err());
    }
}

#[test]
fn nonces_follow_the_sequence_number() {
    // TLS 1.2 AES-GCM: the explicit nonce sent is iv[4..] ⊕ seq.
    let (mut s, _) = pair(Version::Tls12, Cipher::Aes128Gcm);
    let iv = secret(Cipher::Aes128Gcm, "s2c", 0).iv;
    for seq in 1..4u64 {
        s.encrypt(b"abc").unwrap();
        let w = wire(&mut s);
        let want: Vec<u8> = iv[4..].iter().zip(seq.to_be_bytes()).map(|(a, b)| a ^ b).collect();
        assert_eq!(&w[5..13], &want[..]);
    }
    // A record replayed (same sequence number) or reordered fails.
    for (v, c) in ALL {
        let (mut s, mut cl) = pair(v, c);
        cl.encrypt(b"one").unwrap();
        let one = wire(&mut cl);
        cl.encrypt(b"two").unwrap();
        let two = wire(&mut cl);
        let mut plain = Vec::new();
        s.feed(&one, &mut plain).unwrap();
        let e = s.feed(&one, &mut plain).unwrap_err();
        assert!(e.to_string().contains("bad record MAC"), "{e}");
        let (mut s, _) = pair(v, c);
        assert!(s.feed(&two, &mut plain).is_err(), "{v:?} {c:?}: a reordered record was accepted");
    }
}

/// What the peer's answer says: the alert it carries, decrypted.
fn alert_in(cl: &mut Session, w: &[u8]) -> String {
    let mut plain = Vec::new();
    match cl.feed(w, &mut plain) {
        Err(e) => e.to_string(),
        Ok(closed) => format!("no alert (closed {closed})"),
    }
}

#[test]
fn tampered_records_get_bad_record_mac() {
    for (v, c) in ALL {
        let mut msg = {
            let (_, mut cl) = pair(v, c);
            cl.encrypt(&data(1000)).unwrap();
            wire(&mut cl)
        };
        for at in [5, 13, 500, msg.len() - 1] {
            let (mut s, mut cl) = pair(v, c);
            msg[at] ^= 0x40;
            let mut plain = Vec::new();
            let e = s.feed(&msg, &mut plain).unwrap_err();
            msg[at] ^= 0x40;
            assert!(e.to_string().contains("bad record MAC"), "{e}");
            assert!(plain.is_empty());
            // The fatal alert reaches the peer, and nothing more is accepted.
            assert_eq!(alert_in(&mut cl, &wire(&mut s)), "TLS: the peer sent alert 20");
            assert!(s.feed(&msg, &mut plain).is_err());
            assert!(s.encrypt(b"x").is_err());
        }
        // The header is authenticated too (TLS 1.3: all of it; TLS 1.2: the type).
        let (mut s, _) = pair(v, c);
        msg[0] = ct::HANDSHAKE;
        assert!(s.feed(&msg, &mut Vec::new()).is_err());
        msg[0] = ct::DATA;
    }
}

#[test]
fn oversize_and_short_records_are_refused() {
    for (v, c) in ALL {
        let max = if v == Version::Tls13 { MAX_PLAIN + 256 } else { MAX_PLAIN + 2048 };
        let (mut s, mut cl) = pair(v, c);
        let mut rec = vec![ct::DATA, 3, 3];
        rec.extend_from_slice(&((max + 1) as u16).to_be_bytes());
        // Refused from the header alone, before the body arrives.
        assert!(s.feed(&rec, &mut Vec::new()).unwrap_err().to_string().contains("too long"));
        assert_eq!(alert_in(&mut cl, &wire(&mut s)), "TLS: the peer sent alert 22");
        let (mut s, mut cl) = pair(v, c);
        assert!(s.feed(&[ct::DATA, 3, 3, 0, 3, 1, 2, 3], &mut Vec::new()).unwrap_err().to_string().contains("too short"));
        assert_eq!(alert_in(&mut cl, &wire(&mut s)), "TLS: the peer sent alert 20");
        let (mut s, _) = pair(v, c);
        assert!(s.feed(b"GET / HTTP/1.1\r\n", &mut Vec::new()).is_err());
    }
    // A TLS 1.3 inner plaintext over 2^14 + 1 bytes, correctly sealed.
    let (mut s, mut cl) = pair(Version::Tls13, Cipher::Aes128Gcm);
    let at = cl.tx.begin(ct::DATA, MAX_PLAIN + 2);
    cl.tx.out.extend_from_slice(&data(MAX_PLAIN + 1));
    cl.tx.seal(at, ct::DATA);
    let w = wire(&mut cl);
    assert!(s.feed(&w, &mut Vec::new()).unwrap_err().to_string().contains("too long"));
    // And the TLS 1.2 plaintext limit.
    let (mut s, mut cl) = pair(Version::Tls12, Cipher::Aes256Gcm);
    let at = cl.tx.begin(ct::DATA, MAX_PLAIN + 1);
    cl.tx.out.extend_from_slice(&data(MAX_PLAIN + 1));
    cl.tx.seal(at, ct::DATA);
    let w = wire(&mut cl);
    assert!(s.feed(&w, &mut Vec::new()).unwrap_err().to_string().contains("too long"));
}

#[test]
fn tls13_inner_type_and_padding() {
    let (mut s, mut cl) = pair(Version::Tls13, Cipher::Chacha20Poly1305);
    // Application data with padding after the content type.
    let at = cl.tx.begin(ct::DATA, 100);
    cl.tx.out.extend_from_slice(b"hello");
    cl.tx.out.push(ct::DATA);
    cl.tx.out.extend_from_slice(&[0; 49]);
    // (seal appends the type byte: a 50th zero)
    cl.tx.seal(at, 0);
    let mut plain = Vec::new();
    s.feed(&wire(&mut cl), &mut plain).unwrap();
    assert_eq!(plain, b"hello");
    // All padding, no type: unexpected_message.
    let at = cl.tx.begin(ct::DATA, 10);
    cl.tx.out.extend_from_slice(&[0; 10]);
    cl.tx.seal(at, 0);
    let e = s.feed(&wire(&mut cl), &mut plain).unwrap_err();
    assert!(e.to_string().contains("without a content type"), "{e}");
    assert_eq!(alert_in(&mut cl, &wire(&mut s)), "TLS: the peer sent alert 10");
    // An unprotected record after the handshake (a plaintext alert).
    let (mut s, _) = pair(Version::Tls13, Cipher::Aes128Gcm);
    assert!(s.feed(&[ct::ALERT, 3, 3, 0, 2, 2, 40], &mut plain).unwrap_err().to_string().contains("unprotected"));
    // A change_cipher_spec inside protection.
    let (mut s, mut cl) = pair(Version::Tls13, Cipher::Aes128Gcm);
    cl.tx.control(ct::CCS, &[1]);
    assert!(s.feed(&wire(&mut cl), &mut plain).unwrap_err().to_string().contains("unexpected record type"));
}

#[test]
fn key_updates_both_ways() {
    for c in [Cipher::Aes128Gcm, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305] {
        let (mut s, mut cl) = pair(Version::Tls13, c);
        cl.encrypt(b"before").unwrap();
        // The client moves to new keys and asks the server to as well.
        cl.key_update(true).unwrap();
        cl.encrypt(b"after").unwrap();
        let mut plain = Vec::new();
        s.feed(&wire(&mut cl), &mut plain).unwrap();
        assert_eq!(plain, b"beforeafter");
        // The server answered with its own KeyUpdate (not requesting one) on
        // the old keys, then data on the new ones.
        s.encrypt(b"reply").unwrap();
        let w = wire(&mut s);
        assert_eq!(records(&w).len(), 2);
        let mut back = Vec::new();
        cl.feed(&w, &mut back).unwrap();
        assert_eq!(back, b"reply");
        let g = |x: &Session| (x.rx.dir.seq, x.tx.dir.seq);
        assert_eq!((g(&s), g(&cl)), ((1, 1), (1, 1)));
        // update_not_requested: no answer.
        cl.key_update(false).unwrap();
        s.feed(&wire(&mut cl), &mut plain).unwrap();
        assert!(wire(&mut s).is_empty());
        cl.encrypt(b"!").unwrap();
        s.feed(&wire(&mut cl), &mut plain).unwrap();
        assert_eq!(plain, b"beforeafter!");
        // A KeyUpdate with data after it in the same record, or a bad value.
        for (msg, why) in [(&[24, 0, 0, 1, 0, 23, 0, 0, 0][..], "not at the end"), (&[24, 0, 0, 1, 2], "bad KeyUpdate"), (&[24, 0, 0, 2, 0, 0], "malformed"), (&[4, 0, 0, 1, 0], "unexpected handshake")] {
            let (mut s, mut cl) = pair(Version::Tls13, c);
            cl.tx.control(ct::HANDSHAKE, msg);
            let e = s.feed(&wire(&mut cl), &mut plain).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
    // Data in the middle of a handshake message.
    let (mut s, mut cl) = pair(Version::Tls13, Cipher::Aes128Gcm);
    cl.tx.control(ct::HANDSHAKE, &[24, 0, 0]);
    cl.encrypt(b"data").unwrap();
    let e = s.feed(&wire(&mut cl), &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("inside a handshake message"), "{e}");
    // TLS 1.2 has none.
    let (_, mut cl) = pair(Version::Tls12, Cipher::Aes128Gcm);
    assert!(cl.key_update(true).is_err());
}

#[test]
fn tls13_rekeys_at_the_confidentiality_limit() {
    let (mut s, mut cl) = pair(Version::Tls13, Cipher::Aes128Gcm);
    s.tx.dir.seq = s.tx.dir.limit;
    cl.rx.dir.seq = cl.rx.dir.limit;
    s.encrypt(b"x").unwrap();
    let w = wire(&mut s);
    assert_eq!(records(&w).len(), 2, "KeyUpdate, then data");
    let mut back = Vec::new();
    cl.feed(&w, &mut back).unwrap();
    assert_eq!(back, b"x");
    assert_eq!(s.tx.dir.seq, 1);
    // TLS 1.2 cannot rekey: close_notify, and no more data.
    let (mut s, mut cl) = pair(Version::Tls12, Cipher::Aes128Gcm);
    s.tx.dir.seq = s.tx.dir.limit;
    cl.rx.dir.seq = cl.rx.dir.limit;
    assert!(s.encrypt(b"x").is_err());
    assert!(cl.feed(&wire(&mut s), &mut back).unwrap());
}

#[test]
fn alerts_from_the_peer() {
    for v in [Version::Tls12, Version::Tls13] {
        let (mut s, mut cl) = pair(v, Cipher::Aes128Gcm);
        cl.tx.control(ct::ALERT, &[1, alert::USER_CANCELED]);
        cl.encrypt(b"go on").unwrap();
        let mut plain = Vec::new();
        assert!(!s.feed(&wire(&mut cl), &mut plain).unwrap());
        assert_eq!(plain, b"go on");
        cl.tx.control(ct::ALERT, &[2, alert::DECODE_ERROR]);
        let e = s.feed(&wire(&mut cl), &mut plain).unwrap_err();
        assert!(e.to_string().contains("alert 50"), "{e}");
        assert!(wire(&mut s).is_empty(), "an alert answered an alert");
        let (mut s, mut cl) = pair(v, Cipher::Aes128Gcm);
        cl.tx.control(ct::ALERT, &[1]);
        assert!(s.feed(&wire(&mut cl), &mut plain).unwrap_err().to_string().contains("malformed alert"));
    }
    // TLS 1.2 renegotiation: a warning, and the session goes on.
    let (mut s, mut cl) = pair(Version::Tls12, Cipher::Aes128Gcm);
    cl.tx.control(ct::HANDSHAKE, &[1, 0, 0, 2, 3, 3]);
    let mut plain = Vec::new();
    s.feed(&wire(&mut cl), &mut plain).unwrap();
    let w = wire(&mut s);
    let mut back = Vec::new();
    assert!(!cl.feed(&w, &mut back).unwrap(), "warning alerts are ignored");
    s.encrypt(b"still here").unwrap();
    cl.feed(&wire(&mut s), &mut back).unwrap();
    assert_eq!(back, b"still here");
}

#[test]
fn the_two_halves_work_apart() {
    for (v, c) in ALL {
        let (s, mut cl) = pair(v, c);
        let (mut rx, tx) = s.split();
        let tx = Arc::new(std::sync::Mutex::new(tx));
        // A writer sends replies while the reader takes the client's data.
        let writer = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..50 {
                    let mut t = tx.lock().unwrap();
                    t.encrypt(&data(1000 + i)).unwrap();
                    t.flush_to(&mut out).unwrap();
                }
                out
            })
        };
        cl.encrypt(&data(300_000)).unwrap();
        let w = wire(&mut cl);
        let mut plain = Vec::new();
        for piece in w.chunks(7000) {
            assert!(!rx.feed(piece, &mut plain).unwrap());
        }
        assert_eq!(plain, data(300_000), "{v:?} {c:?}");
        assert!(!rx.has_events());
        let out = writer.join().unwrap();
        let mut back = Vec::new();
        cl.feed(&out, &mut back).unwrap();
        assert_eq!(back, (0..50).flat_map(|i| data(1000 + i)).collect::<Vec<u8>>());
        let mut t = tx.lock().unwrap();
        let tx_wire = |t: &mut Tx| {
            let mut w = Vec::new();
            t.flush_to(&mut w).unwrap();
            w
        };
        if v == Version::Tls13 {
            // A KeyUpdate asked for: the send half answers once told.
            cl.key_update(true).unwrap();
            cl.encrypt(b"new keys").unwrap();
            plain.clear();
            rx.feed(&wire(&mut cl), &mut plain).unwrap();
            assert_eq!(plain, b"new keys");
            assert!(rx.has_events() && tx_wire(&mut t).is_empty());
            t.apply(&mut rx).unwrap();
            assert!(!rx.has_events());
            t.encrypt(b"reply").unwrap();
            let w = tx_wire(&mut t);
            assert_eq!(records(&w).len(), 2, "KeyUpdate, then data");
            back.clear();
            cl.feed(&w, &mut back).unwrap();
            assert_eq!(back, b"reply");
            assert_eq!((t.dir.seq, cl.rx.dir.seq), (1, 1));
        }
        // A bad record: the fatal alert goes out through the send half,
        // which sends nothing more.
        assert!(rx.feed(&[ct::DATA, 3, 3, 0, 3, 1, 2, 3], &mut plain).is_err());
        t.apply(&mut rx).unwrap();
        assert_eq!(alert_in(&mut cl, &tx_wire(&mut t)), "TLS: the peer sent alert 20");
        assert!(t.encrypt(b"x").is_err());
        t.close();
        assert!(tx_wire(&mut t).is_empty());
    }
}

proptest! {
    /// Garbage, and valid records cut anywhere or with a flipped bit,
    /// never panic; cut records still decrypt whole.
    #[test]
    fn hostile_records(which in 0usize..6, garbage in proptest::collection::vec(any::<u8>(), 0..600),
                       n in 0usize..40000, cuts in proptest::collection::vec(1usize..9000, 0..8), flip in any::<Option<(usize, u8)>>()) {
        let (v, c) = ALL[which];
        let (mut s, _) = pair(v, c);
        let _ = s.feed(&garbage, &mut Vec::new());
        let _ = s.encrypt(&garbage);
        let (mut s, mut cl) = pair(v, c);
        let msg = data(n);
        cl.encrypt(&msg).unwrap();
        let mut w = wire(&mut cl);
        if let Some((at, bit)) = flip {
            if !w.is_empty() {
                let at = at % w.len();
                w[at] ^= 1 << (bit % 8);
            }
        }
        let mut plain = Vec::new();
        let mut rest = &w[..];
        let mut ok = true;
        for cut in cuts {
            let k = cut.min(rest.len());
            ok &= s.feed(&rest[..k], &mut plain).is_ok();
            rest = &rest[k..];
        }
        ok &= s.feed(rest, &mut plain).is_ok();
        if flip.is_none() {
            prop_assert!(ok);
            prop_assert_eq!(plain, msg);
        } else if ok {
            // A flipped bit was caught, landed in a byte TLS 1.2 ignores
            // (the version's minor), or made a length wait for more.
            prop_assert!(msg.starts_with(&plain));
        }
    }
}

// A rustls client against the X.509 engine, for every suite: rustls' own
// record layer is the reference implementation here.

struct Pki(std::path::PathBuf);

impl Pki {
    fn new() -> Pki {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("nbdkit-records-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for (f, text) in [
            ("ca-cert.pem", include_str!("../testdata/ca-cert.pem")),
            ("server-cert.pem", include_str!("../testdata/server-cert.pem")),
            ("server-key.pem", include_str!("../testdata/server-key.pem")),
        ] {
            std::fs::write(d.join(f), text).unwrap();
        }
        Pki(d)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[allow(deprecated)] // (ring's provider: what the server uses)
fn client(suite: rustls::SupportedCipherSuite) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(include_bytes!("../testdata/ca-cert.pem")).unwrap()).unwrap();
    let provider = rustls::crypto::CryptoProvider { cipher_suites: vec![suite], ..rustls::crypto::ring::default_provider() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    c.set_buffer_limit(None);
    c
}

/// Moves records both ways until neither side has anything to say;
/// returns the plaintext the server got (what the client got is in
/// `back`).
fn pump_both(cl: &mut rustls::ClientConnection, srv: &mut crate::server::tls::engine::Rustls, back: &mut Vec<u8>) -> Vec<u8> {
    let mut plain = Vec::new();
    for _ in 0..20 {
        let mut up = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut up).unwrap();
        }
        if !up.is_empty() {
            srv.feed(&up, &mut plain).unwrap();
        }
        let mut down = Vec::new();
        srv.flush_to(&mut down).unwrap();
        if up.is_empty() && down.is_empty() {
            break;
        }
        let mut d = &down[..];
        while !d.is_empty() {
            cl.read_tls(&mut d).unwrap();
            let n = cl.process_new_packets().unwrap().plaintext_bytes_to_read();
            let at = back.len();
            back.resize(at + n, 0);
            cl.reader().read_exact(&mut back[at..]).unwrap();
        }
    }
    plain
}

fn pump(cl: &mut rustls::ClientConnection, srv: &mut crate::server::tls::engine::Rustls) -> Vec<u8> {
    let mut back = Vec::new();
    let plain = pump_both(cl, srv, &mut back);
    assert!(back.is_empty());
    plain
}

#[test]
fn rustls_client_against_the_engine_for_every_suite() {
    use rustls::crypto::ring::cipher_suite as cs;
    let pki = Pki::new();
    let config = Arc::new(crate::server::tls::x509_config(&pki.0, false).unwrap());
    for (suite, name) in [
        (cs::TLS13_AES_128_GCM_SHA256, "TLSv1_3, cipher suite TLS13_AES_128_GCM_SHA256"),
        (cs::TLS13_AES_256_GCM_SHA384, "TLSv1_3, cipher suite TLS13_AES_256_GCM_SHA384"),
        (cs::TLS13_CHACHA20_POLY1305_SHA256, "TLSv1_3, cipher suite TLS13_CHACHA20_POLY1305_SHA256"),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "TLSv1_2, cipher suite TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        (cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, "TLSv1_2, cipher suite TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
        (cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, "TLSv1_2, cipher suite TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ] {
        let mut cl = client(suite);
        let mut srv = crate::server::tls::engine::Rustls::new(config.clone()).unwrap();
        // ClientHello, the server's flight.
        let mut up = Vec::new();
        cl.write_tls(&mut up).unwrap();
        let mut got = Vec::new();
        srv.feed(&up, &mut got).unwrap();
        let mut down = Vec::new();
        srv.flush_to(&mut down).unwrap();
        let mut d = &down[..];
        while !d.is_empty() {
            cl.read_tls(&mut d).unwrap();
            cl.process_new_packets().unwrap();
        }
        let tls13 = name.starts_with("TLSv1_3");
        if tls13 {
            // The client's first data leaves with its Finished (one read).
            cl.writer().write_all(b"NBD options").unwrap();
            got.extend(pump(&mut cl, &mut srv));
        } else {
            got.extend(pump(&mut cl, &mut srv));
            cl.writer().write_all(b"NBD options").unwrap();
            got.extend(pump(&mut cl, &mut srv));
        }
        assert!(!srv.handshaking() && !cl.is_handshaking(), "{name}");
        assert_eq!(got, b"NBD options", "{name}");
        assert!(srv.describe().contains(name), "{}", srv.describe());
        for round in 0..3 {
            let msg = data(100_000 + round);
            cl.writer().write_all(&msg).unwrap();
            assert_eq!(pump(&mut cl, &mut srv), msg, "{name}");
            srv.encrypt(&msg).unwrap();
            let mut back = Vec::new();
            pump_both(&mut cl, &mut srv, &mut back);
            assert_eq!(back, msg, "{name}");
            if tls13 {
                // rustls asks for a KeyUpdate: the engine follows and answers.
                cl.refresh_traffic_keys().unwrap();
            }
        }
        srv.close();
        pump(&mut cl, &mut srv);
        let mut rest = Vec::new();
        assert_eq!(cl.reader().read_to_end(&mut rest).unwrap(), 0, "{name}: close_notify");
        cl.send_close_notify();
        let mut up = Vec::new();
        cl.write_tls(&mut up).unwrap();
        assert!(srv.feed(&up, &mut Vec::new()).unwrap(), "{name}");
    }
}

#[test]
fn a_bad_handshake_gets_an_alert() {
    let pki = Pki::new();
    let config = Arc::new(crate::server::tls::x509_config(&pki.0, false).unwrap());
    let mut srv = crate::server::tls::engine::Rustls::new(config).unwrap();
    let e = srv.feed(&[22, 3, 1, 0, 4, 1, 0, 0, 0], &mut Vec::new()).unwrap_err();
    let mut out = Vec::new();
    srv.flush_to(&mut out).unwrap();
    assert_eq!(out.first(), Some(&ct::ALERT), "{e}: {out:?}");
    assert!(srv.handshaking() && srv.encrypt(b"x").is_err());
    assert!(srv.feed(b"more", &mut Vec::new()).is_err());
}
