//! Allocators: where the memory and data plugins keep their bytes.
//!
//! nbdkit's `common/allocators`: a disk that starts as zeroes, chosen with
//! `allocator=TYPE[,KEY[=VALUE]…]`. [`sparse`] allocates 32 KiB pages on
//! first write and frees them when they are zeroed again; [`malloc`] is
//! one contiguous buffer. nbdkit's third type, zstd, is not built.

pub mod malloc;
mod pages;
pub mod sparse;

use crate::backend::{BlockSize, Extents};
use crate::error::{Error, ErrorKind, Result};

pub use malloc::Malloc;
pub use sparse::Sparse;

/// A disk in memory, shared by every connection: all methods take `&self`
/// and may run on several threads at once.
pub trait Allocator: Send + Sync {
    /// Prepare for a disk of `size` bytes (malloc allocates it now, so a
    /// disk that cannot be had fails at start-up rather than on a write).
    fn set_size_hint(&self, _size: u64) -> Result<()> {
        Ok(())
    }
    /// Read `buf.len()` bytes at `offset`; never-written bytes are zeroes.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Lends `count` bytes at `offset` to `sink` as slices of the storage
    /// (see `Handle::pread_lend`); `None` if this allocator cannot.
    fn lend(&self, _count: usize, _offset: u64, _sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        None
    }
    /// Zero-copy write (see `Handle::pwrite_fill`); `None` if unsupported.
    fn write_fill(&self, _count: usize, _offset: u64, _fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        None
    }
    /// Write `buf` at `offset`. Running out of memory is `ErrorKind::NoMem`
    /// and leaves what was written before intact.
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Set `count` bytes at `offset` to `byte` (the data plugin's `B*N`).
    #[allow(dead_code)] // For the data plugin.
    fn fill(&self, byte: u8, count: u64, offset: u64) -> Result<()>;
    /// Make `count` bytes at `offset` read as zeroes, releasing memory
    /// where the allocator can (this is also trim).
    fn zero(&self, count: u64, offset: u64) -> Result<()>;
    /// Describe `[offset, offset+count)`: holes and zeroes as the allocator
    /// knows them. With `req_one`, stop once the first extent is known.
    fn extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()>;
    /// The preferred request size: the allocator's page.
    fn preferred_block_size(&self) -> u32;
    /// NBD block size constraints (nbdkit ≥ 1.38): any alignment works,
    /// whole pages work best.
    fn block_size(&self) -> BlockSize {
        BlockSize { min: 1, preferred: self.preferred_block_size(), max: u32::MAX }
    }
}

/// Allocator types in nbdkit's registration order: the type is matched as
/// a prefix (`strncmp` with the given length), so `m` is malloc and an
/// empty type picks the first, malloc.
const TYPES: [&str; 3] = ["malloc", "sparse", "zstd"];

/// Creates the allocator `spec` describes (`sparse`, `malloc,mlock=true`…)
/// for disks of at most `max_size` bytes, with nbdkit's messages.
/// `owner` is the plugin's name: `-D OWNER.dir=1` logs the sparse
/// allocator's directory lookups and insertions, as nbdkit's does.
pub fn create(owner: &str, spec: &str, max_size: u64) -> Result<Box<dyn Allocator>> {
    crate::debug!("allocator: {spec}");
    let (ty, params) = match spec.split_once(',') {
        Some((ty, rest)) => (ty, parse_params(rest)?),
        None => (spec, Vec::new()),
    };
    let Some(&name) = TYPES.iter().find(|name| name.starts_with(ty)) else {
        return Err(unknown(spec));
    };
    let made: Result<Box<dyn Allocator>> = match name {
        "malloc" => Malloc::from_params(&params).map(|a| Box::new(a) as Box<dyn Allocator>),
        "sparse" if !params.is_empty() => Err(Error::invalid("allocator=sparse does not take extra parameters")),
        "sparse" => Sparse::new(max_size).map(|mut a| {
            a.debug_dir = crate::util::log::debug_flag(owner, "dir") != 0;
            Box::new(a) as Box<dyn Allocator>
        }),
        _ => return Err(Error::invalid("allocator=zstd is not supported in this build")),
    };
    // nbdkit prints why the allocator could not be made, then gives up on it.
    made.map_err(|e| {
        crate::log_error!("{e}");
        Error::new(e.kind(), format!("unknown allocator \"{spec}\""))
    })
}

fn unknown(spec: &str) -> Error {
    Error::invalid(format!("unknown allocator \"{spec}\""))
}

/// `KEY=VALUE,…` after the type: empty items are skipped, a bare `KEY`
/// means `KEY=1`, the value runs to the next comma (it may hold `=`).
fn parse_params(s: &str) -> Result<Vec<(&str, &str)>> {
    let mut params = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, "1"));
        if key.is_empty() {
            return Err(Error::invalid("invalid allocator parameter"));
        }
        crate::debug!("allocator parameter: {key}={value}");
        params.push((key, value));
    }
    Ok(params)
}

