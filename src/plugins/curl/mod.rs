//! `curl`: serve a remote image over HTTP or HTTPS (or a local `file:`
//! URL), as nbdkit 1.44's curl plugin does, with a pure-Rust HTTP/1.1
//! client: requests from every NBD connection run in parallel over a
//! bounded pool of keep-alive connections (`connections=`, default 16).

mod config;
mod http;
mod scripts;
mod tls;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use self::config::{Config, Url};
use self::http::{Client, Extra, Req};
use self::scripts::{Jar, Script};
use crate::backend::{Caps, Flags, Handle, Param, Plugin, PluginEntry, Support, ThreadModel};
use crate::error::{Error, Result};

#[derive(Default)]
struct Curl {
    cfg: Config,
    url: Option<Url>,
    shared: Option<Arc<Shared>>,
}

/// What every connection shares after get_ready.
struct Shared {
    client: Client,
    url: Url,
    header_script: Option<Script>,
    cookie_script: Option<Script>,
}

impl Shared {
    /// Headers and cookie for a request to `u` (scripts run here when due).
    fn extra(&self, u: &Url) -> Result<Extra> {
        let cfg = self.client.config();
        let headers = match &self.header_script {
            Some(s) => s.headers(&self.url.display())?,
            None => cfg.headers.clone(),
        };
        let mut cookie = match &self.cookie_script {
            Some(s) => Some(s.cookie(&self.url.display())?).filter(|c| !c.is_empty()),
            None => cfg.cookie.clone(),
        };
        if let Some(j) = self.client.jar.as_ref().and_then(|j| j.header(u)) {
            cookie = Some(match cookie {
                Some(c) => format!("{c}; {j}"),
                None => j,
            });
        }
        Ok(Extra { headers, cookie })
    }

    /// HEAD (or, on 403, GET without reading the body) for the size.
    fn probe_size(&self) -> Result<u64> {
        let url = self.url.display();
        let extra = |u: &Url| self.extra(u);
        let head = Req { method: "HEAD", range: None, body: &[] };
        let resp = match self.client.send(&head, &extra) {
            Ok(r) => r,
            Err((Some(403), _)) => {
                crate::debug!("HEAD request returned 403, trying GET");
                let get = Req { method: "GET", range: None, body: &[] };
                self.client.send(&get, &extra).map_err(|(_, e)| {
                    Error::io(format!("problem doing GET request to fetch size of URL [{url}]: {}", e.message()))
                })?
            }
            Err((_, e)) => {
                return Err(Error::io(format!(
                    "problem doing HEAD request to fetch size of URL [{url}]: {}",
                    e.message()
                )))
            }
        };
        let size = resp.content_length().ok_or_else(|| {
            Error::io(format!("could not get length of remote file [{url}], is the URL correct?"))
        })?;
        if size > i64::MAX as u64 {
            return Err(Error::io(format!("remote file [{url}] is too large ({size} bytes)")));
        }
        let ranges = resp.header("accept-ranges").map(str::trim);
        if ranges != Some("bytes") {
            return Err(Error::io("server does not support 'range' (byte range) requests"));
        }
        crate::debug!("content length: {size}");
        // A GET's body is not read: the connection is closed, not pooled.
        resp.finish();
        Ok(size)
    }
}

