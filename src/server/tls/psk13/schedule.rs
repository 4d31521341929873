//! The TLS 1.3 key schedule (RFC 8446 §7.1), the cipher suites and the
//! record protection of one direction (§5.2, §5.3), on *ring*.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::digest;
use ring::hmac;
use zeroize::Zeroizing;

use crate::server::tls::records;

/// A secret of the key schedule, wiped when dropped.
pub type Secret = Zeroizing<Vec<u8>>;

/// A TLS 1.3 cipher suite.
#[derive(Debug)]
pub struct Suite {
    /// The IANA number.
    pub id: u16,
    /// Its RFC 8446 name.
    pub name: &'static str,
    /// GnuTLS' short name of the cipher (`AES-128-GCM`…).
    pub cipher: &'static str,
    /// The AEAD.
    pub aead: &'static aead::Algorithm,
    /// The hash of the key schedule and transcript.
    pub hash: &'static digest::Algorithm,
}

/// The suites, in the server's order of preference.
pub static SUITES: [Suite; 3] = [
    Suite { id: 0x1301, name: "TLS_AES_128_GCM_SHA256", cipher: "AES-128-GCM", aead: &aead::AES_128_GCM, hash: &digest::SHA256 },
    Suite { id: 0x1302, name: "TLS_AES_256_GCM_SHA384", cipher: "AES-256-GCM", aead: &aead::AES_256_GCM, hash: &digest::SHA384 },
    Suite { id: 0x1303, name: "TLS_CHACHA20_POLY1305_SHA256", cipher: "CHACHA20-POLY1305", aead: &aead::CHACHA20_POLY1305, hash: &digest::SHA256 },
];

impl Suite {
    /// The HMAC of the suite's hash.
    pub fn hmac(&self) -> hmac::Algorithm {
        if self.hash.output_len() == 48 {
            hmac::HMAC_SHA384
        } else {
            hmac::HMAC_SHA256
        }
    }

    /// The hash's output length.
    pub fn hash_len(&self) -> usize {
        self.hash.output_len()
    }

    /// HKDF-Extract(salt, IKM); an empty salt is the hash length of zeros.
    pub fn extract(&self, salt: &[u8], ikm: &[u8]) -> Secret {
        let zeros = vec![0u8; self.hash_len()];
        let salt = if salt.is_empty() { &zeros[..] } else { salt };
        let key = hmac::Key::new(self.hmac(), salt);
        Zeroizing::new(hmac::sign(&key, ikm).as_ref().to_vec())
    }

