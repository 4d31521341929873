//! The global allocator: the system's `malloc` with a small, bounded cache
//! of freed mid-size blocks in front of it.
//!
//! Why: the static binary links musl, whose `malloc` (mallocng) does not
//! keep freed groups of the size classes above about 24 KiB: every `free`
//! of such a block `munmap`s it and the next `malloc` `mmap`s it again,
//! with the page faults, page clearing and TLB shoot-downs that brings,
//! and every call takes malloc's one lock. russh allocates two buffers of
//! just over 32 KiB per incoming SSH channel packet, so the ssh plugin's
//! reads paid 25–30 % of their CPU there (docs/performance.md, "ssh
//! plugin"). glibc's `malloc` maps blocks from 128 KiB on (its threshold
//! moves with use) and the cache spares those calls too.
//!
//! What: blocks of more than [`MIN`] and at most [`MAX`] bytes, with the
//! usual alignment (≤ 16), are rounded up to one of [`CLASSES`] size
//! classes (four per power of two: 20, 24, 28, 32, 40 KiB, …, 1 MiB). A
//! freed block goes onto its class's free list instead of back to
//! `malloc` while the list has room ([`SLOTS`] blocks) and the cache as a
//! whole holds less than [`BUDGET`] bytes; an allocation of that class
//! takes a block from the list first. Everything else goes straight to
//! [`System`]. Each list has its own lock, taken only with a try-lock:
//! a thread that finds it taken does not wait but uses `malloc`, so the
//! cache never blocks a thread and never allocates.
//!
//! A block's class follows from its [`Layout`] alone, so `dealloc` and
//! `realloc` (which the caller gives the same layout) know without a
//! header whether a pointer is a rounded-up block.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Blocks of this size or smaller go straight to `malloc` (which keeps
/// its small groups).
pub const MIN: usize = 16 * 1024;
/// Blocks larger than this go straight to `malloc`.
pub const MAX: usize = 1024 * 1024;
/// Size classes between `MIN` (exclusive) and `MAX` (inclusive): four per
/// power of two.
pub const CLASSES: usize = 24;
/// Free blocks kept per class at most.
pub const SLOTS: usize = 64;
/// Bytes held by the whole cache at most.
pub const BUDGET: usize = 16 * 1024 * 1024;
/// The largest alignment a cached block serves (what `malloc` gives).
const ALIGN: usize = 16;

/// The class of a request of `size` bytes (`MIN < size <= MAX`) and the
/// size it is rounded up to.
#[inline]
pub fn class_of(size: usize) -> (usize, usize) {
    debug_assert!(size > MIN && size <= MAX);
    let s = size - 1;
    let top = usize::BITS as usize - 1 - s.leading_zeros() as usize; // 14..=19
    let shift = top - 2;
    let quarter = (s >> shift) & 3;
    ((top - 14) * 4 + quarter, (5 + quarter) << shift)
}

/// The class of a layout, if its blocks are cached.
#[inline]
fn cached(layout: &Layout) -> Option<(usize, usize)> {
    if layout.size() > MIN && layout.size() <= MAX && layout.align() <= ALIGN {
        Some(class_of(layout.size()))
    } else {
        None
    }
}

struct Class {
    locked: AtomicBool,
    len: UnsafeCell<usize>,
    free: UnsafeCell<[*mut u8; SLOTS]>,
}

/// The allocator; `MidCache::new()` is `const`, for `#[global_allocator]`.
pub struct MidCache {
    classes: [Class; CLASSES],
    bytes: AtomicUsize,
}

// SAFETY: a class's `len` and `free` are only touched by the thread that
// holds its `locked` flag; the pointers in it are owned blocks nobody else
// uses.
unsafe impl Sync for MidCache {}
// SAFETY: the blocks on its lists belong to no thread.
unsafe impl Send for MidCache {}

