//! nbdkit's log lines: `nbdkit: [NAME[N]: ]error: MSG` to the chosen
//! destination, `nbdkit: [NAME[N]: ]debug: MSG` to stderr with `-v`.
//!
//! Every line is a `tracing` event (target `nbdkit`), printed by this
//! module's subscriber in nbdkit's formats; the events of libraries
//! (`tracing` ones, and `log` records through a small bridge) are printed
//! with `-v` as `debug: TARGET: MSG`. The `debug!` macro checks `-v` (one
//! relaxed atomic load) before anything is formatted, so with `-v` off a
//! debug line costs nothing else; library `debug!`/`trace!` calls stop at
//! tracing's and log's global maximum level.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{span, Event, Level, Metadata};

/// Where error messages go (`--log`).
#[derive(Debug)]
pub enum Dest {
    /// stderr (the default in the foreground).
    Stderr,
    /// syslog (the default once forked).
    Syslog,
    /// Nowhere.
    Null,
    /// Appended to a file.
    File(Mutex<File>),
}

static VERBOSE: AtomicBool = AtomicBool::new(false);
static DATAPATH: AtomicBool = AtomicBool::new(true);
static CONTROLPATH: AtomicBool = AtomicBool::new(true);

/// `-D nbdkit.backend.datapath=N` and `-D nbdkit.backend.controlpath=N`.
pub fn set_backend_trace(datapath: bool, controlpath: bool) {
    DATAPATH.store(datapath, Ordering::Relaxed);
    CONTROLPATH.store(controlpath, Ordering::Relaxed);
}

/// True if data calls are traced (`-v` and the datapath flag).
pub fn trace_datapath() -> bool {
    verbose() && DATAPATH.load(Ordering::Relaxed)
}

/// True if control calls are traced (`-v` and the controlpath flag).
pub fn trace_controlpath() -> bool {
    verbose() && CONTROLPATH.load(Ordering::Relaxed)
}
static DEST: OnceLock<Dest> = OnceLock::new();

thread_local! {
    static CONTEXT: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

static DEBUG_FLAGS: OnceLock<Vec<(String, String, i64)>> = OnceLock::new();

/// Records the `-D NAME.FLAG=N` flags (FLAG with `.` already turned into
/// `_`, as nbdkit's variable names have it).
pub fn set_debug_flags(flags: Vec<(String, String, i64)>) {
    let _ = DEBUG_FLAGS.set(flags);
}

/// The value of `-D NAME.FLAG=N` (the last one given), 0 if not given: a
/// plugin's or filter's debug switch, nbdkit's `NAME_debug_FLAG` variable.
pub fn debug_flag(name: &str, flag: &str) -> i64 {
    DEBUG_FLAGS
        .get()
        .and_then(|v| v.iter().rev().find(|(n, f, _)| n == name && f == flag))
        .map_or(0, |f| f.2)
}

/// Turn debug messages on (`-v`).
pub fn set_verbose(v: bool) {
    VERBOSE.store(v, Ordering::Relaxed);
    install();
    rebuild();
}

/// True with `-v`.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// `-v` with `-D nbdkit.tls.session=1`: print each TLS session's details
/// (version, cipher suite, peer certificate) once the handshake is done.
pub fn tls_session() -> bool {
    verbose() && debug_flag("nbdkit", "tls_session") != 0
}

/// Choose the error destination once, at start-up.
pub fn set_dest(d: Dest) {
    let _ = DEST.set(d);
    install();
}

/// Name this thread's messages `NAME[N]` (a connection's plugin and instance).
pub fn set_context(ctx: Option<Arc<str>>) {
    CONTEXT.with(|c| *c.borrow_mut() = ctx);
}

/// This thread's context, to carry it onto another thread.
pub fn context() -> Option<Arc<str>> {
    CONTEXT.with(|c| c.borrow().clone())
}

/// A future whose every poll runs with the log context `ctx`: async
/// tasks move between threads, so a thread-local set once is not enough.
pub struct WithContext<F> {
    ctx: Arc<str>,
    inner: Pin<Box<F>>,
}

impl<F> WithContext<F> {
    /// Wraps `inner`.
    pub fn new(ctx: Arc<str>, inner: F) -> WithContext<F> {
        WithContext { ctx, inner: Box::pin(inner) }
    }
}

impl<F: Future> Future for WithContext<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let prev = CONTEXT.with(|c| c.replace(Some(self.ctx.clone())));
        let r = self.inner.as_mut().poll(cx);
        CONTEXT.with(|c| *c.borrow_mut() = prev);
        r
    }
}