/// The end of `[offset, offset+count)`, if it lies within `limit` bytes.
fn end_within(what: &str, offset: u64, count: u64, limit: u64) -> Result<u64> {
    match offset.checked_add(count) {
        Some(end) if end <= limit => Ok(end),
        _ => Err(Error::invalid(format!(
            "{what}: request out of range: offset={offset}, count={count}, size={limit}"
        ))),
    }
}

/// The error for a failed allocation, worded as nbdkit's (`calloc: %m`).
fn nomem(what: &str) -> Error {
    Error::new(ErrorKind::NoMem, format!("{what}: Cannot allocate memory"))
}

/// True if every byte is zero (one memcmp, as nbdkit's `is_zero`).
fn is_zero(b: &[u8]) -> bool {
    match b.split_first() {
        None => true,
        Some((&first, rest)) => first == 0 && rest == &b[..rest.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::extents::{HOLE, ZERO};
    use proptest::prelude::*;

    fn extents_of(a: &dyn Allocator, offset: u64, count: u64) -> Vec<(u64, u64, u32)> {
        let mut ext = Extents::new(offset, offset + count);
        a.extents(count, offset, false, &mut ext).unwrap();
        ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect()
    }

    #[test]
    fn types_match_by_prefix_and_empty_is_malloc() {
        // Malloc extents are always data, sparse ones start as a hole.
        for (spec, typ) in [("", 0), ("m", 0), ("malloc", 0), (",mlock=false", 0),
                            ("malloc,,mlock=0,", 0), ("s", HOLE | ZERO), ("sparse", HOLE | ZERO),
                            ("sparse,", HOLE | ZERO), ("sparse,,", HOLE | ZERO)] {
            let a = create("memory", spec, 1 << 20).unwrap_or_else(|e| panic!("{spec}: {e}"));
            a.set_size_hint(1 << 20).unwrap();
            assert_eq!(extents_of(&*a, 0, 1 << 20), [(0, 1 << 20, typ)], "{spec}");
        }
    }

    #[test]
    fn bad_specs_fail_with_nbdkits_messages() {
        for (spec, msg) in [
            ("sparsex", "unknown allocator \"sparsex\""),
            ("SPARSE", "unknown allocator \"SPARSE\""),
            ("mallocx,mlock", "unknown allocator \"mallocx,mlock\""),
            ("malloc,=1", "invalid allocator parameter"),
            ("malloc,foo=1", "unknown allocator \"malloc,foo=1\""),
            ("malloc,mlock=maybe", "unknown allocator \"malloc,mlock=maybe\""),
            ("sparse,x", "unknown allocator \"sparse,x\""),
            ("zstd", "allocator=zstd is not supported in this build"),
            ("z", "allocator=zstd is not supported in this build"),
        ] {
            let e = create("memory", spec, 1 << 20).err().unwrap_or_else(|| panic!("{spec} accepted"));
            assert_eq!(e.message(), msg);
        }
    }

    #[test]
    fn parameters_split_like_nbdkit() {
        assert_eq!(parse_params("mlock").unwrap(), [("mlock", "1")]);
        assert_eq!(parse_params(",a,,b=2=3,").unwrap(), [("a", "1"), ("b", "2=3")]);
        assert_eq!(parse_params(" mlock").unwrap(), [(" mlock", "1")]);
        assert!(parse_params("=").is_err());
    }

    #[test]
    fn zero_test_looks_at_every_byte() {
        assert!(is_zero(&[]) && is_zero(&[0]) && is_zero(&[0; 100]));
        assert!(!is_zero(&[1]) && !is_zero(&[0, 0, 1]) && !is_zero(&[1, 0, 0]));
    }

    #[test]
    fn range_ends_are_checked_without_overflow() {
        assert_eq!(end_within("t", 10, 5, 15).unwrap(), 15);
        assert!(end_within("t", 10, 6, 15).is_err());
        assert!(end_within("t", u64::MAX, 2, u64::MAX).is_err());
    }

    /// A disk of three leaves of the sparse page table, and windows at its
    /// start, across the first leaf boundary and at its (unaligned) end.
    const SIZE: u64 = 64 * 1024 * 1024 + 40_000;
    const WINDOW: u64 = 160 * 1024;
    const WINDOWS: [u64; 3] = [0, 32 * 1024 * 1024 - WINDOW / 2, SIZE - WINDOW];

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u64),
        Write(u64, u64, u8),
        Fill(u64, u64, u8),
        Zero(u64, u64),
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..WINDOWS.len(), 0..WINDOW, 1..=70_000u64).prop_map(|(w, start, len)| {
            let len = len.min(WINDOW - start);
            (WINDOWS[w] + start, len)
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            range().prop_map(|(o, n)| Op::Read(o, n)),
            (range(), any::<u8>()).prop_map(|((o, n), s)| Op::Write(o, n, s)),
            (range(), any::<u8>()).prop_map(|((o, n), b)| Op::Fill(o, n, b)),
            range().prop_map(|(o, n)| Op::Zero(o, n)),
        ]
    }

    /// Runs `ops` on `a` and on a plain vector, comparing every read, the
    /// windows at the end, and (for sparse) the extents page by page.
    fn check_against_model(a: &dyn Allocator, ops: &[Op], sparse: bool) {
        a.set_size_hint(SIZE).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for op in ops {
            match *op {
                Op::Read(o, n) => {
                    let mut buf = vec![0xee; n as usize];
                    a.read(&mut buf, o).unwrap();
                    assert!(buf == model[o as usize..(o + n) as usize], "{op:?}");
                }
                Op::Write(o, n, seed) => {
                    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
                    a.write(&data, o).unwrap();
                    model[o as usize..(o + n) as usize].copy_from_slice(&data);
                }
                Op::Fill(o, n, b) => {
                    a.fill(b, n, o).unwrap();
                    model[o as usize..(o + n) as usize].fill(b);
                }
                Op::Zero(o, n) => {
                    a.zero(n, o).unwrap();
                    model[o as usize..(o + n) as usize].fill(0);
                }
            }
        }
        for w in WINDOWS {
            let mut buf = vec![0xee; WINDOW as usize];
            a.read(&mut buf, w).unwrap();
            assert!(buf == model[w as usize..(w + WINDOW) as usize], "window {w}");
            let ext = extents_of(a, w, WINDOW);
            assert_eq!(ext.last().map(|e| e.0 + e.1), Some(w + WINDOW));
            let page = sparse::PAGE_SIZE as u64;
            let mut pos = w;
            while pos < w + WINDOW {
                let typ = ext.iter().find(|e| e.0 <= pos && pos < e.0 + e.1).unwrap().2;
                let p = pos / page * page;
                let data = !is_zero(&model[p as usize..((p + page).min(SIZE)) as usize]);
                if sparse {
                    assert_eq!(typ == 0, data, "page at {p}: type {typ}");
                } else {
                    assert!(typ == 0 || !data, "page at {p}: type {typ}");
                }
                pos = p + page;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn sparse_behaves_like_a_vector(ops in prop::collection::vec(op(), 1..40)) {
            check_against_model(&Sparse::new(SIZE).unwrap(), &ops, true);
        }

        #[test]
        fn malloc_behaves_like_a_vector(ops in prop::collection::vec(op(), 1..40)) {
            check_against_model(&Malloc::new(false), &ops, false);
        }
    }

    /// Writers on several threads, to pages of their own and to pages they
    /// share, while readers check that every page they see was written by
    /// one request (page-sized requests are atomic: one lock per page).
    fn concurrent_writers(a: &dyn Allocator) {
        const PAGE: usize = sparse::PAGE_SIZE;
        const PAGES: usize = 64;
        const THREADS: usize = 6;
        a.set_size_hint((PAGES * PAGE) as u64).unwrap();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                s.spawn(move || {
                    let mut x = t as u64 + 1;
                    for i in 0..300 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let first = (x >> 33) as usize % (PAGES - 1);
                        let n = (1 + (x >> 20) as usize % 4).min(PAGES - 1 - first);
                        let off = (first * PAGE) as u64;
                        if i % 7 == 3 {
                            a.zero((n * PAGE) as u64, off).unwrap();
                        } else {
                            a.write(&vec![t as u8 + 1; n * PAGE], off).unwrap();
                        }
                        // Bytes 100..200 of the last page belong to this thread alone.
                        let own = ((PAGES - 1) * PAGE + 100 + t * 10) as u64;
                        a.write(&[i as u8; 10], own).unwrap();
                    }
                });
            }
            for _ in 0..2 {
                s.spawn(move || {
                    let mut buf = vec![0; PAGE];
                    for i in 0..2000 {
                        a.read(&mut buf, ((i * 7 % (PAGES - 1)) * PAGE) as u64).unwrap();
                        assert!(buf.iter().all(|&b| b == buf[0]), "torn page");
                    }
                });
            }
        });
        let mut buf = vec![0; PAGES * PAGE];
        a.read(&mut buf, 0).unwrap();
        for page in buf[..(PAGES - 1) * PAGE].chunks(PAGE) {
            assert!(page.iter().all(|&b| b == page[0]) && page[0] as usize <= THREADS);
        }
        let own = &buf[(PAGES - 1) * PAGE + 100..];
        for t in 0..THREADS {
            assert_eq!(own[t * 10..t * 10 + 10], [(299 % 256) as u8; 10]);
        }
    }

    #[test]
    fn concurrent_writers_sparse() {
        concurrent_writers(&Sparse::new(64 * 32768).unwrap());
    }

    #[test]
    fn concurrent_writers_malloc() {
        concurrent_writers(&Malloc::new(false));
    }
}
