//! `memory`: a RAM disk of `size=` bytes, initially zero, shared by every
//! connection and lost at exit. The bytes live in an [`Allocator`]
//! (`allocator=sparse` by default), made in get_ready as nbdkit does.

use std::sync::Arc;

use super::allocator::{self, Allocator};
use crate::backend::{BlockSize, Caps, Extents, Flags, Handle, Param, Plugin, PluginEntry, ThreadModel};
use crate::error::{Error, Result};
use crate::util::parse::parse_size;

struct Memory {
    size: Option<u64>,
    /// `allocator=` as given: parsed in get_ready.
    allocator: String,
    disk: Option<Arc<dyn Allocator>>,
}

impl Default for Memory {
    fn default() -> Memory {
        Memory { size: None, allocator: "sparse".to_string(), disk: None }
    }
}

impl Plugin for Memory {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "size" => self.size = Some(parse_size(value)?),
            "allocator" => self.allocator = value.to_string(),
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        match self.size {
            Some(_) => Ok(()),
            None => Err(Error::invalid("you must specify size=<SIZE> on the command line")),
        }
    }

    fn dump_plugin(&self) -> Vec<String> {
        vec!["mlock=yes".to_string(), "zstd=no".to_string()]
    }

    fn get_ready(&mut self) -> Result<()> {
        let size = self.size.unwrap_or_default();
        let disk = allocator::create("memory", &self.allocator, size)?;
        disk.set_size_hint(size)?;
        self.disk = Some(Arc::from(disk));
        Ok(())
    }

    fn open(&self, _readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        let disk = self.disk.clone().ok_or_else(|| Error::io("memory: open before get_ready"))?;
        Ok(Box::new(MemoryHandle { size: self.size.unwrap_or_default(), disk }))
    }
}

/// A connection's view of the one disk.
struct MemoryHandle {
    size: u64,
    disk: Arc<dyn Allocator>,
}

impl Handle for MemoryHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps::RAM_DISK)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(self.disk.block_size()))
    }
    fn blocks(&self) -> bool {
        false
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.read(buf, offset)
    }
    fn pread_lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        self.disk.lend(count, offset, sink)
    }
    fn pwrite_fill(&self, count: usize, offset: u64, _flags: Flags,
                   fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        self.disk.write_fill(count, offset, fill)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.write(buf, offset)
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.disk.zero(count, offset)
    }
    fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        // Always fast and always able to release pages, whatever the flags.
        self.disk.zero(count, offset)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.disk.extents(count, offset, flags.contains(Flags::REQ_ONE), ext)
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

// -D flags nbdkit's memory plugin reads (`dir`: the sparse allocator's directory).
inventory::submit! {
    crate::backend::registry::DebugFlags { backend: "memory", flags: &["dir"] }
}

