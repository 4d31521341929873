//! The relay of an upgraded connection: the client's socket on one side,
//! one end of a Unix socket pair on the other, the TLS session between.
//!
//! Thread "up" does the handshake (bounded by the handshake timeout: the
//! connection task shuts the socket down when it fires), then reads
//! records from the client and writes their plaintext into the pair.
//! Thread "down" reads replies from the pair, in chunks of up to 256 KiB,
//! and writes them to the client as records. The session is behind one
//! lock, which is also what orders writes to the client socket (records
//! carry sequence numbers: they must leave in the order they were made).
//! When the client hangs up the pair is shut for writing, so the server
//! side sees the end of the connection; when the server side closes the
//! pair, close_notify goes out and the socket is shut down.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use async_io::Async;

use super::engine::Engine;
use super::{Fds, Tls};
use crate::server::process;
use crate::util::log;

/// The plaintext side of an upgraded connection, for the negotiation
/// (async) and then the transmission phase (its descriptor, duplicated).
pub struct Upgraded {
    /// Reads plaintext from the client.
    pub reader: PairIo,
    /// Writes plaintext to the client.
    pub writer: PairIo,
    /// The pair end under both.
    pub fd: RawFd,
}

/// Chunk read from either side at once.
const CHUNK: usize = 256 * 1024;

type Shared = Arc<Mutex<Box<dyn Engine>>>;

/// Starts TLS on a connection whose STARTTLS has just been acknowledged:
/// the handshake and the relay run on two threads; what the client sends
/// after the handshake comes out of the returned pair end.
pub fn upgrade(tls: &Tls, fds: Fds) -> io::Result<Upgraded> {
    let (ours, theirs) = UnixStream::pair()?;
    let r = process::dup_fd(fds.0)?;
    let w = process::dup_fd(fds.1)?;
    process::set_blocking(r.as_raw_fd())?;
    process::set_blocking(w.as_raw_fd())?;
    let engine: Shared = Arc::new(Mutex::new(tls.engine()?));
    let ctx = log::context();
    let (r, w) = (File::from(r), Arc::new(File::from(w)));
    std::thread::Builder::new()
        .name("tls-up".into())
        .spawn(move || {
            log::set_context(ctx);
            up(engine, r, w, theirs)
        })?;
    let fd = ours.as_raw_fd();
    let a = Arc::new(Async::new(ours)?);
    Ok(Upgraded { reader: PairIo(a.clone()), writer: PairIo(a), fd })
}

fn lock(e: &Shared) -> std::sync::MutexGuard<'_, Box<dyn Engine>> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

fn up(engine: Shared, mut client: File, out: Arc<File>, pair: UnixStream) {
    let mut raw = vec![0u8; CHUNK];
    let mut plain = Vec::new();
    if let Err(e) = handshake(&engine, &mut client, &out, &mut raw, &mut plain) {
        log::error(&format!("TLS handshake: {e}"));
        let _ = pair.shutdown(std::net::Shutdown::Both);
        shut(out.as_raw_fd());
        return;
    }
    crate::debug!("using TLS on this connection");
    if log::debug_flag("nbdkit", "tls_session") != 0 {
        log::debug(&lock(&engine).describe());
    }
    let down_pair = match pair.try_clone() {
        Ok(p) => p,
        Err(e) => {
            log::error(&format!("TLS relay: {e}"));
            shut(out.as_raw_fd());
            return;
        }
    };
    let (e2, o2, ctx) = (engine.clone(), out.clone(), log::context());
    let spawned = std::thread::Builder::new().name("tls-down".into()).spawn(move || {
        log::set_context(ctx);
        down(e2, o2, down_pair)
    });
    if spawned.is_err() {
        log::error("TLS relay: cannot start a thread");
        shut(out.as_raw_fd());
        return;
    }
    let mut to_server = &pair;
    loop {
        if !plain.is_empty() {
            if to_server.write_all(&plain).is_err() {
                break;
            }
            plain.clear();
        }
        let n = match client.read(&mut raw) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut e = lock(&engine);
        let fed = e.feed(&raw[..n], &mut plain);
        // Alerts, key updates: whatever the session has to say goes now.
        let flushed = e.flush_to(&mut &*out);
        drop(e);
        match fed {
            Err(err) => {
                crate::debug!("TLS: {err}: closing connection");
                break;
            }
            Ok(true) => {
                let _ = to_server.write_all(&plain);
                break;
            }
            Ok(false) => {}
        }
        if flushed.is_err() {
            break;
        }
    }
    // The client is gone: the server side reads the end of the connection.
    let _ = pair.shutdown(std::net::Shutdown::Write);
}

fn handshake(engine: &Shared, client: &mut File, out: &File, raw: &mut [u8], plain: &mut Vec<u8>) -> io::Result<()> {
    loop {
        {
            let mut e = lock(engine);
            e.flush_to(&mut &*out)?;
            if !e.handshaking() {
                return Ok(());
            }
        }
        let n = client.read(raw)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client hung up"));
        }
        let mut e = lock(engine);
        if let Err(err) = e.feed(&raw[..n], plain) {
            let _ = e.flush_to(&mut &*out); // the alert
            return Err(err);
        }
    }
}

fn down(engine: Shared, out: Arc<File>, mut pair: UnixStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match pair.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut e = lock(&engine);
        if e.encrypt(&buf[..n]).and_then(|()| e.flush_to(&mut &*out)).is_err() {
            drop(e);
            // The client cannot be written to: the server side must stop.
            let _ = pair.shutdown(std::net::Shutdown::Both);
            shut(out.as_raw_fd());
            return;
        }
    }
    let mut e = lock(&engine);
    e.close();
    let _ = e.flush_to(&mut &*out);
    drop(e);
    shut(out.as_raw_fd());
}

/// Shuts the client's socket down (wakes "up" blocked in read).
#[allow(unsafe_code)]
fn shut(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor this relay owns; ENOTSOCK on
    // pipes (-s) is harmless.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Async reads and writes on the pair end (`&Async<T>` does I/O).
pub struct PairIo(Arc<Async<UnixStream>>);

impl futures_lite::AsyncRead for PairIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl futures_lite::AsyncWrite for PairIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_close(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_close(cx)
    }
}
