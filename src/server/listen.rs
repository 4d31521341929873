//! Listening sockets: TCP (`-i`, `-p`, `-4`, `-6`), Unix (`-U`,
//! `-U -`) and vsock, bound before forking so errors reach the terminal.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use socket2::{Domain, Socket, Type};

use super::process::PrivateDir;
use crate::cli::{Config, Family, Unix};

/// What the server listens on.
pub enum Listeners {
    /// TCP sockets, one per address.
    Tcp(Vec<std::net::TcpListener>),
    /// A Unix socket; the private directory of `-U -` goes with it.
    Unix(UnixListener, PathBuf, Option<PrivateDir>),
    /// Listening sockets of any family, accepted from alike: those
    /// systemd passed (socket activation), or a vsock socket.
    Sockets(Vec<Socket>),
}

impl Listeners {
    /// The Unix socket path, if any.
    pub fn unix_path(&self) -> Option<String> {
        match self {
            Listeners::Unix(_, p, _) => Some(p.to_string_lossy().into_owned()),
            Listeners::Tcp(_) | Listeners::Sockets(_) => None,
        }
    }
}

/// Binds what `cfg` asks for (never called with `-s`).
pub fn bind(cfg: &Config) -> Result<Listeners, String> {
    if let Some(u) = &cfg.unix {
        let (path, private) = match u {
            Unix::Path(p) => (p.clone(), None),
            Unix::Private => {
                let d = PrivateDir::new().map_err(|e| format!("mkdtemp: /tmp/nbdkitXXXXXX: {e}"))?;
                (d.dir.join("socket"), Some(d))
            }
        };
        if path.as_os_str().len() >= 108 {
            return Err(format!("{}: path too long to be a Unix socket", path.display()));
        }
        let l = UnixListener::bind(&path).map_err(|e| format!("bind: {}: {}", path.display(), strip(e)))?;
        return Ok(Listeners::Unix(l, path, private));
    }
    if cfg.vsock {
        return super::service::bind_vsock(cfg.port.as_deref()).map(|s| Listeners::Sockets(vec![s]));
    }
    let port_str = cfg.port.as_deref().unwrap_or("10809");
    let port: u16 = match port_str.parse() {
        Ok(p) => p,
        Err(_) => service_port(port_str).ok_or_else(|| format!("getaddrinfo: {port_str}: Servname not supported for ai_socktype"))?,
    };
    let addrs: Vec<SocketAddr> = match &cfg.ipaddr {
        Some(host) => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("getaddrinfo: {host}: {port_str}: {}", strip(e)))?
            .collect(),
        None => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ],
    };
    let addrs = addrs.into_iter().filter(|a| match cfg.family {
        Family::Any => true,
        Family::V4 => a.is_ipv4(),
        Family::V6 => a.is_ipv6(),
    });
    let mut out = Vec::new();
    let mut last_err = None;
    for a in addrs {
        match bind_tcp(a) {
            Ok(l) => out.push(l),
            Err(e) => last_err = Some(e),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "unable to bind to any TCP/IP sockets: {}",
            last_err.map(strip).unwrap_or_else(|| "no addresses".into())
        ));
    }
    Ok(Listeners::Tcp(out))
}

fn bind_tcp(a: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(a), Type::STREAM.cloexec(), None)?;
    s.set_reuse_address(true)?;
    if a.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&a.into())?;
    s.listen(libc::SOMAXCONN)?;
    Ok(s.into())
}

/// A few service names getaddrinfo would know.
fn service_port(name: &str) -> Option<u16> {
    match name {
        "nbd" => Some(10809),
        _ => None,
    }
}

fn strip(e: io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
