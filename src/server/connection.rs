//! One task per connection: preconnect, the handshake (oldstyle, or the
//! newstyle option loop driven by [`crate::proto::negotiate`]) under the
//! handshake timeout, then the transmission phase.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::transmission::{self, Session};
use super::{process, tls, Shared};
use crate::backend::{Handle, Next};
use crate::proto::codec::DecodeError;
use crate::proto::handshake::{self, OptionHeader, OPTION_HEADER_LEN};
use crate::proto::negotiate::{ExportInfo, Exports, Intake, Negotiation, Payload, Step};
use crate::proto::reply::Mode;
use crate::proto::request;
use crate::proto::wire::{opt, rep, Named};
use crate::util::{log, shutdown};

/// Why a connection ended early.
#[derive(Debug)]
pub enum End {
    /// The socket failed or the peer hung up.
    Io(std::io::Error),
    /// The peer broke the protocol.
    Protocol(DecodeError),
    /// Negotiation ended without an export (ABORT, failed EXPORT_NAME…).
    Closed,
    /// The handshake took longer than `--timeout`.
    Timeout,
    /// The client sent NBD_OPT_ABORT.
    Aborted,
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Io(e)
    }
}

impl From<DecodeError> for End {
    fn from(e: DecodeError) -> End {
        End::Protocol(e)
    }
}

/// A connection's byte streams and a way to shut the socket down.
pub struct Streams<R, W> {
    /// Client → server.
    pub reader: R,
    /// Server → client.
    pub writer: W,
    /// Shuts the socket down (both directions) to unblock pending I/O.
    pub shutdown: Arc<dyn Fn() + Send + Sync>,
    /// The descriptors under `reader` and `writer` (the same for a socket),
    /// duplicated into blocking files for the transmission phase.
    pub fds: (RawFd, RawFd),
}

/// Serves one client to the end.
pub async fn serve<R, W>(shared: Arc<Shared>, s: Streams<R, W>, instance: u64)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx: Arc<str> = format!("{}[{}]", shared.chain.plugin_name(), instance).into();
    log::WithContext::new(ctx.clone(), serve_inner(shared, s, ctx)).await
}

async fn serve_inner<R, W>(shared: Arc<Shared>, s: Streams<R, W>, ctx: Arc<str>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let chain = shared.chain;
    let readonly = shared.readonly;
    let pctx = Some(ctx.clone());
    let pre = blocking::unblock(move || {
        log::set_context(pctx);
        shutdown::catch_panic("preconnect", || chain.top().preconnect(readonly))
    })
    .await;
    if let Err(e) = pre {
        log::error(e.message());
        return;
    }
    let timeout = shared.timeout;
    // Boxed: after STARTTLS they are replaced by streams through the TLS session.
    let (mut r, mut w): (DynRead, DynWrite) = (Box::new(s.reader), Box::new(s.writer));
    let mut link = None; // the TLS session, after STARTTLS
    let handshake = handshake(&shared, &mut r, &mut w, &mut link, s.fds.0);
    let quit = shared.quit.clone();
    // A client still negotiating when the server stops has a second to
    // send an option (answered with ERR_SHUTDOWN, see `handshake`), then
    // is dropped so that the server can exit.
    let handshake = futures_lite::future::or(handshake, async {
        let _ = quit.recv().await;
        async_io::Timer::after(Duration::from_secs(1)).await;
        Err(End::Closed)
    });
    let result = if timeout.is_zero() {
        handshake.await
    } else {
        futures_lite::future::or(handshake, async {
            async_io::Timer::after(timeout).await;
            Err(End::Timeout)
        })
        .await
    };
    let session = match result {
        Ok(session) => session,
        Err(End::Timeout) => {
            crate::debug!("connection timed out");
            crate::debug!("handshake: not complete within --timeout={}s, closing connection", timeout.as_secs_f64());
            (s.shutdown)();
            return;
        }
        Err(e) => {
            handshake_failed(&e);
            return;
        }
    };
    if log::verbose() {
        if shared.threads > 1 && shared.model == crate::backend::ThreadModel::Parallel {
            crate::debug!("handshake complete, processing requests with {} threads", shared.threads);
        } else {
            crate::debug!("handshake complete, processing requests serially");
        }
    }
    let files = blocking_files(s.fds);
    drop((r, w, s.shutdown)); // the async sources go; the duplicated descriptors stay
    match (files, link) {
        (Ok((r, w)), None) => transmission::run(&shared, session, r, w, ctx).await,
        (Ok((r, w)), Some(l)) => {
            let (r, w) = (tls::stream::Input::tls(&l, r), tls::stream::Output::tls(&l, w));
            transmission::run_io(&shared, session, r, w, ctx).await
        }
        (Err(e), _) => log::error(&format!("transmission: {e}")),
    }
}

