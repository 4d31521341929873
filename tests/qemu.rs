//! qemu-img and qemu-io against the server: probing (info), copying in
//! and out (convert), comparing, mapping data and holes, and patterned
//! writes checked by reads, including unaligned, zero and discard requests.

mod common;
use common::*;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Writes `size` random bytes to `dir/name`.
fn random_file(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path(name);
    let mut src = File::open("/dev/urandom").unwrap().take(size);
    std::io::copy(&mut src, &mut File::create(&p).unwrap()).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The raw text of `"key": value` in one JSON object of qemu's output.
fn value<'a>(obj: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let i = obj.find(&pat).unwrap_or_else(|| panic!("no {key} in {obj}")) + pat.len();
    obj[i..].split([',', '}', '\n']).next().unwrap().trim()
}

/// `qemu-img map --output=json`: (start, length, data, zero) per extent.
fn map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    out.split('{')
        .skip(1)
        .map(|o| {
            (
                value(o, "start").parse().unwrap(),
                value(o, "length").parse().unwrap(),
                value(o, "data") == "true",
                value(o, "zero") == "true",
            )
        })
        .collect()
}

/// Runs qemu-io commands on a raw NBD image; each must succeed (qemu-io
/// exits 1 when a command fails or a `read -P` pattern does not match).
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
fn info_reports_size_and_raw_format_of_a_memory_disk() {
    require!("qemu-img", "--version");
    let srv = Server::start(&["memory", "size=5M"]);
    let out = run_ok("qemu-img", &["info", "--output=json", &srv.uri()]);
    // Top-level object: the probed format over the nbd protocol node.
    assert!(out.contains("\"format\": \"raw\""), "{out}");
    assert!(out.contains("\"format\": \"nbd\""), "{out}");
    assert_eq!(value(&out, "virtual-size"), (5 * M).to_string(), "{out}");
}

#[test]
fn info_probes_a_qcow2_image_served_by_the_file_plugin() {
    require!("qemu-img", "--version");
    let dir = TempDir::new("qemu");
    let img = dir.path("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "100M"]);
    let srv = Server::start(&["file", s(&img)]);
    let out = run_ok("qemu-img", &["info", "--output=json", &srv.uri()]);
    // qemu read the qcow2 header through the server to learn these.
    assert!(out.contains("\"format\": \"qcow2\""), "{out}");
    assert!(out.contains(&format!("\"virtual-size\": {}", 100 * M)), "{out}");
}

#[test]
fn convert_in_and_out_round_trips_a_random_image() {
    require!("qemu-img", "--version");
    let dir = TempDir::new("qemu");
    let src = random_file(&dir, "src.img", 8 * M);
    let out = dir.path("out.img");
    let mut srv = Server::start(&["memory", "8M"]);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &srv.uri()]);
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri(), s(&out)]);
    assert_eq!(sha256(&src), sha256(&out));
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&src), &srv.uri()]);
    srv.health_check();
}

#[test]
fn compare_finds_the_one_byte_changed_through_the_server() {
    require!("qemu-img", "--version");
    require!("qemu-io", "--version");
    let dir = TempDir::new("qemu");
    let src = random_file(&dir, "src.img", 4 * M);
    let srv = Server::start(&["memory", "4M"]);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", s(&src), &srv.uri()]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&src), &srv.uri()]);

    // Overwrite one byte with something it is not: the complement of itself.
    let off = 3 * M + 12345;
    let old = std::fs::read(&src).unwrap()[off as usize];
    qemu_io(&srv.uri(), &[&format!("write -P {} {off} 1", !old)]);
    let o = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s(&src), &srv.uri()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    // qemu-img compares whole 512-byte sectors and names the first one that differs.
    assert!(
        stdout.contains(&format!("Content mismatch at offset {}!", off / 512 * 512)),
        "{stdout}"
    );
}

