//! TLS on a connection: the handshake and the rest of the negotiation on
//! the async side ([`handshake`], [`AsyncIn`], [`AsyncOut`]), then the
//! transmission phase's blocking streams ([`Input`], [`Output`]), which
//! the worker threads use like the plain socket.
//!
//! The handshake runs on the engine alone (one task); then the session is
//! two halves (records.rs). The receive half belongs to the connection's
//! one reader ([`AsyncIn`] during the negotiation, then [`TlsIn`]), which
//! reads and decrypts without any lock. The send half is the writers',
//! behind the send lock ([`Link`]); whoever holds it seals a reply and
//! writes the records to the socket, so records leave in the order they
//! were sealed. What the receive half needs sent (a fatal alert, the
//! answer to a KeyUpdate, a renegotiation refused) it hands to the send
//! half under that lock: the transmission's reader takes it briefly and
//! writes the records out itself.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::records::{Rx, Tx};
use super::Tls;

/// What is read from the socket at once (much more than a record).
const RAW: usize = 256 * 1024;
/// A read into a buffer at least this big takes the ciphertext straight
/// into it (see [`TlsIn`]). Not the memory plugin's 32 KiB pages, which a
/// WRITE fills through one vectored read: there a read per page, and the
/// record cut at each page's end moved back and forth, would cost about
/// what the copy out of the raw buffer saves.
const DIRECT: usize = 64 * 1024;

/// A connection's TLS session after the handshake.
pub struct Link {
    /// The send half, shared by the writers (the send lock).
    tx: Mutex<Tx>,
    /// The receive half and the plaintext the negotiation read but did not
    /// use (the first bytes of the transmission phase), from [`AsyncIn`]
    /// to [`Input`].
    rx: Mutex<Option<(Rx, Vec<u8>)>>,
}

impl Link {
    fn tx(&self) -> MutexGuard<'_, Tx> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type DynRead = Box<dyn AsyncRead + Unpin + Send>;
type DynWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// The TLS handshake after STARTTLS was acknowledged, on the
/// connection's streams (under the handshake timeout); then the streams
/// are replaced by ones that go through the session.
pub async fn upgrade(tls: &Tls, r: &mut DynRead, w: &mut DynWrite) -> io::Result<Arc<Link>> {
    let mut engine = tls.engine()?;
    let mut raw = vec![0u8; 64 * 1024];
    let mut plain = Vec::new();
    let result = async {
        loop {
            let mut out = Vec::new();
            engine.flush_to(&mut out)?;
            let busy = engine.handshaking();
            if !out.is_empty() {
                w.write_all(&out).await?;
                w.flush().await?;
            }
            if !busy {
                return Ok(());
            }
            let n = r.read(&mut raw).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client hung up"));
            }
            let fed = engine.feed(&raw[..n], &mut plain);
            if let Err(err) = fed {
                let mut out = Vec::new();
                let _ = engine.flush_to(&mut out); // the alert
                let _ = w.write_all(&out).await;
                let _ = w.flush().await;
                return Err(err);
            }
        }
    }
    .await;
    if let Err(e) = result {
        crate::util::log::error(&format!("TLS handshake: {e}"));
        return Err(e);
    }
    crate::debug!("using TLS on this connection");
    if crate::util::log::debug_flag("nbdkit", "tls_session") != 0 {
        for line in engine.describe().lines() {
            crate::util::log::debug(line);
        }
    }
    let (rx, tx) = engine.into_session()?.split();
    let link = Arc::new(Link { tx: Mutex::new(tx), rx: Mutex::new(None) });
    let old_r = std::mem::replace(r, Box::new(futures_lite::io::empty()));
    let old_w = std::mem::replace(w, Box::new(futures_lite::io::sink()));
    *r = Box::new(AsyncIn { inner: old_r, link: link.clone(), rx: Some(rx), raw, plain, at: 0, eof: false });
    *w = Box::new(AsyncOut { inner: old_w, link: link.clone(), out: Vec::new(), at: 0 });
    Ok(link)
}

/// Plaintext from the client during the negotiation.
pub struct AsyncIn {
    inner: DynRead,
    link: Arc<Link>,
    /// The receive half (until dropped: then the transmission's).
    rx: Option<Rx>,
    raw: Vec<u8>,
    plain: Vec<u8>,
    at: usize,
    eof: bool,
}

