//! One TLS session as the relay sees it: bytes from the client go in,
//! plaintext comes out; plaintext goes in, records come out. The X.509
//! engine is rustls; the PSK engine (psk.rs) has the same shape.

use std::io::{self, Read, Write};
use std::sync::Arc;

/// A TLS session, driven by the relay under one lock.
pub trait Engine: Send {
    /// Takes in bytes read from the client, appending the plaintext they
    /// carried to `plain`. `Ok(true)` once the client has closed the
    /// session (close_notify). On a TLS error the alert is queued.
    fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool>;
    /// Encrypts `data` into records, queued for [`Engine::flush_to`].
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()>;
    /// Writes every queued record to `w`.
    fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()>;
    /// True until the handshake has completed.
    fn handshaking(&self) -> bool;
    /// Queues close_notify.
    fn close(&mut self);
    /// Protocol, cipher suite and peer (`-D nbdkit.tls.session=1`), one
    /// debug line per line.
    fn describe(&self) -> String;
}

/// rustls' server side.
pub struct Rustls(pub rustls::ServerConnection);

impl Rustls {
    /// A session for a new client.
    pub fn new(config: Arc<rustls::ServerConfig>) -> io::Result<Rustls> {
        let mut c = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        // The relay bounds what it queues itself (one read of the pair).
        c.set_buffer_limit(None);
        Ok(Rustls(c))
    }
}

impl Engine for Rustls {
    fn feed(&mut self, mut raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let mut closed = false;
        while !raw.is_empty() {
            self.0.read_tls(&mut raw)?;
            let state = self.0.process_new_packets().map_err(io::Error::other)?;
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let at = plain.len();
                plain.resize(at + n, 0);
                self.0.reader().read_exact(&mut plain[at..])?;
            }
            closed |= state.peer_has_closed();
        }
        Ok(closed)
    }

    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.writer().write_all(data)
    }

    fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        while self.0.wants_write() {
            self.0.write_tls(w)?;
        }
        Ok(())
    }

    fn handshaking(&self) -> bool {
        self.0.is_handshaking()
    }

    fn close(&mut self) {
        self.0.send_close_notify();
    }

    fn describe(&self) -> String {
        let c = &self.0;
        let proto = c.protocol_version().map_or_else(|| "?".to_string(), |v| format!("{v:?}"));
        let suite = c.negotiated_cipher_suite().map_or_else(|| "?".to_string(), |s| format!("{:?}", s.suite()));
        let peer = match c.peer_certificates() {
            Some(certs) => format!("{} client certificate(s)", certs.len()),
            None => "no client certificate".to_string(),
        };
        format!("TLS session: {proto}, cipher suite {suite}, X.509, {peer}")
    }
}
