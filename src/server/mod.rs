//! The server: start-up in nbdkit's order, listeners, the accept loop,
//! one task per connection, `--run`, and a clean shutdown.

pub mod connection;
pub mod listen;
mod nap;
mod brief;
pub mod process;
pub mod service;
pub mod tls;
pub mod transmission;
pub mod uri;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_io::Async;
use smol::Executor;

use crate::backend::chain::Chain;
use crate::backend::ThreadModel;
use crate::cli::{Config, LogDest};
use crate::proto::negotiate::Policy;
use crate::util::{log, shutdown};
use connection::Streams;
use listen::Listeners;

/// What every connection shares.
pub struct Shared {
    /// The configured chain (lives for the whole process).
    pub chain: &'static Chain,
    /// `-r`.
    pub readonly: bool,
    /// `-o`.
    pub oldstyle: bool,
    /// `--mask-handshake`.
    pub mask_handshake: u32,
    /// Negotiation policy.
    pub policy: Policy,
    /// The chain's thread model.
    pub model: ThreadModel,
    /// `-t`.
    pub threads: u32,
    /// Handshake timeout (zero = none).
    pub timeout: Duration,
    /// Closed when the server shuts down.
    pub quit: async_channel::Receiver<()>,
}

static EXECUTOR: Executor<'static> = Executor::new();
static QUIT: OnceLock<async_channel::Sender<()>> = OnceLock::new();

/// Spawns a task on the server's executor.
pub fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) {
    EXECUTOR.spawn(f).detach();
}

/// Begins a clean shutdown: stop accepting, end idle connections (the
/// same as a plugin's `nbdkit_shutdown`, [`shutdown::request`]).
pub fn quit() {
    shutdown::request();
}

/// What [`shutdown::request`] does once the server serves: stop accepting
/// and stop every connection from reading requests.
fn stop_serving() {
    transmission::stop_all();
    if let Some(tx) = QUIT.get() {
        tx.close();
    }
}

/// How long connections get to finish their work after a shutdown signal.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the server as `cfg` says; returns the exit code.
pub fn run(cfg: Config) -> i32 {
    match start(cfg) {
        Ok(code) => code,
        Err(msg) => {
            log::error(&msg);
            1
        }
    }
}

