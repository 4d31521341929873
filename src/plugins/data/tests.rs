//! The plugin as a whole: configuration, the overlay, block status.

use super::*;

fn ready(params: &[(&str, &str)]) -> Result<Data> {
    let mut d = Data::default();
    for (k, v) in params {
        d.config(k, v)?;
    }
    d.config_complete()?;
    d.get_ready()?;
    Ok(d)
}

fn open(params: &[(&str, &str)]) -> Box<dyn Handle> {
    ready(params).unwrap_or_else(|e| panic!("{params:?}: {e}")).open(false, "", false).unwrap()
}

fn extents(h: &dyn Handle, offset: u64, count: u64) -> Vec<(u64, u64, u32)> {
    let mut ext = Extents::new(offset, offset + count);
    h.extents(count, offset, Flags::NONE, &mut ext).unwrap();
    ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect()
}

fn read(h: &dyn Handle, offset: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0xee; n];
    h.pread(&mut b, offset, Flags::NONE).unwrap();
    b
}

#[test]
fn parameters_and_their_errors() {
    let e = |p: &[(&str, &str)]| ready(p).err().map(|e| e.message().to_string()).unwrap_or_default();
    assert_eq!(e(&[("data", "1"), ("raw", "a")]), "raw|base64|data parameter must be specified exactly once");
    assert_eq!(e(&[("data", "1"), ("data", "2")]), "raw|base64|data parameter must be specified exactly once");
    assert_eq!(e(&[]), "raw|base64|data parameter was not specified");
    assert_eq!(e(&[("raw", "a"), ("foo", "1")]), "extra parameters passed and not using data='...'");
    assert_eq!(e(&[("base64", "@@@@")]), "base64: Base64 decoding error.");
    assert_eq!(e(&[("data", "1"), ("size", "x")]), "could not parse size string (x)");
    assert_eq!(e(&[("data", "1"), ("allocator", "nope")]), "unknown allocator \"nope\"");
    assert_eq!(e(&[("data", "$nope")]), "$nope: variable not found");
    let h = open(&[("raw", "Hello, world!")]);
    assert_eq!((h.size().unwrap(), read(&*h, 0, 13)), (13, b"Hello, world!".to_vec()));
    let h = open(&[("base64", "aGVsbG8gbmJka2l0IHVzZXI="), ("size", "1M")]);
    assert_eq!((h.size().unwrap(), read(&*h, 0, 18)), (1 << 20, b"hello nbdkit user\0".to_vec()));
    let h = open(&[("data", "$pat*2 $v"), ("pat", "0x55 0xAA"), ("v", "1"), ("v", "2")]);
    assert_eq!(read(&*h, 0, 5), [0x55, 0xaa, 0x55, 0xaa, 2]);
    let h = open(&[("data", "1 2 3"), ("size", "2")]);
    assert_eq!((h.size().unwrap(), read(&*h, 0, 2)), (2, vec![1, 2]));
}

#[test]
fn base64_like_gnutls() {
    assert_eq!(base64_decode("MTIz").unwrap(), b"123");
    assert_eq!(base64_decode("MTI=").unwrap(), b"12");
    assert_eq!(base64_decode("MQ==").unwrap(), b"1");
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("MTIz\nNDU2").unwrap(), b"123456");
    for bad in ["M", "MT", "MTI", "M===", "MT!z", "MTIz="] {
        assert!(base64_decode(bad).is_err(), "{bad}");
    }
}

