//! Python libnbd against the server, one NBD command or flag at a time:
//! pread/pwrite (+FUA), flush, trim (+FUA), zero (NO_HOLE, FAST_ZERO),
//! cache, block status (base:allocation, REQ_ONE), structured reads of
//! holes and data, error replies, `--no-sr`, oldstyle, concurrent and
//! out-of-order replies, and multi-conn.

mod common;
use common::*;

use std::fs::File;
use std::path::{Path, PathBuf};

/// Python prelude: libnbd, a handle `h` connected to `uri` with
/// base:allocation requested, and `fails(ERRNO, f, *args)`.
fn prelude(uri: &str) -> String {
    format!(
        r#"import nbd, os, time
URI = {uri:?}
def connect():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(URI)
    return h
h = connect()
{fails}def extents(count, offset, flags=0):
    got = []
    def cb(ctx, off, entries, err):
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION, ctx
        assert off == offset, off
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, cb, flags)
    return got
# Completion callbacks that note the order replies came in.
order = []
def done(name):
    def cb(err):
        assert err.value == 0, (name, err)
        order.append(name)
        return 1
    return cb
"#,
        fails = PY_FAILS
    )
}

/// Runs `body` after the prelude; the script must succeed.
fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!("{}{body}", prelude(&srv.uri())))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The file plugin serving 1 MiB of random bytes in a new temporary
/// directory (kept until dropped), and the file's path.
fn random_file_server() -> (Server, TempDir, PathBuf) {
    let dir = TempDir::new("libnbd");
    let img = dir.path("disk.img");
    run_ok("sh", &["-c", &format!("head -c 1M /dev/urandom > '{}'", s(&img))]);
    (Server::start(&["file", s(&img)]), dir, img)
}

#[test]
fn pread_and_pwrite_with_and_without_fua() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.get_size() == 1 << 20 and h.can_fua()
a, b = os.urandom(3333), os.urandom(65536 + 17)
h.pwrite(a, 1000)
h.pwrite(b, 200001, nbd.CMD_FLAG_FUA)
assert h.pread(3333, 1000) == a
assert h.pread(len(b), 200001) == b
assert h.pread(1000, 0) == bytes(1000)
assert h.pread(10, 4333) == bytes(10)
# A read spanning written and unwritten bytes.
assert h.pread(5000, 0) == bytes(1000) + a + bytes(667)
# The last byte of the disk.
h.pwrite(b"z", (1 << 20) - 1, nbd.CMD_FLAG_FUA)
assert h.pread(2, (1 << 20) - 2) == b"\0z"
"#,
    );
    srv.health_check();
}

#[test]
fn fua_writes_and_flush_reach_the_backing_file() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("libnbd");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let srv = Server::start(&["file", s(&img)]);
    py(
        &srv,
        &format!(
            r#"
assert h.can_flush() and h.can_fua()
def on_disk(n, off):
    with open({:?}, "rb") as f:
        f.seek(off)
        return f.read(n)
a, b = os.urandom(4096), os.urandom(777)
h.pwrite(a, 8192, nbd.CMD_FLAG_FUA)
assert on_disk(4096, 8192) == a
h.pwrite(b, 100000)
h.flush()
assert on_disk(777, 100000) == b
"#,
            s(&img)
        ),
    );
}

#[test]
fn trim_with_and_without_fua_leaves_zeroes_and_holes() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.can_trim()
h.pwrite(b"\xaa" * 131072, 65536)
assert extents(1 << 20, 0) == [(65536, 3), (131072, 0), ((1 << 20) - 196608, 3)]
h.trim(32768, 65536, nbd.CMD_FLAG_FUA)
h.trim(32768, 98304)
# The memory plugin reads trimmed ranges as zeroes and frees the pages.
assert h.pread(65536, 65536) == bytes(65536)
assert h.pread(65536, 131072) == b"\xaa" * 65536
assert extents(1 << 20, 0) == [(131072, 3), (65536, 0), ((1 << 20) - 196608, 3)]
"#,
    );
}

