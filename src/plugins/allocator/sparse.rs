//! `allocator=sparse`: 32 KiB pages, allocated on first write and freed
//! when zeroing leaves them all zero, found through a radix tree.
//!
//! nbdkit keeps a sorted L1 vector of 4096-page L2 directories behind one
//! lock. Here the page table is a radix tree of fixed-size nodes
//! (1024 entries; a leaf spans 32 MiB) whose height fits the disk: a leaf
//! alone up to 32 MiB, five levels for 2^63-1 bytes. Interior entries are
//! `OnceLock`s, filled once and never emptied, so walking the tree takes
//! no lock at all. Each page sits behind its own `RwLock`: reads of a page
//! share it, a write or zero takes it alone, so requests to different
//! pages never wait for each other and the only contention left is two
//! requests on the same 32 KiB. Requests spanning pages lock them one at
//! a time: each page is updated atomically, a whole request is not (NBD
//! promises nothing for overlapping requests in flight).
//!
//! Every allocation is fallible: a page or node that cannot be had fails
//! that request with ENOMEM and touches nothing else.

use std::ops::ControlFlow;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use super::pages::PAGE_SIZE;
use super::pages::{self, Page};
use super::{end_within, is_zero, nomem, Allocator};
use crate::backend::extents::{HOLE, MAX_EXTENTS, ZERO};
use crate::backend::Extents;
use crate::error::{Error, Result};

const PAGE_SHIFT: u32 = 15;
const _: () = assert!(PAGE_SIZE == 1 << PAGE_SHIFT);
const PAGE_MASK: u64 = PAGE_SIZE as u64 - 1;
/// What a page never written reads as, when lent.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
/// Largest request lent page by page (257 slices at most).
const LEND_MAX: usize = 8 << 20;
/// Entries per tree node: 1024 pages (32 MiB) per leaf.
const FANOUT_BITS: u32 = 10;
const FANOUT: usize = 1 << FANOUT_BITS;

/// One page of the disk: `None` until written, and again once zeroed.
type Slot = RwLock<Option<Page>>;

enum Node {
    /// Children each covering `1 << shift` pages; empty until first written.
    Dir { shift: u32, children: Box<[OnceLock<Node>]> },
    /// One slot per page.
    Leaf(Box<[Slot]>),
}

impl Node {
    /// A node whose entries each cover `1 << shift` pages.
    fn new(shift: u32, width: usize) -> Result<Node> {
        Ok(if shift == 0 {
            Node::Leaf(try_slice(width, || RwLock::new(None))?)
        } else {
            Node::Dir { shift, children: try_slice(width, OnceLock::new)? }
        })
    }
}

/// A sparse disk of up to `capacity` bytes.
pub struct Sparse {
    capacity: u64,
    root: Node,
    /// `-D memory.dir=1` (or `data.dir`): log directory lookups and
    /// insertions, nbdkit's `sparse_debug_dir`.
    pub debug_dir: bool,
}

/// What [`Sparse::walk`] finds: a run of pages under an empty subtree, or
/// one page slot (which may be empty too).
enum Span<'a> {
    Absent { first: u64, pages: u64 },
    Page { index: u64, slot: &'a Slot },
}

/// What [`Sparse::put`] writes.
#[derive(Clone, Copy)]
enum Src<'a> {
    Bytes(&'a [u8]),
    Byte(u8),
}

impl Sparse {
    /// An empty (all zero) disk for offsets below `capacity` (at most 2^63-1).
    pub fn new(capacity: u64) -> Result<Sparse> {
        if capacity > i64::MAX as u64 {
            return Err(Error::invalid(format!("allocator=sparse: size {capacity} is too large")));
        }
        let pages = capacity.div_ceil(PAGE_SIZE as u64);
        // The root is as wide as it needs to be, the nodes below it full.
        let mut shift = 0;
        while pages.div_ceil(1 << shift) > FANOUT as u64 {
            shift += FANOUT_BITS;
        }
        let width = pages.div_ceil(1 << shift) as usize;
        Ok(Sparse { capacity, root: Node::new(shift, width)?, debug_dir: false })
    }

