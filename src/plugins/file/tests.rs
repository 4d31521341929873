//! Unit tests of the file plugin on real temporary files.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::evict::NR_WINDOWS;
use super::handle::block_size_from_io;
use super::*;
use crate::backend::{extents::{HOLE, ZERO}, BlockSize, Extent, Extents, Flags, Support};

const MIB: u64 = 1 << 20;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nbdkit-file-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// A file of `size` bytes, all `fill` (sparse if `fill` is 0).
    fn file(&self, name: &str, size: u64, fill: u8) -> PathBuf {
        let p = self.path(name);
        let f = File::create(&p).unwrap();
        if fill == 0 {
            f.set_len(size).unwrap();
        } else {
            fs::write(&p, vec![fill; size as usize]).unwrap();
        }
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn configured(params: &[(&str, &str)]) -> Result<FilePlugin> {
    let mut p = FilePlugin::default();
    for (k, v) in params {
        assert_eq!(p.config(k, v)?, Param::Used, "{k}");
    }
    p.config_complete()?;
    Ok(p)
}

fn serve(path: &Path) -> FilePlugin {
    configured(&[("file", path.to_str().unwrap())]).unwrap()
}

fn err_of<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn read(h: &dyn Handle, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0x55; len];
    h.pread(&mut buf, offset, Flags::NONE).unwrap();
    buf
}

fn extents_of(h: &dyn Handle, offset: u64, count: u64, flags: Flags) -> Vec<Extent> {
    let mut e = Extents::new(offset, offset + count);
    h.extents(count, offset, flags, &mut e).unwrap();
    e.list().to_vec()
}

#[test]
fn writes_read_back_and_reach_the_file() {
    let d = TempDir::new();
    let path = d.file("disk", MIB, 0);
    let h = serve(&path).open(false, "ignored", false).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    h.pwrite(&data, 4096, Flags::FUA).unwrap();
    h.flush(Flags::NONE).unwrap();
    assert_eq!(read(&*h, 4096, data.len()), data);
    assert_eq!(read(&*h, 0, 4096), vec![0; 4096]);
    assert_eq!(&fs::read(&path).unwrap()[4096..4096 + 8192], &data[..]);
    h.cache(4096, 0, Flags::NONE).unwrap();
}

#[test]
fn size_is_exact_for_odd_sizes() {
    let d = TempDir::new();
    for size in [0, 1, 511, 512, 513, MIB, 64 * MIB - 1] {
        let path = d.file(&format!("s{size}"), size, 0);
        let h = serve(&path).open(false, "", false).unwrap();
        assert_eq!(h.size().unwrap(), size);
        assert_eq!(h.block_size().unwrap(), None, "regular files have no block size");
    }
}

#[test]
fn caps_of_a_regular_file() {
    let d = TempDir::new();
    let p = serve(&d.file("disk", 4096, 0));
    let c = p.open(false, "", false).unwrap().caps().unwrap();
    assert!(c.write && c.flush && c.trim && c.extents && c.multi_conn && !c.fast_zero && !c.rotational);
    assert_eq!((c.zero, c.fua, c.cache), (Support::Native, Support::Native, Support::Native));
    assert!(!p.open(true, "", false).unwrap().caps().unwrap().write, "readonly opens O_RDONLY");
}

#[test]
fn sparse_file_extents_are_holes_around_data() {
    let d = TempDir::new();
    let path = d.file("sparse", 4 * MIB, 0);
    let h = serve(&path).open(false, "", false).unwrap();
    h.pwrite(&vec![0xab; 65536], MIB, Flags::FUA).unwrap();
    let e = extents_of(&*h, 0, 4 * MIB, Flags::NONE);
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0], Extent { offset: 0, length: MIB, typ: HOLE | ZERO });
    assert_eq!((e[1].offset, e[1].typ), (MIB, 0));
    assert!(e[1].length >= 65536, "{e:?}");
    assert_eq!((e[2].typ, e[2].offset + e[2].length), (HOLE | ZERO, 4 * MIB));
    // REQ_ONE stops after the first extent.
    assert_eq!(extents_of(&*h, 0, 4 * MIB, Flags::REQ_ONE), vec![e[0]]);
    let from_data = extents_of(&*h, MIB + 512, 4096, Flags::REQ_ONE);
    assert_eq!(from_data, vec![Extent { offset: MIB + 512, length: 4096, typ: 0 }]);
    // A range wholly inside the final hole.
    assert_eq!(extents_of(&*h, 3 * MIB, MIB, Flags::NONE),
               vec![Extent { offset: 3 * MIB, length: MIB, typ: HOLE | ZERO }]);
}

