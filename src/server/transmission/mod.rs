//! The transmission phase, on worker threads as in nbdkit: each worker
//! takes the connection's read lock, reads one request (header and
//! payload), lets go, runs it on the export's handle and writes the whole
//! reply under the write lock. Workers are started lazily, up to `-t`
//! (one under the serialize models), when a request arrives and no other
//! worker is waiting to read: a client with one request in flight costs
//! two threads taking turns, a client with 32 gets up to 16 in parallel,
//! and replies go out in completion order. Requests that cannot wait for
//! long run on the thread holding the read lock instead: all those of a
//! plugin that never blocks, READs answered from the page cache, and
//! writes that stay quick on a plugin whose waits are brief (brief.rs).
//!
//! This file sets a connection up (its `Conn`, the socket options, the
//! list of live connections that [`stop_all`] shuts down); the rest is
//! split by concern:
//!
//! * `worker.rs`: the worker loop, which decides where each request runs;
//! * `incoming.rs`: reading and checking the next request;
//! * `execute.rs`: running a request on the handle and building its reply;
//! * `read.rs`: the READ paths (lent pages, `sendfile`, `RWF_NOWAIT`,
//!   copying READs, the header of a READ reply);
//! * `write.rs`: the WRITE paths (filled payloads, payload
//!   reads, with the TCP low mark);
//! * `buffers.rs`: the buffer pool and the server-wide byte budget;
//! * `output.rs`: replies and the writing side (held-back replies,
//!   vectored writes, a broken socket).
//!
//! Everything stays inside this module (`pub(super)` at most): the server
//! sees [`Session`], [`run`], [`run_io`] and [`stop_all`]. The release
//! build has one codegen unit, so the split changes no inlining.

mod buffers;
mod execute;
mod incoming;
mod output;
mod read;
mod worker;
mod write;

use std::fs::File;
use std::io::BufReader;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::tls::stream::{Input, Output};
use super::{brief, Shared};
use crate::backend::{Handle, ThreadModel};
use crate::proto::reply::Mode;
use crate::proto::request::{self, EXT_REQUEST_LEN, REQUEST_LEN};
use crate::util::{log, shutdown};
use buffers::Pool;
use output::{Sock, LEND_TIME};
use worker::spawn_worker;

/// The export a connection negotiated.
pub struct Session {
    /// The outermost handle (checked).
    pub handle: Arc<dyn Handle>,
    /// Reply format.
    pub mode: Mode,
    /// What request validation needs.
    pub export: request::Export,
}

/// Held around every callback under the serialize_all_requests model.
static ALL_REQUESTS: Mutex<()> = Mutex::new(());

/// Read sides of live connections, shut down when the server stops so
/// that workers blocked in read() wake up.
static LIVE: Mutex<Vec<(u64, RawFd)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Stops every connection from reading further requests (server shutdown);
/// requests in flight finish and get their replies.
pub fn stop_all() {
    for &(_, fd) in LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        shutdown_fd(fd, libc::SHUT_RD);
    }
}

#[allow(unsafe_code)]
fn shutdown_fd(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown(2) on a descriptor that stays open while it is
    // registered (Conn::drop unregisters before the files close); ENOTSOCK
    // on pipes (-s) is harmless.
    unsafe { libc::shutdown(fd, how) };
}

/// One connection in the transmission phase.
struct Conn {
    id: u64,
    handle: Arc<dyn Handle>,
    mode: Mode,
    export: request::Export,
    hlen: usize,
    reader: Mutex<BufReader<Input>>,
    read_fd: RawFd,
    writer: Mutex<Sock>,
    pool: Pool,
    /// The client hung up: sleeping requests give up.
    gone: Arc<AtomicBool>,
    /// No more requests are read.
    stop: AtomicBool,
    /// Workers waiting for the read lock, and workers alive.
    waiting: AtomicUsize,
    workers: AtomicUsize,
    max_workers: usize,
    serialize_all: bool,
    /// The handle never blocks: small requests run under the read lock.
    inline: bool,
    /// Big READs are sent straight from the plugin's storage (the socket
    /// has a send timeout that bounds how long it is lent).
    lend: bool,
    /// Big READs may be sent from a file with `sendfile` (`Handle::pread_fd`;
    /// the socket has a send timeout, so a stalled client is noticed).
    splice: bool,
    /// A TCP connection: big payloads are read once they have all come
    /// (`read_waiting`).
    tcp: bool,
    /// Through TLS: big READs go to another worker, so that encrypting
    /// the reply does not hold up reading the next request.
    tls: bool,
    /// The last request had a payload over [`incoming::BIG_PAYLOAD`]
    /// (touched under the read lock).
    big: AtomicBool,
    /// The handle's waits are brief as a rule (`Handle::brief`): quick
    /// requests run on the reading thread while they stay quick.
    brief: bool,
    quick: brief::Brief,
    ctx: Arc<str>,
    name: String,
    /// Dropped with the last worker: wakes the connection's task.
    _done: async_channel::Sender<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|&(id, _)| id != self.id);
        self.gone.store(true, Ordering::Release);
        shutdown::wake_sleepers();
    }
}

/// Serves requests on blocking `reader`/`writer` until the client
/// disconnects, breaks the protocol or the server stops; returns when the
/// last request in flight has been answered.
pub async fn run(shared: &Arc<Shared>, s: Session, reader: File, writer: File, ctx: Arc<str>) {
    run_io(shared, s, Input::Plain(reader), Output::Plain(writer), ctx).await
}

