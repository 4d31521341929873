//! The disk's layout: geometry (how many clusters, how big the FATs), the
//! fixed sectors (MBR, boot sector, FSInfo), cluster allocation, the FAT
//! computed entry by entry, and the region map that says what each byte
//! of the disk is. Pure: built from a [`Tree`], no I/O.
//!
//! ```text
//! LBA 0        MBR, one partition (type 0x0C) from LBA 2048
//! LBA 2048     boot sector      2049 FSInfo      2054 backup boot sector
//! LBA 2080     FAT #1, FAT #2   (whole clusters each)
//! then         cluster 2…: every directory table, then every file
//! ```

use super::names::short_names;
use super::records::{self, DosTimes, Entry, Head, RECORD};

pub const SECTOR: u64 = 512;
pub const SECTORS_PER_CLUSTER: u64 = 32;
pub const CLUSTER: u64 = SECTOR * SECTORS_PER_CLUSTER;
/// First sector of the partition.
pub const PART_START: u64 = 2048;
pub const RESERVED: u64 = 32;
/// First sector of FAT #1.
pub const FAT_START: u64 = PART_START + RESERVED;
/// Highest number of data clusters FAT32 can address (clusters 2..=0x0FFFFFF6).
pub const MAX_CLUSTERS: u64 = 0x0FFF_FFF5;
/// FAT32's VFAT limit on the records of one directory.
pub const MAX_DIR_RECORDS: usize = 65536;
/// The largest file size a directory record holds.
pub const MAX_FILE: u64 = u32::MAX as u64;

/// A scanned directory tree: directories in pre-order (0 is the root),
/// files in the order the walk met them. Names are UTF-8.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub dirs: Vec<DirNode>,
    pub files: Vec<FileNode>,
}

#[derive(Debug, Clone, Default)]
pub struct DirNode {
    pub name: String,
    pub times: DosTimes,
    pub parent: usize,
    pub subdirs: Vec<usize>,
    pub files: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct FileNode {
    pub name: String,
    pub times: DosTimes,
    pub size: u64,
}

/// Sizes of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Clusters holding directories and files.
    pub used: u64,
    /// Clusters of the data region (used + free).
    pub data_clusters: u64,
    /// Clusters of one FAT.
    pub fat_clusters: u64,
    /// The disk's size in bytes (at least the end of the partition).
    pub disk_size: u64,
}

impl Geometry {
    /// Sectors of the partition (= the filesystem's total sectors).
    pub fn partition_sectors(&self) -> u64 {
        RESERVED + (2 * self.fat_clusters + self.data_clusters) * SECTORS_PER_CLUSTER
    }
    /// First sector of the data region (cluster 2).
    #[cfg(test)]
    pub fn data_start(&self) -> u64 {
        FAT_START + 2 * self.fat_clusters * SECTORS_PER_CLUSTER
    }
}

const TOO_LARGE: &str = "disk image is too large for the FAT32 disk format";

fn fat_clusters_for(data_clusters: u64) -> u64 {
    ((data_clusters + 2) * 4).div_ceil(CLUSTER)
}

/// nbdkit's arithmetic for `size=`: the room after the reserved sectors,
/// in clusters, less two FATs sized for that room. `None` if the FATs do
/// not even fit.
fn data_clusters_in(size: u64) -> Option<(u64, u64)> {
    let room = size.checked_sub(FAT_START * SECTOR)? / CLUSTER;
    let fat = fat_clusters_for(room);
    Some((room.checked_sub(2 * fat)?, fat))
}

/// The geometry for `used` clusters of directories and files, with free
/// space up to `size` bytes if given. Any `size` at least the minimum is
/// taken (nbdkit asserts unless `size` − 1,064,960 is a multiple of 16
/// KiB): the filesystem uses the whole clusters that fit, the rest of the
/// disk reads as zeroes after the partition.
pub fn geometry(used: u64, size: Option<u64>) -> Result<Geometry, String> {
    let g = match size {
        None => {
            let fat_clusters = fat_clusters_for(used);
            let mut g = Geometry { used, data_clusters: used, fat_clusters, disk_size: 0 };
            g.disk_size = (PART_START + g.partition_sectors()) * SECTOR;
            g
        }
        Some(size) => {
            let fits = data_clusters_in(size).filter(|&(d, _)| d >= used);
            let Some((data_clusters, fat_clusters)) = fits else {
                return Err(format!(
                    "filesystem is larger than \"size\" bytes (size={size}: the files and directories need at least {} bytes)",
                    min_size(used)
                ));
            };
            Geometry { used, data_clusters, fat_clusters, disk_size: size }
        }
    };
    if g.data_clusters > MAX_CLUSTERS || PART_START + g.partition_sectors() > u64::from(u32::MAX) {
        return Err(TOO_LARGE.into());
    }
    Ok(g)
}

