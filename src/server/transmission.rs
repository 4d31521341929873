//! The transmission phase: read a request, validate it, run it on the
//! export's handle, reply. Requests run concurrently (up to `-t`) when the
//! thread model allows and the handle may block; a handle that never
//! blocks runs inline on the connection's task, with no thread hand-off.
//! Replies are written whole, under one lock, in completion order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_lock::Semaphore;
use futures_lite::io::BufReader;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::connection::discard;
use super::Shared;
use crate::backend::{Extents, Flags, Handle, ThreadModel};
use crate::error::{Error, ErrorKind};
use crate::proto::reply::{self, Mode};
use crate::proto::request::{self, Request, EXT_REQUEST_LEN, REQUEST_LEN};
use crate::proto::wire::{chunk, cmd, cmdflag, errno, nbd_errno, BASE_ALLOCATION_ID, MAX_REQUEST_SIZE};
use crate::util::{log, shutdown};

/// The export a connection negotiated.
pub struct Session {
    /// The outermost handle (checked).
    pub handle: Arc<dyn Handle>,
    /// Reply format.
    pub mode: Mode,
    /// What request validation needs.
    pub export: request::Export,
}

/// A reply ready to send: header bytes, then optional data.
pub struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
}

/// Held around every callback under the serialize_all_requests model.
static ALL_REQUESTS: Mutex<()> = Mutex::new(());

/// Runs the transmission phase until the client disconnects, breaks the
/// protocol, or the server shuts down; waits for requests in flight.
pub async fn run<R, W>(shared: &Arc<Shared>, s: Session, reader: R, writer: W, gone: &Arc<AtomicBool>, ctx: Arc<str>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let writer = Arc::new(async_lock::Mutex::new(writer));
    let ext = s.export.extended;
    let hlen = if ext { EXT_REQUEST_LEN } else { REQUEST_LEN };
    let parallel = shared.model == ThreadModel::Parallel;
    let permits = if parallel { shared.threads.max(1) } else { 1 } as usize;
    let sem = Arc::new(Semaphore::new(permits));
    let inline = !s.handle.blocks();
    let serialize_all = shared.model <= ThreadModel::SerializeAllRequests;
    let quit = shared.quit.clone();

    loop {
        let mut hdr = [0u8; EXT_REQUEST_LEN];
        let read = async { reader.read_exact(&mut hdr[..hlen]).await.map(|()| true) };
        let stop = async {
            let _ = quit.recv().await;
            Ok(false)
        };
        match futures_lite::future::or(read, stop).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break, // shutdown, EOF or a broken socket
        }
        let req = match Request::decode(&hdr[..hlen], ext) {
            Ok(r) => r,
            Err(e) => {
                crate::debug!("transmission: {e}: closing connection");
                break;
            }
        };
        if req.cmd == cmd::DISC {
            crate::debug!("client sent NBD_CMD_DISC, closing connection");
            break;
        }
        let plen = req.payload_len(ext);
        let check = if plen > u64::from(MAX_REQUEST_SIZE) {
            if plen > 2 * u64::from(MAX_REQUEST_SIZE) {
                crate::debug!("client payload of {plen} bytes is too large: closing connection");
                break;
            }
            Err(errno::EINVAL)
        } else {
            request::validate(&req, &s.export)
        };
        if let Err(e) = check {
            if discard(&mut reader, plen).await.is_err() {
                break;
            }
            crate::debug!("invalid request {}: sending error reply: {e}", cmd::name(req.cmd));
            if send(&writer, error_reply(&req, s.mode, e)).await.is_err() {
                break;
            }
            continue;
        }
        let mut payload = Vec::new();
        if plen > 0 {
            if payload.try_reserve_exact(plen as usize).is_err() {
                if discard(&mut reader, plen).await.is_err() {
                    break;
                }
                if send(&writer, error_reply(&req, s.mode, errno::ENOMEM)).await.is_err() {
                    break;
                }
                continue;
            }
            payload.resize(plen as usize, 0);
            if reader.read_exact(&mut payload).await.is_err() {
                break; // a half-sent write is never passed to the plugin
            }
        }
        if shutdown::requested() {
            let _ = send(&writer, error_reply(&req, s.mode, errno::ESHUTDOWN)).await;
            continue;
        }
        let permit = sem.acquire_arc().await;
        if inline {
            let r = execute(&*s.handle, &req, payload, s.mode, &s.export, serialize_all);
            drop(permit);
            if send(&writer, r).await.is_err() {
                break;
            }
            continue;
        }
        let (h, w, g, export, mode, ctx) = (s.handle.clone(), writer.clone(), gone.clone(), s.export, s.mode, ctx.clone());
        let task = log::WithContext::new(ctx.clone(), async move {
            let r = blocking::unblock(move || {
                log::set_context(Some(ctx));
                shutdown::with_connection(&g, || execute(&*h, &req, payload, mode, &export, serialize_all))
            })
            .await;
            let _ = send(&w, r).await;
            drop(permit);
        });
        if parallel {
            super::spawn(task);
        } else {
            task.await;
        }
    }
    // Wait for every request in flight (each holds a permit).
    gone.store(true, Ordering::Release);
    shutdown::wake_sleepers();
    for _ in 0..permits {
        std::mem::forget(sem.acquire().await);
    }
    let mut w = writer.lock().await;
    let _ = w.flush().await;
}

