use super::*;

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tmp(tag: &str) -> Tmp {
    let d = std::env::temp_dir().join(format!("floppy-unit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Tmp(d)
}

fn ready(dir: &std::path::Path, extra: &[(&str, &str)]) -> std::result::Result<Floppy, String> {
    ready_(dir, extra).map_err(|e| e.message().to_string())
}

fn ready_(dir: &std::path::Path, extra: &[(&str, &str)]) -> Result<Floppy> {
    let mut p = Floppy::default();
    p.config("dir", dir.to_str().unwrap())?;
    for (k, v) in extra {
        p.config(k, v)?;
    }
    p.config_complete()?;
    p.get_ready()?;
    Ok(p)
}

/// The bytes of the first cluster of host file `i` on the disk.
fn file_offset(p: &Floppy, i: usize) -> u64 {
    let l = &p.disk.as_ref().unwrap().layout;
    let c = u64::from(l.file_clusters[i]);
    (l.geometry.data_start() + (c - 2) * layout::SECTORS_PER_CLUSTER) * layout::SECTOR
}

#[test]
fn file_bytes_then_zero_padding() {
    let t = tmp("bytes");
    std::fs::write(t.0.join("a"), b"hello").unwrap();
    let p = ready(&t.0, &[]).unwrap();
    let h = p.open(true, "", false).unwrap();
    let mut buf = [0xaau8; 8];
    h.pread(&mut buf, file_offset(&p, 0), Flags::NONE).unwrap();
    assert_eq!(&buf, b"hello\0\0\0");
    let mut mbr = [0u8; 512];
    h.pread(&mut mbr, 0, Flags::NONE).unwrap();
    assert_eq!(&mbr[510..], [0x55, 0xaa]);
    // One read across every region of the disk.
    let mut all = vec![0u8; h.size().unwrap() as usize];
    h.pread(&mut all, 0, Flags::NONE).unwrap();
    let o = file_offset(&p, 0) as usize;
    assert_eq!(&all[o..o + 5], b"hello");
}

#[test]
fn shrunk_or_grown_file_is_eio_never_other_bytes() {
    let t = tmp("shrink");
    std::fs::write(t.0.join("a"), vec![1u8; 20000]).unwrap();
    std::fs::write(t.0.join("b"), vec![2u8; 20000]).unwrap();
    let p = ready(&t.0, &[]).unwrap();
    let h = p.open(true, "", false).unwrap();
    let mut buf = vec![0u8; 4096];
    h.pread(&mut buf, file_offset(&p, 0) + 16384, Flags::NONE).unwrap();
    assert!(buf[..20000 - 16384].iter().all(|&b| b == 1));
    std::fs::OpenOptions::new().write(true).open(t.0.join("a")).unwrap().set_len(100).unwrap();
    let e = h.pread(&mut buf, file_offset(&p, 0), Flags::NONE).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Io);
    assert!(e.message().contains("changed size"), "{}", e.message());
    std::fs::write(t.0.join("b"), vec![3u8; 30000]).unwrap();
    assert_eq!(h.pread(&mut buf, file_offset(&p, 1), Flags::NONE).unwrap_err().kind(), crate::error::ErrorKind::Io);
}

/// Reads that end near a file's end check its size by reading to the end
/// and one byte more (no fstat), others by fstat: a grown or shrunk file
/// gives EIO either way, on both paths, also for a size at a page
/// boundary, where a short non-blocking read cannot tell the end of the
/// file from a page not in the cache.
#[test]
fn reads_to_the_end_see_growth_and_shrinking() {
    let t = tmp("toend");
    // f4 and f5: a first byte within TAIL_MAX of the end (and just at it).
    let sizes = [5000usize, 8192, 16384, 1, 3000, TAIL_MAX as usize + 1];
    for (k, &n) in sizes.iter().enumerate() {
        std::fs::write(t.0.join(format!("f{k}")), vec![k as u8 + 1; n]).unwrap();
    }
    let p = ready(&t.0, &[]).unwrap();
    let h = p.open(true, "", false).unwrap();
    let cluster = layout::CLUSTER as usize;
    for (k, &n) in sizes.iter().enumerate() {
        let at = file_offset(&p, k);
        // Intact: the file's bytes, then zeroes, on both paths; the last
        // bytes alone too.
        let mut buf = vec![0xaau8; cluster];
        h.pread(&mut buf, at, Flags::NONE).unwrap();
        assert!(buf[..n].iter().all(|&b| b == k as u8 + 1) && buf[n..].iter().all(|&b| b == 0), "file {k}");
        let mut again = vec![0xaau8; cluster];
        if let Some(r) = h.pread_nowait(&mut again, at) {
            r.unwrap();
            assert_eq!(buf, again);
        }
        for o in [0, n as u64 / 2, n as u64 - 1] {
            let mut one = [0u8; 1];
            h.pread(&mut one, at + o, Flags::NONE).unwrap();
            assert_eq!(one[0], k as u8 + 1);
            if let Some(r) = h.pread_nowait(&mut one, at + o) {
                r.unwrap();
                assert_eq!(one[0], k as u8 + 1);
            }
        }
    }
    // Grow f0 and f1 (f1 by a whole page), shrink f2 and f3 (f3 to empty).
    let grow = |k: usize, by: usize| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(t.0.join(format!("f{k}"))).unwrap();
        f.write_all(&vec![9u8; by]).unwrap();
    };
    grow(0, 1);
    grow(1, 4096);
    std::fs::OpenOptions::new().write(true).open(t.0.join("f2")).unwrap().set_len(16383).unwrap();
    std::fs::OpenOptions::new().write(true).open(t.0.join("f3")).unwrap().set_len(0).unwrap();
    grow(4, 1);
    std::fs::OpenOptions::new().write(true).open(t.0.join("f5")).unwrap().set_len(TAIL_MAX).unwrap();
    for (k, &n) in sizes.iter().enumerate() {
        let at = file_offset(&p, k);
        let mut buf = vec![0u8; cluster];
        let e = h.pread(&mut buf, at, Flags::NONE).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Io, "file {k}");
        assert!(e.message().contains("changed size"), "{}", e.message());
        for o in [0, n as u64 / 2, n as u64 - 1] {
            let e = h.pread(&mut buf[..1], at + o, Flags::NONE).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Io, "file {k} offset {o}");
            assert!(!matches!(h.pread_nowait(&mut buf[..1], at + o), Some(Ok(()))), "file {k} offset {o}");
        }
        // The non-blocking path reports it too, or leaves it to pread.
        assert!(!matches!(h.pread_nowait(&mut buf, at), Some(Ok(()))), "file {k}");
    }
}

