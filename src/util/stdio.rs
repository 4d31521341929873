//! nbdkit's `nbdkit_stdio_safe`: false when stdin and stdout are the
//! client's connection (`-s`), so no layer may read or print there (the
//! sh plugin's inline script `-` is read from stdin).

use std::sync::atomic::{AtomicBool, Ordering};

static UNSAFE: AtomicBool = AtomicBool::new(false);

/// `-s`: stdin and stdout carry NBD.
pub fn set_unsafe() {
    UNSAFE.store(true, Ordering::Release);
}

/// True unless stdin and stdout carry NBD.
pub fn safe() -> bool {
    !UNSAFE.load(Ordering::Acquire)
}