async fn send<W: AsyncWrite + Unpin>(w: &async_lock::Mutex<W>, r: Reply) -> std::io::Result<()> {
    let mut w = w.lock().await;
    if r.data.is_empty() {
        w.write_all(&r.head).await?;
    } else if r.data.len() <= 16 * 1024 {
        let mut one = r.head;
        one.extend_from_slice(&r.data);
        w.write_all(&one).await?;
    } else {
        w.write_all(&r.head).await?;
        w.write_all(&r.data).await?;
    }
    w.flush().await
}

/// The reply for a request that failed before reaching the plugin.
fn error_reply(req: &Request, mode: Mode, e: u32) -> Reply {
    let mut head = Vec::with_capacity(32);
    let chunked = matches!(req.cmd, cmd::READ | cmd::BLOCK_STATUS);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, chunked);
    Reply { head, data: Vec::new() }
}

/// Runs one validated request on the handle and builds its reply.
pub fn execute(h: &dyn Handle, req: &Request, payload: Vec<u8>, mode: Mode, export: &request::Export, serialize_all: bool) -> Reply {
    let _all = serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
    let fua = if req.flags & cmdflag::FUA != 0 { Flags::FUA } else { Flags::NONE };
    let result = match req.cmd {
        cmd::READ => return read(h, req, mode),
        cmd::BLOCK_STATUS => return block_status(h, req, mode, export.size),
        cmd::WRITE => h.pwrite(&payload, req.offset, fua),
        cmd::FLUSH => h.flush(Flags::NONE),
        cmd::TRIM => h.trim(req.count, req.offset, fua),
        cmd::CACHE => h.cache(req.count, req.offset, Flags::NONE),
        cmd::WRITE_ZEROES => {
            let mut f = fua;
            if req.flags & cmdflag::NO_HOLE == 0 {
                f = f.with(Flags::MAY_TRIM);
            }
            if req.flags & cmdflag::FAST_ZERO != 0 {
                f = f.with(Flags::FAST_ZERO);
            }
            h.zero(req.count, req.offset, f)
        }
        _ => Err(Error::invalid("unknown command")),
    };
    let e = result.map_or_else(|e| failed(req, &e), |()| 0);
    let mut head = Vec::with_capacity(32);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, false);
    Reply { head, data: Vec::new() }
}

/// Logs a failed call and returns its NBD error number.
fn failed(req: &Request, e: &Error) -> u32 {
    if e.kind() != ErrorKind::Shutdown {
        log::error(e.message());
    }
    let n = nbd_errno(e.kind(), req.flags);
    crate::debug!("sending error reply: {}", e.kind().name());
    n
}

fn read(h: &dyn Handle, req: &Request, mode: Mode) -> Reply {
    let n = req.count as usize;
    let mut buf = Vec::new();
    let result = if buf.try_reserve_exact(n).is_err() {
        Err(Error::new(ErrorKind::NoMem, "pread: cannot allocate the read buffer"))
    } else {
        buf.resize(n, 0);
        h.pread(&mut buf, req.offset, Flags::NONE)
    };
    let mut head = Vec::with_capacity(40);
    if let Err(e) = result {
        let code = failed(req, &e);
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply { head, data: Vec::new() };
    }
    match mode {
        Mode::Simple => {
            reply::simple(&mut head, 0, req.cookie);
            Reply { head, data: buf }
        }
        _ if req.flags & cmdflag::DF == 0 && is_zero(&buf) => {
            // A sparse read: one hole chunk instead of the zeroes.
            use crate::proto::codec::Put;
            reply::chunk_header(&mut head, mode, chunk::FLAG_DONE, chunk::OFFSET_HOLE, req.cookie, req.offset, 12);
            head.put_u64(req.offset);
            head.put_u32(n as u32);
            Reply { head, data: Vec::new() }
        }
        _ => {
            reply::data_chunk_header(&mut head, mode, req.cookie, req.offset, n as u64);
            Reply { head, data: buf }
        }
    }
}

fn block_status(h: &dyn Handle, req: &Request, mode: Mode, size: u64) -> Reply {
    let req_one = req.flags & cmdflag::REQ_ONE != 0;
    let flags = if req_one { Flags::REQ_ONE } else { Flags::NONE };
    let mut ext = Extents::new(req.offset, size);
    let mut head = Vec::new();
    if let Err(e) = h.extents(req.count, req.offset, flags, &mut ext) {
        let code = failed(req, &e);
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply { head, data: Vec::new() };
    }
    let list: Vec<(u64, u64, u32)> = ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect();
    let descs = reply::descriptors(&list, req.offset, req.count, req_one, mode == Mode::Extended);
    if descs.is_empty() {
        let code = failed(req, &Error::invalid("extents: no extent covers the request"));
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply { head, data: Vec::new() };
    }
    reply::block_status(&mut head, mode, req.cookie, req.offset, BASE_ALLOCATION_ID, &descs);
    Reply { head, data: Vec::new() }
}

/// True if every byte is zero; stops at the first word that is not.
fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    chunks.into_iter().all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0) && tail.iter().all(|&b| b == 0)
}
