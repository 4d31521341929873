//! The NBD URI of this server (`--print-uri`, `$uri` in `--run`) and
//! nbdkit's quoting rules (nbdkit 1.44 `server/uri.c`).

use crate::cli::{Config, TlsMode};

/// uri-quote: keep `[A-Za-z0-9._~/-]`, else `%XX` uppercase hex.
pub fn uri_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._~/-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// shell-quote: bare if non-empty and only `[A-Za-z0-9.-_=,:/]`, else in
/// double quotes with `$`, backquote, backslash and `"` escaped.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || ".-_=,:/".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_string();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if "$`\\\"".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The server's URI; `None` in `-s` mode and under socket activation. `unix_path` is the socket
/// actually bound (for `-U -`, the private one).
pub fn uri(cfg: &Config, unix_path: Option<&str>) -> Option<String> {
    if cfg.single || cfg.socket_activation > 0 {
        return None;
    }
    let tls = cfg.tls == TlsMode::Require;
    let export = cfg.export_name.as_deref().filter(|e| !e.is_empty());
    let mut u = String::new();
    let mut query = Vec::new();
    if cfg.vsock {
        // CID 1 is VMADDR_CID_LOCAL; the port only if -p was given.
        u.push_str(if tls { "nbds+vsock://1" } else { "nbd+vsock://1" });
        if let Some(p) = &cfg.port {
            u.push(':');
            u.push_str(p);
        }
        if let Some(e) = export {
            u.push('/');
            u.push_str(&uri_quote(e));
        }
    } else if let Some(path) = unix_path {
        u.push_str(if tls { "nbds+unix://" } else { "nbd+unix://" });
        if let Some(e) = export {
            u.push('/');
            u.push_str(&uri_quote(e));
        }
        query.push(format!("socket={}", uri_quote(path)));
    } else {
        u.push_str(if tls { "nbds://localhost" } else { "nbd://localhost" });
        if let Some(p) = &cfg.port {
            u.push(':');
            u.push_str(p);
        }
        if let Some(e) = export {
            u.push('/');
            u.push_str(&uri_quote(e));
        }
    }
    if tls {
        if let Some(d) = &cfg.tls_certificates {
            query.push(format!("tls-certificates={}", uri_quote(&d.to_string_lossy())));
        } else if let Some(f) = &cfg.tls_psk {
            query.push(format!("tls-psk-file={}", uri_quote(&f.to_string_lossy())));
        }
    }
    if !query.is_empty() {
        u.push('?');
        u.push_str(&query.join("&"));
    }
    Some(u)
}

/// What `--print-uri` prints.
pub fn print_uri_text(uri: &str) -> String {
    let q = shell_quote(uri);
    format!("{uri}\nShell-quoted URI: {q}\nCommand to query the NBD endpoint:\n  nbdinfo {q}\n")
}

/// The shell prelude `--run` puts before the command (nbdkit 1.44 order).
pub fn run_prelude(cfg: &Config, uri: Option<&str>, unix_path: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("uri={}\n", uri.map(shell_quote).unwrap_or_default()));
    s.push_str("nbd=\"$uri\"\n");
    s.push_str(&format!("exportname={}\n", cfg.export_name.as_deref().map(shell_quote).unwrap_or_default()));
    s.push_str(&format!("port={}\n", cfg.port.as_deref().map(shell_quote).unwrap_or_default()));
    s.push_str(&format!("unixsocket={}\n", unix_path.map(shell_quote).unwrap_or_default()));
    match cfg.tls {
        TlsMode::On => s.push_str("tls=1\n"),
        TlsMode::Require => s.push_str("tls=2\n"),
        TlsMode::Off => {}
    }
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| shell_quote(&p.to_string_lossy())).unwrap_or_default();
    s.push_str(&format!("tls_certificates={}\n", path(&cfg.tls_certificates)));
    s.push_str(&format!("tls_psk={}\n", path(&cfg.tls_psk)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(uri_quote("a b/c"), "a%20b/c");
        assert_eq!(shell_quote("nbd://localhost"), "nbd://localhost");
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("a$b\"c"), "\"a\\$b\\\"c\"");
        assert_eq!(shell_quote("nbd+unix://?socket=/x"), "\"nbd+unix://?socket=/x\"");
    }

    #[test]
    fn uris() {
        let mut cfg = Config::default();
        assert_eq!(uri(&cfg, Some("/tmp/s")).unwrap(), "nbd+unix://?socket=/tmp/s");
        cfg.export_name = Some("a b".into());
        assert_eq!(uri(&cfg, Some("/tmp/s")).unwrap(), "nbd+unix:///a%20b?socket=/tmp/s");
        assert_eq!(uri(&cfg, None).unwrap(), "nbd://localhost/a%20b");
        cfg.port = Some("10810".into());
        cfg.export_name = None;
        assert_eq!(uri(&cfg, None).unwrap(), "nbd://localhost:10810");
        cfg.vsock = true;
        assert_eq!(uri(&cfg, None).unwrap(), "nbd+vsock://1:10810");
        cfg.port = None;
        cfg.export_name = Some("e".into());
        cfg.tls = TlsMode::Require;
        assert_eq!(uri(&cfg, None).unwrap(), "nbds+vsock://1/e");
        cfg.single = true;
        assert_eq!(uri(&cfg, None), None);
        cfg.single = false;
        cfg.socket_activation = 1;
        assert_eq!(uri(&cfg, None), None);
    }

    #[test]
    fn run_prelude_matches_nbdkit() {
        let cfg = Config::default();
        let p = run_prelude(&cfg, Some("nbd+unix://?socket=/s"), Some("/s"));
        assert!(p.starts_with("uri=\"nbd+unix://?socket=/s\"\nnbd=\"$uri\"\nexportname=\nport=\nunixsocket=/s\n"));
    }
}