fn start(cfg: Config) -> Result<i32, String> {
    process::mask_quit_signals(libc::SIG_BLOCK);
    // SAFETY-free: umask has no failure mode.
    set_umask();
    log::set_verbose(cfg.verbose);
    match &cfg.log {
        LogDest::Stderr => log::set_dest(log::Dest::Stderr),
        LogDest::Null => log::set_dest(log::Dest::Null),
        LogDest::Syslog => log::set_dest(log::Dest::Syslog),
        LogDest::File(p) => {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| format!("{}: fopen: {e}", p.display()))?;
            log::set_dest(log::Dest::File(std::sync::Mutex::new(f)));
        }
        LogDest::Default => {
            if cfg.foreground {
                log::set_dest(log::Dest::Stderr);
            }
        }
    }
    crate::debug!("nbdkit {}", env!("CARGO_PKG_VERSION"));
    log::set_debug_flags(
        cfg.debug_flags.iter().map(|(n, f, v)| (n.clone(), f.replace('.', "_"), *v)).collect(),
    );
    let flag = |name: &str| {
        cfg.debug_flags.iter().rev().find(|(n, f, _)| n == "nbdkit" && f.replace('.', "_") == name).map(|f| f.2 != 0)
    };
    log::set_tls_log(log::debug_flag("nbdkit", "tls_log"));
    log::set_backend_trace(
        flag("backend_datapath").unwrap_or(true),
        flag("backend_controlpath").unwrap_or(true),
    );
    if flag("environ") == Some(true) {
        for (k, v) in std::env::vars_os() {
            crate::debug!("{}={}", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    if cfg.exit_with_parent {
        process::exit_with_parent().map_err(|e| format!("--exit-with-parent: {e}"))?;
    }

    if cfg.single {
        crate::util::stdio::set_unsafe();
    }
    match tls::load(&cfg) {
        Ok(t) => tls::set(t),
        Err(tls::Reported) => return Ok(1),
    }
    let mut chain = Chain::new(&cfg.plugin, &cfg.filters)?;
    for (k, v) in &cfg.params {
        chain.config(k, v).map_err(|e| e.to_string())?;
    }
    chain.config_complete().map_err(|e| e.to_string())?;
    crate::debug!("using thread model: {}", chain.thread_model().name());
    chain.get_ready().map_err(|e| e.to_string())?;
    let model = chain.thread_model();
    let chain: &'static Chain = Box::leak(Box::new(chain));

    // Keep the client's stdio for -s, and the original ones for --run.
    let single_fds = if cfg.single {
        let r = process::dup_fd(0).map_err(|e| format!("dup: stdin: {e}"))?;
        let w = process::dup_fd(1).map_err(|e| format!("dup: stdout: {e}"))?;
        Some((r, w))
    } else {
        None
    };
    if cfg.swap {
        if let Err(service::Fail::Plain(m) | service::Fail::Error(m)) = service::lock_memory() {
            eprintln!("{m}");
            return Ok(1);
        }
        crate::debug!("--swap: all memory locked");
    }
    let listeners = if cfg.single {
        None
    } else if cfg.socket_activation > 0 {
        crate::debug!("using socket activation, nr_socks = {}", cfg.socket_activation);
        Some(Listeners::Sockets(service::activation_sockets(cfg.socket_activation)))
    } else {
        Some(service::labelled(cfg.selinux_label.as_deref(), || listen::bind(&cfg))?)
    };
    if log::verbose() {
        match &listeners {
            Some(Listeners::Unix(_, path, _)) => log::debug(&format!("bound to unix socket {}", path.display())),
            Some(Listeners::Tcp(l)) => log::debug(&format!(
                "bound to IP address {}:{} ({} socket(s))",
                cfg.ipaddr.as_deref().unwrap_or("<any>"),
                cfg.port.as_deref().unwrap_or("10809"),
                l.len()
            )),
            Some(Listeners::Sockets(_)) | None => {}
        }
        match cfg.timeout.unwrap_or(connection::DEFAULT_TIMEOUT) {
            t if t.is_zero() => log::debug("handshake timeout: disabled"),
            t => log::debug(&format!("handshake timeout: {}s (--timeout)", t.as_secs_f64())),
        }
    }
    let unix_path = listeners.as_ref().and_then(Listeners::unix_path);
    let the_uri = uri::uri(&cfg, unix_path.as_deref());
    if log::verbose() {
        // nbdkit 1.44's lines (it computes the URI before loading the
        // plugin; here the socket is bound first, so `-U -` has a path).
        let mode = if cfg.socket_activation > 0 {
            "socket activation"
        } else if cfg.single {
            "listen stdin"
        } else if unix_path.is_some() {
            "unix socket"
        } else if cfg.vsock {
            "vsock"
        } else {
            "TCP/IP"
        };
        crate::debug!("service mode: {mode}");
        match &the_uri {
            Some(u) => crate::debug!("NBD URI: {u}"),
            None => crate::debug!("no NBD URI because service mode is {mode}"),
        }
    }
    if cfg.print_uri {
        if let Some(u) = &the_uri {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(uri::print_uri_text(u).as_bytes());
            let _ = out.flush();
        }
    }
    let captive = match &cfg.run {
        Some(cmd) => {
            let script = format!("{}{}", uri::run_prelude(&cfg, the_uri.as_deref(), unix_path.as_deref()), cmd);
            Some(
                std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .spawn()
                    .map_err(|e| format!("--run: /bin/sh: {e}"))?,
            )
        }
        None => None,
    };
    let _ = process::null_stdio();
    process::ignore_sigpipe();
    if cfg.user.is_some() || cfg.group.is_some() {
        match service::change_user(cfg.user.as_deref(), cfg.group.as_deref()) {
            Ok(said) => said.iter().for_each(|m| crate::debug!("{m}")),
            Err(service::Fail::Error(m)) => return Err(m),
            Err(service::Fail::Plain(m)) => {
                eprintln!("{m}");
                return Ok(1);
            }
        }
    }
    if !cfg.foreground {
        process::daemonize(cfg.verbose).map_err(|e| format!("fork: {e}"))?;
        if cfg.log == LogDest::Default {
            log::set_dest(log::Dest::Syslog);
        }
    }
    if let Some(p) = &cfg.pidfile {
        process::write_pidfile(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    chain.after_fork().map_err(|e| e.to_string())?;

    let (tx, rx) = async_channel::bounded::<()>(1);
    let _ = QUIT.set(tx);
    // From here a shutdown request (a signal, a plugin) stops the server;
    // one that came earlier (a plugin's `config`) does it now.
    shutdown::on_request(stop_serving);
    process::watch_signals(quit).map_err(|e| format!("signals: {e}"))?;
    process::mask_quit_signals(libc::SIG_UNBLOCK);
    let shared = Arc::new(Shared {
        chain,
        readonly: cfg.readonly,
        oldstyle: cfg.oldstyle,
        mask_handshake: cfg.mask_handshake,
        policy: Policy {
            no_sr: cfg.no_sr,
            no_mc: cfg.no_mc || cfg.no_sr,
            multi_conn: model > ThreadModel::SerializeConnections,
            extended_headers: true,
        },
        model,
        threads: if cfg.threads == 0 { 16 } else { cfg.threads },
        timeout: cfg.timeout.unwrap_or(connection::DEFAULT_TIMEOUT),
        quit: rx,
    });
    // The main thread runs the executor too.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8) - 1;
    for i in 0..workers {
        let _ = std::thread::Builder::new().name(format!("{}.{i}", chain.plugin_name())).spawn(|| {
            smol::block_on(EXECUTOR.run(std::future::pending::<()>()))
        });
    }

    let keepalive = cfg.keepalive;
    let captive_status = smol::block_on(EXECUTOR.run(async {
        let serving = async {
            match (listeners, single_fds) {
                (_, Some((r, w))) => serve_single(shared.clone(), r, w).await,
                (Some(l), None) => accept_loop(shared.clone(), l, keepalive).await,
                (None, None) => {}
            }
            None
        };
        match captive {
            Some(child) => {
                let child = Arc::new(std::sync::Mutex::new(child));
                let c2 = child.clone();
                let wait = async move { Some(blocking::unblock(move || c2.lock().map_or_else(|_| Err(std::io::ErrorKind::Other.into()), |mut c| c.wait())).await) };
                let served = futures_lite::future::or(wait, serving).await;
                match served {
                    Some(st) => Some(st),
                    // The server stopped first (a signal): nbdkit waits for
                    // the command and exits with its status.
                    None => Some(blocking::unblock(move || child.lock().map_or_else(|_| Err(std::io::ErrorKind::Other.into()), |mut c| c.wait())).await),
                }
            }
            None => serving.await,
        }
    }));
    quit();
    // Let connections finish in-flight work, within the grace period.
    let deadline = std::time::Instant::now() + GRACE;
    while CONNECTIONS.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    chain.cleanup();
    chain.unload();
    Ok(match captive_status {
        Some(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Some(Err(e)) => return Err(format!("--run: wait: {e}")),
        None => 0,
    })
}

#[allow(unsafe_code)]
fn set_umask() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o022) };
}

/// Connections alive, to wait for at shutdown.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static INSTANCE: AtomicU64 = AtomicU64::new(0);

struct Counted;

impl Counted {
    fn new() -> Counted {
        CONNECTIONS.fetch_add(1, Ordering::AcqRel);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

static SERIALIZE_CONNECTIONS: async_lock::Mutex<()> = async_lock::Mutex::new(());

async fn serve_counted<R, W>(shared: Arc<Shared>, s: Streams<R, W>)
where
    R: futures_lite::AsyncRead + Unpin + Send + 'static,
    W: futures_lite::AsyncWrite + Unpin + Send + 'static,
{
    let _c = Counted::new();
    let instance = INSTANCE.fetch_add(1, Ordering::AcqRel) + 1;
    let _serial = if shared.model == ThreadModel::SerializeConnections {
        Some(SERIALIZE_CONNECTIONS.lock().await)
    } else {
        None
    };
    connection::serve(shared, s, instance).await;
}

async fn accept_loop(shared: Arc<Shared>, l: Listeners, keepalive: bool) {
    let quit = shared.quit.clone();
    let stop = async {
        let _ = quit.recv().await;
    };
    let accept = async {
        match l {
            Listeners::Unix(listener, _path, _private) => {
                let Ok(listener) = Async::new(listener) else { return };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            crate::debug!("accepted connection");
                            let s = streams(stream);
                            spawn(serve_counted(shared.clone(), s));
                        }
                        Err(e) => backoff(e).await,
                    }
                }
            }
            Listeners::Tcp(listeners) => {
                let (tx, rx) = async_channel::unbounded();
                for l in listeners {
                    let tx = tx.clone();
                    let Ok(l) = Async::new(l) else { continue };
                    spawn(async move {
                        loop {
                            match l.accept().await {
                                Ok((stream, _)) => {
                                    if tx.send(stream).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => backoff(e).await,
                            }
                        }
                    });
                }
                drop(tx);
                while let Ok(stream) = rx.recv().await {
                    crate::debug!("accepted connection");
                    let _ = stream.get_ref().set_nodelay(true);
                    if keepalive {
                        let _ = socket2::SockRef::from(stream.get_ref()).set_keepalive(true);
                    }
                    let s = streams(stream);
                    spawn(serve_counted(shared.clone(), s));
                }
            }
            Listeners::Sockets(listeners) => {
                let (tx, rx) = async_channel::unbounded();
                for l in listeners {
                    let tx = tx.clone();
                    let Ok(l) = Async::new(l) else { continue };
                    spawn(async move {
                        loop {
                            match l.read_with(|l| l.accept()).await {
                                Ok((stream, _)) => {
                                    if tx.send(stream).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => backoff(e).await,
                            }
                        }
                    });
                }
                drop(tx);
                while let Ok(stream) = rx.recv().await {
                    // TCP_NODELAY fails on other families: ignored.
                    let _ = stream.set_nodelay(true);
                    if keepalive {
                        let _ = stream.set_keepalive(true);
                    }
                    let Ok(stream) = Async::new(stream) else { continue };
                    spawn(serve_counted(shared.clone(), streams(stream)));
                }
            }
        }
    };
    futures_lite::future::or(accept, stop).await;
}

/// accept() failed (EMFILE, ENFILE…): wait a little, log at a bounded rate.
async fn backoff(e: std::io::Error) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::AcqRel) != now {
        log::error(&format!("accept: {e}"));
    }
    async_io::Timer::after(Duration::from_millis(50)).await;
}

/// The streams of an accepted socket (Unix or TCP).
fn streams<T>(s: Async<T>) -> Streams<ArcIo<T>, ArcIo<T>>
where
    T: AsRawFd + std::os::fd::AsFd + Send + Sync + 'static,
{
    let s = Arc::new(s);
    let fd = s.as_raw_fd();
    let raw = s.clone();
    Streams {
        fds: (fd, fd),
        reader: ArcIo(s.clone()),
        writer: ArcIo(s),
        shutdown: Arc::new(move || {
            let _ = socket2::SockRef::from(raw.get_ref()).shutdown(std::net::Shutdown::Both);
        }),
    }
}

/// Reads and writes through a shared `Async` socket (`&Async<T>` does I/O).
struct ArcIo<T>(Arc<Async<T>>);

impl<T> futures_lite::AsyncRead for ArcIo<T>
where
    for<'a> &'a T: std::io::Read,
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl<T> futures_lite::AsyncWrite for ArcIo<T>
where
    for<'a> &'a T: std::io::Write,
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write_vectored(cx, bufs)
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_close(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_close(cx)
    }
}