#[test]
fn zero_with_and_without_no_hole_and_fast_zero() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.can_zero() and h.can_fast_zero()
h.pwrite(b"\x55" * 196608, 0)
h.zero(1000, 500)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
h.zero(100, 140000, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
want = bytearray(b"\x55" * 196608)
for off, n in ((500, 1000), (8192, 4096), (65536, 65536), (140000, 100)):
    want[off:off + n] = bytes(n)
assert h.pread(196608, 0) == want
# The whole zeroed page 65536..131072 is a hole again.
assert (65536, 3) in extents(1 << 20, 0), extents(1 << 20, 0)
"#,
    );
}

#[test]
fn zero_without_no_hole_punches_the_file_and_with_it_does_not() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("libnbd");
    let img = dir.path("disk.img");
    run_ok(
        "sh",
        &["-c", &format!("head -c 1M /dev/urandom > '{}' && sync '{}'", s(&img), s(&img))],
    );
    let srv = Server::start(&["file", s(&img)]);
    py(
        &srv,
        &format!(
            r#"
def blocks():
    return os.stat({:?}).st_blocks * 512
full = blocks()
assert full >= 1 << 20
h.zero(262144, 0, nbd.CMD_FLAG_NO_HOLE)
assert blocks() >= full, "NO_HOLE zero deallocated: %d < %d" % (blocks(), full)
h.zero(262144, 262144)
assert blocks() <= full - 262144, "plain zero did not punch a hole: %d" % blocks()
h.trim(262144, 524288, nbd.CMD_FLAG_FUA)
assert blocks() <= full - 524288, "trim did not punch a hole: %d" % blocks()
assert h.pread(786432, 0) == bytes(786432)
"#,
            s(&img)
        ),
    );
}

#[test]
fn cache_is_accepted_and_changes_nothing() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("libnbd");
    let img = dir.path("disk.img");
    std::fs::write(&img, (0..=255u8).cycle().take(1 << 20).collect::<Vec<u8>>()).unwrap();
    for args in [vec!["memory", "1M"], vec!["file", s(&img)]] {
        let srv = Server::start(&args);
        py(
            &srv,
            r#"
assert h.can_cache()
before = h.pread(1 << 20, 0)
h.cache(1 << 20, 0)
h.cache(1, 12345)
assert h.pread(1 << 20, 0) == before
"#,
        );
    }
}

#[test]
fn block_status_reports_data_and_holes_per_32k_page() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
P = 32768
E = 1 << 20
assert extents(E, 0) == [(E, nbd.STATE_HOLE | nbd.STATE_ZERO)]
h.pwrite(b"x", 100000)          # page 3
h.pwrite(b"y" * 20, 5 * P + 10) # page 5
h.pwrite(b"z" * P, 31 * P)      # the last page
assert extents(E, 0) == [(3 * P, 3), (P, 0), (P, 3), (P, 0), (25 * P, 3), (P, 0)], extents(E, 0)
# From an unaligned offset inside a data page.
assert extents(P, 3 * P + 5)[0] == (P - 5, 0), extents(P, 3 * P + 5)
# REQ_ONE: exactly one extent, no longer than asked.
assert extents(E, 0, nbd.CMD_FLAG_REQ_ONE) == [(3 * P, 3)]
assert extents(2 * P, 3 * P, nbd.CMD_FLAG_REQ_ONE) == [(P, 0)]
assert extents(1000, 4 * P, nbd.CMD_FLAG_REQ_ONE) == [(1000, 3)]
# Past the end is refused.
h.set_strict_mode(0)
fails("EINVAL", extents, 2, E - 1)
"#,
    );
}

#[test]
fn structured_reads_send_holes_for_untouched_ranges_and_data_for_written_ones() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.get_structured_replies_negotiated() and h.can_df()
def chunks(n, off, flags=0):
    got = []
    def cb(buf, o, status, err):
        got.append((o, len(buf), status, bytes(buf)))
        return 0
    whole = h.pread_structured(n, off, cb, flags)
    return got, bytes(whole)
