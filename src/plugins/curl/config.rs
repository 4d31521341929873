//! The curl plugin's parameters: parsing with nbdkit's defaults and
//! errors, and the URL model the HTTP client works with.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::util::parse::{parse_bool, parse_unsigned};

/// Schemes this build can fetch.
pub const SUPPORTED: &[&str] = &["file", "http", "https"];

/// libcurl's protocol names: `protocols=` accepts all of them (and `all`),
/// though only [`SUPPORTED`] can ever be used.
const CURL_PROTOCOLS: &[&str] = &[
    "all", "dict", "file", "ftp", "ftps", "gopher", "gophers", "http", "https", "imap", "imaps", "ldap",
    "ldaps", "mqtt", "pop3", "pop3s", "rtmp", "rtmpe", "rtmps", "rtmpt", "rtmpte", "rtmpts", "rtsp", "scp",
    "sftp", "smb", "smbs", "smtp", "smtps", "telnet", "tftp", "ws", "wss",
];

/// A parsed absolute URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    /// Path and query, as sent on the request line (starts with `/`).
    pub target: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url> {
        let bad = || Error::invalid(format!("invalid URL: {s}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
            return Err(bad());
        }
        let scheme = scheme.to_ascii_lowercase();
        if s.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(bad());
        }
        let (auth, target) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let target = target.split('#').next().unwrap_or("");
        let target = if target.starts_with('?') { format!("/{target}") } else { target.to_string() };
        let (userinfo, hostport) = match auth.rfind('@') {
            Some(i) => (Some(&auth[..i]), &auth[i + 1..]),
            None => (None, auth),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((a, b)) => (Some(percent_decode(a)), Some(percent_decode(b))),
                None => (Some(percent_decode(u)), None),
            },
            None => (None, None),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(bad)?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        let default_port = match scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        };
        if host.is_empty() && scheme != "file" {
            return Err(bad());
        }
        Ok(Url { scheme, user, password, host, port, target })
    }

    /// `Host:` header value.
    pub fn host_header(&self) -> String {
        let h = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default { h } else { format!("{h}:{}", self.port) }
    }

    /// The URL without credentials (for messages and the proxy request line).
    pub fn display(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host_header(), self.target)
    }

    /// Resolve a `Location:` value against this URL.
    pub fn join(&self, loc: &str) -> Result<Url> {
        let loc = loc.trim();
        if loc.contains("://") {
            return Url::parse(loc);
        }
        let base = format!("{}://{}", self.scheme, self.host_header());
        if let Some(rest) = loc.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", self.scheme));
        }
        if loc.starts_with('/') {
            return Url::parse(&format!("{base}{loc}"));
        }
        let path = self.target.split('?').next().unwrap_or("/");
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        Url::parse(&format!("{base}{dir}{loc}"))
    }

    /// For `file:` URLs: the local path.
    pub fn file_path(&self) -> Result<PathBuf> {
        if !self.host.is_empty() && self.host != "localhost" {
            return Err(Error::invalid(format!("file: URL with a remote host is not supported: {}", self.host)));
        }
        let path = self.target.split('?').next().unwrap_or("");
        Ok(PathBuf::from(percent_decode(path)))
    }
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() && s.is_char_boundary(i + 3) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `header=`: add, remove a default (`Name:`), or send empty (`Name;`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderRule {
    Set(String, String),
    Remove(String),
    Empty(String),
}

impl HeaderRule {
    pub fn parse(line: &str) -> Result<HeaderRule> {
        let line = line.trim_end();
        let valid_name = |n: &str| !n.is_empty() && n.bytes().all(|c| c.is_ascii_graphic() && c != b':' && c != b';');
        if line.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
            return Err(Error::invalid(format!("invalid header (control character): {line:?}")));
        }
        if let Some(n) = line.strip_suffix(';') {
            if valid_name(n) {
                return Ok(HeaderRule::Empty(n.to_string()));
            }
        }
        match line.split_once(':') {
            Some((n, v)) if valid_name(n) => {
                let v = v.trim();
                Ok(if v.is_empty() { HeaderRule::Remove(n.to_string()) } else { HeaderRule::Set(n.to_string(), v.to_string()) })
            }
            _ => Err(Error::invalid(format!("invalid header, expecting 'Name: value': {line:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMin {
    Default,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMax {
    Default,
    Tls12,
}

/// Everything the command line said.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: Option<String>,
    pub cainfo: Option<String>,
    pub capath: Option<String>,
    pub connections: u32,
    pub cookie: Option<String>,
    pub cookiefile: Option<String>,
    pub cookiejar: Option<String>,
    pub cookie_script: Option<String>,
    pub cookie_script_renew: u32,
    pub followlocation: bool,
    pub headers: Vec<HeaderRule>,
    pub header_script: Option<String>,
    pub header_script_renew: u32,
    pub http_version: String,
    pub ipresolve: String,
    pub password: Option<String>,
    pub protocols: Option<Vec<String>>,
    pub proxy: Option<String>,
    pub proxy_user: Option<String>,
    pub proxy_password: Option<String>,
    pub proxy_cainfo: Option<String>,
    pub proxy_capath: Option<String>,
    pub resolve: Vec<(String, u16, String)>,
    pub sslverify: bool,
    pub ssl_version: (TlsMin, TlsMax),
    pub ssl_cipher_list: Option<String>,
    pub tls13_ciphers: Option<String>,
    pub tcp_keepalive: bool,
    pub tcp_nodelay: bool,
    pub timeout: Option<Duration>,
    pub unix_socket_path: Option<PathBuf>,
    pub user: Option<String>,
    pub user_agent: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            url: None,
            cainfo: None,
            capath: None,
            connections: 16,
            cookie: None,
            cookiefile: None,
            cookiejar: None,
            cookie_script: None,
            cookie_script_renew: 0,
            followlocation: true,
            headers: Vec::new(),
            header_script: None,
            header_script_renew: 0,
            http_version: "none".into(),
            ipresolve: "any".into(),
            password: None,
            protocols: None,
            proxy: None,
            proxy_user: None,
            proxy_password: None,
            proxy_cainfo: None,
            proxy_capath: None,
            resolve: Vec::new(),
            sslverify: true,
            ssl_version: (TlsMin::Default, TlsMax::Default),
            ssl_cipher_list: None,
            tls13_ciphers: None,
            tcp_keepalive: false,
            tcp_nodelay: true,
            timeout: None,
            unix_socket_path: None,
            user: None,
            user_agent: None,
        }
    }
}

/// nbdkit_read_password: `-` (a line from stdin), `-FD`, `+FILE`, or the value.
pub fn read_password(value: &str) -> Result<String> {
    if value == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| Error::os("could not read password from stdin", e))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Some(fd) = value.strip_prefix('-') {
        if let Ok(fd) = fd.parse::<i32>() {
            if fd < 0 {
                return Err(Error::invalid(format!("cannot parse file descriptor: {value}")));
            }
            if fd <= 2 {
                return Err(Error::invalid("cannot use stdin, stdout or stderr to read the password"));
            }
            let path = format!("/proc/self/fd/{fd}");
            let mut s = String::new();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(&mut s))
                .map_err(|e| Error::os(format!("read_password: fd {fd}"), e))?;
            return Ok(s.trim_end_matches(['\n', '\r']).to_string());
        }
    }
    if let Some(file) = value.strip_prefix('+') {
        let s = std::fs::read_to_string(file).map_err(|e| Error::os(file, e))?;
        return Ok(s.trim_end_matches(['\n', '\r']).to_string());
    }
    Ok(value.to_string())
}

/// A value that goes into a header line: no CR, LF or other control character.
fn no_ctl(key: &str, v: String) -> Result<String> {
    if v.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(Error::invalid(format!("{key}: value contains a control character")));
    }
    Ok(v)
}