#[test]
fn zero_with_and_without_may_trim_reads_back_zeroes() {
    let d = TempDir::new();
    let path = d.file("full", MIB, 0xff);
    let h = serve(&path).open(false, "", false).unwrap();
    h.zero(65536, 65536, Flags::MAY_TRIM).unwrap();
    h.zero(65536, 262144, Flags::FUA).unwrap();
    h.zero(100, 500_001, Flags::NONE).unwrap(); // unaligned
    assert_eq!(read(&*h, 65536, 65536), vec![0; 65536]);
    assert_eq!(read(&*h, 262144, 65536), vec![0; 65536]);
    assert_eq!(read(&*h, 500_001, 100), vec![0; 100]);
    assert_eq!(read(&*h, 0, 65536), vec![0xff; 65536], "bytes before are untouched");
    assert_eq!(read(&*h, 131072, 131072), vec![0xff; 131072], "bytes between are untouched");
    assert_eq!((read(&*h, 500_000, 1), read(&*h, 500_101, 1)), (vec![0xff], vec![0xff]));
    // MAY_TRIM punched a hole.
    assert_eq!(extents_of(&*h, 65536, 65536, Flags::NONE),
               vec![Extent { offset: 65536, length: 65536, typ: HOLE | ZERO }]);
}

#[test]
fn zero_falls_back_along_the_chain_then_reports_not_supported() {
    let d = TempDir::new();
    let p = serve(&d.file("full", MIB, 0xff));
    let h = p.open_handle(false, "").unwrap();
    // Without ZERO_RANGE: punch a hole and allocate it again.
    h.memo.zero_range.disable();
    h.zero(8192, 8192, Flags::NONE).unwrap();
    assert_eq!(read(&h, 8192, 8192), vec![0; 8192]);
    assert_eq!(extents_of(&h, 8192, 8192, Flags::NONE)[0].typ & HOLE, 0, "re-allocated, not a hole");
    // Nothing left (a regular file has no BLKZEROOUT): the checking layer must write.
    h.memo.fallocate.disable();
    let e = err_of(h.zero(8192, 16384, Flags::NONE));
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert_eq!(read(&h, 16384, 8192), vec![0xff; 8192], "nothing was zeroed");
    // MAY_TRIM still punches.
    h.zero(8192, 16384, Flags::MAY_TRIM).unwrap();
    assert_eq!(read(&h, 16384, 8192), vec![0; 8192]);
}

#[test]
fn trim_punches_a_hole_and_is_quietly_advisory_when_impossible() {
    let d = TempDir::new();
    let p = serve(&d.file("full", MIB, 0xff));
    let h = p.open_handle(false, "").unwrap();
    h.trim(131072, 131072, Flags::FUA).unwrap();
    assert_eq!(extents_of(&h, 131072, 131072, Flags::NONE),
               vec![Extent { offset: 131072, length: 131072, typ: HOLE | ZERO }]);
    assert_eq!(read(&h, 131072, 131072), vec![0; 131072]);
    assert_eq!(read(&h, 0, 131072), vec![0xff; 131072]);
    h.memo.punch_hole.disable();
    h.trim(4096, 0, Flags::NONE).unwrap();
    assert_eq!(read(&h, 0, 4096), vec![0xff; 4096], "no method left: success without trimming");
}

#[test]
fn pread_past_the_end_is_an_error_not_a_short_read() {
    let d = TempDir::new();
    let path = d.file("short", 1000, 7);
    let h = serve(&path).open(false, "", false).unwrap();
    let e = err_of(h.pread(&mut [0; 512], 800, Flags::NONE));
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(e.message(), format!("pread: {}: unexpected end of file", path.display()));
}

