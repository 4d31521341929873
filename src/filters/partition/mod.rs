//! `partition`: serve one partition of a partitioned disk
//! (`partition=N`), MBR (primary and logical) or GPT, as nbdkit 1.44.
//!
//! The table is read when a connection opens, through the layer below;
//! the parsing is pure (`mbr.rs`, `gpt.rs`, [`locate`]) and takes the disk
//! through a read callback, so it is unit- and property-tested on byte
//! arrays. Every offset is computed with checked or widened arithmetic:
//! a hostile table gives nbdkit's error at open, never a wrap-around.
//!
//! The sector size is `partition-sectorsize=512|4k`; by default (1.44) the
//! first connection asks the layer below for its block size and uses its
//! minimum if that is 512 or 4096, else 512, for every later connection.

mod gpt;
mod mbr;

use std::sync::OnceLock;

use crate::backend::{BlockSize, Caps, Extents, Filter, FilterEntry, Flags, Handle, Next, Param};
use crate::error::{Error, Result};
use crate::util::parse::{parse_int, parse_size};

/// How the parsers read the disk: fill the buffer from the byte offset.
pub(crate) type ReadAt<'a> = dyn FnMut(&mut [u8], u64) -> Result<()> + 'a;

/// Where the partition is, as found in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Located {
    /// Byte offset of the partition on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub range: u64,
    /// "MBR" or "GPT", for the export description.
    pub typ: &'static str,
}

/// Finds partition `partnum` on a disk of `size` bytes with `ss`-byte
/// sectors (512 or 4096), as nbdkit's `partition_prepare`.
pub(crate) fn locate(read: &mut ReadAt<'_>, size: u64, ss: u64, partnum: u32) -> Result<Located> {
    if size < 2 * ss {
        return Err(Error::invalid("disk is too small to be a partitioned disk"));
    }
    crate::debug!("partition: disk size={size}");
    let mut lba01 = vec![0u8; 2 * ss as usize];
    read(&mut lba01, 0)?;
    let (lba0, lba1) = lba01.split_at(ss as usize);
    let (offset, range, typ) = if size >= 3 * ss + 32768 && gpt::has_signature(lba1) {
        let (o, r) = gpt::find(read, size, ss, lba1, partnum)?;
        (o, r, "GPT")
    } else if lba0[0x1fe] == 0x55 && lba0[0x1ff] == 0xaa {
        let (o, r) = mbr::find(read, size, ss, lba0, partnum)?;
        (i128::from(o), i128::from(r), "MBR")
    } else {
        return Err(Error::invalid("disk does not contain MBR or GPT partition table signature"));
    };
    if offset < 0 || range < 0 || offset + range > i128::from(size) {
        return Err(Error::invalid("partition is outside the disk"));
    }
    crate::debug!("partition: partition offset={offset} range={range}");
    Ok(Located { offset: offset as u64, range: range as u64, typ })
}

#[derive(Default)]
struct Partition {
    /// `partition=N`, 1-based.
    partnum: u32,
    /// `partition-sectorsize`, or the default the first connection chose.
    sector_size: OnceLock<u64>,
}

impl Filter for Partition {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "partition" => {
                let n = parse_int("partition", value, i64::from(i32::MIN), i64::from(i32::MAX))?;
                if n <= 0 {
                    return Err(Error::invalid("invalid partition number"));
                }
                self.partnum = n as u32;
            }
            "partition-sectorsize" => {
                let n = parse_size(value)?;
                if n != 512 && n != 4096 {
                    // [sic] nbdkit's message.
                    return Err(Error::invalid("invalid partition-sectorsize, it must be '512' or '4086'"));
                }
                self.sector_size = OnceLock::from(n);
            }
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.partnum == 0 {
            return Err(Error::invalid("you must supply the partition parameter on the command line"));
        }
        Ok(())
    }

    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let next = next.open(readonly, export, is_tls)?;
        let ss = match self.sector_size.get() {
            Some(&ss) => ss,
            None => {
                let min = next.block_size()?.map(|b| b.min);
                let ss = match min {
                    Some(m @ (512 | 4096)) => u64::from(m),
                    _ => 512,
                };
                *self.sector_size.get_or_init(|| ss)
            }
        };
        let size = next.size()?;
        let loc = locate(&mut |buf, off| next.pread(buf, off, Flags::NONE), size, ss, self.partnum)?;
        Ok(Box::new(PartitionHandle { next, loc, partnum: self.partnum }))
    }
}

struct PartitionHandle {
    next: Box<dyn Handle>,
    loc: Located,
    partnum: u32,
}

/// Every data call moves by the partition's offset; the checking layer
/// above has already bounded the range by the partition's size. A
/// `Handle` rather than a `FilterHandle`, as the data is not changed: the
/// zero-copy and no-wait calls of the plugin (`pread_lend`,
/// `pread_nowait`, `pwrite_fill`) are passed down too, so a partition
/// costs what the plugin alone does.
impl Handle for PartitionHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.loc.range)
    }
    fn caps(&self) -> Result<Caps> {
        self.next.caps()
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.next.block_size()
    }
    fn export_description(&self) -> Option<String> {
        let base = self.next.export_description()?;
        Some(format!("partition {} of {} disk: {base}", self.partnum, self.loc.typ))
    }
    fn blocks(&self) -> bool {
        self.next.blocks()
    }
    fn brief(&self) -> bool {
        self.next.brief()
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pread(buf, offset + self.loc.offset, flags)
    }
    fn pread_lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        self.next.pread_lend(count, offset + self.loc.offset, sink)
    }
    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        self.next.pread_nowait(buf, offset + self.loc.offset)
    }
    fn pwrite_fill(&self, count: usize, offset: u64, flags: Flags,
                   fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        self.next.pwrite_fill(count, offset + self.loc.offset, flags, fill)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pwrite(buf, offset + self.loc.offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.next.flush(flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.trim(count, offset + self.loc.offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.zero(count, offset + self.loc.offset, flags)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.cache(count, offset + self.loc.offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        let base = self.loc.offset;
        let mut inner = Extents::new(offset + base, base + self.loc.range);
        self.next.extents(count, offset + base, flags, &mut inner)?;
        for e in inner.list() {
            ext.add(e.offset - base, e.length, e.typ)?;
        }
        Ok(())
    }
}

inventory::submit! {
    FilterEntry {
        name: "partition",
        alias: None,
        longname: "nbdkit partition filter",
        description: "nbdkit partition filter: serve one partition of an MBR or GPT disk",
        help: "partition=<PART>    (required) The partition number (counting from 1).\n\
               partition-sectorsize=512|4k\n                    Sector size of the partition table.",
        new: || Box::<Partition>::default(),
    }
}

#[cfg(test)]
mod tests;
