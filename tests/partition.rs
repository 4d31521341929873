//! The partition filter on disks built by real tools (sfdisk MBR with
//! logical partitions, sgdisk GPT, fdisk 4K-sector GPT) holding ext2
//! filesystems made with `mke2fs -d`, copied out with nbdcopy and checked
//! with e2fsck and debugfs; nbdinfo compared with Debian's nbdkit; and
//! hostile tables (bad-input P12).

mod common;
mod filter_util;
use common::*;
use filter_util::*;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// `(start, size)` in sectors of each partition listed by `sfdisk -d`, by number.
fn sfdisk_layout(img: &Path) -> Vec<(u32, u64, u64)> {
    let out = run_ok("sfdisk", &["-d", img.to_str().unwrap()]);
    out.lines()
        .filter_map(|l| {
            let (dev, rest) = l.split_once(" : ")?;
            let n: u32 = dev.trim().rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
            let field = |k: &str| -> u64 {
                let v = rest.split(',').find_map(|f| f.trim().strip_prefix(k)).unwrap();
                v.trim_start_matches(['=', ' ']).trim().parse().unwrap()
            };
            Some((n, field("start"), field("size")))
        })
        .collect()
}

/// An ext2 filesystem of `size` bytes holding `/hello.txt` = `text`, at
/// byte `offset` of `disk`.
fn put_filesystem(dir: &TempDir, disk: &Path, offset: u64, size: u64, text: &str) {
    let src = dir.path(&format!("src-{offset}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), text).unwrap();
    let fs = dir.path(&format!("fs-{offset}.img"));
    run_ok("mke2fs", &["-q", "-F", "-t", "ext2", "-d", src.to_str().unwrap(), fs.to_str().unwrap(), &format!("{}k", size / 1024)]);
    let data = std::fs::read(&fs).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&data).unwrap();
}

/// Copies the partition out with nbdcopy, checks it with e2fsck, and
/// returns `/hello.txt` read with debugfs.
fn read_back(dir: &TempDir, srv: &Server, tag: &str) -> String {
    let out = dir.path(&format!("out-{tag}.img"));
    run_ok("nbdcopy", &[&srv.uri(), out.to_str().unwrap()]);
    run_ok("e2fsck", &["-fn", out.to_str().unwrap()]);
    run_ok("debugfs", &["-R", "cat /hello.txt", out.to_str().unwrap()])
}

#[test]
fn mbr_primary_and_logical_partitions_with_filesystems() {
    require!("sfdisk", "--version");
    require!("mke2fs", "-V");
    require!("nbdcopy", "--version");
    let dir = TempDir::new("partition-mbr");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let script = "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=90112, type=5\n\
                  start=20480, size=20480, type=83\nstart=43008, size=20480, type=83\nstart=65536, size=16384, type=83\n";
    let o = std::process::Command::new("sfdisk").args(["-q", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped()).spawn().and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait()
        }).unwrap();
    assert!(o.success());
    let layout = sfdisk_layout(&disk);
    assert_eq!(layout.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 5, 6, 7]);
    for &(n, start, size) in &layout {
        if n != 2 {
            put_filesystem(&dir, &disk, start * 512, size * 512, &format!("partition {n}\n"));
        }
    }
    for &(n, _, size) in &layout {
        if n == 2 {
            continue;
        }
        let srv = Server::start(&["-r", "--filter=partition", "file", disk.to_str().unwrap(), &format!("partition={n}")]);
        assert_eq!(nbdinfo(&srv, &["--size"]).trim(), (size * 512).to_string());
        assert_eq!(read_back(&dir, &srv, &n.to_string()), format!("partition {n}\n"));
    }
    // Same answers as Debian's nbdkit, extents included.
    for n in ["1", "5", "6", "7", "2", "8"] {
        same_or_both_fail(&["-r", "--filter=partition", "file", disk.to_str().unwrap(), &format!("partition={n}")]);
    }
}

/// Like `same_as_reference`, but a partition both refuse is also a match.
fn same_or_both_fail(args: &[&str]) {
    let ours = start_logged(None, args);
    let theirs = start_logged(Some(REFERENCE), args);
    let a = nbdinfo(&ours, &["--json"]);
    let b = nbdinfo(&theirs, &["--json"]);
    if a.starts_with("ERROR") || b.starts_with("ERROR") {
        assert!(a.starts_with("ERROR") && b.starts_with("ERROR"), "ours: {a}\nreference: {b}");
        return;
    }
    drop((ours, theirs));
    same_as_reference(args, |s| s);
}

