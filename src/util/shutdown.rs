//! Server-wide shutdown: [`request`] (nbdkit's `nbdkit_shutdown`, and
//! what a signal does), and sleeps that end early when it has begun or
//! when the client of the current connection has gone (nbdkit's
//! `nbdkit_nanosleep`).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

static QUIT: AtomicBool = AtomicBool::new(false);
/// How the server stops serving, once it serves ([`on_request`]).
static STOP: Mutex<Option<fn()>> = Mutex::new(None);
static LOCK: Mutex<()> = Mutex::new(());
static WAKE: Condvar = Condvar::new();

thread_local! {
    static CONN_GONE: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
    static CONN_FD: std::cell::Cell<Option<std::os::fd::RawFd>> = const { std::cell::Cell::new(None) };
    static SOFT: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// True once shutdown has begun.
pub fn requested() -> bool {
    QUIT.load(Ordering::Acquire)
}

/// Begins the server's graceful shutdown, from any thread (a plugin's
/// `nbdkit_shutdown`, the signal thread): the flag is set and every sleeper
/// wakes; once the server serves, it stops accepting and reading requests,
/// lets those in flight finish within its grace period, cleans up (the
/// chain's `cleanup`) and exits 0. Asked before the server serves (a
/// plugin's `config`), the flag waits for it: it stops as soon as it
/// starts. Returns at once: the shutdown goes on in the server's threads.
pub fn request() {
    QUIT.store(true, Ordering::Release);
    wake_sleepers();
    let stop = *STOP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stop) = stop {
        stop();
    }
}

/// Called by the server once it serves: `stop` (stop accepting, stop
/// reading requests) runs on every later [`request`], and now if one came
/// before. `stop` must not call [`request`].
pub fn on_request(stop: fn()) {
    let mut g = STOP.lock().unwrap_or_else(|e| e.into_inner());
    *g = Some(stop);
    // Under the lock: a `request` that did not see `stop` has set the flag
    // before taking the lock, so it is seen here.
    let already = requested();
    drop(g);
    if already {
        stop();
    }
}

/// Wake every sleeper so it re-checks its conditions (a connection closed).
pub fn wake_sleepers() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    WAKE.notify_all();
}

/// Runs `f` with `gone` as this thread's "client hung up" flag, so sleeps
/// inside it end early when the connection closes.
pub fn with_connection<T>(gone: &Arc<AtomicBool>, f: impl FnOnce() -> T) -> T {
    let prev = CONN_GONE.with(|c| c.replace(Some(gone.clone())));
    let r = f();
    CONN_GONE.with(|c| *c.borrow_mut() = prev);
    r
}

/// Like [`with_connection`], also naming the client's socket (`fd`), so
/// that a call waiting on something else (a script of the sh plugin) can
/// poll it to notice the client hang up, or the server stop reading.
pub fn with_connection_fd<T>(gone: &Arc<AtomicBool>, fd: std::os::fd::RawFd, f: impl FnOnce() -> T) -> T {
    let prev = CONN_FD.with(|c| c.replace(Some(fd)));
    let r = with_connection(gone, f);
    CONN_FD.with(|c| c.set(prev));
    r
}

/// Runs `f` (a plugin call of the handshake) so that a soft disconnect it
/// asks for ([`defer_soft_disconnect`]) is only noted: the caller does it
/// once its reply is sent (later calls of the same option must not see
/// the client as gone). Returns whether one was asked for.
pub fn deferring_soft_disconnect<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let prev = SOFT.with(|c| c.replace(Some(false)));
    let r = f();
    let asked = SOFT.with(|c| c.replace(prev)) == Some(true);
    (r, asked)
}

/// For a soft disconnect: true if it is deferred (inside
/// [`deferring_soft_disconnect`]), false if the caller must do it now.
pub fn defer_soft_disconnect() -> bool {
    SOFT.with(|c| {
        let inside = c.get().is_some();
        if inside {
            c.set(Some(true));
        }
        inside
    })
}

/// The client socket of the request this thread runs, if the server said
/// ([`with_connection_fd`]); it stays open for the whole call.
pub fn connection_fd() -> Option<std::os::fd::RawFd> {
    CONN_FD.with(|c| c.get())
}

/// True if the client of the request this thread runs has hung up.
pub fn connection_gone() -> bool {
    CONN_GONE.with(|c| c.borrow().as_ref().is_some_and(|g| g.load(Ordering::Acquire)))
}

/// Runs a plugin or filter call, turning a panic into EIO for that call:
/// a bug in one layer must not take the server (or the connection's
/// reply stream) down with it.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(Error::io(format!("{what}: internal error (panic)"))),
    }
}

/// Sleep for `d`, or fail with ESHUTDOWN as soon as shutdown begins or the
/// current connection's client goes away.
pub fn sleep(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    let mut g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if requested() {
            return Err(Error::new(ErrorKind::Shutdown, "sleep interrupted by shutdown"));
        }
        if connection_gone() {
            return Err(Error::new(ErrorKind::Shutdown, "aborting sleep because of connection close"));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        g = WAKE.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_disconnect_is_deferred_only_inside_the_scope() {
        assert!(!defer_soft_disconnect());
        let (r, asked) = deferring_soft_disconnect(|| 7);
        assert_eq!((r, asked), (7, false));
        let (r, asked) = deferring_soft_disconnect(defer_soft_disconnect);
        assert!(r && asked);
        assert!(!defer_soft_disconnect());
    }

    #[test]
    fn sleep_ends_early_when_the_connection_goes() {
        let gone = Arc::new(AtomicBool::new(false));
        let g2 = gone.clone();
        let t = std::thread::spawn(move || {
            with_connection(&g2, || sleep(Duration::from_secs(30)))
        });
        std::thread::sleep(Duration::from_millis(50));
        gone.store(true, Ordering::Release);
        wake_sleepers();
        let r = t.join().unwrap();
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Shutdown);
        assert!(sleep(Duration::from_millis(1)).is_ok());
    }
}
