//! rustls client configuration from `cainfo`, `capath`, `sslverify`,
//! `ssl-version`, `ssl-cipher-list` and `tls13-ciphers`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedCipherSuite};

use super::config::{Config, TlsMax, TlsMin};
use crate::error::{Error, Result};

/// Where libcurl on Debian finds its CA bundle when `cainfo` is not given.
const DEFAULT_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// OpenSSL and IANA names of the suites rustls (ring) offers.
fn suite_by_name(name: &str) -> Option<SupportedCipherSuite> {
    use ring::cipher_suite as s;
    Some(match name {
        "TLS_AES_128_GCM_SHA256" => s::TLS13_AES_128_GCM_SHA256,
        "TLS_AES_256_GCM_SHA384" => s::TLS13_AES_256_GCM_SHA384,
        "TLS_CHACHA20_POLY1305_SHA256" => s::TLS13_CHACHA20_POLY1305_SHA256,
        "ECDHE-ECDSA-AES128-GCM-SHA256" | "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            s::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-ECDSA-AES256-GCM-SHA384" | "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            s::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-ECDSA-CHACHA20-POLY1305" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            s::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "ECDHE-RSA-AES128-GCM-SHA256" | "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
            s::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-RSA-AES256-GCM-SHA384" | "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
            s::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-RSA-CHACHA20-POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            s::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// Suites named in an OpenSSL-style list (`:`, `,` or space separated);
/// unknown names are skipped as OpenSSL does, but none known is an error.
fn suites(key: &str, list: &str, tls13: bool) -> Result<Vec<SupportedCipherSuite>> {
    let v: Vec<_> = list
        .split([':', ',', ' '])
        .filter_map(suite_by_name)
        .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)) == tls13)
        .collect();
    if v.is_empty() {
        return Err(Error::invalid(format!("{key}: no cipher in '{list}' is supported by the TLS library (rustls)")));
    }
    Ok(v)
}

fn load_certs(store: &mut RootCertStore, file: &Path) -> Result<usize> {
    let mut n = 0;
    let it = CertificateDer::pem_file_iter(file)
        .map_err(|e| Error::invalid(format!("cannot read CA certificates from {}: {e}", file.display())))?;
    for c in it.flatten() {
        if store.add(c).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// The root store for `cainfo`/`capath` (or the system bundle).
fn roots(cainfo: Option<&str>, capath: Option<&str>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match cainfo {
        Some("") => {}
        Some(f) if load_certs(&mut store, Path::new(f))? == 0 => {
            return Err(Error::invalid(format!("cainfo: no certificate found in {f}")));
        }
        Some(_) => {}
        None if capath.is_none() && Path::new(DEFAULT_BUNDLE).exists() => {
            load_certs(&mut store, Path::new(DEFAULT_BUNDLE))?;
        }
        None => {}
    }
    if let Some(dir) = capath {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::os(format!("capath: {dir}"), e))?;
        for e in rd.flatten() {
            if e.path().is_file() {
                let _ = load_certs(&mut store, &e.path());
            }
        }
    }
    Ok(store)
}

#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8],
                          _: UnixTime) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct)
                              -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct)
                              -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration for the origin (`proxy == false`) or the proxy.
pub fn client_config(cfg: &Config, proxy: bool) -> Result<Arc<ClientConfig>> {
    #[allow(deprecated)] // the same provider as the server's TLS (no post-quantum kx)
    let mut provider = ring::default_provider();
    let mut list: Vec<SupportedCipherSuite> = Vec::new();
    let t13 = match &cfg.tls13_ciphers {
        Some(l) => suites("tls13-ciphers", l, true)?,
        None => provider.cipher_suites.iter().copied().filter(|s| matches!(s, SupportedCipherSuite::Tls13(_))).collect(),
    };
    let t12 = match &cfg.ssl_cipher_list {
        Some(l) => suites("ssl-cipher-list", l, false)?,
        None => provider.cipher_suites.iter().copied().filter(|s| matches!(s, SupportedCipherSuite::Tls12(_))).collect(),
    };
    list.extend(t13);
    list.extend(t12);
    provider.cipher_suites = list;
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.ssl_version {
        (TlsMin::Tls13, _) => &[&rustls::version::TLS13],
        (TlsMin::Default, TlsMax::Tls12) => &[&rustls::version::TLS12],
        (TlsMin::Default, TlsMax::Default) => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
    let mut config = if cfg.sslverify {
        let (ca, cp) = if proxy {
            (cfg.proxy_cainfo.as_deref(), cfg.proxy_capath.as_deref())
        } else {
            (cfg.cainfo.as_deref(), cfg.capath.as_deref())
        };
        builder.with_root_certificates(roots(ca, cp)?).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_lists() {
        assert_eq!(suites("k", "TLS_AES_128_GCM_SHA256:NOPE", true).unwrap().len(), 1);
        assert!(suites("k", "NOPE", true).is_err());
        assert_eq!(suites("k", "ECDHE-RSA-AES128-GCM-SHA256,ECDHE-RSA-AES256-GCM-SHA384", false).unwrap().len(), 2);
        assert!(suites("k", "TLS_AES_128_GCM_SHA256", false).is_err());
    }
}