impl Plugin for Curl {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        Ok(if self.cfg.set(key, value)? { Param::Used } else { Param::NotMine })
    }

    fn config_complete(&mut self) -> Result<()> {
        self.url = Some(self.cfg.complete()?);
        Ok(())
    }

    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }

    fn dump_plugin(&self) -> Vec<String> {
        let mut v = vec![
            format!("curl_version=nbdkit-rust-http/{} (HTTP/1.1, rustls)", env!("CARGO_PKG_VERSION")),
            format!("curl_dynamic_version=nbdkit-rust-http/{}", env!("CARGO_PKG_VERSION")),
            "curl_ssl_version=rustls/0.23 (ring)".to_string(),
        ];
        v.extend(config::SUPPORTED.iter().map(|p| format!("curl_protocol_{p}=yes")));
        v
    }

    fn get_ready(&mut self) -> Result<()> {
        let url = self.url.clone().ok_or_else(|| Error::invalid("you must supply the url=<URL> parameter"))?;
        if url.scheme == "file" {
            url.file_path()?;
            return Ok(());
        }
        let cfg = self.cfg.clone();
        let header_script = cfg.header_script.clone().map(|s| Script::new("header-script", s, cfg.header_script_renew));
        let cookie_script = cfg.cookie_script.clone().map(|s| Script::new("cookie-script", s, cfg.cookie_script_renew));
        let mut client = Client::new(cfg.clone(), url.clone())?;
        if cfg.cookiefile.is_some() || cfg.cookiejar.is_some() {
            let jar = Jar::default();
            for f in [&cfg.cookiefile, &cfg.cookiejar].into_iter().flatten().filter(|f| !f.is_empty()) {
                jar.load(f);
            }
            client.jar = Some(jar);
        }
        self.shared = Some(Arc::new(Shared { client, url, header_script, cookie_script }));
        Ok(())
    }

    fn cleanup(&self) {
        if let Some(s) = &self.shared {
            s.client.pool.clear();
            if let (Some(jar), Some(path)) = (&s.client.jar, &self.cfg.cookiejar) {
                if let Err(e) = jar.save(path) {
                    crate::log_error!("cookiejar: {path}: {e}");
                }
            }
        }
    }

    fn open(&self, readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        let url = self.url.as_ref().ok_or_else(|| Error::invalid("curl: not configured"))?;
        if url.scheme == "file" {
            let path = url.file_path()?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .open(&path)
                .map_err(|e| Error::os(format!("problem doing HEAD request to fetch size of URL [{}]", url.display()), e))?;
            let size = file.metadata().map_err(|e| Error::os(path.display(), e))?.len();
            return Ok(Box::new(FileUrl { file, size, readonly }));
        }
        let shared = self.shared.clone().ok_or_else(|| Error::invalid("curl: not ready"))?;
        let size = shared.probe_size()?;
        Ok(Box::new(CurlHandle { shared, size, readonly }))
    }
}

fn caps(readonly: bool) -> Caps {
    Caps {
        write: !readonly,
        zero: if readonly { Support::None } else { Support::Emulate },
        // As nbdkit without a .zero: fast zero is advertised and fails at once.
        fast_zero: !readonly,
        multi_conn: readonly,
        ..Caps::default()
    }
}

struct CurlHandle {
    shared: Arc<Shared>,
    size: u64,
    readonly: bool,
}

impl Handle for CurlHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(caps(self.readonly))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let last = offset + len - 1;
        let s = &self.shared;
        let req = Req { method: "GET", range: Some((offset, last)), body: &[] };
        let mut resp = s.client.send(&req, &|u| s.extra(u)).map_err(|(_, e)| e)?;
        match resp.status {
            206 => {
                let cr = resp.header("content-range").unwrap_or("").to_string();
                if http::parse_content_range(&cr) != Some((offset, last)) {
                    return Err(Error::io(format!(
                        "server returned the wrong Content-Range: {cr:?} (requested bytes {offset}-{last})"
                    )));
                }
                if let Some(n) = resp.content_length() {
                    if n != len {
                        return Err(Error::io(format!(
                            "server sent a body of {n} bytes for a range of {len} bytes"
                        )));
                    }
                }
            }
            200 if offset == 0 && resp.content_length() == Some(len) => {}
            200 => {
                return Err(Error::io(
                    "server ignored the Range request and sent the whole file: refused",
                ))
            }
            st => return Err(Error::io(format!("unexpected HTTP status {st} for a range request"))),
        }
        resp.read_exact(buf)?;
        resp.expect_end()?;
        resp.finish();
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let s = &self.shared;
        let last = offset + buf.len() as u64 - 1;
        let req = Req { method: "PUT", range: Some((offset, last)), body: buf };
        let mut resp = s.client.send(&req, &|u| s.extra(u)).map_err(|(_, e)| e)?;
        if !(200..300).contains(&resp.status) {
            return Err(Error::io(format!("PUT returned HTTP status {}", resp.status)));
        }
        if resp.content_length().is_some_and(|n| n <= 64 * 1024) {
            let mut b = vec![0u8; resp.content_length().unwrap_or(0) as usize];
            resp.read_exact(&mut b)?;
        }
        resp.finish();
        Ok(())
    }
}

