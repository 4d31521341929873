//! The plugin and filter API: nbdkit's callback tables as Rust traits.
//!
//! A [`Plugin`] is configured once (`config`, `config_complete`,
//! `get_ready`), then opens one [`Handle`] per connection. A [`Filter`]
//! does the same, but its `open` receives the layer below as [`Next`] and
//! its handle usually wraps the handle below ([`FilterHandle`] forwards
//! every call it does not override). Between every two layers sits
//! [`checked::Checked`], written once: capability caching, range checks,
//! knock-on rules and emulations.

pub mod chain;
pub mod checked;
pub mod extents;
pub mod registry;

pub use extents::{Extent, Extents};
pub use registry::{FilterEntry, PluginEntry};

use crate::error::{Error, ErrorKind, Result};

/// How much concurrency a layer tolerates; the chain gets the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadModel {
    /// One connection at a time.
    SerializeConnections = 0,
    /// One callback at a time across all connections.
    SerializeAllRequests = 1,
    /// One request at a time per connection.
    SerializeRequests = 2,
    /// Anything goes.
    Parallel = 3,
}

impl ThreadModel {
    /// The name `--dump-plugin` prints.
    pub fn name(self) -> &'static str {
        match self {
            ThreadModel::SerializeConnections => "serialize_connections",
            ThreadModel::SerializeAllRequests => "serialize_all_requests",
            ThreadModel::SerializeRequests => "serialize_requests",
            ThreadModel::Parallel => "parallel",
        }
    }
}

/// nbdkit's tri-state for zero, FUA and cache support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Support {
    /// Not supported at all.
    #[default]
    None,
    /// The checking layer emulates it (zero by writing, FUA by flush, cache by reading).
    Emulate,
    /// The layer does it itself.
    Native,
}

/// Flags of data calls, as nbdkit passes them to plugins (not the wire bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// zero may punch holes.
    pub const MAY_TRIM: Flags = Flags(1);
    /// Forced unit access: persist before returning.
    pub const FUA: Flags = Flags(2);
    /// extents: only the first extent is needed.
    pub const REQ_ONE: Flags = Flags(4);
    /// zero: fail with ENOTSUP unless zeroing is faster than writing.
    pub const FAST_ZERO: Flags = Flags(8);

    /// True if every bit of `f` is set.
    pub fn contains(self, f: Flags) -> bool {
        self.0 & f.0 == f.0
    }
    /// These flags plus `f`.
    pub fn with(self, f: Flags) -> Flags {
        Flags(self.0 | f.0)
    }
    /// These flags less `f`.
    pub fn without(self, f: Flags) -> Flags {
        Flags(self.0 & !f.0)
    }
}

/// What a `config` call did with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// This layer took it.
    Used,
    /// Not this layer's: a filter passes it down, a plugin rejects it.
    NotMine,
}

/// One entry of an export list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Export {
    /// Export name (at most 4096 bytes).
    pub name: String,
    /// Optional human-readable description.
    pub description: Option<String>,
}

impl Export {
    /// An export without description.
    pub fn new(name: impl Into<String>) -> Export {
        Export { name: name.into(), description: None }
    }
}

/// Block size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum: a power of 2 in 1..=64 KiB.
    pub min: u32,
    /// Preferred: a power of 2 in 512..=32 MiB, at least `min`.
    pub preferred: u32,
    /// Maximum: 0xffffffff or a multiple of `min`, at least `preferred`.
    pub max: u32,
}

impl BlockSize {
    /// nbdkit's validity rule for block sizes returned by a layer.
    pub fn is_valid(&self) -> bool {
        let BlockSize { min, preferred, max } = *self;
        min.is_power_of_two()
            && min <= 65536
            && preferred.is_power_of_two()
            && (512..=32 * 1024 * 1024).contains(&preferred)
            && (max == u32::MAX || max % min == 0)
            && min <= preferred
            && preferred <= max
    }
}