#[test]
fn block_status_like_nbdkit() {
    const Z: u32 = ZERO;
    const H: u32 = HOLE | ZERO;
    for (data, want) in [
        ("0", vec![(0, 1, Z)]),
        ("0 0", vec![(0, 2, H)]),
        ("1 @0 0*10", vec![(0, 10, H)]),
        ("0*10 @0 0", vec![(0, 10, Z)]),
        ("( 1 @100000 ) * 2", vec![(0, 32768, 0), (32768, 65536, H), (98304, 32768, 0), (131072, 68928, H)]),
        ("( 0 @100000 ) * 2", vec![(0, 200000, H)]),
        ("1 </dev/zero[:100000]", vec![(0, 32768, 0), (32768, 67233, Z)]),
        ("@32767 1 0 0", vec![(0, 32768, 0), (32768, 2, Z)]),
        ("@32767 1 \"\\x00\\x00\\x00\"", vec![(0, 32768, 0), (32768, 3, H)]),
    ] {
        let h = open(&[("data", data)]);
        assert_eq!(extents(&*h, 0, h.size().unwrap()), want, "{data}");
    }
    let h = open(&[("data", "( 0x55 0xAA )*536870912 @^1G @+1G 1")]);
    assert_eq!(extents(&*h, 0, h.size().unwrap()),
               [(0, 1 << 30, 0), (1 << 30, 1 << 30, H), (2 << 30, 1, 0)]);
    let h = open(&[("data", "1 2 3"), ("allocator", "malloc"), ("size", "1M")]);
    assert_eq!(extents(&*h, 0, 1 << 20), [(0, 1 << 20, 0)]);
}

#[test]
fn writes_go_over_the_pattern() {
    let h = open(&[("data", "( \"hello\" )*2147483648")]);
    let size = 5u64 << 31;
    assert_eq!(h.size().unwrap(), size);
    h.pwrite(b"XY", 40000, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 39996, 8), b"elloXYll");
    // The rest of the written page is still the pattern.
    assert_eq!(read(&*h, 32768, 10), read(&*h, 32768 + 5 * 1000, 10));
    assert_eq!(read(&*h, 32765, 10), b"hellohello");
    h.zero(3, size - 2, Flags::NONE).unwrap_err();
    h.zero(2, size - 2, Flags::NONE).unwrap();
    assert_eq!(read(&*h, size - 5, 5), b"hel\0\0");
    h.trim(size, 0, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 0, 4), [0; 4]);
    assert_eq!(extents(&*h, 0, size), [(0, size, HOLE | ZERO)]);
    h.pwrite(&[7; 70000], 10, Flags::NONE).unwrap();
    assert_eq!(read(&*h, 8, 4), [0, 0, 7, 7]);
    assert_eq!(extents(&*h, 0, 131072), [(0, 98304, 0), (98304, 32768, HOLE | ZERO)]);
}

#[test]
fn copied_pages_keep_their_allocation() {
    // A lone zero byte allocates its page; a write elsewhere in that page
    // keeps it allocated, a zero of the write frees nothing new.
    let h = open(&[("data", "0 @65536 0 0")]);
    assert_eq!(extents(&*h, 0, 65538), [(0, 32768, ZERO), (32768, 32770, HOLE | ZERO)]);
    h.pwrite(&[0], 100, Flags::NONE).unwrap();
    h.pwrite(&[0], 65537, Flags::NONE).unwrap();
    assert_eq!(extents(&*h, 0, 65538), [(0, 32768, ZERO), (32768, 32768, HOLE | ZERO), (65536, 2, ZERO)]);
}

mod overlay {
    use super::*;
    use proptest::prelude::*;

