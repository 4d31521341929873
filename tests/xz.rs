//! The xz filter seen from real clients: images made by the `xz` tool
//! (single-block, multi-block with `-T2 --block-size`, concatenated
//! streams, stream padding, every check type) copied out with nbdcopy and
//! qemu-img and compared by checksum with the source; nbdinfo against
//! Debian's nbdkit; and the hostile files of bad-input.md P13, each ending
//! with the health check.

mod common;
use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Compresses `src` into `dst` with `xz ARGS` (fast preset).
fn xz(src: &Path, dst: &Path, args: &[&str]) {
    let out = Command::new("xz").args(["-c", "-1"]).args(args).arg(src).output().expect("xz");
    assert!(out.status.success(), "xz {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dst, out.stdout).unwrap();
}

/// A disk-like image: random data, zero runs (some 4 KiB aligned, some
/// not), text, and an odd size.
fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let n = (rnd() % 600_000) as usize + 1;
        match rnd() % 3 {
            0 => v.extend(std::iter::repeat_n(0u8, n)),
            1 => v.extend((0..n).map(|_| rnd() as u8)),
            _ => v.extend(b"the quick brown fox jumps over the lazy dog\n".iter().cycle().take(n)),
        }
    }
    v.truncate(size);
    v
}

fn sha256_bytes(b: &[u8]) -> String {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Copies the export out with nbdcopy (4 connections, block status on)
/// and with qemu-img convert, and checks both against `sum`.
fn copy_out_and_compare(uri: &str, dir: &TempDir, tag: &str, sum: &str, size: u64) {
    let a = dir.path(&format!("{tag}.nbdcopy"));
    run_ok("nbdcopy", &[uri, a.to_str().unwrap()]);
    assert_eq!(sha256(&a), sum, "{tag}: nbdcopy copy differs");
    let b = dir.path(&format!("{tag}.qemu"));
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, b.to_str().unwrap()]);
    // qemu rounds the size up to 512 bytes: the tail must be zero.
    let mut q = std::fs::read(&b).unwrap();
    assert_eq!(q.len() as u64, size.div_ceil(512) * 512, "{tag}: qemu-img size");
    assert!(q[size as usize..].iter().all(|&x| x == 0));
    q.truncate(size as usize);
    assert_eq!(sha256_bytes(&q), sum, "{tag}: qemu-img copy differs");
    std::fs::remove_file(a).unwrap();
    std::fs::remove_file(b).unwrap();
}

#[test]
fn every_kind_of_xz_image_copies_out_identical() {
    require!("xz", "--version");
    require!("nbdcopy", "--version");
    require!("qemu-img", "--version");
    let dir = TempDir::new("xz-kinds");
    let exports = TempDir::new("xz-exports");
    let src = image(4 << 20 | 12345, 1);
    let srcp = dir.path("disk.img");
    std::fs::write(&srcp, &src).unwrap();
    let sum = sha256(&srcp);

    // Halves for the multi-stream files.
    let (h1, h2) = (dir.path("h1"), dir.path("h2"));
    std::fs::write(&h1, &src[..2 << 20]).unwrap();
    std::fs::write(&h2, &src[2 << 20..]).unwrap();
    let (x1, x2) = (dir.path("h1.xz"), dir.path("h2.xz"));
    xz(&h1, &x1, &["--block-size=1MiB"]);
    xz(&h2, &x2, &["--check=sha256"]);
    let cat = |parts: &[&[u8]], name: &str| {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p);
        }
        std::fs::write(exports.path(name), v).unwrap();
    };
    let (b1, b2) = (std::fs::read(&x1).unwrap(), std::fs::read(&x2).unwrap());
    cat(&[&b1, &b2], "multi-stream");
    cat(&[&b1, &[0; 4], &b2, &[0; 8]], "padding");

    let mut names = vec!["multi-stream".to_string(), "padding".to_string()];
    for (name, args) in [
        ("single-block", &[][..]),
        ("multi-block", &["-T2", "--block-size=1MiB"][..]),
        ("odd-blocks", &["--block-size=100000"][..]),
        ("check-none", &["--check=none", "--block-size=2MiB"][..]),
        ("check-crc32", &["--check=crc32", "--block-size=2MiB"][..]),
        ("check-crc64", &["--check=crc64", "--block-size=2MiB"][..]),
        ("check-sha256", &["--check=sha256", "--block-size=2MiB"][..]),
    ] {
        xz(&srcp, &exports.path(name), args);
        names.push(name.to_string());
    }
    let mut srv = Server::start(&["--filter=xz", "file", &format!("dir={}", exports.0.display())]);
    for name in &names {
        copy_out_and_compare(&srv.uri_export(name), &dir, name, &sum, src.len() as u64);
    }
    // The same file served with file=, the usual way.
    let single = exports.path("multi-block");
    let mut srv2 = Server::start(&["--filter=xz", "file", single.to_str().unwrap()]);
    copy_out_and_compare(&srv2.uri(), &dir, "file", &sum, src.len() as u64);
    srv2.health_check();
    assert!(srv.alive());
}