    /// The slot of page `index`, if its leaf exists.
    fn slot(&self, index: u64) -> Option<&Slot> {
        let found = self.find(index);
        if self.debug_dir {
            match found {
                Some(_) => crate::debug!("lookup: search dir: entry found: page {index}"),
                None => crate::debug!("lookup: search dir: no entry found: page {index}"),
            }
        }
        found
    }

    fn find(&self, index: u64) -> Option<&Slot> {
        let mut node = &self.root;
        loop {
            match node {
                Node::Dir { shift, children } => node = children.get(entry(index, *shift))?.get()?,
                Node::Leaf(slots) => return slots.get(entry(index, 0)),
            }
        }
    }

    /// The slot of page `index`, creating the nodes on the way.
    fn slot_or_create(&self, index: u64) -> Result<&Slot> {
        let out_of_range = || Error::invalid(format!("allocator=sparse: page {index} out of range"));
        let mut node = &self.root;
        loop {
            match node {
                Node::Dir { shift, children } => {
                    let cell = children.get(entry(index, *shift)).ok_or_else(out_of_range)?;
                    node = match cell.get() {
                        Some(child) => child,
                        None => {
                            // Allocate outside the OnceLock so that failure is
                            // an error; a racing thread's node may win instead.
                            let child = Node::new(shift - FANOUT_BITS, FANOUT)?;
                            if self.debug_dir {
                                crate::debug!("insert: inserted new directory node for page {index} at level {}", shift / FANOUT_BITS);
                            }
                            cell.get_or_init(|| child)
                        }
                    };
                }
                Node::Leaf(slots) => return slots.get(entry(index, 0)).ok_or_else(out_of_range),
            }
        }
    }

    /// Calls `f` on pages `first..=last`: once per slot of existing leaves,
    /// once per run of pages under a missing subtree.
    fn walk<'a>(&'a self, first: u64, last: u64,
                f: &mut dyn FnMut(Span<'a>) -> ControlFlow<Result<()>>) -> Result<()> {
        match walk_node(&self.root, 0, first, last, f) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(r) => r,
        }
    }

    /// Writes `len` bytes of `src` at `offset`, allocating pages as needed.
    fn put(&self, src: Src<'_>, len: u64, offset: u64) -> Result<()> {
        end_within("allocator=sparse", offset, len, self.capacity)?;
        let mut done = 0;
        for (index, off, n) in pieces(offset, len) {
            let piece = match src {
                Src::Bytes(b) => Src::Bytes(&b[done..done + n]),
                byte => byte,
            };
            let mut guard = write(self.slot_or_create(index)?);
            match &mut *guard {
                Some(page) => match piece {
                    Src::Bytes(b) => pages::copy_in(&mut page[off..off + n], b),
                    Src::Byte(c) => page[off..off + n].fill(c),
                },
                empty => *empty = Some(new_page(off, n, piece)?),
            }
            done += n;
        }
        Ok(())
    }

    /// Number of allocated pages.
    #[cfg(test)]
    fn pages(&self) -> u64 {
        let mut n = 0;
        let last = self.capacity.div_ceil(PAGE_SIZE as u64).saturating_sub(1);
        if self.capacity > 0 {
            self.walk(0, last, &mut |span| {
                if let Span::Page { slot, .. } = span {
                    n += u64::from(read(slot).is_some());
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        }
        n
    }
}

fn walk_node<'a>(node: &'a Node, base: u64, first: u64, last: u64,
                 f: &mut dyn FnMut(Span<'a>) -> ControlFlow<Result<()>>) -> ControlFlow<Result<()>> {
    match node {
        Node::Leaf(slots) => {
            for index in first..=last {
                f(Span::Page { index, slot: &slots[(index - base) as usize] })?;
            }
        }
        Node::Dir { shift, children } => {
            for i in (first - base) >> shift..=(last - base) >> shift {
                let child_base = base + (i << shift);
                let child_first = first.max(child_base);
                let child_last = last.min(child_base + (1 << shift) - 1);
                match children[i as usize].get() {
                    Some(child) => walk_node(child, child_base, child_first, child_last, f)?,
                    None => f(Span::Absent { first: child_first, pages: child_last - child_first + 1 })?,
                }
            }
        }
    }
    ControlFlow::Continue(())
}

/// Index within a node whose entries cover `1 << shift` pages.
fn entry(index: u64, shift: u32) -> usize {
    ((index >> shift) & (FANOUT as u64 - 1)) as usize
}

/// Splits `[offset, offset+len)` by page: (page index, offset in page, length).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let (mut pos, end) = (offset, offset + len);
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let off = (pos & PAGE_MASK) as usize;
        let n = (PAGE_SIZE - off).min((end - pos) as usize);
        let piece = (pos >> PAGE_SHIFT, off, n);
        pos += n as u64;
        Some(piece)
    })
}

