//! The worker loop: a worker takes the connection's read lock, reads the
//! next request (incoming.rs) and decides where it runs: right here,
//! under the read lock, when that costs less than waking another thread
//! (a plugin that never blocks, a READ from lent pages or the page cache,
//! a quick write on a plugin whose waits are brief), else on this thread
//! after letting go of the lock, with another worker started to read the
//! next request. Replies of requests run under the read lock are held
//! back and sent in batches (output.rs); a batch of small requests ends
//! with a nap (nap.rs). This is the dispatch: the paths themselves live
//! in read.rs, write.rs and execute.rs.

use std::io::BufRead;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::execute::execute;
use super::incoming::{read_one, Next};
use super::output::{broken, flush, hold_or_send, send, Reply, HOLD_MAX};
use super::read::{read_held, read_lent, read_nowait, read_spliced, NOWAIT_MAX, SPLICE_MIN};
use super::write::write_filled;
use super::Conn;
use crate::proto::request::Request;
use crate::proto::wire::cmd;
use crate::server::nap;
use crate::util::{log, shutdown};

pub(super) fn spawn_worker(conn: &Arc<Conn>) {
    let n = conn.workers.fetch_add(1, Ordering::AcqRel);
    crate::debug!("starting worker thread {}.{n}", conn.name);
    let c = conn.clone();
    let spawned = std::thread::Builder::new().name(format!("{}.{n}", c.name)).spawn(move || worker(c));
    if spawned.is_err() {
        conn.workers.fetch_sub(1, Ordering::AcqRel);
        log::error("cannot start a worker thread");
    }
}