#[test]
fn map_shows_data_where_a_memory_disk_was_written_and_holes_elsewhere() {
    require!("qemu-img", "--version");
    require!("qemu-io", "--version");
    let srv = Server::start(&["memory", "4M"]);
    assert_eq!(map(&srv.uri()), [(0, 4 * M, false, true)]);
    // 10 bytes allocate the whole 32 KiB page of the sparse allocator.
    qemu_io(&srv.uri(), &["write -P 0x11 1M 64K", "write -P 0x22 3145828 10"]);
    assert_eq!(
        map(&srv.uri()),
        [
            (0, M, false, true),
            (M, 64 * K, true, false),
            (M + 64 * K, 2 * M - 64 * K, false, true),
            (3 * M, 32 * K, true, false),
            (3 * M + 32 * K, M - 32 * K, false, true),
        ]
    );
}

#[test]
fn map_shows_the_holes_of_a_sparse_file_through_the_file_plugin() {
    require!("qemu-img", "--version");
    let dir = TempDir::new("qemu");
    let img = dir.path("sparse.img");
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&img).unwrap();
    f.set_len(4 * M).unwrap();
    f.seek(SeekFrom::Start(M)).unwrap();
    f.write_all(&[0x5a; 64 * 1024]).unwrap();
    f.seek(SeekFrom::Start(3 * M)).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let srv = Server::start(&["file", s(&img)]);
    assert_eq!(
        map(&srv.uri()),
        [
            (0, M, false, true),
            (M, 64 * K, true, false),
            (M + 64 * K, 2 * M - 64 * K, false, true),
            (3 * M, 4 * K, true, false),
            (3 * M + 4 * K, M - 4 * K, false, true),
        ]
    );
}

/// Patterned writes at awkward offsets, each checked by reads of the
/// pattern and of the untouched bytes around it.
const PATTERNS: &[&str] = &[
    // Unaligned on both ends, and the bytes on either side stay zero.
    "write -P 0x5a 1000 3333",
    "read -P 0 0 1000",
    "read -P 0x5a 1000 3333",
    "read -P 0 4333 3859",
    // Two bytes straddling a 32 KiB boundary.
    "write -P 0xa5 32767 2",
    "read -P 0 32765 2",
    "read -P 0xa5 32767 2",
    "read -P 0 32769 100",
    // Zero (write -z) inside the first pattern leaves its edges alone.
    "write -z 2000 100",
    "read -P 0x5a 1000 1000",
    "read -P 0 2000 100",
    "read -P 0x5a 2100 2233",
    // Discard (trim) of written data; both plugins read trimmed ranges as zero.
    "write -P 0x33 131072 65536",
    "discard 131072 65536",
    "read -P 0 131072 65536",
    // Zero that may unmap, over data.
    "write -P 0x44 262144 4096",
    "write -z -u 262144 4096",
    "read -P 0 262144 4096",
    // FUA write, and parallel writes then a flush.
    "write -f -P 0x66 300001 777",
    "read -P 0x66 300001 777",
    "aio_write -P 0x77 400000 1000",
    "aio_write -P 0x78 500000 1000",
    "aio_flush",
    "read -P 0x77 400000 1000",
    "read -P 0x78 500000 1000",
    "read -P 0 401000 99000",
];

#[test]
fn qemu_io_patterns_on_a_memory_disk() {
    require!("qemu-io", "--version");
    let mut srv = Server::start(&["memory", "1M"]);
    qemu_io(&srv.uri(), PATTERNS);
    srv.health_check();
}

#[test]
fn qemu_io_patterns_on_a_file() {
    require!("qemu-io", "--version");
    let dir = TempDir::new("qemu");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(M).unwrap();
    let srv = Server::start(&["file", s(&img)]);
    qemu_io(&srv.uri(), PATTERNS);
    // The writes really reached the file.
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len() as u64, M);
    assert!(data[1000..2000].iter().all(|&b| b == 0x5a));
    assert!(data[2000..2100].iter().all(|&b| b == 0));
    assert!(data[300_001..300_778].iter().all(|&b| b == 0x66));
    assert!(data[131_072..196_608].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_works_with_an_oldstyle_server() {
    require!("qemu-io", "--version");
    let mut srv = Server::start_with(&["-o"], &["memory", "1M"]);
    qemu_io(
        &srv.uri(),
        &["write -P 0x17 1000 100", "read -P 0x17 1000 100", "read -P 0 1100 900"],
    );
    srv.health_check();
}
