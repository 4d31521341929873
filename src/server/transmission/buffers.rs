//! What requests in flight hold: the connection's pool of data buffers
//! (a request costs no allocation and no clearing of memory the plugin
//! overwrites anyway) and the server-wide byte budget, which stops
//! workers reading requests when too many bytes are held (back-pressure,
//! not growth).

use std::sync::{Condvar, Mutex};

use crate::error::{Error, ErrorKind};

/// The biggest buffer a pool keeps.
pub(super) const POOL_MAX: usize = 4 << 20;

/// Data buffers a connection reuses, so a request costs no allocation
/// and no clearing of memory that the plugin overwrites anyway.
#[derive(Default)]
pub(super) struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of at least `n` initialized bytes, or ENOMEM.
    pub(super) fn get(&self, n: usize) -> Result<Vec<u8>, Error> {
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
    pub(super) fn put(&self, v: Vec<u8>) {
        // Big buffers are freed at once: idle connections keep little.
        if v.capacity() == 0 || v.capacity() > POOL_MAX {
            return;
        }
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < 8 {
            free.push(v);
        }
    }
}

/// The server-wide budget on bytes held by requests in flight (write
/// payloads and read buffers). When it runs out, workers stop reading
/// requests: back-pressure, not growth.
pub(super) const BUDGET_BYTES: u64 = 512 << 20;

/// Bytes free, and how many requests wait for some.
struct BudgetState {
    free: u64,
    waiters: usize,
}

static BUDGET: Mutex<BudgetState> = Mutex::new(BudgetState { free: BUDGET_BYTES, waiters: 0 });

static BUDGET_FREED: Condvar = Condvar::new();

/// Bytes of the budget held by one request, given back on drop.
pub(super) struct Budget(u64);

impl Budget {
    /// Waits until `bytes` (at most 64 MiB, far below the budget) are free.
    /// A request takes all it needs at once, so no two can deadlock.
    pub(super) fn take(bytes: u64) -> Budget {
        if bytes == 0 {
            return Budget(0);
        }
        let mut b = BUDGET.lock().unwrap_or_else(|e| e.into_inner());
        while b.free < bytes {
            b.waiters += 1;
            b = BUDGET_FREED.wait(b).unwrap_or_else(|e| e.into_inner());
            b.waiters -= 1;
        }
        b.free -= bytes;
        Budget(bytes)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if self.0 > 0 {
            let mut b = BUDGET.lock().unwrap_or_else(|e| e.into_inner());
            b.free += self.0;
            // Waking costs a system call: only when somebody waits.
            if b.waiters > 0 {
                BUDGET_FREED.notify_all();
            }
        }
    }
}

/// Tests that use the server-wide byte budget run one at a time.
#[cfg(test)]
pub(super) static BUDGET_TESTS: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_given_back() {
        let _one = BUDGET_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let free = || BUDGET.lock().unwrap().free;
        assert_eq!(free(), BUDGET_BYTES);
        {
            let _b = Budget::take(1 << 20);
            assert_eq!(free(), BUDGET_BYTES - (1 << 20));
        }
        assert_eq!(free(), BUDGET_BYTES);
    }
}