/// Says why a handshake ended without an export (`-v`).
fn handshake_failed(e: &End) {
    match e {
        End::Protocol(DecodeError::BadMagic(m)) => {
            crate::debug!("handshake: unknown option version {m:x}, expecting {:x}, closing connection", crate::proto::wire::IHAVEOPT)
        }
        End::Protocol(DecodeError::TooLong(n)) => crate::debug!("handshake: client option data too long ({n}), closing connection"),
        End::Protocol(e) => crate::debug!("handshake: {e}, closing connection"),
        End::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            crate::debug!("handshake: client closed the connection during negotiation")
        }
        End::Io(e) => crate::debug!("handshake: {e}, closing connection"),
        End::Closed if shutdown::requested() => crate::debug!("handshake: server is shutting down, closing connection"),
        End::Closed => crate::debug!("handshake: negotiation ended without an export, closing connection"),
        End::Timeout => crate::debug!("connection timed out"),
        End::Aborted => {}
    }
}

/// Duplicates the connection's descriptors as blocking files.
fn blocking_files(fds: (RawFd, RawFd)) -> std::io::Result<(std::fs::File, std::fs::File)> {
    let r = process::dup_fd(fds.0)?;
    let w = process::dup_fd(fds.1)?;
    process::set_blocking(r.as_raw_fd())?;
    process::set_blocking(w.as_raw_fd())?;
    Ok((r.into(), w.into()))
}

type DynRead = Box<dyn AsyncRead + Unpin + Send>;
type DynWrite = Box<dyn AsyncWrite + Unpin + Send>;

