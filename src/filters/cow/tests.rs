//! Unit and model tests of the cow filter over an in-memory plugin.

use super::*;
use crate::backend::Extent;
use crate::filters::testutil::MemNext;
use proptest::prelude::*;

fn cow(args: &[(&str, &str)]) -> Cow {
    let mut f = Cow::default();
    for (k, v) in args {
        assert_eq!(f.config(k, v).unwrap(), Param::Used);
    }
    f.config_complete().unwrap();
    f
}

/// A plugin disk of `size` bytes where byte i is `i % 251`.
fn plugin(size: usize) -> MemNext {
    let next = MemNext::new(size);
    for (i, b) in next.state.lock().unwrap().data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    next
}

fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

fn read(h: &dyn Handle, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xee; len];
    h.pread(&mut b, off, Flags::NONE).unwrap();
    b
}

#[test]
fn config_messages() {
    let mut f = Cow::default();
    for v in ["1000", "5000", "8G"] {
        assert_eq!(f.config("cow-block-size", v).unwrap_err().message(),
                   "cow-block-size is out of range (4096..2G) or not a power of 2");
    }
    assert!(f.config("cow-block-size", "x").is_err());
    assert!(f.config("cow-on-read", "maybe").is_err());
    assert!(f.config("cow-on-cache", "maybe").is_err());
    f.config("cow-block-size", "4k").unwrap();
    f.config("cow-on-read", "/some/path").unwrap();
    assert_eq!(f.cfg.on_read, OnRead::WhilePath("/some/path".into()));
    f.config("cow-on-read", "true").unwrap();
    assert_eq!(f.cfg.on_read, OnRead::Always);
    assert_eq!(f.cfg.bs, 4096);
    assert_eq!(f.config("file", "x").unwrap(), Param::NotMine);
}

#[test]
fn writes_go_to_the_overlay_and_never_to_the_plugin() {
    let size = 3 * 4096 + 1000;
    let next = plugin(size);
    let h = cow(&[("cow-block-size", "4096")]).open(&next, false, "", false).unwrap();
    assert_eq!(next.opened_readonly(), [true]);
    assert_eq!(h.size().unwrap(), size as u64);
    let caps = h.caps().unwrap();
    assert!(caps.write && caps.trim && caps.fast_zero && caps.multi_conn && caps.zero == Support::Native);
    let mut model = pattern(size);
    h.pwrite(&[1; 100], 4000, Flags::FUA).unwrap(); // straddles two blocks
    model[4000..4100].fill(1);
    h.pwrite(&[2; 4096], 8192, Flags::NONE).unwrap(); // a whole block
    model[8192..12288].fill(2);
    h.zero(10, 12290, Flags::NONE).unwrap(); // in the short last block
    model[12290..12300].fill(0);
    h.trim(4096 + 5, 4096 - 5, Flags::NONE).unwrap(); // partial at the head
    model[4091..8192].fill(0);
    h.flush(Flags::NONE).unwrap();
    assert_eq!(read(&*h, 0, size), model);
    assert_eq!(next.state.lock().unwrap().data, pattern(size));
    assert!(next.calls().iter().all(|c| *c == "pread"), "{:?}", next.calls());
    let e = h.zero(4096, 0, Flags::FAST_ZERO).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
}

#[test]
fn extents_merge_overlay_and_plugin() {
    let next = plugin(8 * 4096);
    let h = cow(&[("cow-block-size", "4096")]).open(&next, false, "", false).unwrap();
    h.pwrite(&[1; 10], 4096 + 10, Flags::NONE).unwrap();
    h.trim(2 * 4096, 4 * 4096, Flags::NONE).unwrap();
    let mut e = Extents::new(100, 8 * 4096);
    h.extents(8 * 4096 - 100, 100, Flags::NONE, &mut e).unwrap();
    assert_eq!(e.list(), &[
        Extent { offset: 100, length: 4 * 4096 - 100, typ: 0 },
        Extent { offset: 4 * 4096, length: 2 * 4096, typ: HOLE | ZERO },
        Extent { offset: 6 * 4096, length: 2 * 4096, typ: 0 },
    ]);
    let mut e = Extents::new(4 * 4096 + 1, 8 * 4096);
    h.extents(100, 4 * 4096 + 1, Flags::REQ_ONE, &mut e).unwrap();
    assert_eq!(e.list(), &[Extent { offset: 4 * 4096 + 1, length: 4096 - 1, typ: HOLE | ZERO }]);
    // A partial trim is a read-modify-write: data.
    h.trim(100, 7 * 4096, Flags::NONE).unwrap();
    let mut e = Extents::new(7 * 4096, 8 * 4096);
    h.extents(4096, 7 * 4096, Flags::NONE, &mut e).unwrap();
    assert_eq!(e.list(), &[Extent { offset: 7 * 4096, length: 4096, typ: 0 }]);
}

