//! TLS: loading the certificates (or the PSK file) at start-up as nbdkit
//! does, and upgrading a connection after NBD_OPT_STARTTLS.
//!
//! The handshake runs on the connection's async streams, under the
//! handshake timeout, and the rest of the negotiation goes through the
//! session (stream.rs); the transmission phase's workers read and write
//! through it with blocking streams in place of the socket.

/// The [`engine::Engine`] methods both PSK engines implement alike: the
/// handshake's records queue in `self.out`, then `self.session` (records.rs)
/// takes over.
macro_rules! psk_session_methods {
    () => {
        fn flush_to(&mut self, w: &mut dyn Write) -> io::Result<()> {
            match &mut self.session {
                Some(s) => s.flush_to(w),
                None => crate::server::tls::engine::write_out(&mut self.out, w),
            }
        }

        fn handshaking(&self) -> bool {
            self.session.is_none()
        }

        fn close(&mut self) {
            if let Some(s) = &mut self.session {
                s.close();
            }
        }

        fn into_session(self: Box<Self>) -> io::Result<Box<Session>> {
            self.session.ok_or_else(no_session)
        }
    };
}

pub mod engine;
pub mod psk;
mod psk12;
pub mod psk13;
pub mod records;
pub mod stream;
#[cfg(test)]
mod tests;
mod x509;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::cli::{Config, TlsMode};

pub use stream::{upgrade, Link};

/// What a connection upgrades with.
pub enum Kind {
    /// X.509 certificates (rustls).
    X509(Arc<rustls::ServerConfig>),
    /// Pre-shared keys.
    Psk(Arc<psk::Keys>),
}

/// The server's TLS setup, when TLS is on or required.
pub struct Tls {
    /// On (1) or required (2).
    pub required: bool,
    /// How connections upgrade.
    pub kind: Kind,
}

impl Tls {
    /// A session for a new client.
    pub fn engine(&self) -> std::io::Result<Box<dyn engine::Engine>> {
        match &self.kind {
            Kind::X509(c) => Ok(Box::new(engine::Rustls::new(c.clone())?)),
            Kind::Psk(k) => psk::engine(k),
        }
    }
}

/// Loading failed; the reason has been printed: exit with status 1.
#[derive(Debug)]
pub struct Reported;

/// Loads certificates or the PSK file as `cfg` asks (nbdkit's
/// `crypto_init`). `Ok(None)`: TLS is off.
pub fn load(cfg: &Config) -> Result<Option<Arc<Tls>>, Reported> {
    // Without --tls nbdkit tries (tls=on) and stays quiet if it cannot.
    let mode = if cfg.tls_on_cli { cfg.tls } else { TlsMode::On };
    if mode == TlsMode::Off {
        crate::debug!("TLS disabled: --tls=off");
        return Ok(None);
    }
    let required = mode == TlsMode::Require;
    let (kind, what) = if let Some(file) = &cfg.tls_psk {
        match psk::Keys::load(file) {
            Ok(k) => (Kind::Psk(Arc::new(k)), "Pre-Shared Keys (PSK)"),
            Err(msg) => {
                eprintln!("{msg}");
                return Err(Reported);
            }
        }
    } else {
        let Some(dir) = find_certificates(cfg.tls_certificates.as_deref()) else {
            if required {
                eprint!(
                    "nbdkit: --tls=require but could not load TLS certificates.\n\
                     Try setting ‘--tls-certificates=/path/to/certificates’ or read\n\
                     the \"TLS\" section in nbdkit(1).\n"
                );
                return Err(Reported);
            }
            if cfg.tls_on_cli {
                eprint!(
                    "nbdkit: warning: --tls=on but could not load TLS certificates.\n\
                     TLS will be disabled and TLS connections will be rejected.\n\
                     Try setting ‘--tls-certificates=/path/to/certificates’ or read\n\
                     the \"TLS\" section in nbdkit(1).\n"
                );
            }
            crate::debug!("TLS disabled: could not load TLS certificates");
            return Ok(None);
        };
        match x509_config(&dir, cfg.tls_verify_peer) {
            Ok(c) => {
                crate::debug!("successfully loaded TLS certificates from {}", dir.display());
                (Kind::X509(Arc::new(c)), "X.509 certificates")
            }
            Err(msg) => {
                eprintln!("nbdkit: TLS error: {msg}");
                return Err(Reported);
            }
        }
    };
    crate::debug!("TLS enabled using: {what}");
    Ok(Some(Arc::new(Tls { required, kind })))
}

/// The files a certificates directory must have.
const REQUIRED: [&str; 3] = ["ca-cert.pem", "server-cert.pem", "server-key.pem"];

