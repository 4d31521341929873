//! GPT partition tables, as nbdkit's `partition-gpt.c` (1.44) reads them:
//! the header at LBA 1, the entry array at LBA 2 (a header pointing
//! elsewhere is refused), no CRC checks. Pure: the disk is reached only
//! through the `read` callback.

use super::ReadAt;
use crate::error::{Error, Result};

/// The fields of the GPT header that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// LBA of the partition entry array.
    pub entries_lba: u64,
    /// Number of entries in the array.
    pub nr_entries: u32,
    /// Size of one entry in bytes.
    pub entry_size: u32,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// True if `lba1` (the second sector) starts with the GPT signature.
pub(super) fn has_signature(lba1: &[u8]) -> bool {
    lba1.starts_with(b"EFI PART")
}

/// Parses the header in `lba1` (at least 92 bytes).
pub(super) fn header(lba1: &[u8]) -> Header {
    Header { entries_lba: le64(&lba1[72..]), nr_entries: le32(&lba1[80..]), entry_size: le32(&lba1[84..]) }
}

/// Finds partition `partnum` (1-based) of the GPT whose header is in
/// `lba1`, on a disk of `size` bytes with `ss`-byte sectors; returns its
/// offset and length in bytes as signed values (a bogus entry can make
/// them negative or huge: the caller checks them against the disk).
pub(super) fn find(read: &mut ReadAt<'_>, size: u64, ss: u64, lba1: &[u8], partnum: u32) -> Result<(i128, i128)> {
    let h = header(lba1);
    if h.entries_lba != 2 {
        return Err(Error::invalid("non-standard GPT layout: partition entries are not adjacent to header"));
    }
    if partnum > h.nr_entries {
        return Err(Error::invalid("GPT partition number out of range"));
    }
    let esize = u64::from(h.entry_size);
    if esize < 128 || esize > ss || !ss.is_multiple_of(esize) {
        return Err(Error::invalid(format!("GPT partition entry size is invalid ({} bytes)", h.entry_size)));
    }
    // The table (and its backup) must fit: otherwise the header is bogus.
    if u128::from(size) < 3 * u128::from(ss) + 2 * u128::from(h.nr_entries) * u128::from(esize) {
        return Err(Error::invalid("GPT partition table is too large for this disk"));
    }
    // Entries never straddle sectors (the size divides the sector size):
    // read the sector holding entry `partnum`.
    let pos = 2 * ss + u64::from(partnum - 1) * esize;
    let sector_start = pos - pos % ss;
    let mut sector = vec![0u8; ss as usize];
    read(&mut sector, sector_start)?;
    let e = &sector[(pos - sector_start) as usize..][..128];
    if e[..16].iter().all(|&b| b == 0) {
        return Err(Error::invalid(format!("GPT partition {partnum} not found")));
    }
    let (first, last) = (i128::from(le64(&e[32..])), i128::from(le64(&e[40..])));
    let ss = i128::from(ss);
    Ok((first * ss, (last - first + 1) * ss))
}