#[test]
fn copy_on_read_and_on_cache() {
    let next = plugin(4 * 4096);
    let h = cow(&[("cow-block-size", "4096"), ("cow-on-read", "true")]).open(&next, false, "", false).unwrap();
    assert_eq!(read(&*h, 100, 5000), pattern(4 * 4096)[100..5100]);
    // Blocks 0 and 1 are now in the overlay: a change below is not seen.
    next.state.lock().unwrap().data.fill(9);
    assert_eq!(read(&*h, 0, 8192), pattern(8192));
    assert_eq!(read(&*h, 8192, 10), [9; 10]);

    let next = plugin(4 * 4096);
    let h = cow(&[("cow-block-size", "4096"), ("cow-on-cache", "1")]).open(&next, false, "", false).unwrap();
    h.cache(1, 3 * 4096, Flags::NONE).unwrap();
    next.state.lock().unwrap().data.fill(9);
    assert_eq!(read(&*h, 3 * 4096, 4096), pattern(4 * 4096)[3 * 4096..]);
    assert_eq!(read(&*h, 0, 10), [9; 10]);

    // Without cow-on-cache, cache passes down.
    let next = plugin(4 * 4096);
    let h = cow(&[("cow-block-size", "4096")]).open(&next, false, "", false).unwrap();
    h.cache(10, 10, Flags::NONE).unwrap();
    assert_eq!(next.calls().last(), Some(&"cache"));
}