#[test]
fn dir_lists_files_and_serves_them_by_export_name() {
    let d = TempDir::new();
    d.file("a", 512, 1);
    d.file("b", 1024, 2);
    fs::create_dir(d.path("sub")).unwrap();
    std::os::unix::fs::symlink("a", d.path("link-to-a")).unwrap();
    std::os::unix::fs::symlink("sub", d.path("link-to-sub")).unwrap();
    std::os::unix::fs::symlink("nowhere", d.path("dangling")).unwrap();
    let p = configured(&[("dir", d.0.to_str().unwrap())]).unwrap();
    let mut names: Vec<String> = p.list_exports(false, false).unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "link-to-a"]);

    let h = p.open(false, "b", false).unwrap();
    assert_eq!((h.size().unwrap(), read(&*h, 0, 4)), (1024, vec![2; 4]));
    assert_eq!(p.open(false, "link-to-a", false).unwrap().size().unwrap(), 512);

    let e = err_of(p.open(false, "", false));
    assert_eq!((e.kind(), e.message()), (ErrorKind::NotFound, "open: cannot use empty file name or export name (\"\")"));
    let e = err_of(p.open(false, "sub/x", false));
    assert_eq!((e.kind(), e.message()), (ErrorKind::Invalid, "sub/x: exportname cannot contain /"));
    let e = err_of(p.open(false, "missing", false));
    assert_eq!((e.kind(), e.message()), (ErrorKind::NotFound, "open: missing: No such file or directory"));
    let e = err_of(p.open(false, "sub", false));
    assert_eq!(e.message(), "file is not regular or block device: sub");
}

#[test]
fn dirfd_serves_an_inherited_directory() {
    let d = TempDir::new();
    d.file("only", 4096, 3);
    let dir = File::open(&d.0).unwrap();
    let p = configured(&[("dirfd", &dir.as_raw_fd().to_string())]).unwrap();
    let names: Vec<String> = p.list_exports(false, false).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["only"]);
    // Listing twice works: the dup'd stream is rewound.
    assert_eq!(p.list_exports(false, false).unwrap().len(), 1);
    assert_eq!(read(&*p.open(false, "only", false).unwrap(), 0, 2), [3, 3]);
}

#[test]
fn fd_is_duplicated_per_open_and_its_access_mode_is_honoured() {
    let d = TempDir::new();
    let path = d.file("disk", 65536, 9);
    let rw = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let p = configured(&[("fd", &rw.as_raw_fd().to_string())]).unwrap();
    let (h1, h2) = (p.open(false, "x", false).unwrap(), p.open(false, "y", false).unwrap());
    assert!(h1.caps().unwrap().write);
    h1.pwrite(&[1, 2, 3], 10, Flags::NONE).unwrap();
    drop(h1); // closes only its duplicate
    assert_eq!(read(&*h2, 9, 5), [9, 1, 2, 3, 9]);
    assert_eq!(h2.size().unwrap(), 65536);

    let ro = File::open(&path).unwrap();
    let p = configured(&[("fd", &ro.as_raw_fd().to_string())]).unwrap();
    assert!(!p.open(false, "", false).unwrap().caps().unwrap().write, "O_RDONLY fd cannot be written");

    let e = err_of(configured(&[("fd", "2")]));
    assert!(e.message().starts_with("file descriptor must be > 2"), "{}", e.message());
    assert!(configured(&[("fd", "x")]).is_err());
    assert!(configured(&[("dirfd", "0")]).is_err());
}

