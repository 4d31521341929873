//! `allocator=malloc[,mlock=true]`: one contiguous buffer, allocated
//! whole by the size hint (zeroed lazily by the kernel), optionally locked
//! in RAM. Reads share an `RwLock`, writes take it alone. Writes past the
//! end grow the buffer, as nbdkit's does (the data plugin relies on it).

use std::alloc::Layout;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{end_within, nomem, Allocator};
use crate::backend::Extents;
use crate::error::{Error, Result};
use crate::util::parse::parse_bool;

/// Largest offset any allocator accepts (nbdkit's disks end at 2^63-1).
const LIMIT: u64 = i64::MAX as u64;

/// A disk in one buffer.
pub struct Malloc {
    mlock: bool,
    bytes: RwLock<Vec<u8>>,
}

impl Malloc {
    /// An empty disk; `mlock` locks the buffer in RAM.
    pub fn new(mlock: bool) -> Malloc {
        Malloc { mlock, bytes: RwLock::new(Vec::new()) }
    }

    /// From `allocator=malloc,…` parameters: `mlock=BOOL` only.
    pub fn from_params(params: &[(&str, &str)]) -> Result<Malloc> {
        let mut mlock = false;
        for &(key, value) in params {
            match key {
                "mlock" => mlock = parse_bool(value)?,
                _ => return Err(Error::invalid(format!("allocator=malloc: unknown parameter {key}"))),
            }
        }
        Ok(Malloc::new(mlock))
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Grows `v` to `len` zeroed bytes (never shrinks), keeping it locked.
    fn extend(&self, v: &mut Vec<u8>, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| nomem("realloc"))?;
        if len <= v.len() {
            return Ok(());
        }
        if v.is_empty() {
            *v = zeroed(len)?;
        } else {
            if self.mlock {
                munlock(v);
            }
            v.try_reserve_exact(len - v.len()).map_err(|_| nomem("realloc"))?;
            v.resize(len, 0);
        }
        if self.mlock {
            mlock(v)?;
        }
        Ok(())
    }

    /// Writes `len` bytes at `offset`, growing the buffer first if needed.
    fn put(&self, len: u64, offset: u64, f: impl FnOnce(&mut [u8])) -> Result<()> {
        let end = end_within("allocator=malloc", offset, len, LIMIT)?;
        let mut v = self.write_lock();
        self.extend(&mut v, end)?;
        f(&mut v[offset as usize..end as usize]);
        Ok(())
    }
}

