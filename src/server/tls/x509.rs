//! The X.509 engine: rustls runs the handshake (certificates, client
//! certificate verification, CRLs, SSLKEYLOGFILE), then hands the
//! traffic keys over (its kTLS API) and our record layer (records.rs)
//! protects the traffic; rustls' key schedule stays to derive the keys
//! of TLS 1.3 KeyUpdates.

use std::io::{self, Write};
use std::sync::Arc;

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

use super::engine::Engine;
use super::records::{self, Cipher, Secret, Session, Version};

enum Phase {
    /// rustls, until the handshake is over.
    Handshake(Box<UnbufferedServerConnection>),
    /// Our record layer.
    Records(Box<Session>),
    /// The handshake failed.
    Failed,
}

/// An X.509 TLS session (see the module docs).
pub struct Rustls {
    phase: Phase,
    /// Bytes from the client that rustls has not consumed yet.
    input: Vec<u8>,
    /// Handshake records to send.
    out: Vec<u8>,
    /// What [`Engine::describe`] says, fixed when the handshake ends.
    about: String,
}

impl Rustls {
    /// A session for a new client (`config.enable_secret_extraction` on).
    pub fn new(config: Arc<rustls::ServerConfig>) -> io::Result<Rustls> {
        let c = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(Rustls { phase: Phase::Handshake(Box::new(c)), input: Vec::new(), out: Vec::new(), about: String::new() })
    }

    /// After a handshake error: the alert rustls queued goes to `out`.
    fn drain_alert(c: &mut UnbufferedServerConnection, out: &mut Vec<u8>) {
        for _ in 0..8 {
            match c.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let _ = encode(&mut e, out);
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }

    /// The handshake is over: our record layer takes the keys.
    fn switch(&mut self, plain: &mut Vec<u8>) -> io::Result<bool> {
        let Phase::Handshake(c) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            unreachable!("switch outside the handshake")
        };
        self.about = describe(&c);
        let (secrets, kernel) = c.dangerous_into_kernel_connection().map_err(io::Error::other)?;
        let version = match kernel.protocol_version() {
            ProtocolVersion::TLSv1_3 => Version::Tls13,
            ProtocolVersion::TLSv1_2 => Version::Tls12,
            v => return Err(io::Error::other(format!("TLS: unexpected protocol {v:?}"))),
        };
        let rx = (secrets.rx.0, secret(secrets.rx.1)?);
        let tx = (secrets.tx.0, secret(secrets.tx.1)?);
        let schedule: Option<Box<dyn records::Schedule>> = match version {
            Version::Tls13 => Some(Box::new(Keys(kernel))),
            Version::Tls12 => None,
        };
        let mut s = Box::new(Session::new(version, rx, tx, schedule, std::mem::take(&mut self.out))?);
        let rest = std::mem::take(&mut self.input);
        let closed = s.feed(&rest, plain);
        self.phase = Phase::Records(s);
        closed
    }
}

/// rustls' traffic secrets as the record layer takes them.
fn secret(s: ConnectionTrafficSecrets) -> io::Result<Secret> {
    let (cipher, key, iv) = match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20Poly1305, key, iv),
        _ => return Err(io::Error::other("TLS: unsupported cipher suite")),
    };
    let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| io::Error::other("TLS: bad IV length"))?;
    Ok(Secret { cipher, key: key.as_ref().to_vec(), iv })
}

/// TLS 1.3 KeyUpdates: rustls' key schedule derives the next secrets.
struct Keys(KernelConnection<ServerConnectionData>);

impl records::Schedule for Keys {
    fn next_rx(&mut self) -> Result<Secret, String> {
        let (_, s) = self.0.update_rx_secret().map_err(|e| e.to_string())?;
        secret(s).map_err(|e| e.to_string())
    }
    fn next_tx(&mut self) -> Result<Secret, String> {
        let (_, s) = self.0.update_tx_secret().map_err(|e| e.to_string())?;
        secret(s).map_err(|e| e.to_string())
    }
}

