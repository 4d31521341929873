//! Authentication in nbdkit's order: `none`; then, if the server offers
//! them, public keys (every key of the ssh-agent, then the identity files
//! that exist and need no passphrase: libssh's "publickey auto"); then the
//! password if one was given and the server takes passwords. Keyboard-
//! interactive is never tried (a server cannot prompt).

use std::sync::Arc;

use russh::client::Handle;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKeyWithHashAlg};
use russh::client::AuthResult;
use russh::{MethodKind, MethodSet};

use super::{Client, Settings};
use crate::error::{Error, Result};

/// libssh's SSH_AUTH_METHOD_* bits, for the debug line.
fn method_bits(m: &MethodSet) -> (u32, String) {
    let mut bits = 0;
    let mut names = String::new();
    for k in m.iter() {
        let (b, n) = match k {
            MethodKind::None => (0x1, " none"),
            MethodKind::Password => (0x2, " password"),
            MethodKind::PublicKey => (0x4, " publickey"),
            MethodKind::HostBased => (0x8, " hostbased"),
            MethodKind::KeyboardInteractive => (0x10, " keyboard-interactive"),
            MethodKind::GssapiWithMic => (0x20, " gssapi-with-mic"),
        };
        bits |= b;
        names.push_str(n);
    }
    (bits, names)
}

fn denied_methods(r: &AuthResult) -> Option<MethodSet> {
    match r {
        AuthResult::Success => None,
        AuthResult::Failure { remaining_methods, .. } => Some(remaining_methods.clone()),
    }
}

pub(super) async fn authenticate(session: &mut Handle<Client>, s: &Settings) -> Result<()> {
    let perr = |e: russh::Error| Error::io(format!("public key authentication failed: {e}"));
    let r = session
        .authenticate_none(s.user.clone())
        .await
        .map_err(|e| Error::io(format!("authentication failed: {e}")))?;
    let Some(methods) = denied_methods(&r) else { return Ok(()) };
    let (bits, names) = method_bits(&methods);
    crate::debug!("authentication methods offered by the server [0x{bits:x}]:{names}");
    let offered = |k: MethodKind| methods.contains(&k);

    let mut tried_keys = 0;
    if offered(MethodKind::PublicKey) {
        // The agent's keys first.
        match AgentClient::connect_env().await {
            Ok(mut agent) => {
                let ids = agent.request_identities().await.unwrap_or_default();
                crate::debug!("ssh: the agent offers {} key(s)", ids.len());
                for id in ids {
                    let key = id.public_key().into_owned();
                    let hash = rsa_hash(session, key.algorithm().is_rsa()).await;
                    tried_keys += 1;
                    match session.authenticate_publickey_with(s.user.clone(), key, hash, &mut agent).await {
                        Ok(AuthResult::Success) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => crate::debug!("ssh: agent key refused: {e}"),
                    }
                }
            }
            Err(e) => crate::debug!("ssh: no ssh-agent: {e}"),
        }
        // Then the identity files.
        for path in &s.identities {
            if !path.exists() {
                continue;
            }
            let key = match russh::keys::load_secret_key(path, None) {
                Ok(k) => k,
                Err(e) => {
                    crate::debug!("ssh: cannot use identity {}: {e}", path.display());
                    continue;
                }
            };
            let hash = rsa_hash(session, key.algorithm().is_rsa()).await;
            tried_keys += 1;
            let r = session
                .authenticate_publickey(s.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(perr)?;
            if r.success() {
                crate::debug!("ssh: authenticated with {}", path.display());
                return Ok(());
            }
        }
        crate::debug!("ssh: public key authentication denied ({tried_keys} key(s) tried)");
    }

    if let Some(password) = &s.password {
        if offered(MethodKind::Password) {
            let r = session
                .authenticate_password(s.user.clone(), password.clone())
                .await
                .map_err(|e| Error::io(format!("password authentication failed: {e}")))?;
            if r.success() {
                return Ok(());
            }
            crate::debug!("ssh: password authentication denied: wrong password for user {}?", s.user);
        } else {
            crate::debug!("ssh: a password was given but the server does not accept password authentication");
        }
    } else if !offered(MethodKind::PublicKey) {
        crate::debug!("ssh: the server offers no public key authentication and no password was given");
    }
    Err(Error::io("all possible authentication methods failed"))
}

/// The hash for RSA keys: the best the server supports (SHA-1 if unknown).
async fn rsa_hash(session: &Handle<Client>, is_rsa: bool) -> Option<HashAlg> {
    if !is_rsa {
        return None;
    }
    session.best_supported_rsa_hash().await.ok().flatten().flatten()
}