/// The directory given, or the first default one, if it has all three
/// files (nbdkit's search: root `/etc/pki/nbdkit`; others
/// `$HOME/.pki/nbdkit`, then `$HOME/.config/pki/nbdkit`).
fn find_certificates(given: Option<&Path>) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(d) => vec![d.to_path_buf()],
        None if is_root() => vec![PathBuf::from("/etc/pki/nbdkit")],
        None => match std::env::var_os("HOME") {
            Some(h) => vec![Path::new(&h).join(".pki/nbdkit"), Path::new(&h).join(".config/pki/nbdkit")],
            None => vec![],
        },
    };
    candidates.into_iter().find(|d| REQUIRED.iter().all(|f| readable(&d.join(f))))
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[allow(unsafe_code)]
fn readable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return false };
    // SAFETY: access(2) reads a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::R_OK) == 0 }
}

/// The crypto provider: *ring*, built from source into the static binary,
/// with AES-128-GCM first (the server's choice, not the client's: GnuTLS
/// clients list AES-256-GCM first, which costs a third more CPU per byte
/// for no practical gain; ChaCha20 stays for clients without AES-NI).
#[allow(deprecated)] // (ring has no post-quantum key exchange; X25519 and the NIST curves are what GnuTLS clients offer)
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = format!("{:?}", s.suite());
        (if name.contains("AES_128_GCM") { 0 } else if name.contains("AES_256_GCM") { 1 } else { 2 }, s.version().version != rustls::ProtocolVersion::TLSv1_3)
    };
    p.cipher_suites.sort_by_key(|s| rank(s));
    Arc::new(p)
}

/// The rustls server configuration from a certificates directory: TLS 1.2
/// and 1.3, the server's chain and key, client certificates checked
/// against the CA (and CRL) with `--tls-verify-peer`, `SSLKEYLOGFILE`.
pub fn x509_config(dir: &Path, verify_peer: bool) -> Result<rustls::ServerConfig, String> {
    let (cert, key) = (dir.join("server-cert.pem"), dir.join("server-key.pem"));
    let what = format!("loading server certificate and key ({}, {})", cert.display(), key.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("{what}: {}: {}", cert.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!("{what}: {}: no certificate found", cert.display()));
    }
    let mut private = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{what}: {}: {}", key.display(), pem_error(e)))?;
    if let PrivateKeyDer::Sec1(k) = &private {
        if let Some(fixed) = strip_sec1_zero(k.secret_sec1_der()) {
            private = PrivateKeyDer::Sec1(fixed.into());
        }
    }
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = if verify_peer {
        let ca = dir.join("ca-cert.pem");
        let mut roots = rustls::RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("loading CA certificate {}: {}", ca.display(), pem_error(e)))?;
        for c in certs {
            roots.add(c).map_err(|e| format!("loading CA certificate {}: {e}", ca.display()))?;
        }
        let crl = dir.join("ca-crl.pem");
        let crls: Vec<CertificateRevocationListDer<'static>> = if crl.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("loading CRL {}: {}", crl.display(), pem_error(e)))?
        } else {
            Vec::new()
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .build()
            .map_err(|e| format!("loading CA certificate {}: {e}", ca.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|e| format!("{what}: {e}"))?;
    // Like GnuTLS: keys are logged to $SSLKEYLOGFILE when it is set.
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    // Session tickets would be of no use: nbd clients do not resume.
    config.send_tls13_tickets = 0;
    config.ignore_client_order = true;
    // The traffic keys go to our record layer once the handshake is over
    // (x509.rs, records.rs).
    config.enable_secret_extraction = true;
    Ok(config)
}

/// GnuTLS (certtool) writes an EC private key with a leading zero byte
/// when its top bit is set (33 bytes for P-256, 49 for P-384); *ring*
/// wants exactly the curve's size. Returns the key without it, or None if
/// it has none.
fn strip_sec1_zero(der: &[u8]) -> Option<Vec<u8>> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&l, rest) = rest.split_first()?;
        let (len, rest) = match l {
            0..=0x7f => (l as usize, rest),
            0x81 => (*rest.first()? as usize, rest.get(1..)?),
            0x82 => (u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize, rest.get(2..)?),
            _ => return None,
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (0x30, body, _) = tlv(der)? else { return None };
    let (0x02, [1], rest) = tlv(body)? else { return None };
    let (0x04, key, tail) = tlv(rest)? else { return None };
    if !matches!(key.len(), 33 | 49) || key[0] != 0 {
        return None;
    }
    let mut inner = vec![0x02, 0x01, 0x01, 0x04, (key.len() - 1) as u8];
    inner.extend_from_slice(&key[1..]);
    inner.extend_from_slice(tail);
    let mut out = vec![0x30];
    match inner.len() {
        n @ 0..=0x7f => out.push(n as u8),
        n @ 0x80..=0xff => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(&inner);
    Some(out)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no PEM section of the right kind found".to_string(),
        e => format!("malformed PEM: {e:?}"),
    }
}

static TLS: std::sync::OnceLock<Option<Arc<Tls>>> = std::sync::OnceLock::new();

/// Sets the server's TLS setup (once, at start-up).
pub fn set(t: Option<Arc<Tls>>) {
    let _ = TLS.set(t);
}

/// The server's TLS setup; None when TLS is off.
pub fn get() -> Option<&'static Tls> {
    TLS.get().and_then(|t| t.as_deref())
}