    /// HKDF-Expand-Label(secret, label, context, len).
    pub fn expand_label(&self, secret: &[u8], label: &[u8], context: &[u8], len: usize) -> Secret {
        let mut info = Vec::with_capacity(4 + 6 + label.len() + context.len());
        info.extend_from_slice(&(len as u16).to_be_bytes());
        info.push((6 + label.len()) as u8);
        info.extend_from_slice(b"tls13 ");
        info.extend_from_slice(label);
        info.push(context.len() as u8);
        info.extend_from_slice(context);
        // HKDF-Expand (RFC 5869 §2.3).
        let key = hmac::Key::new(self.hmac(), secret);
        let mut out = Zeroizing::new(Vec::with_capacity(len + self.hash_len()));
        let mut t = Zeroizing::new(Vec::new());
        let mut i = 1u8;
        while out.len() < len {
            let mut c = hmac::Context::with_key(&key);
            c.update(&t);
            c.update(&info);
            c.update(&[i]);
            t = Zeroizing::new(c.sign().as_ref().to_vec());
            out.extend_from_slice(&t);
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// Derive-Secret(secret, label, messages), with the messages' hash.
    pub fn derive(&self, secret: &[u8], label: &[u8], hash: &[u8]) -> Secret {
        self.expand_label(secret, label, hash, self.hash_len())
    }

    /// The hash of nothing (for the "derived" and "ext binder" secrets).
    pub fn empty_hash(&self) -> digest::Digest {
        digest::digest(self.hash, b"")
    }

    /// The Finished MAC key of a traffic secret.
    pub fn finished_key(&self, secret: &[u8]) -> hmac::Key {
        hmac::Key::new(self.hmac(), &self.expand_label(secret, b"finished", b"", self.hash_len()))
    }
}

/// One direction's protection: the AEAD key, the IV, the sequence number,
/// and the traffic secret (for KeyUpdate).
pub struct Dir {
    key: LessSafeKey,
    iv: Zeroizing<[u8; 12]>,
    /// Records protected with this key so far.
    pub seq: u64,
    /// The traffic secret the key came from.
    pub secret: Secret,
    suite: &'static Suite,
}

/// The tag length of every suite.
pub const TAG: usize = 16;

impl Dir {
    /// The key and IV of `secret` (RFC 8446 §7.3).
    pub fn new(suite: &'static Suite, secret: Secret) -> Option<Dir> {
        let k = suite.expand_label(&secret, b"key", b"", suite.aead.key_len());
        let key = LessSafeKey::new(UnboundKey::new(suite.aead, &k).ok()?);
        let mut iv = Zeroizing::new([0u8; 12]);
        iv.copy_from_slice(&suite.expand_label(&secret, b"iv", b"", 12));
        Some(Dir { key, iv, seq: 0, secret, suite })
    }

    /// The next generation of this direction (KeyUpdate, §7.2).
    pub fn next(&self) -> Option<Dir> {
        let s = self.suite.expand_label(&self.secret, b"traffic upd", b"", self.suite.hash_len());
        Dir::new(self.suite, s)
    }

    fn nonce(&self) -> Nonce {
        let mut n = *self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// Appends a protected record of inner type `typ` carrying `body` to
    /// `out` (no padding).
    pub fn seal(&mut self, out: &mut Vec<u8>, typ: u8, body: &[u8]) -> Result<(), ring::error::Unspecified> {
        let len = body.len() + 1 + TAG;
        let hdr = [23, 3, 3, (len >> 8) as u8, len as u8];
        out.extend_from_slice(&hdr);
        let at = out.len();
        out.extend_from_slice(body);
        out.push(typ);
        let tag = self.key.seal_in_place_separate_tag(self.nonce(), Aad::from(hdr), &mut out[at..])?;
        out.extend_from_slice(tag.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Opens a protected record in place (`hdr` its 5-byte header): the
    /// inner content type and the content's length in `body`, padding
    /// removed. `Err(true)`: the record does not authenticate;
    /// `Err(false)`: it has no content type (all zeros).
    pub fn open(&mut self, hdr: &[u8], body: &mut [u8]) -> Result<(u8, usize), bool> {
        let aad = Aad::from(<[u8; 5]>::try_from(hdr).map_err(|_| true)?);
        let plain = self.key.open_in_place(self.nonce(), aad, body).map_err(|_| true)?;
        self.seq += 1;
        let end = plain.iter().rposition(|&b| b != 0).ok_or(false)?;
        Ok((plain[end], end))
    }
}

/// The record layer's keys for a traffic secret (RFC 8446 §7.3).
pub fn record_keys(suite: &'static Suite, secret: &[u8]) -> Option<records::Secret> {
    let cipher = match suite.id {
        0x1301 => records::Cipher::Aes128Gcm,
        0x1302 => records::Cipher::Aes256Gcm,
        0x1303 => records::Cipher::Chacha20Poly1305,
        _ => return None,
    };
    let key = suite.expand_label(secret, b"key", b"", suite.aead.key_len()).to_vec();
    let mut iv = [0u8; 12];
    iv.copy_from_slice(&suite.expand_label(secret, b"iv", b"", 12));
    Some(records::Secret { cipher, key, iv })
}

/// The application traffic secrets, for the record layer's KeyUpdates
/// (RFC 8446 §7.2).
pub struct Updates {
    /// The suite.
    pub suite: &'static Suite,
    /// The client's current traffic secret.
    pub client: Secret,
    /// The server's.
    pub server: Secret,
}

impl Updates {
    fn next(suite: &'static Suite, s: &mut Secret) -> Result<records::Secret, String> {
        *s = suite.expand_label(s, b"traffic upd", b"", suite.hash_len());
        record_keys(suite, s).ok_or_else(|| "no keys".to_string())
    }
}

impl records::Schedule for Updates {
    fn next_rx(&mut self) -> Result<records::Secret, String> {
        Updates::next(self.suite, &mut self.client)
    }
    fn next_tx(&mut self) -> Result<records::Secret, String> {
        Updates::next(self.suite, &mut self.server)
    }
}
