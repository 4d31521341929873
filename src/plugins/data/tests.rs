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
