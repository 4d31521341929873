//! When a request on a plugin that may block runs on the thread that read
//! it, without a hand-off.
//!
//! A worker that reads a request for a plugin that may block lets go of
//! the connection's read lock before running it, so that another worker
//! reads the next request meanwhile: a plugin waiting for a disk or a
//! network must not stop the others. But the file plugin's writes land in
//! the page cache and take a few microseconds, less than the hand-off:
//! letting go of the lock wakes the worker waiting for it (a futex wake
//! and a context switch), and the writes then queue on the file's lock in
//! the kernel anyway. Measured on the 2-core test machine, file plugin,
//! 4 KiB random writes: running them all on one thread (`-t 1`) gave
//! 25–55 % more IOPS than 16 workers at every queue depth from 1 to 32,
//! with less CPU per request (depth 1: 20–27 instead of 31–44 µs).
//!
//! So on a handle whose waits are brief as a rule (`Handle::brief`: the
//! file plugin without cache=none), a request that waits for no disk as a
//! rule ([`quick`]: a WRITE, or a small TRIM or ZERO, without FUA; block
//! status) runs on the reading thread, as requests of plugins that never
//! block do, and its reply goes out at once. FLUSH and FUA wait
//! for the disk; a READ that gets this far could not be answered from the
//! page cache (`Handle::pread_nowait`): those are handed off. If one that
//! ran here was slow ([`slow`]: the kernel throttling a writer
//! that dirties pages faster than the disk takes them, a big hole to
//! punch), the next requests waited for it: the following [`MIN`] quick
//! requests are handed off, twice as many after each slow one in a row
//! (up to [`MAX`]), fewer again after a long run of quick ones.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::proto::request::Request;
use crate::proto::wire::{cmd, cmdflag};

/// Quick requests handed off after the first slow one.
const MIN: u32 = 8;

/// The most handed off after slow ones in a row.
const MAX: u32 = 1024;

/// Quick runs in a row after which the count to hand off halves.
const DECAY: u32 = 256;

/// Longer than this is slow for a small request: next to it, a hand-off
/// costs little.
const FAST: Duration = Duration::from_micros(100);

/// Whether a request of `count` bytes that took `took` was slow: longer
/// than [`FAST`] plus a nanosecond a byte (copying into the page cache
/// runs at several GB/s; a writer the kernel throttles sleeps for
/// milliseconds).
fn slow(took: Duration, count: u64) -> bool {
    took > FAST + Duration::from_nanos(count)
}

/// The biggest TRIM or ZERO that counts as quick (punching a hole in a
/// file costs more the bigger it is).
const SMALL: u64 = 1 << 20;

/// Whether `req` as a rule waits for no disk (see the module's comment).
pub fn quick(req: &Request) -> bool {
    let fua = req.flags & cmdflag::FUA != 0;
    match req.cmd {
        cmd::WRITE => !fua,
        cmd::TRIM | cmd::WRITE_ZEROES => !fua && req.count <= SMALL,
        cmd::BLOCK_STATUS => true,
        _ => false,
    }
}

/// One connection's state, touched only by the worker holding the read
/// lock (atomics only so that the connection can be shared).
#[derive(Debug)]
pub struct Brief {
    /// Quick requests still to hand off.
    skip: AtomicU32,
    /// How many to hand off after the next slow one.
    backoff: AtomicU32,
    /// Quick runs here in a row.
    streak: AtomicU32,
}

impl Default for Brief {
    fn default() -> Brief {
        Brief { skip: AtomicU32::new(0), backoff: AtomicU32::new(MIN), streak: AtomicU32::new(0) }
    }
}

impl Brief {
    /// Whether a request that is `quick` runs on this thread.
    pub fn turn(&self, quick: bool) -> bool {
        if !quick {
            return false;
        }
        match self.skip.load(Ordering::Relaxed) {
            0 => true,
            n => {
                self.skip.store(n - 1, Ordering::Relaxed);
                false
            }
        }
    }

