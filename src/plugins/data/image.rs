//! A lazy image: what an evaluated data expression holds, without
//! materializing it. Pieces of bytes, fills, sub-images and repeats of a
//! sub-image, placed at offsets; gaps read as zeroes. A 1 GiB repeat is
//! one piece, read by computing the bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a piece's bytes come from.
#[derive(Debug, Clone)]
pub enum Src {
    /// Literal bytes.
    Bytes(Arc<[u8]>),
    /// One byte, repeated (never zero: zeroes are gaps).
    Fill(u8),
    /// A part of another image.
    Image(Arc<Image>),
    /// Another image, repeated end to end.
    Repeat(Arc<Image>),
}

/// A run of bytes: `len` bytes of `src` from position `off`.
#[derive(Debug, Clone)]
pub struct Piece {
    pub len: u64,
    pub src: Src,
    pub off: u64,
}

/// Pieces at most this many are copied into a parent instead of referring
/// to the sub-image (keeps reads shallow).
const INLINE_PIECES: usize = 32;

/// An image: non-overlapping pieces keyed by start, and a length (its
/// high-water mark; it may end in a gap).
#[derive(Debug, Clone, Default)]
pub struct Image {
    pieces: BTreeMap<u64, Piece>,
    len: u64,
    /// True if some byte is not zero.
    nonzero: bool,
}