/// Debian's nbdkit on the same command line: same export description,
/// size and flags; the map differs by design (ours reports zero runs).
#[test]
fn nbdinfo_matches_debian_nbdkit_except_the_map() {
    require!("xz", "--version");
    require!("nbdinfo", "--version");
    require!("/usr/bin/nbdkit", "--version");
    let dir = TempDir::new("xz-nbdinfo");
    let mut src = vec![0x5a; 1 << 20];
    src.extend(vec![0; 2 << 20]);
    src.extend(image(1 << 20, 2));
    let srcp = dir.path("disk.img");
    std::fs::write(&srcp, &src).unwrap();
    let x = dir.path("disk.img.xz");
    xz(&srcp, &x, &["--block-size=1MiB"]);
    let x = x.to_str().unwrap();

    let info = |bin: &str, what: &str| -> String {
        let o = run(bin, &["-U", "-", "--filter=xz", "file", x, "--run", &format!("nbdinfo {what} \"$uri\"")]);
        assert!(o.status.success(), "{bin}: {}", String::from_utf8_lossy(&o.stderr));
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        // The socket path differs.
        s.lines().filter(|l| !l.contains("\"uri\"")).collect::<Vec<_>>().join("\n")
    };
    let ours = nbdkit_bin();
    let ours = ours.to_str().unwrap();
    let json = info(ours, "--json");
    assert_eq!(json, info("/usr/bin/nbdkit", "--json"));
    assert!(json.contains("\"is_read_only\": true") && json.contains("\"can_multi_conn\": true"), "{json}");
    assert!(json.contains(&format!("\"export-size\": {}", src.len())));

    // Debian: one data extent. Ours: the 2 MiB of zeroes are a hole.
    let deb_map = info("/usr/bin/nbdkit", "--map");
    assert_eq!(deb_map.split_whitespace().collect::<Vec<_>>(), ["0", &src.len().to_string(), "0", "data"]);
    let map = info(ours, "--map");
    let lines: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let mut zero = 0;
    let mut end = 0;
    for l in &lines {
        let (off, len): (usize, usize) = (l[0].parse().unwrap(), l[1].parse().unwrap());
        assert_eq!(off, end, "map not contiguous: {map}");
        end = off + len;
        if l[3] == "hole,zero" {
            assert!(src[off..end].iter().all(|&b| b == 0), "non-zero data reported as hole at {off}");
            zero += len;
        } else {
            assert_eq!(l[3], "data");
        }
    }
    assert_eq!(end, src.len());
    assert!(zero >= 2 << 20, "only {zero} zero bytes in the map:\n{map}");
}

