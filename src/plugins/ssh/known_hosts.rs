//! known_hosts files as OpenSSH writes them and libssh reads them: plain
//! and hashed (`|1|SALT|HASH`) host patterns, `[host]:port` entries,
//! wildcards and negation, `@revoked` and `@cert-authority` markers; and
//! libssh's verdicts (`ssh_session_is_known_server`).

use data_encoding::BASE64;

/// What the known_hosts files say about the server's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownState {
    /// An entry for this host has this key.
    Ok,
    /// An entry for this host has another key of the same type.
    Changed,
    /// Entries for this host have keys of other types only.
    Other,
    /// No entry for this host.
    Unknown,
    /// No known_hosts file was named at all (libssh cannot find one).
    NotFound,
    /// A file could not be read, or this key is revoked.
    Error(String),
}

/// The name to look up: `host`, or `[host]:port` when the port is not 22.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `*` and `?` glob matching, case-insensitive (as OpenSSH's `match_pattern`).
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) =
        (pattern.to_lowercase().chars().collect(), s.to_lowercase().chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Does one hashed pattern `|1|SALT|HASH` match `name`?
fn hashed_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('|');
    let (Some(""), Some("1"), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (BASE64.decode(salt.as_bytes()), BASE64.decode(hash.as_bytes())) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok()
}

/// Does a comma-separated host pattern list match `name`? A negated
/// pattern that matches makes the whole list fail.
pub fn hosts_match(list: &str, name: &str) -> bool {
    if list.starts_with('|') {
        return hashed_match(list, name);
    }
    let mut matched = false;
    for pat in list.split(',') {
        let (neg, pat) = match pat.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pat),
        };
        if glob(pat, name) {
            if neg {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// One usable line: host patterns, key type, key blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub revoked: bool,
    pub hosts: String,
    pub keytype: String,
    pub blob: Vec<u8>,
}

/// Parses a known_hosts file; bad lines and CA lines are skipped.
pub fn parse(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let mut first = f.next().unwrap_or("");
        let mut revoked = false;
        if first.starts_with('@') {
            match first {
                "@revoked" => revoked = true,
                _ => continue, // @cert-authority: certificates are not used
            }
            first = match f.next() {
                Some(x) => x,
                None => continue,
            };
        }
        let (Some(keytype), Some(b64)) = (f.next(), f.next()) else { continue };
        let Ok(blob) = BASE64.decode(b64.as_bytes()) else { continue };
        out.push(Entry { revoked, hosts: first.to_string(), keytype: keytype.to_string(), blob });
    }
    out
}

/// The key type a known_hosts line names for a key algorithm of the wire
/// (certificates and RSA signature variants share the plain key's lines).
fn base_type(t: &str) -> &str {
    match t {
        "rsa-sha2-256" | "rsa-sha2-512" => "ssh-rsa",
        _ => t,
    }
}

/// libssh's verdict for a server presenting key (`keytype`, `blob`) as
/// `name` (from [`lookup_name`]), over the given files' contents (`None`
/// for a file that does not exist).
pub fn verdict(files: &[Option<Result<String, String>>], name: &str, keytype: &str, blob: &[u8]) -> KnownState {
    // libssh (0.10, Debian's nbdkit): a file that does not exist holds no
    // entry, so a host is "unknown" even when neither file exists.
    if files.is_empty() {
        return KnownState::NotFound;
    }
    let mut entries = Vec::new();
    for f in files.iter().flatten() {
        match f {
            Ok(text) => entries.extend(parse(text)),
            Err(e) => return KnownState::Error(e.clone()),
        }
    }
    let mine: Vec<&Entry> = entries.iter().filter(|e| hosts_match(&e.hosts, name)).collect();
    if mine.iter().any(|e| e.revoked && e.blob == blob) {
        return KnownState::Error("the server's host key is marked as revoked".into());
    }
    let mine: Vec<&Entry> = mine.into_iter().filter(|e| !e.revoked).collect();
    if mine.is_empty() {
        return KnownState::Unknown;
    }
    if mine.iter().any(|e| e.blob == blob) {
        return KnownState::Ok;
    }
    if mine.iter().any(|e| base_type(&e.keytype) == base_type(keytype)) {
        return KnownState::Changed;
    }
    KnownState::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const K2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIA8HYbmTtKs/lJlnHJkBKFMt9JAZCr+BHX3vxd0Czrbv";

    fn hashed(name: &str, salt: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&key, name.as_bytes());
        format!("|1|{}|{}", BASE64.encode(salt), BASE64.encode(tag.as_ref()))
    }

    #[test]
    fn globbing() {
        assert!(glob("*.example.com", "a.EXAMPLE.com"));
        assert!(glob("host?", "host1"));
        assert!(!glob("host?", "host12"));
        assert!(glob("*", ""));
        assert!(glob("[127.0.0.1]:*", "[127.0.0.1]:2222"));
        assert!(hosts_match("a,b,c", "b"));
        assert!(!hosts_match("*.x,!bad.x", "bad.x"));
        assert!(hosts_match("*.x,!bad.x", "good.x"));
    }

    #[test]
    fn verdicts() {
        let b1 = BASE64.decode(K1.as_bytes()).unwrap();
        let b2 = BASE64.decode(K2.as_bytes()).unwrap();
        let name = lookup_name("127.0.0.1", 2222);
        assert_eq!(name, "[127.0.0.1]:2222");
        assert_eq!(lookup_name("h", 22), "h");
        let file = |s: String| vec![Some(Ok(s))];
        let t = "ssh-ed25519";
        assert_eq!(verdict(&file(format!("[127.0.0.1]:2222 {t} {K1}\n")), &name, t, &b1), KnownState::Ok);
        // A port-22 line does not cover another port.
        assert_eq!(verdict(&file(format!("127.0.0.1 {t} {K1}\n")), &name, t, &b1), KnownState::Unknown);
        assert_eq!(verdict(&file(format!("# c\n\n[127.0.0.1]:2222 {t} {K2} me@x\n")), &name, t, &b1),
                   KnownState::Changed);
        assert_eq!(verdict(&file(format!("[127.0.0.1]:2222 ecdsa-sha2-nistp256 {K2}\n")), &name, t, &b1),
                   KnownState::Other);
        let h = hashed(&name, b"0123456789abcdefghij");
        assert_eq!(verdict(&file(format!("{h} {t} {K1}\n")), &name, t, &b1), KnownState::Ok);
        assert_eq!(verdict(&file(format!("{h} {t} {K1}\n")), "[127.0.0.1]:2223", t, &b1), KnownState::Unknown);
        assert_eq!(verdict(&file(format!("@revoked * {t} {K1}\n[127.0.0.1]:2222 {t} {K1}\n")), &name, t, &b1),
                   KnownState::Error("the server's host key is marked as revoked".into()));
        assert_eq!(verdict(&[None, None], &name, t, &b1), KnownState::Unknown);
        assert_eq!(verdict(&[], &name, t, &b1), KnownState::NotFound);
        assert_eq!(verdict(&[None, Some(Ok(String::new()))], &name, t, &b1), KnownState::Unknown);
        // Garbage lines are skipped.
        assert_eq!(verdict(&file(format!("junk\n* {t} !!!\n* {t} {K1}\n")), &name, t, &b1), KnownState::Ok);
        assert_eq!(verdict(&file(format!("* {t} {K1}\n")), &name, t, &b2), KnownState::Changed);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
            let _ = hosts_match(&s, "host");
        }
    }
}
