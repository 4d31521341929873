//! Pre-shared keys (`--tls-psk=FILE`, psktool's `username:hexkey` lines).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion};

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
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The OpenSSL context of a key file: TLS 1.2 and 1.3, PSK cipher suites
/// only (with ephemeral ECDH where the client offers it), no tickets.
pub fn context(keys: &Arc<Keys>) -> Result<SslContext, String> {
    let e = |e: openssl::error::ErrorStack| format!("PSK: {e}");
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(e)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(e)?;
    b.set_cipher_list(TLS12_SUITES).map_err(e)?;
    b.set_num_tickets(0).map_err(e)?;
    b.set_options(SslOptions::NO_RENEGOTIATION);
    let keys = keys.clone();
    b.set_psk_server_callback(move |_ssl, identity, psk| {
        let key = identity.and_then(|u| keys.get(u));
        match key {
            Some(k) if k.len() <= psk.len() => {
                psk[..k.len()].copy_from_slice(k);
                Ok(k.len())
            }
            _ => {
                let who = identity.map(|u| String::from_utf8_lossy(u).into_owned()).unwrap_or_default();
                crate::debug!("PSK: unknown username \"{who}\"");
                Ok(0)
            }
        }
    });
    Ok(b.build())
}

/// TLS 1.2 PSK suites GnuTLS clients offer (AEAD first); TLS 1.3 uses
/// OpenSSL's default TLS 1.3 suites.
const TLS12_SUITES: &str = "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:\
                            ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256";

/// A PSK session for a new client.
pub fn engine(ctx: &SslContext) -> io::Result<Box<dyn Engine>> {
    let mut ssl = Ssl::new(ctx).map_err(io::Error::other)?;
    ssl.set_accept_state();
    let stream = SslStream::new(ssl, Mem::default()).map_err(io::Error::other)?;
    Ok(Box::new(OpenSsl { stream, handshaking: true }))
}

/// OpenSSL's side of a session on memory buffers: the relay moves the
/// bytes.
struct OpenSsl {
    stream: SslStream<Mem>,
    handshaking: bool,
}

/// What OpenSSL reads (fed by the relay) and writes (taken by it).
#[derive(Default)]
struct Mem {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
}

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.at..];
        if left.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.at += n;
        if self.at == self.input.len() {
            self.input.clear();
            self.at = 0;
        }
        Ok(n)
    }
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn blocked(e: &openssl::ssl::Error) -> bool {
    matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE)
}

impl Engine for OpenSsl {
    fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        self.stream.get_mut().input.extend_from_slice(raw);
        if self.handshaking {
            match self.stream.do_handshake() {
                Ok(()) => self.handshaking = false,
                Err(e) if blocked(&e) => return Ok(false),
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        loop {
            let at = plain.len();
            plain.resize(at + 64 * 1024, 0);
            match self.stream.ssl_read(&mut plain[at..]) {
                Ok(n) => plain.truncate(at + n),
                Err(e) => {
                    plain.truncate(at);
                    return match e.code() {
                        _ if blocked(&e) => Ok(false),
                        ErrorCode::ZERO_RETURN => Ok(true),
                        _ => Err(io::Error::other(e.to_string())),
                    };
                }
            }
        }
    }

    fn encrypt(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.stream.ssl_write(data).map_err(|e| io::Error::other(e.to_string()))?;
            data = &data[n..];
        }
        Ok(())
    }

    fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        let out = &mut self.stream.get_mut().output;
        if !out.is_empty() {
            let r = w.write_all(out);
            out.clear();
            r?;
        }
        Ok(())
    }

    fn handshaking(&self) -> bool {
        self.handshaking
    }

    fn close(&mut self) {
        let _ = self.stream.shutdown();
    }

    fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let suite = ssl.current_cipher().map_or("?", |c| c.name());
        format!("TLS session: {}, cipher suite {suite}, PSK", ssl.version_str())
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