impl Image {
    /// The image's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Sets the length (the high-water mark), cutting pieces beyond it.
    pub fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.clear(len, self.len - len);
        }
        self.len = len;
    }

    /// Number of pieces.
    #[cfg(test)]
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Makes `[start, start+len)` zeroes (a gap).
    pub fn clear(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        // A piece starting before `start` may reach into the range.
        if let Some((&k, p)) = self.pieces.range(..start).next_back() {
            if k + p.len > start {
                let mut p = self.pieces.remove(&k).unwrap_or_else(|| unreachable!());
                if k + p.len > end {
                    let tail = Piece { len: k + p.len - end, src: p.src.clone(), off: p.off + (end - k) };
                    self.pieces.insert(end, tail);
                }
                p.len = start - k;
                self.pieces.insert(k, p);
            }
        }
        let inside: Vec<u64> = self.pieces.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            let p = self.pieces.remove(&k).unwrap_or_else(|| unreachable!());
            if k + p.len > end {
                let tail = Piece { len: k + p.len - end, src: p.src, off: p.off + (end - k) };
                self.pieces.insert(end, tail);
            }
        }
    }

    /// Places `p` at `start`, over whatever was there.
    pub fn put(&mut self, start: u64, p: Piece) {
        self.clear(start, p.len);
        if p.len > 0 {
            self.nonzero = true;
            self.len = self.len.max(start + p.len);
            self.pieces.insert(start, p);
        }
    }

    /// Recomputes `nonzero` after pieces were placed or cleared.
    pub fn refresh(&mut self) {
        self.nonzero = self.pieces.iter().any(|(&k, p)| piece_any_nonzero(p, p.off, p.len.min(self.len.saturating_sub(k))));
    }

    /// Copies `[off, off+len)` of `sub` to `start` (over what was there):
    /// its pieces, if few, else one piece referring to it.
    pub fn blit(&mut self, start: u64, sub: &Arc<Image>, off: u64, len: u64) {
        self.clear(start, len);
        if len == 0 || !sub.nonzero {
            return;
        }
        let end = off + len;
        let overlapping = || {
            let first = sub.pieces.range(..off).next_back().filter(|(&k, p)| k + p.len > off);
            first.into_iter().chain(sub.pieces.range(off..end))
        };
        if overlapping().take(INLINE_PIECES + 1).count() <= INLINE_PIECES {
            let copies: Vec<(u64, Piece)> = overlapping()
                .map(|(&k, p)| {
                    let lo = k.max(off);
                    let hi = (k + p.len).min(end);
                    (start + (lo - off), Piece { len: hi - lo, src: p.src.clone(), off: p.off + (lo - k) })
                })
                .collect();
            for (k, p) in copies {
                self.put(k, p);
            }
        } else {
            self.put(start, Piece { len, src: Src::Image(sub.clone()), off });
        }
    }

    /// Places `count` copies of `unit` end to end at `start`.
    pub fn repeat(&mut self, start: u64, unit: &Arc<Image>, count: u64, total: u64) {
        self.clear(start, total);
        if total == 0 || !unit.nonzero {
            return;
        }
        if count == 1 {
            return self.blit(start, unit, 0, unit.len);
        }
        // A unit that is one piece covering it: repeat that piece's source.
        if unit.pieces.len() == 1 {
            if let Some((&0, p)) = unit.pieces.iter().next() {
                if p.len == unit.len {
                    match &p.src {
                        Src::Fill(b) => return self.put(start, Piece { len: total, src: Src::Fill(*b), off: 0 }),
                        Src::Repeat(inner) if inner.len > 0 && unit.len.is_multiple_of(inner.len) => {
                            let off = p.off % inner.len;
                            return self.put(start, Piece { len: total, src: Src::Repeat(inner.clone()), off });
                        }
                        _ => {}
                    }
                }
            }
        }
        self.put(start, Piece { len: total, src: Src::Repeat(unit.clone()), off: 0 });
    }

    /// Reads `buf.len()` bytes at `offset`; beyond the end reads zeroes.
    pub fn read(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let first = self.pieces.range(..=offset).next_back().filter(|(&k, p)| k + p.len > offset);
        for (&k, p) in first.into_iter().chain(self.pieces.range(offset.saturating_add(1)..end)) {
            if k > pos {
                buf[(pos - offset) as usize..(k - offset) as usize].fill(0);
                pos = k;
            }
            let hi = (k + p.len).min(end);
            read_piece(p, p.off + (pos - k), &mut buf[(pos - offset) as usize..(hi - offset) as usize]);
            pos = hi;
        }
        buf[(pos - offset) as usize..].fill(0);
    }

    /// True if `[offset, offset+len)` holds a byte that is not zero.
    pub fn any_nonzero(&self, offset: u64, len: u64) -> bool {
        if !self.nonzero || len == 0 {
            return false;
        }
        let end = offset.saturating_add(len);
        let first = self.pieces.range(..=offset).next_back().filter(|(&k, p)| k + p.len > offset);
        for (&k, p) in first.into_iter().chain(self.pieces.range(offset.saturating_add(1)..end)) {
            let lo = k.max(offset);
            let hi = (k + p.len).min(end);
            if piece_any_nonzero(p, p.off + (lo - k), hi - lo) {
                return true;
            }
        }
        false
    }

    /// The start of the first piece at or after `offset` that may hold
    /// data, if any (gaps before it are zeroes).
    pub fn next_piece(&self, offset: u64) -> Option<(u64, u64)> {
        let first = self.pieces.range(..=offset).next_back().filter(|(&k, p)| k + p.len > offset);
        first
            .or_else(|| self.pieces.range(offset..).next())
            .map(|(&k, p)| (k, k + p.len))
    }

    /// The end of the piece holding `offset`, if every window of `window`
    /// bytes inside that piece certainly holds data: a fill, or a repeat
    /// of a unit with data no longer than the window (which then holds a
    /// whole period).
    pub fn dense_until(&self, offset: u64, window: u64) -> Option<u64> {
        let (&k, p) = self.pieces.range(..=offset).next_back().filter(|(&k, p)| k + p.len > offset)?;
        match &p.src {
            Src::Fill(_) => Some(k + p.len),
            Src::Repeat(unit) if unit.len <= window && unit.nonzero => Some(k + p.len),
            _ => None,
        }
    }
}