impl AsyncRead for AsyncIn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        loop {
            if me.at < me.plain.len() {
                let n = buf.len().min(me.plain.len() - me.at);
                buf[..n].copy_from_slice(&me.plain[me.at..me.at + n]);
                me.at += n;
                if me.at == me.plain.len() {
                    me.plain.clear();
                    me.at = 0;
                }
                return Poll::Ready(Ok(n));
            }
            if me.eof {
                return Poll::Ready(Ok(0));
            }
            let n = match Pin::new(&mut me.inner).poll_read(cx, &mut me.raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => n,
            };
            let Some(rx) = me.rx.as_mut() else { return Poll::Ready(Err(no_session())) };
            let fed = rx.feed(&me.raw[..n], &mut me.plain);
            // (What the session has to say back goes out with the next reply.)
            let applied = if rx.has_events() { me.link.tx().apply(rx) } else { Ok(()) };
            me.eof = fed?;
            applied?;
        }
    }
}

impl Drop for AsyncIn {
    fn drop(&mut self) {
        let rest = self.plain.split_off(self.at);
        if let Some(rx) = self.rx.take() {
            *self.link.rx.lock().unwrap_or_else(|p| p.into_inner()) = Some((rx, rest));
        }
    }
}

fn no_session() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS: no session")
}

/// Plaintext to the client during the negotiation.
pub struct AsyncOut {
    inner: DynWrite,
    link: Arc<Link>,
    out: Vec<u8>,
    at: usize,
}

impl AsyncOut {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.at < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.at..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.at += n,
            }
        }
        self.out.clear();
        self.at = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AsyncOut {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        if me.at < me.out.len() {
            return Poll::Pending;
        }
        let mut t = me.link.tx();
        t.encrypt(buf)?;
        t.flush_to(&mut me.out)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.out.is_empty() {
            // Records the reader's side made (alerts, key updates).
            me.link.tx().flush_to(&mut me.out)?;
        }
        match me.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut me.inner).poll_flush(cx),
            p => p,
        }
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_close(cx),
            p => p,
        }
    }
}

/// The client → server stream of the transmission phase.
pub enum Input {
    /// The socket itself.
    Plain(File),
    /// Through TLS.
    Tls(Box<TlsIn>),
}

/// The server → client stream of the transmission phase.
pub enum Output {
    /// The socket itself.
    Plain(File),
    /// Through TLS.
    Tls(TlsOut),
}

impl Input {
    /// Over `link` on the socket `sock` (blocking).
    pub fn tls(link: &Arc<Link>, sock: File) -> Input {
        let taken = link.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (mut rx, plain) = match taken {
            Some((rx, plain)) => (Some(rx), plain),
            None => (None, Vec::new()),
        };
        // A record the negotiation's reader had begun: this one frames them.
        let mut raw = vec![0; RAW];
        let begun = rx.as_mut().map(Rx::take_pending).unwrap_or_default();
        raw[..begun.len()].copy_from_slice(&begun);
        Input::Tls(Box::new(TlsIn { link: link.clone(), rx, sock, raw, rpos: 0, rend: begun.len(), plain, at: 0, eof: false }))
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Input::Plain(f) => f.as_raw_fd(),
            Input::Tls(t) => t.sock.as_raw_fd(),
        }
    }

    /// True for the plain socket (the zero-copy and TCP paths are for it only).
    pub fn is_plain(&self) -> bool {
        matches!(self, Input::Plain(_))
    }
}

impl Output {
    /// Over `link` on the socket `sock` (blocking).
    pub fn tls(link: &Arc<Link>, sock: File) -> Output {
        Output::Tls(TlsOut { link: link.clone(), sock })
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Output::Plain(f) => f.as_raw_fd(),
            Output::Tls(t) => t.sock.as_raw_fd(),
        }
    }
}

impl Read for Input {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Plain(f) => f.read(buf),
            Input::Tls(t) => t.read(buf),
        }
    }
    #[inline]
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Input::Plain(f) => f.read_vectored(bufs),
            Input::Tls(t) => t.read_vectored(bufs),
        }
    }
}

impl Write for Output {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Plain(f) => f.write(buf),
            Output::Tls(t) => t.write_vectored(&[IoSlice::new(buf)]),
        }
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Output::Plain(f) => f.write_vectored(bufs),
            Output::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decrypts what comes from the socket, without any lock. A big read
/// takes the ciphertext straight into the caller's buffer and the records
/// are decrypted there, their plaintext moved together over the headers
/// and tags (no copy but the kernel's); otherwise whole records go
/// straight into the caller's buffers when they fit there (one copy, out
/// of the read buffer), the others through `plain`.
pub struct TlsIn {
    link: Arc<Link>,
    /// The receive half: this reader's alone.
    rx: Option<Rx>,
    sock: File,
    /// What was read from the socket: `raw[rpos..rend]` is not decrypted yet.
    raw: Vec<u8>,
    rpos: usize,
    rend: usize,
    /// Plaintext of records that did not fit where the caller wanted it.
    plain: Vec<u8>,
    at: usize,
    eof: bool,
}