got, whole = chunks(65536, 0)
assert [(o, n, st) for o, n, st, _ in got] == [(0, 65536, nbd.READ_HOLE)], got
assert whole == bytes(65536)
data = os.urandom(4096)
h.pwrite(data, 200000)
got, whole = chunks(4096, 200000)
assert [(o, n, st) for o, n, st, _ in got] == [(200000, 4096, nbd.READ_DATA)], got
assert got[0][3] == data and whole == data
# Data and zeroes together, and DF: each is exactly one chunk covering it all.
got, whole = chunks(8192, 196608)
assert len(got) >= 1 and whole == bytes(3392) + data + bytes(704)
assert sum(n for _, n, _, _ in got) == 8192
got, whole = chunks(8192, 500000, nbd.CMD_FLAG_DF)
assert len(got) == 1 and got[0][:2] == (500000, 8192) and whole == bytes(8192), got
"#,
    );
}

#[test]
fn read_past_the_end_is_einval_and_the_connection_survives() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
h.set_strict_mode(0)   # let the requests reach the server
fails("EINVAL", h.pread, 10, 1 << 20)
fails("EINVAL", h.pread, 2, (1 << 20) - 1)
fails("ENOSPC", h.pwrite, b"ab", (1 << 20) - 1)
fails("EINVAL", h.trim, 2, (1 << 20) - 1)
h.pwrite(b"still here", 0)
assert h.pread(10, 0) == b"still here"
"#,
    );
    srv.health_check();
}

#[test]
fn writes_on_a_read_only_server_are_eperm() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start_with(&["-r"], &["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.is_read_only()
h.set_strict_mode(0)
fails("EPERM", h.pwrite, b"x" * 512, 0)
fails("EPERM", h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA)
fails("EPERM", h.trim, 512, 0)
fails("EPERM", h.zero, 512, 0)
assert h.pread(512, 0) == bytes(512)
h.flush()
"#,
    );
    srv.health_check();
}

#[test]
fn injected_eio_leaves_the_connection_usable() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["--filter=error", "memory", "1M", "error-pread-rate=1"]);
    py(
        &srv,
        r#"
fails("EIO", h.pread, 512, 0)
h.pwrite(b"w" * 512, 0)       # writes are not affected
h.flush()
fails("EIO", h.pread, 512, 0) # still failing, still connected
assert extents(4096, 0)[0][1] == 0
def cb(buf, o, status, err):
    return 0
fails("EIO", h.pread_structured, 512, 0, cb)
assert h.aio_is_ready()
"#,
    );
}

#[test]
fn no_sr_gives_simple_replies_and_no_block_status() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start_with(&["--no-sr"], &["memory", "1M"]);
    py(
        &srv,
        r#"
assert not h.get_structured_replies_negotiated()
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert not h.can_df()
fails("ENOTSUP", extents, 4096, 0)
h.pwrite(b"simple", 4096)
assert h.pread(6, 4096) == b"simple"
h.set_strict_mode(0)
fails("EINVAL", h.pread, 10, 1 << 20)   # an error in a simple reply
assert h.pread(6, 4096) == b"simple"
"#,
    );
}

#[test]
fn oldstyle_server_works_with_nbdsh() {
    require!("nbdsh", "--version");
    let srv = Server::start_with(&["-o"], &["memory", "1M"]);
    let out = nbdsh_ok(
        &srv,
        r#"
assert h.get_protocol() == "oldstyle", h.get_protocol()
assert h.get_size() == 1 << 20
assert not h.get_structured_replies_negotiated()
h.pwrite(b"oldstyle", 12345, nbd.CMD_FLAG_FUA)
h.flush()
print(h.pread(8, 12345).decode())
"#,
    );
    assert_eq!(out.trim(), "oldstyle");
}

