//! The READ paths, fastest first: the plugin's own storage lent to the
//! server and written straight to the socket (the memory plugin), small
//! lent READs copied into the batch of held-back replies, `sendfile`
//! from the page cache (the file plugin), `RWF_NOWAIT` reads answered on
//! the reading thread, and the copying read into a pooled buffer that
//! every handle supports. Also the header of a successful READ reply,
//! where structured replies turn data that is all zeroes (or a hole of
//! the file) into one hole chunk.

use std::io::{IoSlice, Write};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::buffers::{Pool, POOL_MAX};
use super::execute::failed;
use super::output::{broken, error_reply, flush, hold_or_send, write_all2, Reply, Sock, LEND_TIME};
use super::{Conn, ALL_REQUESTS};
use crate::backend::{Flags, Handle};
use crate::error::{Error, ErrorKind};
use crate::proto::reply::{self, Mode};
use crate::proto::request::Request;
use crate::proto::wire::{chunk, cmdflag};
use crate::util::{log, shutdown};

/// A small READ whose reply is copied from the plugin's storage straight
/// into the replies held back (one copy instead of two); false if the
/// handle does not lend (nothing happened).
pub(super) fn read_held(conn: &Conn, req: &Request, pending: &mut Vec<u8>) -> bool {
    let start = pending.len();
    let mut done = false;
    let lent = {
        let _all = conn.serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sink = |data: &[&[u8]]| {
            if read_head(pending, conn.mode, req, data) {
                data.iter().for_each(|d| pending.extend_from_slice(d));
            }
            done = true;
        };
        shutdown::catch_panic("pread", || Ok(conn.handle.pread_lend(req.count as usize, req.offset, &mut sink)))
    };
    let e = match lent {
        Ok(None) if !done => return false,
        Ok(Some(Ok(()))) if done => return true,
        Ok(Some(Ok(())) | None) => Error::new(ErrorKind::Io, "pread_lend: no data"),
        Ok(Some(Err(e))) | Err(e) => e,
    };
    pending.truncate(start);
    let code = failed(req, &e);
    reply::no_payload(pending, conn.mode, code, req.cookie, req.offset, true);
    true
}

/// The biggest READ tried with [`read_nowait`]: its buffer stays in the
/// pool, so a miss costs no allocation (bigger ones are all copying anyway).
pub(super) const NOWAIT_MAX: u64 = POOL_MAX as u64;

/// A READ on a handle that may block, answered on this thread because the
/// data is in memory (`Handle::pread_nowait`): no other worker wakes, and
/// a small reply joins the held-back batch. False if the data is not in
/// memory (nothing happened); a broken socket stops the connection.
pub(super) fn read_nowait(conn: &Conn, req: &Request, pending: &mut Vec<u8>) -> bool {
    let n = req.count as usize;
    let Ok(mut buf) = conn.pool.get(n) else { return false };
    let reply = match shutdown::catch_panic("pread", || Ok(conn.handle.pread_nowait(&mut buf[..n], req.offset))) {
        Ok(None) => {
            conn.pool.put(buf);
            return false;
        }
        Ok(Some(Ok(()))) => {
            let mut head = Vec::with_capacity(40);
            if read_head(&mut head, conn.mode, req, &[&buf[..n]]) {
                Reply { head, data: buf, data_len: n }
            } else {
                conn.pool.put(buf);
                Reply::head_only(head)
            }
        }
        Ok(Some(Err(e))) | Err(e) => {
            conn.pool.put(buf);
            error_reply(req, conn.mode, failed(req, &e))
        }
    };
    hold_or_send(conn, pending, reply);
    true
}

/// A READ answered straight from the plugin's storage, without the copy
/// into a buffer: the reply is written from the lent slices; if the
/// client does not take it all within [`LEND_TIME`] (the socket's send
/// timeout), the rest is copied out and written once the plugin has its
/// storage back, so a client that stops reading cannot keep pages locked
/// and writers waiting. False if the socket is broken. `scratch` is an
/// empty buffer for the header; it is left empty.
pub(super) fn read_lent(conn: &Conn, req: &Request, scratch: &mut Vec<u8>) -> bool {
    let n = req.count as usize;
    let _all = conn.serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
    let mut w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
    let mut sent = None;
    let lent = {
        let mut sink = |slices: &[&[u8]]| sent = Some(send_lent(&mut w, conn, req, slices, scratch));
        shutdown::catch_panic("pread", || Ok(conn.handle.pread_lend(n, req.offset, &mut sink)))
    };
    scratch.clear();
    let reply = match (lent, sent) {
        (_, Some(Ok(rest))) => rest,
        (_, Some(Err(_))) => return false,
        // The handle does not lend after all: the copying read.
        (Ok(None), None) => read(&*conn.handle, req, conn.mode, &conn.pool),
        (Ok(Some(r)), None) => {
            let e = r.err().unwrap_or_else(|| Error::new(ErrorKind::Io, "pread_lend: no data"));
            error_reply(req, conn.mode, failed(req, &e))
        }
        (Err(e), None) => error_reply(req, conn.mode, failed(req, &e)),
    };
    let r = write_all2(&mut *w, &reply.head, &reply.data[..reply.data_len]).is_ok();
    conn.pool.put(reply.data);
    r
}

