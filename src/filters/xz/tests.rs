//! The filter on real `.xz` files made by the `xz` tool, behind an
//! in-memory layer: random reads against the source, extents against the
//! source's zero runs, hostile files, concurrency.

use std::io::Write;
use std::process::{Command, Stdio};

use super::*;
use crate::filters::testutil::MemNext;

/// Compresses `data` with `xz ARGS`.
pub(crate) fn xz(data: &[u8], args: &[&str]) -> Vec<u8> {
    let mut child = Command::new("xz")
        .args(["-c", "-0"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the xz tool is needed");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// An image with zero runs, random runs and text runs, not aligned to anything.
pub(crate) fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let n = (rnd() % 20000) as usize + 1;
        match rnd() % 3 {
            0 => v.extend(std::iter::repeat_n(0u8, n)),
            1 => v.extend((0..n).map(|_| rnd() as u8)),
            _ => v.extend(b"nbdkit xz filter ".iter().cycle().take(n)),
        }
    }
    v.truncate(size);
    v
}

fn open_with(file: Vec<u8>, export: &str, f: &Xz) -> Result<Box<dyn Handle>> {
    let next = MemNext::new(0);
    next.state.lock().unwrap().data = file;
    f.open(&next, false, export, false)
}

fn open(file: Vec<u8>, export: &str) -> Box<dyn Handle> {
    open_with(file, export, &Xz::default()).unwrap()
}

fn read(h: &dyn Handle, off: u64, n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0xee; n];
    h.pread(&mut b, off, Flags::NONE)?;
    Ok(b)
}

/// Reads the whole image in odd-sized pieces and a few random ranges.
fn check_reads(h: &dyn Handle, src: &[u8]) {
    assert_eq!(h.size().unwrap(), src.len() as u64);
    let mut off = 0;
    while off < src.len() {
        let n = 77_777.min(src.len() - off);
        assert!(read(h, off as u64, n).unwrap() == src[off..off + n], "mismatch at {off}");
        off += n;
    }
    let mut s = 12345u64;
    for _ in 0..50 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (s >> 20) as usize % src.len();
        let n = ((s >> 5) as usize % 200_000).min(src.len() - off);
        assert!(read(h, off as u64, n).unwrap() == src[off..off + n], "mismatch at {off}+{n}");
    }
}

#[test]
fn single_and_multi_block_files_read_back() {
    let src = image(1 << 20, 1);
    check_reads(&*open(xz(&src, &[]), "single"), &src);
    check_reads(&*open(xz(&src, &["--block-size=100000"]), "multi"), &src);
    check_reads(&*open(xz(&src, &["-T2", "--block-size=65536"]), "multi-t2"), &src);
}

#[test]
fn every_check_type_reads_back() {
    let src = image(300_000, 2);
    for check in ["none", "crc32", "crc64", "sha256"] {
        let f = xz(&src, &[&format!("--check={check}"), "--block-size=50000"]);
        check_reads(&*open(f, check), &src);
    }
}

#[test]
fn concatenated_streams_with_padding_read_back() {
    let a = image(200_000, 3);
    let b = image(150_001, 4);
    let mut file = xz(&a, &["--block-size=40000"]);
    file.extend([0; 8]);
    file.extend(xz(&b, &["--check=sha256"]));
    file.extend(xz(&[], &[]));
    file.extend([0; 4]);
    let h = open(file, "concat");
    let mut src = a.clone();
    src.extend(&b);
    check_reads(&*h, &src);
}

#[test]
fn extents_report_the_zero_runs_of_the_data() {
    let mut src = image(700_000, 5);
    src.extend(vec![0; 300_000]); // an all-zero block at the end
    let h = open(xz(&src, &["--block-size=100000"]), "extents");
    assert!(h.caps().unwrap().extents);
    // Walk the whole image as a client would.
    let mut off = 0;
    let mut got = Vec::new();
    while off < src.len() as u64 {
        let mut e = Extents::new(off, src.len() as u64);
        h.extents(src.len() as u64 - off, off, Flags::NONE, &mut e).unwrap();
        assert!(e.count() > 0);
        for x in e.list() {
            got.push(*x);
        }
        off = e.covered_to();
    }
    for x in &got {
        let bytes = &src[x.offset as usize..(x.offset + x.length) as usize];
        if x.typ == HOLE | ZERO {
            assert!(bytes.iter().all(|&b| b == 0), "hole with data at {}", x.offset);
        } else {
            assert_eq!(x.typ, 0);
        }
    }
    // Zero runs of 64 KiB and more inside a block are reported.
    let zero_bytes: u64 = got.iter().filter(|x| x.typ != 0).map(|x| x.length).sum();
    assert!(zero_bytes >= 300_000, "only {zero_bytes} zero bytes reported");
    // REQ_ONE gives a single extent.
    let mut e = Extents::new(0, src.len() as u64);
    h.extents(src.len() as u64, 0, Flags::REQ_ONE, &mut e).unwrap();
    assert_eq!(e.count(), 1);
    // Reads still match after the maps exist (zero runs skip decompression).
    check_reads(&*h, &src);
}

