//! `header-script` and `cookie-script`: run by `/bin/sh` with `$url` and
//! `$iteration` set, on first use and again every `*-renew` seconds; and
//! the cookie engine of `cookiefile`/`cookiejar` (Netscape file format).

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::config::{HeaderRule, Url};
use crate::error::{Error, Result};
use crate::util::log::debug_flag;

/// Single-quote `s` for the shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

struct State {
    last: Option<Instant>,
    iteration: u32,
    output: String,
}

/// One script and its cached output.
pub struct Script {
    name: &'static str,
    text: String,
    renew: u32,
    state: Mutex<State>,
}

impl Script {
    pub fn new(name: &'static str, text: String, renew: u32) -> Script {
        Script { name, text, renew, state: Mutex::new(State { last: None, iteration: 0, output: String::new() }) }
    }

    /// The output, running the script first if it is due.
    fn output(&self, url: &str) -> Result<String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = match st.last {
            None => true,
            Some(t) => self.renew > 0 && t.elapsed().as_secs() >= self.renew as u64,
        };
        if due {
            if debug_flag("curl", "scripts") != 0 {
                crate::util::log::debug(&format!("running {}", self.name));
            }
            let prog = format!(
                "exec </dev/null\nurl={}\niteration={}\n{}\n",
                shell_quote(url),
                st.iteration,
                self.text
            );
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(prog)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| Error::os(format!("{}: /bin/sh", self.name), e))?;
            st.iteration = st.iteration.wrapping_add(1);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(Error::io(match err.lines().next().filter(|l| !l.is_empty()) {
                    Some(l) => format!("{} failed: {l}", self.name),
                    None => format!("{} failed", self.name),
                }));
            }
            st.output = String::from_utf8(out.stdout)
                .map_err(|_| Error::io(format!("{}: output is not valid UTF-8", self.name)))?;
            st.last = Some(Instant::now());
        }
        Ok(st.output.clone())
    }

    /// header-script: every non-empty line is a header.
    pub fn headers(&self, url: &str) -> Result<Vec<HeaderRule>> {
        let out = self.output(url)?;
        let mut v = Vec::new();
        for l in out.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            let h = HeaderRule::parse(l).map_err(|e| Error::io(format!("{}: {}", self.name, e.message())))?;
            v.push(h);
        }
        if debug_flag("curl", "scripts") != 0 {
            crate::util::log::debug(&format!("{} returned {} header(s)", self.name, v.len()));
            for h in &v {
                let line = match h {
                    HeaderRule::Set(n, val) => format!("{n}: {val}"),
                    HeaderRule::Remove(n) => format!("{n}:"),
                    HeaderRule::Empty(n) => format!("{n};"),
                };
                crate::util::log::debug(&format!("header-script: {line}"));
            }
        }
        Ok(v)
    }

    /// cookie-script: the first line is the cookie.
    pub fn cookie(&self, url: &str) -> Result<String> {
        let out = self.output(url)?;
        let c = out.lines().next().unwrap_or("").trim_end().to_string();
        if c.bytes().any(|b| b.is_ascii_control()) {
            return Err(Error::io(format!("{}: cookie contains a control character", self.name)));
        }
        if debug_flag("curl", "scripts") != 0 {
            crate::util::log::debug(&format!("cookie-script returned cookie: {c}"));
        }
        Ok(c)
    }
}

/// A cookie of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub domain: String,
    pub subdomains: bool,
    pub path: String,
    pub secure: bool,
    pub expires: u64,
    pub name: String,
    pub value: String,
}

