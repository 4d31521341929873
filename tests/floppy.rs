//! The floppy plugin seen by real FAT tools: the disk is copied with
//! nbdcopy or qemu-img, then fsck.fat, mtools and fatcat read it; the
//! layout is compared with Debian's nbdkit; hostile trees (P17) and host
//! files that change while served (P18).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PART: u64 = 1 << 20; // the partition starts at LBA 2048

/// Deterministic pseudo-random bytes.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(root: &Path, rel: &str, data: &[u8], files: &mut BTreeMap<String, Vec<u8>>) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    files.insert(rel.to_string(), data.to_vec());
}

/// A tree with long, Unicode, colliding, hidden, empty and deeply nested
/// names, files on and across cluster boundaries, and a directory whose
/// table needs two clusters. Returns relative path → contents.
fn rich_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut f = BTreeMap::new();
    write(root, "readme.txt", b"hello, floppy\n", &mut f);
    write(root, "big.bin", &bytes(1, 100_000), &mut f);
    write(root, "cluster.bin", &bytes(2, 16384), &mut f);
    write(root, "empty", b"", &mut f);
    write(root, ".hidden", b"hidden\n", &mut f);
    write(root, "exactly13char", b"13\n", &mut f);
    write(root, "A Long File Name With Spaces.txt", b"spaces\n", &mut f);
    for n in ["abcdefghij.txt", "abcdefghik.txt", "abcdefghil.txt", "abc.txt", "abc.text", "abc.txt2"] {
        write(root, n, n.as_bytes(), &mut f);
    }
    for n in ["café.txt", "中文名字.txt", "😀 emoji.txt", "ü.txt", "é.txt", "naïve résumé.doc"] {
        write(root, n, n.as_bytes(), &mut f);
    }
    write(root, &"L".repeat(200), b"long name\n", &mut f);
    let deep: String = (0..20).map(|i| format!("level{i}/")).collect();
    write(root, &format!("{deep}leaf.txt"), b"deep\n", &mut f);
    write(root, &format!("{deep}Leaf Ünïcode.txt"), &bytes(3, 5000), &mut f);
    for i in 0..300 {
        write(root, &format!("many/file{i:04}.dat"), &bytes(100 + i, (i as usize * 37) % 3000), &mut f);
    }
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    f
}