    /// A pattern with data, allocated zeroes, holes and a lazy repeat.
    const PATTERN: &str = "( 0x55 0xAA )*50000 @^32768 0 @+70000 ( 1 @40000 )*3 @+1 0 0 @300001";

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u8),
        Zero(u64, u64),
        Trim(u64, u64),
        Read(u64, usize),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let at = move || 0..size;
        prop_oneof![
            (at(), 1usize..70_000, any::<u8>()).prop_map(|(o, n, b)| Op::Write(o, n, b)),
            (at(), 1u64..100_000).prop_map(|(o, n)| Op::Zero(o, n)),
            (at(), 1u64..100_000).prop_map(|(o, n)| Op::Trim(o, n)),
            (at(), 1usize..100_000).prop_map(|(o, n)| Op::Read(o, n)),
        ]
    }

    /// nbdkit's sparse allocator after evaluating the pattern, as bytes and
    /// an allocated flag per page.
    fn model(h: &dyn Handle, size: u64) -> (Vec<u8>, Vec<bool>) {
        let bytes = read(h, 0, size as usize);
        let mut alloc = vec![false; size.div_ceil(PAGE) as usize];
        let mut ext = Extents::new(0, size);
        h.extents(size, 0, Flags::NONE, &mut ext).unwrap();
        for e in ext.list() {
            if e.typ & HOLE == 0 {
                for p in e.offset / PAGE..(e.offset + e.length).div_ceil(PAGE) {
                    alloc[p as usize] = true;
                }
            }
        }
        (bytes, alloc)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Writes, zeroes and trims over the pattern read back as on a
        /// plain disk, and block status follows a sparse allocator's rules.
        #[test]
        fn overlay_behaves_like_a_materialized_disk(ops in prop::collection::vec(op(300_001), 1..12)) {
            let h = open(&[("data", PATTERN)]);
            let size = h.size().unwrap();
            let (mut bytes, mut alloc) = model(&*h, size);
            let page_data = |bytes: &[u8], p: usize| {
                let s = p * PAGE as usize;
                bytes[s..(s + PAGE as usize).min(bytes.len())].iter().any(|&c| c != 0)
            };
            for op in ops {
                match op {
                    Op::Write(o, n, b) => {
                        let n = n.min((size - o) as usize);
                        let data: Vec<u8> = (0..n).map(|i| b.wrapping_add(i as u8)).collect();
                        h.pwrite(&data, o, Flags::NONE).unwrap();
                        bytes[o as usize..o as usize + n].copy_from_slice(&data);
                        for p in o / PAGE..(o + n as u64).div_ceil(PAGE) {
                            alloc[p as usize] = true;
                        }
                    }
                    Op::Zero(o, n) | Op::Trim(o, n) => {
                        let n = n.min(size - o);
                        if matches!(op, Op::Zero(..)) {
                            h.zero(n, o, Flags::MAY_TRIM).unwrap();
                        } else {
                            h.trim(n, o, Flags::NONE).unwrap();
                        }
                        bytes[o as usize..(o + n) as usize].fill(0);
                        for p in o / PAGE..(o + n).div_ceil(PAGE) {
                            alloc[p as usize] = alloc[p as usize] && page_data(&bytes, p as usize);
                        }
                    }
                    Op::Read(o, n) => {
                        let n = n.min((size - o) as usize);
                        prop_assert!(read(&*h, o, n) == bytes[o as usize..o as usize + n]);
                    }
                }
            }
            prop_assert!(read(&*h, 0, size as usize) == bytes);
            let mut ext = Extents::new(0, size);
            h.extents(size, 0, Flags::NONE, &mut ext).unwrap();
            prop_assert_eq!(ext.covered_to(), size);
            for e in ext.list() {
                for p in e.offset / PAGE..(e.offset + e.length).div_ceil(PAGE) {
                    let want = if page_data(&bytes, p as usize) { 0 } else if alloc[p as usize] { ZERO } else { HOLE | ZERO };
                    prop_assert_eq!(e.typ, want, "page {}", p);
                }
            }
        }
    }
}

#[test]
fn deepest_nesting_reads_on_a_small_stack() {
    // 1000 nested groups of 40 pieces each: every level refers to the next
    // (too many pieces to copy), so a read at the end goes 1000 deep.
    let level = "1 @+1 ".repeat(40);
    let src = format!("{}{}", format!("( {level}").repeat(999), ")".repeat(999));
    let h = open(&[("data", &src)]);
    let size = h.size().unwrap();
    assert_eq!(size, 999 * 80);
    // The server's workers have Rust's default 2 MiB stacks.
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            assert_eq!(read(&*h, size - 3, 3), [0, 1, 0]);
            assert_eq!(extents(&*h, 0, size), [(0, size, 0)]);
        })
        .unwrap()
        .join()
        .unwrap();
}