fn read_piece(p: &Piece, off: u64, buf: &mut [u8]) {
    match &p.src {
        Src::Bytes(b) => buf.copy_from_slice(&b[off as usize..off as usize + buf.len()]),
        Src::Fill(c) => buf.fill(*c),
        Src::Image(img) => img.read(buf, off),
        Src::Repeat(unit) => {
            let u = unit.len;
            let n = buf.len();
            // The first period, read from the unit (wrapping once) ...
            let first = (n as u64).min(u) as usize;
            let pos = off % u;
            let a = ((u - pos) as usize).min(first);
            unit.read(&mut buf[..a], pos);
            if first > a {
                unit.read(&mut buf[a..first], 0);
            }
            // ... then the rest copied from what is already there.
            let mut have = first;
            while have < n {
                let take = have.min(n - have);
                let (done, rest) = buf.split_at_mut(have);
                rest[..take].copy_from_slice(&done[..take]);
                have += take;
            }
            // Doubling copies keep the period: buf[i] = buf[i - u] holds as
            // `have` is always a multiple of the period `first` when n > u.
            debug_assert!(n as u64 <= u || first as u64 == u);
        }
    }
}

fn piece_any_nonzero(p: &Piece, off: u64, len: u64) -> bool {
    if len == 0 {
        return false;
    }
    match &p.src {
        Src::Bytes(b) => b[off as usize..(off + len) as usize].iter().any(|&c| c != 0),
        Src::Fill(c) => *c != 0,
        Src::Image(img) => img.any_nonzero(off, len),
        Src::Repeat(unit) => {
            let u = unit.len;
            if !unit.nonzero {
                return false;
            }
            if len >= u {
                return true;
            }
            let pos = off % u;
            let a = (u - pos).min(len);
            unit.any_nonzero(pos, a) || (len > a && unit.any_nonzero(0, len - a))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> Piece {
        Piece { len: b.len() as u64, src: Src::Bytes(Arc::from(b)), off: 0 }
    }

    fn all(img: &Image) -> Vec<u8> {
        let mut v = vec![0xee; img.len() as usize];
        img.read(&mut v, 0);
        v
    }

    #[test]
    fn later_pieces_override_earlier_ones() {
        let mut img = Image::default();
        img.put(0, bytes(b"XXXXXXXXXX"));
        img.put(3, bytes(b"ab"));
        img.put(9, bytes(b"cd"));
        img.clear(1, 1);
        assert_eq!(all(&img), b"X\0XabXXXXcd");
        let sub = Arc::new(img.clone());
        let mut top = Image::default();
        top.put(0, Piece { len: 20, src: Src::Fill(b'-'), off: 0 });
        top.blit(2, &sub, 1, 5);
        assert_eq!(all(&top), b"--\0XabX-------------");
        top.set_len(5);
        assert_eq!(all(&top), b"--\0Xa");
        assert!(top.any_nonzero(0, 1) && !top.any_nonzero(2, 1) && top.any_nonzero(2, 2));
    }

    #[test]
    fn repeats_read_across_periods() {
        let mut unit = Image::default();
        unit.put(0, bytes(b"hello"));
        unit.set_len(7);
        let unit = Arc::new(unit);
        let mut img = Image::default();
        img.repeat(3, &unit, 1000, 7000);
        let want: Vec<u8> = [&[0u8; 3][..], &b"hello\0\0".repeat(1000)].concat();
        assert_eq!(all(&img), want);
        for (o, n) in [(0, 1), (5, 3), (9, 12), (6999, 4), (1234, 567)] {
            let mut b = vec![0xee; n];
            img.read(&mut b, o);
            assert_eq!(b, want[o as usize..o as usize + n], "{o} {n}");
        }
        assert!(!img.any_nonzero(0, 3) && !img.any_nonzero(8, 2) && img.any_nonzero(8, 3));
        // A huge repeat stays one piece.
        let mut big = Image::default();
        big.repeat(0, &unit, 1 << 50, 7 << 50);
        assert_eq!(big.piece_count(), 1);
        let mut b = [0; 7];
        big.read(&mut b, (7 << 50) - 7);
        assert_eq!(&b, b"hello\0\0");
    }
}