/// C-escapes `s`: backslash, the named control characters (`\a \b \f \n
/// \r \t \v`), `\xHH` for other control bytes; `"` too when `quote`.
/// Non-ASCII bytes stay as they are when `keep_utf8` (debug messages,
/// nbdkit ≥ 1.36), else become `\xHH` (nbdkit's `c_string_quote`).
pub fn c_escape(s: &[u8], quote: bool, keep_utf8: bool) -> String {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'"' if quote => b"\\\"",
            7 => b"\\a",
            8 => b"\\b",
            12 => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            11 => b"\\v",
            0x20..=0x7e => {
                out.push(b);
                continue;
            }
            0x80.. if keep_utf8 => {
                out.push(b);
                continue;
            }
            _ => {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                continue;
            }
        };
        out.extend_from_slice(esc);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape(msg: &str) -> String {
    c_escape(msg.as_bytes(), false, true)
}

/// Print a debug message (only with `-v`).
pub fn debug(msg: &str) {
    if verbose() {
        debug_fmt(format_args!("{msg}"));
    }
}

/// Print an error message to the `--log` destination.
pub fn error(msg: &str) {
    error_fmt(format_args!("{msg}"));
}

/// The `debug!` macro's body: one `tracing` event, formatted (once) by
/// the subscriber. Callers check [`verbose`] first, so with `-v` off
/// nothing is formatted.
#[inline(never)]
pub fn debug_fmt(args: fmt::Arguments<'_>) {
    install();
    tracing::event!(target: TARGET, Level::DEBUG, "{}", args);
}

/// The `log_error!` macro's body.
#[inline(never)]
pub fn error_fmt(args: fmt::Arguments<'_>) {
    install();
    tracing::event!(target: TARGET, Level::ERROR, "{}", args);
}

#[allow(unsafe_code)]
fn syslog(msg: &str) {
    static OPEN: std::sync::Once = std::sync::Once::new();
    // SAFETY: the ident is a static NUL-terminated string, as openlog
    // keeps the pointer (nbdkit: the program name, with the PID).
    OPEN.call_once(|| unsafe { libc::openlog(c"nbdkit".as_ptr(), libc::LOG_PID, libc::LOG_USER) });
    let Ok(c) = std::ffi::CString::new(msg.replace('\0', " ")) else { return };
    // SAFETY: "%s" with one valid NUL-terminated string argument.
    unsafe { libc::syslog(libc::LOG_ERR, c"%s".as_ptr(), c.as_ptr()) };
}

/// `debug!("fmt", args…)`: formats only when `-v` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::util::log::verbose() {
            $crate::util::log::debug_fmt(format_args!($($arg)*));
        }
    };
}

/// `error!("fmt", args…)`.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::util::log::error_fmt(format_args!($($arg)*))
    };
}

// ---------------------------------------------------------------------------
// The subscriber: nbdkit's line formats for the server's events and for
// the libraries' (`tracing` events, and `log` records turned into
// `tracing` events by the bridge below).

/// The target of the server's own events.
pub const TARGET: &str = "nbdkit";

/// The most detailed level of library events shown with `-v` (`TRACE`
/// with `-D nbdkit.tls.log=N`, N ≥ 2, for rustls; `DEBUG` otherwise).
static LIB_TRACE_TLS: AtomicBool = AtomicBool::new(false);

/// `-D nbdkit.tls.log=N`: GnuTLS log levels 0–99. rustls and the PSK
/// handshakes have debug and trace records; from level 2 on their trace
/// records are shown too (with `-v`, as every debug message).
pub fn set_tls_log(level: i64) {
    LIB_TRACE_TLS.store(level >= 2, Ordering::Relaxed);
    rebuild();
}

/// `-D ssh.log=N` (libssh's verbosity, 0–4) for russh's records, which
/// are shown with `-v` only from 1 on: 1 warnings, 2 info ("protocol"),
/// 3 debug ("packet"), 4 trace ("functions").
static SSH_LOG: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the ssh plugin's `-D ssh.log=N`.
pub fn set_ssh_log(level: i64) {
    SSH_LOG.store(level.clamp(0, 4) as u8, Ordering::Relaxed);
    rebuild();
}