async fn handshake(
    shared: &Arc<Shared>,
    r: &mut DynRead,
    w: &mut DynWrite,
    link: &mut Option<Arc<tls::Link>>,
    fd: RawFd,
) -> Result<Session, End> {
    let mut ex = ConnExports { shared: shared.clone(), handle: None, tls: false };
    if shared.oldstyle {
        let (info, soft) = blocking_open(&mut ex, "", fd).await;
        let info = info.map_err(|_| End::Closed)?;
        let neg = Negotiation::new(shared.policy, 0, 0)?;
        let eflags = neg.eflags(&info.caps);
        crate::debug!("oldstyle negotiation: flags: global 0x0 export 0x{eflags:x}");
        w.write_all(&handshake::oldstyle(info.size, eflags)).await?;
        w.flush().await?;
        soft_disconnect(soft);
        let handle = ex.handle.take().ok_or(End::Closed)?;
        return Ok(session(handle, &info, eflags, Mode::Simple, false, false));
    }

    let (greeting, gflags) = handshake::greeting(shared.mask_handshake);
    crate::debug!("newstyle negotiation: flags: global 0x{gflags:x}");
    w.write_all(&greeting).await?;
    w.flush().await?;
    let mut cflags = [0; 4];
    r.read_exact(&mut cflags).await?;
    crate::debug!("newstyle negotiation: client flags: 0x{:x}", u32::from_be_bytes(cflags));
    let mut neg = Negotiation::new(shared.policy, gflags, u32::from_be_bytes(cflags))?;
    neg.tls_mode = tls::get().map_or(0, |t| 1 + u8::from(t.required));
    let mut payload = Vec::new();
    loop {
        let mut hdr = [0; OPTION_HEADER_LEN];
        r.read_exact(&mut hdr).await?;
        let h = OptionHeader::decode(&hdr)?;
        let intake = neg.intake(h.option, h.len);
        payload.clear();
        match intake {
            Intake::Close => return Err(End::Protocol(DecodeError::TooLong(h.len.into()))),
            Intake::Discard => discard(r, h.len.into()).await?,
            Intake::Buffer => {
                payload.resize(h.len as usize, 0);
                r.read_exact(&mut payload).await?;
            }
        }
        let mut out = Vec::new();
        if shutdown::requested() && h.option != opt::ABORT {
            handshake::option_reply(&mut out, h.option, rep::ERR_SHUTDOWN, b"");
            crate::debug!("replying to {} with {}", Named::opt(h.option), Named::rep(rep::ERR_SHUTDOWN));
            w.write_all(&out).await?;
            w.flush().await?;
            return Err(End::Closed);
        }
        let p = if intake == Intake::Discard { Payload::Dropped } else { Payload::Bytes(&payload) };
        let step = if matches!(h.option, opt::LIST | opt::INFO | opt::GO | opt::EXPORT_NAME) {
            // These call into the plugin, which may block: not on our thread.
            let owned = payload.clone();
            let dropped = intake == Intake::Discard;
            let fresh = ConnExports { shared: ex.shared.clone(), handle: None, tls: ex.tls };
            let mut moved = std::mem::replace(&mut ex, fresh);
            let ctx = log::context();
            let client = client_fd(fd);
            let (n, e, o, step) = blocking::unblock(move || {
                log::set_context(ctx);
                let p = if dropped { Payload::Dropped } else { Payload::Bytes(&owned) };
                // A panic in the plugin drops this client, not the server.
                let (step, soft) = with_client(client, || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| neg.handle(h.option, p, &mut moved, &mut out)))
                });
                (neg, moved, out, (step.unwrap_or(Step::Close), soft))
            })
            .await;
            neg = n;
            ex = e;
            out = o;
            step
        } else {
            (neg.handle(h.option, p, &mut ex, &mut out), None)
        };
        let (step, soft) = step;
        w.write_all(&out).await?;
        w.flush().await?;
        soft_disconnect(soft);
        if neg.start_tls {
            let Some(t) = tls::get() else { return Err(End::Closed) };
            *link = Some(tls::upgrade(t, r, w).await?);
            neg.tls_started();
            ex.tls = true;
        }
        match step {
            Step::Continue => {}
            // ABORT has been noted by the negotiation already.
            Step::Close if h.option == opt::ABORT => return Err(End::Aborted),
            Step::Close => return Err(End::Closed),
            Step::Transmission => {
                let (info, eflags) = neg.chosen.take().ok_or(End::Closed)?;
                let mode = if neg.extended {
                    Mode::Extended
                } else if neg.structured {
                    Mode::Structured
                } else {
                    Mode::Simple
                };
                let handle = ex.handle.take().ok_or(End::Closed)?;
                return Ok(session(handle, &info, eflags, mode, neg.extended, neg.base_allocation));
            }
        }
    }
}

fn session(handle: Box<dyn Handle>, info: &ExportInfo, eflags: u16, mode: Mode, extended: bool, base: bool) -> Session {
    Session {
        handle: Arc::from(handle),
        mode,
        export: request::Export {
            size: info.size,
            eflags,
            structured: mode != Mode::Simple,
            extended,
            base_allocation: base,
        },
    }
}

/// Opens `name` off the executor; also returns the socket if the plugin
/// asked for a soft disconnect ([`soft_disconnect`] once the reply is out).
async fn blocking_open(ex: &mut ConnExports, name: &str, fd: RawFd) -> (Result<ExportInfo, String>, Option<std::os::fd::OwnedFd>) {
    let fresh = ConnExports { shared: ex.shared.clone(), handle: None, tls: ex.tls };
    let mut moved = std::mem::replace(ex, fresh);
    let name = name.to_string();
    let ctx = log::context();
    let client = client_fd(fd);
    let (m, r) = blocking::unblock(move || {
        log::set_context(ctx);
        let (r, soft) = with_client(client, || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| moved.open(&name))));
        let r = r.unwrap_or_else(|_| Err("open: internal error (panic)".to_string()));
        (moved, (r, soft))
    })
    .await;
    *ex = m;
    r
}