#[test]
fn sixteen_parallel_aio_preads_and_writes_on_the_file_plugin() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let (srv, _dir, img) = random_file_server();
    // Sixteen reads in flight at once, then 64 mixed writes and reads:
    // every reply must match its request (cookie) and carry its own data.
    py(
        &srv,
        &format!(
            r#"
disk = open({:?}, "rb").read()
N = 65536
bufs = [nbd.Buffer(N) for _ in range(16)]
cookies = [h.aio_pread(bufs[i], ((i * 7) % 16) * N) for i in range(16)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    off = ((i * 7) % 16) * N
    assert bufs[i].to_bytearray() == disk[off:off + N], i

new = [os.urandom(4096 + i) for i in range(32)]
wc = [h.aio_pwrite(new[i], i * 16384) for i in range(32)]  # below 512 KiB
rbufs = [nbd.Buffer(1000) for _ in range(32)]
rc = [h.aio_pread(rbufs[i], 524288 + i * 16384 + 7) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in wc + rc:
    assert h.aio_command_completed(c)
for i in range(32):
    off = 524288 + i * 16384 + 7
    assert rbufs[i].to_bytearray() == disk[off:off + 1000], i
    assert h.pread(len(new[i]), i * 16384) == new[i], i
"#,
            s(&img)
        ),
    );
}

#[test]
fn replies_come_out_of_order_when_a_read_is_delayed() {
    require!("/usr/bin/python3", "-c", "import nbd");
    // Only reads sleep, so a write and a flush sent after a read overtake it.
    let srv = Server::start(&["--filter=delay", "memory", "1M", "rdelay=1s"]);
    py(
        &srv,
        r#"
h.pwrite(b"r" * 512, 0)
buf = nbd.Buffer(512)
t = time.monotonic()
h.aio_pread(buf, 0, done("read"))
h.aio_pwrite(b"w" * 512, 4096, done("write"))
h.aio_flush(done("flush"))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert time.monotonic() - t >= 1.0
assert sorted(order) == ["flush", "read", "write"], order
assert order[-1] == "read", "replies came in request order: %s" % order
assert buf.to_bytearray() == b"r" * 512
assert h.pread(512, 4096) == b"w" * 512
"#,
    );
}

#[test]
fn a_file_client_going_from_one_request_at_a_time_to_many_and_back_gets_every_reply_right() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let (srv, _dir, img) = random_file_server();
    // The file plugin's writes, trims and zeroes run on the thread that
    // read them while they stay quick (server/brief.rs): one at a time,
    // then 64 at once, three times; every reply must carry its own data.
    py(
        &srv,
        &format!(
            r#"
import random
IMG = {:?}
disk = bytearray(open(IMG, "rb").read())
rnd = random.Random(7)
for phase in range(3):
    for i in range(60):
        off = rnd.randrange(0, len(disk) - 8192)
        if i % 10 == 9:
            h.zero(4096, off)
            disk[off:off + 4096] = bytes(4096)
        else:
            data = os.urandom(rnd.randrange(1, 8192))
            h.pwrite(data, off)
            disk[off:off + len(data)] = data
        if i % 15 == 14:
            assert extents(65536, 0)
            assert h.pread(8192, off) == disk[off:off + 8192], (phase, i)
    cookies = []
    for i in range(64):
        off = i * 16384 + phase * 512
        data = os.urandom(4096)
        cookies.append(h.aio_pwrite(data, off))
        disk[off:off + 4096] = data
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    assert h.pread(len(disk), 0) == disk, phase
h.flush()
assert open(IMG, "rb").read() == disk
"#,
            s(&img)
        ),
    );
}

