//! ssh_config files, as far as the plugin's options go (libssh reads the
//! same subset): `Host` blocks (patterns, negation), `Match all`,
//! `Include`, and the keywords `Hostname`, `Port`, `User`, `IdentityFile`,
//! `UserKnownHostsFile`, `GlobalKnownHostsFile`, `Compression`,
//! `ConnectTimeout`. As in OpenSSH the first value of a keyword wins; the
//! command line's `port=` and `user=` win over the file.
//! Also the `%` expansions of paths.

use std::path::Path;

use super::known_hosts::glob;

/// What the config files said for one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub hostname: Option<String>,
    pub port: Option<String>,
    pub user: Option<String>,
    pub identities: Vec<String>,
    pub user_known_hosts: Option<String>,
    pub global_known_hosts: Option<String>,
    pub compression: Option<bool>,
    pub connect_timeout: Option<u32>,
}

/// Splits a config line into keyword and arguments (`Key value`, `Key=value`,
/// double-quoted arguments).
fn split_line(line: &str) -> Option<(String, Vec<String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(line.len());
    let key = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    while chars.peek().is_some() {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut a = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                a.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                a.push(c);
                chars.next();
            }
        }
        if !a.is_empty() {
            args.push(a);
        }
    }
    Some((key, args))
}

fn yes_no(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// Applies the config text `text` for `host` to `cfg`. `dir` resolves
/// relative `Include`s; `depth` bounds include recursion.
pub fn apply(cfg: &mut HostConfig, text: &str, host: &str, dir: &Path, depth: u32) -> Result<(), String> {
    let mut active = true;
    for (n, line) in text.lines().enumerate() {
        let Some((key, args)) = split_line(line) else { continue };
        let first = args.first().cloned();
        match key.as_str() {
            "host" => {
                let mut m = false;
                for p in &args {
                    match p.strip_prefix('!') {
                        Some(p) if glob(p, host) => {
                            m = false;
                            break;
                        }
                        Some(_) => {}
                        None => m |= glob(p, host),
                    }
                }
                active = m;
                continue;
            }
            "match" => {
                active = args.iter().all(|a| a.eq_ignore_ascii_case("all"));
                continue;
            }
            _ => {}
        }
        if !active {
            continue;
        }
        let Some(v) = first else {
            return Err(format!("line {}: keyword {key} needs a value", n + 1));
        };
        match key.as_str() {
            "include" => {
                if depth >= 16 {
                    return Err("too many nested Include directives".into());
                }
                for a in &args {
                    let p = expand_tilde(a);
                    let p = if Path::new(&p).is_absolute() { p.into() } else { dir.join(p) };
                    for f in glob_files(&p) {
                        if let Ok(t) = std::fs::read_to_string(&f) {
                            apply(cfg, &t, host, dir, depth + 1)?;
                        }
                    }
                }
            }
            "hostname" => {
                cfg.hostname.get_or_insert(v);
            }
            "port" => {
                cfg.port.get_or_insert(v);
            }
            "user" => {
                cfg.user.get_or_insert(v);
            }
            "identityfile" => cfg.identities.push(v),
            "userknownhostsfile" => {
                cfg.user_known_hosts.get_or_insert(v);
            }
            "globalknownhostsfile" => {
                cfg.global_known_hosts.get_or_insert(v);
            }
            "compression" if cfg.compression.is_none() => cfg.compression = yes_no(&v),
            "connecttimeout" if cfg.connect_timeout.is_none() => cfg.connect_timeout = v.parse().ok(),
            _ => {} // Keywords libssh or this plugin do not use.
        }
    }
    Ok(())
}

/// The files an Include pattern names (`*` and `?` in the last component).
fn glob_files(p: &Path) -> Vec<std::path::PathBuf> {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![p.to_path_buf()];
    }
    let dir = p.parent().unwrap_or(Path::new("/"));
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| glob(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// The user's home directory ($HOME, else the password database).
pub fn home() -> String {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return h.to_string_lossy().into_owned();
    }
    passwd_entry().map(|(_, h)| h).unwrap_or_else(|| "/".into())
}

/// The local user name.
pub fn local_user() -> String {
    passwd_entry().map(|(u, _)| u).or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "root".into())
}