/// A new page holding `src` at `off` (for `n` bytes) and zeroes elsewhere.
fn new_page(off: usize, n: usize, src: Src<'_>) -> Result<Page> {
    let mut page = pages::one()?;
    page[..off].fill(0);
    match src {
        Src::Bytes(b) => pages::copy_in(&mut page[off..off + n], b),
        Src::Byte(c) => page[off..off + n].fill(c),
    }
    page[off + n..].fill(0);
    Ok(page)
}

/// A boxed slice of `n` values, or ENOMEM.
fn try_slice<T>(n: usize, f: impl FnMut() -> T) -> Result<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| nomem("calloc"))?;
    v.extend(std::iter::repeat_with(f).take(n));
    Ok(v.into_boxed_slice())
}

type PageGuard<'a> = RwLockReadGuard<'a, Option<Page>>;

/// The bytes of `piece` (index, offset, length) of a read-locked page.
fn lent<'a>(guard: &'a Option<PageGuard<'_>>, (_, off, n): (u64, usize, usize)) -> &'a [u8] {
    match guard.as_deref() {
        Some(Some(page)) => &page[off..off + n],
        _ => &ZERO_PAGE[..n],
    }
}

// A panic while a page was locked cannot leave it half-valid (any bytes are
// valid bytes), so poisoning is ignored.
fn read(slot: &Slot) -> RwLockReadGuard<'_, Option<Page>> {
    slot.read().unwrap_or_else(|e| e.into_inner())
}

fn write(slot: &Slot) -> RwLockWriteGuard<'_, Option<Page>> {
    slot.write().unwrap_or_else(|e| e.into_inner())
}

