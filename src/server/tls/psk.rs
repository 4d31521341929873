//! Pre-shared keys (`--tls-psk=FILE`, psktool's `username:hexkey` lines).

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::engine::Engine;

/// The longest line accepted in a PSK file (GnuTLS reads usernames up
/// to 128 bytes and keys up to 64 bytes, 128 hex digits).
const MAX_LINE: usize = 1024;

/// The keys of a PSK file.
#[derive(Debug, Default)]
pub struct Keys {
    /// (username, key) in file order.
    pub keys: Vec<(String, Vec<u8>)>,
}

impl Keys {
    /// Reads and checks the file; the error is the line to print.
    pub fn load(path: &Path) -> Result<Keys, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {}", path.display(), io_msg(&e)))?;
        Keys::parse(&text).map_err(|e| format!("nbdkit: {}: {e}", path.display()))
    }

    /// Parses `username:hexkey` lines (empty lines are skipped).
    pub fn parse(text: &[u8]) -> Result<Keys, String> {
        let mut keys = Vec::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if line.len() > MAX_LINE {
                return Err(format!("line {n}: line too long"));
            }
            let line = std::str::from_utf8(line).map_err(|_| format!("line {n}: not UTF-8"))?;
            let Some((user, hex)) = line.split_once(':') else {
                return Err(format!("line {n}: expecting username:hexkey"));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty username"));
            }
            let key = unhex(hex).ok_or_else(|| format!("line {n}: key is not an even number of hex digits"))?;
            if key.is_empty() {
                return Err(format!("line {n}: empty key"));
            }
            keys.push((user.to_string(), key));
        }
        if keys.is_empty() {
            return Err("no keys found".to_string());
        }
        Ok(Keys { keys })
    }

    /// The key of `user`, if the file has one.
    pub fn get(&self, user: &[u8]) -> Option<&[u8]> {
        self.keys.iter().find(|(u, _)| u.as_bytes() == user).map(|(_, k)| k.as_slice())
    }
}

/// A PSK engine asked for traffic-phase work before its session exists.
pub(super) fn no_session() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "PSK: no session")
}

fn io_msg(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "No such file or directory".to_string(),
        io::ErrorKind::PermissionDenied => "Permission denied".to_string(),
        _ => e.to_string(),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A PSK session for a new client: TLS 1.3 (psk13) or 1.2 (psk12), as
/// its ClientHello asks.
pub fn engine(keys: &Arc<Keys>) -> io::Result<Box<dyn Engine>> {
    Ok(Box::new(Psk { keys: keys.clone(), raw: Vec::new(), chosen: Chosen::Waiting }))
}

/// Which TLS version a client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// TLS 1.3 (a client offering it with a pre_shared_key extension,
    /// and any input that is not a well-formed ClientHello: the TLS 1.3
    /// engine sends the alert).
    Tls13,
    /// TLS 1.2; `true` if the client offered TLS 1.3 too (without a
    /// pre_shared_key): the ServerHello then marks the downgrade.
    Tls12(bool),
}