/// Copies one handshake record rustls made to the end of `out`.
fn encode(e: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) -> io::Result<()> {
    let at = out.len();
    out.resize(at + 4096, 0);
    let r = match e.encode(&mut out[at..]) {
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(at + required_size, 0);
            e.encode(&mut out[at..])
        }
        r => r,
    };
    match r {
        Ok(n) => {
            out.truncate(at + n);
            Ok(())
        }
        Err(err) => {
            out.truncate(at);
            Err(io::Error::other(err.to_string()))
        }
    }
}

fn describe(c: &UnbufferedServerConnection) -> String {
    let proto = c.protocol_version().map_or_else(|| "?".to_string(), |v| format!("{v:?}"));
    let suite = c.negotiated_cipher_suite().map_or_else(|| "?".to_string(), |s| format!("{:?}", s.suite()));
    let peer = match c.peer_certificates() {
        Some(certs) => format!("{} client certificate(s)", certs.len()),
        None => "no client certificate".to_string(),
    };
    format!("TLS session: {proto}, cipher suite {suite}, X.509, {peer}")
}

/// What one turn of rustls' state machine asked for.
enum Turn {
    Again,
    Wait,
    Traffic,
    Closed,
    Error(rustls::Error),
}

impl Engine for Rustls {
    fn feed(&mut self, raw: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let c = match &mut self.phase {
            Phase::Records(s) => return s.feed(raw, plain),
            Phase::Failed => return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS: the session has failed")),
            Phase::Handshake(c) => c,
        };
        self.input.extend_from_slice(raw);
        loop {
            let st = c.process_tls_records(&mut self.input);
            let discard = st.discard;
            let turn = match st.state {
                Err(e) => Turn::Error(e),
                Ok(ConnectionState::EncodeTlsData(mut e)) => match encode(&mut e, &mut self.out) {
                    Ok(()) => Turn::Again,
                    Err(e) => Turn::Error(rustls::Error::General(e.to_string())),
                },
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    // Queued in `out`, which goes out before anything else.
                    t.done();
                    Turn::Again
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut turn = Turn::Again;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => plain.extend_from_slice(rec.payload),
                            Err(e) => {
                                turn = Turn::Error(e);
                                break;
                            }
                        }
                    }
                    turn
                }
                Ok(ConnectionState::ReadEarlyData(mut r)) => {
                    // (Never: early data is not enabled.)
                    while r.next_record().is_some() {}
                    Turn::Again
                }
                Ok(ConnectionState::WriteTraffic(_)) => Turn::Traffic,
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Turn::Closed,
                Ok(_) => Turn::Wait,
            };
            self.input.drain(..discard);
            match turn {
                Turn::Again => {}
                Turn::Wait => return Ok(false),
                Turn::Closed => return Ok(true),
                // TLS 1.3 lets the server write before the client's
                // Finished: the handshake is over only after it.
                Turn::Traffic if c.is_handshaking() => return Ok(false),
                Turn::Traffic => return self.switch(plain),
                Turn::Error(e) => {
                    Rustls::drain_alert(c, &mut self.out);
                    self.phase = Phase::Failed;
                    return Err(io::Error::other(e));
                }
            }
        }
    }

    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.phase {
            Phase::Records(s) => s.encrypt(data),
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: the handshake is not over")),
        }
    }

    fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
        match &mut self.phase {
            Phase::Records(s) => s.flush_to(w),
            _ => super::engine::write_out(&mut self.out, w),
        }
    }

    fn handshaking(&self) -> bool {
        !matches!(self.phase, Phase::Records(_))
    }

    fn close(&mut self) {
        if let Phase::Records(s) = &mut self.phase {
            s.close();
        }
    }

    fn into_session(self: Box<Self>) -> io::Result<Box<Session>> {
        match self.phase {
            Phase::Records(s) => Ok(s),
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: the handshake is not over")),
        }
    }

    fn describe(&self) -> String {
        match &self.phase {
            Phase::Handshake(c) => describe(c),
            _ => self.about.clone(),
        }
    }
}