impl Default for MidCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MidCache {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const EMPTY: Class = Class {
            locked: AtomicBool::new(false),
            len: UnsafeCell::new(0),
            free: UnsafeCell::new([ptr::null_mut(); SLOTS]),
        };
        MidCache { classes: [EMPTY; CLASSES], bytes: AtomicUsize::new(0) }
    }

    /// Bytes held in free lists now.
    pub fn cached_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A free block of class `c` (`size` bytes), if one is at hand.
    #[inline]
    fn take(&self, c: usize, size: usize) -> *mut u8 {
        let class = &self.classes[c];
        if class.locked.swap(true, Ordering::Acquire) {
            return ptr::null_mut();
        }
        // SAFETY: we hold the class's flag.
        let p = unsafe {
            let len = &mut *class.len.get();
            if *len == 0 {
                ptr::null_mut()
            } else {
                *len -= 1;
                (*class.free.get())[*len]
            }
        };
        class.locked.store(false, Ordering::Release);
        if !p.is_null() {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        p
    }

    /// Keeps block `p` of class `c` (`size` bytes); false if there is no
    /// room (the caller frees it).
    #[inline]
    fn keep(&self, c: usize, size: usize, p: *mut u8) -> bool {
        if self.bytes.fetch_add(size, Ordering::Relaxed) + size > BUDGET {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        let class = &self.classes[c];
        let kept = if class.locked.swap(true, Ordering::Acquire) {
            false
        } else {
            // SAFETY: we hold the class's flag.
            let kept = unsafe {
                let len = &mut *class.len.get();
                if *len < SLOTS {
                    (*class.free.get())[*len] = p;
                    *len += 1;
                    true
                } else {
                    false
                }
            };
            class.locked.store(false, Ordering::Release);
            kept
        };
        if !kept {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        kept
    }
}

// SAFETY: every block handed out is either System's for the caller's own
// layout, or a System block of the class size (≥ the layout's size, with
// malloc's 16-byte alignment ≥ the layout's) that nobody else holds: it
// came from System or from a free list, and a block is on a free list
// only after its owner deallocated it. Deallocation finds the same class
// from the same layout, so a block returns to System with the layout it
// was allocated with.
//
// The four entry points are never inlined: with fat LTO they would be
// copied into every allocation site of the program (+800 KB of text in
// the static binary); one call more per allocation costs next to nothing.
unsafe impl GlobalAlloc for MidCache {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match cached(&layout) {
            Some((c, size)) => {
                let p = self.take(c, size);
                if !p.is_null() {
                    return p;
                }
                // SAFETY: size > 0, align ≤ 16 is a power of two.
                unsafe { System.alloc(Layout::from_size_align_unchecked(size, ALIGN)) }
            }
            // SAFETY: the caller's layout, as GlobalAlloc requires.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match cached(&layout) {
            Some((c, size)) => {
                let p = self.take(c, size);
                if !p.is_null() {
                    // SAFETY: p holds `size` ≥ layout.size() bytes.
                    unsafe { ptr::write_bytes(p, 0, layout.size()) };
                    return p;
                }
                // SAFETY: as in alloc.
                unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(size, ALIGN)) }
            }
            // SAFETY: the caller's layout.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match cached(&layout) {
            Some((c, size)) => {
                if !self.keep(c, size, p) {
                    // SAFETY: p was allocated by System with the class layout.
                    unsafe { System.dealloc(p, Layout::from_size_align_unchecked(size, ALIGN)) }
                }
            }
            // SAFETY: p was allocated by System with this layout.
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (the whole body): the caller's contract for `realloc`:
        // p is live with `layout`, new_size > 0 and fits the alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (cached(&layout), cached(&new_layout)) {
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            (Some((c, _)), Some((n, _))) if c == n => p,
            // Another size: the C library's realloc on the sizes the block
            // has and will have (a class's size for a cached one), so it
            // can grow in place or move pages with `mremap` instead of
            // copying; the result is then a block like any other of its
            // new layout. Alignment ≤ 16 here, which `realloc` gives.
            (old, new) => {
                let from = old.map_or(layout.size(), |(_, size)| size);
                let to = new.map_or(new_size, |(_, size)| size);
                unsafe { System.realloc(p, Layout::from_size_align_unchecked(from, ALIGN), to) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn classes_round_up_by_quarters() {
        assert_eq!(class_of(MIN + 1), (0, 20 * 1024));
        assert_eq!(class_of(20 * 1024), (0, 20 * 1024));
        assert_eq!(class_of(20 * 1024 + 1), (1, 24 * 1024));
        assert_eq!(class_of(32 * 1024), (3, 32 * 1024));
        assert_eq!(class_of(32 * 1024 + 13), (4, 40 * 1024));
        assert_eq!(class_of(MAX), (CLASSES - 1, MAX));
        let mut last = (0, 0);
        for size in (MIN + 1..=MAX).step_by(977).chain([MAX]) {
            let (c, s) = class_of(size);
            assert!(s >= size && s - size < size / 4 + 1, "{size} -> {s}");
            assert!(c < CLASSES && c >= last.0 && s >= last.1);
            last = (c, s);
        }
    }

    #[test]
    fn freed_blocks_are_reused_and_bounded() {
        let a = MidCache::new();
        let l = Layout::from_size_align(32 * 1024 + 100, 8).unwrap();
        unsafe {
            let p = a.alloc(l);
            p.write_bytes(7, l.size());
            a.dealloc(p, l);
            assert_eq!(a.cached_bytes(), 40 * 1024);
            // Same class, another size: the same block.
            let l2 = Layout::from_size_align(36 * 1024, 16).unwrap();
            let q = a.alloc_zeroed(l2);
            assert_eq!(q, p);
            assert!(std::slice::from_raw_parts(q, l2.size()).iter().all(|&b| b == 0));
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(q, l2);
            // A class's list is bounded.
            let many: Vec<_> = (0..SLOTS + 10).map(|_| a.alloc(l)).collect();
            for &p in &many {
                a.dealloc(p, l);
            }
            assert_eq!(a.cached_bytes(), SLOTS * 40 * 1024);
            // So is the whole cache.
            let big = Layout::from_size_align(MAX, 16).unwrap();
            let many_big: Vec<_> = (0..40).map(|_| a.alloc(big)).collect();
            for &p in &many_big {
                a.dealloc(p, big);
            }
            assert!(a.cached_bytes() <= BUDGET);
            assert!(a.cached_bytes() > BUDGET - MAX);
            // Large alignments and other sizes are not cached.
            let aligned = Layout::from_size_align(64 * 1024, 4096).unwrap();
            let p = a.alloc(aligned);
            assert_eq!(p as usize % 4096, 0);
            let before = a.cached_bytes();
            a.dealloc(p, aligned);
            assert_eq!(a.cached_bytes(), before);
        }
    }

    #[test]
    fn realloc_keeps_contents_across_classes() {
        let a = MidCache::new();
        unsafe {
            let mut layout = Layout::from_size_align(100, 1).unwrap();
            let mut p = a.alloc(layout);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            for new_size in [5000, 17_000, 20 * 1024, 33_000, 700_000, 2 << 20, 40_000, 60, 100] {
                p = a.realloc(p, layout, new_size);
                assert!(!p.is_null());
                layout = Layout::from_size_align(new_size, 1).unwrap();
                for i in 0..60 {
                    assert_eq!(*p.add(i), i as u8, "after realloc to {new_size}");
                }
            }
            a.dealloc(p, layout);
        }
    }

    /// Whether the block's first and last 64 bytes and one byte in every
    /// 4 KiB are `v` (a full scan of every block makes the test slow).
    unsafe fn holds(p: *mut u8, len: usize, v: u8) -> bool {
        let s = unsafe { std::slice::from_raw_parts(p, len) };
        s.iter().take(64).chain(s.iter().rev().take(64)).chain(s.iter().step_by(4096)).all(|&b| b == v)
    }

    /// One operation of the stress test: (slot, size); size 0 frees.
    fn ops() -> impl Strategy<Value = Vec<(usize, usize)>> {
        let size = prop_oneof![
            Just(0usize),
            1usize..4096,
            MIN - 64..MIN + 64,
            MIN..MAX + 4096,
            Just(32 * 1024 + 40),
        ];
        proptest::collection::vec((0usize..16, size), 1..200)
    }

    /// Runs `ops` on slots of blocks, each filled with a pattern of its
    /// own that is checked before every realloc and free.
    fn run_ops(a: &MidCache, ops: &[(usize, usize)], tag: u8) {
        let mut slots: Vec<Option<(*mut u8, Layout, u8)>> = vec![None; 16];
        for (n, &(slot, size)) in ops.iter().enumerate() {
            let fill = tag ^ n as u8;
            unsafe {
                let check = |p: *mut u8, len: usize, v: u8| {
                    assert!(holds(p, len, v), "block overwritten");
                };
                match (slots[slot].take(), size) {
                    (None, 0) => {}
                    (Some((p, l, v)), 0) => {
                        check(p, l.size(), v);
                        a.dealloc(p, l);
                    }
                    (None, size) => {
                        let l = Layout::from_size_align(size, 8).unwrap();
                        let p = if n % 3 == 0 { a.alloc_zeroed(l) } else { a.alloc(l) };
                        assert!(!p.is_null());
                        if n % 3 == 0 {
                            check(p, size, 0);
                        }
                        p.write_bytes(fill, size);
                        slots[slot] = Some((p, l, fill));
                    }
                    (Some((p, l, v)), size) => {
                        check(p, l.size(), v);
                        let q = a.realloc(p, l, size);
                        assert!(!q.is_null());
                        check(q, l.size().min(size), v);
                        q.write_bytes(fill, size);
                        slots[slot] = Some((q, Layout::from_size_align(size, 8).unwrap(), fill));
                    }
                }
            }
        }
        for (p, l, v) in slots.into_iter().flatten() {
            unsafe {
                assert!(holds(p, l.size(), v));
                a.dealloc(p, l);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Four threads run their own random sequences of alloc, realloc
        /// and free on one cache: no block is handed out twice (each
        /// thread's patterns survive) and the cache stays in its budget.
        #[test]
        fn stress_from_many_threads(seqs in proptest::collection::vec(ops(), 4)) {
            let a = Arc::new(MidCache::new());
            let threads: Vec<_> = seqs
                .into_iter()
                .enumerate()
                .map(|(t, ops)| {
                    let a = a.clone();
                    std::thread::spawn(move || {
                        for round in 0..4u8 {
                            run_ops(&a, &ops, (t as u8) << 4 | round);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            prop_assert!(a.cached_bytes() <= BUDGET);
        }
    }

    #[test]
    fn hammer_one_class_from_many_threads() {
        let a = Arc::new(MidCache::new());
        let l = Layout::from_size_align(32 * 1024 + 40, 8).unwrap();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || unsafe {
                    for i in 0..500usize {
                        let n = 1 + i % 5;
                        let ps: Vec<_> = (0..n).map(|_| a.alloc(l)).collect();
                        for &p in &ps {
                            p.write_bytes(t, l.size());
                        }
                        for &p in &ps {
                            assert!(holds(p, l.size(), t));
                            a.dealloc(p, l);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(a.cached_bytes() <= SLOTS * 40 * 1024);
    }
}
