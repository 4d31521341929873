//! The STARTTLS rules of the (pure) negotiation, and the PSK parser
//! against hostile files.

use proptest::prelude::*;

use crate::backend::{Caps, Export};
use crate::proto::negotiate::{ExportInfo, Exports, Negotiation, Payload, Policy, Step};
use crate::proto::wire::{opt, rep};

struct One;

impl Exports for One {
    fn list(&mut self) -> Result<Vec<Export>, String> {
        Ok(vec![Export::new(String::new())])
    }
    fn open(&mut self, name: &str) -> Result<ExportInfo, String> {
        Ok(ExportInfo { name: name.into(), size: 1 << 20, caps: Caps::default(), block_size: None, description: None })
    }
    fn close(&mut self) {}
}

fn neg(tls_mode: u8) -> Negotiation {
    let mut n = Negotiation::new(Policy { extended_headers: true, multi_conn: true, ..Policy::default() }, 3, 3).unwrap();
    n.tls_mode = tls_mode;
    n
}

/// The reply types of the option replies in `out`.
fn types(out: &[u8]) -> Vec<u32> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + 20 <= out.len() {
        v.push(u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap()));
        at += 20 + u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
    }
    v
}

fn ask(n: &mut Negotiation, option: u32, payload: &[u8]) -> (Step, Vec<u32>) {
    let mut out = Vec::new();
    let step = n.handle(option, Payload::Bytes(payload), &mut One, &mut out);
    (step, types(&out))
}

const GO: &[u8] = &[0, 0, 0, 0, 0, 0];
const META: &[u8] = b"\0\0\0\0\0\0\0\x01\0\0\0\x0fbase:allocation";

#[test]
fn require_allows_only_starttls_and_abort_first() {
    let mut n = neg(2);
    for o in [opt::LIST, opt::STRUCTURED_REPLY, opt::EXTENDED_HEADERS, opt::INFO, opt::GO, opt::SET_META_CONTEXT, 99] {
        assert_eq!(ask(&mut n, o, b""), (Step::Continue, vec![rep::ERR_TLS_REQD]), "option {o}");
    }
    assert!(!n.structured && !n.extended && n.chosen.is_none());
    assert_eq!(ask(&mut n, opt::EXPORT_NAME, b"").0, Step::Close);
    let mut n = neg(2);
    assert_eq!(ask(&mut n, opt::ABORT, b""), (Step::Close, vec![rep::ACK]));
    let mut n = neg(2);
    assert_eq!(ask(&mut n, opt::STARTTLS, b"x"), (Step::Continue, vec![rep::ERR_INVALID]));
    assert!(!n.start_tls);
    assert_eq!(ask(&mut n, opt::STARTTLS, b""), (Step::Continue, vec![rep::ACK]));
    assert!(n.start_tls);
    n.tls_started();
    assert_eq!(ask(&mut n, opt::STARTTLS, b""), (Step::Continue, vec![rep::ERR_INVALID]));
    assert_eq!(ask(&mut n, opt::GO, GO).0, Step::Transmission);
}

#[test]
fn off_refuses_with_policy() {
    let mut n = neg(0);
    assert_eq!(ask(&mut n, opt::STARTTLS, b""), (Step::Continue, vec![rep::ERR_POLICY]));
    assert!(!n.start_tls);
}

#[test]
fn the_upgrade_forgets_plaintext_state() {
    let mut n = neg(1);
    assert_eq!(ask(&mut n, opt::STRUCTURED_REPLY, b"").1, vec![rep::ACK]);
    assert_eq!(ask(&mut n, opt::SET_META_CONTEXT, META).1.last(), Some(&rep::ACK));
    assert_eq!(ask(&mut n, opt::STARTTLS, b"").1, vec![rep::ACK]);
    n.tls_started();
    assert!(!n.structured && !n.extended && n.tls);
    assert_eq!(ask(&mut n, opt::GO, GO).0, Step::Transmission);
    assert!(!n.base_allocation, "a meta context from before STARTTLS survived");
    let mut n = neg(1);
    assert_eq!(ask(&mut n, opt::EXTENDED_HEADERS, b"").1, vec![rep::ACK]);
    assert_eq!(ask(&mut n, opt::STARTTLS, b"").1, vec![rep::ACK]);
    n.tls_started();
    assert!(!n.extended);
}

#[test]
fn gnutls_ec_keys_lose_their_leading_zero() {
    let mut der = vec![0x30, 3 + 2 + 33 + 4, 0x02, 0x01, 0x01, 0x04, 33, 0];
    der.extend_from_slice(&[0xff; 32]);
    der.extend_from_slice(&[0xa0, 0x02, 0x05, 0x00]);
    let fixed = super::strip_sec1_zero(&der).unwrap();
    let mut want = vec![0x30, 3 + 2 + 32 + 4, 0x02, 0x01, 0x01, 0x04, 32];
    want.extend_from_slice(&[0xff; 32]);
    want.extend_from_slice(&[0xa0, 0x02, 0x05, 0x00]);
    assert_eq!(fixed, want);
    assert_eq!(super::strip_sec1_zero(&want), None);
    assert_eq!(super::strip_sec1_zero(&der[..10]), None);
}

proptest! {
    /// Whatever a client sends under --tls=require before the upgrade, it
    /// never reaches the transmission phase nor changes negotiated state.
    #[test]
    fn nothing_passes_before_the_upgrade(opts in proptest::collection::vec((0u32..16, proptest::collection::vec(any::<u8>(), 0..24)), 0..40)) {
        let mut n = neg(2);
        for (o, p) in opts {
            let (step, t) = ask(&mut n, o, &p);
            prop_assert_ne!(step, Step::Transmission);
            prop_assert!(!n.structured && !n.extended && n.chosen.is_none() && !n.base_allocation);
            if step == Step::Close {
                break;
            }
            if n.start_tls {
                prop_assert_eq!(o, opt::STARTTLS);
                break;
            }
            prop_assert!(t == vec![rep::ERR_TLS_REQD] || o == opt::STARTTLS, "{} {:?}", o, t);
        }
    }

    /// The key fix-up never panics on garbage.
    #[test]
    fn sec1_fixup_takes_garbage(der in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = super::strip_sec1_zero(&der);
    }

    /// The PSK file parser never panics, and what it accepts round-trips.
    #[test]
    fn psk_parser(text in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(k) = super::psk::Keys::parse(&text) {
            for (u, key) in &k.keys {
                prop_assert!(!u.is_empty() && !key.is_empty());
                prop_assert!(k.get(u.as_bytes()).is_some());
            }
        }
    }
}