/// Everything a handle can do, asked once per connection and cached by the
/// checking layer (nbdkit's `can_*` callbacks together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// can_write.
    pub write: bool,
    /// can_flush.
    pub flush: bool,
    /// is_rotational.
    pub rotational: bool,
    /// can_trim.
    pub trim: bool,
    /// can_zero (plugins: Native if they zero themselves, Emulate otherwise).
    pub zero: Support,
    /// can_fast_zero.
    pub fast_zero: bool,
    /// can_extents.
    pub extents: bool,
    /// can_fua.
    pub fua: Support,
    /// can_multi_conn.
    pub multi_conn: bool,
    /// can_cache.
    pub cache: Support,
}

impl Caps {
    /// A disk held in RAM (the memory, data and null plugins): everything
    /// native. FUA and cache have nothing to do (every write is as durable
    /// as it will get, the data is already in memory), and all connections
    /// share the disk, so a flush on one covers all (multi-conn).
    pub const RAM_DISK: Caps = Caps {
        write: true,
        flush: true,
        rotational: false,
        trim: true,
        zero: Support::Native,
        fast_zero: true,
        extents: true,
        fua: Support::Native,
        multi_conn: true,
        cache: Support::Native,
    };

    /// nbdkit's knock-on rules: no write means no trim, zero, fast zero or FUA.
    pub fn normalized(mut self) -> Caps {
        if !self.write {
            self.trim = false;
            self.zero = Support::None;
            self.fua = Support::None;
        }
        if self.zero == Support::None {
            self.fast_zero = false;
        }
        self
    }
}

/// A per-connection open export: nbdkit's per-handle callbacks.
///
/// Methods without a default are required. Calls may come from several
/// threads at once when the thread model is parallel.
pub trait Handle: Send + Sync {
    /// get_size.
    fn size(&self) -> Result<u64>;
    /// All can_* answers.
    fn caps(&self) -> Result<Caps>;
    /// block_size; `None` means no NBD_INFO_BLOCK_SIZE.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(None)
    }
    /// export_description.
    fn export_description(&self) -> Option<String> {
        None
    }
    /// False if every call returns quickly without blocking the thread, so
    /// the server may call it on its own thread instead of the blocking pool.
    fn blocks(&self) -> bool {
        true
    }
    /// True if, as a rule, a call that blocks does so briefly and without
    /// waiting for a disk: a WRITE, TRIM or ZERO without FUA lands in a
    /// page cache, as with the file plugin (unless cache=none). The server
    /// may then run such calls on its own thread while they stay quick
    /// (server/brief.rs). False by default; a layer that sleeps on purpose
    /// or waits for a network says false.
    fn brief(&self) -> bool {
        false
    }
    /// Read exactly `buf.len()` bytes at `offset`.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()>;
    /// Zero-copy read: lends `[offset, offset+count)` to `sink` as slices
    /// of the layer's own storage, held still for the call, so the server
    /// can send them without copying them into a buffer first. `None` if
    /// the layer cannot (the server then calls `pread`). `sink` runs at
    /// most once and bounds how long it keeps the slices; filters never
    /// lend (they may change the data), only plugins that keep it in RAM.
    fn pread_lend(&self, _count: usize, _offset: u64, _sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        None
    }
    /// A read that never waits for a disk: `Some` once all of `buf` was
    /// read from memory (the file plugin's page cache), `None` if that
    /// would block or the layer cannot tell (the server then calls `pread`
    /// on a thread that may block). Filters never forward it.
    fn pread_nowait(&self, _buf: &mut [u8], _offset: u64) -> Option<Result<()>> {
        None
    }
    /// Zero-copy read from a file: the descriptor and file offset holding
    /// `[offset, offset+count)`, for the server to send with `sendfile`
    /// (no copy through user space). `Some` only if the file holds the
    /// whole range now (a read past its end must take `pread`, which
    /// reports the error before any reply goes out) and, with
    /// `cached_only`, if the range is in the page cache (the call then
    /// runs on a thread that must not wait for a disk). The file must stay
    /// open while the handle lives. If the file shrinks after this answer,
    /// `sendfile` comes up short and the server closes the connection.
    /// Filters never forward it (they may change the data).
    fn pread_fd(&self, _count: usize, _offset: u64, _cached_only: bool) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }
    /// Zero-copy write: hands `fill` fresh storage for `[offset,
    /// offset+count)` as slices to fill (the server reads the payload
    /// straight into them) and makes it the data only if `fill` returns
    /// true, that is if every byte arrived; otherwise nothing changes. An
    /// error returned before `fill` ran leaves the payload unread. `None`
    /// if the layer cannot (the server then calls `pwrite`, with the
    /// payload still unread). Filters never do; `fill` may block, so the
    /// layer must not hold locks others wait for while it runs.
    fn pwrite_fill(&self, _count: usize, _offset: u64, _flags: Flags,
                   _fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        None
    }
    /// Write `buf` at `offset` (FUA only if caps.fua is Native).
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::new(ErrorKind::ReadOnly, "pwrite not supported"))
    }
    /// Persist every completed write.
    fn flush(&self, _flags: Flags) -> Result<()> {
        Err(Error::invalid("flush not supported"))
    }
    /// Discard a range (advisory).
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::invalid("trim not supported"))
    }
    /// Make a range read as zeroes; `NotSupported` makes the checking layer
    /// fall back to writing zeroes (unless FAST_ZERO).
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::new(ErrorKind::NotSupported, "zero not supported"))
    }
    /// Describe allocation from `offset`; add at least one extent.
    fn extents(&self, count: u64, offset: u64, _flags: Flags, ext: &mut Extents) -> Result<()> {
        ext.add(offset, count, 0)
    }
    /// Prefetch a range (only called if caps.cache is Native).
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

