//! The cow filter through real clients: qemu-io and fio verify jobs
//! writing through it while the base file stays byte for byte the same,
//! an overlay per export, nbdinfo against Debian's nbdkit, and bad-input
//! P14 (unaligned zero and trim at both ends, concurrent writers to the
//! same blocks against a model, block status with a huge count).

mod common;
mod filter_util;
use common::*;
use filter_util::*;

use std::path::{Path, PathBuf};

/// An 8 MiB base file: 64 KiB of 0x11, then 64 KiB of zeroes (a hole),
/// over and over.
fn base(dir: &TempDir) -> PathBuf {
    let img = dir.path("base.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for i in (0..8u64 << 20).step_by(128 << 10) {
        f.write_all_at(&[0x11; 64 << 10], i).unwrap();
    }
    img
}

fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!(
        "import nbd, os, random, threading\nh = nbd.NBD()\nh.add_meta_context('base:allocation')\nh.connect_uri({:?})\n{PY_FAILS}{body}",
        srv.uri()
    ))
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("fail") && !out.contains("mismatch"), "{out}");
    out
}

#[test]
fn qemu_io_writes_land_in_the_overlay_only() {
    require!("qemu-io", "--version");
    let dir = TempDir::new("cow-qemu");
    let img = base(&dir);
    let sum = sha256(&img);
    let mut srv = Server::start(&["--filter=cow", "file", img.to_str().unwrap()]);
    let uri = srv.uri();
    qemu_io(&uri, &[
        "write -P 0xab 100000 300000",  // unaligned at both ends
        "write -P 0xcd 1M 1M",           // whole blocks
        "write -z 3000000 70000",        // zeroes, unaligned
        "discard 4M 128k",               // trimmed blocks
        "read -P 0x11 0 65536",
        "read -P 0 65536 34464",
        "read -P 0xab 100000 300000",
        "read -P 0x11 400000 58752",     // untouched: the rest of a 0x11 run
        "read -P 0 458752 65536",        // and the hole after it
        "read -P 0xcd 1M 1M",
        "read -P 0 3000000 70000",
        "read -P 0 4M 128k",
        "read -P 0x11 6M 64k",
    ]);
    // A second connection sees the same overlay.
    qemu_io(&uri, &["read -P 0xab 100000 300000", "read -P 0xcd 1M 1M"]);
    assert_eq!(sha256(&img), sum, "the base file changed");
    srv.health_check();
}

#[test]
fn fio_verify_job_through_cow() {
    require!("fio", "--version");
    let dir = TempDir::new("cow-fio");
    let img = dir.path("base.img");
    std::fs::write(&img, vec![0x5a; 16 << 20]).unwrap();
    let sum = sha256(&img);
    let srv = Server::start(&["--filter=cow", "file", img.to_str().unwrap(), "cow-block-size=64k"]);
    for rw in ["randwrite", "write"] {
        let o = run("fio", &[
            "--name=verify", "--ioengine=nbd", &format!("--uri={}", srv.uri()), &format!("--rw={rw}"),
            "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c", "--verify_state_save=0",
            "--output-format=json",
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "fio failed: {}\n{out}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains("\"io_bytes\" : 16777216"), "{out}");
    }
    assert_eq!(sha256(&img), sum, "the base file changed");
}

/// Ours and Debian's nbdkit on the same command line, with `script` run
/// on both first: `nbdinfo --map` must match, and `--json` except that we
/// advertise write zeroes (nbdkit 1.32 inherits can_zero=false from the
/// plugin it opened read-only).
fn same_map_after(args: &[&str], script: &str) {
    let ours = start_logged(None, args);
    let theirs = start_logged(Some(REFERENCE), args);
    py(&ours, script);
    py(&theirs, script);
    let (a, b) = (nbdinfo(&ours, &["--map"]), nbdinfo(&theirs, &["--map"]));
    assert_eq!(a, b, "nbdinfo --map differs for {args:?}");
    // And the maximum block size is capped at 64 MiB (README, "Known differences").
    let fix = |s: String| {
        s.replace("\"can_fast_zero\": false", "\"can_fast_zero\": true")
            .replace("\"can_zero\": false", "\"can_zero\": true")
            .replace("\"block_size_maximum\": 4294967295", "\"block_size_maximum\": 67108864")
    };
    let (a, b) = (nbdinfo(&ours, &["--json"]), fix(nbdinfo(&theirs, &["--json"])));
    assert_eq!(a, b);
    assert!(a.contains("\"can_zero\": true"), "{a}");
}

