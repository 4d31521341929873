//! The `.xz` container, as far as random access needs it: stream header
//! and footer, the index, stream padding and concatenated streams. Pure:
//! every function takes bytes (or a reader of the file) and returns values,
//! so hostile files are unit- and property-tested here. Decoding a block's
//! data is liblzma's job (`decode.rs`).
//!
//! Layout of a file (xz-file-format 1.2.1):
//! `Stream [Stream padding (4·n zero bytes)] Stream …`, each Stream being
//! `Header(12) Block… Index Footer(12)`. The layout is found by walking
//! backwards from the end, as nbdkit and `xz --list` do: footer → backward
//! size → index → the index's block sizes give the stream's start → the
//! header there must agree with the footer.

use std::fmt;

/// The six bytes every stream starts with.
pub const HEADER_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
/// The two bytes every stream ends with.
pub const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Size of a stream header and of a stream footer.
pub const HEADER_SIZE: u64 = 12;
/// Largest value a variable-length integer may hold (2^63 − 1).
pub const VLI_MAX: u64 = i64::MAX as u64;
/// Largest index this parser reads (a legitimate 1 TiB image cut into
/// 1 MiB blocks has an index of about 6 MiB).
pub const INDEX_MAX: u64 = 64 << 20;
/// Most blocks a file may have (each costs 40 bytes of memory).
pub const BLOCKS_MAX: usize = 1 << 22;
/// Smallest unpadded size of a block: header (8) with nothing in it is
/// already more, but liblzma's own bound is 5.
const UNPADDED_MIN: u64 = 5;
/// Largest unpadded size of a block (liblzma's UNPADDED_SIZE_MAX).
const UNPADDED_MAX: u64 = VLI_MAX & !3;

/// What is wrong with a file, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

/// CRC-32 (IEEE, reflected), as the container uses for headers, footers
/// and the index.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Size of the check field that ends each block, by check ID (the spec
/// reserves the sizes of unknown IDs, so a reader can skip them).
pub fn check_size(check: u8) -> u64 {
    match check {
        0 => 0,
        1..=3 => 4,
        4..=6 => 8,
        7..=9 => 16,
        10..=12 => 32,
        _ => 64,
    }
}

/// Decodes the two stream-flag bytes: the first is reserved (0), the
/// second holds the check ID in its low four bits, the rest reserved.
fn stream_flags(b: [u8; 2]) -> Result<u8, FormatError> {
    if b[0] != 0 || b[1] & 0xf0 != 0 {
        return err("unsupported stream flags (a newer xz format?)");
    }
    Ok(b[1])
}

/// Decodes a stream header; returns the check ID.
pub fn decode_header(b: &[u8; 12]) -> Result<u8, FormatError> {
    if b[..6] != HEADER_MAGIC {
        return err("not an xz stream header (bad magic)");
    }
    if crc32(&b[6..8]) != u32::from_le_bytes([b[8], b[9], b[10], b[11]]) {
        return err("stream header CRC32 mismatch");
    }
    stream_flags([b[6], b[7]])
}

/// Decodes a stream footer; returns the check ID and the size of the index
/// (the backward size).
pub fn decode_footer(b: &[u8; 12]) -> Result<(u8, u64), FormatError> {
    if b[10..] != FOOTER_MAGIC {
        return err("not an xz stream footer (bad magic)");
    }
    if crc32(&b[4..10]) != u32::from_le_bytes([b[0], b[1], b[2], b[3]]) {
        return err("stream footer CRC32 mismatch");
    }
    let check = stream_flags([b[8], b[9]])?;
    let backward = (u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]])) + 1) * 4;
    Ok((check, backward))
}

/// Reads a variable-length integer at `*pos` (1 to 9 bytes, 7 bits each,
/// least significant first, no superfluous zero byte at the end).
pub fn read_vli(b: &[u8], pos: &mut usize) -> Result<u64, FormatError> {
    let mut v: u64 = 0;
    for i in 0..9 {
        let Some(&byte) = b.get(*pos) else { return err("index is truncated") };
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return err("index has a badly encoded number");
            }
            return Ok(v);
        }
    }
    err("index has a number longer than 9 bytes")
}

/// One record of an index: a block's size in the file without its padding
/// (header + compressed data + check) and its size once decompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Unpadded size.
    pub unpadded: u64,
    /// Uncompressed size.
    pub uncompressed: u64,
}