/// [`run`] on the socket or through TLS (then the zero-copy READs and the
/// TCP payload reads, which work on the socket itself, are off).
pub async fn run_io(shared: &Arc<Shared>, s: Session, reader: Input, writer: Output, ctx: Arc<str>) {
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    let parallel = shared.model == ThreadModel::Parallel;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let read_fd = reader.fd();
    let plain = reader.is_plain();
    let inline = !s.handle.blocks();
    // (Not under serialize_all_requests: other connections would wait.)
    let brief = !inline && s.handle.brief() && shared.model > ThreadModel::SerializeAllRequests;
    let lend = inline && plain && set_send_timeout(writer.fd(), LEND_TIME).is_ok();
    // sendfile/splice move bytes between descriptors without passing
    // through this process: only for a connection whose `writer` carries
    // the plaintext NBD stream itself (never over TLS, or the data would
    // bypass the encryption).
    let splice = !inline && plain && socket_domain(writer.fd()).is_some()
        && set_send_timeout(writer.fd(), LEND_TIME).is_ok();
    widen_unix_send_buffer(writer.fd());
    let conn = Arc::new(Conn {
        id,
        hlen: if s.export.extended { EXT_REQUEST_LEN } else { REQUEST_LEN },
        handle: s.handle,
        mode: s.mode,
        export: s.export,
        reader: Mutex::new(BufReader::with_capacity(128 * 1024, reader)),
        read_fd,
        writer: Mutex::new(Sock(writer)),
        pool: Pool::default(),
        gone: Arc::new(AtomicBool::new(false)),
        stop: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
        workers: AtomicUsize::new(0),
        max_workers: if parallel { shared.threads.max(1) as usize } else { 1 },
        serialize_all: shared.model <= ThreadModel::SerializeAllRequests,
        inline,
        lend,
        splice,
        tcp: plain && matches!(socket_domain(read_fd), Some(libc::AF_INET | libc::AF_INET6)),
        tls: !plain,
        big: AtomicBool::new(false),
        brief,
        quick: brief::Brief::default(),
        name: ctx.to_string(),
        ctx,
        _done: done_tx,
    });
    if log::verbose() {
        describe(&conn);
    }
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push((id, read_fd));
    if shutdown::requested() {
        shutdown_fd(read_fd, libc::SHUT_RD);
    }
    spawn_worker(&conn);
    drop(conn);
    let _ = done_rx.recv().await; // Err once every worker has dropped its Arc
}

/// What this server does beyond nbdkit for this connection (`-v`), in the
/// style of nbdkit's "handshake complete" line.
fn describe(conn: &Conn) {
    let replies = match conn.mode {
        Mode::Extended => "extended headers",
        Mode::Structured => "structured replies",
        Mode::Simple => "simple replies",
    };
    let inline = if conn.inline {
        "requests run on the reading thread (the plugin never blocks)"
    } else if conn.brief {
        "quick writes run on the reading thread (the plugin's waits are brief)"
    } else {
        "requests run on worker threads"
    };
    log::debug(&format!(
        "transmission: {replies}; worker threads start as needed, up to {}; {inline}; small replies batched{}",
        conn.max_workers,
        if conn.lend { "; reads sent from the plugin's memory" } else { "" }
    ));
}

/// Send buffer asked for on Unix sockets (the kernel caps it at
/// `net.core.wmem_max`).
const UNIX_SNDBUF: libc::c_int = 1 << 20;

/// A Unix socket's default send buffer (208 KiB) holds a fifth of a 1 MiB
/// reply, so the worker sleeps and wakes five times per reply while the
/// client drains it: a bigger one made 1 MiB reads about 9 % faster.
/// TCP sockets keep the kernel's autotuning. Best effort.
#[allow(unsafe_code)]
fn widen_unix_send_buffer(fd: RawFd) {
    if socket_domain(fd) == Some(libc::AF_UNIX) {
        // SAFETY: setsockopt reads the int given. A failure is ignored.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, (&UNIX_SNDBUF as *const libc::c_int).cast(),
                             std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
    }
}

/// The address family of socket `fd` (`AF_UNIX`, `AF_INET`…); None if it
/// is not a socket (`-s` on pipes).
#[allow(unsafe_code)]
fn socket_domain(fd: RawFd) -> Option<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`.
    let r = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut domain as *mut libc::c_int).cast(), &mut len)
    };
    (r == 0).then_some(domain)
}

/// Sets SO_SNDTIMEO; fails on anything but a socket (`-s` on pipes).
#[allow(unsafe_code)]
fn set_send_timeout(fd: RawFd, t: Duration) -> std::io::Result<()> {
    // (`as _`: musl's time_t and suseconds_t aliases are deprecated in libc.)
    let tv = libc::timeval { tv_sec: t.as_secs() as _, tv_usec: t.subsec_micros() as _ };
    // SAFETY: setsockopt reads a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&tv as *const libc::timeval).cast(),
                         std::mem::size_of::<libc::timeval>() as libc::socklen_t)
    };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The export of the unit tests: 1 MiB, simple replies.
#[cfg(test)]
fn test_export() -> request::Export {
    request::Export { size: 1 << 20, eflags: 1, structured: false, extended: false, base_allocation: false }
}