/// `-s`: one connection on the saved stdin/stdout. They may be a socket,
/// a pipe or a regular file (a recorded session being replayed), so the
/// handshake does plain blocking I/O: this is the only connection, and
/// reading exactly what is asked leaves the requests for the workers.
async fn serve_single(shared: Arc<Shared>, r: OwnedFd, w: OwnedFd) {
    let (rfd, wfd) = (r.as_raw_fd(), w.as_raw_fd());
    let shutdown: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        #[allow(unsafe_code)]
        // SAFETY: shutdown(2) on descriptors owned by the Streams below
        // (ENOTSOCK on pipes and files is ignored).
        unsafe {
            libc::shutdown(rfd, libc::SHUT_RDWR);
            libc::shutdown(wfd, libc::SHUT_RDWR);
        }
    });
    let (rf, wf) = (std::fs::File::from(r), std::fs::File::from(w));
    // Sockets and pipes can be polled (so --timeout works); regular files
    // cannot, and are read with plain blocking I/O.
    let pollable = |f: &std::fs::File| f.metadata().is_ok_and(|m| !m.is_file());
    if pollable(&rf) && pollable(&wf) {
        if let (Ok(ra), Ok(wa)) = (Async::new(rf.try_clone().expect("dup")), Async::new(wf.try_clone().expect("dup"))) {
            let s = Streams { fds: (rfd, wfd), reader: ArcIo(Arc::new(ra)), writer: ArcIo(Arc::new(wa)), shutdown };
            serve_counted(shared, s).await;
            drop((rf, wf));
            return;
        }
    }
    let s = Streams { fds: (rfd, wfd), reader: BlockingIo(rf), writer: BlockingIo(wf), shutdown };
    serve_counted(shared, s).await;
}

/// Blocking I/O behind the async traits (only for `-s`).
struct BlockingIo(std::fs::File);

impl futures_lite::AsyncRead for BlockingIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Read;
        std::task::Poll::Ready(self.0.read(buf))
    }
}

impl futures_lite::AsyncWrite for BlockingIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        std::task::Poll::Ready(self.0.write(buf))
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        use std::io::Write;
        std::task::Poll::Ready(self.0.flush())
    }
    fn poll_close(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