/// A duplicate of the client's socket for a plugin call of the handshake,
/// taken while the connection holds it: the call may outlive the
/// handshake (a timeout, a shutdown), and must never watch or shut down a
/// descriptor number reused by another connection.
fn client_fd(fd: RawFd) -> Option<std::os::fd::OwnedFd> {
    process::dup_fd(fd).ok()
}

/// Runs a plugin call of the handshake (open, get_size, can_*, list…)
/// with the client's socket named, as data calls are
/// (`shutdown::with_connection_fd`): a script that hangs there is killed
/// when the client leaves, and `nbdkit_disconnect` (sh exit codes 6 to 8)
/// reaches this connection.
/// A soft disconnect asked for there is deferred: the socket comes back,
/// to be shut for reading once the reply is sent ([`soft_disconnect`]).
fn with_client<T>(client: Option<std::os::fd::OwnedFd>, f: impl FnOnce() -> T) -> (T, Option<std::os::fd::OwnedFd>) {
    match client {
        Some(c) => {
            let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (r, soft) = shutdown::deferring_soft_disconnect(|| shutdown::with_connection_fd(&gone, c.as_raw_fd(), f));
            (r, soft.then_some(c))
        }
        None => (f(), None),
    }
}

/// A soft disconnect asked for by a plugin during the handshake, once its
/// reply is out: no more is read from the client (nbdkit reads no request).
fn soft_disconnect(client: Option<std::os::fd::OwnedFd>) {
    if let Some(c) = client {
        crate::debug!("soft disconnect: no more requests are read");
        let _ = socket2::SockRef::from(&c).shutdown(std::net::Shutdown::Read);
    }
}

/// Reads and drops `n` bytes.
pub async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// The export side of negotiation for one connection.
struct ConnExports {
    shared: Arc<Shared>,
    handle: Option<Box<dyn Handle>>,
    /// The connection is over TLS (is_tls to the plugin).
    tls: bool,
}

impl Exports for ConnExports {
    fn list(&mut self) -> Result<Vec<crate::backend::Export>, String> {
        let s = &*self.shared;
        let top = s.chain.top();
        let mut list = top.list_exports(s.readonly, self.tls).map_err(|e| {
            log::error(e.message());
            e.message().to_string()
        })?;
        let default = top.default_export(s.readonly, self.tls);
        for e in &mut list {
            // nbdkit_use_default_export's placeholder is the empty name.
            if e.name.is_empty() {
                if let Some(d) = &default {
                    e.name = d.clone();
                }
            }
        }
        Ok(list)
    }

    fn open(&mut self, name: &str) -> Result<ExportInfo, String> {
        self.close();
        let s = &*self.shared;
        let top = s.chain.top();
        let canonical = if name.is_empty() {
            top.default_export(s.readonly, self.tls).ok_or_else(|| "default export (\"\") not permitted".to_string())?
        } else {
            name.to_string()
        };
        let fail = |e: crate::error::Error| {
            log::error(e.message());
            e.message().to_string()
        };
        let h = top.open(s.readonly, &canonical, self.tls).map_err(fail)?;
        let info = ExportInfo {
            size: h.size().map_err(fail)?,
            caps: h.caps().map_err(fail)?,
            // Asked when the client requests them (`details`).
            block_size: None,
            description: None,
            name: canonical,
        };
        self.handle = Some(h);
        Ok(info)
    }

    fn close(&mut self) {
        self.handle = None;
    }

    fn details(&mut self, info: &mut ExportInfo, what: u16) -> Result<(), String> {
        let Some(h) = &self.handle else { return Ok(()) };
        match what {
            crate::proto::wire::info::BLOCK_SIZE => {
                info.block_size = h.block_size().map_err(|e| {
                    log::error(e.message());
                    e.message().to_string()
                })?;
            }
            crate::proto::wire::info::DESCRIPTION => info.description = h.export_description(),
            _ => {}
        }
        Ok(())
    }

    fn verbose(&self) -> bool {
        log::verbose()
    }

    fn note(&mut self, msg: &str) {
        log::debug(msg);
    }
}

/// The handshake timeout when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
