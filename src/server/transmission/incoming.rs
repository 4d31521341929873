//! Reading the next request, under the connection's read lock: its
//! header (after a big payload, on its own: see [`BIG_PAYLOAD`]), the
//! checks of nbdkit's request validation (an invalid request gets its
//! error reply here, its payload discarded), the byte budget, and the
//! choice of how its payload is read ([`Next`]): into a pooled buffer, or
//! left in the socket for the write paths (write.rs) to take straight
//! into the plugin's storage or the page cache.

use std::io::{BufReader, Read};
use std::sync::atomic::Ordering;

use super::buffers::Budget;
use super::output::{error_reply, send, HOLD_MAX};
use super::worker::INLINE_MAX;
use super::write::read_into;
use super::Conn;
use crate::proto::request::{self, Request, EXT_REQUEST_LEN};
use crate::proto::wire::{cmd, errno, MAX_REQUEST_SIZE};
use crate::server::brief;
use crate::server::tls::stream::Input;
use crate::util::shutdown;

/// What reading one request gave.
pub(super) enum Next {
    /// A valid request to run, its payload and the budget it holds, and
    /// whether it runs on this thread although its handle may block
    /// (brief.rs).
    Run(Request, Vec<u8>, Budget, bool),
    /// A small request to run inline whose payload is the next `count`
    /// bytes of the read buffer (saves copying it out).
    RunBuffered(Request, Budget),
    /// A big WRITE on a handle that never blocks, its payload still to
    /// be read: straight into the plugin's storage if it can.
    Fill(Request, Budget),
    /// Handled already (an error reply was sent).
    Again,
    /// Stop reading: EOF, DISC, a protocol error or a broken socket.
    Stop { hung_up: bool },
}

/// Reads the next request and its payload (or leaves the payload for a
/// write path, see [`Next`]); answers an invalid one itself.
pub(super) fn read_one(conn: &Conn, r: &mut BufReader<Input>) -> Next {
    let ext = conn.export.extended;
    let mut hdr = [0u8; EXT_REQUEST_LEN];
    // After a big payload, read only the next header: filling the buffer
    // would take part of the next payload into it, to be copied again.
    let got = if r.buffer().is_empty() && conn.big.load(Ordering::Relaxed) {
        r.get_mut().read_exact(&mut hdr[..conn.hlen])
    } else {
        r.read_exact(&mut hdr[..conn.hlen])
    };
    if let Err(e) = got {
        if shutdown::requested() {
            crate::debug!("server is shutting down, closing connection");
            // The server's own shutdown(SHUT_RD) (`stop_all`), not the
            // client: requests in flight run to the end and reply.
            return Next::Stop { hung_up: false };
        }
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            crate::debug!("client closed input socket, closing connection");
        } else {
            crate::debug!("read request: {e}, closing connection");
        }
        return Next::Stop { hung_up: true };
    }
    let req = match Request::decode(&hdr[..conn.hlen], ext) {
        Ok(req) => req,
        Err(e) => {
            crate::debug!("transmission: {e}: closing connection");
            return Next::Stop { hung_up: true };
        }
    };
    if req.cmd == cmd::DISC {
        crate::debug!("client sent NBD_CMD_DISC, closing connection");
        return Next::Stop { hung_up: false };
    }
    let plen = req.payload_len(ext);
    conn.big.store(plen > BIG_PAYLOAD, Ordering::Relaxed);
    let check = if plen > u64::from(MAX_REQUEST_SIZE) {
        if plen > 2 * u64::from(MAX_REQUEST_SIZE) {
            crate::debug!("client payload of {plen} bytes is too large: closing connection");
            return Next::Stop { hung_up: true };
        }
        Err(errno::EINVAL)
    } else {
        request::check(&req, &conn.export).map_err(|(e, why)| {
            crate::log_error!("invalid request: {why}");
            e
        })
    };
    let refuse = |r: &mut BufReader<Input>, e: u32| {
        if discard(r, plen).is_err() {
            return Next::Stop { hung_up: true };
        }
        crate::debug!("{}: sending error reply: {e}", cmd::name(req.cmd));
        match send(conn, error_reply(&req, conn.mode, e)) {
            Ok(()) => Next::Again,
            Err(_) => Next::Stop { hung_up: true },
        }
    };
    if let Err(e) = check {
        return refuse(r, e);
    }
    let held = match req.cmd {
        cmd::READ | cmd::WRITE => req.count,
        _ => 0,
    };
    let budget = Budget::take(held);
    if shutdown::requested() {
        if discard(r, plen).is_err() {
            return Next::Stop { hung_up: true };
        }
        return match send(conn, error_reply(&req, conn.mode, errno::ESHUTDOWN)) {
            Ok(()) => Next::Again,
            Err(_) => Next::Stop { hung_up: true },
        };
    }
    let brief = conn.brief && conn.quick.turn(brief::quick(&req));
    if (conn.inline && req.count <= INLINE_MAX || brief) && plen > 0 && r.buffer().len() >= plen as usize {
        return Next::RunBuffered(req, budget);
    }
    // (Not under serialize_all_requests: the payload would be read with
    // every other connection waiting.)
    if conn.inline && !conn.serialize_all && req.cmd == cmd::WRITE && plen > HOLD_MAX as u64 {
        return Next::Fill(req, budget);
    }
    let mut payload = Vec::new();
    if plen > 0 {
        payload = match conn.pool.get(plen as usize) {
            Ok(p) => p,
            Err(_) => return refuse(r, errno::ENOMEM),
        };
        if !read_into(conn, r, &mut [&mut payload[..plen as usize]]) {
            return Next::Stop { hung_up: true }; // a half-sent write never reaches the plugin
        }
    }
    Next::Run(req, payload, budget, brief)
}

/// Reads and drops `n` bytes.
pub(super) fn discard(r: &mut impl Read, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// After a payload bigger than this, the next header is read on its own,
/// so that the payload after it goes straight where it belongs instead of
/// partly through the read buffer (a copy more): one system call more per
/// request, where each brings 64 KiB or more.
pub(super) const BIG_PAYLOAD: u64 = 64 * 1024;