fn worker(conn: Arc<Conn>) {
    log::set_context(Some(conn.ctx.clone()));
    // Replies of requests run under the read lock, not written yet.
    let mut pending: Vec<u8> = Vec::new();
    let mut batch = nap::Batch::default();
    nap::precise_sleeps();
    'outer: loop {
        conn.waiting.fetch_add(1, Ordering::AcqRel);
        let mut r = conn.reader.lock().unwrap_or_else(|e| e.into_inner());
        conn.waiting.fetch_sub(1, Ordering::AcqRel);
        loop {
            // Never wait for the client with replies held back.
            if !pending.is_empty() && r.buffer().len() < conn.hlen && !flush(&conn, &mut pending) {
                break 'outer;
            }
            // A client keeping many small requests in flight: let them pile
            // up (see nap.rs).
            if r.buffer().is_empty() {
                if let Some(t) = batch.ended() {
                    std::thread::sleep(t);
                }
            }
            if conn.stop.load(Ordering::Acquire) {
                break 'outer;
            }
            let next = read_one(&conn, &mut r);
            match &next {
                Next::Run(req, ..) | Next::RunBuffered(req, ..) | Next::Fill(req, ..) => {
                    batch.saw(matches!(req.cmd, cmd::READ | cmd::WRITE), req.count)
                }
                Next::Again => batch.saw(false, 0),
                Next::Stop { .. } => {}
            }
            match next {
                Next::Again => {}
                Next::Stop { hung_up } => {
                    conn.stop.store(true, Ordering::Release);
                    if hung_up {
                        conn.gone.store(true, Ordering::Release);
                        shutdown::wake_sleepers();
                    }
                    break 'outer;
                }
                // A small request on a handle that never blocks runs right
                // here: while the next request is already buffered no other
                // thread wakes, and one write sends several replies. So
                // does a quick one on a handle whose waits are brief
                // (brief.rs), its reply sent at once.
                Next::RunBuffered(req, budget) => {
                    let n = req.count as usize;
                    let t = conn.brief.then(Instant::now);
                    let reply =
                        execute(&*conn.handle, &req, &r.buffer()[..n], conn.mode, &conn.export, conn.serialize_all, &conn.pool);
                    r.consume(n);
                    let ok = match t {
                        Some(t) => ran_brief(&conn, &mut batch, &mut pending, &req, t, reply),
                        None => hold_or_send(&conn, &mut pending, reply),
                    };
                    drop(budget);
                    if !ok {
                        break 'outer;
                    }
                }
                Next::Fill(req, budget) => {
                    let reply = write_filled(&conn, &mut r, &req);
                    drop(budget);
                    let Some(reply) = reply else {
                        // The payload was cut off (or the socket broke):
                        // nothing was written.
                        conn.stop.store(true, Ordering::Release);
                        conn.gone.store(true, Ordering::Release);
                        shutdown::wake_sleepers();
                        break 'outer;
                    };
                    if !hold_or_send(&conn, &mut pending, reply) {
                        break 'outer;
                    }
                }
                // Big READs, and any READ with nothing else to answer or to
                // read (queue depth 1): sent straight from the storage.
                Next::Run(req, _, budget, _)
                    if conn.lend
                        && req.cmd == cmd::READ
                        && (req.count > HOLD_MAX as u64 || (pending.is_empty() && r.buffer().is_empty())) =>
                {
                    if !flush(&conn, &mut pending) {
                        break 'outer;
                    }
                    let ok = read_lent(&conn, &req, &mut pending);
                    drop(budget);
                    if !ok {
                        broken(&conn);
                        break 'outer;
                    }
                }
                // The guard does the work: `read_held` answers the READ
                // into `pending`, or returns false having done nothing (the
                // handle does not lend) and the next arm copies as usual.
                Next::Run(req, _, budget, _) if conn.lend && req.cmd == cmd::READ && read_held(&conn, &req, &mut pending) => {
                    drop(budget);
                    if pending.len() >= 256 * 1024 && !flush(&conn, &mut pending) {
                        break 'outer;
                    }
                }
                Next::Run(req, payload, budget, _)
                    if conn.inline && req.count <= INLINE_MAX && !(conn.tls && req.count > HOLD_MAX as u64) =>
                {
                    let reply =
                        execute(&*conn.handle, &req, &payload, conn.mode, &conn.export, conn.serialize_all, &conn.pool);
                    conn.pool.put(payload);
                    let ok = hold_or_send(&conn, &mut pending, reply);
                    drop(budget);
                    if !ok {
                        break 'outer;
                    }
                }
                // A big READ of a file in the page cache goes out with
                // `sendfile`, from this thread; the guard does the work.
                Next::Run(req, _, budget, _)
                    if conn.splice
                        && !conn.serialize_all
                        && req.cmd == cmd::READ
                        && req.count >= SPLICE_MIN
                        && read_spliced(&conn, &req, &mut pending, true) =>
                {
                    drop(budget);
                    if conn.stop.load(Ordering::Acquire) {
                        break 'outer;
                    }
                }
                // A READ that can be answered without waiting for a disk
                // (the file plugin's page cache) runs right here too; the
                // guard does the work, as with read_held.
                Next::Run(req, _, budget, _)
                    if !conn.inline
                        && !conn.serialize_all
                        && req.cmd == cmd::READ
                        && req.count <= NOWAIT_MAX
                        && read_nowait(&conn, &req, &mut pending) =>
                {
                    drop(budget);
                }
                // A quick request on a handle whose waits are brief runs
                // right here too (brief.rs).
                Next::Run(req, payload, budget, true) => {
                    let t = Instant::now();
                    let reply =
                        execute(&*conn.handle, &req, &payload, conn.mode, &conn.export, conn.serialize_all, &conn.pool);
                    conn.pool.put(payload);
                    let ok = ran_brief(&conn, &mut batch, &mut pending, &req, t, reply);
                    drop(budget);
                    if !ok {
                        break 'outer;
                    }
                }
                Next::Run(req, payload, budget, _) => {
                    batch.handed_off();
                    if !flush(&conn, &mut pending) {
                        break 'outer;
                    }
                    // Someone must read the next request while this one runs.
                    if conn.waiting.load(Ordering::Acquire) == 0
                        && conn.workers.load(Ordering::Acquire) < conn.max_workers
                    {
                        spawn_worker(&conn);
                    }
                    drop(r);
                    if conn.splice && req.cmd == cmd::READ && req.count >= SPLICE_MIN
                        && read_spliced(&conn, &req, &mut pending, false)
                    {
                        drop(budget);
                        if conn.stop.load(Ordering::Acquire) {
                            break 'outer;
                        }
                        continue 'outer;
                    }
                    let reply = shutdown::with_connection_fd(&conn.gone, conn.read_fd, || {
                        execute(&*conn.handle, &req, &payload, conn.mode, &conn.export, conn.serialize_all, &conn.pool)
                    });
                    conn.pool.put(payload);
                    let sent = send(&conn, reply);
                    drop(budget);
                    if sent.is_err() {
                        broken(&conn);
                        break 'outer;
                    }
                    continue 'outer;
                }
            }
        }
    }
    flush(&conn, &mut pending);
    conn.workers.fetch_sub(1, Ordering::AcqRel);
    crate::debug!("exiting worker thread {}", std::thread::current().name().unwrap_or("?"));
}

/// After a quick request on a handle whose waits are brief ran on the
/// reading thread (brief.rs), started at `t`: its reply goes at once
/// with those held back, so that the client can send the next request
/// while this thread runs the one after (holding it back for a batch cost
/// 4 KiB writes at queue depth 2 a fifth of their IOPS), and no nap
/// follows (the client waits for the plugin, not the other way round).
/// False if the socket is broken.
fn ran_brief(conn: &Conn, batch: &mut nap::Batch, pending: &mut Vec<u8>, req: &Request, t: Instant, reply: Reply) -> bool {
    // (A BLOCK_STATUS's count is a range, not bytes copied.)
    conn.quick.ran(t.elapsed(), if req.cmd == cmd::WRITE { req.count } else { 0 });
    batch.handed_off();
    hold_or_send(conn, pending, reply) && flush(conn, pending)
}