#[test]
fn gpt_by_sgdisk_with_filesystems() {
    require!("sgdisk", "--version");
    require!("mke2fs", "-V");
    require!("nbdcopy", "--version");
    let dir = TempDir::new("partition-gpt");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    run_ok("sgdisk", &["-n", "1:2048:+8M", "-n", "2:0:+10M", "-n", "4:0:+4M", disk.to_str().unwrap()]);
    // Partition 2: sectors 18432–38911; 4: 38912–47103.
    put_filesystem(&dir, &disk, 18432 * 512, 10 << 20, "gpt two\n");
    put_filesystem(&dir, &disk, 38912 * 512, 4 << 20, "gpt four\n");
    for (n, text) in [(2, "gpt two\n"), (4, "gpt four\n")] {
        let srv = Server::start(&["--filter=partition", "file", disk.to_str().unwrap(), &format!("partition={n}")]);
        assert_eq!(read_back(&dir, &srv, &n.to_string()), text);
    }
    for n in ["1", "2", "4", "3", "129"] {
        same_or_both_fail(&["-r", "--filter=partition", "file", disk.to_str().unwrap(), &format!("partition={n}")]);
    }
    // Writes land inside the partition and nowhere else.
    let before = std::fs::read(&disk).unwrap();
    let srv = Server::start(&["--filter=partition", "file", disk.to_str().unwrap(), "partition=4"]);
    nbdsh_ok(&srv, "h.pwrite(b'\\xab' * 4096, 8192); h.zero(4096, 0); h.flush()");
    let after = std::fs::read(&disk).unwrap();
    let base = 38912 * 512;
    assert_eq!(&after[base + 8192..base + 12288], &[0xab; 4096][..]);
    assert_eq!(&after[base..base + 4096], &[0; 4096][..]);
    assert_eq!(after[..base], before[..base]);
    assert_eq!(after[base + 12288..], before[base + 12288..]);
}