#[test]
fn cow_on_read_follows_a_path() {
    let path = std::env::temp_dir().join(format!("cow-on-read-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let next = plugin(2 * 4096);
    let h = cow(&[("cow-block-size", "4096"), ("cow-on-read", path.to_str().unwrap())]).open(&next, false, "", false).unwrap();
    read(&*h, 0, 10);
    std::fs::write(&path, "").unwrap();
    read(&*h, 4096, 10);
    std::fs::remove_file(&path).unwrap();
    next.state.lock().unwrap().data.fill(9);
    assert_eq!(read(&*h, 0, 1), [9]);
    assert_eq!(read(&*h, 4096, 1), pattern(4097)[4096..]);
}

#[test]
fn one_overlay_per_export() {
    let next = plugin(4 * 4096);
    let f = cow(&[]);
    let a = f.open(&next, false, "a", false).unwrap();
    let b = f.open(&next, false, "b", false).unwrap();
    a.pwrite(&[7; 10], 0, Flags::NONE).unwrap();
    assert_eq!(read(&*b, 0, 10), pattern(10));
    let a2 = f.open(&next, false, "a", false).unwrap();
    assert_eq!(read(&*a2, 0, 10), [7; 10]);
}

#[test]
fn block_size_advertised() {
    let mut next = plugin(4096);
    let h = cow(&[]).open(&next, false, "", false).unwrap();
    assert_eq!(h.block_size().unwrap(), Some(BlockSize { min: 1, preferred: 65536, max: u32::MAX }));
    next.block_size = Some(BlockSize { min: 512, preferred: 4096, max: 1 << 20 });
    let h = cow(&[]).open(&next, false, "", false).unwrap();
    assert_eq!(h.block_size().unwrap(), Some(BlockSize { min: 512, preferred: 65536, max: 1 << 20 }));
    next.block_size = Some(BlockSize { min: 512, preferred: 4096, max: 32768 });
    let h = cow(&[]).open(&next, false, "", false).unwrap();
    assert_eq!(h.block_size().unwrap(), Some(BlockSize { min: 512, preferred: 4096, max: 32768 }));
}

/// P14: many threads writing disjoint pieces of the same few blocks at
/// once, mostly partial blocks: every piece must survive (no lost update
/// in the read-modify-writes).
#[test]
fn concurrent_writers_to_the_same_blocks() {
    let size = 4 * 4096 + 77;
    let next = plugin(size);
    let f = cow(&[("cow-block-size", "4096")]);
    let h: Vec<Box<dyn Handle>> = (0..4).map(|_| f.open(&next, false, "", false).unwrap()).collect();
    let piece = 61;
    std::thread::scope(|s| {
        for t in 0..8usize {
            let h = &h[t % 4];
            s.spawn(move || {
                let mut i = t;
                while i * piece < size {
                    let len = piece.min(size - i * piece);
                    h.pwrite(&vec![t as u8 + 1; len], (i * piece) as u64, Flags::NONE).unwrap();
                    i += 8;
                }
            });
        }
    });
    let got = read(&*h[0], 0, size);
    for (i, chunk) in got.chunks(piece).enumerate() {
        assert!(chunk.iter().all(|&b| b == (i % 8) as u8 + 1), "piece {i} lost");
    }
}

#[derive(Debug, Clone)]
enum ModelOp {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Trim(u64, u64),
    Read(u64, usize),
    Extents(u64, u64),
}

fn op(size: u64) -> impl Strategy<Value = ModelOp> {
    let r = (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(20000)));
    prop_oneof![
        (r.clone(), any::<u8>()).prop_map(|((o, l), v)| ModelOp::Write(o, l as usize, v)),
        r.clone().prop_map(|(o, l)| ModelOp::Zero(o, l)),
        r.clone().prop_map(|(o, l)| ModelOp::Trim(o, l)),
        r.clone().prop_map(|(o, l)| ModelOp::Read(o, l as usize)),
        r.prop_map(|(o, l)| ModelOp::Extents(o, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any sequence of requests reads back as a flat model says, extents
    /// cover exactly the range asked and say zero only over zeroes, and
    /// the plugin is never written.
    #[test]
    fn matches_a_model(ops in prop::collection::vec(op(5 * 4096 + 123), 1..40)) {
        let size = 5 * 4096 + 123;
        let next = plugin(size);
        let h = cow(&[("cow-block-size", "4096")]).open(&next, false, "", false).unwrap();
        let mut model = pattern(size);
        for o in ops {
            match o {
                ModelOp::Write(off, len, v) => {
                    h.pwrite(&vec![v; len], off, Flags::NONE).unwrap();
                    model[off as usize..off as usize + len].fill(v);
                }
                ModelOp::Zero(off, len) => {
                    h.zero(len, off, Flags::MAY_TRIM).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                ModelOp::Trim(off, len) => {
                    h.trim(len, off, Flags::NONE).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                ModelOp::Read(off, len) => {
                    prop_assert_eq!(read(&*h, off, len), &model[off as usize..off as usize + len]);
                }
                ModelOp::Extents(off, len) => {
                    let mut e = Extents::new(off, off + len);
                    h.extents(len, off, Flags::NONE, &mut e).unwrap();
                    prop_assert_eq!(e.list()[0].offset, off);
                    prop_assert_eq!(e.covered_to(), off + len);
                    for x in e.list() {
                        if x.typ & ZERO != 0 {
                            prop_assert!(model[x.offset as usize..(x.offset + x.length) as usize].iter().all(|&b| b == 0));
                        }
                    }
                }
            }
        }
        prop_assert_eq!(read(&*h, 0, size), model);
        prop_assert_eq!(&next.state.lock().unwrap().data, &pattern(size));
    }
}

#[test]
fn reads_without_waiting_come_from_the_page_cache() {
    let next = plugin(4 * 4096);
    let h = cow(&[("cow-block-size", "4096")]).open(&next, false, "", false).unwrap();
    h.pwrite(&[3; 8192], 0, Flags::NONE).unwrap();
    h.trim(4096, 2 * 4096, Flags::NONE).unwrap();
    let mut b = vec![0xee; 3 * 4096];
    // Written (the overlay is in the page cache) and trimmed blocks.
    assert!(h.pread_nowait(&mut b, 0).unwrap().is_ok());
    assert_eq!(&b[..8192], &[3; 8192][..]);
    assert_eq!(&b[8192..], &[0; 4096][..]);
    // The in-memory plugin cannot read without waiting: the caller reads.
    assert!(h.pread_nowait(&mut b[..10], 3 * 4096).is_none());
}