fn lib_max(target: &str) -> Option<Level> {
    if target.starts_with("russh") {
        return match SSH_LOG.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Level::WARN),
            2 => Some(Level::INFO),
            3 => Some(Level::DEBUG),
            _ => Some(Level::TRACE),
        };
    }
    // rustls, and the PSK handshakes (`tls::psk…`).
    if LIB_TRACE_TLS.load(Ordering::Relaxed) && (target.starts_with("rustls") || target.starts_with("tls::")) {
        Some(Level::TRACE)
    } else {
        Some(Level::DEBUG)
    }
}

fn max_level() -> LevelFilter {
    if !verbose() {
        LevelFilter::ERROR
    } else if LIB_TRACE_TLS.load(Ordering::Relaxed) || SSH_LOG.load(Ordering::Relaxed) >= 4 {
        LevelFilter::TRACE
    } else {
        LevelFilter::DEBUG
    }
}

/// Recomputes what reaches the subscriber after `-v` or a level changed:
/// with `-v` off, library `debug!`/`trace!` calls stop at one atomic load
/// (tracing's and log's global maximum level).
fn rebuild() {
    tracing::callsite::rebuild_interest_cache();
    log::set_max_level(match max_level() {
        f if f == LevelFilter::ERROR => log::LevelFilter::Off,
        f if f == LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}

/// Installs the subscriber and the `log` bridge (once; later calls do
/// nothing). Every entry point that logs calls it, so no line is lost to
/// a missing subscriber.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Lines);
        let _ = log::set_logger(&LogBridge);
        rebuild();
    });
}

/// The subscriber. Spans are not used (the connection's name is a
/// thread-local, [`set_context`], cheaper than entering a span per
/// request), so it refuses them.
struct Lines;

impl Subscriber for Lines {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_span() {
            Interest::never()
        } else if meta.target() == TARGET {
            // The server's own: the callers already checked -v.
            Interest::always()
        } else {
            Interest::sometimes()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        if meta.is_span() {
            return false;
        }
        // The `log` bridge's events were filtered by the bridge.
        meta.target() == TARGET || (verbose() && (meta.target() == "log" || lib_max(meta.target()).is_some_and(|m| *meta.level() <= m)))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(max_level())
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut v = Fields::default();
        event.record(&mut v);
        if meta.target() == TARGET {
            if *meta.level() == Level::ERROR {
                write_error(&v.message);
            } else {
                write_debug(format_args!("{}", escape(&v.message)));
            }
        } else {
            // A library's: `debug: TARGET: [LEVEL: ]MESSAGE[ key=value…]`.
            let target = v.log_target.as_deref().unwrap_or(meta.target());
            let level = match *meta.level() {
                Level::ERROR => "error: ",
                Level::WARN => "warning: ",
                _ => "",
            };
            write_debug(format_args!("{target}: {level}{}{}", escape(&v.message), escape(&v.rest)));
        }
    }
}

/// An event's fields: the message, the `log` bridge's target, the rest as
/// ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "log.target" => self.log_target = Some(value.to_string()),
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.rest, " {n}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            n if n.starts_with("log.") => {}
            n => {
                let _ = write!(self.rest, " {n}={value:?}");
            }
        }
    }
}