#[test]
fn max_block_and_max_depth_on_the_command_line() {
    require!("xz", "--version");
    require!("nbdinfo", "--version");
    let dir = TempDir::new("xz-max");
    let srcp = dir.path("disk.img");
    std::fs::write(&srcp, image(2 << 20, 3)).unwrap();
    let x = dir.path("disk.img.xz");
    xz(&srcp, &x, &[]);
    let x = x.to_str().unwrap();
    let bin = nbdkit_bin();
    let o = run(bin.to_str().unwrap(), &["-U", "-", "--filter=xz", "file", x, "xz-max-block=1M", "--run", "nbdinfo \"$uri\""]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("xz file largest block is bigger than xz-max-block"), "{err}");
    assert!(err.contains("Current xz-max-block = 1048576 (bytes)"), "{err}");
    assert!(err.contains("Largest block in xz file = 2097152 (bytes)"), "{err}");

    let o = run(bin.to_str().unwrap(), &["-U", "-", "--filter=xz", "file", x, "xz-max-depth=0", "--run", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("'xz-max-depth' parameter must be >= 1"));

    let mut srv = Server::start(&["--filter=xz", "file", x, "xz-max-depth=1", "xz-max-block=2M"]);
    let out = nbdsh_ok(&srv, "print(h.get_size()); print(h.pread(16, 2097152 - 16) != b'')");
    assert_eq!(out, "2097152\nTrue\n");
    srv.health_check();
}

// ---- bad input P13 ----

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn vli(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Rewrites the index of a single-stream file: `f` changes the
/// (unpadded, uncompressed) records; footer and CRCs are recomputed.
fn rewrite_index(file: &[u8], f: impl FnOnce(&mut Vec<(u64, u64)>)) -> Vec<u8> {
    let n = file.len();
    let backward = (u32::from_le_bytes(file[n - 8..n - 4].try_into().unwrap()) as usize + 1) * 4;
    let index = &file[n - 12 - backward..n - 12];
    let mut pos = 1;
    let mut rd = || {
        let mut v = 0u64;
        let mut i = 0;
        loop {
            let b = index[pos];
            pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            i += 1;
            if b & 0x80 == 0 {
                return v;
            }
        }
    };
    let count = rd();
    let mut recs: Vec<(u64, u64)> = (0..count).map(|_| (rd(), rd())).collect();
    f(&mut recs);
    let mut idx = vec![0];
    vli(recs.len() as u64, &mut idx);
    for (u, c) in &recs {
        vli(*u, &mut idx);
        vli(*c, &mut idx);
    }
    while idx.len() % 4 != 0 {
        idx.push(0);
    }
    let c = crc32(&idx);
    idx.extend(c.to_le_bytes());
    let mut out = file[..n - 12 - backward].to_vec();
    out.extend(&idx);
    let mut body = ((idx.len() / 4 - 1) as u32).to_le_bytes().to_vec();
    body.extend(&file[n - 4..n - 2]);
    out.extend(crc32(&body).to_le_bytes());
    out.extend(body);
    out.extend(b"YZ");
    out
}

/// nbdinfo on the export: true if it could read the whole image.
fn client_reads_all(srv: &Server) -> (bool, String) {
    let o = run(
        "nbdsh",
        &["-u", &srv.uri(), "-c", "size = h.get_size()\nfor off in range(0, size, 1 << 20):\n    h.pread(min(1 << 20, size - off), off)"],
    );
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Resident memory of the server, in KiB.
fn rss_kib(srv: &Server) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn p13_hostile_files_fail_at_open_then_the_server_serves_a_good_one() {
    require!("xz", "--version");
    require!("nbdsh", "--version");
    let dir = TempDir::new("xz-p13");
    let srcp = dir.path("disk.img");
    std::fs::write(&srcp, image(3 << 20, 4)).unwrap();
    let good = dir.path("good.xz");
    xz(&srcp, &good, &["--block-size=1MiB"]);
    let good = std::fs::read(&good).unwrap();
    let n = good.len();
    let backward = (u32::from_le_bytes(good[n - 8..n - 4].try_into().unwrap()) as usize + 1) * 4;

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("shorter than the header", good[..8].to_vec()),
        ("header only", good[..12].to_vec()),
        ("truncated stream", good[..(n / 2) & !3].to_vec()),
        ("truncated by four", good[..n - 4].to_vec()),
        ("odd size", good[..n - 1].to_vec()),
    ];
    let mut corrupt = |name, at: usize| {
        let mut f = good.clone();
        f[at] ^= 0x10;
        cases.push((name, f));
    };
    corrupt("corrupt footer magic", n - 1);
    corrupt("corrupt footer size", n - 7);
    corrupt("corrupt index", n - 12 - backward + 2);
    corrupt("corrupt stream header", 7);
    let mut garbage = good.clone();
    garbage.extend(b"JUNK");
    garbage.extend(&good);
    cases.push(("garbage between streams", garbage));
    let mut trailing = good.clone();
    trailing.extend([0, 0, 0, 1]);
    cases.push(("garbage after the stream", trailing));
    cases.push(("index lists one block less", rewrite_index(&good, |r| {
        r.pop();
    })));
    cases.push(("block claiming a huge size", rewrite_index(&good, |r| r[0].1 = 1 << 40)));
    cases.push(("block claiming 2^63", rewrite_index(&good, |r| r[0].1 = i64::MAX as u64)));

    let path = dir.path("served.xz");
    std::fs::write(&path, &good).unwrap();
    let mut srv = Server::start(&["--filter=xz", "file", path.to_str().unwrap()]);
    for (name, bytes) in &cases {
        std::fs::write(&path, bytes).unwrap();
        let (ok, err) = client_reads_all(&srv);
        assert!(!ok, "{name}: the client could read the image");
        assert!(err.contains("handshake") || err.contains("server replied with error"), "{name}: {err}");
        assert!(srv.alive(), "{name}: server died");
    }
    std::fs::write(&path, &good).unwrap();
    assert!(client_reads_all(&srv).0);
    srv.health_check();
}

#[test]
fn p13_bad_blocks_are_eio_on_read_with_bounded_memory() {
    require!("xz", "--version");
    require!("nbdsh", "--version");
    let dir = TempDir::new("xz-p13-read");
    // Random data first: block 0 stays about 1 MiB compressed.
    let mut src = image(1 << 20, 0);
    let mut s = 99u64;
    for b in src.iter_mut() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *b = (s >> 56) as u8;
    }
    src.extend(image(3 << 20, 5));
    let srcp = dir.path("disk.img");
    std::fs::write(&srcp, &src).unwrap();
    let x = dir.path("good.xz");
    // Sizes in the block headers (-T2) and without (plain --block-size).
    xz(&srcp, &x, &["--block-size=1MiB", "--check=crc64"]);
    let good = std::fs::read(&x).unwrap();

    // Block 2 (of 4) claims 400 MiB: the index is still consistent, the
    // file opens, and the read of that block fails without the memory.
    let liar = rewrite_index(&good, |r| r[2].1 = 400 << 20);
    // A flipped byte inside block 1's compressed data.
    let mut flipped = good.clone();
    flipped[12 + 300_000] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>, u64, u64)> =
        vec![("block claiming 400 MiB", liar, 2 << 20, 0), ("corrupt block data", flipped, 0, 3 << 20)];

    let path = dir.path("served.xz");
    let paths: Vec<PathBuf> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, bytes, _, _))| {
            let p = dir.path(&format!("case{i}.xz"));
            std::fs::write(&p, bytes).unwrap();
            p
        })
        .collect();
    for ((name, _, bad_off, good_off), p) in cases.iter().zip(&paths) {
        std::fs::copy(p, &path).unwrap();
        let mut srv = Server::start(&["--filter=xz", "file", path.to_str().unwrap()]);
        let script = format!(
            "{PY_FAILS}\nfails('EIO', h.pread, 65536, {bad_off})\nfails('EIO', h.pread, 512, {bad_off} + 1000)\n\
             assert h.pread(4096, {good_off}) == open({:?}, 'rb').read()[{good_off}:{good_off} + 4096]",
            srcp.to_str().unwrap()
        );
        let o = nbdsh(&srv, &format!("import nbd\n{script}"));
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(rss_kib(&srv) < 150 * 1024, "{name}: server uses {} KiB", rss_kib(&srv));
        if *bad_off == 0 {
            // The health check reads offset 0: serve the good file again.
            std::fs::write(&path, &good).unwrap();
        }
        srv.health_check();
    }
}