/// The version for the client that sent `raw` (its first bytes), once
/// they hold its whole first handshake message; None until then. The
/// records are not consumed: the chosen engine is fed all of `raw`.
pub fn choose(raw: &[u8]) -> Option<Version> {
    use super::psk13::{hello, MAX_PLAIN};
    let mut hs = Vec::new();
    let mut at = 0;
    loop {
        let rest = &raw[at..];
        if rest.len() < 5 {
            return None;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest[0] != 22 || rest[1] != 3 || len == 0 || len > MAX_PLAIN {
            return Some(Version::Tls13);
        }
        if rest.len() < 5 + len {
            return None;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        at += 5 + len;
        if hs.len() >= 4 {
            let n = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if n > 64 * 1024 {
                return Some(Version::Tls13);
            }
            if hs.len() >= 4 + n {
                return Some(match hello::parse(&hs[..4 + n]) {
                    Ok(h) if h.wants_tls13() => Version::Tls13,
                    Ok(h) => Version::Tls12(h.offers_tls13()),
                    Err(_) => Version::Tls13,
                });
            }
        }
    }
}

#[allow(clippy::large_enum_variant)] // (one per connection, never moved after the choice)
enum Chosen {
    Waiting,
    V12(Box<super::psk12::Psk12>),
    V13(Box<super::psk13::Psk13>),
}

/// The PSK engine: waits for the ClientHello, then hands everything to
/// the TLS 1.3 or 1.2 engine.
struct Psk {
    keys: Arc<Keys>,
    /// What came before the choice.
    raw: Vec<u8>,
    chosen: Chosen,
}

impl Psk {
    fn inner(&mut self) -> Option<&mut dyn Engine> {
        match &mut self.chosen {
            Chosen::Waiting => None,
            Chosen::V12(e) => Some(&mut **e as &mut dyn Engine),
            Chosen::V13(e) => Some(&mut **e as &mut dyn Engine),
        }
    }
}

impl Engine for Psk {
    fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        if let Some(e) = self.inner() {
            return e.feed(raw, plain);
        }
        self.raw.extend_from_slice(raw);
        let Some(v) = choose(&self.raw) else { return Ok(false) };
        log::debug!(target: "tls::psk", "PSK: the client gets {}", if v == Version::Tls13 { "TLS 1.3" } else { "TLS 1.2" });
        self.chosen = match v {
            Version::Tls13 => Chosen::V13(Box::new(super::psk13::Psk13::new(self.keys.clone()))),
            Version::Tls12(downgrade) => {
                let mut e = super::psk12::Psk12::new(self.keys.clone());
                e.downgrade = downgrade;
                Chosen::V12(Box::new(e))
            }
        };
        let raw = std::mem::take(&mut self.raw);
        match self.inner() {
            Some(e) => e.feed(&raw, plain),
            None => Ok(false),
        }
    }

    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match self.inner() {
            Some(e) => e.encrypt(data),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "PSK: no session")),
        }
    }

    fn flush_to(&mut self, w: &mut dyn std::io::Write) -> io::Result<()> {
        match self.inner() {
            Some(e) => e.flush_to(w),
            None => Ok(()),
        }
    }

    fn handshaking(&self) -> bool {
        match &self.chosen {
            Chosen::Waiting => true,
            Chosen::V12(e) => e.handshaking(),
            Chosen::V13(e) => e.handshaking(),
        }
    }

    fn close(&mut self) {
        if let Some(e) = self.inner() {
            e.close();
        }
    }

    fn into_session(self: Box<Self>) -> io::Result<Box<super::records::Session>> {
        match self.chosen {
            Chosen::Waiting => Err(io::Error::new(io::ErrorKind::NotConnected, "PSK: no session")),
            Chosen::V12(e) => e.into_session(),
            Chosen::V13(e) => e.into_session(),
        }
    }

    fn describe(&self) -> String {
        match &self.chosen {
            Chosen::Waiting => "TLS session: none".to_string(),
            Chosen::V12(e) => e.describe(),
            Chosen::V13(e) => e.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_lines() {
        let k = Keys::parse(b"alice:0a1B\n\nbob:ff\r\n").unwrap();
        assert_eq!(k.get(b"alice"), Some(&[0x0a, 0x1b][..]));
        assert_eq!(k.get(b"bob"), Some(&[0xff][..]));
        assert_eq!(k.get(b"carol"), None);
        for (bad, why) in [
            (&b"alice:zz\n"[..], "line 1: key is not"),
            (b"\nalice\n", "line 2: expecting"),
            (b":00\n", "line 1: empty username"),
            (b"alice:abc\n", "line 1: key is not"),
            (b"", "no keys found"),
        ] {
            let e = Keys::parse(bad).unwrap_err();
            assert!(e.starts_with(why), "{e}");
        }
        let long = format!("u:{}", "00".repeat(600));
        assert!(Keys::parse(long.as_bytes()).unwrap_err().contains("too long"));
    }
}