#[test]
fn cache_none_keeps_a_bounded_fifo_of_live_windows() {
    let d = TempDir::new();
    let path = d.file("disk", MIB, 0);
    let p = configured(&[("file", path.to_str().unwrap()), ("cache", "none"), ("fadvise", "sequential")]).unwrap();
    let h = p.open(false, "", false).unwrap();
    for i in 0..(NR_WINDOWS as u64 + 3) {
        h.pwrite(&[i as u8; 4096], i * 4096, Flags::NONE).unwrap();
    }
    assert_eq!(p.windows.len(), NR_WINDOWS);
    assert_eq!(read(&*h, 4096 * 10, 4096), vec![10; 4096]);
    drop(h);
    assert_eq!(p.windows.live(), 0, "a closed handle's windows are dead");
    // Evicting dead windows is harmless.
    let h = p.open(false, "", false).unwrap();
    h.pwrite(&[0xee; 512], 0, Flags::NONE).unwrap();
    assert_eq!((p.windows.live(), read(&*h, 0, 512)), (1, vec![0xee; 512]));
}

#[test]
fn bad_parameters_are_rejected_with_nbdkits_messages() {
    let d = TempDir::new();
    let f = d.file("f", 512, 1);
    let (fs_, ds) = (f.to_str().unwrap(), d.0.to_str().unwrap());
    let msg = |params: &[(&str, &str)]| err_of(configured(params)).message().to_string();
    let once = "file|dir|fd|dirfd parameter can only appear once";
    assert_eq!(msg(&[("file", fs_), ("dir", ds)]), once);
    assert_eq!(msg(&[("dir", ds), ("fd", "5")]), once);
    assert_eq!(msg(&[("fd", "5"), ("file", fs_)]), once);
    assert!(msg(&[]).starts_with("you must supply either [file=]<FILENAME>, dir=<DIRNAME>"));
    assert_eq!(msg(&[("file", fs_), ("cache", "sometimes")]), "unknown cache mode: sometimes");
    assert_eq!(msg(&[("file", fs_), ("fadvise", "often")]), "unknown fadvise mode: often");
    assert_eq!(msg(&[("rdelay", "1")]), "add --filter=delay on the command line");
    assert_eq!(msg(&[("wdelay", "1")]), "add --filter=delay on the command line");
    assert_eq!(msg(&[("file", ds)]), format!("use dir= to serve files within {ds}"));
    assert_eq!(msg(&[("file", "/dev/null")]), "file is not regular or block device: /dev/null");
    assert_eq!(msg(&[("dir", fs_)]), format!("expecting a directory: {fs_}"));
    let missing = d.path("missing");
    let e = err_of(configured(&[("file", missing.to_str().unwrap())]));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.message(), format!("realpath: {}: No such file or directory", missing.display()));
    assert_eq!(FilePlugin::default().config("size", "1M").unwrap(), Param::NotMine);
}

