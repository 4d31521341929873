//! Unit and property tests of the partition parsers and filter, on disks
//! built in memory byte by byte.

use super::*;
use crate::backend::{BlockSize, Extent};
use crate::filters::testutil::MemNext;
use proptest::prelude::*;

/// Writes MBR-style entry `i` of the table in the sector at `base`.
fn put_entry(disk: &mut [u8], base: usize, i: usize, typ: u8, start: u32, count: u32) {
    let e = base + 0x1be + 16 * i;
    disk[e + 4] = typ;
    disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
    disk[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    disk[base + 0x1fe] = 0x55;
    disk[base + 0x1ff] = 0xaa;
}

/// A 1 MiB MBR disk (sector `ss`): primary 1 at sector 8 (16 sectors),
/// extended 2 from sector 64 to 256 holding logical 5 and 6.
fn mbr_disk(ss: usize) -> Vec<u8> {
    let mut d = vec![0u8; 256 * ss];
    put_entry(&mut d, 0, 0, 0x83, 8, 16);
    put_entry(&mut d, 0, 1, 0x05, 64, 192);
    // EBR 1 at sector 64: logical 5 at +2 (10 sectors), link to 64+32.
    put_entry(&mut d, 64 * ss, 0, 0x83, 2, 10);
    put_entry(&mut d, 64 * ss, 1, 0x05, 32, 40);
    // EBR 2 at sector 96: logical 6 at +4 (20 sectors), end of chain.
    put_entry(&mut d, 96 * ss, 0, 0x83, 4, 20);
    d
}

/// A GPT disk of 128 sectors: partitions 1 (sectors 34–49) and 3 (50–99).
fn gpt_disk(ss: usize) -> Vec<u8> {
    let mut d = vec![0u8; 128 * ss];
    put_entry(&mut d, 0, 0, 0xee, 1, 127);
    let h = ss;
    d[h..h + 8].copy_from_slice(b"EFI PART");
    d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
    d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
    d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
    for (n, first, last) in [(1usize, 34u64, 49u64), (3, 50, 99)] {
        let e = 2 * ss + (n - 1) * 128;
        d[e..e + 16].copy_from_slice(&[0xaf; 16]);
        d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
        d[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
    }
    d
}

fn find(disk: &[u8], ss: u64, n: u32) -> Result<Located> {
    let mut read = |buf: &mut [u8], off: u64| -> Result<()> {
        let end = off.checked_add(buf.len() as u64).filter(|&e| e <= disk.len() as u64);
        let end = end.ok_or_else(|| Error::io("read past the end"))?;
        buf.copy_from_slice(&disk[off as usize..end as usize]);
        Ok(())
    };
    locate(&mut read, disk.len() as u64, ss, n)
}

fn err(disk: &[u8], ss: u64, n: u32) -> String {
    find(disk, ss, n).unwrap_err().message().to_string()
}

#[test]
fn mbr_primary_and_logical_partitions() {
    for ss in [512u64, 4096] {
        let d = mbr_disk(ss as usize);
        assert_eq!(find(&d, ss, 1).unwrap(), Located { offset: 8 * ss, range: 16 * ss, typ: "MBR" });
        assert_eq!(find(&d, ss, 5).unwrap(), Located { offset: 66 * ss, range: 10 * ss, typ: "MBR" });
        assert_eq!(find(&d, ss, 6).unwrap(), Located { offset: 100 * ss, range: 20 * ss, typ: "MBR" });
        assert_eq!(err(&d, ss, 2), "MBR partition 2 not found"); // extended
        assert_eq!(err(&d, ss, 3), "MBR partition 3 not found"); // empty
        assert_eq!(err(&d, ss, 7), "MBR partition 7 not found");
    }
}

#[test]
fn mbr_without_extended_partition() {
    let mut d = mbr_disk(512);
    put_entry(&mut d, 0, 1, 0, 0, 0);
    assert_eq!(err(&d, 512, 5),
               "MBR logical partition selected, but there is no extended partition in the partition table");
}

#[test]
fn ebr_loops_and_self_links_are_refused() {
    let mut d = mbr_disk(512);
    put_entry(&mut d, 96 * 512, 1, 0x05, 0, 1); // back to the first EBR
    assert_eq!(err(&d, 512, 8), "invalid EBR chain: next EBR points to an earlier partition table");
    put_entry(&mut d, 96 * 512, 1, 0x05, 32, 1); // to itself
    assert_eq!(err(&d, 512, 8), "invalid EBR chain: next EBR points to an earlier partition table");
    put_entry(&mut d, 96 * 512, 1, 0x05, 0xffff_0000, 1); // off the disk
    assert_eq!(err(&d, 512, 8), "invalid EBR chain: next EBR boot sector is located outside disk boundary");
    // The partition asked for comes before the bad link: still found.
    assert_eq!(find(&d, 512, 6).unwrap().offset, 100 * 512);
}

#[test]
fn logical_partitions_must_lie_inside_the_extended_one() {
    let mut d = mbr_disk(512);
    put_entry(&mut d, 96 * 512, 0, 0x83, 4, 200);
    assert_eq!(err(&d, 512, 6), "logical partition start or size out of range \
        (offset=51200, range=102400, ep:startsect=64, ep:nrsects=192)");
    put_entry(&mut d, 96 * 512, 0, 0x83, 0, 2);
    assert!(err(&d, 512, 6).starts_with("logical partition start or size out of range (offset=49152,"));
}

#[test]
fn huge_primary_partitions_are_outside_the_disk() {
    let mut d = mbr_disk(512);
    put_entry(&mut d, 0, 0, 0x83, u32::MAX, u32::MAX);
    assert_eq!(err(&d, 512, 1), "partition is outside the disk");
    put_entry(&mut d, 0, 0, 0x83, 250, 10);
    assert_eq!(err(&d, 512, 1), "partition is outside the disk");
}

#[test]
fn gpt_protective_entry_is_refused() {
    // A 4K GPT disk read with 512-byte sectors: no "EFI PART" at LBA 1.
    let d = gpt_disk(4096);
    assert_eq!(err(&d, 512, 1), "rejecting GPT protective entry from MBR, if the underlying storage \
        uses 4K sectors try using partition-sectorsize=4k");
    assert_eq!(find(&d, 4096, 3).unwrap(), Located { offset: 50 * 4096, range: 50 * 4096, typ: "GPT" });
}

#[test]
fn gpt_partitions() {
    for ss in [512u64, 4096] {
        let d = gpt_disk(ss as usize);
        assert_eq!(find(&d, ss, 1).unwrap(), Located { offset: 34 * ss, range: 16 * ss, typ: "GPT" });
        assert_eq!(find(&d, ss, 3).unwrap(), Located { offset: 50 * ss, range: 50 * ss, typ: "GPT" });
        assert_eq!(err(&d, ss, 2), "GPT partition 2 not found");
        assert_eq!(err(&d, ss, 129), "GPT partition number out of range");
    }
}

#[test]
fn hostile_gpt_headers() {
    let set32 = |d: &mut Vec<u8>, at: usize, v: u32| d[512 + at..512 + at + 4].copy_from_slice(&v.to_le_bytes());
    let mut d = gpt_disk(512);
    set32(&mut d, 80, u32::MAX); // nr_entries × size overflows 32 bits
    assert_eq!(err(&d, 512, 1), "GPT partition table is too large for this disk");
    let mut d = gpt_disk(512);
    set32(&mut d, 84, 100);
    assert_eq!(err(&d, 512, 1), "GPT partition entry size is invalid (100 bytes)");
    set32(&mut d, 84, 384);
    assert_eq!(err(&d, 512, 1), "GPT partition entry size is invalid (384 bytes)");
    set32(&mut d, 84, 1024);
    assert_eq!(err(&d, 512, 1), "GPT partition entry size is invalid (1024 bytes)");
    let mut d = gpt_disk(512);
    d[512 + 72] = 3;
    assert_eq!(err(&d, 512, 1), "non-standard GPT layout: partition entries are not adjacent to header");
    // Huge LBAs, and last before first.
    let mut d = gpt_disk(512);
    d[1024 + 32..1024 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(err(&d, 512, 1), "partition is outside the disk");
    d[1024 + 32..1024 + 40].copy_from_slice(&60u64.to_le_bytes());
    assert_eq!(err(&d, 512, 1), "partition is outside the disk");
    d[1024 + 40..1024 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(err(&d, 512, 1), "partition is outside the disk");
}

#[test]
fn not_a_partitioned_disk() {
    assert_eq!(err(&[0u8; 1023], 512, 1), "disk is too small to be a partitioned disk");
    assert_eq!(err(&[0u8; 4096], 4096, 1), "disk is too small to be a partitioned disk");
    assert_eq!(err(&[0u8; 4096], 512, 1), "disk does not contain MBR or GPT partition table signature");
    // A GPT signature on a disk too small for GPT falls back to the MBR.
    let mut d = gpt_disk(512);
    d.truncate(20 * 512);
    assert!(err(&d, 512, 1).starts_with("rejecting GPT protective entry"));
}

#[test]
fn config_messages() {
    let mut f = Partition::default();
    assert_eq!(f.config_complete().unwrap_err().message(),
               "you must supply the partition parameter on the command line");
    assert_eq!(f.config("partition", "0").unwrap_err().message(), "invalid partition number");
    assert_eq!(f.config("partition", "-1").unwrap_err().message(), "invalid partition number");
    assert!(f.config("partition", "x").is_err());
    assert_eq!(f.config("partition-sectorsize", "1024").unwrap_err().message(),
               "invalid partition-sectorsize, it must be '512' or '4086'");
    f.config("partition-sectorsize", "4k").unwrap();
    assert_eq!(f.sector_size.get(), Some(&4096));
    assert_eq!(f.config("size", "1").unwrap(), Param::NotMine);
    f.config("partition", "3").unwrap();
    f.config_complete().unwrap();
}

fn filter(n: u32) -> Partition {
    let mut f = Partition::default();
    f.config("partition", &n.to_string()).unwrap();
    f
}

#[test]
fn the_handle_moves_every_call_by_the_offset() {
    let next = MemNext::new(0);
    next.state.lock().unwrap().data = mbr_disk(512);
    let h = filter(5).open(&next, false, "", false).unwrap();
    assert_eq!(h.size().unwrap(), 10 * 512);
    h.pwrite(&[7; 512], 512, Flags::NONE).unwrap();
    assert_eq!(next.state.lock().unwrap().data[67 * 512..68 * 512], [7; 512]);
    let mut b = [0; 512];
    h.pread(&mut b, 512, Flags::NONE).unwrap();
    assert_eq!(b, [7; 512]);
    h.zero(512, 512, Flags::NONE).unwrap();
    assert_eq!(next.state.lock().unwrap().data[67 * 512..68 * 512], [0; 512]);
    let mut e = Extents::new(1000, 10 * 512);
    h.extents(4000, 1000, Flags::NONE, &mut e).unwrap();
    assert_eq!(e.list(), &[Extent { offset: 1000, length: 4000, typ: 0 }]);
    assert_eq!(h.export_description(), None);
}

#[test]
fn the_default_sector_size_comes_from_the_block_size() {
    let mut next = MemNext::new(0);
    next.state.lock().unwrap().data = gpt_disk(4096);
    next.block_size = Some(BlockSize { min: 4096, preferred: 4096, max: u32::MAX });
    let f = filter(3);
    assert_eq!(f.open(&next, false, "", false).unwrap().size().unwrap(), 50 * 4096);
    // The first connection decided for good.
    next.block_size = None;
    assert_eq!(f.open(&next, false, "", false).unwrap().size().unwrap(), 50 * 4096);
    // No block size: 512, and the protective entry is refused.
    let e = filter(1).open(&next, false, "", false).map(|_| ()).unwrap_err();
    assert!(e.message().starts_with("rejecting GPT protective entry"));
    // A minimum other than 512 or 4096: 512.
    next.block_size = Some(BlockSize { min: 1, preferred: 4096, max: u32::MAX });
    assert!(filter(1).open(&next, false, "", false).is_err());
}

/// Disks derived from valid ones by overwriting a few bytes of the tables.
fn mutated() -> impl Strategy<Value = (Vec<u8>, u64, u32)> {
    let base = prop_oneof![Just((0, 512u64)), Just((0, 4096)), Just((1, 512)), Just((1, 4096))];
    (base, prop::collection::vec((0usize..4096, any::<u8>()), 0..24), 1u32..12, 0usize..3)
        .prop_map(|((kind, ss), edits, n, zone)| {
            let mut d = if kind == 0 { mbr_disk(ss as usize) } else { gpt_disk(ss as usize) };
            let zones = [0usize, ss as usize, if kind == 0 { 64 * ss as usize } else { 2 * ss as usize }];
            for (at, v) in edits {
                let i = zones[zone] + at % (2 * ss as usize);
                let len = d.len();
                d[i % len] = v;
            }
            (d, ss, n)
        })
}

proptest! {
    #[test]
    fn hostile_tables_never_panic_nor_escape_the_disk((d, ss, n) in mutated()) {
        if let Ok(loc) = find(&d, ss, n) {
            prop_assert!(loc.offset.checked_add(loc.range).is_some_and(|e| e <= d.len() as u64));
        }
    }

    #[test]
    fn random_sectors_never_panic(lba0 in prop::collection::vec(any::<u8>(), 512), lba1 in prop::collection::vec(any::<u8>(), 512),
                                  sig in any::<bool>(), n in 1u32..10) {
        let mut d = vec![0u8; 64 * 1024];
        d[..512].copy_from_slice(&lba0);
        d[512..1024].copy_from_slice(&lba1);
        d[510] = 0x55;
        d[511] = 0xaa;
        if sig {
            d[512..520].copy_from_slice(b"EFI PART");
        }
        if let Ok(loc) = find(&d, 512, n) {
            prop_assert!(loc.offset + loc.range <= d.len() as u64);
        }
    }
}

/// A layer below that describes its export.
struct Described(MemNext);

struct DescribedHandle(Box<dyn Handle>);

impl crate::backend::FilterHandle for DescribedHandle {
    fn next(&self) -> &dyn Handle {
        &*self.0
    }
    fn export_description(&self) -> Option<String> {
        Some("the base".into())
    }
}

impl Next for Described {
    fn preconnect(&self, readonly: bool) -> Result<()> {
        self.0.preconnect(readonly)
    }
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<crate::backend::Export>> {
        self.0.list_exports(readonly, is_tls)
    }
    fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String> {
        self.0.default_export(readonly, is_tls)
    }
    fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        Ok(Box::new(DescribedHandle(self.0.open(readonly, export, is_tls)?)))
    }
}

#[test]
fn export_descriptions_name_the_partition() {
    let next = MemNext::new(0);
    next.state.lock().unwrap().data = mbr_disk(512);
    let next = Described(next);
    let h = filter(6).open(&next, false, "", false).unwrap();
    assert_eq!(h.export_description().as_deref(), Some("partition 6 of MBR disk: the base"));
    let next = MemNext::new(0);
    next.state.lock().unwrap().data = gpt_disk(512);
    let h = filter(3).open(&Described(next), false, "", false).unwrap();
    assert_eq!(h.export_description().as_deref(), Some("partition 3 of GPT disk: the base"));
}
