//! A small HTTP/1.1 client for the curl plugin: keep-alive connections
//! over TCP, a Unix socket or an HTTP proxy (CONNECT for https), rustls for
//! TLS, redirects, and bodies read straight into the caller's buffer.
//! Response heads are parsed by `httparse`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::config::{check_scheme, Config, HeaderRule, Url};
use crate::error::{Error, Result};
use crate::util::log::debug_flag;

/// A response head: status, headers, HTTP/1.1?
type Head = (u16, Vec<(String, String)>, bool);

/// Redirects followed before giving up (libcurl's default since 8.3).
const MAX_REDIRECTS: u32 = 30;
/// The read buffer of a connection (heads, chunk lines, small bodies).
const CONN_BUF: usize = 4 * 1024;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Bodies of error and redirect responses up to this size are read and
/// dropped to keep the connection; bigger ones close it.
const MAX_DRAIN: u64 = 64 * 1024;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, Stream>>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
            Stream::Tls(s) => match s.read(b) {
                // A peer closing without close_notify: EOF for HTTP framing.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Stream {
    /// The socket of a plain (not TLS) stream.
    fn plain_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => Some(s.as_raw_fd()),
            Stream::Unix(s) => Some(s.as_raw_fd()),
            Stream::Tls(_) => None,
        }
    }
}

/// Bodies of at least this many bytes (what is left of them after the
/// bytes that came with the head) are read with `MSG_WAITALL`.
const WAITALL_MIN: usize = 16 * 1024;

/// Reads into `buf` from a plain socket with `MSG_WAITALL`: the kernel
/// copies the data as it arrives (the receive window stays open, unlike
/// with `SO_RCVLOWAT`) and the call returns once `buf` is full, at end of
/// stream, on the socket's timeout or on an error: one system call per
/// range body instead of one per burst of segments.
fn recv_waitall(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_WAITALL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One keep-alive connection.
pub struct Conn {
    key: String,
    rd: BufReader<Stream>,
    reused: bool,
}

/// The bounded pool shared by every NBD connection.
pub struct Pool {
    max: usize,
    state: Mutex<PoolState>,
    cv: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections in existence (idle, in use, or being made).
    total: usize,
}

/// A pool slot: counts towards `connections=` until dropped or given back.
pub struct Slot<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        match self.conn.take() {
            Some(c) => st.idle.push(c),
            None => st.total -= 1,
        }
        drop(st);
        self.pool.cv.notify_one();
    }
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool { max, state: Mutex::new(PoolState { idle: Vec::new(), total: 0 }), cv: Condvar::new() }
    }

    /// An idle connection for `key`, or a free slot to make one.
    fn get(&self, key: &str) -> (Slot<'_>, Option<Conn>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = st.idle.iter().rposition(|c| c.key == key) {
                let c = st.idle.swap_remove(i);
                pool_debug(|| format!("reusing connection to {key} ({} in pool)", st.total));
                return (Slot { pool: self, conn: None }, Some(c));
            }
            if st.total < self.max {
                st.total += 1;
                pool_debug(|| format!("new connection to {key} ({} in pool)", st.total));
                return (Slot { pool: self, conn: None }, None);
            }
            if !st.idle.is_empty() {
                // A slot held by an idle connection elsewhere: close it.
                st.idle.remove(0);
                pool_debug(|| format!("closing an idle connection for {key}"));
                return (Slot { pool: self, conn: None }, None);
            }
            pool_debug(|| "waiting for a free connection".to_string());
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Close every idle connection (cleanup).
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = st.idle.len();
        st.idle.clear();
        st.total -= n;
    }
}

fn pool_debug(f: impl FnOnce() -> String) {
    if debug_flag("curl", "pool") != 0 {
        crate::util::log::debug(&format!("pool: {}", f()));
    }
}

fn verbose() -> bool {
    debug_flag("curl", "verbose") != 0
}

/// Headers and cookies computed before each request (scripts, jar).
pub struct Extra {
    pub headers: Vec<HeaderRule>,
    pub cookie: Option<String>,
}

/// The response to one request, body not yet read.
pub struct Response<'a> {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub url: Url,
    slot: Slot<'a>,
    conn: Option<Conn>,
    body: Framing,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    /// Bytes left in the current chunk; `None` before the first chunk line.
    Chunked(Option<u64>),
    Close,
}