/// The layer below a filter, as the filter's global callbacks see it.
pub trait Next: Send + Sync {
    /// preconnect of the layer below.
    fn preconnect(&self, readonly: bool) -> Result<()>;
    /// list_exports of the layer below.
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>>;
    /// default_export of the layer below.
    fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String>;
    /// Open the layer below; the handle comes wrapped in the checking layer.
    fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>>;
}

/// A plugin: global configuration, then one handle per connection.
pub trait Plugin: Send + Sync {
    /// config: one key=value of the command line.
    fn config(&mut self, _key: &str, _value: &str) -> Result<Param> {
        Ok(Param::NotMine)
    }
    /// config_complete: every key is in; check that the required ones are.
    fn config_complete(&mut self) -> Result<()> {
        Ok(())
    }
    /// thread_model: may only tighten the entry's maximum.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }
    /// dump_plugin: extra `key=value` lines for `--dump-plugin`.
    fn dump_plugin(&self) -> Vec<String> {
        Vec::new()
    }
    /// get_ready: last chance to fail on the terminal.
    fn get_ready(&mut self) -> Result<()> {
        Ok(())
    }
    /// after_fork: start background work here.
    fn after_fork(&self) -> Result<()> {
        Ok(())
    }
    /// cleanup: the server is exiting.
    fn cleanup(&self) {}
    /// preconnect: before any byte of NBD; an error drops the client.
    fn preconnect(&self, _readonly: bool) -> Result<()> {
        Ok(())
    }
    /// list_exports; the default is the single default export.
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        Ok(vec![Export::new(self.default_export(readonly, is_tls).unwrap_or_default())])
    }
    /// default_export: the canonical name of export ""; `None` forbids "".
    fn default_export(&self, _readonly: bool, _is_tls: bool) -> Option<String> {
        Some(String::new())
    }
    /// open: a handle for one connection.
    fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>>;
}

