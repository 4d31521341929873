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

/// A reply ready to send: header bytes, then `data[..data_len]`.
pub struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    data_len: usize,
}

impl Reply {
    fn head_only(head: Vec<u8>) -> Reply {
        Reply { head, data: Vec::new(), data_len: 0 }
    }
}

/// Requests up to this size on a handle that never blocks run inline;
/// bigger ones go to the thread pool so both cores copy bytes.
const INLINE_MAX: u64 = 128 * 1024;

/// Data buffers a connection reuses, so a request costs no allocation
/// and no clearing of memory that the plugin overwrites anyway.
#[derive(Default)]
pub struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of at least `n` initialized bytes, or ENOMEM.
    fn get(&self, n: usize) -> Result<Vec<u8>, Error> {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = match free.iter().position(|b| b.len() >= n) {
            Some(i) => return Ok(free.swap_remove(i)),
            None => free.pop().unwrap_or_default(),
        };
        drop(free);
        v.clear();
        if v.try_reserve_exact(n).is_err() {
            return Err(Error::new(ErrorKind::NoMem, "cannot allocate a request buffer"));
        }
        v.resize(n, 0);
        Ok(v)
    }

    /// Gives a buffer back.
    fn put(&self, v: Vec<u8>) {
        // Big buffers are freed at once: idle connections keep little.
        if v.capacity() == 0 || v.capacity() > 4 << 20 {
            return;
        }
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < 8 {
            free.push(v);
        }
    }
}

/// The server-wide budget on bytes held by requests in flight (write
/// payloads and read buffers), in units of `BUDGET_UNIT`. When it runs
/// out, connections stop reading requests: back-pressure, not growth.
pub const BUDGET_BYTES: u64 = 1 << 30;
const BUDGET_UNIT: u64 = 64 * 1024;
static BUDGET: Semaphore = Semaphore::new((BUDGET_BYTES / BUDGET_UNIT) as usize);
/// Only one request at a time takes more than one unit, so two big
/// requests can never each hold half of what both need.
static BUDGET_BIG: async_lock::Mutex<()> = async_lock::Mutex::new(());

/// Units of the budget held by one request, given back on drop.
pub struct Budget(usize);

impl Budget {
    /// The units `bytes` needs, if they can be had without waiting.
    pub fn try_take(bytes: u64) -> Option<Budget> {
        match bytes.div_ceil(BUDGET_UNIT) {
            0 => Some(Budget(0)),
            1 => BUDGET.try_acquire().map(|g| {
                g.forget();
                Budget(1)
            }),
            _ => None,
        }
    }

    /// Waits for the units `bytes` needs.
    pub async fn take(bytes: u64) -> Budget {
        let units = bytes.div_ceil(BUDGET_UNIT) as usize;
        match units {
            0 => {}
            1 => BUDGET.acquire().await.forget(),
            _ => {
                let _one_at_a_time = BUDGET_BIG.lock().await;
                for _ in 0..units {
                    BUDGET.acquire().await.forget();
                }
            }
        }
        Budget(units)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if self.0 > 0 {
            BUDGET.add_permits(self.0);
        }
    }
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
    let pool = Arc::new(Pool::default());
    // Replies of inline requests not written yet: while the next request
    // is already buffered, its reply joins them and one write sends all.
    let mut pending: Vec<u8> = Vec::new();