/// A `file:` URL: the local file, read and written directly.
struct FileUrl {
    file: File,
    size: u64,
    readonly: bool,
}

impl Handle for FileUrl {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(caps(self.readonly))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::os("pread", e))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::os("pwrite", e))
    }
}

inventory::submit! {
    PluginEntry {
        name: "curl",
        longname: "nbdkit curl plugin",
        description: "nbdkit curl plugin: serve an image from an http:, https: or file: URL",
        help: "cainfo=<CAINFO>            Path to Certificate Authority file.\n\
capath=<CAPATH>            Path to directory with CA certificates.\n\
connections=<N>            Number of HTTP connections to use (default 16).\n\
cookie=<COOKIE>            Set HTTP/HTTPS cookies.\n\
cookiefile=                Enable cookie processing.\n\
cookiefile=<FILENAME>      Read cookies from file.\n\
cookiejar=<FILENAME>       Read and write cookies to jar.\n\
cookie-script=<SCRIPT>     Script to set HTTP/HTTPS cookies.\n\
cookie-script-renew=<SECS> Time to renew HTTP/HTTPS cookies.\n\
followlocation=false       Do not follow redirects.\n\
header=<HEADER>            Set HTTP/HTTPS header.\n\
header-script=<SCRIPT>     Script to set HTTP/HTTPS headers.\n\
header-script-renew=<SECS> Time to renew HTTP/HTTPS headers.\n\
http-version=none|1.0|1.1  Force a particular HTTP protocol.\n\
ipresolve=any|v4|v6        Force IPv4 or IPv6.\n\
password=<PASSWORD>        The password for the user account.\n\
protocols=PROTO,PROTO,..   Limit protocols allowed.\n\
proxy=<PROXY>              Set proxy URL.\n\
proxy-cainfo=<CAINFO>      Path to Certificate Authority file for proxy.\n\
proxy-capath=<CAPATH>      Path to directory with CA certificates for proxy.\n\
proxy-password=<PASSWORD>  The proxy password.\n\
proxy-user=<USER>          The proxy user.\n\
resolve=<HOST>:<PORT>:<ADDR> Custom host to IP address resolution.\n\
timeout=<TIMEOUT>          Set the timeout for requests (seconds).\n\
sslverify=false            Do not verify SSL certificate of remote host.\n\
ssl-version=<VERSION>      Specify preferred TLS/SSL version.\n\
ssl-cipher-list=C1:C2:..   Specify TLS/SSL cipher suites to be used.\n\
tls13-ciphers=C1:C2:..     Specify TLS 1.3 cipher suites to be used.\n\
tcp-keepalive=true         Enable TCP keepalives.\n\
tcp-nodelay=false          Disable Nagle’s algorithm.\n\
unix-socket-path=<PATH>    Open Unix domain socket instead of TCP/IP.\n\
url=<URL>       (required) The disk image URL to serve.\n\
user=<USER>                The user to log in as.\n\
user-agent=<USER-AGENT>    Send user-agent header for HTTP/HTTPS.",
        magic_key: Some("url"),
        api_version: 1,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: false,
        has: &["load", "unload", "dump_plugin", "config", "config_complete", "config_help", "get_ready",
               "after_fork", "open", "close", "get_size", "can_multi_conn", "_pread_v1", "_pwrite_v1"],
        new: || Box::<Curl>::default(),
    }
}