#[test]
fn nbdinfo_matches_nbdkit() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("cow-info");
    let img = base(&dir);
    let script = "h.pwrite(b'x' * 100, 200000)\nh.pwrite(b'y' * 65536, 1 << 20)\nh.trim(3 * 65536, 5 << 20)\nh.trim(100, 6 << 20)\n";
    same_map_after(&["--filter=cow", "file", img.to_str().unwrap()], script);
    same_map_after(&["--filter=cow", "file", img.to_str().unwrap(), "cow-block-size=4096"], script);
    same_map_after(&["--filter=cow", "null", "1000"], "h.pwrite(b'z' * 10, 990)\n");
    same_map_after(&["--filter=cow", "memory", "3M"], "h.pwrite(b'x' * 10, 70000)\n");
}

#[test]
fn one_overlay_per_export() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("cow-exports");
    let d = dir.path("d");
    std::fs::create_dir(&d).unwrap();
    for (name, size) in [("file1", 1u64 << 20), ("file2", 2 << 20)] {
        std::fs::File::create(d.join(name)).unwrap().set_len(size).unwrap();
    }
    let mut srv = start_logged(None, &["-v", "--filter=cow", "file", &format!("dir={}", d.display())]);
    let uri = |e: &str| srv.uri_export(e);
    python_ok(&format!(r#"
import nbd
def conn(u):
    h = nbd.NBD()
    h.connect_uri(u)
    return h
a, b = conn({:?}), conn({:?})
assert a.get_size() == 1 << 20 and b.get_size() == 2 << 20
a.pwrite(b"A" * 4096, 0)
b.pwrite(b"B" * 4096, 4096)
assert b.pread(4096, 0) == bytes(4096)
assert a.pread(4096, 4096) == bytes(4096)
a2 = conn({:?})
assert a2.pread(4096, 0) == b"A" * 4096
"#, uri("file1"), uri("file2"), uri("file1")));
    assert!(wait_log(&srv, "cow: allocated new overlay for export \\\"file2\\\"") ||
            wait_log(&srv, "cow: allocated new overlay for export \"file2\""), "{}", log_of(&srv));
    assert!(wait_log(&srv, "reusing existing overlay for export"));
    for name in ["file1", "file2"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(d.join(name)).unwrap();
        assert_eq!(m.blocks(), 0, "{name} was written");
    }
    assert!(srv.alive());
    let _ = &mut srv;
}

#[test]
fn fast_zero_cache_and_flush() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("cow-misc");
    let img = base(&dir);
    let mut srv = Server::start(&["--filter=cow", "file", img.to_str().unwrap(), "cow-on-cache=true"]);
    py(&srv, r#"
assert h.can_fast_zero() and h.can_zero() and h.can_cache() and h.can_multi_conn() and h.can_fua()
fails("ENOTSUP", h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4, 0) == b"\x11" * 4
h.cache(1 << 20, 0)
h.pwrite(b"q" * 10, 5, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(20, 0) == b"\x11" * 5 + b"q" * 10 + b"\x11" * 5
"#);
    srv.health_check();
}

/// P14, against a model kept in Python: unaligned zero and trim at the
/// head and tail of blocks, writes from four connections at once to the
/// same blocks (disjoint bytes: all must survive), and block status with
/// count 0xfffffe00.
#[test]
fn p14_unaligned_ops_and_concurrent_writers_match_a_model() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("cow-p14");
    let img = base(&dir);
    let mut srv = Server::start(&["--filter=cow", "file", img.to_str().unwrap(), "cow-block-size=4k"]);
    py(&srv, &format!(r#"
size = h.get_size()
with open({img:?}, "rb") as f:
    model = bytearray(f.read())
random.seed(14)
for i in range(300):
    off = random.randrange(size - 1)
    n = random.randrange(1, min(20000, size - off) + 1)
    op = random.randrange(4)
    if op == 0:
        v = bytes([random.randrange(256)]) * n
        h.pwrite(v, off); model[off:off+n] = v
    elif op == 1:
        h.zero(n, off); model[off:off+n] = bytes(n)
    elif op == 2:
        h.trim(n, off); model[off:off+n] = bytes(n)
    else:
        assert h.pread(n, off) == model[off:off+n], ("read", off, n)
# Head and tail of the disk, unaligned.
h.zero(4095, 1); model[1:4096] = bytes(4095)
h.trim(4097, size - 4098); model[size-4098:size-1] = bytes(4097)
h.zero(1, size - 1); model[size-1:] = bytes(1)
assert h.pread(size, 0) == model

# Four connections, 64 threads' worth of 61-byte pieces of the same blocks.
def writer(t):
    c = nbd.NBD()
    c.connect_uri(h.get_uri())
    for i in range(t, 4096, 4):
        c.pwrite(bytes([t + 1]) * 61, i * 61)
    c.shutdown()
ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
for t in ts: t.start()
for t in ts: t.join()
for i in range(4096):
    model[i*61:(i+1)*61] = bytes([i % 4 + 1]) * 61
assert h.pread(size, 0) == model

# Block status over everything, and of the last byte; a huge count past
# the end is refused (EINVAL), not overflowed.
seen = []
h.block_status(size, 0, lambda ctx, off, ents, err: seen.append(sum(ents[0::2])))
h.block_status(1, size - 1, lambda ctx, off, ents, err: seen.append(sum(ents[0::2])))
assert seen[0] <= size and seen[1] >= 1, seen
h.set_strict_mode(0)
fails("EINVAL", h.block_status, 0xfffffe00, size - 4096, lambda *a: 0)
assert h.pread(size, 0) == model
"#, img = img.to_str().unwrap()));
    srv.health_check();
}

#[test]
fn huge_and_tiny_plugins() {
    require!("/usr/bin/python3", "-c", "import nbd");
    // A 1 TiB sparse plugin: the block map costs nothing until written.
    let mut srv = Server::start(&["--filter=cow", "null", "1T"]);
    py(&srv, r#"
size = h.get_size()
h.pwrite(b"x" * 100, size - 50 - 65536)
assert h.pread(100, size - 50 - 65536) == b"x" * 100
got = []
h.block_status(0xfffffe00, size - 0xfffffe00, lambda ctx, off, ents, err: got.extend(ents))
assert sum(got[0::2]) >= 0xfffffe00 - 65536 * 2, got[:8]
assert 0 in got[1::2], got
"#);
    srv.health_check();
    // A plugin smaller than a block: the block is padded with zeroes.
    let mut srv = Server::start(&["--filter=cow", "null", "1000"]);
    py(&srv, "h.pwrite(b'a' * 10, 990)\nassert h.pread(1000, 0) == bytes(990) + b'a' * 10\nh.zero(5, 0)\nh.trim(1000, 0)\nassert h.pread(1000, 0) == bytes(1000)");
    srv.health_check();
    // A 2^63-1 byte plugin: the block map cannot be made; a clear error
    // at open, and the server stays up.
    let mut big = start_logged(None, &["--filter=cow", "null", "9223372036854775807"]);
    assert!(nbdinfo(&big, &["--size"]).starts_with("ERROR"));
    assert!(wait_log(&big, "cow: "), "{}", log_of(&big));
    assert!(big.alive());
    let _ = Path::new("");
}
