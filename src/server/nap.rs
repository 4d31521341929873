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

use std::time::Duration;

/// How long the worker waits before reading again.
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
    /// The last batch ended in a nap.
    napping: bool,
}

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

    /// The read buffer is empty and the replies have gone out: whether to
    /// nap before reading again. Starts the next batch.
    pub fn ended(&mut self) -> bool {
        let least = if self.napping { KEEP } else { START };
        let nap = !self.big && self.small >= least;
        *self = Batch { napping: nap, ..Batch::default() };
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
        b.ended()
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
}