#[test]
fn gpt_with_4k_sectors() {
    require!("fdisk", "--version");
    require!("nbdcopy", "--version");
    let dir = TempDir::new("partition-4k");
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let mut c = std::process::Command::new("fdisk")
        .args(["-b", "4096", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"g\nn\n1\n\n+10M\nn\n2\n\n+20M\nw\n").unwrap();
    assert!(c.wait().unwrap().success());
    let list = run_ok("fdisk", &["-b", "4096", "-l", disk.to_str().unwrap()]);
    assert!(list.contains("2816  7935    5120  20M"), "{list}");
    put_filesystem(&dir, &disk, 2816 * 4096, 20 << 20, "four k\n");
    let args = |extra: &'static str| -> Vec<String> {
        vec!["--filter=partition".into(), "file".into(), disk.to_str().unwrap().into(), "partition=2".into(), extra.into()]
    };
    let a = args("partition-sectorsize=4k");
    let srv = start_logged(None, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(nbdinfo(&srv, &["--size"]).trim(), (20u64 << 20).to_string());
    assert_eq!(read_back(&dir, &srv, "4k"), "four k\n");
    // With 512-byte sectors the protective MBR is all there is.
    let srv = start_logged(None, &["--filter=partition", "file", disk.to_str().unwrap(), "partition=1"]);
    assert!(nbdinfo(&srv, &["--size"]).starts_with("ERROR"));
    assert!(wait_log(&srv, "rejecting GPT protective entry from MBR, if the underlying storage uses 4K sectors \
                            try using partition-sectorsize=4k"), "{}", log_of(&srv));
}

#[test]
fn bad_parameters() {
    let fails = |args: &[&str], msg: &str| {
        let mut all = vec!["--filter=partition", "null", "1M"];
        all.extend_from_slice(args);
        let o = std::process::Command::new(nbdkit_bin()).args(&all).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    };
    fails(&[], "you must supply the partition parameter on the command line");
    fails(&["partition=0"], "invalid partition number");
    fails(&["partition=1", "partition-sectorsize=1024"], "invalid partition-sectorsize, it must be '512' or '4086'");
}

/// P12: hostile tables fail the connection with nbdkit's message, never
/// the server; the file is rewritten between connections, then repaired.
#[test]
fn hostile_tables_fail_the_open_only() {
    let dir = TempDir::new("partition-p12");
    let disk = dir.path("disk.img");
    let good = {
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0, 0x83, 8, 16);
        entry(&mut d, 0, 1, 0x05, 64, 1024);
        entry(&mut d, 64 * 512, 0, 0x83, 2, 10);
        entry(&mut d, 64 * 512, 1, 0x05, 32, 10);
        entry(&mut d, 96 * 512, 0, 0x83, 2, 10);
        entry(&mut d, 96 * 512, 1, 0x05, 64, 10);
        entry(&mut d, 128 * 512, 0, 0x83, 2, 10);
        d
    };
    std::fs::write(&disk, &good).unwrap();
    let mut srv = start_logged(None, &["--filter=partition", "file", disk.to_str().unwrap(), "partition=7"]);
    type Edit = fn(&mut Vec<u8>);
    let cases: &[(Edit, &str)] = &[
        (|d| entry(d, 96 * 512, 1, 0x05, 0, 1), "invalid EBR chain: next EBR points to an earlier partition table"),
        (|d| entry(d, 96 * 512, 1, 0x05, 32, 1), "invalid EBR chain: next EBR points to an earlier partition table"),
        (|d| entry(d, 96 * 512, 1, 0x05, 0xffff_fff0, 1), "invalid EBR chain: next EBR boot sector is located outside disk boundary"),
        (|d| entry(d, 0, 1, 0x05, u32::MAX, u32::MAX), "invalid EBR chain: next EBR boot sector is located outside disk boundary"),
        (|d| { entry(d, 0, 1, 0, 0, 0); }, "there is no extended partition"),
        (|d| d[510] = 0, "disk does not contain MBR or GPT partition table signature"),
        (|d| d.truncate(1000), "disk is too small to be a partitioned disk"),
        // A GPT whose entries × size overflows 32 bits, and one past the end.
        (|d| gpt(d, u32::MAX, 128, 34, 40), "GPT partition table is too large for this disk"),
        (|d| gpt(d, 128, 1 << 30, 34, 40), "GPT partition entry size is invalid (1073741824 bytes)"),
        (|d| gpt(d, 128, 128, 1 << 62, 1 << 62), "partition is outside the disk"),
        (|d| gpt(d, 128, 128, 34, 1 << 40), "partition is outside the disk"),
    ];
    for (edit, msg) in cases {
        let mut d = good.clone();
        edit(&mut d);
        std::fs::write(&disk, &d).unwrap();
        assert!(nbdinfo(&srv, &["--size"]).starts_with("ERROR"), "{msg}");
        assert!(wait_log(&srv, msg), "expected {msg:?} in {}", log_of(&srv));
        assert!(srv.alive());
    }
    // Partition 1 is a protective entry once the GPT signature is gone.
    let srv1 = start_logged(None, &["--filter=partition", "file", disk.to_str().unwrap(), "partition=1"]);
    let mut d = good.clone();
    entry(&mut d, 0, 0, 0xee, 1, 2000);
    std::fs::write(&disk, &d).unwrap();
    assert!(nbdinfo(&srv1, &["--size"]).starts_with("ERROR"));
    assert!(wait_log(&srv1, "rejecting GPT protective entry from MBR"));
    // Repaired: partition 7 is the third logical partition, at sector 130.
    let mut d = good.clone();
    d[130 * 512..131 * 512].fill(0x5a);
    std::fs::write(&disk, &d).unwrap();
    assert_eq!(nbdinfo(&srv, &["--size"]).trim(), (10 * 512).to_string());
    nbdsh_ok(&srv, "assert h.pread(512, 0) == b'\\x5a' * 512");
    srv.health_check();
}

/// Writes MBR-style entry `i` of the table in the sector at `base`.
fn entry(d: &mut [u8], base: usize, i: usize, typ: u8, start: u32, count: u32) {
    let e = base + 0x1be + 16 * i;
    d[e + 4] = typ;
    d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
    d[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    d[base + 0x1fe] = 0x55;
    d[base + 0x1ff] = 0xaa;
}

/// Turns the disk into a GPT with the given header fields and an entry 7
/// from `first` to `last`.
fn gpt(d: &mut [u8], nr: u32, esize: u32, first: u64, last: u64) {
    d[512..520].copy_from_slice(b"EFI PART");
    d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
    d[512 + 80..512 + 84].copy_from_slice(&nr.to_le_bytes());
    d[512 + 84..512 + 88].copy_from_slice(&esize.to_le_bytes());
    let e = 1024 + 6 * 128;
    d[e..e + 16].fill(0x11);
    d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
    d[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
}