/// Requests on a handle that never blocks run on the thread holding the
/// read lock, whatever their size: on a few cores, more threads copying
/// bytes only add hand-offs (measured: 1 MiB reads 19 % faster, a quarter
/// less CPU than with a worker per request).
pub(super) const INLINE_MAX: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::super::buffers::BUDGET_TESTS;
    use super::super::{run, test_export as export, Session};
    use crate::backend::{Caps, Flags, Handle, ThreadModel};
    use crate::proto::reply::Mode;
    use crate::proto::request::Request;
    use crate::proto::wire::cmd;
    use crate::server::Shared;

    /// Test plugins that block 30 ms per read and count how many reads run
    /// at once: index 0 is parallel, 1 declares serialize_requests.
    static RUNNING: [(AtomicUsize, AtomicUsize); 2] =
        [(AtomicUsize::new(0), AtomicUsize::new(0)), (AtomicUsize::new(0), AtomicUsize::new(0))];

    #[derive(Default)]
    struct Slow<const I: usize>;

    impl<const I: usize> crate::backend::Plugin for Slow<I> {
        fn open(&self, _: bool, _: &str, _: bool) -> crate::error::Result<Box<dyn Handle>> {
            Ok(Box::new(SlowHandle::<I>))
        }
    }

    struct SlowHandle<const I: usize>;

    impl<const I: usize> Handle for SlowHandle<I> {
        fn size(&self) -> crate::error::Result<u64> {
            Ok(1 << 20)
        }
        fn caps(&self) -> crate::error::Result<Caps> {
            Ok(Caps::default())
        }
        fn pread(&self, buf: &mut [u8], _: u64, _: Flags) -> crate::error::Result<()> {
            let (now, max) = &RUNNING[I];
            let n = now.fetch_add(1, Ordering::AcqRel) + 1;
            max.fetch_max(n, Ordering::AcqRel);
            std::thread::sleep(std::time::Duration::from_millis(30));
            now.fetch_sub(1, Ordering::AcqRel);
            buf.fill(7);
            Ok(())
        }
    }

    inventory::submit! {
        crate::backend::PluginEntry {
            name: "test-slow-parallel", longname: "", description: "", help: "", magic_key: None,
            api_version: 2, max_thread_model: ThreadModel::Parallel, errno_is_preserved: true, has: &[],
            new: || Box::<Slow<0>>::default(),
        }
    }

    inventory::submit! {
        crate::backend::PluginEntry {
            name: "test-slow-serial", longname: "", description: "", help: "", magic_key: None,
            api_version: 2, max_thread_model: ThreadModel::SerializeRequests, errno_is_preserved: true, has: &[],
            new: || Box::<Slow<1>>::default(),
        }
    }

    /// Serves 8 pipelined reads through the real worker loop over a socket
    /// pair; returns the most reads the plugin saw at once.
    fn most_reads_at_once(plugin: &str, i: usize) -> usize {
        let _one = BUDGET_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::fd::OwnedFd;
        use std::os::unix::net::UnixStream;
        let mut chain = crate::backend::chain::Chain::new(plugin, &[]).unwrap();
        chain.config_complete().unwrap();
        chain.get_ready().unwrap();
        let chain: &'static crate::backend::chain::Chain = Box::leak(Box::new(chain));
        let model = chain.thread_model();
        let (_tx, quit) = async_channel::bounded(1);
        let shared = Arc::new(Shared {
            chain,
            readonly: false,
            oldstyle: false,
            mask_handshake: u32::MAX,
            policy: crate::proto::negotiate::Policy::default(),
            model,
            threads: 16,
            timeout: std::time::Duration::ZERO,
            quit,
        });
        use crate::backend::Next;
        let handle: Arc<dyn Handle> = Arc::from(chain.top().open(false, "", false).unwrap());
        let session = Session { handle, mode: Mode::Simple, export: export() };
        let (server, mut client) = UnixStream::pair().unwrap();
        let r = File::from(OwnedFd::from(server.try_clone().unwrap()));
        let w = File::from(OwnedFd::from(server));
        let t = std::thread::spawn(move || smol::block_on(run(&shared, session, r, w, "test".into())));
        let mut reqs = Vec::new();
        for cookie in 0..8u64 {
            Request { flags: 0, cmd: cmd::READ, cookie, offset: cookie * 512, count: 512 }.encode(false, &mut reqs);
        }
        client.write_all(&reqs).unwrap();
        let mut seen = [false; 8];
        for _ in 0..8 {
            let mut reply = [0u8; 16 + 512];
            client.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "error reply");
            seen[u64::from_be_bytes(reply[8..16].try_into().unwrap()) as usize] = true;
            assert!(reply[16..].iter().all(|&b| b == 7));
        }
        assert!(seen.iter().all(|&x| x));
        drop(client);
        t.join().unwrap();
        RUNNING[i].1.load(Ordering::Acquire)
    }

    #[test]
    fn parallel_plugins_get_concurrent_requests() {
        assert!(most_reads_at_once("test-slow-parallel", 0) > 1);
    }

    #[test]
    fn serialize_requests_is_honoured() {
        assert_eq!(most_reads_at_once("test-slow-serial", 1), 1);
    }
}
