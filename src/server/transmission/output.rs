//! Replies and the writing side of a connection: a [`Reply`] (header,
//! then data from a pooled buffer) goes out in one vectored write under
//! the write lock; small replies of requests run on the reading thread
//! are held back and written in batches; a socket that cannot be written
//! to stops the connection. The socket may have a send timeout (the lent
//! and `sendfile` READs rely on it): [`Sock`] retries writes that time
//! out everywhere else.

use std::io::{IoSlice, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{shutdown_fd, Conn};
use crate::proto::reply::{self, Mode};
use crate::proto::request::Request;
use crate::proto::wire::cmd;
use crate::server::tls::stream::Output;

/// A reply ready to send: header bytes, then `data[..data_len]`.
pub(super) struct Reply {
    pub(super) head: Vec<u8>,
    pub(super) data: Vec<u8>,
    pub(super) data_len: usize,
}

impl Reply {
    pub(super) fn head_only(head: Vec<u8>) -> Reply {
        Reply { head, data: Vec::new(), data_len: 0 }
    }
}

/// Replies up to this size wait in `pending`; bigger ones go out at once
/// (after what is pending) without being copied.
pub(super) const HOLD_MAX: usize = 64 * 1024;

/// Adds a reply of an inline request to `pending`, or sends it at once if
/// it is big; false if the socket is broken.
pub(super) fn hold_or_send(conn: &Conn, pending: &mut Vec<u8>, reply: Reply) -> bool {
    if reply.data_len > HOLD_MAX {
        return flush(conn, pending) && send(conn, reply).map_err(|_| broken(conn)).is_ok();
    }
    pending.extend_from_slice(&reply.head);
    pending.extend_from_slice(&reply.data[..reply.data_len]);
    conn.pool.put(reply.data);
    pending.len() < 256 * 1024 || flush(conn, pending)
}

/// How long a READ reply may keep the plugin's storage lent while the
/// socket is full (the send timeout of the connection's socket).
pub(super) const LEND_TIME: Duration = Duration::from_millis(50);

/// The writing side of a connection. Its socket may have a send timeout
/// (see `read_lent` in read.rs); everywhere else a write that times out is retried,
/// as if the socket had none.
pub(super) struct Sock(pub(super) Output);

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        loop {
            match self.0.write_vectored(bufs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes the held-back replies; false if the socket is broken.
pub(super) fn flush(conn: &Conn, pending: &mut Vec<u8>) -> bool {
    if pending.is_empty() {
        return true;
    }
    let r = conn.writer.lock().unwrap_or_else(|e| e.into_inner()).write_all(pending);
    pending.clear();
    if r.is_err() {
        broken(conn);
    }
    r.is_ok()
}

/// The client cannot be written to: stop everything on this connection.
pub(super) fn broken(conn: &Conn) {
    conn.stop.store(true, Ordering::Release);
    conn.gone.store(true, Ordering::Release);
    shutdown_fd(conn.read_fd, libc::SHUT_RDWR);
}

/// Writes a whole reply (one vectored write in the common case) and
/// gives its data buffer back to the pool.
pub(super) fn send(conn: &Conn, r: Reply) -> std::io::Result<()> {
    let result = {
        let mut w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_all2(&mut *w, &r.head, &r.data[..r.data_len])
    };
    conn.pool.put(r.data);
    result
}

/// `write_all` of two buffers with vectored writes.
pub(super) fn write_all2(w: &mut impl Write, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The reply without data to `req`: error `e`, or success if `e` is 0
/// (an error to a READ or BLOCK_STATUS is a chunk in structured mode).
pub(super) fn error_reply(req: &Request, mode: Mode, e: u32) -> Reply {
    let mut head = Vec::with_capacity(32);
    let chunked = matches!(req.cmd, cmd::READ | cmd::BLOCK_STATUS);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, chunked);
    Reply::head_only(head)
}