/// Decodes a whole index (`b` is exactly the backward size long).
pub fn decode_index(b: &[u8]) -> Result<Vec<Record>, FormatError> {
    if b.len() < 8 || !b.len().is_multiple_of(4) {
        return err("index has an impossible size");
    }
    if b[0] != 0 {
        return err("index indicator is not 0 (corrupt index)");
    }
    let body = b.len() - 4;
    if crc32(&b[..body]) != u32::from_le_bytes([b[body], b[body + 1], b[body + 2], b[body + 3]]) {
        return err("index CRC32 mismatch");
    }
    let b = &b[..body];
    let mut pos = 1;
    let count = read_vli(b, &mut pos)?;
    // Each record takes at least two bytes: a bigger count is a lie.
    if count > ((b.len() - pos) / 2) as u64 {
        return err("index claims more records than it holds");
    }
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let unpadded = read_vli(b, &mut pos)?;
        let uncompressed = read_vli(b, &mut pos)?;
        if !(UNPADDED_MIN..=UNPADDED_MAX).contains(&unpadded) {
            return err("index has a block of impossible size");
        }
        if uncompressed > VLI_MAX {
            return err("index has a block bigger than 2^63");
        }
        records.push(Record { unpadded, uncompressed });
    }
    // Index padding: zeroes up to a multiple of four, then the CRC.
    if (b.len() - pos) >= 4 || b[pos..].iter().any(|&x| x != 0) {
        return err("index has garbage after its records");
    }
    Ok(records)
}

/// A block's size in the file: unpadded size rounded up to four.
pub fn padded(unpadded: u64) -> u64 {
    (unpadded + 3) & !3
}

/// One block of the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Offset of its first uncompressed byte in the image.
    pub uoffset: u64,
    /// Uncompressed size (never 0: empty blocks are left out of the map).
    pub usize: u64,
    /// Offset of its header in the file.
    pub coffset: u64,
    /// Unpadded size (header + compressed data + check).
    pub unpadded: u64,
    /// Check ID of its stream.
    pub check: u8,
}

/// Everything random access needs: the blocks in image order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Non-empty blocks, in order of `uoffset`, contiguous.
    pub blocks: Vec<Block>,
    /// Image size (sum of uncompressed sizes).
    pub size: u64,
    /// Number of streams.
    pub streams: usize,
    /// Largest uncompressed block.
    pub max_block: u64,
    /// Hash of every header, footer and index read: identifies the file's
    /// layout (with its size) for the cache shared between connections.
    pub fingerprint: u64,
}

impl Layout {
    /// Index of the block holding image offset `off` (`off < size`).
    pub fn find(&self, off: u64) -> Option<usize> {
        let i = self.blocks.partition_point(|b| b.uoffset + b.usize <= off);
        (i < self.blocks.len() && self.blocks[i].uoffset <= off).then_some(i)
    }
}

/// One stream found by the backward walk.
struct Stream {
    start: u64,
    check: u8,
    records: Vec<Record>,
}

/// Reads `buf.len()` bytes of the file at an offset.
pub type ReadFn<'a> = dyn FnMut(&mut [u8], u64) -> Result<(), String> + 'a;

