//! When a request on a plugin that may block runs on the thread that read
//! it, without a hand-off.
//!
//! A worker that reads a request for such a plugin (the file plugin) lets
//! go of the connection's read lock before running it, so that another
//! worker can read the next request meanwhile. With a client that waits
//! for each reply (queue depth 1: `qemu-img convert` of small pieces, a
//! database's synchronous writes) that costs a hand-off per request and
//! buys nothing: letting go of the lock wakes the worker waiting for it (a
//! futex wake and a context switch), which reads the next request while
//! the first worker, its reply sent, sleeps on the lock. Measured with the
//! file plugin, 4 KiB writes at depth 1 (A/B, 3 pairs): 31–44 µs of server
//! CPU per request became 20–27 µs, and IOPS rose by a quarter to a half.
//!
//! So once [`MIN`] requests in a row found the connection with nothing
//! else to do (no other request buffered or running, no reply held back),
//! each ran in under [`FAST`], the next one runs on the reading thread.
//! Then a request that arrives meanwhile waits for it: the first sign of a
//! client with more in flight (a request that came while one ran here) or
//! of a slow request hands the following ones off again, and after a
//! request came meanwhile it takes twice as many in a row as before (up
//! to [`MAX`]): a client at depth 2 often has only one in flight. Only
//! commands that wait for no disk as a rule qualify: writes, trims and
//! zeroes without FUA, block status. Not FLUSH or FUA (they wait for the
//! disk), nor a READ: one that gets this far could not be answered from
//! memory (`Handle::pread_nowait`), so it waits for the disk.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::proto::request::Request;
use crate::proto::wire::{cmd, cmdflag};

/// Requests in a row that must find the connection idle, at first.
const MIN: u32 = 8;

/// The most it can take, after clients that had more in flight.
const MAX: u32 = 1024;

/// A request that takes longer than this is slow: next to it, a hand-off
/// costs little.
pub const FAST: Duration = Duration::from_micros(100);

/// One connection's state. Touched by the worker holding the read lock,
/// and by workers that ran a request of their own ([`Solo::ran_apart`]):
/// relaxed atomics, as a wrong guess costs time, never correctness.
#[derive(Debug)]
pub struct Solo {
    run: AtomicU32,
    need: AtomicU32,
}

impl Default for Solo {
    fn default() -> Solo {
        Solo { run: AtomicU32::new(0), need: AtomicU32::new(MIN) }
    }
}

/// Whether `req` as a rule waits for no disk (see the module's comment).
pub fn quick(req: &Request) -> bool {
    match req.cmd {
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => req.flags & cmdflag::FUA == 0,
        cmd::BLOCK_STATUS => true,
        _ => false,
    }
}

impl Solo {
    /// Whether the request just read runs on this thread. `alone`: nothing
    /// else is buffered, running or held back; `quick`: see [`quick`].
    pub fn turn(&self, alone: bool, quick: bool) -> bool {
        if !alone {
            self.run.store(0, Ordering::Relaxed);
            return false;
        }
        let n = self.run.load(Ordering::Relaxed);
        if !quick {
            return false;
        }
        if n >= self.need.load(Ordering::Relaxed) {
            return true;
        }
        self.run.store(n + 1, Ordering::Relaxed);
        false
    }

    /// A request ran on this thread and took `took`; `came`: another
    /// request arrived meanwhile (it waited).
    pub fn ran_here(&self, took: Duration, came: bool) {
        if came {
            let need = self.need.load(Ordering::Relaxed);
            self.need.store((need * 2).min(MAX), Ordering::Relaxed);
            self.run.store(0, Ordering::Relaxed);
        } else if took > FAST {
            self.run.store(0, Ordering::Relaxed);
        }
    }

    /// A request ran on a worker of its own and took `took`.
    pub fn ran_apart(&self, took: Duration) {
        if took > FAST {
            self.run.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_micros(10);
    const SLOW: Duration = Duration::from_millis(1);

    /// Requests in a row, alone, that it takes until one runs here.
    fn run_up(s: &Solo) -> u32 {
        (0..=MAX + 1).find(|_| s.turn(true, true)).expect("runs here in the end")
    }

    #[test]
    fn runs_here_after_min_lone_requests_and_goes_on() {
        let s = Solo::default();
        assert_eq!(run_up(&s), MIN);
        for _ in 0..100 {
            s.ran_here(QUICK, false);
            assert!(s.turn(true, true));
        }
    }

    #[test]
    fn company_or_a_slow_request_starts_the_count_again() {
        let s = Solo::default();
        for _ in 0..MIN - 1 {
            assert!(!s.turn(true, true));
        }
        assert!(!s.turn(false, true));
        assert_eq!(run_up(&s), MIN);
        s.ran_here(SLOW, false);
        assert_eq!(run_up(&s), MIN, "a slow one does not make it harder");
        s.ran_apart(SLOW);
        assert_eq!(run_up(&s), MIN);
        s.ran_apart(QUICK);
        assert!(s.turn(true, true), "a quick one apart changes nothing");
    }

    #[test]
    fn a_request_that_came_meanwhile_doubles_the_count_up_to_max() {
        let s = Solo::default();
        assert_eq!(run_up(&s), MIN);
        let mut need = MIN;
        for _ in 0..12 {
            s.ran_here(QUICK, true);
            need = (need * 2).min(MAX);
            assert_eq!(run_up(&s), need);
        }
        assert_eq!(need, MAX);
    }

    #[test]
    fn commands_that_wait_for_the_disk_never_run_here_nor_break_a_run() {
        let s = Solo::default();
        assert_eq!(run_up(&s), MIN);
        assert!(!s.turn(true, false));
        assert!(s.turn(true, true), "a flush at depth 1 is no sign of company");
    }

    #[test]
    fn which_commands_are_quick() {
        let r = |c, f| Request { flags: f, cmd: c, cookie: 0, offset: 0, count: 4096 };
        assert!(quick(&r(cmd::WRITE, 0)));
        assert!(quick(&r(cmd::WRITE_ZEROES, cmdflag::NO_HOLE)));
        assert!(quick(&r(cmd::TRIM, 0)));
        assert!(quick(&r(cmd::BLOCK_STATUS, cmdflag::REQ_ONE)));
        assert!(!quick(&r(cmd::WRITE, cmdflag::FUA)));
        assert!(!quick(&r(cmd::TRIM, cmdflag::FUA)));
        assert!(!quick(&r(cmd::READ, 0)));
        assert!(!quick(&r(cmd::FLUSH, 0)));
        assert!(!quick(&r(cmd::CACHE, 0)));
    }
}
