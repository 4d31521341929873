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

/// A PSK session for a new client (psk12.rs).
pub fn engine(keys: &Arc<Keys>) -> io::Result<Box<dyn Engine>> {
    Ok(Box::new(super::psk12::Psk12::new(keys.clone())))
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