#[test]
fn relative_paths_become_absolute_at_config_time() {
    // cargo runs unit tests in the package root.
    let p = configured(&[("file", "Cargo.toml")]).unwrap();
    match &p.source {
        Some(Source::File(path)) => {
            assert!(path.is_absolute());
            assert_eq!(path, &fs::canonicalize("Cargo.toml").unwrap());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn block_size_follows_blkiomin_blkioopt_rules() {
    let bs = |min, preferred| Some(BlockSize { min, preferred, max: u32::MAX });
    assert_eq!(block_size_from_io(512, 0), bs(512, 4096), "opt 0 guesses max(min, 4096)");
    assert_eq!(block_size_from_io(8192, 0), bs(8192, 8192));
    assert_eq!(block_size_from_io(4096, 65536), bs(4096, 65536));
    assert_eq!(block_size_from_io(0, 0), None);
    assert_eq!(block_size_from_io(256, 4096), None, "min below 512");
    assert_eq!(block_size_from_io(1536, 4096), None, "min not a power of 2");
    assert_eq!(block_size_from_io(4096, 2048), None, "opt below min");
    assert_eq!(block_size_from_io(512, 3072), None, "opt not a power of 2");
    assert_eq!(block_size_from_io(512, 64 << 20), None, "preferred above 32 MiB");
}

#[test]
fn registration_and_dump_plugin_match_nbdkit_1_44() {
    let e = crate::backend::registry::plugin("file").expect("file plugin registered");
    assert_eq!((e.longname, e.magic_key, e.api_version), ("nbdkit file plugin", Some("file"), 2));
    // The 1.33 list plus block_size and is_rotational, in dump order.
    assert_eq!(e.has, ["longname", "unload", "dump_plugin", "config", "config_complete", "config_help",
                       "list_exports", "open", "close", "get_size", "block_size", "can_write",
                       "is_rotational", "can_trim", "can_extents", "can_fua", "can_multi_conn", "can_cache",
                       "pread", "pwrite", "flush", "trim", "zero", "extents", "cache"]);
    let lines = (e.new)().dump_plugin();
    assert_eq!(lines.first().map(String::as_str), Some("file_block_size=yes"));
    assert_eq!(lines.last().map(String::as_str), Some("file_falloc_fl_zero_range=yes"));
    assert!(lines.iter().any(|l| l == "file_extents=yes"));
    assert_eq!(lines.len(), 8);
}

#[test]
fn cached_reads_come_back_without_waiting_and_others_say_so() {
    let d = TempDir::new();
    let path = d.file("disk", MIB, 0);
    let h = serve(&path).open(false, "", false).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    // Just written: in the page cache.
    h.pwrite(&data, 12288, Flags::NONE).unwrap();
    let mut buf = vec![0x55; data.len()];
    assert!(matches!(h.pread_nowait(&mut buf, 12288), Some(Ok(()))));
    assert_eq!(buf, data);
    // Past the end of the file: a short read, left to `pread` (which
    // reports it).
    let mut buf = vec![0; 8192];
    assert!(h.pread_nowait(&mut buf, MIB - 4096).is_none());
    // cache=none evicts what it reads: never the fast path.
    let p = configured(&[("file", path.to_str().unwrap()), ("cache", "none")]).unwrap();
    let h = p.open(false, "", false).unwrap();
    let mut buf = vec![0; 4096];
    assert!(h.pread_nowait(&mut buf, 12288).is_none());
    assert_eq!(read(&*h, 12288, 4096), data[..4096]);
}

#[test]
fn writes_are_brief_unless_cache_is_none() {
    let d = TempDir::new();
    let path = d.file("disk", MIB, 0);
    let h = serve(&path).open(false, "", false).unwrap();
    assert!(h.blocks() && h.brief());
    let p = configured(&[("file", path.to_str().unwrap()), ("cache", "none")]).unwrap();
    let h = p.open(false, "", false).unwrap();
    assert!(h.blocks() && !h.brief());
}

#[test]
fn the_file_is_lent_for_sendfile_while_it_holds_the_range() {
    let d = TempDir::new();
    let path = d.file("disk", MIB, 0);
    let h = serve(&path).open(false, "", false).unwrap();
    let data = vec![0x5a; 256 * 1024];
    h.pwrite(&data, 0, Flags::NONE).unwrap();
    // Just written: in the page cache, so also when only cached will do.
    let (fd, off) = h.pread_fd(data.len(), 0, true).expect("a cached range");
    assert_eq!(off, 0);
    let mut buf = vec![0; data.len()];
    let f = std::mem::ManuallyDrop::new(unsafe_file(fd));
    std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, off).unwrap();
    assert_eq!(buf, data);
    assert!(h.pread_fd(4096, MIB - 4096, false).is_some());
    // The file shrinks: the range past its end is not lent (`pread`
    // reports the error), the rest still is.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(MIB / 2).unwrap();
    assert!(h.pread_fd(4096, MIB - 4096, false).is_none());
    assert!(h.pread_fd(8192, MIB / 2 - 4096, false).is_none());
    assert!(h.pread_fd(4096, 0, false).is_some());
    // cache=none reads evict what they read: never lent.
    let p = configured(&[("file", path.to_str().unwrap()), ("cache", "none")]).unwrap();
    let h = p.open(false, "", false).unwrap();
    assert!(h.pread_fd(4096, 0, false).is_none());
}

/// A `File` over a descriptor owned elsewhere (never dropped).
#[allow(unsafe_code)]
fn unsafe_file(fd: std::os::fd::RawFd) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller wraps it in ManuallyDrop; the handle owns `fd`.
    unsafe { std::fs::File::from_raw_fd(fd) }
}