impl Response<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Body length if the server said it (Content-Length, not chunked).
    pub fn content_length(&self) -> Option<u64> {
        match self.body {
            Framing::Length(n) => Some(n),
            _ => self.header("content-length").and_then(|v| v.trim().parse().ok()),
        }
    }

    /// Read exactly `buf.len()` bytes of body: a shorter body is an error.
    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<()> {
        let conn = self.conn.as_mut().ok_or_else(|| Error::io("connection already closed"))?;
        while !buf.is_empty() {
            let n = match &mut self.body {
                Framing::Empty => 0,
                Framing::Length(left) => {
                    if *left == 0 {
                        0
                    } else {
                        let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        let fd = conn.rd.get_ref().plain_fd();
                        let n = match fd {
                            // Nothing buffered: straight from the socket.
                            Some(fd) if want >= WAITALL_MIN && conn.rd.buffer().is_empty() => {
                                recv_waitall(fd, &mut buf[..want])
                            }
                            _ => conn.rd.read(&mut buf[..want]),
                        }
                        .map_err(|e| io_err("reading body", e))?;
                        *left -= n as u64;
                        n
                    }
                }
                Framing::Chunked(left) => {
                    let l = match *left {
                        Some(0) => {
                            read_crlf(&mut conn.rd)?;
                            chunk_size(&mut conn.rd)?
                        }
                        Some(l) => l,
                        None => chunk_size(&mut conn.rd)?,
                    };
                    if l == 0 {
                        *left = Some(0);
                        self.body = Framing::Empty;
                        0
                    } else {
                        let want = buf.len().min(usize::try_from(l).unwrap_or(usize::MAX));
                        let n = conn.rd.read(&mut buf[..want]).map_err(|e| io_err("reading body", e))?;
                        *left = Some(l - n as u64);
                        n
                    }
                }
                Framing::Close => conn.rd.read(buf).map_err(|e| io_err("reading body", e))?,
            };
            if n == 0 {
                self.conn = None;
                return Err(Error::io(format!(
                    "short read from {}: the server sent less data than requested", self.url.display()
                )));
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// The body must be over now; a longer one is an error (and the
    /// connection is dropped, not drained).
    pub fn expect_end(&mut self) -> Result<()> {
        let over = || Error::io("the server sent more data than requested");
        match self.body {
            Framing::Empty | Framing::Length(0) => Ok(()),
            Framing::Length(_) => {
                self.conn = None;
                Err(over())
            }
            Framing::Chunked(left) => {
                let conn = self.conn.as_mut().ok_or_else(|| Error::io("connection closed"))?;
                if left.is_some() {
                    if left != Some(0) {
                        self.conn = None;
                        return Err(over());
                    }
                    read_crlf(&mut conn.rd)?;
                }
                if chunk_size(&mut conn.rd)? != 0 {
                    self.conn = None;
                    return Err(over());
                }
                self.body = Framing::Empty;
                skip_trailers(&mut conn.rd)
            }
            Framing::Close => {
                let mut b = [0u8; 1];
                let conn = self.conn.as_mut().ok_or_else(|| Error::io("connection closed"))?;
                let n = conn.rd.read(&mut b).map_err(|e| io_err("reading body", e))?;
                self.conn = None;
                if n == 0 { Ok(()) } else { Err(over()) }
            }
        }
    }

    /// Read and drop a small body so the connection can be reused.
    fn drain(&mut self) {
        let ok = match self.body {
            Framing::Empty => true,
            Framing::Length(n) if n <= MAX_DRAIN => {
                let mut b = vec![0u8; n as usize];
                self.read_exact(&mut b).is_ok()
            }
            _ => false,
        };
        if !ok {
            self.conn = None;
            self.body = Framing::Empty;
        }
    }

    /// Give the connection back to the pool if the body was fully read.
    pub fn finish(mut self) {
        if self.keep_alive && matches!(self.body, Framing::Empty | Framing::Length(0)) {
            if let Some(mut c) = self.conn.take() {
                c.reused = true;
                self.slot.conn = Some(c);
            }
        }
    }
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::io(format!("{what}: {e}"))
}

fn read_line(rd: &mut BufReader<Stream>) -> Result<String> {
    let mut line = Vec::new();
    let n = rd.by_ref().take(4096).read_until(b'\n', &mut line).map_err(|e| io_err("reading chunk", e))?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(Error::io("short read: connection closed inside a chunked body"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

fn read_crlf(rd: &mut BufReader<Stream>) -> Result<()> {
    if read_line(rd)?.is_empty() { Ok(()) } else { Err(Error::io("malformed chunked body")) }
}

fn chunk_size(rd: &mut BufReader<Stream>) -> Result<u64> {
    let l = read_line(rd)?;
    let hex = l.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(hex, 16).map_err(|_| Error::io(format!("malformed chunk size: {l:?}")))
}

fn skip_trailers(rd: &mut BufReader<Stream>) -> Result<()> {
    for _ in 0..100 {
        if read_line(rd)?.is_empty() {
            return Ok(());
        }
    }
    Err(Error::io("too many trailers"))
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The client: configuration, TLS, pool.
pub struct Client {
    cfg: Config,
    tls: Arc<ClientConfig>,
    proxy_tls: Arc<ClientConfig>,
    proxy: Option<Url>,
    pub pool: Pool,
    origin: Url,
    /// The cookie engine, if `cookiefile`/`cookiejar` turned it on.
    pub jar: Option<super::scripts::Jar>,
}

/// What a request carries.
pub struct Req<'b> {
    pub method: &'static str,
    pub range: Option<(u64, u64)>,
    pub body: &'b [u8],
}

impl Client {
    pub fn new(cfg: Config, origin: Url) -> Result<Client> {
        let tls = super::tls::client_config(&cfg, false)?;
        let proxy_tls = super::tls::client_config(&cfg, true)?;
        let proxy = cfg
            .proxy
            .as_deref()
            .map(|p| Url::parse(&if p.contains("://") { p.to_string() } else { format!("http://{p}") }))
            .transpose()?;
        let pool = Pool::new(cfg.connections as usize);
        Ok(Client { cfg, tls, proxy_tls, proxy, pool, origin, jar: None })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>> {
        let lower = host.to_ascii_lowercase();
        let mut addrs: Vec<SocketAddr> =
            match self.cfg.resolve.iter().find(|(h, p, _)| *h == lower && *p == port) {
                Some((_, _, a)) => vec![SocketAddr::new(a.parse::<IpAddr>().map_err(|_| Error::invalid("resolve"))?, port)],
                None => (host, port)
                    .to_socket_addrs()
                    .map_err(|e| Error::io(format!("could not resolve host {host}: {e}")))?
                    .collect(),
            };
        match self.cfg.ipresolve.as_str() {
            "v4" => addrs.retain(|a| a.is_ipv4()),
            "v6" => addrs.retain(|a| a.is_ipv6()),
            _ => {}
        }
        if addrs.is_empty() {
            return Err(Error::io(format!("could not resolve host {host}")));
        }
        Ok(addrs)
    }

    fn tcp(&self, host: &str, port: u16) -> Result<Stream> {
        let mut last = None;
        for a in self.resolve(host, port)? {
            let r = match self.cfg.timeout {
                Some(t) => TcpStream::connect_timeout(&a, t),
                None => TcpStream::connect(a),
            };
            match r {
                Ok(s) => {
                    let _ = s.set_nodelay(self.cfg.tcp_nodelay);
                    if self.cfg.tcp_keepalive {
                        let _ = socket2::SockRef::from(&s).set_keepalive(true);
                    }
                    s.set_read_timeout(self.cfg.timeout).ok();
                    s.set_write_timeout(self.cfg.timeout).ok();
                    return Ok(Stream::Tcp(s));
                }
                Err(e) => last = Some((a, e)),
            }
        }
        let (a, e) = last.expect("resolve returns at least one address");
        Err(Error::io(format!("failed to connect to {host} port {port} ({a}): {e}")))
    }

    fn tls_wrap(&self, s: Stream, host: &str, config: &Arc<ClientConfig>) -> Result<Stream> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| Error::invalid(format!("invalid TLS server name {host}: {e}")))?;
        let conn = ClientConnection::new(config.clone(), name).map_err(|e| Error::io(format!("TLS: {e}")))?;
        let mut st = StreamOwned::new(conn, s);
        // Handshake now, so a certificate error is reported as such.
        while st.conn.is_handshaking() {
            st.conn.complete_io(&mut st.sock).map_err(|e| Error::io(format!("TLS handshake with {host}: {e}")))?;
        }
        Ok(Stream::Tls(Box::new(st)))
    }

    fn key(&self, u: &Url) -> String {
        format!("{}://{}:{}", u.scheme, u.host, u.port)
    }

    /// A new connection to the server of `u` (directly, over the Unix
    /// socket, or through the proxy).
    fn connect(&self, u: &Url) -> Result<Conn> {
        let https = u.scheme == "https";
        let stream = if let Some(path) = &self.cfg.unix_socket_path {
            let s = UnixStream::connect(path)
                .map_err(|e| Error::io(format!("failed to connect to Unix socket {}: {e}", path.display())))?;
            s.set_read_timeout(self.cfg.timeout).ok();
            s.set_write_timeout(self.cfg.timeout).ok();
            Stream::Unix(s)
        } else if let Some(p) = &self.proxy {
            let mut s = self.tcp(&p.host, p.port)?;
            if p.scheme == "https" {
                s = self.tls_wrap(s, &p.host, &self.proxy_tls)?;
            }
            if https {
                s = self.connect_tunnel(s, u)?;
            }
            s
        } else {
            self.tcp(&u.host, u.port)?
        };
        let stream = if https { self.tls_wrap(stream, &u.host, &self.tls)? } else { stream };
        // A small buffer: the head and the first bytes of the body land in
        // it, the rest of a range body is read straight into the caller's
        // buffer (a bigger one would make most of a 64 KiB body a second
        // copy).
        Ok(Conn { key: self.key(u), rd: BufReader::with_capacity(CONN_BUF, stream), reused: false })
    }

    fn proxy_auth(&self) -> Option<String> {
        let p = self.proxy.as_ref()?;
        let user = self.cfg.proxy_user.clone().or_else(|| p.user.clone())?;
        let pass = self.cfg.proxy_password.clone().or_else(|| p.password.clone()).unwrap_or_default();
        Some(format!("Basic {}", base64(format!("{user}:{pass}").as_bytes())))
    }

    fn connect_tunnel(&self, s: Stream, u: &Url) -> Result<Stream> {
        let mut rd = BufReader::new(s);
        let hp = format!("{}:{}", if u.host.contains(':') { format!("[{}]", u.host) } else { u.host.clone() }, u.port);
        let mut head = format!("CONNECT {hp} HTTP/1.1\r\nHost: {hp}\r\n");
        if let Some(a) = self.proxy_auth() {
            head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        head.push_str("\r\n");
        log_out(&head);
        rd.get_mut().write_all(head.as_bytes()).map_err(|e| io_err("proxy CONNECT", e))?;
        let (status, _, _) = read_head(&mut rd)?;
        if status / 100 != 2 {
            return Err(Error::io(format!("proxy CONNECT to {hp} failed with HTTP status {status}")));
        }
        if !rd.buffer().is_empty() {
            return Err(Error::io("proxy sent data after CONNECT reply"));
        }
        Ok(rd.into_inner())
    }

    fn request_head(&self, u: &Url, req: &Req<'_>, extra: &Extra) -> String {
        let via_proxy = self.proxy.is_some() && u.scheme == "http" && self.cfg.unix_socket_path.is_none();
        let target = if via_proxy { u.display() } else { u.target.clone() };
        let version = if self.cfg.http_version == "1.0" { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut defaults: Vec<(String, String)> = vec![("Host".into(), u.host_header())];
        let same_origin = u.host.eq_ignore_ascii_case(&self.origin.host) && u.port == self.origin.port;
        let user = self.cfg.user.clone().or_else(|| u.user.clone());
        if let (Some(user), true) = (user, same_origin) {
            let pass = self.cfg.password.clone().or_else(|| u.password.clone()).unwrap_or_default();
            defaults.push(("Authorization".into(), format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))));
        }
        if via_proxy {
            if let Some(a) = self.proxy_auth() {
                defaults.push(("Proxy-Authorization".into(), a));
            }
        }
        if let Some(ua) = &self.cfg.user_agent {
            defaults.push(("User-Agent".into(), ua.clone()));
        }
        defaults.push(("Accept".into(), "*/*".into()));
        if let Some((a, b)) = req.range {
            defaults.push(("Range".into(), format!("bytes={a}-{b}")));
        }
        if let Some(c) = &extra.cookie {
            defaults.push(("Cookie".into(), c.clone()));
        }
        if let (Some((a, b)), "PUT") = (req.range, req.method) {
            defaults.retain(|(n, _)| n != "Range");
            defaults.push(("Content-Range".into(), format!("bytes {a}-{b}/*")));
        }
        if req.method == "PUT" {
            defaults.push(("Content-Length".into(), req.body.len().to_string()));
        }
        let mut custom: Vec<(String, String)> = Vec::new();
        for h in &extra.headers {
            let (n, v) = match h {
                HeaderRule::Set(n, v) => (n, Some(v.clone())),
                HeaderRule::Empty(n) => (n, Some(String::new())),
                HeaderRule::Remove(n) => (n, None),
            };
            defaults.retain(|(d, _)| !d.eq_ignore_ascii_case(n));
            if let Some(v) = v {
                custom.push((n.clone(), v));
            }
        }
        use std::fmt::Write as _;
        let mut head = String::with_capacity(256);
        let _ = write!(head, "{} {} {}\r\n", req.method, target, version);
        for (n, v) in defaults.iter().chain(custom.iter()) {
            if v.is_empty() {
                let _ = write!(head, "{n}:\r\n");
            } else {
                let _ = write!(head, "{n}: {v}\r\n");
            }
        }
        head.push_str("\r\n");
        head
    }

    /// One request/response exchange on `conn`.
    fn exchange(&self, conn: &mut Conn, u: &Url, req: &Req<'_>, extra: &Extra)
                -> std::result::Result<Head, (bool, Error)> {
        let head = self.request_head(u, req, extra);
        log_out(&head);
        let w = conn.rd.get_mut();
        let sent = w.write_all(head.as_bytes()).and_then(|()| w.write_all(req.body)).and_then(|()| w.flush());
        if let Err(e) = sent {
            return Err((true, io_err("sending request", e)));
        }
        match conn.rd.fill_buf() {
            // Nothing came back: a keep-alive connection the server closed.
            Ok([]) => {
                return Err((true, Error::io(format!("the server at {} closed the connection", u.host_header()))))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err((true, io_err("reading response", e))),
            Err(e) => return Err((false, io_err("reading response", e))),
        }
        read_head(&mut conn.rd).map_err(|e| (false, e))
    }

    /// Send a request, following redirects; a status ≥ 400 is an error
    /// (`Err` carries the status for the 403 fallback).
    pub fn send<'a>(&'a self, req: &Req<'_>, extra: &dyn Fn(&Url) -> Result<Extra>)
                    -> std::result::Result<Response<'a>, (Option<u16>, Error)> {
        let mut u = self.origin.clone();
        let mut method = req.method;
        for _ in 0..=MAX_REDIRECTS {
            check_scheme(&u, self.cfg.protocols.as_deref()).map_err(|e| (None, e))?;
            if u.scheme == "file" {
                return Err((None, Error::io("redirect to a file: URL is not followed")));
            }
            let ex = extra(&u).map_err(|e| (None, e))?;
            let key = self.key(&u);
            let r = Req { method, range: req.range, body: req.body };
            let mut attempt = 0;
            let (slot, conn, status, headers, version11) = loop {
                attempt += 1;
                let (slot, idle) = self.pool.get(&key);
                let mut conn = match idle {
                    Some(c) => c,
                    None => self.connect(&u).map_err(|e| (None, e))?,
                };
                match self.exchange(&mut conn, &u, &r, &ex) {
                    Ok((s, h, v)) => break (slot, conn, s, h, v),
                    Err((retry, e)) => {
                        if retry && conn.reused && attempt == 1 {
                            continue;
                        }
                        return Err((None, e));
                    }
                }
            };
            if let Some(jar) = &self.jar {
                for (_, v) in headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")) {
                    jar.set_cookie(&u, v);
                }
            }
            let get = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
            let has = |v: &str, word: &str| v.as_bytes().windows(word.len()).any(|w| w.eq_ignore_ascii_case(word.as_bytes()));
            let conn_hdr = get("connection").unwrap_or_default();
            let keep_alive = if version11 { !has(conn_hdr, "close") } else { has(conn_hdr, "keep-alive") };
            let body = if method == "HEAD" || status == 204 || status == 304 {
                Framing::Empty
            } else if get("transfer-encoding").is_some_and(|t| has(t, "chunked")) {
                Framing::Chunked(None)
            } else if let Some(cl) = get("content-length") {
                Framing::Length(cl.trim().parse().map_err(|_| (None, Error::io(format!("bad Content-Length: {cl}"))))?)
            } else {
                Framing::Close
            };
            let mut resp = Response { status, headers, url: u.clone(), slot, conn: Some(conn), body, keep_alive };
            if matches!(status, 301 | 302 | 303 | 307 | 308) && self.cfg.followlocation {
                if let Some(loc) = resp.header("location") {
                    let next = u.join(loc).map_err(|e| (None, e))?;
                    if verbose() {
                        crate::util::log::debug(&format!("Issue another request to this URL: '{}'", next.display()));
                    }
                    resp.drain();
                    resp.finish();
                    if status == 303 && method != "HEAD" {
                        method = "GET";
                    }
                    u = next;
                    continue;
                }
            }
            if status >= 400 {
                resp.drain();
                resp.finish();
                return Err((Some(status), Error::io(format!("HTTP response code said error: The requested URL returned error: {status}"))));
            }
            return Ok(resp);
        }
        Err((None, Error::io(format!("maximum ({MAX_REDIRECTS}) redirects followed"))))
    }
}

fn log_out(head: &str) {
    if verbose() {
        for l in head.lines().filter(|l| !l.is_empty()) {
            crate::util::log::debug(&format!("C: {l}"));
        }
    }
}

/// Read a response head (skipping 1xx): status, headers, HTTP/1.1?
fn read_head(rd: &mut BufReader<Stream>) -> Result<Head> {
    // The usual case: the whole head is in the buffer already: parsed in
    // place (no line-by-line copies).
    loop {
        let avail = rd.buffer();
        let Some(end) = avail.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else { break };
        let mut hs = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut hs);
        let Ok(httparse::Status::Complete(n)) = r.parse(&avail[..end]) else { break };
        if n != end {
            break;
        }
        let status = r.code.unwrap_or(0);
        if verbose() {
            for l in String::from_utf8_lossy(&avail[..end]).lines().filter(|l| !l.is_empty()) {
                crate::util::log::debug(&format!("S: {l}"));
            }
        }
        if (100..200).contains(&status) {
            rd.consume(end);
            continue;
        }
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
            .collect();
        let v11 = r.version == Some(1);
        rd.consume(end);
        return Ok((status, headers, v11));
    }
    for _ in 0..16 {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = rd
                .by_ref()
                .take((MAX_HEAD - buf.len()) as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err("reading response", e))?;
            if n == 0 {
                return Err(Error::io("the server closed the connection before the response ended"));
            }
            buf.extend_from_slice(&line);
            if buf.len() > MAX_HEAD {
                return Err(Error::io("response head too large"));
            }
            if line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        let mut hs = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut hs);
        match r.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(Error::io("incomplete response head")),
            Err(e) => return Err(Error::io(format!("malformed response from server: {e}"))),
        }
        let status = r.code.unwrap_or(0);
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
            .collect();
        if verbose() {
            for l in String::from_utf8_lossy(&buf).lines().filter(|l| !l.is_empty()) {
                crate::util::log::debug(&format!("S: {l}"));
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        return Ok((status, headers, r.version == Some(1)));
    }
    Err(Error::io("too many interim (1xx) responses"))
}

/// Parse `Content-Range: bytes A-B/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, _total) = v.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads read from the connection buffer in place (whole head there,
    /// after a 1xx), line by line (head split across writes, bare LF),
    /// and the body left for the caller in both cases.
    #[test]
    fn response_heads_in_place_and_split() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut rd = BufReader::with_capacity(CONN_BUF, Stream::Unix(a));
        b.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\nX-A:  b \r\n\r\nabc").unwrap();
        let (st, h, v11) = read_head(&mut rd).unwrap();
        assert_eq!((st, v11), (206, true));
        assert_eq!(h, vec![("Content-Length".into(), "3".into()), ("X-A".into(), "b".into())]);
        let mut body = [0; 3];
        rd.read_exact(&mut body).unwrap();
        assert_eq!(&body, b"abc");
        let t = std::thread::spawn(move || {
            b.write_all(b"HTTP/1.0 200 OK\nConn").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            b.write_all(b"ection: close\n\nxy").unwrap();
        });
        let (st, h, v11) = read_head(&mut rd).unwrap();
        assert_eq!((st, v11), (200, false));
        assert_eq!(h, vec![("Connection".into(), "close".into())]);
        t.join().unwrap();
        let mut body = [0; 2];
        rd.read_exact(&mut body).unwrap();
        assert_eq!(&body, b"xy");
    }

    #[test]
    fn base64_encodes() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-511/1024"), Some((0, 511)));
        assert_eq!(parse_content_range("bytes 5-4/1024"), None);
        assert_eq!(parse_content_range("bytes */1024"), None);
        assert_eq!(parse_content_range("0-1/2"), None);
    }
}