/// Walks the file backwards and builds the block map. `read(buf, offset)`
/// fills `buf` from the file; this function never asks for bytes outside
/// `[0, file_size)`.
pub fn parse(file_size: u64, read: &mut ReadFn<'_>) -> Result<Layout, FormatError> {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write_u64(file_size);
    let mut rd = |buf: &mut [u8], off: u64| -> Result<(), FormatError> {
        debug_assert!(off + buf.len() as u64 <= file_size);
        read(buf, off).map_err(FormatError)?;
        hasher.write(buf);
        Ok(())
    };

    if file_size < 6 {
        return err("xz: file too short");
    }
    let mut magic = [0u8; 6];
    rd(&mut magic, 0)?;
    if magic != HEADER_MAGIC {
        return err("xz: not an xz file");
    }
    if !file_size.is_multiple_of(4) {
        return err("xz: not an xz file: size is not a multiple of 4 bytes");
    }
    if file_size < 2 * HEADER_SIZE {
        return err("xz: file too short");
    }

    let mut streams = Vec::new();
    let mut total_blocks = 0usize;
    let mut pos = file_size;
    while pos > 0 {
        if pos < 2 * HEADER_SIZE {
            return err(format!("xz: corrupted file at {pos}: {pos} bytes before a stream footer or stream padding"));
        }
        let mut footer = [0u8; 12];
        rd(&mut footer, pos - HEADER_SIZE)?;
        if footer[8..] == [0, 0, 0, 0] {
            // Stream padding, four bytes at a time.
            pos -= 4;
            continue;
        }
        let at = pos - HEADER_SIZE;
        let (check, backward) =
            decode_footer(&footer).map_err(|e| FormatError(format!("xz: invalid stream footer at {at}: {e}")))?;
        if backward > INDEX_MAX {
            return err(format!("xz: index at {at} is too big ({backward} bytes, at most {INDEX_MAX})"));
        }
        let Some(index_pos) = at.checked_sub(backward).filter(|&p| p >= HEADER_SIZE) else {
            return err(format!("xz: invalid stream footer at {at}: index size {backward} points before the file"));
        };
        let mut index = vec![0u8; backward as usize];
        rd(&mut index, index_pos)?;
        let records =
            decode_index(&index).map_err(|e| FormatError(format!("xz: invalid stream index at {index_pos}: {e}")))?;
        total_blocks = total_blocks.saturating_add(records.len());
        if total_blocks > BLOCKS_MAX {
            return err(format!("xz: too many blocks (more than {BLOCKS_MAX})"));
        }
        let mut blocks_size: u64 = 0;
        for r in &records {
            blocks_size = blocks_size.saturating_add(padded(r.unpadded));
        }
        let Some(start) = index_pos.checked_sub(blocks_size).and_then(|p| p.checked_sub(HEADER_SIZE)) else {
            return err(format!("xz: invalid stream index at {index_pos}: its blocks would start before the file"));
        };
        let mut header = [0u8; 12];
        rd(&mut header, start)?;
        let hcheck =
            decode_header(&header).map_err(|e| FormatError(format!("xz: invalid stream header at {start}: {e}")))?;
        if hcheck != check {
            return err(format!("xz: header and footer of stream at {start} are not equal"));
        }
        streams.push(Stream { start, check, records });
        pos = start;
    }
    streams.reverse();

    let mut layout = Layout { streams: streams.len(), ..Layout::default() };
    layout.blocks.reserve(total_blocks);
    let mut uoffset: u64 = 0;
    for s in &streams {
        let mut coffset = s.start + HEADER_SIZE;
        for r in &s.records {
            if r.uncompressed > 0 {
                layout.blocks.push(Block {
                    uoffset,
                    usize: r.uncompressed,
                    coffset,
                    unpadded: r.unpadded,
                    check: s.check,
                });
                layout.max_block = layout.max_block.max(r.uncompressed);
            }
            uoffset = match uoffset.checked_add(r.uncompressed).filter(|&u| u <= VLI_MAX) {
                Some(u) => u,
                None => return err("xz: uncompressed size of the image exceeds 2^63"),
            };
            coffset += padded(r.unpadded);
        }
    }
    layout.size = uoffset;
    layout.fingerprint = hasher.finish();
    Ok(layout)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes a VLI.
    pub fn vli(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn header(check: u8) -> Vec<u8> {
        let mut h = HEADER_MAGIC.to_vec();
        h.extend([0, check]);
        h.extend(crc32(&[0, check]).to_le_bytes());
        h
    }

    pub fn footer(check: u8, index_len: u64) -> Vec<u8> {
        let mut body = (((index_len / 4) - 1) as u32).to_le_bytes().to_vec();
        body.extend([0, check]);
        let mut f = crc32(&body).to_le_bytes().to_vec();
        f.extend(body);
        f.extend(FOOTER_MAGIC);
        f
    }

    pub fn index(records: &[Record]) -> Vec<u8> {
        let mut b = vec![0];
        vli(records.len() as u64, &mut b);
        for r in records {
            vli(r.unpadded, &mut b);
            vli(r.uncompressed, &mut b);
        }
        while b.len() % 4 != 0 {
            b.push(0);
        }
        let c = crc32(&b);
        b.extend(c.to_le_bytes());
        b
    }

    /// A synthetic stream: blocks are filler bytes (never decoded here).
    pub fn stream(check: u8, records: &[Record]) -> Vec<u8> {
        let mut s = header(check);
        for r in records {
            s.extend(std::iter::repeat_n(0x55, padded(r.unpadded) as usize));
        }
        let idx = index(records);
        let len = idx.len() as u64;
        s.extend(idx);
        s.extend(footer(check, len));
        s
    }

    fn parse_bytes(file: &[u8]) -> Result<Layout, FormatError> {
        parse(file.len() as u64, &mut |buf, off| {
            let end = off as usize + buf.len();
            assert!(end <= file.len(), "read past the end: {off}+{}", buf.len());
            buf.copy_from_slice(&file[off as usize..end]);
            Ok(())
        })
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn vli_round_trips_and_rejects_bad_encodings() {
        for v in [0, 1, 127, 128, 300, 1 << 35, VLI_MAX] {
            let mut b = Vec::new();
            vli(v, &mut b);
            let mut pos = 0;
            assert_eq!(read_vli(&b, &mut pos).unwrap(), v);
            assert_eq!(pos, b.len());
        }
        assert!(read_vli(&[0x80, 0x00], &mut 0).is_err(), "superfluous zero byte");
        assert!(read_vli(&[0xff; 10], &mut 0).is_err(), "too long");
        assert!(read_vli(&[0x80], &mut 0).is_err(), "truncated");
    }

    #[test]
    fn header_and_footer_decode_and_check_their_crc() {
        let h: [u8; 12] = header(4).try_into().unwrap();
        assert_eq!(decode_header(&h).unwrap(), 4);
        let mut bad = h;
        bad[7] = 1;
        assert!(decode_header(&bad).is_err());
        let f: [u8; 12] = footer(10, 8).try_into().unwrap();
        assert_eq!(decode_footer(&f).unwrap(), (10, 8));
        let mut bad = f;
        bad[4] ^= 1;
        assert!(decode_footer(&bad).is_err());
        let mut flags = header(0);
        flags[7] = 0x10;
        let c = crc32(&flags[6..8]);
        flags[8..].copy_from_slice(&c.to_le_bytes());
        assert!(decode_header(&flags.try_into().unwrap()).is_err(), "reserved flag bits");
    }

    #[test]
    fn index_rejects_lies() {
        let recs = [Record { unpadded: 20, uncompressed: 100 }, Record { unpadded: 9, uncompressed: 0 }];
        assert_eq!(decode_index(&index(&recs)).unwrap(), recs);
        // A count bigger than the bytes can hold.
        let mut b = vec![0, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0];
        let c = crc32(&b);
        b.extend(c.to_le_bytes());
        assert!(decode_index(&b).is_err());
        // Unpadded size below the minimum.
        assert!(decode_index(&index(&[Record { unpadded: 4, uncompressed: 1 }])).is_err());
        // Non-zero padding.
        let mut b = index(&[Record { unpadded: 20, uncompressed: 200 }]);
        let n = b.len();
        assert_eq!(n, 12, "three bytes of padding");
        b[n - 5] = 1;
        let c = crc32(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&c.to_le_bytes());
        assert!(decode_index(&b).is_err());
    }

    #[test]
    fn layout_of_concatenated_streams_with_padding() {
        let a = stream(1, &[Record { unpadded: 30, uncompressed: 1000 }, Record { unpadded: 17, uncompressed: 500 }]);
        let b = stream(10, &[Record { unpadded: 9, uncompressed: 0 }, Record { unpadded: 41, uncompressed: 7 }]);
        let mut file = a.clone();
        file.extend([0; 8]);
        file.extend(&b);
        file.extend([0; 4]);
        let l = parse_bytes(&file).unwrap();
        assert_eq!(l.streams, 2);
        assert_eq!(l.size, 1507);
        assert_eq!(l.max_block, 1000);
        let starts: Vec<_> = l.blocks.iter().map(|b| (b.uoffset, b.usize, b.coffset, b.check)).collect();
        let b_start = a.len() as u64 + 8;
        assert_eq!(starts, [(0, 1000, 12, 1), (1000, 500, 12 + 32, 1), (1500, 7, b_start + 12 + 12, 10)]);
        assert_eq!(l.find(0), Some(0));
        assert_eq!(l.find(999), Some(0));
        assert_eq!(l.find(1000), Some(1));
        assert_eq!(l.find(1506), Some(2));
        assert_eq!(l.find(1507), None);
    }

    #[test]
    fn hostile_files_are_refused() {
        let good = stream(1, &[Record { unpadded: 30, uncompressed: 1000 }]);
        assert!(parse_bytes(&good).is_ok());
        assert_eq!(parse_bytes(&good[..4]).unwrap_err().0, "xz: file too short");
        assert_eq!(parse_bytes(&[0; 32]).unwrap_err().0, "xz: not an xz file");
        assert_eq!(parse_bytes(&good[..good.len() - 1]).unwrap_err().0,
                   "xz: not an xz file: size is not a multiple of 4 bytes");
        // Truncated by four bytes: the footer is not where it should be.
        assert!(parse_bytes(&good[..good.len() - 4]).is_err());
        // Garbage between streams.
        let mut two = good.clone();
        two.extend([1, 2, 3, 4]);
        two.extend(&good);
        assert!(parse_bytes(&two).unwrap_err().0.contains("at"));
        // Padding before the first stream.
        let mut pre = vec![0; 4];
        pre.extend(&good);
        assert!(parse_bytes(&pre).is_err());
        // Header and footer disagree.
        let mut mixed = header(4);
        mixed.extend(&good[12..]);
        assert!(parse_bytes(&mixed).unwrap_err().0.contains("not equal"));
        // A block size that would put the stream before the file.
        let lie = stream(1, &[Record { unpadded: 30, uncompressed: 1000 }]);
        let idx = index(&[Record { unpadded: 3000, uncompressed: 1000 }]);
        let mut bad = lie[..lie.len() - 12 - idx.len()].to_vec();
        bad.extend(&idx);
        bad.extend(footer(1, idx.len() as u64));
        assert!(parse_bytes(&bad).is_err());
    }

    #[test]
    fn image_bigger_than_2_63_is_refused() {
        let big = VLI_MAX / 2 + 1;
        let s = stream(0, &[Record { unpadded: 8, uncompressed: big }, Record { unpadded: 8, uncompressed: big }]);
        assert!(parse_bytes(&s).unwrap_err().0.contains("2^63"));
    }

    fn records() -> impl Strategy<Value = Vec<Record>> {
        prop::collection::vec((5u64..200, 0u64..100_000).prop_map(|(u, c)| Record { unpadded: u, uncompressed: c }), 0..6)
    }

    proptest! {
        /// Any sequence of valid streams with any padding parses into a
        /// contiguous map whose lookups agree with a linear search.
        #[test]
        fn valid_files_round_trip(streams in prop::collection::vec((0u8..16, records(), 0usize..3), 1..4)) {
            let mut file = Vec::new();
            let mut expect = Vec::new();
            for (check, recs, pad) in &streams {
                file.extend(stream(*check, recs));
                file.extend(vec![0; 4 * pad]);
                expect.extend(recs.iter().filter(|r| r.uncompressed > 0).map(|r| r.uncompressed));
            }
            let l = parse_bytes(&file).unwrap();
            prop_assert_eq!(l.streams, streams.len());
            prop_assert_eq!(l.blocks.iter().map(|b| b.usize).collect::<Vec<_>>(), expect);
            let mut off = 0;
            for (i, b) in l.blocks.iter().enumerate() {
                prop_assert_eq!(b.uoffset, off);
                prop_assert_eq!(l.find(off), Some(i));
                prop_assert_eq!(l.find(off + b.usize - 1), Some(i));
                off += b.usize;
            }
            prop_assert_eq!(l.size, off);
            prop_assert_eq!(l.find(off), None);
        }

        /// Flipping, truncating or appending bytes never panics nor reads
        /// past the end; if it still parses, the map stays inside the file.
        #[test]
        fn mangled_files_never_panic(recs in records(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                                     cut in 0usize..40, tail in prop::collection::vec(any::<u8>(), 0..12)) {
            let mut file = stream(4, &recs);
            for (i, v) in flips {
                let n = file.len();
                file[i.index(n)] ^= v;
            }
            file.truncate(file.len().saturating_sub(cut));
            file.extend(tail);
            if let Ok(l) = parse_bytes(&file) {
                for b in &l.blocks {
                    prop_assert!(b.coffset + padded(b.unpadded) <= file.len() as u64);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(mut file in prop::collection::vec(any::<u8>(), 0..200)) {
            if file.len() >= 6 {
                file[..6].copy_from_slice(&HEADER_MAGIC);
            }
            let _ = parse_bytes(&file);
        }
    }
}