/// The cookie engine (`cookiefile=`/`cookiejar=`).
#[derive(Default)]
pub struct Jar {
    pub cookies: Mutex<Vec<Cookie>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Jar {
    /// Load a Netscape cookie file; a missing file is no cookies (as curl).
    pub fn load(&self, path: &str) {
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let mut v = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines() {
            let line = line.strip_prefix("#HttpOnly_").unwrap_or(line);
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 7 {
                continue;
            }
            v.push(Cookie {
                domain: f[0].trim_start_matches('.').to_ascii_lowercase(),
                subdomains: f[1].eq_ignore_ascii_case("TRUE"),
                path: f[2].to_string(),
                secure: f[3].eq_ignore_ascii_case("TRUE"),
                expires: f[4].parse().unwrap_or(0),
                name: f[5].to_string(),
                value: f[6].to_string(),
            });
        }
    }

    pub fn save(&self, path: &str) -> std::io::Result<()> {
        let v = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::from("# Netscape HTTP Cookie File\n# This file was generated by nbdkit's curl plugin.\n\n");
        for c in v.iter() {
            let b = |x: bool| if x { "TRUE" } else { "FALSE" };
            let d = if c.subdomains { format!(".{}", c.domain) } else { c.domain.clone() };
            s.push_str(&format!("{d}\t{}\t{}\t{}\t{}\t{}\t{}\n", b(c.subdomains), c.path, b(c.secure), c.expires, c.name, c.value));
        }
        std::fs::write(path, s)
    }

    /// `name=value; …` of the cookies for `u`.
    pub fn header(&self, u: &Url) -> Option<String> {
        let v = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        let host = u.host.to_ascii_lowercase();
        let path = u.target.split('?').next().unwrap_or("/");
        let t = now();
        let s: Vec<String> = v
            .iter()
            .filter(|c| c.domain == host || (c.subdomains && host.ends_with(&format!(".{}", c.domain))))
            .filter(|c| path.starts_with(&c.path))
            .filter(|c| !c.secure || u.scheme == "https")
            .filter(|c| c.expires == 0 || c.expires > t)
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        (!s.is_empty()).then(|| s.join("; "))
    }

    /// Take a `Set-Cookie:` from a response for `u`.
    pub fn set_cookie(&self, u: &Url, v: &str) {
        let mut parts = v.split(';');
        let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else { return };
        let mut c = Cookie {
            domain: u.host.to_ascii_lowercase(),
            subdomains: false,
            path: "/".into(),
            secure: false,
            expires: 0,
            name: name.trim().to_string(),
            value: value.trim().to_string(),
        };
        for p in parts {
            let (k, val) = p.split_once('=').unwrap_or((p, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "domain" => {
                    let d = val.trim().trim_start_matches('.').to_ascii_lowercase();
                    if c.domain == d || c.domain.ends_with(&format!(".{d}")) {
                        c.domain = d;
                        c.subdomains = true;
                    }
                }
                "path" => c.path = val.trim().to_string(),
                "secure" => c.secure = true,
                "max-age" => {
                    if let Ok(s) = val.trim().parse::<i64>() {
                        c.expires = if s <= 0 { 1 } else { now() + s as u64 };
                    }
                }
                _ => {}
            }
        }
        if c.name.is_empty() {
            return;
        }
        let mut v = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|o| !(o.name == c.name && o.domain == c.domain && o.path == c.path));
        v.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn scripts_run_and_renew() {
        let s = Script::new("header-script", "echo \"X-It: $iteration\"; echo \"X-Url: $url\"".into(), 0);
        let h = s.headers("http://h/a'b").unwrap();
        assert_eq!(h[0], HeaderRule::Set("X-It".into(), "0".into()));
        assert_eq!(h[1], HeaderRule::Set("X-Url".into(), "http://h/a'b".into()));
        // No renew: the output is cached.
        assert_eq!(s.headers("x").unwrap()[0], HeaderRule::Set("X-It".into(), "0".into()));
        let bad = Script::new("header-script", "echo oops >&2; exit 1".into(), 0);
        assert_eq!(bad.headers("u").unwrap_err().message(), "header-script failed: oops");
        let garbage = Script::new("header-script", "echo garbage".into(), 0);
        assert!(garbage.headers("u").is_err());
        let c = Script::new("cookie-script", "echo 'a=b'; echo second".into(), 0);
        assert_eq!(c.cookie("u").unwrap(), "a=b");
    }

    #[test]
    fn jar() {
        let j = Jar::default();
        let u = Url::parse("http://www.example.com/dir/x").unwrap();
        j.set_cookie(&u, "s=1; Path=/dir; Domain=example.com");
        j.set_cookie(&u, "t=2");
        assert_eq!(j.header(&u).as_deref(), Some("s=1; t=2"));
        assert_eq!(j.header(&Url::parse("http://other/").unwrap()), None);
        let dir = std::env::temp_dir().join(format!("curl-jar-{}", std::process::id()));
        j.save(dir.to_str().unwrap()).unwrap();
        let k = Jar::default();
        k.load(dir.to_str().unwrap());
        assert_eq!(*k.cookies.lock().unwrap(), *j.cookies.lock().unwrap());
        let _ = std::fs::remove_file(dir);
    }
}
