//! The sparse allocator's 32 KiB pages, carved out of 2 MiB chunks of
//! anonymous memory. malloc (musl's, in the static binary) rounds a
//! 32 KiB allocation up to a bigger size class: a full 1 GiB disk took
//! 1,172 MiB of RSS against nbdkit's 1,029 MiB. Here a page costs its
//! 32 KiB and nothing else. A page that leaves the disk goes on a free
//! list for the next one; beyond [`RESIDENT_MAX`] free pages, their memory
//! goes back to the kernel (`MADV_DONTNEED`), so trimming a big disk gives
//! its RAM back. The kernel backs a page's memory when it is written.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use super::nomem;
use crate::error::Result;

/// Bytes per page, as nbdkit's sparse array.
pub const PAGE_SIZE: usize = 1 << 15;
/// Bytes mapped at a time.
const CHUNK: usize = 2 << 20;

/// Free pages kept in RAM for reuse (32 MiB); more are given back.
const RESIDENT_MAX: usize = 1024;

/// Addresses of free pages (as integers: raw pointers are not `Send`).
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// One page, owned: its bytes are whatever was there before (zeroes when
/// fresh from the kernel), always initialized.
pub struct Page(NonNull<[u8; PAGE_SIZE]>);

// SAFETY: a Page is the only handle to its memory (like a Box), which is
// never unmapped; sending it or sharing `&Page` across threads is as safe
// as for `Box<[u8; PAGE_SIZE]>`.
#[allow(unsafe_code)]
unsafe impl Send for Page {}
#[allow(unsafe_code)]
unsafe impl Sync for Page {}

impl Deref for Page {
    type Target = [u8; PAGE_SIZE];
    #[allow(unsafe_code)]
    fn deref(&self) -> &[u8; PAGE_SIZE] {
        // SAFETY: the pointer is valid, aligned, initialized memory owned
        // by this Page alone; the borrow is tied to `&self`.
        unsafe { self.0.as_ref() }
    }
}

impl DerefMut for Page {
    #[allow(unsafe_code)]
    fn deref_mut(&mut self) -> &mut [u8; PAGE_SIZE] {
        // SAFETY: as `deref`, and `&mut self` makes the borrow unique.
        unsafe { self.0.as_mut() }
    }
}

impl Drop for Page {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        let addr = self.0.as_ptr() as usize;
        if free_list().len() >= RESIDENT_MAX {
            // SAFETY: the page is ours and nothing refers to it any more;
            // the mapping stays, reading as zeroes until written again.
            unsafe { libc::madvise(addr as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
        }
        free_list().push(addr);
    }
}

fn free_list() -> MutexGuard<'static, Vec<usize>> {
    FREE.lock().unwrap_or_else(|e| e.into_inner())
}

/// `n` pages of any content, or ENOMEM (and none taken).
pub fn take(n: usize) -> Result<Vec<Page>> {
    let mut pages = Vec::new();
    pages.try_reserve_exact(n).map_err(|_| nomem("calloc"))?;
    let mut free = free_list();
    while pages.len() < n {
        if free.is_empty() {
            free.try_reserve(CHUNK / PAGE_SIZE).map_err(|_| nomem("calloc"))?;
            let chunk = map_chunk()?;
            // Lowest address on top: a chunk fills up from its start.
            free.extend((0..CHUNK / PAGE_SIZE).rev().map(|i| chunk + i * PAGE_SIZE));
        }
        let k = free.len().saturating_sub(n - pages.len());
        pages.extend(free.drain(k..).rev().map(|a| Page(NonNull::new(a as *mut [u8; PAGE_SIZE]).expect("mapped"))));
    }
    Ok(pages)
}

/// One page of any content.
pub fn one() -> Result<Page> {
    Ok(take(1)?.pop().expect("one page"))
}

/// Maps a chunk of zeroed memory; returns its (page-aligned) address.
#[allow(unsafe_code)]
fn map_chunk() -> Result<usize> {
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), CHUNK, libc::PROT_READ | libc::PROT_WRITE,
                   libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        return Err(nomem("mmap"));
    }
    Ok(p as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_distinct_and_hold_their_bytes() {
        let mut a = take(70).unwrap(); // more than one chunk
        let mut addrs: Vec<usize> = a.iter().map(|p| p.as_ptr() as usize).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 70);
        assert!(addrs.windows(2).all(|w| w[1] - w[0] >= PAGE_SIZE), "pages overlap");
        for (i, p) in a.iter_mut().enumerate() {
            p.fill(i as u8);
        }
        assert!(a.iter().enumerate().all(|(i, p)| p.iter().all(|&b| b == i as u8)));
    }
}
