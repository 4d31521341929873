//! When to wait a little before reading the next request.
//!
//! A client that keeps many small requests in flight (fio at queue depth
//! 32, a database on an NBD disk) sends them one system call at a time.
//! A server that answers each at once and then blocks in `read` sleeps and
//! is woken once per request or two, and both sides pay for it: the
//! client's `send` has to wake the server (on a VM, an inter-processor
//! interrupt), the server goes through the scheduler, and each batch of
//! one reply costs a socket buffer of its own. Measured on the 2-core
//! test machine with the memory plugin, 4 KiB random reads at queue depth
//! 32: the server slept once every 4.5 requests and the client, at 100 %
//! of a core, set the pace.
//!
//! So after a batch of several small requests has been answered and the
//! read buffer is empty, the worker sleeps [`NAP`] before reading again:
//! the client's next requests pile up in the socket without waking
//! anyone, and the next read takes them all. This is interrupt
//! moderation, as network cards do it. It starts only when the client has
//! shown it keeps many requests in flight (a batch of `START`), and goes
//! on while each nap brings `KEEP` or more: a client that waits for each
//! reply, or keeps up to four in flight, never makes a batch that big, so
//! its latency is untouched; a batch with a big request in it does not
//! count (copying the data costs far more than a wake-up), nor does one
//! with a request handed to another thread (its plugin may block: the
//! wait is the plugin's).
//!
//! Measured (docs/performance.md): 4 KiB random reads at queue depth 32
//! went from 72k to 90k IOPS and from 9.8 to 6.1 µs of server CPU per
//! request, writes from 84k to 101k and 9.3 to 6.5 µs; queue depths 1 and
//! 4 did not change. The numbers were picked from a sweep: shorter naps
//! or lower thresholds kept falling out of napping at depth 32, and
//! starting at 4 cost depth 4 a fifth of its IOPS.
//!
//! The nap's length follows the client. One that takes longer per request
//! (over TCP, about twice as long as over a Unix socket) brought fewer
//! than `KEEP` in 50 µs and the worker kept falling out of napping; a
//! fixed 100 µs kept it napping at depth 32 but cost depths 8 and 16 a
//! tenth to a quarter of their IOPS, the client running out of requests
//! while the worker slept. So a nap that brings too few is followed by
//! one twice as long (up to [`NAP_MAX`]) rather than by giving up, and one
//! that brings back every request the client keeps in flight (as many as
//! the biggest batch lately) is followed by one half as long (down to
//! [`NAP`]): the client waited for the worker. Measured over TCP (A/B,
//! medians of 3): depth 32 reads 53k → 61k IOPS and 9.9 → 6.9 µs per
//! request, writes 63k → 69k, depth 16 reads 45k → 58k, depth 8 reads
//! 48k → 55k; over a Unix socket depths 8 to 32 within noise or better
//! and 0.1–1.0 µs less CPU per request.

use std::time::Duration;

/// How long the worker waits before reading again, at first and at least.
pub const NAP: Duration = Duration::from_micros(50);

/// The fewest small requests in a batch that make the worker start
/// napping, and that keep it napping.
const START: usize = 5;
const KEEP: usize = 3;

/// READ and WRITE requests bigger than this are not small: at 64 KiB the
/// copy already costs more than a wake-up, and napping measured 12 % slower.
const SMALL_MAX: u64 = 16 * 1024;

/// What a worker has seen since its read buffer was last empty.
#[derive(Debug, Default)]
pub struct Batch {
    small: usize,
    big: bool,
    /// The last batch ended in a nap, of this length (zero: not napping).
    nap: Duration,
    /// The most small requests one batch has brought lately: as far as the
    /// worker can tell, how many the client keeps in flight.
    most: usize,
    /// The most of the current window of batches, and its length.
    window_most: usize,
    window: u32,
}

/// Longest nap, for a client slow to send (over TCP it takes about twice
/// as long per request as over a Unix socket).
pub const NAP_MAX: Duration = Duration::from_micros(200);
const _: () = assert!(NAP_MAX.as_micros() == 4 * NAP.as_micros());

/// Batches after which `most` forgets what came before.
const WINDOW: u32 = 256;

impl Batch {
    /// Counts a request of `count` bytes that moves data (`data`: READ or
    /// WRITE) or not.
    pub fn saw(&mut self, data: bool, count: u64) {
        if data && count > SMALL_MAX {
            self.big = true;
        } else {
            self.small += 1;
        }
    }

    /// A request was handed to another thread (its plugin may block): no
    /// nap after this batch, the wait is the plugin's.
    pub fn handed_off(&mut self) {
        self.big = true;
    }