#[test]
fn a_delayed_read_after_many_lone_writes_is_still_overtaken() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("libnbd");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    // After many quick writes, a READ that has to wait must still not hold
    // up the write and flush sent after it (server/brief.rs).
    let srv = Server::start(&["--filter=delay", "file", s(&img), "rdelay=1s"]);
    py(
        &srv,
        r#"
for i in range(40):
    h.pwrite(bytes([i]) * 512, i * 4096)
buf = nbd.Buffer(512)
h.aio_pread(buf, 4096, done("read"))
time.sleep(0.2)  # the READ arrives alone
h.aio_pwrite(b"w" * 512, 40 * 4096, done("write"))
h.aio_flush(done("flush"))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert order[-1] == "read", "replies came in request order: %s" % order
assert buf.to_bytearray() == bytes([1]) * 512
"#,
    );
}

#[test]
fn multi_conn_writes_on_one_connection_are_seen_by_another() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let srv = Server::start(&["memory", "1M"]);
    py(
        &srv,
        r#"
assert h.can_multi_conn()
h2 = connect()
assert h2.can_multi_conn()
data = os.urandom(8192)
h.pwrite(data, 40000)
h.flush()
assert h2.pread(8192, 40000) == data
h2.zero(100, 40000)
h2.flush()
assert h.pread(8192, 40000) == bytes(100) + data[100:]
"#,
    );
}

#[test]
fn unusual_requests_get_the_errors_c_nbdkit_gives() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start(&["memory", "128M"]);
    // The expected replies are what Debian's nbdkit 1.32 answers to the
    // same requests; none of them may cost the connection.
    py(
        &srv,
        r#"
h.set_strict_mode(0)
M = 1 << 20
cases = [
    ("zero-length read", "EINVAL", lambda: h.pread(0, 0)),
    ("zero-length write", "ENOSPC", lambda: h.pwrite(b"", 0)),
    ("zero-length trim", "EINVAL", lambda: h.trim(0, 0)),
    ("zero-length zero", "ENOSPC", lambda: h.zero(0, 0)),
    ("zero-length cache", "EINVAL", lambda: h.cache(0, 0)),
    ("zero-length block status", "EINVAL", lambda: extents(0, 0)),
    ("64 MiB read", None, lambda: h.pread(64 * M, 0)),
    ("64 MiB write", None, lambda: h.pwrite(b"\1" * (64 * M), 0)),
    ("100 MiB zero", None, lambda: h.zero(100 * M, 0)),
    ("100 MiB trim", None, lambda: h.trim(100 * M, 0)),
    ("100 MiB cache", None, lambda: h.cache(100 * M, 0)),
    ("100 MiB block status", None, lambda: extents(100 * M, 0)),
    ("FUA on a read", None, lambda: h.pread(1, 0, nbd.CMD_FLAG_FUA)),
    ("REQ_ONE on a read", "EINVAL", lambda: h.pread(1, 0, nbd.CMD_FLAG_REQ_ONE)),
    ("NO_HOLE on a write", "EINVAL", lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_NO_HOLE)),
    ("DF on a write", "EINVAL", lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_DF)),
    ("FAST_ZERO on a trim", "EINVAL", lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO)),
]
for name, want, f in cases:
    try:
        f()
        got = None
    except nbd.Error as e:
        got = e.errno
    assert got == want, "%s: expected %s, got %s" % (name, want, got)
    assert h.aio_is_ready(), name
assert h.pread(1, 0) == b"\0"    # the 100 MiB zero and trim came after the write
"#,
    );
    srv.health_check();
}

#[test]
fn thirty_two_connections_write_at_once_and_read_each_others_data() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut srv = Server::start(&["memory", "64M"]);
    py(
        &srv,
        r#"
hs = [h] + [connect() for _ in range(31)]
data = [os.urandom(65536) for _ in hs]
for i, c in enumerate(hs):
    for j in range(8):
        c.aio_pwrite(data[i][j * 8192:(j + 1) * 8192], i * (1 << 20) + j * 8192)
for c in hs:
    while c.aio_in_flight() > 0:
        c.poll(-1)
for i in range(len(hs)):
    assert hs[(i + 1) % len(hs)].pread(65536, i * (1 << 20)) == data[i], i
"#,
    );
    srv.health_check();
}