#[test]
fn max_block_and_max_depth() {
    let src = image(200_000, 6);
    let mut f = Xz::default();
    f.config("xz-max-block", "100000").unwrap();
    let e = open_with(xz(&src, &[]), "maxblock", &f).err().unwrap();
    assert_eq!(
        e.message(),
        "xz file largest block is bigger than xz-max-block\n\
         Either recompress the xz file with smaller blocks (see nbdkit-xz-filter(1))\n\
         or make xz-max-block parameter bigger.\n\
         Current xz-max-block = 100000 (bytes)\n\
         Largest block in xz file = 200000 (bytes)"
    );
    assert!(open_with(xz(&src, &["--block-size=100000"]), "maxblock-ok", &f).is_ok());
    assert_eq!(f.config("xz-max-depth", "0").unwrap_err().message(), "'xz-max-depth' parameter must be >= 1");
    assert!(f.config("xz-max-depth", "x").is_err());
    assert!(f.config("xz-max-block", "-1").is_err());
    f.config("xz-max-depth", "1").unwrap();
    assert_eq!(f.depth, 1);
    assert_eq!(f.config("file", "x").unwrap(), Param::NotMine);
}

#[test]
fn corrupt_block_data_is_eio_and_other_blocks_still_read() {
    let src = image(400_000, 7);
    let mut file = xz(&src, &["--block-size=100000", "--check=crc64"]);
    // Flip a byte in the middle of the second block's data.
    let l = format::parse(file.len() as u64, &mut |b, o| {
        b.copy_from_slice(&file[o as usize..o as usize + b.len()]);
        Ok(())
    })
    .unwrap();
    let b1 = l.blocks[1];
    let mid = (b1.coffset + b1.unpadded / 2) as usize;
    file[mid] ^= 0x40;
    let h = open(file, "corrupt");
    let e = read(&*h, b1.uoffset + 10, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(read(&*h, 0, 1000).unwrap(), src[..1000]);
    assert_eq!(read(&*h, 300_000, 1000).unwrap(), src[300_000..301_000]);
    // And again (the failure is not cached as data).
    assert!(read(&*h, b1.uoffset, 1).is_err());
}

#[test]
fn truncated_and_garbled_files_fail_at_open() {
    let src = image(100_000, 8);
    let file = xz(&src, &[]);
    for bad in [
        file[..file.len() - 4].to_vec(),
        file[..8].to_vec(),
        file[..3].to_vec(),
        {
            let mut f = file.clone();
            f.extend([1, 0, 0, 0]);
            f
        },
        {
            let mut f = file.clone();
            let n = f.len();
            f[n - 20] ^= 1; // the index
            f
        },
    ] {
        assert!(open_with(bad, "trunc", &Xz::default()).is_err());
    }
}

#[test]
fn parallel_readers_and_read_ahead_agree_with_the_source() {
    let src = image(2 << 20, 9);
    let h: Arc<dyn Handle> = Arc::from(open(xz(&src, &["-T2", "--block-size=131072"]), "parallel"));
    let src = Arc::new(src);
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let h = h.clone();
            let src = src.clone();
            std::thread::spawn(move || {
                let mut off = t * 1000;
                while off + 65536 <= src.len() {
                    let got = read(&*h, off as u64, 65536).unwrap();
                    assert!(got == src[off..off + 65536]);
                    off += 65536 * 3 + 17;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut b = vec![0; 100];
    // A cached block is readable without waiting.
    h.pread(&mut b, 0, Flags::NONE).unwrap();
    assert!(matches!(h.pread_nowait(&mut b, 0), Some(Ok(()))));
}

#[test]
fn caps_and_description() {
    let src = image(10_000, 10);
    let h = open(xz(&src, &[]), "caps");
    let c = h.caps().unwrap();
    assert!(!c.write && c.extents && c.multi_conn && c.cache == Support::Native && !c.trim);
    assert_eq!(h.export_description(), None);
}

#[test]
fn the_cache_evicts_least_recently_used_blocks_within_its_budget() {
    let mut c = Cache { per_handle: 3000, handles: 1, ..Cache::default() };
    for i in 0..3 {
        c.insert((1, i), Arc::new(vec![i as u8; 1000]));
    }
    assert_eq!(c.bytes, 3000);
    // Read 1 then 0: 2 was never read, 1 is the least recently read.
    assert!(c.lookup((1, 1)).is_some() && c.lookup((1, 0)).is_some());
    c.insert((1, 3), Arc::new(vec![3; 1000]));
    assert_eq!(c.bytes, 3000);
    assert!(!c.slots.contains_key(&(1, 1)), "1 was the least recently read");
    c.insert((1, 4), Arc::new(vec![4; 1000]));
    assert!(!c.slots.contains_key(&(1, 0)), "blocks read go before those not read yet");
    c.insert((1, 5), Arc::new(vec![5; 1000]));
    assert!(!c.slots.contains_key(&(1, 2)), "then the least recently used");
    assert!(c.lookup((1, 0)).is_none() && c.lookup((1, 4)).is_some() && c.lookup((1, 3)).is_some());
    // Evicted buffers nobody holds are kept for reuse, by exact size.
    assert!(c.spare(1000).is_some() && c.spare(999).is_none());
    // A second connection doubles the budget; its close halves it again.
    c.handles = 2;
    for i in 4..7 {
        c.insert((2, i), Arc::new(vec![0; 1000]));
    }
    assert_eq!(c.bytes, 6000);
    c.handles = 1;
    c.trim(None);
    assert_eq!(c.bytes, 3000);
    assert!(c.lookup((2, 6)).is_some() && c.lookup((1, 5)).is_none());
    // A block bigger than the budget stays (it is being used) alone.
    c.insert((3, 0), Arc::new(vec![0; 5000]));
    assert_eq!(c.bytes, 5000);
    c.forget(3);
    assert_eq!(c.bytes, 0);
}

#[test]
fn zero_maps_find_zero_runs() {
    let mut d = vec![0u8; 5 * 4096 + 100];
    d[4096 + 7] = 1;
    d[5 * 4096 + 99] = 2;
    let z = ZeroMap::of(&d);
    assert!(!z.all_zero);
    assert!((0..6).all(|c| !z.hole(c)), "runs shorter than 64 KiB are no holes");
    let mut d2 = vec![0u8; 40 * 4096];
    d2[3 * 4096] = 1;
    d2[20 * 4096] = 1;
    let z2 = ZeroMap::of(&d2);
    assert_eq!((0..40).filter(|&c| z2.hole(c)).collect::<Vec<_>>(), (4..20).chain(21..40).collect::<Vec<_>>());
    assert_eq!((0..6).map(|c| z.zero(c)).collect::<Vec<_>>(), [true, false, true, true, true, false]);
    assert!(z.range_zero(0, 4096) && !z.range_zero(0, 4097) && z.range_zero(8192, 5 * 4096));
    assert!(ZeroMap::of(&[0; 10]).all_zero);
    assert!(is_zero(&[]) && is_zero(&[0]) && !is_zero(&[0, 0, 1]) && !is_zero(&[1, 0]));
}

#[test]
fn connections_share_decompressed_blocks_and_zero_maps() {
    let mut src = image(300_000, 11);
    src.extend(vec![0; 200_000]);
    let file = xz(&src, &["--block-size=100000"]);
    let a = open(file.clone(), "shared");
    let b = open(file.clone(), "shared");
    let mut buf = vec![0; 1000];
    assert!(b.pread_nowait(&mut buf, 150_000).is_none(), "nothing decompressed yet");
    a.pread(&mut buf, 150_000, Flags::NONE).unwrap();
    assert!(matches!(b.pread_nowait(&mut buf, 150_000), Some(Ok(()))), "the other connection's block is shared");
    assert_eq!(buf, src[150_000..151_000]);
    // A zero block decompressed by one connection reads as zero on the
    // other without decompression (its zero map is shared).
    a.pread(&mut buf, 450_000, Flags::NONE).unwrap();
    assert!(matches!(b.pread_nowait(&mut buf, 450_000), Some(Ok(()))));
    assert!(buf.iter().all(|&x| x == 0));
    // Another export name is another image.
    let c = open(file, "other");
    assert!(c.pread_nowait(&mut buf, 150_000).is_none());
}