/// The smallest `size=` that holds `used` clusters.
pub fn min_size(used: u64) -> u64 {
    let mut room = used + 2 * fat_clusters_for(used);
    while room - 2 * fat_clusters_for(room) < used {
        room += 1;
    }
    FAT_START * SECTOR + room * CLUSTER
}

/// The MBR (LBA 0).
pub fn mbr(g: &Geometry) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[3..11].copy_from_slice(b"MSWIN4.1");
    let p = &mut s[0x1be..0x1ce];
    p[0] = 0; // status
    p[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS "too large"
    p[4] = 0x0c; // FAT32 with LBA
    p[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    p[8..12].copy_from_slice(&(PART_START as u32).to_le_bytes());
    p[12..16].copy_from_slice(&(g.partition_sectors() as u32).to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// The FAT32 boot sector (LBA 2048, and its backup at 2054).
pub fn boot_sector(g: &Geometry, label: &[u8; 11]) -> [u8; 512] {
    let mut s = [0u8; 512];
    // Jump bytes left zero, as nbdkit does.
    s[3..11].copy_from_slice(b"MSWIN4.1");
    s[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    s[13] = SECTORS_PER_CLUSTER as u8;
    s[14..16].copy_from_slice(&(RESERVED as u16).to_le_bytes());
    s[16] = 2; // FATs
    s[21] = 0xf8; // media
    s[32..36].copy_from_slice(&(g.partition_sectors() as u32).to_le_bytes());
    s[36..40].copy_from_slice(&((g.fat_clusters * SECTORS_PER_CLUSTER) as u32).to_le_bytes());
    s[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
    s[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
    s[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
    s[66] = 0x29;
    s[67..71].copy_from_slice(&0x0102_0304u32.to_le_bytes());
    s[71..82].copy_from_slice(label);
    s[82..90].copy_from_slice(b"FAT32   ");
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// The FSInfo sector (LBA 2049).
pub fn fsinfo(g: &Geometry) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[0..4].copy_from_slice(b"RRaA");
    s[484..488].copy_from_slice(b"rrAa");
    s[488..492].copy_from_slice(&((g.data_clusters - g.used) as u32).to_le_bytes());
    s[492..496].copy_from_slice(&((2 + g.used) as u32).to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// What a range of the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Zeroes.
    Zero,
    /// `Layout::blobs[i]`, zeroes past its end.
    Blob(usize),
    /// A FAT (both copies are the same).
    Fat,
    /// Host file `i` (`.0`), zeroes past its size (`.1`, kept here so
    /// that reading the padding touches nothing but the region).
    File(u32, u32),
}

/// One range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub len: u64,
    pub kind: Kind,
}

/// Everything needed to serve the disk, except the host files' bytes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub geometry: Geometry,
    /// MBR, boot sector, FSInfo, then one directory table per directory.
    pub blobs: Vec<Vec<u8>>,
    /// Sorted, non-overlapping, covering the whole disk.
    pub regions: Vec<Region>,
    /// One past the last cluster of each cluster chain, ascending.
    pub chain_ends: Vec<u64>,
    /// `region_at`'s index: the region at every 2^`index_shift` bytes of
    /// the disk (about two entries per region, one per cluster at most).
    index: Vec<u32>,
    index_shift: u32,
    /// First cluster of each file (0 if empty).
    #[cfg_attr(not(test), allow(dead_code))]
    pub file_clusters: Vec<u32>,
}

/// Lays the tree out. Errors are the user's (too many entries, too big).
pub fn build(tree: &Tree, label: &str, size: Option<u64>) -> Result<Layout, String> {
    let label = records::label_bytes(label);
    // Names of each directory's entries in table order, and their record counts.
    let mut dir_names: Vec<Vec<&str>> = Vec::with_capacity(tree.dirs.len());
    let mut dir_table_clusters = Vec::with_capacity(tree.dirs.len());
    for (i, d) in tree.dirs.iter().enumerate() {
        let names: Vec<&str> = d.subdirs.iter().map(|&s| tree.dirs[s].name.as_str())
            .chain(d.files.iter().map(|&f| tree.files[f].name.as_str()))
            .collect();
        let n = records::record_count(i == 0, &names);
        if n > MAX_DIR_RECORDS {
            let what = if i == 0 { "/".to_string() } else { path_of(tree, i) };
            return Err(format!("{what}: too many entries for a FAT directory ({} entries need {n} \
                                directory records, the limit is {MAX_DIR_RECORDS})", names.len()));
        }
        dir_table_clusters.push(((n * RECORD) as u64).div_ceil(CLUSTER));
        dir_names.push(names);
    }
    // Clusters: directories first, then files, each chain contiguous.
    let mut next = 2u64;
    let mut chain_ends = Vec::with_capacity(tree.dirs.len() + tree.files.len());
    let mut dir_clusters = Vec::with_capacity(tree.dirs.len());
    for &n in &dir_table_clusters {
        dir_clusters.push(next);
        next += n;
        chain_ends.push(next);
    }
    let mut file_clusters = Vec::with_capacity(tree.files.len());
    for f in &tree.files {
        if f.size > MAX_FILE {
            return Err(format!("{}: file is larger than maximum supported by VFAT", f.name));
        }
        let n = f.size.div_ceil(CLUSTER);
        file_clusters.push(if n == 0 { 0 } else { next });
        if n > 0 {
            next += n;
            chain_ends.push(next);
        }
    }
    let geometry = geometry(next - 2, size)?;
    let dir_clusters: Vec<u32> = dir_clusters.into_iter().map(|c| c as u32).collect();
    let file_clusters: Vec<u32> = file_clusters.into_iter().map(|c| c as u32).collect();

    let mut blobs = vec![mbr(&geometry).to_vec(), boot_sector(&geometry, &label).to_vec(), fsinfo(&geometry).to_vec()];
    for (i, d) in tree.dirs.iter().enumerate() {
        let shorts = short_names(&dir_names[i]);
        let mut entries = Vec::with_capacity(shorts.len());
        for (k, (&name, short)) in dir_names[i].iter().zip(shorts).enumerate() {
            let e = if k < d.subdirs.len() {
                let s = d.subdirs[k];
                Entry { name, short, is_dir: true, times: tree.dirs[s].times, cluster: dir_clusters[s], size: 0 }
            } else {
                let f = d.files[k - d.subdirs.len()];
                let node = &tree.files[f];
                Entry { name, short, is_dir: false, times: node.times, cluster: file_clusters[f], size: node.size as u32 }
            };
            entries.push(e);
        }
        let head = if i == 0 {
            Head::Root { label }
        } else {
            // `..` of a child of the root is cluster 0 (the FAT rule, which
            // fsck checks); nbdkit writes 2.
            let p = d.parent;
            Head::Sub { own: dir_clusters[i], own_times: d.times,
                        parent: if p == 0 { 0 } else { dir_clusters[p] }, parent_times: tree.dirs[p].times }
        };
        blobs.push(records::table(&head, &entries));
    }

    // The region map.
    let g = &geometry;
    let mut regions = Vec::new();
    let mut at = 0u64;
    let mut push = |len: u64, kind: Kind| {
        if len > 0 {
            regions.push(Region { start: at, len, kind });
            at += len;
        }
    };
    push(SECTOR, Kind::Blob(0));
    push((PART_START - 1) * SECTOR, Kind::Zero);
    push(SECTOR, Kind::Blob(1));
    push(SECTOR, Kind::Blob(2));
    push(4 * SECTOR, Kind::Zero);
    push(SECTOR, Kind::Blob(1));
    push((RESERVED - 7) * SECTOR, Kind::Zero);
    push(g.fat_clusters * CLUSTER, Kind::Fat);
    push(g.fat_clusters * CLUSTER, Kind::Fat);
    for (i, &n) in dir_table_clusters.iter().enumerate() {
        push(n * CLUSTER, Kind::Blob(3 + i));
    }
    for (i, f) in tree.files.iter().enumerate() {
        push(f.size.div_ceil(CLUSTER) * CLUSTER, Kind::File(i as u32, f.size as u32));
    }
    let used_end: u64 = regions.iter().map(|r| r.len).sum();
    if g.disk_size > used_end {
        regions.push(Region { start: used_end, len: g.disk_size - used_end, kind: Kind::Zero });
    }
    debug_assert_eq!(regions.iter().map(|r| r.len).sum::<u64>(), g.disk_size);
    let (index, index_shift) = region_index(&regions, g.disk_size);
    Ok(Layout { geometry, blobs, regions, index, index_shift, chain_ends, file_clusters })
}

/// The most entries of `region_at`'s index (4 bytes each).
const INDEX_MAX: u64 = 1 << 18;

/// The region at every 2^shift bytes of the disk: a step of one cluster
/// or more, about two entries per region (a few big files need only a
/// few entries, and building them costs nothing at start-up), at most
/// INDEX_MAX + 1.
fn region_index(regions: &[Region], disk_size: u64) -> (Vec<u32>, u32) {
    let want = (2 * regions.len() as u64).clamp(1, INDEX_MAX);
    let mut shift = CLUSTER.trailing_zeros();
    while disk_size >> shift > want {
        shift += 1;
    }
    let n = (disk_size >> shift) + 1;
    let mut index = Vec::with_capacity(n as usize);
    let mut r = 0;
    for j in 0..n {
        let at = j << shift;
        while r < regions.len() && regions[r].start + regions[r].len <= at {
            r += 1;
        }
        index.push(r as u32);
    }
    (index, shift)
}

/// "/a/b" for directory `i` (for messages).
pub fn path_of(tree: &Tree, mut i: usize) -> String {
    let mut parts = Vec::new();
    while i != 0 {
        parts.push(tree.dirs[i].name.as_str());
        i = tree.dirs[i].parent;
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

impl Layout {
    /// The region holding byte `offset` (`regions.len()` past the end):
    /// a binary search between the two index entries around `offset`
    /// (a region or two on most disks), not over every region (20,000
    /// small files: 15 steps that miss the caches).
    pub fn region_at(&self, offset: u64) -> usize {
        let j = usize::try_from(offset >> self.index_shift).unwrap_or(usize::MAX);
        let Some(&lo) = self.index.get(j) else { return self.regions.len() };
        let lo = lo as usize;
        let hi = self.index.get(j + 1).map_or(self.regions.len(), |&h| (h as usize + 1).min(self.regions.len()));
        lo + self.regions[lo..hi].partition_point(|r| r.start + r.len <= offset)
    }

    /// FAT entry of cluster `c`.
    pub fn fat_entry(&self, c: u64) -> u32 {
        match c {
            0 => 0x0FFF_FFF8,
            1 => 0x0FFF_FFFF,
            c if c < 2 + self.geometry.used => {
                if self.chain_ends.binary_search(&(c + 1)).is_ok() { 0x0FFF_FFFF } else { (c + 1) as u32 }
            }
            _ => 0,
        }
    }

    /// Fills `buf` with the bytes of a FAT from byte `offset` of it: one
    /// binary search for the first chain, then a walk along the chains.
    pub fn read_fat(&self, buf: &mut [u8], offset: u64) {
        let mut c = offset / 4;
        // The first chain that ends after cluster c.
        let mut chain = self.chain_ends.partition_point(|&e| e <= c);
        let mut pos = 0;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let entry = match c {
                0 | 1 => self.fat_entry(c),
                c if c < 2 + self.geometry.used => {
                    while self.chain_ends.get(chain).is_some_and(|&e| e <= c) {
                        chain += 1;
                    }
                    if self.chain_ends.get(chain) == Some(&(c + 1)) { 0x0FFF_FFFF } else { (c + 1) as u32 }
                }
                _ => 0,
            };
            let skip = (o % 4) as usize;
            let n = (4 - skip).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&entry.to_le_bytes()[skip..skip + n]);
            pos += n;
            c += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's nbdkit 1.32.5 on a tree of 9 clusters, and with size=.
    #[test]
    fn geometry_like_nbdkit() {
        let g = geometry(9, None).unwrap();
        assert_eq!((g.partition_sectors(), g.fat_clusters, g.disk_size), (384, 1, 1_245_184));
        let g = geometry(9, Some(2 << 30)).unwrap();
        assert_eq!((g.partition_sectors(), g.fat_clusters * 32, g.data_clusters - g.used), (4_192_256, 1024, 130_934));
        let g = geometry(9, Some(10 << 20)).unwrap();
        assert_eq!((g.partition_sectors(), g.data_clusters - g.used), (18432, 564));
        assert_eq!(geometry(9, Some(1_245_184)).unwrap().data_clusters, 9);
    }

    #[test]
    fn size_not_a_multiple_or_too_small() {
        let g = geometry(9, Some(5_000_000)).unwrap();
        assert_eq!(g.disk_size, 5_000_000);
        assert!((PART_START + g.partition_sectors()) * SECTOR <= 5_000_000);
        assert!(geometry(9, Some(1_228_800)).unwrap_err().contains("filesystem is larger than \"size\" bytes"));
        assert!(geometry(9, Some(1_064_960)).is_err());
        assert!(geometry(9, Some(0)).is_err());
        assert_eq!(min_size(9), 1_245_184);
        assert!(geometry(9, Some(min_size(9))).is_ok());
        assert!(geometry(9, Some(min_size(9) - 1)).is_err());
        assert_eq!(geometry(MAX_CLUSTERS + 1, None).unwrap_err(), TOO_LARGE);
        assert!(geometry(0, Some(u64::MAX)).is_err());
    }

    proptest::proptest! {
        /// The indexed lookup finds the region a search over all of them
        /// finds, at every region's edges, with and without free space
        /// (`size=`, up to a disk where the index step exceeds a cluster).
        #[test]
        fn region_at_is_the_full_search(sizes in proptest::collection::vec(0u64..100_000, 0..300),
                                        extra in proptest::option::of(0u64..(64u64 << 30))) {
            let tree = Tree {
                dirs: vec![DirNode { files: (0..sizes.len()).collect(), ..Default::default() }],
                files: sizes.iter().enumerate().map(|(i, &size)| FileNode { name: format!("f{i}"), size, ..Default::default() }).collect(),
            };
            let used = build(&tree, "L", None).unwrap().geometry.disk_size;
            let l = build(&tree, "L", extra.map(|e| used + e)).unwrap();
            let full = |o: u64| l.regions.partition_point(|r| r.start + r.len <= o);
            for r in &l.regions {
                for o in [r.start, r.start + 1, r.start + r.len / 2, r.start + r.len - 1, r.start + r.len] {
                    proptest::prop_assert_eq!(l.region_at(o), full(o), "offset {}", o);
                }
            }
        }

        #[test]
        fn any_size_is_an_error_or_a_consistent_geometry(used in 0u64..100_000, size in proptest::option::of(0u64..(8u64 << 40))) {
            proptest::prop_assert!(geometry(used, Some(min_size(used))).is_ok());
            proptest::prop_assert!(geometry(used, Some(min_size(used) - 1)).is_err());
            if let Ok(g) = geometry(used, size) {
                proptest::prop_assert!(g.data_clusters >= used);
                proptest::prop_assert!((g.data_clusters + 2) * 4 <= g.fat_clusters * CLUSTER);
                proptest::prop_assert!((PART_START + g.partition_sectors()) * SECTOR <= g.disk_size);
                if let Some(s) = size {
                    proptest::prop_assert_eq!(g.disk_size, s);
                    proptest::prop_assert!(min_size(used) <= s);
                }
            }
        }
    }

    #[test]
    fn regions_cover_the_disk_and_fat_chains() {
        let tree = Tree {
            dirs: vec![DirNode { subdirs: vec![1], files: vec![0, 2], ..Default::default() },
                       DirNode { name: "d".into(), parent: 0, files: vec![1], ..Default::default() }],
            files: vec![FileNode { name: "a".into(), size: 40000, ..Default::default() },
                        FileNode { name: "e".into(), size: 0, ..Default::default() },
                        FileNode { name: "b".into(), size: 1, ..Default::default() }],
        };
        let l = build(&tree, "L", None).unwrap();
        assert_eq!(l.geometry.used, 2 + 3 + 1);
        assert_eq!(l.file_clusters, [4, 0, 7]);
        let fat: Vec<u32> = (0..9).map(|c| l.fat_entry(c)).collect();
        assert_eq!(fat, [0x0FFFFFF8, 0x0FFFFFFF, 0x0FFFFFFF, 0x0FFFFFFF, 5, 6, 0x0FFFFFFF, 0x0FFFFFFF, 0]);
        let mut b = [0u8; 6];
        l.read_fat(&mut b, 15);
        assert_eq!(b, [0x0f, 5, 0, 0, 0, 6]);
        // The walk gives fat_entry's bytes from any offset.
        let whole: Vec<u8> = (0..12).flat_map(|c| l.fat_entry(c).to_le_bytes()).collect();
        for o in 0..whole.len() {
            let mut got = vec![0xaa; whole.len() - o];
            l.read_fat(&mut got, o as u64);
            assert_eq!(got, whole[o..], "offset {o}");
        }
        let mut at = 0;
        for r in &l.regions {
            assert_eq!(r.start, at);
            at += r.len;
        }
        assert_eq!(at, l.geometry.disk_size);
        assert_eq!(l.regions[l.region_at(0)].kind, Kind::Blob(0));
        assert_eq!(l.region_at(at), l.regions.len());
        assert_eq!(l.region_at(u64::MAX), l.regions.len());
        assert_eq!(l.regions[l.region_at(at - 1)].kind, Kind::File(2, 1));
    }
}