/// Writes the reply to `req` with `data` (the lent storage) until done or
/// [`LEND_TIME`] has passed; returns what is left to write, copied out.
///
/// `head` is an empty buffer for the reply header (saves an allocation).
fn send_lent(w: &mut Sock, conn: &Conn, req: &Request, data: &[&[u8]], head: &mut Vec<u8>) -> std::io::Result<Reply> {
    head.clear();
    let data = if read_head(head, conn.mode, req, data) { data } else { &[] };
    // Small READs span a page or two: their iovec stays on the stack.
    let mut few = [IoSlice::new(&[]); 4];
    let mut many = Vec::new();
    let iov = if data.len() < few.len() {
        &mut few[..data.len() + 1]
    } else {
        many.resize(data.len() + 1, IoSlice::new(&[]));
        &mut many[..]
    };
    iov[0] = IoSlice::new(head);
    iov[1..].iter_mut().zip(data).for_each(|(v, d)| *v = IoSlice::new(d));
    let mut left = iov;
    let until = Instant::now() + LEND_TIME;
    while !left.is_empty() {
        match w.0.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => IoSlice::advance_slices(&mut left, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
        if Instant::now() >= until {
            break;
        }
    }
    // Copy out what the client has not taken yet.
    let size = left.iter().map(|s| s.len()).sum();
    if size == 0 {
        return Ok(Reply::head_only(Vec::new()));
    }
    let mut rest = conn.pool.get(size).map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    let mut at = 0;
    for s in left.iter() {
        rest[at..at + s.len()].copy_from_slice(s);
        at += s.len();
    }
    Ok(Reply { head: Vec::new(), data: rest, data_len: size })
}

/// READs from this size on are sent with `sendfile` when the handle
/// gives a file (`Handle::pread_fd`); smaller ones are copied, which
/// costs less than the extra system calls.
pub(super) const SPLICE_MIN: u64 = 128 * 1024;

/// A READ sent straight from the page cache: the reply header, then
/// `sendfile` from the handle's file to the socket (one copy, by the
/// kernel, instead of two). With `cached_only`, only if the whole range is
/// in the page cache (this thread must not wait for a disk). False if the
/// handle gave no file (nothing happened). Once the header is out, no
/// error reply can follow: if the file comes up short (it shrank since
/// its size was checked), the client went away, or the client has not
/// taken anything for [`LEND_TIME`] while the server stops, the
/// connection is closed (`conn.stop` is set). `pending` (the replies held
/// back) is flushed first and left empty.
pub(super) fn read_spliced(conn: &Conn, req: &Request, pending: &mut Vec<u8>, cached_only: bool) -> bool {
    let n = req.count as usize;
    let got = shutdown::catch_panic("pread", || Ok(conn.handle.pread_fd(n, req.offset, cached_only)));
    let Ok(Some((fd, off))) = got else { return false };
    if !flush(conn, pending) {
        return true;
    }
    // A hole (SEEK_DATA finds no data in the range): one hole chunk, as
    // the copying path sends for data that is all zeroes.
    let hole = conn.mode != Mode::Simple && req.flags & cmdflag::DF == 0 && is_hole(fd, off, n as u64);
    let head = pending;
    match conn.mode {
        Mode::Simple => reply::simple(head, 0, req.cookie),
        _ if hole => {
            use crate::proto::codec::Put;
            reply::chunk_header(head, conn.mode, chunk::FLAG_DONE, chunk::OFFSET_HOLE, req.cookie, req.offset, 12);
            head.put_u64(req.offset);
            head.put_u32(req.count as u32);
        }
        _ => reply::data_chunk_header(head, conn.mode, req.cookie, req.offset, req.count),
    }
    let _all = conn.serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
    let w = conn.writer.lock().unwrap_or_else(|e| e.into_inner());
    let sock = w.0.fd();
    let r = send_more(conn, sock, head, !hole).and_then(|()| if hole { Ok(()) } else { send_file(conn, sock, fd, off, n) });
    drop(w);
    head.clear();
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            log::error(&format!(
                "pread: offset={} count={n}: the file shrank while it was sent: closing the connection",
                req.offset
            ));
        } else {
            crate::debug!("sendfile: {e}: closing connection");
        }
        broken(conn);
    }
    true
}

