//! nbdkit's log lines: `nbdkit: [NAME[N]: ]error: MSG` to the chosen
//! destination, `nbdkit: [NAME[N]: ]debug: MSG` to stderr with `-v`.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

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
}

/// True with `-v`.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Choose the error destination once, at start-up.
pub fn set_dest(d: Dest) {
    let _ = DEST.set(d);
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

fn prefix() -> String {
    CONTEXT.with(|c| match &*c.borrow() {
        Some(n) => format!("nbdkit: {n}: "),
        None => "nbdkit: ".to_string(),
    })
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
        let line = format!("{}debug: {}\n", prefix(), escape(msg));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Print an error message to the `--log` destination.
pub fn error(msg: &str) {
    let line = format!("{}error: {}\n", prefix(), msg);
    match DEST.get().unwrap_or(&Dest::Stderr) {
        Dest::Stderr => {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        Dest::Null => {}
        Dest::File(f) => {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(line.as_bytes());
            let _ = f.flush();
        }
        Dest::Syslog => syslog(msg),
    }
}

#[allow(unsafe_code)]
fn syslog(msg: &str) {
    let Ok(c) = std::ffi::CString::new(msg.replace('\0', " ")) else { return };
    // SAFETY: "%s" with one valid NUL-terminated string argument.
    unsafe { libc::syslog(libc::LOG_ERR, c"%s".as_ptr(), c.as_ptr()) };
}

/// `debug!("fmt", args…)`: formats only when `-v` is on.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::util::log::verbose() {
            $crate::util::log::debug(&format!($($arg)*));
        }
    };
}

/// `error!("fmt", args…)`.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::util::log::error(&format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_messages_are_c_escaped() {
        assert_eq!(escape("a\\b\x07\t\n\x01\"é"), "a\\\\b\\a\\t\\n\\x01\"é");
    }
}
