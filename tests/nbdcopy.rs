//! nbdcopy against the server: byte-identical round trips through the
//! memory and file plugins (also over four connections at once), sparse
//! copies that skip the holes the server reports, and one big 512 MiB
//! round trip.

mod common;
use common::*;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;

const M: u64 = 1024 * 1024;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes `size` random bytes to `dir/name`.
fn random_file(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path(name);
    let mut src = File::open("/dev/urandom").unwrap().take(size);
    std::io::copy(&mut src, &mut File::create(&p).unwrap()).unwrap();
    p
}

/// An empty (sparse) file of `size` bytes, to back a file export.
fn empty_file(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Bytes allocated on disk for `p` (st_blocks × 512).
fn allocated(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512
}

/// sha256 of several files at once (two cores: hashing is the slow part).
fn sha256_all(paths: &[&Path]) -> Vec<String> {
    thread::scope(|sc| {
        let hs: Vec<_> = paths.iter().map(|p| sc.spawn(move || sha256(p))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Copies `src` into `srv` and back out to `out`; returns nbdcopy's stderr
/// of both runs (for `-v`).
fn round_trip(srv: &Server, src: &Path, out: &Path, extra: &[&str]) -> String {
    let uri = srv.uri();
    let mut log = String::new();
    for (from, to) in [(s(src), uri.as_str()), (uri.as_str(), s(out))] {
        let mut args = extra.to_vec();
        args.extend([from, to]);
        let o = run("nbdcopy", &args);
        assert!(o.status.success(), "nbdcopy {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        log.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    log
}

#[test]
fn round_trip_through_memory_is_byte_identical() {
    require!("nbdcopy", "--version");
    let dir = TempDir::new("nbdcopy");
    let src = random_file(&dir, "src.img", 16 * M);
    let out = dir.path("out.img");
    let mut srv = Server::start(&["memory", "16M"]);
    round_trip(&srv, &src, &out, &[]);
    let h = sha256_all(&[&src, &out]);
    assert_eq!(h[0], h[1]);
    srv.health_check();
}

#[test]
fn round_trip_through_the_file_plugin_is_byte_identical() {
    require!("nbdcopy", "--version");
    let dir = TempDir::new("nbdcopy");
    let src = random_file(&dir, "src.img", 16 * M);
    let backing = empty_file(&dir, "backing.img", 16 * M);
    let out = dir.path("out.img");
    let srv = Server::start(&["file", s(&backing)]);
    round_trip(&srv, &src, &out, &[]);
    let h = sha256_all(&[&src, &backing, &out]);
    assert_eq!(h[0], h[1], "the backing file differs from the source");
    assert_eq!(h[0], h[2], "the copy out differs from the source");
}

#[test]
fn multi_conn_copy_uses_four_connections_and_is_byte_identical() {
    require!("nbdcopy", "--version");
    let dir = TempDir::new("nbdcopy");
    let src = random_file(&dir, "src.img", 16 * M);
    let out = dir.path("out.img");
    let srv = Server::start(&["memory", "16M"]);
    // nbdcopy caps connections at the thread count and drops to one
    // connection unless the server advertises multi-conn; -v says which.
    let log = round_trip(&srv, &src, &out, &["-v", "--connections=4", "--threads=4"]);
    assert_eq!(
        log.matches("nbdcopy: connections=4 ").count(),
        2,
        "{}",
        log.lines().filter(|l| l.starts_with("nbdcopy:")).collect::<Vec<_>>().join("\n")
    );
    let h = sha256_all(&[&src, &out]);
    assert_eq!(h[0], h[1]);
}

#[test]
fn sparse_copy_out_of_memory_skips_the_holes() {
    require!("nbdcopy", "--version");
    require!("nbdsh", "--version");
    let dir = TempDir::new("nbdcopy");
    let srv = Server::start(&["memory", "64M"]);
    nbdsh_ok(
        &srv,
        "h.pwrite(b'\\x01' * 1048576, 1048576)\nh.pwrite(b'\\x02' * 1048576, 40 * 1048576)",
    );
    let expect = empty_file(&dir, "expect.img", 64 * M);
    let f = File::options().write(true).open(&expect).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1; 1 << 20], M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[2; 1 << 20], 40 * M).unwrap();
    drop(f);

    // --sparse=0 turns off nbdcopy's own zero detection: holes in the
    // destination can only come from the server's block status.
    let out = dir.path("out.img");
    run_ok("nbdcopy", &["--sparse=0", &srv.uri(), s(&out)]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 64 * M);
    let a = allocated(&out);
    assert!((2 * M..4 * M).contains(&a), "{a} bytes allocated for 2 MiB of data");
    // Control: without extents the same copy writes everything.
    let full = dir.path("full.img");
    run_ok("nbdcopy", &["--sparse=0", "--no-extents", &srv.uri(), s(&full)]);
    assert!(allocated(&full) >= 64 * M, "{} bytes allocated without extents", allocated(&full));

    let h = sha256_all(&[&expect, &out, &full]);
    assert_eq!(h[0], h[1]);
    assert_eq!(h[0], h[2]);
}

#[test]
fn odd_sized_file_copies_out_to_the_exact_size() {
    require!("nbdcopy", "--version");
    let dir = TempDir::new("nbdcopy");
    let src = random_file(&dir, "odd.img", 12345);
    let out = dir.path("out.img");
    let srv = Server::start(&["file", s(&src)]);
    run_ok("nbdcopy", &[&srv.uri(), s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

/// The big round trip: 512 MiB of random data into a memory export and a
/// file export and back out, all four checksums identical. It runs in every
/// `cargo test`: generating, copying and hashing take 15–35 s on a 2-core machine.
#[test]
fn big_round_trip_512m_through_memory_and_file() {
    require!("nbdcopy", "--version");
    require!("head", "--version");
    let dir = TempDir::new("nbdcopy-big");
    let src = dir.path("src.img");
    run_ok("sh", &["-c", &format!("head -c 512M /dev/urandom > '{}'", src.display())]);
    assert_eq!(std::fs::metadata(&src).unwrap().len(), 512 * M);
    let backing = empty_file(&dir, "backing.img", 512 * M);
    let (out_mem, out_file) = (dir.path("out-mem.img"), dir.path("out-file.img"));
    {
        let mem = Server::start(&["memory", "512M"]);
        let file = Server::start(&["file", s(&backing)]);
        // Hash the source while copying (the copies are mostly I/O).
        thread::scope(|sc| {
            let src_sum = sc.spawn(|| sha256(&src));
            round_trip(&mem, &src, &out_mem, &[]);
            round_trip(&file, &src, &out_file, &[]);
            let h = sha256_all(&[&out_mem, &out_file]);
            let src_sum = src_sum.join().unwrap();
            assert_eq!(src_sum, h[0], "512 MiB round trip through memory differs");
            assert_eq!(src_sum, h[1], "512 MiB round trip through the file plugin differs");
        });
    }
    // The backing file itself, compared byte for byte (cheaper than hashing).
    run_ok("cmp", &[s(&src), s(&backing)]);
}