    loop {
        if !pending.is_empty() && reader.buffer().len() < hlen && flush(&writer, &mut pending).await.is_err() {
            break;
        }
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
            if send(&writer, error_reply(&req, s.mode, e), &pool).await.is_err() {
                break;
            }
            continue;
        }
        let held = match req.cmd {
            cmd::READ | cmd::WRITE => req.count,
            _ => 0,
        };
        let budget = match Budget::try_take(held) {
            Some(b) => b,
            None => {
                if flush(&writer, &mut pending).await.is_err() {
                    break;
                }
                Budget::take(held).await
            }
        };
        let mut payload = Vec::new();
        if plen > 0 {
            if reader.buffer().len() < plen as usize && flush(&writer, &mut pending).await.is_err() {
                break;
            }
            payload = match pool.get(plen as usize) {
                Ok(p) => p,
                Err(_) => {
                    if discard(&mut reader, plen).await.is_err() {
                        break;
                    }
                    if send(&writer, error_reply(&req, s.mode, errno::ENOMEM), &pool).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            if reader.read_exact(&mut payload[..plen as usize]).await.is_err() {
                break; // a half-sent write is never passed to the plugin
            }
        }
        if shutdown::requested() {
            let _ = send(&writer, error_reply(&req, s.mode, errno::ESHUTDOWN), &pool).await;
            continue;
        }
        let permit = match sem.try_acquire_arc() {
            Some(p) => p,
            None => {
                if flush(&writer, &mut pending).await.is_err() {
                    break;
                }
                sem.acquire_arc().await
            }
        };
        if inline && req.count <= INLINE_MAX {
            let r = execute(&*s.handle, &req, payload, s.mode, &s.export, serialize_all, &pool);
            drop(permit);
            pending.extend_from_slice(&r.head);
            pending.extend_from_slice(&r.data[..r.data_len]);
            pool.put(r.data);
            drop(budget);
            if pending.len() >= 256 * 1024 && flush(&writer, &mut pending).await.is_err() {
                break;
            }
            continue;
        }
        if flush(&writer, &mut pending).await.is_err() {
            break;
        }
        let (h, w, g, export, mode, ctx, p) =
            (s.handle.clone(), writer.clone(), gone.clone(), s.export, s.mode, ctx.clone(), pool.clone());
        let task = log::WithContext::new(ctx.clone(), async move {
            let p2 = p.clone();
            let r = blocking::unblock(move || {
                log::set_context(Some(ctx));
                shutdown::with_connection(&g, || execute(&*h, &req, payload, mode, &export, serialize_all, &p2))
            })
            .await;
            let _ = send(&w, r, &p).await;
            drop(budget);
            drop(permit);
        });
        if parallel {
            super::spawn(task);
        } else {
            task.await;
        }
    }
    let _ = flush(&writer, &mut pending).await;
    // Wait for every request in flight (each holds a permit).
    gone.store(true, Ordering::Release);
    shutdown::wake_sleepers();
    for _ in 0..permits {
        std::mem::forget(sem.acquire().await);
    }
    let mut w = writer.lock().await;
    let _ = w.flush().await;
}

/// Writes a whole reply (one vectored write in the common case) and
/// gives its data buffer back to the pool.
async fn send<W: AsyncWrite + Unpin>(w: &async_lock::Mutex<W>, r: Reply, pool: &Pool) -> std::io::Result<()> {
    let result = {
        let mut w = w.lock().await;
        write_all2(&mut *w, &r.head, &r.data[..r.data_len]).await
    };
    pool.put(r.data);
    result
}

/// Writes the pending inline replies, if any.
async fn flush<W: AsyncWrite + Unpin>(w: &async_lock::Mutex<W>, pending: &mut Vec<u8>) -> std::io::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let r = w.lock().await.write_all(pending).await;
    pending.clear();
    r
}

/// `write_all` of two buffers with vectored writes.
async fn write_all2<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    use std::io::IoSlice;
    while !a.is_empty() || !b.is_empty() {
        let n = futures_lite::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &[IoSlice::new(a), IoSlice::new(b)])
        })
        .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The reply for a request that failed before reaching the plugin.
fn error_reply(req: &Request, mode: Mode, e: u32) -> Reply {
    let mut head = Vec::with_capacity(32);
    let chunked = matches!(req.cmd, cmd::READ | cmd::BLOCK_STATUS);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, chunked);
    Reply::head_only(head)
}

/// Runs one validated request on the handle and builds its reply.
pub fn execute(
    h: &dyn Handle,
    req: &Request,
    payload: Vec<u8>,
    mode: Mode,
    export: &request::Export,
    serialize_all: bool,
    pool: &Pool,
) -> Reply {
    let _all = serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
    let fua = if req.flags & cmdflag::FUA != 0 { Flags::FUA } else { Flags::NONE };
    let result = match req.cmd {
        cmd::READ => return read(h, req, mode, pool),
        cmd::BLOCK_STATUS => return block_status(h, req, mode, export.size),
        cmd::WRITE => h.pwrite(&payload[..req.count as usize], req.offset, fua),
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
    pool.put(payload);
    let e = result.map_or_else(|e| failed(req, &e), |()| 0);
    let mut head = Vec::with_capacity(32);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, false);
    Reply::head_only(head)
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

fn read(h: &dyn Handle, req: &Request, mode: Mode, pool: &Pool) -> Reply {
    let n = req.count as usize;
    let result = pool.get(n).and_then(|mut buf| match h.pread(&mut buf[..n], req.offset, Flags::NONE) {
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
    match mode {
        Mode::Simple => {
            reply::simple(&mut head, 0, req.cookie);
            Reply { head, data: buf, data_len: n }
        }
        _ if req.flags & cmdflag::DF == 0 && is_zero(&buf[..n]) => {
            // A sparse read: one hole chunk instead of the zeroes.
            use crate::proto::codec::Put;
            reply::chunk_header(&mut head, mode, chunk::FLAG_DONE, chunk::OFFSET_HOLE, req.cookie, req.offset, 12);
            head.put_u64(req.offset);
            head.put_u32(n as u32);
            pool.put(buf);
            Reply::head_only(head)
        }
        _ => {
            reply::data_chunk_header(&mut head, mode, req.cookie, req.offset, n as u64);
            Reply { head, data: buf, data_len: n }
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
        return Reply::head_only(head);
    }
    let list: Vec<(u64, u64, u32)> = ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect();
    let descs = reply::descriptors(&list, req.offset, req.count, req_one, mode == Mode::Extended);
    if descs.is_empty() {
        let code = failed(req, &Error::invalid("extents: no extent covers the request"));
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply::head_only(head);
    }
    reply::block_status(&mut head, mode, req.cookie, req.offset, BASE_ALLOCATION_ID, &descs);
    Reply::head_only(head)
}

/// True if every byte is zero; stops at the first word that is not.
fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    chunks.into_iter().all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0) && tail.iter().all(|&b| b == 0)
}