#[test]
fn config_errors() {
    let t = tmp("cfg");
    let mut p = Floppy::default();
    assert!(p.config_complete().unwrap_err().message().contains("dir=<DIRECTORY>"));
    p.config("dir", t.0.to_str().unwrap()).unwrap();
    assert!(p.config("dir", t.0.to_str().unwrap()).unwrap_err().message().contains("only be set once"));
    assert!(ready(&t.0, &[("size", "1M")]).err().unwrap().contains("larger than \"size\""));
    assert!(ready(&t.0, &[("size", "2M")]).is_ok());
}

#[test]
fn nowait_reads_metadata_and_cached_files_only() {
    let t = tmp("nowait");
    std::fs::write(t.0.join("a"), vec![7u8; 5000]).unwrap();
    let p = ready(&t.0, &[]).unwrap();
    let h = p.open(true, "", false).unwrap();
    let mut mbr = [0u8; 512];
    assert!(h.pread_nowait(&mut mbr, 0).unwrap().is_ok());
    assert_eq!(&mbr[510..], [0x55, 0xaa]);
    let at = file_offset(&p, 0);
    let mut buf = [0u8; 6000];
    h.pread(&mut buf, at, Flags::NONE).unwrap();
    let mut again = [1u8; 6000];
    // Open and just read, so cached (a kernel without RWF_NOWAIT says None).
    if let Some(r) = h.pread_nowait(&mut again, at) {
        r.unwrap();
        assert_eq!(buf, again);
        assert!(again[..5000].iter().all(|&b| b == 7) && again[5000..].iter().all(|&b| b == 0));
    }
    std::fs::write(t.0.join("a"), vec![7u8; 10]).unwrap();
    assert!(matches!(h.pread_nowait(&mut again, at), Some(Err(_))));
}

#[test]
fn deleted_file_is_eio() {
    let t = tmp("deleted");
    std::fs::write(t.0.join("a"), b"x").unwrap();
    let p = ready(&t.0, &[]).unwrap();
    let h = p.open(true, "", false).unwrap();
    std::fs::remove_file(t.0.join("a")).unwrap();
    // Not opened yet (no after_fork here): the read opens it, and fails.
    let e = h.pread(&mut [0u8; 1], file_offset(&p, 0), Flags::NONE).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::Io);
    assert!(e.message().starts_with("open: "), "{}", e.message());
}