/// `len` zero bytes straight from the allocator: large ones come from
/// fresh mmap'd pages, so a big disk costs nothing until written.
#[allow(unsafe_code)]
fn zeroed(len: usize) -> Result<Vec<u8>> {
    let layout = Layout::array::<u8>(len).map_err(|_| nomem("calloc"))?;
    // SAFETY: the layout has a non-zero size (callers ask for len > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(nomem("calloc"));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of
    // `len` bytes, all of them initialised (to zero): what a Vec<u8> of
    // length and capacity `len` owns.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

#[allow(unsafe_code)]
fn mlock(v: &[u8]) -> Result<()> {
    // SAFETY: the range is memory this process owns; mlock only pins it.
    if unsafe { libc::mlock(v.as_ptr().cast(), v.len()) } == -1 {
        return Err(Error::last_os("allocator=malloc: mlock"));
    }
    Ok(())
}

#[allow(unsafe_code)]
fn munlock(v: &[u8]) {
    // SAFETY: as mlock; failure only means it was not locked.
    unsafe { libc::munlock(v.as_ptr().cast(), v.len()) };
}

impl Allocator for Malloc {
    fn set_size_hint(&self, size: u64) -> Result<()> {
        let mut v = self.write_lock();
        self.extend(&mut v, size)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = end_within("allocator=malloc", offset, buf.len() as u64, LIMIT)?;
        let v = self.read_lock();
        // Bytes past the buffer were never written: zeroes.
        let have = (v.len() as u64).clamp(offset, end);
        let (inside, outside) = buf.split_at_mut((have - offset) as usize);
        if !inside.is_empty() {
            inside.copy_from_slice(&v[offset as usize..have as usize]);
        }
        outside.fill(0);
        Ok(())
    }

    fn lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        let end = match end_within("allocator=malloc", offset, count as u64, LIMIT) {
            Ok(end) => end,
            Err(e) => return Some(Err(e)),
        };
        let v = self.read_lock();
        // Past the buffer (never written): the copying read fills zeroes.
        if end > v.len() as u64 {
            return None;
        }
        sink(&[&v[offset as usize..end as usize]]);
        Some(Ok(()))
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.put(buf.len() as u64, offset, |dst| dst.copy_from_slice(buf))
    }

    fn fill(&self, byte: u8, count: u64, offset: u64) -> Result<()> {
        match byte {
            0 => self.zero(count, offset),
            _ => self.put(count, offset, |dst| dst.fill(byte)),
        }
    }

    fn zero(&self, count: u64, offset: u64) -> Result<()> {
        let end = end_within("allocator=malloc", offset, count, LIMIT)?;
        let mut v = self.write_lock();
        let stop = (v.len() as u64).min(end);
        if offset < stop {
            v[offset as usize..stop as usize].fill(0);
        }
        Ok(())
    }

    fn extents(&self, count: u64, offset: u64, _req_one: bool, ext: &mut Extents) -> Result<()> {
        ext.add(offset, count, 0) // Every byte is allocated.
    }

    fn preferred_block_size(&self) -> u32 {
        512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lends_what_it_holds_and_nothing_past_it() {
        let m = Malloc::new(false);
        m.set_size_hint(4096).unwrap();
        m.write(b"hello", 100).unwrap();
        let mut got = Vec::new();
        assert!(matches!(m.lend(10, 98, &mut |s| got = s.concat()), Some(Ok(()))));
        assert_eq!(got, b"\0\0hello\0\0\0");
        // Past the buffer the copying read supplies zeroes.
        assert!(m.lend(10, 4090, &mut |_| panic!()).is_none());
        assert!(matches!(m.lend(2, u64::MAX, &mut |_| panic!()), Some(Err(_))));
    }

    #[test]
    fn size_hint_allocates_and_writes_grow() {
        let m = Malloc::new(false);
        m.set_size_hint(1 << 20).unwrap();
        assert_eq!(m.read_lock().len(), 1 << 20);
        m.write(b"abc", (1 << 20) + 10).unwrap();
        assert_eq!(m.read_lock().len(), (1 << 20) + 13);
        let mut buf = [0xee; 20];
        m.read(&mut buf, (1 << 20) + 5).unwrap();
        assert_eq!(buf, *b"\0\0\0\0\0abc\0\0\0\0\0\0\0\0\0\0\0\0");
        m.fill(7, 2, 1).unwrap();
        m.zero(1 << 30, 2).unwrap(); // past the end: nothing to do
        let mut two = [0; 3];
        m.read(&mut two, 0).unwrap();
        assert_eq!(two, [0, 7, 0]);
    }

    #[test]
    fn mlock_parameter() {
        assert!(!Malloc::from_params(&[]).unwrap().mlock);
        assert!(Malloc::from_params(&[("mlock", "1")]).unwrap().mlock);
        assert!(!Malloc::from_params(&[("mlock", "off")]).unwrap().mlock);
        let e = Malloc::from_params(&[("foo", "1")]).err().unwrap();
        assert_eq!(e.message(), "allocator=malloc: unknown parameter foo");
        assert!(Malloc::from_params(&[("mlock", "maybe")]).is_err());
        // Locking a small buffer works, or fails with an OS error; never panics.
        let m = Malloc::new(true);
        if m.set_size_hint(65536).is_ok() {
            m.write(&[1; 100], 65500).unwrap();
        }
    }

    #[test]
    fn impossible_sizes_are_errors() {
        let m = Malloc::new(false);
        assert_eq!(m.set_size_hint(i64::MAX as u64).unwrap_err().kind(), crate::error::ErrorKind::NoMem);
        assert!(m.write(b"x", u64::MAX).is_err());
        assert!(m.read(&mut [0; 2], u64::MAX - 1).is_err());
        let mut buf = [1; 4];
        m.read(&mut buf, (i64::MAX - 4) as u64).unwrap();
        assert_eq!(buf, [0; 4]);
    }
}