fn u32_secs(key: &str, v: &str) -> Result<u32> {
    Ok(parse_unsigned(key, v, u32::MAX as u64)? as u32)
}

impl Config {
    /// One `key=value`; `Ok(false)` if the key is not the plugin's.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let v = value.to_string();
        match key {
            "url" => self.url = Some(v),
            "cainfo" => self.cainfo = Some(v),
            "capath" => self.capath = Some(v),
            "connections" => {
                let n = parse_unsigned("connections", value, u32::MAX as u64)? as u32;
                if n == 0 {
                    return Err(Error::invalid("connections parameter must not be 0"));
                }
                self.connections = n;
            }
            "cookie" => self.cookie = Some(no_ctl(key, read_password(value)?)?),
            "cookiefile" => {
                if value == "-" {
                    return Err(Error::invalid("cookiefile parameter cannot be \"-\""));
                }
                self.cookiefile = Some(v);
            }
            "cookiejar" => {
                if value == "-" {
                    return Err(Error::invalid("cookiejar parameter cannot be \"-\""));
                }
                self.cookiejar = Some(v);
            }
            "cookie-script" => self.cookie_script = Some(v),
            "cookie-script-renew" => self.cookie_script_renew = u32_secs(key, value)?,
            "followlocation" => self.followlocation = parse_bool(value)?,
            "header" => self.headers.push(HeaderRule::parse(value)?),
            "header-script" => self.header_script = Some(v),
            "header-script-renew" => self.header_script_renew = u32_secs(key, value)?,
            "http-version" => {
                match value {
                    "none" | "1.0" | "1.1" => {}
                    "2.0" | "2TLS" | "2-prior-knowledge" | "3" | "3only" => {
                        return Err(Error::invalid(format!(
                            "http-version {value} is not supported by this build (only none, 1.0 and 1.1: HTTP/1.1 client)"
                        )))
                    }
                    _ => return Err(Error::invalid(format!("unknown http-version: {value}"))),
                }
                self.http_version = v;
            }
            "ipresolve" => {
                self.ipresolve = match value {
                    "any" | "whatever" => "any",
                    "v4" | "4" => "v4",
                    "v6" | "6" => "v6",
                    _ => return Err(Error::invalid(format!("unknown ipresolve: {value}"))),
                }
                .into()
            }
            "password" => self.password = Some(read_password(value)?),
            "protocols" => {
                let list: Vec<String> = value.split(',').map(|p| p.trim().to_ascii_lowercase()).collect();
                for p in &list {
                    if !CURL_PROTOCOLS.contains(&p.as_str()) {
                        return Err(Error::invalid(format!("protocols: unknown protocol '{p}'")));
                    }
                }
                self.protocols = Some(list);
            }
            "proxy" => self.proxy = Some(v),
            "proxy-user" => self.proxy_user = Some(v),
            "proxy-password" => self.proxy_password = Some(read_password(value)?),
            "proxy-cainfo" => self.proxy_cainfo = Some(v),
            "proxy-capath" => self.proxy_capath = Some(v),
            "resolve" => self.resolve.push(parse_resolve(value)?),
            "sslverify" => self.sslverify = parse_bool(value)?,
            "ssl-version" => self.ssl_version = parse_ssl_version(value)?,
            "ssl-cipher-list" => self.ssl_cipher_list = Some(v),
            "tls13-ciphers" => self.tls13_ciphers = Some(v),
            "tcp-keepalive" => self.tcp_keepalive = parse_bool(value)?,
            "tcp-nodelay" => self.tcp_nodelay = parse_bool(value)?,
            "timeout" => {
                let t = u32_secs(key, value)?;
                self.timeout = (t > 0).then(|| Duration::from_secs(t as u64));
            }
            "unix-socket-path" | "unix_socket_path" => self.unix_socket_path = Some(PathBuf::from(value)),
            "user" => self.user = Some(v),
            "user-agent" => self.user_agent = Some(no_ctl(key, v)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// config_complete's checks.
    pub fn complete(&self) -> Result<Url> {
        let url = self.url.as_deref().ok_or_else(|| Error::invalid("you must supply the url=<URL> parameter after the plugin name on the command line"))?;
        if self.header_script.is_none() && self.header_script_renew > 0 {
            return Err(Error::invalid("header-script-renew cannot be used without header-script"));
        }
        if self.cookie_script.is_none() && self.cookie_script_renew > 0 {
            return Err(Error::invalid("cookie-script-renew cannot be used without cookie-script"));
        }
        if self.header_script.is_some() && !self.headers.is_empty() {
            return Err(Error::invalid("header and header-script cannot be used at the same time"));
        }
        if self.cookie_script.is_some() && self.cookie.is_some() {
            return Err(Error::invalid("cookie and cookie-script cannot be used at the same time"));
        }
        let u = Url::parse(url)?;
        check_scheme(&u, self.protocols.as_deref())?;
        if let Some(p) = &self.proxy {
            let pu = Url::parse(if p.contains("://") { p.clone() } else { format!("http://{p}") }.as_str())?;
            if pu.scheme != "http" && pu.scheme != "https" {
                return Err(Error::invalid(format!(
                    "proxy scheme {} is not supported (only http:// and https:// proxies)",
                    pu.scheme
                )));
            }
        }
        Ok(u)
    }
}

/// The URL's scheme must be one this build fetches and one `protocols=` allows.
pub fn check_scheme(u: &Url, protocols: Option<&[String]>) -> Result<()> {
    if !SUPPORTED.contains(&u.scheme.as_str()) {
        return Err(Error::invalid(format!(
            "unsupported URL scheme '{}': this nbdkit's curl plugin supports http, https and file",
            u.scheme
        )));
    }
    if let Some(list) = protocols {
        if !list.iter().any(|p| p == "all" || *p == u.scheme) {
            return Err(Error::invalid(format!("protocol '{}' is not allowed by protocols=", u.scheme)));
        }
    }
    Ok(())
}

fn parse_resolve(v: &str) -> Result<(String, u16, String)> {
    let bad = || Error::invalid(format!("resolve: expecting HOST:PORT:ADDRESS: {v}"));
    let v = v.strip_prefix('+').unwrap_or(v);
    let mut it = v.splitn(3, ':');
    let host = it.next().ok_or_else(bad)?;
    let port = it.next().ok_or_else(bad)?.parse::<u16>().map_err(|_| bad())?;
    let addr = it.next().ok_or_else(bad)?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || addr.parse::<std::net::IpAddr>().is_err() {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port, addr.to_string()))
}

fn parse_ssl_version(v: &str) -> Result<(TlsMin, TlsMax)> {
    Ok(match v {
        "default" | "tlsv1" | "tlsv1.0" | "tlsv1.1" | "tlsv1.2" | "max-default" | "max-tlsv1.3" => {
            (TlsMin::Default, TlsMax::Default)
        }
        "tlsv1.3" => (TlsMin::Tls13, TlsMax::Default),
        "max-tlsv1.2" => (TlsMin::Default, TlsMax::Tls12),
        "sslv2" | "sslv3" | "max-tlsv1.0" | "max-tlsv1.1" => {
            return Err(Error::invalid(format!(
                "ssl-version {v} is not supported: the TLS library (rustls) speaks only TLS 1.2 and 1.3"
            )))
        }
        _ => return Err(Error::invalid(format!("unknown ssl-version: {v}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://a:b@Host.example:8080/x/y?q=1#frag").unwrap();
        assert_eq!((u.user.as_deref(), u.password.as_deref()), (Some("a"), Some("b")));
        assert_eq!((u.host.as_str(), u.port, u.target.as_str()), ("Host.example", 8080, "/x/y?q=1"));
        let u = Url::parse("HTTPS://[::1]/").unwrap();
        assert_eq!((u.scheme.as_str(), u.host.as_str(), u.port), ("https", "::1", 443));
        assert_eq!(u.host_header(), "[::1]");
        assert_eq!(Url::parse("file:///tmp/a%20b").unwrap().file_path().unwrap(), PathBuf::from("/tmp/a b"));
        assert!(Url::parse("nourl").is_err());
        assert!(Url::parse("http://h:99999/").is_err());
        assert!(Url::parse("http:///x").is_err());
        let b = Url::parse("http://h:81/a/b?x").unwrap();
        assert_eq!(b.join("c").unwrap().target, "/a/c");
        assert_eq!(b.join("/d").unwrap().display(), "http://h:81/d");
        assert_eq!(b.join("https://o/p").unwrap().display(), "https://o/p");
        assert_eq!(b.join("//o2/p").unwrap().display(), "http://o2/p");
    }

    #[test]
    fn header_rules() {
        assert_eq!(HeaderRule::parse("X-A: b c").unwrap(), HeaderRule::Set("X-A".into(), "b c".into()));
        assert_eq!(HeaderRule::parse("Accept:").unwrap(), HeaderRule::Remove("Accept".into()));
        assert_eq!(HeaderRule::parse("X-E;").unwrap(), HeaderRule::Empty("X-E".into()));
        assert!(HeaderRule::parse("garbage").is_err());
        assert!(HeaderRule::parse("A: b\r\nInjected: x").is_err());
    }

    proptest::proptest! {
        #[test]
        fn hostile_urls_and_headers_never_panic(s in "\\PC{0,40}", loc in "\\PC{0,40}") {
            if let Ok(u) = Url::parse(&s) {
                let _ = u.join(&loc);
                let _ = u.file_path();
                let _ = u.host_header();
            }
            let _ = HeaderRule::parse(&s);
            let _ = percent_decode(&s);
            let _ = super::super::http::parse_content_range(&s);
        }
    }

    #[test]
    fn params() {
        let mut c = Config::default();
        assert!(c.set("connections", "0").unwrap_err().message().contains("must not be 0"));
        assert!(c.set("http-version", "2.0").is_err());
        assert!(c.set("http-version", "bogus").unwrap_err().message().contains("unknown http-version"));
        assert!(c.set("ssl-version", "sslv3").is_err());
        assert!(c.set("ipresolve", "7").is_err());
        assert!(c.set("cookiefile", "-").is_err());
        assert!(c.set("resolve", "h:80:1.2.3.4").unwrap());
        assert!(c.set("resolve", "h:80:nope").is_err());
        assert!(!c.set("nosuch", "1").unwrap());
        assert!(c.set("cookie", "a=b\r\nX: y").is_err());
        assert!(c.set("user-agent", "ua\n").is_err());
        c.set("header-script-renew", "5").unwrap();
        c.set("url", "http://x/").unwrap();
        assert!(c.complete().unwrap_err().message().contains("without header-script"));
        let mut c = Config::default();
        c.set("url", "ftp://x/").unwrap();
        assert!(c.complete().unwrap_err().message().contains("unsupported URL scheme 'ftp'"));
        let mut c = Config::default();
        c.set("url", "http://x/").unwrap();
        c.set("protocols", "https").unwrap();
        assert!(c.complete().is_err());
    }
}