    /// The read buffer is empty and the replies have gone out: how long to
    /// nap before reading again, if at all. Starts the next batch.
    pub fn ended(&mut self) -> Option<Duration> {
        let n = self.small;
        let napping = !self.nap.is_zero();
        self.window_most = self.window_most.max(n);
        self.window += 1;
        if self.window == WINDOW {
            self.most = self.window_most;
            self.window_most = 0;
            self.window = 0;
        }
        self.most = self.most.max(n);
        let least = if napping { KEEP } else { START };
        let nap = if self.big || n == 0 {
            None
        } else if n < least {
            // A nap that brought too few: the client is slow to send, not
            // done; nap longer, up to NAP_MAX, before giving up.
            (napping && self.nap < NAP_MAX).then(|| (self.nap * 2).min(NAP_MAX))
        } else if napping && n >= self.most && self.nap > NAP {
            // It brought every request the client keeps in flight: the
            // client waited for the worker, so nap less.
            Some((self.nap / 2).max(NAP))
        } else if napping {
            Some(self.nap)
        } else {
            Some(NAP)
        };
        self.small = 0;
        self.big = false;
        self.nap = nap.unwrap_or(Duration::ZERO);
        nap
    }
}

/// Makes the calling thread's sleeps end on time: by default Linux lets
/// a sleep of a normal thread end up to 50 µs late, which would more than
/// triple [`NAP`].
pub fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: &mut Batch, reqs: &[(bool, u64)]) -> bool {
        for &(data, count) in reqs {
            b.saw(data, count);
        }
        b.ended().is_some()
    }

    const SMALL: (bool, u64) = (true, 4096);

    #[test]
    fn up_to_four_requests_at_a_time_never_wait() {
        let mut b = Batch::default();
        for n in 0..START {
            assert!(!batch(&mut b, &vec![SMALL; n]), "{n}");
        }
    }

    #[test]
    fn a_pipelining_client_makes_the_worker_wait() {
        assert!(batch(&mut Batch::default(), &[SMALL; START]));
        assert!(batch(&mut Batch::default(), &[SMALL, SMALL, (false, 1 << 30), (false, 0), (true, SMALL_MAX)]));
        assert!(batch(&mut Batch::default(), &[SMALL; 32]));
    }

    #[test]
    fn napping_goes_on_while_naps_bring_enough() {
        let mut b = Batch::default();
        assert!(batch(&mut b, &[SMALL; START]));
        for _ in 0..10 {
            assert!(batch(&mut b, &[SMALL; KEEP]));
        }
        // Too few: longer naps (100, then 200 µs), then none.
        assert!(batch(&mut b, &[SMALL; KEEP - 1]));
        assert!(batch(&mut b, &[SMALL; KEEP - 1]));
        assert!(!batch(&mut b, &[SMALL; KEEP - 1]));
        // Stopped: it takes a whole START batch again.
        assert!(!batch(&mut b, &[SMALL; KEEP]));
        assert!(batch(&mut b, &[SMALL; START]));
    }

    #[test]
    fn a_request_handed_off_means_no_wait() {
        let mut b = Batch::default();
        batch(&mut b, &[SMALL; 2]);
        b.handed_off();
        assert!(!batch(&mut b, &[SMALL; 8]));
        assert!(batch(&mut b, &[SMALL; START]));
    }

    #[test]
    fn a_big_request_in_the_batch_means_no_wait() {
        let mut b = Batch::default();
        let mut reqs = vec![SMALL; 10];
        reqs[3] = (true, SMALL_MAX + 1);
        assert!(!batch(&mut b, &reqs));
        assert!(batch(&mut b, &[SMALL; START]));
        assert!(!batch(&mut b, &[(false, 0), (true, 1 << 20), SMALL]));
    }

    fn nap(b: &mut Batch, n: usize) -> Option<Duration> {
        for _ in 0..n {
            b.saw(true, 4096);
        }
        b.ended()
    }

    #[test]
    fn a_slow_client_gets_longer_naps_not_none() {
        let mut b = Batch::default();
        assert_eq!(nap(&mut b, 32), Some(NAP)); // depth 32 seen
        assert_eq!(nap(&mut b, 2), Some(NAP * 2)); // too few: longer
        assert_eq!(nap(&mut b, 2), Some(NAP_MAX));
        assert_eq!(nap(&mut b, 6), Some(NAP_MAX)); // enough: keep it
        assert_eq!(nap(&mut b, 1), None, "at the longest nap, too few ends napping");
        assert_eq!(nap(&mut b, 3), None, "and it takes a START batch again");
        assert_eq!(nap(&mut b, START), Some(NAP));
    }

    #[test]
    fn a_nap_that_brings_everything_in_flight_is_shortened() {
        let mut b = Batch::default();
        assert_eq!(nap(&mut b, 8), Some(NAP)); // a client keeping 8 in flight
        assert_eq!(nap(&mut b, 2), Some(NAP * 2));
        assert_eq!(nap(&mut b, 2), Some(NAP_MAX));
        assert_eq!(nap(&mut b, 8), Some(NAP * 2), "all 8 came back: the client waited");
        assert_eq!(nap(&mut b, 8), Some(NAP));
        assert_eq!(nap(&mut b, 8), Some(NAP), "never below NAP");
    }

    #[test]
    fn the_depth_seen_is_forgotten_after_a_window() {
        let mut b = Batch::default();
        assert_eq!(nap(&mut b, 32), Some(NAP));
        for _ in 0..2 * WINDOW {
            assert_eq!(nap(&mut b, 6), Some(NAP));
        }
        // The client now keeps 6 in flight: a nap that brings all 6 is cut.
        assert_eq!(nap(&mut b, 2), Some(NAP * 2));
        assert_eq!(nap(&mut b, 6), Some(NAP));
    }
}