/// A filter: like a plugin, but its callbacks can reach the layer below.
pub trait Filter: Send + Sync {
    /// config; `NotMine` passes the key to the next layer.
    fn config(&mut self, _key: &str, _value: &str) -> Result<Param> {
        Ok(Param::NotMine)
    }
    /// config_complete.
    fn config_complete(&mut self) -> Result<()> {
        Ok(())
    }
    /// thread_model.
    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }
    /// get_ready, after the plugin's.
    fn get_ready(&mut self, _model: ThreadModel) -> Result<()> {
        Ok(())
    }
    /// after_fork, after the plugin's.
    fn after_fork(&self) -> Result<()> {
        Ok(())
    }
    /// cleanup, before the plugin's.
    fn cleanup(&self) {}
    /// preconnect.
    fn preconnect(&self, next: &dyn Next, readonly: bool) -> Result<()> {
        next.preconnect(readonly)
    }
    /// list_exports.
    fn list_exports(&self, next: &dyn Next, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        next.list_exports(readonly, is_tls)
    }
    /// default_export.
    fn default_export(&self, next: &dyn Next, readonly: bool, is_tls: bool) -> Option<String> {
        next.default_export(readonly, is_tls)
    }
    /// open: normally opens `next` and wraps its handle.
    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        next.open(readonly, export, is_tls)
    }
}

/// A filter's handle: override what the filter changes, the rest forwards
/// to `next()` (nbdkit's model). Every `FilterHandle` is a [`Handle`].
pub trait FilterHandle: Send + Sync {
    /// The handle of the layer below.
    fn next(&self) -> &dyn Handle;
    /// get_size.
    fn size(&self) -> Result<u64> {
        self.next().size()
    }
    /// can_*.
    fn caps(&self) -> Result<Caps> {
        self.next().caps()
    }
    /// block_size.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.next().block_size()
    }
    /// export_description.
    fn export_description(&self) -> Option<String> {
        self.next().export_description()
    }
    /// See [`Handle::blocks`].
    fn blocks(&self) -> bool {
        self.next().blocks()
    }
    /// See [`Handle::brief`].
    fn brief(&self) -> bool {
        self.next().brief()
    }
    /// pread.
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next().pread(buf, offset, flags)
    }
    /// pwrite.
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.next().pwrite(buf, offset, flags)
    }
    /// flush.
    fn flush(&self, flags: Flags) -> Result<()> {
        self.next().flush(flags)
    }
    /// trim.
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().trim(count, offset, flags)
    }
    /// zero.
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().zero(count, offset, flags)
    }
    /// extents.
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.next().extents(count, offset, flags, ext)
    }
    /// cache.
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next().cache(count, offset, flags)
    }
}

impl<T: FilterHandle> Handle for T {
    fn size(&self) -> Result<u64> {
        FilterHandle::size(self)
    }
    fn caps(&self) -> Result<Caps> {
        FilterHandle::caps(self)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        FilterHandle::block_size(self)
    }
    fn export_description(&self) -> Option<String> {
        FilterHandle::export_description(self)
    }
    fn blocks(&self) -> bool {
        FilterHandle::blocks(self)
    }
    fn brief(&self) -> bool {
        FilterHandle::brief(self)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        FilterHandle::pread(self, buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        FilterHandle::pwrite(self, buf, offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        FilterHandle::flush(self, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        FilterHandle::trim(self, count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        FilterHandle::zero(self, count, offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        FilterHandle::extents(self, count, offset, flags, ext)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        FilterHandle::cache(self, count, offset, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_write_turns_off_everything_that_writes() {
        let c = Caps { write: false, trim: true, zero: Support::Native, fast_zero: true,
                       fua: Support::Native, ..Caps::default() }.normalized();
        assert!(!c.trim && c.zero == Support::None && !c.fast_zero && c.fua == Support::None);
    }

    #[test]
    fn block_size_rules() {
        assert!(BlockSize { min: 1, preferred: 4096, max: u32::MAX }.is_valid());
        assert!(!BlockSize { min: 3, preferred: 4096, max: u32::MAX }.is_valid());
        assert!(!BlockSize { min: 512, preferred: 256, max: u32::MAX }.is_valid());
        assert!(!BlockSize { min: 512, preferred: 4096, max: 1000 }.is_valid());
    }
}