thread_local! {
    /// Lines for stderr go here instead while a unit test captures them.
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Writes a whole line to stderr in one `write` (or to the capture).
fn to_stderr(line: &str) {
    let captured = CAPTURE.with(|c| c.borrow_mut().as_mut().map(|s| s.push_str(line)).is_some());
    if !captured {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// `nbdkit: [NAME[N]: ]debug: MSG` to stderr, in one write.
fn write_debug(msg: fmt::Arguments<'_>) {
    to_stderr(&with_prefix(|p| format!("{p}debug: {msg}\n")));
}

/// `nbdkit: [NAME[N]: ]error: MSG` (not escaped) to the `--log`
/// destination; syslog gets the message alone.
fn write_error(msg: &str) {
    match DEST.get().unwrap_or(&Dest::Stderr) {
        Dest::Stderr => to_stderr(&with_prefix(|p| format!("{p}error: {msg}\n"))),
        Dest::Null => {}
        Dest::File(f) => {
            let line = with_prefix(|p| format!("{p}error: {msg}\n"));
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(line.as_bytes());
            let _ = f.flush();
        }
        Dest::Syslog => syslog(msg),
    }
}

/// Runs `f` with `nbdkit: ` or `nbdkit: NAME[N]: `.
fn with_prefix<T>(f: impl FnOnce(fmt::Arguments<'_>) -> T) -> T {
    CONTEXT.with(|c| match &*c.borrow() {
        Some(n) => f(format_args!("nbdkit: {n}: ")),
        None => f(format_args!("nbdkit: ")),
    })
}

/// `log` records (rustls, and the other crates that use `log`) become
/// `tracing` events with a `log.target` field, as `tracing-log` makes
/// them, so one subscriber prints everything.
struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        verbose() && lib_max(meta.target()).is_some_and(|m| to_level(meta.level()) <= m)
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let (t, a) = (r.target(), r.args());
        // tracing's callsites are static: one per level.
        match r.level() {
            log::Level::Error => tracing::event!(target: "log", Level::ERROR, log.target = t, "{}", a),
            log::Level::Warn => tracing::event!(target: "log", Level::WARN, log.target = t, "{}", a),
            log::Level::Info => tracing::event!(target: "log", Level::INFO, log.target = t, "{}", a),
            log::Level::Debug => tracing::event!(target: "log", Level::DEBUG, log.target = t, "{}", a),
            log::Level::Trace => tracing::event!(target: "log", Level::TRACE, log.target = t, "{}", a),
        }
    }

    fn flush(&self) {}
}

fn to_level(l: log::Level) -> Level {
    match l {
        log::Level::Error => Level::ERROR,
        log::Level::Warn => Level::WARN,
        log::Level::Info => Level::INFO,
        log::Level::Debug => Level::DEBUG,
        log::Level::Trace => Level::TRACE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this thread writes to stderr while `f` runs.
    fn capture(f: impl FnOnce()) -> String {
        CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
        f();
        CAPTURE.with(|c| c.borrow_mut().take().unwrap())
    }

    /// One test for all of it: -v is process-wide.
    #[test]
    fn lines_through_tracing_in_nbdkits_formats() {
        set_verbose(false);
        assert_eq!(log::max_level(), log::LevelFilter::Off);
        let mut formatted = false;
        let quiet = capture(|| {
            crate::debug!("{}", {
                formatted = true;
                1
            });
            log::debug!(target: "rustls::server", "hidden");
            tracing::warn!(target: "hyper", "hidden");
            crate::log_error!("bad {}", 1);
        });
        assert!(!formatted, "debug! formatted its arguments with -v off");
        assert_eq!(quiet, "nbdkit: error: bad 1\n");

        set_verbose(true);
        let out = capture(|| {
            crate::debug!("a\tb {}", 7);
            debug("plain");
            set_context(Some("memory[3]".into()));
            crate::debug!("in a connection");
            error("not escaped\t");
            set_context(None);
            log::debug!(target: "rustls::server::hs", "decided upon suite {}", "X");
            log::trace!(target: "rustls::record", "hidden without -D nbdkit.tls.log=2");
            tracing::warn!(target: "hyper::proto", peer = 5, "odd \"thing\"");
            tracing::trace!(target: "hyper::proto", "hidden");
        });
        assert_eq!(
            out,
            "nbdkit: debug: a\\tb 7\n\
             nbdkit: debug: plain\n\
             nbdkit: memory[3]: debug: in a connection\n\
             nbdkit: memory[3]: error: not escaped\t\n\
             nbdkit: debug: rustls::server::hs: decided upon suite X\n\
             nbdkit: debug: hyper::proto: warning: odd \"thing\" peer=5\n"
        );
        set_tls_log(2);
        let out = capture(|| log::trace!(target: "rustls::record", "shown"));
        assert_eq!(out, "nbdkit: debug: rustls::record: shown\n");
        set_tls_log(0);
        set_verbose(false);
    }

    #[test]
    fn debug_messages_are_c_escaped() {
        assert_eq!(escape("a\\b\x07\t\n\x01\"é"), "a\\\\b\\a\\t\\n\\x01\"é");
    }
}