    /// A request that moved `count` bytes (0 unless it is a WRITE) ran on
    /// this thread and took `took`.
    pub fn ran(&self, took: Duration, count: u64) {
        let backoff = self.backoff.load(Ordering::Relaxed);
        if slow(took, count) {
            self.skip.store(backoff, Ordering::Relaxed);
            self.backoff.store((backoff * 2).min(MAX), Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.streak.load(Ordering::Relaxed) + 1;
        if streak < DECAY {
            self.streak.store(streak, Ordering::Relaxed);
        } else {
            self.backoff.store((backoff / 2).max(MIN), Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_micros(10);
    const SLOW: Duration = Duration::from_millis(1);

    /// Quick requests handed off before one runs here again.
    fn handed_off(b: &Brief) -> u32 {
        (0..=MAX + 1).find(|_| b.turn(true)).expect("runs here in the end")
    }

    #[test]
    fn quick_requests_run_here_from_the_start_and_while_they_stay_quick() {
        let b = Brief::default();
        for _ in 0..1000 {
            assert!(b.turn(true));
            b.ran(QUICK, 4096);
        }
    }

    #[test]
    fn slow_ones_in_a_row_hand_off_twice_as_many_each_time_up_to_max() {
        let b = Brief::default();
        let mut n = MIN;
        for _ in 0..12 {
            assert!(b.turn(true));
            b.ran(SLOW, 4096);
            assert_eq!(handed_off(&b), n);
            n = (n * 2).min(MAX);
        }
        assert_eq!(n, MAX);
    }

    #[test]
    fn a_long_quick_run_halves_what_the_next_slow_one_hands_off() {
        let b = Brief::default();
        for _ in 0..4 {
            b.ran(SLOW, 4096);
            handed_off(&b);
        }
        // Handing off MIN, 2 MIN, 4 MIN, 8 MIN: the next would be 16 MIN.
        for _ in 0..DECAY * 2 {
            b.ran(QUICK, 4096);
        }
        b.ran(SLOW, 4096);
        assert_eq!(handed_off(&b), 4 * MIN);
        for _ in 0..DECAY * 10 {
            b.ran(QUICK, 4096);
        }
        b.ran(SLOW, 4096);
        assert_eq!(handed_off(&b), MIN, "never below MIN");
    }

    #[test]
    fn requests_that_wait_for_the_disk_never_run_here_nor_use_up_the_hand_offs() {
        let b = Brief::default();
        assert!(!b.turn(false));
        b.ran(SLOW, 4096);
        for _ in 0..100 {
            assert!(!b.turn(false));
        }
        assert_eq!(handed_off(&b), MIN);
    }

    #[test]
    fn slow_depends_on_the_size() {
        assert!(!slow(Duration::from_micros(90), 4096));
        assert!(slow(Duration::from_micros(120), 4096));
        assert!(!slow(Duration::from_micros(900), 1 << 20));
        assert!(slow(Duration::from_millis(2), 1 << 20));
        let b = Brief::default();
        b.ran(Duration::from_micros(900), 1 << 20);
        assert!(b.turn(true));
    }

    #[test]
    fn which_requests_are_quick() {
        let r = |c, f, count| Request { flags: f, cmd: c, cookie: 0, offset: 0, count };
        assert!(quick(&r(cmd::WRITE, 0, 4096)));
        assert!(quick(&r(cmd::WRITE, 0, 32 << 20)));
        assert!(quick(&r(cmd::WRITE_ZEROES, cmdflag::NO_HOLE, 65536)));
        assert!(quick(&r(cmd::TRIM, 0, SMALL)));
        assert!(!quick(&r(cmd::TRIM, 0, SMALL + 1)));
        assert!(!quick(&r(cmd::WRITE_ZEROES, 0, 1 << 30)));
        assert!(quick(&r(cmd::BLOCK_STATUS, cmdflag::REQ_ONE, 1 << 30)));
        assert!(!quick(&r(cmd::WRITE, cmdflag::FUA, 4096)));
        assert!(!quick(&r(cmd::TRIM, cmdflag::FUA, 4096)));
        assert!(!quick(&r(cmd::READ, 0, 4096)));
        assert!(!quick(&r(cmd::FLUSH, 0, 0)));
        assert!(!quick(&r(cmd::CACHE, 0, 4096)));
    }
}
