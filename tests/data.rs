//! The data plugin through real clients: every construct of the data
//! language, compared with Debian's C nbdkit started on the same command
//! line (`nbdinfo --map` and a sha256 of the whole disk must match), disks
//! that real tools read back (MBR, GPT, ext2), the lazy patterns, and the
//! bad inputs of bad-input.md P16.

mod common;
use common::*;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Debian's C nbdkit, the reference (skip, or fail under NBDKIT_TEST_STRICT).
fn reference_nbdkit() -> Option<PathBuf> {
    let found = ["/usr/sbin/nbdkit", "/usr/bin/nbdkit"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists() && *p != nbdkit_bin() && available(p.to_str().unwrap(), &["--version"]));
    if found.is_none() {
        if std::env::var_os("NBDKIT_TEST_STRICT").is_some() {
            panic!("the reference C nbdkit (/usr/sbin/nbdkit or /usr/bin/nbdkit) is required (NBDKIT_TEST_STRICT is set)");
        }
        eprintln!("SKIP: reference C nbdkit not available");
    }
    found
}

fn start_reference(bin: &Path, args: &[&str]) -> Server {
    let dir = TempDir::new("dataref");
    let sock = dir.path("sock");
    let child = Command::new(bin).args(["-f", "-U"]).arg(&sock).args(args).stdin(Stdio::null()).spawn().unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&srv.sock).is_err() {
        assert!(srv.alive(), "reference nbdkit {args:?} exited early");
        assert!(Instant::now() < deadline, "reference nbdkit {args:?} did not start");
        thread::sleep(Duration::from_millis(10));
    }
    srv
}

/// `nbdinfo --map` and the sha256 of the whole disk (via nbdcopy).
fn map_and_sum(srv: &Server) -> (String, String) {
    let map = run_ok("nbdinfo", &["--map", &srv.uri()]);
    let script = format!("nbdcopy '{}' - | sha256sum", srv.uri());
    let sum = run_ok("sh", &["-c", &script]);
    (map, sum.split_whitespace().next().unwrap_or_default().to_string())
}

/// Starts both servers with `args` and asserts that the maps and bytes
/// are the same; returns our map.
fn parity(reference: &Path, args: &[&str]) -> String {
    let ours = Server::start(args);
    let theirs = start_reference(reference, args);
    let (a, b) = (map_and_sum(&ours), map_and_sum(&theirs));
    assert_eq!(a, b, "data {args:?}: ours (left) and nbdkit's (right) differ");
    a.0
}

fn parity_all(reference: &Path, cases: &[Vec<String>]) {
    // Four at a time: each case starts two servers and four clients.
    for chunk in cases.chunks(4) {
        thread::scope(|s| {
            for c in chunk {
                s.spawn(move || {
                    let args: Vec<&str> = std::iter::once("data").chain(c.iter().map(String::as_str)).collect();
                    parity(reference, &args);
                });
            }
        });
    }
}

fn cases(list: &[&[&str]]) -> Vec<Vec<String>> {
    list.iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect()
}

