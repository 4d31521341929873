//! MBR partition tables: primary entries, and logical partitions found by
//! walking the chain of extended boot records (EBRs), as nbdkit's
//! `partition-mbr.c` (1.44) does it, with nbdkit's messages. Pure: the disk
//! is reached only through the `read` callback.

use super::ReadAt;
use crate::error::{Error, Result};

/// One 16-byte entry of a partition table in an MBR or EBR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    /// The partition type byte.
    pub typ: u8,
    /// First sector (absolute in the MBR, relative in an EBR).
    pub start: u32,
    /// Length in sectors.
    pub count: u32,
}

/// Entry `i` (0–3) of the table in `sector` (at least 512 bytes).
pub(super) fn entry(sector: &[u8], i: usize) -> Entry {
    let e = &sector[0x1be + 16 * i..0x1be + 16 * (i + 1)];
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    Entry { typ: e[4], start: le(&e[8..12]), count: le(&e[12..16]) }
}

/// Linux's `is_extended_partition`: DOS, Win95 LBA and Linux extended.
pub(super) fn is_extended(typ: u8) -> bool {
    matches!(typ, 0x05 | 0x0f | 0x85)
}

/// The GPT protective entry that a GPT disk read with the wrong sector size
/// shows.
const GPT_PROTECTIVE: u8 = 0xee;

/// Finds partition `partnum` (1–4 primary, 5… logical) of the MBR in
/// `mbr` (the first sector) on a disk of `size` bytes with `ss`-byte
/// sectors; returns its offset and length in bytes (not yet checked
/// against the disk's end: the caller does that).
pub(super) fn find(read: &mut ReadAt<'_>, size: u64, ss: u64, mbr: &[u8], partnum: u32) -> Result<(u64, u64)> {
    if partnum <= 4 {
        let p = entry(mbr, partnum as usize - 1);
        if p.count != 0 && p.typ != 0 && !is_extended(p.typ) {
            if p.typ == GPT_PROTECTIVE {
                let other = if ss == 512 { "4k" } else { "512" };
                return Err(Error::invalid(format!(
                    "rejecting GPT protective entry from MBR, if the underlying storage uses {} sectors \
                     try using partition-sectorsize={other}",
                    if ss == 512 { "4K" } else { "512 byte" }
                )));
            }
            return Ok((u64::from(p.start) * ss, u64::from(p.count) * ss));
        }
        return Err(not_found(partnum));
    }

    let Some(ep) = (0..4).map(|i| entry(mbr, i)).find(|p| p.count != 0 && is_extended(p.typ)) else {
        return Err(Error::invalid(
            "MBR logical partition selected, but there is no extended partition in the partition table",
        ));
    };
    let ep_end = (u64::from(ep.start) + u64::from(ep.count)) * ss;
    let mut ebr = u64::from(ep.start) * ss;
    let mut sector = vec![0u8; ss as usize];
    // Terminates: every link must move strictly forward within the disk,
    // and we stop at the partition asked for.
    let mut i = 5;
    loop {
        if !ebr.is_multiple_of(ss) || ebr < ss || ebr >= size.saturating_sub(ss) {
            return Err(Error::invalid("invalid EBR chain: next EBR boot sector is located outside disk boundary"));
        }
        crate::debug!("partition: reading EBR at {ebr}");
        read(&mut sector, ebr)?;
        if i == partnum {
            let p = entry(&sector, 0);
            let offset = ebr + u64::from(p.start) * ss;
            let range = u64::from(p.count) * ss;
            if offset <= ebr || offset + range > ep_end {
                return Err(Error::invalid(format!(
                    "logical partition start or size out of range (offset={offset}, range={range}, \
                     ep:startsect={}, ep:nrsects={})",
                    ep.start, ep.count
                )));
            }
            return Ok((offset, range));
        }
        let link = entry(&sector, 1);
        if link.start == 0 && link.count == 0 {
            return Err(not_found(partnum));
        }
        let next = (u64::from(ep.start) + u64::from(link.start)) * ss;
        if next <= ebr {
            return Err(Error::invalid("invalid EBR chain: next EBR points to an earlier partition table"));
        }
        ebr = next;
        i += 1;
    }
}

fn not_found(partnum: u32) -> Error {
    Error::invalid(format!("MBR partition {partnum} not found"))
}
