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

/// C-escape a debug message as nbdkit ≥ 1.36 does.
fn escape(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            7 => out.push_str("\\a"),
            8 => out.push_str("\\b"),
            12 => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            11 => out.push_str("\\v"),
            0x20..=0x7e => out.push(b as char),
            _ if b >= 0x80 => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    // Non-ASCII bytes were pushed one by one; rebuild from the original
    // when the message had any, so UTF-8 survives.
    if msg.bytes().any(|b| b >= 0x80) {
        let mut s = String::new();
        for ch in msg.chars() {
            if ch.is_ascii() {
                s.push_str(&escape(ch.encode_utf8(&mut [0; 4])));
            } else {
                s.push(ch);
            }
        }
        return s;
    }
    out
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
