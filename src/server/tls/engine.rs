//! One TLS session during its handshake: bytes from the client go in,
//! plaintext comes out; plaintext goes in, records come out. Every
//! engine runs its handshake (X.509: rustls, x509.rs; PSK: psk12.rs,
//! psk13/), then hands the traffic keys to the one record layer
//! (records.rs), which [`Engine::into_session`] gives up for the
//! connection to split into its receive and send halves (stream.rs).

use std::io::{self, Write};

use super::records::Session;

/// A TLS session, driven by the connection's negotiation task.
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
    /// The record layer, once the handshake has completed.
    fn into_session(self: Box<Self>) -> io::Result<Box<Session>>;
    /// Protocol, cipher suite and peer (`-D nbdkit.tls.session=1`), one
    /// debug line per line.
    fn describe(&self) -> String;
}

/// rustls for the handshake, then our record layer (x509.rs).
pub use super::x509::Rustls;

/// Writes out the records queued in `out` and empties it, even when the
/// write fails (a session whose write failed is over).
pub fn write_out(out: &mut Vec<u8>, w: &mut dyn Write) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = w.write_all(out);
    out.clear();
    r
}