impl Allocator for Sparse {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        end_within("allocator=sparse", offset, buf.len() as u64, self.capacity)?;
        let mut done = 0;
        for (index, off, n) in pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + n];
            match self.slot(index) {
                Some(slot) => match &*read(slot) {
                    Some(page) => dst.copy_from_slice(&page[off..off + n]),
                    None => dst.fill(0),
                },
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        if count > LEND_MAX {
            return None;
        }
        if let Err(e) = end_within("allocator=sparse", offset, count as u64, self.capacity) {
            return Some(Err(e));
        }
        // Read locks on every page of the range, taken in ascending order
        // while writers hold one page at a time (no deadlock), kept for as
        // long as the sink runs. Small requests (most of them) need no
        // allocation.
        const SMALL: usize = 4;
        let npages = pieces(offset, count as u64).count();
        if npages <= SMALL {
            let mut guards: [Option<PageGuard<'_>>; SMALL] = Default::default();
            for (guard, (index, _, _)) in guards.iter_mut().zip(pieces(offset, count as u64)) {
                *guard = self.slot(index).map(read);
            }
            let mut slices: [&[u8]; SMALL] = [&[]; SMALL];
            for ((slice, guard), piece) in slices.iter_mut().zip(&guards).zip(pieces(offset, count as u64)) {
                *slice = lent(guard, piece);
            }
            sink(&slices[..npages]);
        } else {
            let guards: Vec<(Option<PageGuard<'_>>, (u64, usize, usize))> =
                pieces(offset, count as u64).map(|piece| (self.slot(piece.0).map(read), piece)).collect();
            let slices: Vec<&[u8]> = guards.iter().map(|(guard, piece)| lent(guard, *piece)).collect();
            sink(&slices);
        }
        Some(Ok(()))
    }

    fn write_fill(&self, count: usize, offset: u64, fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        if count > LEND_MAX {
            return None;
        }
        if let Err(e) = end_within("allocator=sparse", offset, count as u64, self.capacity) {
            return Some(Err(e));
        }
        let pieces: Vec<(u64, usize, usize)> = pieces(offset, count as u64).collect();
        // Everything that can fail comes first: once the data is in, it
        // goes in whole. No page is locked while `fill` waits for it.
        let slots: Result<Vec<&Slot>> = pieces.iter().map(|&(index, _, _)| self.slot_or_create(index)).collect();
        let (slots, mut fresh) = match slots.and_then(|s| Ok((s, pages::take(pieces.len())?))) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let mut bufs: Vec<&mut [u8]> =
            fresh.iter_mut().zip(&pieces).map(|(page, &(_, off, n))| &mut page[off..off + n]).collect();
        if !fill(&mut bufs) {
            return Some(Ok(()));
        }
        drop(bufs);
        // Whole pages are swapped in, partial ones copied.
        let mut old = Vec::with_capacity(fresh.len());
        for ((mut page, &(_, off, n)), slot) in fresh.into_iter().zip(&pieces).zip(slots) {
            let mut guard = write(slot);
            match &mut *guard {
                Some(cur) if n == PAGE_SIZE => old.push(std::mem::replace(cur, page)),
                Some(cur) => {
                    cur[off..off + n].copy_from_slice(&page[off..off + n]);
                    old.push(page);
                }
                empty => {
                    page[..off].fill(0);
                    page[off + n..].fill(0);
                    *empty = Some(page);
                }
            }
        }
        drop(old); // back to the free pages, with no page locked
        Some(Ok(()))
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.put(Src::Bytes(buf), buf.len() as u64, offset)
    }

    fn fill(&self, byte: u8, count: u64, offset: u64) -> Result<()> {
        match byte {
            0 => self.zero(count, offset),
            _ => self.put(Src::Byte(byte), count, offset),
        }
    }

    fn zero(&self, count: u64, offset: u64) -> Result<()> {
        let end = end_within("allocator=sparse", offset, count, self.capacity)?;
        if count == 0 {
            return Ok(());
        }
        // Only existing pages are visited, so zeroing a huge range is cheap.
        self.walk(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT, &mut |span| {
            if let Span::Page { index, slot } = span {
                let start = index << PAGE_SHIFT;
                let lo = (offset.max(start) - start) as usize;
                let hi = (end.min(start + PAGE_SIZE as u64) - start) as usize;
                let mut guard = write(slot);
                if let Some(page) = &mut *guard {
                    page[lo..hi].fill(0);
                    if (lo == 0 && hi == PAGE_SIZE) || is_zero(&page[..]) {
                        *guard = None;
                    }
                }
            }
            ControlFlow::Continue(())
        })
    }

    fn extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()> {
        let end = end_within("allocator=sparse", offset, count, self.capacity)?;
        if count == 0 {
            return Ok(());
        }
        self.walk(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT, &mut |span| {
            let added = match span {
                Span::Absent { first, pages } => ext.add(first << PAGE_SHIFT, pages << PAGE_SHIFT, HOLE | ZERO),
                Span::Page { index, slot } => {
                    let typ = match &*read(slot) {
                        None => HOLE | ZERO,
                        Some(page) if is_zero(&page[..]) => ZERO,
                        Some(_) => 0,
                    };
                    ext.add(index << PAGE_SHIFT, PAGE_SIZE as u64, typ)
                }
            };
            match added {
                Err(e) => ControlFlow::Break(Err(e)),
                // A second extent means the first is complete; a full list
                // takes no more.
                Ok(()) if (req_one && ext.count() > 1) || ext.count() >= MAX_EXTENTS => ControlFlow::Break(Ok(())),
                Ok(()) => ControlFlow::Continue(()),
            }
        })
    }

    fn preferred_block_size(&self) -> u32 {
        PAGE_SIZE as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    fn extents(a: &Sparse, offset: u64, count: u64, req_one: bool) -> Vec<(u64, u64, u32)> {
        let mut ext = Extents::new(offset, offset + count);
        a.extents(count, offset, req_one, &mut ext).unwrap();
        ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect()
    }

    #[test]
    fn tree_height_fits_the_disk() {
        let height = |cap| {
            let s = Sparse::new(cap).unwrap();
            let (mut node, mut h) = (&s.root, 0);
            while let Node::Dir { children, .. } = node {
                h += 1;
                let _ = s.slot_or_create(0).unwrap();
                node = children[0].get().unwrap();
            }
            h
        };
        assert_eq!(height(0), 0);
        assert_eq!(height(32 << 20), 0);
        assert_eq!(height((32 << 20) + 1), 1);
        assert_eq!(height(1 << 40), 2);
        assert_eq!(height(i64::MAX as u64), 4);
        assert!(Sparse::new(1 << 63).is_err());
    }

    #[test]
    fn extents_have_page_granularity() {
        let s = Sparse::new(8 * P).unwrap();
        assert_eq!(extents(&s, 0, 8 * P, false), [(0, 8 * P, HOLE | ZERO)]);
        s.write(&[1], P + 5).unwrap(); // page 1: data
        s.write(&[0; 10], 3 * P).unwrap(); // page 3: allocated zeroes
        s.write(&[7; 2], 5 * P - 1).unwrap(); // pages 4 and 5: data
        assert_eq!(extents(&s, 0, 8 * P, false), [
            (0, P, HOLE | ZERO), (P, P, 0), (2 * P, P, HOLE | ZERO),
            (3 * P, P, ZERO), (4 * P, 2 * P, 0), (6 * P, 2 * P, HOLE | ZERO)]);
        // Unaligned requests are clipped, and REQ_ONE stops early.
        assert_eq!(extents(&s, P + 100, 2 * P, false), [(P + 100, P - 100, 0), (2 * P, P, HOLE | ZERO), (3 * P, 100, ZERO)]);
        assert_eq!(extents(&s, 0, 8 * P, true)[0], (0, P, HOLE | ZERO));
        assert!(extents(&s, 0, 8 * P, true).len() <= 2);
    }

    #[test]
    fn zeroing_frees_pages() {
        let s = Sparse::new(100 * P).unwrap();
        s.write(&vec![9; (10 * P) as usize], 20 * P + 3).unwrap(); // pages 20..=30
        assert_eq!(s.pages(), 11);
        // Partly zeroed pages stay while they hold data…
        s.zero(P - 10, 20 * P + 3).unwrap();
        assert_eq!(s.pages(), 11);
        // …and go once the rest of them is zero too.
        s.zero(7, 21 * P - 7).unwrap();
        assert_eq!(s.pages(), 10);
        s.fill(0, 5 * P, 22 * P).unwrap();
        assert_eq!(s.pages(), 5);
        s.zero(100 * P, 0).unwrap();
        assert_eq!(s.pages(), 0);
        assert_eq!(extents(&s, 0, 100 * P, false), [(0, 100 * P, HOLE | ZERO)]);
    }

    #[test]
    fn largest_disk_reads_and_writes_at_its_end() {
        let size = i64::MAX as u64;
        let s = Sparse::new(size).unwrap();
        let mut buf = [0xaa; 512];
        s.read(&mut buf, size - 512).unwrap();
        assert_eq!(buf, [0; 512]);
        s.write(b"end", size - 3).unwrap();
        s.write(b"leaf", (32 << 20) - 2).unwrap(); // across two leaves
        s.read(&mut buf, size - 512).unwrap();
        assert_eq!(&buf[509..], b"end");
        let mut four = [0; 4];
        s.read(&mut four, (32 << 20) - 2).unwrap();
        assert_eq!(&four, b"leaf");
        assert_eq!(s.pages(), 3);
        let last = size / P * P;
        assert_eq!(extents(&s, 0, size, false), [
            (0, (32 << 20) - P, HOLE | ZERO), ((32 << 20) - P, 2 * P, 0),
            ((32 << 20) + P, last - (32 << 20) - P, HOLE | ZERO), (last, size - last, 0)]);
        // Past the end, or wrapping around: errors, not panics.
        assert!(s.read(&mut buf, size - 511).is_err());
        assert!(s.write(&buf, u64::MAX - 10).is_err());
        assert!(s.zero(u64::MAX, 1).is_err());
        s.zero(size, 0).unwrap();
        assert_eq!(s.pages(), 0);
    }

    #[test]
    fn writes_spanning_pages_and_fills() {
        let s = Sparse::new(4 * P + 7).unwrap();
        let data: Vec<u8> = (0..3 * P + 11).map(|i| (i % 251) as u8 + 1).collect();
        s.write(&data, P - 5).unwrap();
        s.fill(0xcc, 3, 4 * P + 4).unwrap();
        let mut all = vec![0xee; (4 * P + 7) as usize];
        s.read(&mut all, 0).unwrap();
        assert!(all[..(P - 5) as usize].iter().all(|&b| b == 0));
        assert!(all[(P - 5) as usize..(4 * P + 4) as usize] == data[..(3 * P + 9) as usize]);
        assert_eq!(all[(4 * P + 4) as usize..], [0xcc; 3]);
    }

    #[test]
    fn lent_slices_are_what_read_returns() {
        let s = Sparse::new(12 * P + 100).unwrap();
        let data: Vec<u8> = (0..5 * P + 13).map(|i| (i % 253) as u8 + 1).collect();
        s.write(&data, 2 * P - 7).unwrap();
        s.write(&[0; 9], 9 * P).unwrap(); // an allocated page of zeroes
        for (offset, count) in [(0, 12 * P + 100), (2 * P - 7, 1), (P + 1, 3 * P), (11 * P, P + 100), (5, 0)] {
            let mut want = vec![0xee; count as usize];
            s.read(&mut want, offset).unwrap();
            let mut got = Vec::new();
            let mut calls = 0;
            let r = s.lend(count as usize, offset, &mut |slices| {
                calls += 1;
                assert!(slices.iter().all(|s| s.len() <= PAGE_SIZE));
                got = slices.concat();
            });
            assert!(matches!(r, Some(Ok(()))));
            assert_eq!((calls, got.len()), (1, count as usize));
            assert!(got == want, "offset {offset} count {count}");
        }
        // Out of range: an error, the sink not called; too big: not lent.
        assert!(matches!(s.lend(101, 12 * P, &mut |_| panic!()), Some(Err(_))));
        let big = Sparse::new(64 << 20).unwrap();
        assert!(big.lend(LEND_MAX + 1, 0, &mut |_| panic!()).is_none());
    }

    #[test]
    fn filled_writes_apply_whole_or_not_at_all() {
        let s = Sparse::new(16 * P).unwrap();
        let old: Vec<u8> = (0..16 * P).map(|i| (i % 241) as u8 + 1).collect();
        s.write(&old[..(8 * P) as usize], 0).unwrap(); // pages 8.. stay absent
        let mut model = old.clone();
        model[(8 * P) as usize..].fill(0);
        let check = |model: &[u8]| {
            let mut all = vec![0xee; (16 * P) as usize];
            s.read(&mut all, 0).unwrap();
            assert!(all == model);
        };
        // (offset, count): whole pages, partial ends, absent pages, mixed.
        let cases = [(2 * P, 3 * P), (P + 5, 2 * P), (9 * P + 100, P), (7 * P - 3, 2 * P + 6), (0, 16 * P), (15 * P, 1)];
        for (k, &(offset, count)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..count).map(|i| ((i + k as u64 * 7) % 239) as u8 + 2).collect();
            // A payload cut off: nothing changes.
            let r = s.write_fill(count as usize, offset, &mut |bufs| {
                assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), count as usize);
                bufs[0].fill(0x55);
                false
            });
            assert!(matches!(r, Some(Ok(()))));
            check(&model);
            // A whole payload: exactly these bytes change (reused pages with
            // stale data never show through).
            let r = s.write_fill(count as usize, offset, &mut |bufs| {
                let mut at = 0;
                for b in bufs.iter_mut() {
                    b.copy_from_slice(&data[at..at + b.len()]);
                    at += b.len();
                }
                true
            });
            assert!(matches!(r, Some(Ok(()))));
            model[offset as usize..(offset + count) as usize].copy_from_slice(&data);
            check(&model);
        }
        assert!(matches!(s.write_fill(2, 16 * P - 1, &mut |_| panic!()), Some(Err(_))));
        assert!(s.write_fill(LEND_MAX + 1, 0, &mut |_| panic!()).is_none());
    }

    // Bad-input P19 (ENOMEM under `ulimit -v`, earlier data intact) is tested
    // through the real server in tests/hostile_transmission.rs.
}