inventory::submit! {
    PluginEntry {
        name: "memory",
        // nbdkit's memory plugin sets neither (no has_longname/has_description).
        longname: "",
        description: "",
        help: "size=<SIZE>  (required) Size of the backing disk\n\
               allocator=sparse|...    Backend allocation strategy",
        magic_key: Some("size"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: &["unload", "dump_plugin", "config", "config_complete", "config_help", "get_ready",
               "open", "get_size", "block_size", "can_fast_zero", "can_fua", "can_multi_conn",
               "can_cache", "pread", "pwrite", "flush", "trim", "zero", "extents"],
        new: || Box::<Memory>::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::extents::{HOLE, ZERO};
    use crate::backend::Support;

    fn ready(params: &[(&str, &str)]) -> Result<Memory> {
        let mut m = Memory::default();
        for (k, v) in params {
            assert_eq!(m.config(k, v)?, Param::Used);
        }
        m.config_complete()?;
        m.get_ready()?;
        Ok(m)
    }

    fn extents(h: &dyn Handle, offset: u64, count: u64) -> Vec<(u64, u64, u32)> {
        let mut ext = Extents::new(offset, offset + count);
        h.extents(count, offset, Flags::NONE, &mut ext).unwrap();
        ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect()
    }

    #[test]
    fn size_is_required() {
        let mut m = Memory::default();
        assert_eq!(m.config("file", "x").unwrap(), Param::NotMine);
        let e = m.config_complete().unwrap_err();
        assert_eq!(e.message(), "you must specify size=<SIZE> on the command line");
        assert!(m.config("size", "1Q").is_err());
    }

    #[test]
    fn connections_share_one_disk() {
        let m = ready(&[("size", "1M")]).unwrap();
        let (a, b) = (m.open(false, "", false).unwrap(), m.open(true, "", false).unwrap());
        a.pwrite(b"hello", 40000, Flags::FUA).unwrap();
        let mut buf = [0; 7];
        b.pread(&mut buf, 39999, Flags::NONE).unwrap();
        assert_eq!(&buf, b"\0hello\0");
        assert_eq!(b.size().unwrap(), 1 << 20);
        assert_eq!(extents(&*b, 0, 1 << 20),
                   [(0, 32768, HOLE | ZERO), (32768, 32768, 0), (65536, (1 << 20) - 65536, HOLE | ZERO)]);
        a.zero(5, 40000, Flags::MAY_TRIM.with(Flags::FAST_ZERO)).unwrap();
        assert_eq!(extents(&*b, 0, 1 << 20), [(0, 1 << 20, HOLE | ZERO)]);
        a.pwrite(b"x", 0, Flags::NONE).unwrap();
        a.trim(1, 0, Flags::NONE).unwrap();
        a.flush(Flags::NONE).unwrap();
        a.cache(4096, 0, Flags::NONE).unwrap();
        assert_eq!(extents(&*b, 0, 1 << 20), [(0, 1 << 20, HOLE | ZERO)]);
    }

    #[test]
    fn caps_and_block_sizes() {
        let m = ready(&[("size", "1M")]).unwrap();
        let h = m.open(false, "", false).unwrap();
        let c = h.caps().unwrap();
        assert!(c.write && c.flush && c.trim && c.fast_zero && c.extents && c.multi_conn && !c.rotational);
        assert_eq!((c.zero, c.fua, c.cache), (Support::Native, Support::Native, Support::Native));
        assert!(!h.blocks());
        let bs = h.block_size().unwrap().unwrap();
        assert_eq!(bs, BlockSize { min: 1, preferred: 32768, max: u32::MAX });
        assert!(bs.is_valid());

        let m = ready(&[("size", "1M"), ("allocator", "malloc")]).unwrap();
        let h = m.open(false, "", false).unwrap();
        assert_eq!(h.block_size().unwrap().unwrap().preferred, 512);
        assert_eq!(extents(&*h, 0, 1 << 20), [(0, 1 << 20, 0)]);
        assert_eq!(m.dump_plugin(), ["mlock=yes", "zstd=no"]);
    }

    #[test]
    fn allocator_errors_come_at_get_ready() {
        let mut m = Memory::default();
        m.config("size", "1M").unwrap();
        m.config("allocator", "zstd").unwrap();
        m.config_complete().unwrap();
        assert_eq!(m.get_ready().unwrap_err().message(), "allocator=zstd is not supported in this build");
        let e = ready(&[("size", "1M"), ("allocator", "nope")]).err().unwrap();
        assert_eq!(e.message(), "unknown allocator \"nope\"");
        // The last allocator= wins, as the last size= does.
        let m = ready(&[("size", "1"), ("allocator", "zstd"), ("allocator", "s"), ("size", "2M")]).unwrap();
        assert_eq!(m.open(false, "", false).unwrap().size().unwrap(), 2 << 20);
    }

    #[test]
    fn largest_disk() {
        let size = i64::MAX as u64;
        let m = ready(&[("size", "9223372036854775807")]).unwrap();
        let h = m.open(false, "", false).unwrap();
        assert_eq!(h.size().unwrap(), size);
        let mut buf = [0xaa; 512];
        h.pread(&mut buf, size - 512, Flags::NONE).unwrap();
        assert_eq!(buf, [0; 512]);
        h.pwrite(&[0x55; 512], size - 512, Flags::NONE).unwrap();
        h.pread(&mut buf, size - 512, Flags::NONE).unwrap();
        assert_eq!(buf, [0x55; 512]);
        let page = size / 32768 * 32768;
        assert_eq!(extents(&*h, size - 100_000, 100_000),
                   [(size - 100_000, page - (size - 100_000), HOLE | ZERO), (page, size - page, 0)]);
        assert!(h.pwrite(&buf, size - 511, Flags::NONE).is_err());
        h.zero(size, 0, Flags::NONE).unwrap();
        assert_eq!(extents(&*h, 0, size), [(0, size, HOLE | ZERO)]);
    }
}
