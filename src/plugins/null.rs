//! `null`: a disk of any size that reads as zeroes and discards writes.

use crate::backend::{extents, Caps, Extents, Flags, Handle, Param, Plugin, PluginEntry, ThreadModel};
use crate::error::Result;
use crate::util::parse::parse_size;

#[derive(Default)]
struct Null {
    size: u64,
}

impl Plugin for Null {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "size" => self.size = parse_size(value)?,
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn open(&self, _readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        Ok(Box::new(NullHandle { size: self.size }))
    }
}

struct NullHandle {
    size: u64,
}

impl Handle for NullHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps::RAM_DISK)
    }
    fn blocks(&self) -> bool {
        false
    }
    fn pread(&self, buf: &mut [u8], _offset: u64, _flags: Flags) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn pwrite(&self, _buf: &[u8], _offset: u64, _flags: Flags) -> Result<()> {
        Ok(()) // Discarded: that is the point of this plugin.
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn zero(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn extents(&self, _count: u64, _offset: u64, _flags: Flags, ext: &mut Extents) -> Result<()> {
        ext.add(0, self.size, extents::HOLE | extents::ZERO)
    }
}

// nbdkit's null plugin reads no -D flags: any gets nbdkit's warning.
inventory::submit! {
    crate::backend::registry::DebugFlags { backend: "null", flags: &[] }
}

inventory::submit! {
    PluginEntry {
        name: "null",
        longname: "",
        description: "nbdkit null plugin: a disk that reads as zeroes and discards writes",
        help: "[size=]<SIZE>                   Size of the backing disk",
        magic_key: Some("size"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: &["config", "config_help", "open", "get_size", "can_fast_zero", "can_fua",
               "can_multi_conn", "can_cache", "pread", "pwrite", "flush", "trim", "zero", "extents"],
        new: || Box::<Null>::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeroes_whatever_was_written() {
        let mut plugin = Null::default();
        plugin.config("size", "1M").unwrap();
        let (h, mut buf) = (plugin.open(false, "", false).unwrap(), [0xaa; 512]);
        h.pwrite(&[0xff; 512], 0, Flags::NONE).unwrap();
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(buf, [0; 512]);
        assert_eq!(h.size().unwrap(), 1 << 20);
    }
}