/// Every regular file under `root`, relative path → contents.
fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_str().unwrap().to_string();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn mtools(prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// fsck.fat -n on a partition image: no complaint at all.
fn fsck_clean(part: &Path) {
    let o = run("fsck.fat", &["-n", part.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "fsck.fat failed ({}):\n{out}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    // Problems are reported under the path of the entry they concern.
    let summary = format!("{}: ", part.display());
    assert!(!out.lines().any(|l| (l.starts_with('/') && !l.starts_with(&summary)) || l.contains("wrong") || l.contains("Invalid")),
            "{out}");
}

#[test]
fn fat_tools_read_every_file_back() {
    require!("nbdcopy", "--version");
    require!("qemu-img", "--version");
    require!("fsck.fat", "--help");
    require!("mdir", "--version");
    require!("which", "fatcat"); // fatcat has no option that exits 0
    let src = TempDir::new("floppy-src");
    let files = rich_tree(&src.0);
    // 2G: mtools, like Windows, takes a FAT with fewer than 65525 clusters for FAT16.
    let srv = Server::start(&["floppy", src.0.to_str().unwrap(), "size=2G", "label=FLOPPYTEST"]);
    let work = TempDir::new("floppy-work");
    let disk = work.path("disk.img");
    run_ok("nbdcopy", &[&srv.uri(), disk.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 30);
    // The partition alone, through qemu-img and a raw offset.
    let part = work.path("part.img");
    let json = format!(r#"json:{{"driver":"raw","offset":{PART},"file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}}}}}}"#,
                       srv.sock.display());
    run_ok("qemu-img", &["convert", "-O", "raw", &json, part.to_str().unwrap()]);
    fsck_clean(&part);

    let img = format!("{}@@{PART}", disk.display());
    let o = mtools("mdir", &["-/", "-a", "-i", &img, "::/"]);
    assert!(o.status.success(), "mdir: {}", String::from_utf8_lossy(&o.stderr));
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains("FLOPPYTEST"), "{listing}");
    for rel in files.keys().filter(|k| k.chars().all(|c| u32::from(c) <= 0xffff)) {
        let name = rel.rsplit('/').next().unwrap();
        assert!(listing.contains(name), "mdir does not list {name}:\n{listing}");
    }
    let out = work.path("out");
    std::fs::create_dir(&out).unwrap();
    let o = mtools("mcopy", &["-s", "-n", "-i", &img, "::/", out.to_str().unwrap()]);
    assert!(o.status.success(), "mcopy: {}", String::from_utf8_lossy(&o.stderr));
    let got = read_tree(&out);
    // mtools decodes long names as UCS-2: a character outside the BMP
    // (a surrogate pair) comes out as "__".
    let files: BTreeMap<String, Vec<u8>> = files
        .into_iter()
        .map(|(k, v)| (k.chars().map(|c| if u32::from(c) > 0xffff { "__".to_string() } else { c.to_string() }).collect(), v))
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), files.keys().collect::<Vec<_>>());
    for (k, v) in &files {
        assert!(got[k] == *v, "{k}: contents differ ({} vs {} bytes)", got[k].len(), v.len());
    }
    assert!(out.join("empty dir").is_dir());

    // fatcat prints each UTF-16 unit of a long name as its low byte, then
    // its high byte if that is not zero.
    let fatcat = |dir: &str| {
        let o = run("fatcat", &[part.to_str().unwrap(), "-l", dir]);
        assert!(o.status.success(), "fatcat -l {dir}: {}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let root = fatcat("/");
    for name in ["A Long File Name With Spaces.txt", "abcdefghij.txt", "abcdefghik.txt", "abcdefghil.txt",
                 "café.txt", "中文名字.txt", "naïve résumé.doc", ".hidden", &"L".repeat(200)] {
        let want: Vec<u8> = name.encode_utf16().flat_map(|u| [u as u8, (u >> 8) as u8].into_iter().take(if u > 0xff { 2 } else { 1 })).collect();
        assert!(root.windows(want.len()).any(|w| w == want), "fatcat / lacks {name}:\n{}", String::from_utf8_lossy(&root));
    }
    let deep: String = (0..20).map(|i| format!("/level{i}")).collect();
    let leaf = fatcat(&deep);
    assert!(String::from_utf8_lossy(&leaf).contains("leaf.txt"), "{}", String::from_utf8_lossy(&leaf));
    let many = String::from_utf8_lossy(&fatcat("/many")).into_owned();
    assert_eq!(many.lines().filter(|l| l.contains("file0")).count(), 300, "{many}");

    // The free space of size=2G is usable: mtools writes 100 MiB into a
    // copy of the partition (through NBD and the cow filter: the next test), fsck.fat
    // still finds nothing wrong, and it reads back.
    let big = work.path("100M.bin");
    let data = bytes(42, 100 << 20);
    std::fs::write(&big, &data).unwrap();
    let p = part.to_str().unwrap();
    let o = mtools("mcopy", &["-i", p, big.to_str().unwrap(), "::/many/written.bin"]);
    assert!(o.status.success(), "mcopy in: {}", String::from_utf8_lossy(&o.stderr));
    fsck_clean(&part);
    let back = work.path("back.bin");
    let o = mtools("mcopy", &["-n", "-i", p, "::/many/written.bin", back.to_str().unwrap()]);
    assert!(o.status.success(), "mcopy out: {}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&back).unwrap() == data, "the 100 MiB file read back differs");
}

/// An operating system can write into the free space of `size=2G`
/// through the cow filter: 100 MiB written by mtools into the partition,
/// the partition written back over NBD, then read back from the server,
/// checked by fsck.fat and extracted; the host directory is untouched.
#[test]
fn a_file_written_through_the_cow_filter_reads_back() {
    require!("qemu-img", "--version");
    require!("fsck.fat", "--help");
    require!("mdir", "--version");
    let src = TempDir::new("floppy-cow-src");
    let files = rich_tree(&src.0);
    let srv = Server::start_with(&["--filter=cow"], &["floppy", src.0.to_str().unwrap(), "size=2G"]);
    let work = TempDir::new("floppy-cow-work");
    let json = format!(r#"json:{{"driver":"raw","offset":{PART},"file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}}}}}}"#,
                       srv.sock.display());
    let part = work.path("part.img");
    let p = part.to_str().unwrap();
    run_ok("qemu-img", &["convert", "-O", "raw", &json, p]);
    let big = work.path("100M.bin");
    let data = bytes(7, 100 << 20);
    std::fs::write(&big, &data).unwrap();
    let o = mtools("mcopy", &["-i", p, big.to_str().unwrap(), "::/written.bin"]);
    assert!(o.status.success(), "mcopy in: {}", String::from_utf8_lossy(&o.stderr));
    // Back over NBD, into the cow overlay.
    run_ok("qemu-img", &["convert", "-n", "-O", "raw", p, &json]);
    let again = work.path("again.img");
    let a = again.to_str().unwrap();
    run_ok("qemu-img", &["convert", "-O", "raw", &json, a]);
    fsck_clean(&again);
    let back = work.path("back.bin");
    let o = mtools("mcopy", &["-n", "-i", a, "::/written.bin", back.to_str().unwrap()]);
    assert!(o.status.success(), "mcopy out: {}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&back).unwrap() == data, "the 100 MiB file read back through cow differs");
    assert_eq!(read_tree(&src.0), files, "the host directory changed");
    let mut srv = srv;
    srv.health_check();
}

/// The default size (no free space) passes fsck too, and the same
/// directory gives the same bytes every time.
#[test]
fn exact_size_disk_is_clean_and_reproducible() {
    require!("nbdcopy", "--version");
    require!("fsck.fat", "--help");
    let src = TempDir::new("floppy-repro");
    rich_tree(&src.0);
    let work = TempDir::new("floppy-repro-work");
    let mut images = Vec::new();
    for i in 0..2 {
        let srv = Server::start(&["floppy", &format!("dir={}", src.0.display())]);
        let disk = work.path(&format!("disk{i}.img"));
        run_ok("nbdcopy", &[&srv.uri(), disk.to_str().unwrap()]);
        images.push(std::fs::read(&disk).unwrap());
    }
    assert!(images[0] == images[1], "two runs on the same directory differ");
    let part = work.path("part.img");
    std::fs::write(&part, &images[0][PART as usize..]).unwrap();
    fsck_clean(&part);
}

/// Starts a server binary with `TZ` fixed, on a private socket.
fn start_server(bin: &str, sock: &Path, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(bin)
        .args(["--foreground", "--unix"])
        .arg(sock)
        .args(args)
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "{bin} exited early");
        assert!(Instant::now() < deadline, "{bin} did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Creates `names` in `dir` so that readdir returns them in sorted order
/// (tmpfs lists newest first, other filesystems by creation or hash), and
/// checks that it does.
fn create_in_sorted_readdir_order(dir: &Path, names: &[(&str, Option<Vec<u8>>)]) {
    let mut sorted: Vec<_> = names.to_vec();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    for attempt in [true, false] {
        let order: Vec<_> = if attempt { sorted.iter().rev().collect() } else { sorted.iter().collect() };
        for (n, data) in &order {
            match data {
                Some(d) => std::fs::write(dir.join(n), d).unwrap(),
                None => std::fs::create_dir(dir.join(n)).unwrap(),
            }
        }
        let listed: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        if listed.iter().map(String::as_str).eq(sorted.iter().map(|s| s.0)) {
            return;
        }
        for (n, data) in &order {
            if data.is_some() { std::fs::remove_file(dir.join(n)).unwrap() } else { std::fs::remove_dir(dir.join(n)).unwrap() }
        }
    }
    panic!("cannot make readdir order agree with sorted order in {}", dir.display());
}

/// Byte-for-byte the same disk as Debian's nbdkit on a tree where readdir
/// order and sorted order agree, except the `..` records of the root's
/// subdirectories (nbdkit points them at cluster 2 with 1970 times; FAT,
/// and fsck.fat, want cluster 0).
#[test]
fn layout_matches_debian_nbdkit() {
    require!("/usr/bin/nbdkit", "--version");
    require!("nbdcopy", "--version");
    // tmpfs, where creation order decides readdir order.
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let src = base.join(format!("floppy-cmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir(&src).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(src.clone());
    create_in_sorted_readdir_order(&src, &[
        ("ABC.txt", Some(b"upper".to_vec())),
        ("Abc.Txt", Some(b"mixed".to_vec())),
        ("abcdefghij.txt", Some(bytes(7, 40_000))),
        ("abcdefghik.txt", Some(b"k".to_vec())),
        ("exactly13char", Some(b"13".to_vec())),
        ("naïve.txt", Some(b"n".to_vec())),
        ("sub", None),
        ("x.y.z", Some(b"xyz".to_vec())),
        ("zeta", None),
    ]);
    create_in_sorted_readdir_order(&src.join("sub"), &[
        ("LongFileName.text", Some(bytes(8, 20_000))),
        ("inner", None),
    ]);
    create_in_sorted_readdir_order(&src.join("sub/inner"), &[("deep.txt", Some(b"deep".to_vec()))]);
    create_in_sorted_readdir_order(&src.join("zeta"), &[("z.bin", Some(bytes(9, 16384)))]);

    let work = TempDir::new("floppy-cmp");
    let dir = src.to_str().unwrap();
    let mut images = Vec::new();
    for bin in ["/usr/bin/nbdkit", nbdkit_bin().to_str().unwrap()] {
        let sock = work.path("sock");
        let mut child = start_server(bin, &sock, &["floppy", dir, "label=COMPARE"]);
        let img = work.path("img");
        let o = run("nbdcopy", &[&format!("nbd+unix:///?socket={}", sock.display()), img.to_str().unwrap()]);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&sock);
        assert!(o.status.success(), "{bin}: nbdcopy: {}", String::from_utf8_lossy(&o.stderr));
        images.push(std::fs::read(&img).unwrap());
    }
    let (theirs, mut ours) = (images[0].clone(), images.pop().unwrap());
    assert_eq!(theirs.len(), ours.len(), "disk sizes differ");
    // Mask the `..` records of the root's subdirectories (in both).
    let mut theirs = theirs;
    let data = |img: &[u8]| {
        let b = &img[PART as usize..];
        let fat_sectors = u32::from_le_bytes(b[36..40].try_into().unwrap()) as usize;
        PART as usize + (32 + 2 * fat_sectors) * 512
    };
    let d = data(&ours);
    let root = ours[d..d + 16384].to_vec();
    let mut masked = 0;
    for rec in root.chunks(32) {
        if rec[11] == 0x10 {
            let c = u16::from_le_bytes([rec[26], rec[27]]) as usize;
            let at = d + (c - 2) * 16384 + 32;
            assert_eq!(&ours[at..at + 2], b"..");
            ours[at..at + 32].fill(0);
            theirs[at..at + 32].fill(0);
            masked += 1;
        }
    }
    assert_eq!(masked, 2);
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
        let s = i & !31;
        panic!("first difference at byte {i} (record at {s}):\n ours   {:02x?}\n theirs {:02x?}",
               &ours[s..s + 32], &theirs[s..s + 32]);
    }
}

/// Runs the server, which must refuse to start with `want` in its error.
fn refuses(args: &[&str], want: &str) {
    let mut child = Command::new(nbdkit_bin())
        .args(["--foreground", "--unix", "/nonexistent/never.sock"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?}: still running, expected an error");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{args:?}: {status}: {err}");
    assert!(err.contains(want), "{args:?}: expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(err.len() < 600, "a line to read, not a dump: {err}");
}

#[test]
fn p17_hostile_trees_are_start_up_errors() {
    let t = TempDir::new("floppy-p17");
    let mk = |name: &str| {
        let d = t.path(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let arg = |d: &Path| format!("dir={}", d.display());

    let huge = mk("huge");
    std::fs::File::create(huge.join("4G")).unwrap().set_len(4 << 30).unwrap();
    refuses(&["floppy", &arg(&huge)], "file is larger than maximum supported by VFAT");

    let bad = mk("bad");
    std::fs::write(bad.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), b"x").unwrap();
    refuses(&["floppy", &arg(&bad)], "not valid UTF-8");

    // 3,200 names of 250 characters: 20 LFN slots + 1 record each, over 65,536.
    let many = mk("many");
    for i in 0..3_200 {
        std::fs::File::create(many.join(format!("{i:05}-{}", "n".repeat(244)))).unwrap();
    }
    refuses(&["floppy", &arg(&many)], "too many entries for a FAT directory");

    // Deeper than PATH_MAX.
    let deep = mk("deep");
    python_ok(&format!("import os\nos.chdir({:?})\nfor i in range(1100):\n    os.mkdir('dddd')\n    os.chdir('dddd')\n\
                        open('f', 'w').close()", deep.display().to_string()));
    refuses(&["floppy", &arg(&deep)], "File name too long");

    let ok = mk("ok");
    std::fs::write(ok.join("f"), bytes(1, 100_000)).unwrap();
    refuses(&["floppy", &arg(&ok), "size=1M"], "filesystem is larger than \"size\" bytes");
    refuses(&["floppy", &arg(&ok), "size=0"], "filesystem is larger than \"size\" bytes");
    refuses(&["floppy", &arg(&ok), "size=3T"], "disk image is too large for the FAT32 disk format");
    refuses(&["floppy", &arg(&ok), "size=12Q"], "could not parse size");
    refuses(&["floppy", &arg(&ok), &arg(&ok)], "dir=<DIRECTORY> must only be set once");
    refuses(&["floppy", &arg(&t.path("missing"))], "realpath");
    refuses(&["floppy", &arg(&ok.join("f"))], "Not a directory");
    refuses(&["floppy"], "you must supply the dir=<DIRECTORY> parameter");

    // Symbolic-link loops, a FIFO and a socket are left out; an odd size= is fine.
    let odd = mk("odd");
    std::fs::write(odd.join("real.txt"), b"real").unwrap();
    std::os::unix::fs::symlink("loop2", odd.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", odd.join("loop2")).unwrap();
    std::os::unix::fs::symlink(".", odd.join("self")).unwrap();
    run_ok("mkfifo", &[odd.join("fifo").to_str().unwrap()]);
    let _sock = std::os::unix::net::UnixListener::bind(odd.join("sock")).unwrap();
    let mut srv = Server::start(&["floppy", &arg(&odd), "size=5000001"]);
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri()]).trim(), "5000001");
    require!("which", "fatcat"); // fatcat has no option that exits 0
    let img = t.path("odd.img");
    run_ok("nbdcopy", &[&srv.uri(), img.to_str().unwrap()]);
    let o = run("fatcat", &[img.to_str().unwrap(), "-O", &PART.to_string(), "-l", "/"]);
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains("real.txt"), "{listing}");
    for n in ["loop1", "loop2", "self", "fifo", "sock"] {
        assert!(!listing.contains(n), "{n} listed:\n{listing}");
    }
    srv.health_check();
}

/// Where `needle` starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("pattern not found on the disk")
}

#[test]
fn p18_host_file_changed_while_served_is_eio() {
    require!("nbdsh", "--version");
    let src = TempDir::new("floppy-p18");
    let (a, b, c) = (bytes(11, 50_000), bytes(12, 50_000), bytes(13, 50_000));
    std::fs::write(src.path("a.bin"), &a).unwrap();
    std::fs::write(src.path("b.bin"), &b).unwrap();
    std::fs::write(src.path("c.bin"), &c).unwrap();
    let log = src.path("server.log");
    let mut srv = Server::start_with(&[&format!("--log={}", log.display())], &["floppy", src.0.to_str().unwrap()]);
    let img = src.path("disk.img");
    run_ok("nbdcopy", &[&srv.uri(), img.to_str().unwrap()]);
    let disk = std::fs::read(&img).unwrap();
    let (oa, ob, oc) = (find(&disk, &a[..64]), find(&disk, &b[..64]), find(&disk, &c[..64]));
    std::fs::remove_file(&img).unwrap();

    // a shrinks, c grows; b is untouched.
    std::fs::OpenOptions::new().write(true).open(src.path("a.bin")).unwrap().set_len(100).unwrap();
    let mut grown = c.clone();
    grown.extend_from_slice(&[0xee; 5000]);
    std::fs::write(src.path("c.bin"), &grown).unwrap();
    nbdsh_ok(&srv, &format!(
        "{PY_FAILS}\nfails('EIO', h.pread, 4096, {oa})\nfails('EIO', h.pread, 4096, {})\n\
         fails('EIO', h.pread, 4096, {oc})\n\
         assert h.pread(4096, {ob}) == bytes({:?})\n\
         assert h.pread(4096, {ob} + 49152) == bytes({:?}) + bytes({})",
        oa + 40_000, &b[..4096], &b[49152..], 4096 - (50_000 - 49152)));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("a.bin: file changed size while served (was 50000 bytes, now 100)"), "{logged}");
    assert!(logged.contains("c.bin: file changed size while served (was 50000 bytes, now 55000)"), "{logged}");
    srv.health_check();
}

/// The paths fsck.fat -l lists (long names, UTF-8), without the root and
/// the volume label.
fn fsck_paths(part: &Path, label: &str) -> std::collections::BTreeSet<String> {
    let o = Command::new("fsck.fat").args(["-n", "-l"]).arg(part).env("LC_ALL", "C.UTF-8").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "fsck.fat: {out}");
    let summary = format!("{}: ", part.display());
    let mut paths = std::collections::BTreeSet::new();
    for l in out.lines().skip(1) {
        if l.starts_with(&summary) {
            continue;
        }
        let p = l.strip_prefix("Checking file ").unwrap_or_else(|| panic!("fsck.fat complains: {l}\n{out}"));
        // "/dir/long name (SHORT.EXT)": drop the short name.
        let p = p.rfind(" (").map_or(p, |i| &p[..i]);
        if p != "/" && p != label {
            paths.insert(p.to_string());
        }
    }
    paths
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 12, ..Default::default() })]
    /// Any tree of names (collisions, leading dots, spaces, non-ASCII,
    /// nesting) gives a disk fsck.fat accepts, listing every path.
    #[test]
    fn any_tree_gives_a_clean_filesystem_with_every_name(
        files in proptest::collection::vec(
            (proptest::collection::vec("[a-zA-Z0-9 ._~+,;=é中ü-]{1,14}", 0..4), "[a-zA-Z0-9 ._~+,;=é中ü-]{1,30}", 0usize..40_000),
            1..40)
    ) {
        if !available("fsck.fat", &["--help"]) || !available("nbdcopy", &["--version"]) {
            assert!(std::env::var_os("NBDKIT_TEST_STRICT").is_none(), "fsck.fat and nbdcopy are required");
            eprintln!("SKIP: fsck.fat or nbdcopy not available");
            return Ok(());
        }
        let src = TempDir::new("floppy-prop");
        let mut want = std::collections::BTreeSet::new();
        for (i, (dirs, name, size)) in files.iter().enumerate() {
            if dirs.iter().chain([name]).any(|c| c == "." || c == "..") {
                continue;
            }
            let rel: PathBuf = dirs.iter().chain([name]).collect();
            let p = src.0.join(&rel);
            if std::fs::create_dir_all(p.parent().unwrap()).is_err() || p.exists() {
                continue;
            }
            if std::fs::write(&p, bytes(i as u64, *size)).is_ok() {
                let mut acc = String::new();
                for c in rel.iter() {
                    acc.push('/');
                    acc.push_str(c.to_str().unwrap());
                    want.insert(acc.clone());
                }
            }
        }
        let srv = Server::start(&["floppy", src.0.to_str().unwrap()]);
        let work = TempDir::new("floppy-prop-img");
        let img = work.path("disk.img");
        run_ok("nbdcopy", &[&srv.uri(), img.to_str().unwrap()]);
        drop(srv);
        let disk = std::fs::read(&img).unwrap();
        std::fs::write(&img, &disk[PART as usize..]).unwrap();
        let got = fsck_paths(&img, "/NBDKITFL.OPY");
        proptest::prop_assert_eq!(got, want);
    }
}