#[allow(unsafe_code)]
fn passwd_entry() -> Option<(String, String)> {
    // SAFETY: getpwuid_r with a buffer we own; the strings are copied out
    // before the buffer goes.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 16384];
        let r = libc::getpwuid_r(libc::getuid(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out);
        if r != 0 || out.is_null() {
            return None;
        }
        let s = |p: *const libc::c_char| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        Some((s(pw.pw_name), s(pw.pw_dir)))
    }
}

/// The local host name.
pub fn local_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed.
    #[allow(unsafe_code)]
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn expand_tilde(s: &str) -> String {
    match s.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{}{rest}", home()),
        _ => s.to_string(),
    }
}

/// The values of the `%` sequences.
#[derive(Debug, Clone, Default)]
pub struct Expand {
    pub remote_host: String,
    pub remote_user: String,
    pub port: u16,
}

impl Expand {
    /// libssh's `ssh_path_expand_escape`: `%d` ~/.ssh, `%u` local user,
    /// `%l` local host, `%h` remote host, `%r` remote user, `%p` port,
    /// `%%`; a leading `~` is the home directory.
    pub fn expand(&self, s: &str) -> Result<String, String> {
        let s = expand_tilde(s);
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match it.next() {
                Some('%') => out.push('%'),
                Some('d') => out.push_str(&format!("{}/.ssh", home())),
                Some('u') => out.push_str(&local_user()),
                Some('l') => out.push_str(&local_host()),
                Some('h') => out.push_str(&self.remote_host),
                Some('r') => out.push_str(&self.remote_user),
                Some('p') => out.push_str(&self.port.to_string()),
                Some(x) => return Err(format!("Wrong escape sequence detected: %{x}")),
                None => return Err("Invalid escape sequence at the end of the string".into()),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_blocks_and_first_value_wins() {
        let text = "# comment\nPort 1\nHost other\n  User nobody\nHost loc* !locked\n  HostName 127.0.0.1\n  \
                    User=alice\n  IdentityFile \"/k 1\"\n  IdentityFile %d/k2\n  Port 2\n  Compression yes\n\
                    Host *\n  User bob\n  ConnectTimeout 7\n  UserKnownHostsFile /kh\n";
        let mut c = HostConfig::default();
        apply(&mut c, text, "localhost", Path::new("/"), 0).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("127.0.0.1"));
        assert_eq!(c.port.as_deref(), Some("1"));
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.identities, ["/k 1", "%d/k2"]);
        assert_eq!(c.compression, Some(true));
        assert_eq!(c.connect_timeout, Some(7));
        assert_eq!(c.user_known_hosts.as_deref(), Some("/kh"));
        let mut c = HostConfig::default();
        apply(&mut c, text, "locked", Path::new("/"), 0).unwrap();
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.hostname, None);
        assert!(apply(&mut c, "Port\n", "x", Path::new("/"), 0).is_err());
    }

    #[test]
    fn includes() {
        let d = std::env::temp_dir().join(format!("sshcfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("inc.conf"), "User included\nInclude inc.conf\n").unwrap();
        let mut c = HostConfig::default();
        // A self-include stops at the depth limit with an error, not a stack overflow.
        assert!(apply(&mut c, "Include inc*.conf\n", "h", &d, 0).is_err());
        assert_eq!(c.user.as_deref(), Some("included"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn percent_expansion() {
        let e = Expand { remote_host: "rh".into(), remote_user: "ru".into(), port: 2222 };
        assert_eq!(e.expand("/a/%h-%r-%p-%%").unwrap(), "/a/rh-ru-2222-%");
        assert_eq!(e.expand("%d/x").unwrap(), format!("{}/.ssh/x", home()));
        assert_eq!(e.expand("~/y").unwrap(), format!("{}/y", home()));
        assert_eq!(e.expand("%u").unwrap(), local_user());
        assert!(e.expand("%q").is_err());
        assert!(e.expand("50%").is_err());
    }
}