impl TlsIn {
    /// Sends what the receive half asked for, if anything (an alert, the
    /// answer to a KeyUpdate: the send lock, briefly); then `r`.
    fn settle<T>(link: &Link, sock: &File, rx: &mut Rx, r: io::Result<T>) -> io::Result<T> {
        if !rx.has_events() {
            return r;
        }
        let mut t = link.tx();
        let sent = t.apply(rx).and_then(|()| t.flush_to(&mut Retry(sock)));
        let v = r?;
        sent?;
        Ok(v)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let Some(rx) = self.rx.as_mut() else { return Err(no_session()) };
        loop {
            if self.at < self.plain.len() {
                let mut n = 0;
                for b in bufs.iter_mut() {
                    let k = b.len().min(self.plain.len() - self.at);
                    b[..k].copy_from_slice(&self.plain[self.at..self.at + k]);
                    self.at += k;
                    n += k;
                    if self.at == self.plain.len() {
                        self.plain.clear();
                        self.at = 0;
                        break;
                    }
                }
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            // A big read and no whole record buffered: the socket straight
            // into the caller's buffer, the records decrypted there.
            if let Some(b) = bufs.iter_mut().find(|b| !b.is_empty()).filter(|b| b.len() >= DIRECT) {
                let r = rx.record_len(&self.raw[self.rpos..self.rend]);
                if TlsIn::settle(&self.link, &self.sock, rx, r)?.is_none() {
                    let m = self.rend - self.rpos;
                    b[..m].copy_from_slice(&self.raw[self.rpos..self.rend]);
                    // (On an error raw still has the start of the record.)
                    let k = self.sock.read(&mut b[m..])?;
                    (self.rpos, self.rend) = (0, 0);
                    if k == 0 {
                        self.eof = true;
                        return Ok(0);
                    }
                    let r = rx.open_all(&mut b[..m + k]);
                    let (n, used) = TlsIn::settle(&self.link, &self.sock, rx, r)?;
                    if rx.closed() {
                        self.eof = true;
                    } else {
                        self.rend = m + k - used;
                        self.raw[..self.rend].copy_from_slice(&b[used..m + k]);
                    }
                    if n > 0 || self.eof {
                        return Ok(n);
                    }
                    continue;
                }
            }
            // Whole records into the caller's buffers, in order, while they fit.
            let (mut n, mut more, mut big) = (0, false, None);
            'bufs: for b in bufs.iter_mut() {
                let mut off = 0;
                loop {
                    let r = rx.record_len(&self.raw[self.rpos..self.rend]);
                    let Some(len) = TlsIn::settle(&self.link, &self.sock, rx, r)? else {
                        more = true;
                        break 'bufs;
                    };
                    let r = rx.open_into(&self.raw[self.rpos..self.rpos + len], &mut b[off..]);
                    match TlsIn::settle(&self.link, &self.sock, rx, r)? {
                        Some(k) => {
                            self.rpos += len;
                            off += k;
                            n += k;
                            if rx.closed() {
                                self.eof = true;
                                break 'bufs;
                            }
                        }
                        None if off == b.len() => continue 'bufs,
                        None => {
                            big = Some(len);
                            break 'bufs;
                        }
                    }
                }
            }
            if n > 0 || self.eof {
                return Ok(n);
            }
            if let Some(len) = big {
                // More than the room left: through `plain`.
                let r = rx.feed(&self.raw[self.rpos..self.rpos + len], &mut self.plain);
                self.rpos += len;
                self.eof = TlsIn::settle(&self.link, &self.sock, rx, r)?;
                continue;
            }
            if !more {
                // (Every buffer has no room at all.)
                return Ok(0);
            }
            // The rest of a record: read more, without any lock.
            if self.rpos > 0 {
                self.raw.copy_within(self.rpos..self.rend, 0);
                self.rend -= self.rpos;
                self.rpos = 0;
            }
            let k = self.sock.read(&mut self.raw[self.rend..])?;
            if k == 0 {
                self.eof = true;
            }
            self.rend += k;
        }
    }
}

impl Read for TlsIn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }
}

/// Encrypts replies and writes them to the socket.
pub struct TlsOut {
    link: Arc<Link>,
    sock: File,
}

impl TlsOut {
    /// Encrypts and sends all of `bufs` (never a part: a record cut off
    /// would end the session anyway).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut t = self.link.tx();
        let mut n = 0;
        for b in bufs {
            t.encrypt(b)?;
            n += b.len();
        }
        t.flush_to(&mut Retry(&self.sock))?;
        Ok(n)
    }
}

impl Drop for TlsOut {
    fn drop(&mut self) {
        let mut t = self.link.tx();
        t.close();
        let _ = t.flush_to(&mut Retry(&self.sock));
    }
}

/// Writes to a blocking socket, retrying what a signal interrupted.
struct Retry<'a>(&'a File);

impl Write for Retry<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.0).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match (&mut &*self.0).write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