#[test]
fn every_construct_matches_nbdkit() {
    require!("nbdinfo", "--version");
    require!("nbdcopy", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    parity_all(&reference, &cases(&[
        // Bytes (%i: decimal, octal, hex), offsets, alignment, comments.
        &["0 1 2 3 @0x1fe 0x55 0xaa"],
        &["0 1 2 3 @^0x200 @-2 le16:0xaa55"],
        &["0377 010 0x10 0X1f 255"],
        &["# a comment\n1 # another\n\t2\r3\x0b4\x0c5"],
        &["@+100 1 @-50 2 @^1024 3"],
        &["1 @^4096"],
        &["1 @5"],
        &["@100000"],
        // Words and strings with every escape.
        &["le16:0x1234 be16:0x1234 le32:0xdeadbeef be32:1 le64:0x0102030405060708 be64:18446744073709551615"],
        &["le16:0 be32:0 le64:0"],
        &[r#""a\"b\\c\a\b\f\n\r\t\v\x41\xfe\q" "" "z""#],
        // Groups, repeats (chained, of strings, of groups), slices.
        &[" ( 0x55 0xAA )*2048 "],
        &[" ( \"Hello\" )*2000 ", "size=8192"],
        &["\"XXXXXXXXXX\" @0 ( \"a\" @5 )"],
        &["(1 2 3)*2*3 0*5*6 \"ab\"*3000 (1 @2)*3*5"],
        &["(1 2 3 4 5)[1:3] (1 2 3)[:] (1 2 3)[2:] \"abc\"[:1] (1 @4)[2:4]"],
        &["( 0x55 0xAA )*100000 @^65536 (1 @40000 2)*3"],
        &["1*0 (2 3)*0 4"],
        &["( 0 0 7 @40000 )[1:] ( 0 0 7 @40000 )[2:3]*5 ( 0 0 @70000 )[1:]"],
        // Block status: zero fills leave holes, a lone zero byte allocates.
        &["( 0*100000 )"],
        &["1 @0 0*10"],
        &["0*10 @0 0"],
        &["0 0"],
        &["0"],
        &["\"\\x00\\x00\""],
        &["\"\\x00\""],
        &["( 1 @100000 ) * 2"],
        &["( 0 @100000 ) * 2"],
        &["@1 ( 0 @100000 ) * 2"],
        &["1 2 @0 ( 0 @100000 ) * 2"],
        &["( 0 @100000 1 )[0:50000]"],
        &["1 @0 \"\\x00\""],
        &["(0 1)*2 @1 0 @3 0"],
        &["@32767 1 0 0"],
        &["@32767 1 \"\\x00\\x00\\x00\""],
        &["0*1 @40000 (0)*2 @70000 0*50000000 1"],
        &["1 @0 ( 0 )", "size=100000"],
        &["@65536 1 @32768 0 @100 0 0"],
        &["\"\\x00\" 0 0 @40000 ( 0 @1000 1 )*5[0:200]"],
        &["( ( 0 0 ) )[0:1] @5 0*7[2:3]"],
        &["( le16:0 ) 0 0 ( \"\\x00\\x01a\" )[0:1]"],
        // Names, lexical capture, variables.
        &[" ( 0x55 0xAA ) -> \\boot-signature ( @0x1fe \\boot-signature ) -> \\sector \\sector \\sector "],
        &["1 -> \\a \\a -> \\b 2 -> \\a \\b \\a ( 3 -> \\a \\a \\b ) \\a"],
        &["0 -> \\z \\z \\z"],
        &["( 1 2 ) -> \\a \\a*3 \\a[1:] ( @^8 \\a @^8 )*2 ( \\a -> \\b \\b \\b )*2"],
        &["$outer @^16 $outer", "outer=( $inner )*2 9", "inner=1 @+3"],
        &["( 0x55 0xAA )*40000 @0 ( 0 @70000 )[1:40000] @^32768 ( 1 @40000 ( 0 @40000 )*2 )[35000:100000]"],
        &["$pattern*16 @^512", "pattern=0x55 0xAA"],
        &["$v", "v=0"],
        // Sizes and allocators.
        &["1 2 3", "size=1M"],
        &["1 2 3 4 5", "size=3"],
        &["1 @100000 0", "allocator=malloc"],
        &["0 @100000 0 0", "allocator=sparse", "size=200000"],
        // Scripts (run by /bin/sh), with slices of infinite ones.
        &["<(printf 'abc\\000def')"],
        &["<( i=0; while :; do printf \"%04d\" $i; i=$((i+1)); done )[:32768]"],
        &["<(yes)[:7]*3"],
        &["</dev/zero[:100000]"],
        &["1 </dev/zero[:100000]"],
        &["</dev/zero[40000:40010] @^8"],
        // raw= and base64=.
        &["raw=Hello, world!"],
        &["base64=aGVsbG8gbmJka2l0IHVzZXI=", "size=1M"],
    ]));
}

#[test]
fn files_match_nbdkit() {
    require!("nbdinfo", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    let dir = TempDir::new("datafiles");
    let mut content = vec![0u8; 100_000];
    for (i, b) in content.iter_mut().enumerate().skip(40_000).take(20_000) {
        *b = (i % 251) as u8;
    }
    let f = dir.path("f.bin");
    std::fs::write(&f, &content).unwrap();
    let f = f.to_str().unwrap();
    parity_all(&reference, &cases(&[
        &[&format!("<{f}")],
        &[&format!("<{f}[39990:60010]")],
        &[&format!("<{f}[45000:45100]*3 @^512")],
        &[&format!("( <{f} )[50000:]")],
        &[&format!("<{f} @0 ( 0 @50000 )")],
    ]));
}

#[test]
fn the_ast_is_printed_with_debug_flag() {
    let out = Command::new(nbdkit_bin())
        .args(["-U", "-", "-v", "-D", "data.AST=1", "data", "( 0x55 0xAA )*3000 0 0 $v -> \\x \\x", "v=1 2", "--run", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let ast: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.contains("BEGIN AST (-D data.AST=1)"))
        .take_while(|l| !l.contains("END AST"))
        .map(|l| l.trim_start_matches("nbdkit: debug: "))
        .collect();
    assert_eq!(ast, ["BEGIN AST (-D data.AST=1)", "(", "    (", "        \"U\\\\xaa\"", "    ) *3000", "    fill(0*2)",
                     "    (", "        \"\\\\x01\\\\x02\"", "    ) -> \\\\x", "    \\\\x", ")"], "{err}");
    assert!(err.contains("implicit data size: 6004"), "{err}");
    // Without the flag, no AST.
    let out = Command::new(nbdkit_bin()).args(["-U", "-", "-v", "data", "1", "--run", "true"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("BEGIN AST"));
}

#[test]
fn help_and_debug_flags_as_nbdkit() {
    let ours = |args: &[&str]| {
        let out = Command::new(nbdkit_bin()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (_, help) = ours(&["data", "--help"]);
    assert!(help.contains("\nplugin: data\n(built in)\ndata|raw|base64=...     Specify disk data on the command line\n\
                           size=<SIZE>             Size of the backing disk\n"), "{help}");
    let (_, dump) = ours(&["data", "--dump-plugin"]);
    for line in ["name=data", "magic_config_key=data", "has_extents=1", "data_base64=yes"] {
        assert!(dump.lines().any(|l| l == line), "{line} in {dump}");
    }
    // Declared flags are quiet, others get nbdkit's warning.
    let run = |args: &[&str]| ours(&[&["-U", "-"][..], args, &["--run", "true"]].concat()).1;
    assert_eq!(run(&["-D", "data.AST=0", "-D", "data.dir=1", "data", "1"]), "");
    assert_eq!(run(&["-D", "memory.dir=1", "memory", "1M"]), "");
    assert_eq!(run(&["-D", "data.foo=1", "data", "1"]),
               "nbdkit: warning: -D data.foo: data does not contain a global variable called data_debug_foo\n");
    assert_eq!(run(&["-D", "memory.x.y=1", "memory", "1M"]),
               "nbdkit: warning: -D memory.x.y: memory does not contain a global variable called memory_debug_x_y\n");
    if let Some(reference) = reference_nbdkit() {
        let theirs = Command::new(&reference).args(["-U", "-", "-D", "data.foo=1", "data", "1", "--run", "true"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&theirs.stderr), run(&["-D", "data.foo=1", "data", "1"]));
        let theirs = Command::new(reference).args(["data", "--help"]).output().unwrap();
        let theirs = String::from_utf8_lossy(&theirs.stdout);
        let tail = |s: &str| s.lines().skip_while(|l| !l.starts_with("data|")).collect::<Vec<_>>().join("\n");
        assert_eq!(tail(&theirs), tail(&help));
    }
}

#[test]
fn suffixes_and_variables_of_1_44() {
    require!("nbdcopy", "--version");
    // nbdkit 1.44: @ takes size suffixes; a number starting with 0 is %i.
    for expr in ["@1k \"\\x01\"", "@0x400 \"\\x01\"", "@02000 \"\\x01\"", "@+1k 1", "@1s @+1s 1"] {
        let srv = Server::start(&["data", expr]);
        let out = Command::new("nbdcopy").args([&srv.uri(), "-"]).env("PATH", path_env()).output().unwrap();
        let mut want = vec![0u8; 1024];
        want.push(1);
        assert_eq!(out.stdout, want, "{expr}");
    }
    // $VAR from the environment, when no parameter has the name.
    let dir = TempDir::new("dataenv");
    let sock = dir.path("sock");
    let out = Command::new(nbdkit_bin())
        .args(["-U", sock.to_str().unwrap(), "data", "$DATA_TEST_PAT*2", "--run", "nbdcopy \"$uri\" -"])
        .env("DATA_TEST_PAT", "0x41 0x42")
        .env("PATH", path_env())
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"ABAB", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn json_block_sizes_and_writes() {
    require!("nbdinfo", "--version");
    require!("nbdsh", "--version");
    let srv = Server::start(&["data", "( 0x55 0xAA )*536870912"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    for want in ["\"export-size\": 1073741824", "\"is_read_only\": false", "\"can_zero\": true", "\"can_trim\": true",
                 "\"can_multi_conn\": true", "\"block_size_minimum\": 1", "\"block_size_preferred\": 32768"] {
        assert!(json.contains(want), "{want} in {json}");
    }
    // Writes go over the pattern; what is not written stays the pattern,
    // and a second connection sees the same disk.
    nbdsh_ok(&srv, "h.pwrite(b'hello', 100001)\n\
                    assert h.pread(8, 99999) == b'\\xaa\\x55hello\\x55'\n\
                    h.zero(4, 1073741820)\n\
                    assert h.pread(6, 1073741818) == b'\\x55\\xaa\\0\\0\\0\\0'\n\
                    h.trim(65536, 0)\n\
                    assert h.pread(2, 65536) == b'\\x55\\xaa'\n\
                    assert h.pread(2, 0) == b'\\0\\0'");
    nbdsh_ok(&srv, "assert h.pread(5, 100001) == b'hello'");
    let map = run_ok("nbdinfo", &["--map", &srv.uri()]);
    assert_eq!(map.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(), ["0", "65536", "3", "hole,zero"], "{map}");
    // qemu-img sees the same disk.
    require!("qemu-img", "--version");
    let info = run_ok("qemu-img", &["info", "--output=json", &srv.uri()]);
    assert!(info.contains("\"virtual-size\": 1073741824"), "{info}");
}

#[test]
fn lazy_patterns_start_at_once() {
    require!("nbdsh", "--version");
    for (expr, size, tail) in [
        ("( 0x55 0xAA )*536870912", 1u64 << 30, &b"\x55\xaa\x55\xaa"[..]),
        ("\"hello\" * 2147483648", 5 << 31, b"ello"),
        ("\"ab\" * 1000000000000", 2_000_000_000_000, b"abab"),
        ("((1 @100000)*1000 2)*1000000 @7E 1", (7 << 60) + 1, b"\0\0\0\x01"),
    ] {
        let t = Instant::now();
        let mut srv = Server::start(&["data", expr]);
        assert!(t.elapsed() < Duration::from_secs(5), "{expr} took {:?}", t.elapsed());
        let script = format!("assert h.get_size() == {size}\nassert h.pread(4, {}) == {tail:?}", size - 4)
            .replace("[", "bytes([")
            .replace("]", "])");
        nbdsh_ok(&srv, &script);
        // Memory stays small: far below the disk's size.
        let rss = rss_kib(srv.child.id());
        assert!(rss < 64 * 1024, "{expr}: RSS {rss} KiB");
        srv.health_check();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The data string for an image, as disk2data.pl makes it: the non-zero
/// runs as `@N` and strings. Too long for one argument (the kernel allows
/// 128 KiB), it is cut into regions of about 16 KiB of text, each a
/// variable `$pK` placed at the region's start (`@START $pK`; offsets in
/// a variable are relative to where it is placed). Returns the data
/// string and the `pK=…` parameters.
fn disk2data(image: &[u8]) -> (String, Vec<String>) {
    let mut top = String::new();
    let mut params = Vec::new();
    let mut chunk = String::new();
    let mut chunk_start = 0usize;
    let mut flush = |top: &mut String, chunk: &mut String, start: usize| {
        if !chunk.is_empty() {
            let k = params.len();
            let _ = write!(top, "@{start} $p{k} ");
            params.push(format!("p{k}={chunk}"));
            chunk.clear();
        }
    };
    let mut i = 0;
    while i < image.len() {
        if image[i] == 0 {
            i += 1;
            continue;
        }
        // A run of data: up to 16 zero bytes inside it are kept.
        let mut end = i;
        let mut zeros = 0;
        while end < image.len() && zeros <= 16 && end < i + 8192 {
            zeros = if image[end] == 0 { zeros + 1 } else { 0 };
            end += 1;
        }
        let end = end - zeros;
        if chunk.len() > 16 * 1024 {
            flush(&mut top, &mut chunk, chunk_start);
        }
        if chunk.is_empty() {
            chunk_start = i;
        }
        let _ = write!(chunk, "@{} \"", i - chunk_start);
        for &b in &image[i..end] {
            match b {
                b'"' | b'\\' => {
                    chunk.push('\\');
                    chunk.push(b as char);
                }
                0x21..=0x7e => chunk.push(b as char),
                _ => {
                    let _ = write!(chunk, "\\x{b:02x}");
                }
            }
        }
        chunk.push_str("\"\n");
        i = end;
    }
    flush(&mut top, &mut chunk, chunk_start);
    let _ = write!(top, "@{}", image.len());
    (top, params)
}

#[test]
fn an_mbr_that_sfdisk_lists() {
    require!("sfdisk", "--version");
    require!("nbdcopy", "--version");
    let mbr = "@0x1be 0 0 2 0 0x83 0x20 0x20 0 le32:1 le32:0x7ff @0x1fe 0x55 0xaa";
    let srv = Server::start(&["data", mbr, "size=1M"]);
    let dir = TempDir::new("datambr");
    let img = dir.path("disk.img");
    run_ok("nbdcopy", &[&srv.uri(), img.to_str().unwrap()]);
    let dump = run_ok("sfdisk", &["-d", img.to_str().unwrap()]);
    assert!(dump.contains("label: dos"), "{dump}");
    assert!(dump.contains(": start=           1, size=        2047, type=83"), "{dump}");
    if let Some(reference) = reference_nbdkit() {
        parity(&reference, &["data", mbr, "size=1M"]);
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A GPT header for a 2048-sector disk with `entries` at `entries_lba`.
fn gpt_header(current: u64, backup: u64, entries_lba: u64, entries_crc: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"EFI PART");
    h.extend_from_slice(&0x0001_0000u32.to_le_bytes());
    h.extend_from_slice(&92u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // header CRC, filled below
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&current.to_le_bytes());
    h.extend_from_slice(&backup.to_le_bytes());
    h.extend_from_slice(&34u64.to_le_bytes());
    h.extend_from_slice(&2014u64.to_le_bytes());
    h.extend_from_slice(&[0x11; 16]); // disk GUID
    h.extend_from_slice(&entries_lba.to_le_bytes());
    h.extend_from_slice(&128u32.to_le_bytes());
    h.extend_from_slice(&128u32.to_le_bytes());
    h.extend_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("\\x{b:02x}")).collect()
}

#[test]
fn a_gpt_that_sfdisk_lists() {
    require!("sfdisk", "--version");
    require!("nbdcopy", "--version");
    // One partition: Linux filesystem data, sectors 2048..? No: 34..2013.
    let mut entries = vec![0u8; 128 * 128];
    let linux: [u8; 16] = [0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4];
    entries[0..16].copy_from_slice(&linux);
    entries[16..32].copy_from_slice(&[0x22; 16]);
    entries[32..40].copy_from_slice(&64u64.to_le_bytes());
    entries[40..48].copy_from_slice(&2000u64.to_le_bytes());
    let ecrc = crc32(&entries);
    let primary = gpt_header(1, 2047, 2, ecrc);
    let backup = gpt_header(2047, 1, 2015, ecrc);
    let first = hex(&entries[..128]);
    let data = format!(
        "@0x1be 0 0 2 0 0xee 0xff 0xff 0xff le32:1 le32:2047 @0x1fe 0x55 0xaa \
         @512 \"{}\" @1024 \"{first}\" \
         @{} \"{first}\" @{} \"{}\" @^512",
        hex(&primary), 2015 * 512, 2047 * 512, hex(&backup)
    );
    let srv = Server::start(&["data", &data]);
    let dir = TempDir::new("datagpt");
    let img = dir.path("disk.img");
    run_ok("nbdcopy", &[&srv.uri(), img.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    let out = run("sfdisk", &["-d", img.to_str().unwrap()]);
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && dump.contains("label: gpt"), "{dump}{}", String::from_utf8_lossy(&out.stderr));
    assert!(dump.contains("start=          64, size=        1937, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"), "{dump}");
    assert!(String::from_utf8_lossy(&out.stderr).is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    if let Some(reference) = reference_nbdkit() {
        parity(&reference, &["data", &data]);
    }
}

#[test]
fn an_ext2_image_turned_into_data() {
    require!("mke2fs", "-V");
    require!("e2fsck", "-V");
    require!("debugfs", "-V");
    require!("nbdcopy", "--version");
    let dir = TempDir::new("dataext2");
    let root = dir.path("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("hello.txt"), "hello, data plugin\n").unwrap();
    std::fs::write(root.join("sub/pattern.bin"), (0..30000u32).map(|i| (i * 7 % 256) as u8).collect::<Vec<_>>()).unwrap();
    let fs = dir.path("fs.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "1024", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg("1M")
        .env("PATH", path_env())
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let image = std::fs::read(&fs).unwrap();
    let (data, params) = disk2data(&image);
    assert!(params.len() > 1, "the image fits one variable: make it bigger");
    let mut args = vec!["data", data.as_str()];
    args.extend(params.iter().map(String::as_str));
    let srv = Server::start(&args);
    let back = dir.path("back.img");
    run_ok("nbdcopy", &[&srv.uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == image, "the disk differs from the image");
    let fsck = run("e2fsck", &["-fn", back.to_str().unwrap()]);
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    let cat = run_ok("debugfs", &["-R", "cat /hello.txt", back.to_str().unwrap()]);
    assert_eq!(cat, "hello, data plugin\n");
    if let Some(reference) = reference_nbdkit() {
        parity(&reference, &args);
        // The image itself, inserted as a file, and a slice of it.
        let f = format!("<{}", fs.to_str().unwrap());
        parity(&reference, &["data", &f]);
        parity(&reference, &["data", &format!("{f}[1024:2048]*4")]);
    }
}

/// Starts our server expecting a start-up failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let mut cmd = Command::new(nbdkit_bin());
    cmd.args(["-U", "-"]).args(args).args(["--run", "true"]).stdin(Stdio::null());
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "{args:?} took {:?}", t.elapsed());
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_expressions_fail_at_start_up() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("databad");
    let big = dir.path("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(2 << 30).unwrap(); // sparse: no disk space
    let big_file = format!("<{}", big.to_str().unwrap());
    let big_slice = format!("<{}[3221225472:3221225473]", big.to_str().unwrap());
    // 60,000 deep: a longer argument would pass the kernel's limit of
    // 128 KiB per argument (the parser's unit tests go 100,000 deep).
    let deep = "(".repeat(60_000) + "1" + &")".repeat(60_000);
    let deep_var = "$a".to_string();
    for (args, msg) in [
        (vec!["data", "("], "unmatched '(' in data string"),
        (vec!["data", "( ( 1 )"], "unmatched '(' in data string"),
        (vec!["data", "1 )"], "unmatched ')' in data string"),
        (vec!["data", "@-1"], "data parameter @-1 must not be larger than the current offset 0"),
        (vec!["data", "@1 @-2"], "data parameter @-2 must not be larger than the current offset 1"),
        (vec!["data", "@^3"], "data parameter @^3 must be a power of 2"),
        (vec!["data", "@x"], "data parameter: parsing error at offset 1"),
        (vec!["data", "@10\"x\""], "data parameter: parsing error at offset 3"),
        (vec!["data", "@9223372036854775808"], "data parameter: size exceeds maximum value"),
        (vec!["data", "1 @9223372036854775807 1"], "larger than 2^63-1 bytes"),
        (vec!["data", "(1 2 3)*4611686018427387904"], "larger than 2^63-1 bytes"),
        (vec!["data", "1*4294967296*4294967296"], "multiplication overflow: 4294967296*4294967296"),
        (vec!["data", "256"], "data parameter BYTE must be in the range 0..255"),
        (vec!["data", "x"], "data parameter: parsing error at offset 0"),
        (vec!["data", "\"abc"], "data parameter: unterminated string"),
        (vec!["data", "(1 2)[0:5]"], "[N:M] does not describe a valid slice"),
        (vec!["data", "\\nope"], "\\nope not defined"),
        (vec!["data", "$nope_not_set_anywhere"], "$nope_not_set_anywhere: variable not found"),
        (vec!["data", &deep], "nested too deeply (more than 1000 levels)"),
        (vec!["data", &deep_var, "a=$a"], "nested too deeply (more than 1000 levels)"),
        (vec!["data", "</nonexistent/file"], "/nonexistent/file: No such file or directory"),
        (vec!["data", &big_file], "more than 1073741824 bytes"),
        (vec!["data", &big_slice], "[N:M] does not describe a valid slice"),
        (vec!["data", "<(exit 3)"], "pclose: external command failed"),
        (vec!["data", "<(kill -SEGV $$)"], "pclose: external command failed"),
        (vec!["data", "<(printf ab)[0:5]"], "[N:M] does not describe a valid slice"),
        (vec!["data", "1", "raw=a"], "raw|base64|data parameter must be specified exactly once"),
        (vec!["data"], "raw|base64|data parameter was not specified"),
        (vec!["data", "raw=a", "foo=1"], "extra parameters passed and not using data='...'"),
        (vec!["data", "base64=@@@@"], "base64: Base64 decoding error."),
    ] {
        let err = fails(&args);
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "{args:?}: {err}");
    }
    // 10^12 repeats and a 10^12 zero fill are not materialized; garbage
    // from a script is just bytes; the server stays healthy.
    let mut srv = Server::start(&["data", "(1 2 3)*1000000000000 0*1000000000000 <(head -c 1000 /dev/urandom)"]);
    nbdsh_ok(&srv, "assert h.get_size() == 4000000001000\nassert h.pread(3, 2999999999997) == b'\\x01\\x02\\x03'");
    srv.health_check();
    // A script that would hang, sliced: its process group is killed once
    // the slice has its bytes (nbdkit waits for it), and nothing is left.
    let t = Instant::now();
    let mut srv = Server::start(&["data", "<(printf ab; sleep 987.654 & sleep 987.654)[0:2] <(exec sleep 999)[0:0]", "size=1M"]);
    assert!(t.elapsed() < Duration::from_secs(10));
    nbdsh_ok(&srv, "assert h.pread(2, 0) == b'ab'");
    srv.health_check();
    let ps = run_ok("ps", &["-eo", "args"]);
    assert!(!ps.lines().any(|l| l.trim() == "sleep 987.654"), "a script's child was left running:\n{ps}");
    // An infinite script, sliced, whose exit status is ignored.
    let mut srv = Server::start(&["data", "<(yes; exit 1)[0:1000000] <(cat /dev/zero)[5:10]"]);
    nbdsh_ok(&srv, "assert h.get_size() == 1000005\nassert h.pread(4, 0) == b'y\\ny\\n'");
    srv.health_check();
}

/// Starts `bin data ARGS` and returns its map and sum, or None if it
/// refused the expression.
fn try_map_and_sum(bin: &Path, expr: &str) -> Option<(String, String)> {
    let dir = TempDir::new("datarand");
    let sock = dir.path("sock");
    let child = Command::new(bin)
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["data", expr])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&srv.sock).is_err() {
        if !srv.alive() {
            return None;
        }
        assert!(Instant::now() < deadline, "{bin:?} data {expr:?} did not start");
        thread::sleep(Duration::from_millis(5));
    }
    Some(map_and_sum(&srv))
}

/// A random data expression (a small xorshift generator, fixed seeds, so
/// the cases are the same on every run): bytes, strings, words, fills,
/// offsets, groups, repeats, slices and bindings, nested.
fn random_expr(seed: &mut u64, depth: u32) -> String {
    let mut next = |n: u64| {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed % n
    };
    let pick = |i: u64, v: &[&str]| v[i as usize % v.len()].to_string();
    if depth > 3 || next(10) < 4 {
        return match next(10) {
            0 => pick(next(5), &["0", "0", "1", "255", "0x55"]),
            1 => format!("\"{}\"", (0..next(4)).map(|_| pick(next(4), &["\\x00", "a", "\\x01", "\\x00\\x00"])).collect::<String>()),
            2 => format!("{}*{}", pick(next(3), &["0", "1", "7"]), pick(next(7), &["0", "1", "2", "3", "100", "40000", "70000"])),
            3 => format!("@{}", pick(next(8), &["0", "1", "100", "32767", "32768", "40000", "70000", "100000"])),
            4 => format!("@+{}", pick(next(6), &["0", "1", "3", "1000", "32768", "50000"])),
            5 => format!("@^{}", pick(next(6), &["1", "2", "512", "4096", "32768", "65536"])),
            6 => pick(next(3), &["le16:0", "le16:1", "be32:256"]),
            7 if depth > 0 => "\\a".to_string(),
            8 => pick(next(6), &["0 0", "1 1", "\"\\x00\\x00\\x00\"", "0 1 0", "\"aa\"", "\"\\x00\" 0"]),
            _ => pick(next(3), &["1", "2", "0"]),
        };
    }
    let inner: Vec<String> = (0..1 + next(3)).map(|_| random_expr(seed, depth + 1)).collect();
    let inner = inner.join(" ");
    let mut next = |n: u64| {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed % n
    };
    match next(6) {
        0 => format!("( {inner} )*{}", [0, 1, 2, 3, 5][next(5) as usize]),
        1 => {
            let n = [0, 0, 1, 100][next(4) as usize];
            let m = ["", "200", "40000"][next(3) as usize];
            format!("( {inner} )[{n}:{m}]")
        }
        2 => format!("( {inner} ) -> \\a"),
        3 => format!("( {inner} )*{}[{}:{}]", [2, 3, 1000][next(3) as usize], next(6), 6 + next(50_000)),
        _ => format!("( {inner} )"),
    }
}

#[test]
fn random_expressions_match_nbdkit() {
    require!("nbdinfo", "--version");
    require!("nbdcopy", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let exprs: Vec<String> = (0..200)
        .map(|_| {
            let n = 1 + seed % 4;
            (0..n).map(|_| random_expr(&mut seed, 0)).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let ours = nbdkit_bin();
    let mut served = 0;
    for chunk in exprs.chunks(4) {
        let results: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|e| {
                    let (ours, reference) = (&ours, &reference);
                    s.spawn(move || (e, try_map_and_sum(ours, e), try_map_and_sum(reference, e)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (e, a, b) in results {
            assert_eq!(a, b, "data {e:?}: ours (left) and nbdkit's (right) differ");
            served += usize::from(a.is_some());
        }
    }
    // Most expressions are valid (the rest must fail in both).
    eprintln!("{served} of 200 expressions served by both");
    assert!(served > 60, "only {served} of 200 served");
}