/// True if `[off, off+len)` of `fd` holds no data (SEEK_DATA); false when
/// unsure.
#[allow(unsafe_code)]
fn is_hole(fd: RawFd, off: u64, len: u64) -> bool {
    let Ok(o) = libc::off_t::try_from(off) else { return false };
    // SAFETY: lseek on a descriptor; the position is not used by anyone
    // (every read and sendfile gives its offset).
    let p = unsafe { libc::lseek(fd, o, libc::SEEK_DATA) };
    if p < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    p as u64 >= off.saturating_add(len)
}

/// Whether a write that timed out (the socket's [`LEND_TIME`]) should
/// give up: the client hung up or the server is stopping.
fn give_up(conn: &Conn) -> bool {
    conn.gone.load(Ordering::Acquire) || shutdown::requested()
}

/// Sends all of `buf` (with MSG_MORE if data follows).
#[allow(unsafe_code)]
fn send_more(conn: &Conn, sock: RawFd, mut buf: &[u8], more: bool) -> std::io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !buf.is_empty() {
        // SAFETY: `buf` is live and its length is given.
        let k = unsafe { libc::send(sock, buf.as_ptr().cast(), buf.len(), flags) };
        if k > 0 {
            buf = &buf[k as usize..];
            continue;
        }
        let e = if k == 0 { std::io::ErrorKind::WriteZero.into() } else { std::io::Error::last_os_error() };
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock if !give_up(conn) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

/// `sendfile` of `[off, off+len)` of `fd` to `sock`. A short file is
/// `UnexpectedEof`; a client that takes nothing for [`LEND_TIME`] is
/// waited for (the worker is only freed early when the client hangs up
/// or the server stops: `give_up`).
#[allow(unsafe_code)]
fn send_file(conn: &Conn, sock: RawFd, fd: RawFd, off: u64, len: usize) -> std::io::Result<()> {
    let mut pos = libc::off_t::try_from(off).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut left = len;
    while left > 0 {
        // SAFETY: sendfile between two descriptors; `pos` is a live off_t.
        let k = unsafe { libc::sendfile(sock, fd, &mut pos, left.min(1 << 30)) };
        if k > 0 {
            left -= k as usize;
            continue;
        }
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock if !give_up(conn) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn read(h: &dyn Handle, req: &Request, mode: Mode, pool: &Pool) -> Reply {
    let n = req.count as usize;
    let result = pool.get(n).and_then(|mut buf| match shutdown::catch_panic("pread", || h.pread(&mut buf[..n], req.offset, Flags::NONE)) {
        Ok(()) => Ok(buf),
        Err(e) => {
            pool.put(buf);
            Err(e)
        }
    });
    let mut head = Vec::with_capacity(40);
    let buf = match result {
        Ok(buf) => buf,
        Err(e) => {
            let code = failed(req, &e);
            reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
            return Reply::head_only(head);
        }
    };
    if read_head(&mut head, mode, req, &[&buf[..n]]) {
        Reply { head, data: buf, data_len: n }
    } else {
        pool.put(buf);
        Reply::head_only(head)
    }
}

/// Appends the header of a successful READ reply whose data is `data`;
/// false if the data is not to follow (all zeroes: one hole chunk instead).
pub(super) fn read_head(head: &mut Vec<u8>, mode: Mode, req: &Request, data: &[&[u8]]) -> bool {
    match mode {
        Mode::Simple => reply::simple(head, 0, req.cookie),
        _ if req.flags & cmdflag::DF == 0 && data.iter().all(|d| is_zero(d)) => {
            use crate::proto::codec::Put;
            reply::chunk_header(head, mode, chunk::FLAG_DONE, chunk::OFFSET_HOLE, req.cookie, req.offset, 12);
            head.put_u64(req.offset);
            head.put_u32(req.count as u32);
            return false;
        }
        _ => reply::data_chunk_header(head, mode, req.cookie, req.offset, req.count),
    }
    true
}

/// True if every byte is zero; stops at the first word that is not.
fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    chunks.into_iter().all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0) && tail.iter().all(|&b| b == 0)
}
