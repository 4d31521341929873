//! Test helpers for filters: an in-memory disk behind a [`Next`], so a
//! filter's `open` and its handle can be exercised without a server.

use std::sync::{Arc, Mutex};

use crate::backend::{BlockSize, Caps, Export, Extents, Flags, Handle, Next, Support};
use crate::error::{Error, ErrorKind, Result};

/// Everything the in-memory disk can do.
pub(crate) const ALL_CAPS: Caps = Caps {
    write: true,
    flush: true,
    rotational: false,
    trim: true,
    zero: Support::Native,
    fast_zero: false,
    extents: true,
    fua: Support::Native,
    multi_conn: true,
    cache: Support::Native,
};

/// The shared state of the disk: its bytes and a log of the calls made.
#[derive(Default)]
pub(crate) struct State {
    /// Contents of the disk.
    pub data: Vec<u8>,
    /// Names of the data calls that reached the disk, in order.
    pub calls: Vec<&'static str>,
    /// The `readonly` argument of every `open`.
    pub opened_readonly: Vec<bool>,
}

/// The layer below the filter under test: opens handles on one shared
/// `Vec<u8>` and records what reached it.
pub(crate) struct MemNext {
    /// Shared with every handle opened.
    pub state: Arc<Mutex<State>>,
    /// What `caps` returns.
    pub caps: Caps,
    /// What `block_size` returns.
    pub block_size: Option<BlockSize>,
}

impl MemNext {
    /// A zeroed disk of `size` bytes with every capability.
    pub fn new(size: usize) -> MemNext {
        MemNext::with_caps(size, ALL_CAPS)
    }
    /// A zeroed disk of `size` bytes with the given capabilities.
    pub fn with_caps(size: usize, caps: Caps) -> MemNext {
        let state = State { data: vec![0; size], ..State::default() };
        MemNext { state: Arc::new(Mutex::new(state)), caps, block_size: None }
    }
    /// The calls that reached the disk so far.
    pub fn calls(&self) -> Vec<&'static str> {
        self.state.lock().unwrap().calls.clone()
    }
    /// The `readonly` flags passed to `open` so far.
    pub fn opened_readonly(&self) -> Vec<bool> {
        self.state.lock().unwrap().opened_readonly.clone()
    }
}

impl Next for MemNext {
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }
    fn list_exports(&self, _readonly: bool, _is_tls: bool) -> Result<Vec<Export>> {
        Ok(vec![Export::new("")])
    }
    fn default_export(&self, _readonly: bool, _is_tls: bool) -> Option<String> {
        Some(String::new())
    }
    fn open(&self, readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        self.state.lock().unwrap().opened_readonly.push(readonly);
        Ok(Box::new(MemHandle { state: self.state.clone(), caps: self.caps, block_size: self.block_size }))
    }
}

/// A handle on the in-memory disk.
pub(crate) struct MemHandle {
    state: Arc<Mutex<State>>,
    caps: Caps,
    block_size: Option<BlockSize>,
}

impl MemHandle {
    /// Log `call`, check the range and run `f` on the bytes.
    fn with<T>(&self, call: &'static str, count: u64, offset: u64, f: impl FnOnce(&mut [u8]) -> T) -> Result<T> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        let end = offset.checked_add(count).filter(|&e| e <= s.data.len() as u64);
        let end = end.ok_or_else(|| Error::invalid(format!("{call}: out of range")))?;
        Ok(f(&mut s.data[offset as usize..end as usize]))
    }
}

impl Handle for MemHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.state.lock().unwrap().data.len() as u64)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(self.caps)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.block_size)
    }
    fn blocks(&self) -> bool {
        false
    }
    /// (As if it were a page cache.)
    fn brief(&self) -> bool {
        true
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.with("pread", buf.len() as u64, offset, |d| buf.copy_from_slice(d))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        if !self.caps.write {
            return Err(Error::new(ErrorKind::ReadOnly, "pwrite: read-only disk"));
        }
        self.with("pwrite", buf.len() as u64, offset, |d| d.copy_from_slice(buf))
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        self.state.lock().unwrap().calls.push("flush");
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.with("trim", count, offset, |d| d.fill(0))
    }
    fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.with("zero", count, offset, |d| d.fill(0))
    }
    fn extents(&self, count: u64, offset: u64, _flags: Flags, ext: &mut Extents) -> Result<()> {
        self.with("extents", count, offset, |_| ())?;
        ext.add(offset, count, 0)
    }
    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.with("cache", count, offset, |_| ())
    }
}
