//! `cache=none` for writes: keep the page cache from filling with data the
//! client wrote. After each write we start its writeback
//! (`sync_file_range(WRITE)`) and remember it as a window; the plugin keeps
//! the last [`NR_WINDOWS`] windows of all connections, and when one falls
//! out we wait for its writeback to finish and drop its pages
//! (`posix_fadvise(DONTNEED)`). Waiting only for old windows lets the
//! recent writes proceed in parallel.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Arc, Mutex, Weak};

use super::sys;
use crate::error::{Error, Result};

/// How many recent writes may still be in flight.
pub const NR_WINDOWS: usize = 8;

/// One written range of one open file.
struct Window {
    /// Weak, so a window of a closed connection is simply skipped (nbdkit
    /// removes them on close; here a dead handle cannot be upgraded, and a
    /// live upgrade keeps the fd from being closed and reused meanwhile).
    file: Weak<File>,
    offset: u64,
    len: u64,
}

/// The plugin-wide FIFO of recent write windows.
#[derive(Default)]
pub struct Windows {
    fifo: Mutex<VecDeque<Window>>,
}

impl Windows {
    /// Called after a successful write of `[offset, offset+len)` to `file`.
    pub fn evict_after_write(&self, file: &Arc<File>, offset: u64, len: u64) -> Result<()> {
        let oldest = {
            let mut fifo = self.fifo.lock().unwrap_or_else(|e| e.into_inner());
            let oldest = if fifo.len() == NR_WINDOWS { fifo.pop_front() } else { None };
            fifo.push_back(Window { file: Arc::downgrade(file), offset, len });
            oldest
        };

        // Kick off writeback of this window.
        sys::sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
            .map_err(|e| Error::os("sync_file_range: cache=none: starting eviction", e))?;

        // Finish the oldest window, outside the lock, then drop its pages.
        if let Some(w) = oldest {
            if let Some(f) = w.file.upgrade() {
                let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                sys::sync_file_range(&f, w.offset, w.len, flags)
                    .map_err(|e| Error::os("sync_file_range: cache=none: evicting oldest window", e))?;
                if let Err(e) = sys::fadvise(&f, w.offset, w.len, libc::POSIX_FADV_DONTNEED) {
                    crate::debug!("posix_fadvise: DONTNEED: {}", Error::from(e));
                }
            }
        }
        Ok(())
    }

    /// Windows whose file is still open.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        let fifo = self.fifo.lock().unwrap_or_else(|e| e.into_inner());
        fifo.iter().filter(|w| w.file.strong_count() > 0).count()
    }

    /// All remembered windows.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.fifo.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
