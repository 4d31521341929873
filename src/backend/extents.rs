//! The extent list a layer fills in answer to block status (nbdkit's
//! `nbdkit_extents`), with nbdkit's rules for what `add` accepts.

use crate::error::{Error, Result};

/// Extent type bit: not allocated.
pub const HOLE: u32 = 1;
/// Extent type bit: reads as zeroes.
pub const ZERO: u32 = 2;

/// Most extents one list holds; adding more is silently ignored.
pub const MAX_EXTENTS: usize = 1024 * 1024;

/// One run of bytes with the same allocation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, absolute.
    pub offset: u64,
    /// Length, non-zero.
    pub length: u64,
    /// `HOLE | ZERO` bits.
    pub typ: u32,
}

/// Extents covering part of `[start, end)`, contiguous from `start`.
#[derive(Debug, Clone)]
pub struct Extents {
    start: u64,
    end: u64,
    list: Vec<Extent>,
    /// Where the next extent must begin (after the first has been added).
    next: u64,
}

impl Extents {
    /// An empty list for `[start, end)`.
    pub fn new(start: u64, end: u64) -> Extents {
        Extents { start, end: end.max(start), list: Vec::new(), next: start }
    }
    /// Start of the range asked for.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// End of the range asked for.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// The extents so far.
    pub fn list(&self) -> &[Extent] {
        &self.list
    }
    /// Number of extents.
    pub fn count(&self) -> usize {
        self.list.len()
    }
    /// Where the list stops covering (start if empty).
    pub fn covered_to(&self) -> u64 {
        self.list.last().map_or(self.start, |e| e.offset + e.length)
    }

    /// Adds `[offset, offset+length)` of type `typ`, as `nbdkit_add_extent`:
    /// extents must come in ascending contiguous order; zero-length ones
    /// and those before `start` are ignored; the first one must cover
    /// `start`; those past `end` are ignored and one crossing it is
    /// truncated; neighbours of the same type coalesce.
    pub fn add(&mut self, offset: u64, length: u64, typ: u32) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let Some(mut stop) = offset.checked_add(length) else {
            return Err(Error::invalid("extents: offset + length overflows"));
        };
        if self.list.is_empty() {
            if stop <= self.start {
                return Ok(()); // wholly before the range: ignored
            }
            if offset > self.start {
                return Err(Error::invalid(format!(
                    "extents: first extent must not be > start ({})",
                    self.start
                )));
            }
        } else if offset != self.next {
            return Err(Error::invalid("extents: non-contiguous extent added"));
        }
        let first = offset.max(self.start);
        if first >= self.end {
            self.next = stop;
            return Ok(()); // beyond the end: ignored
        }
        stop = stop.min(self.end);
        self.next = offset + length;
        if let Some(last) = self.list.last_mut() {
            if last.typ == typ {
                last.length = stop - last.offset;
                return Ok(());
            }
        }
        if self.list.len() >= MAX_EXTENTS {
            // Full: the list stops here, so nothing may coalesce across
            // the extents dropped from now on.
            self.end = self.list.last().map_or(self.start, |e| e.offset + e.length);
            return Ok(());
        }
        self.list.push(Extent { offset: first, length: stop - first, typ });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_to_range_and_coalesces() {
        let mut e = Extents::new(100, 1000);
        e.add(0, 50, 0).unwrap(); // before start: ignored
        e.add(50, 100, 0).unwrap(); // crosses start: trimmed
        e.add(150, 100, 0).unwrap(); // same type: coalesced
        e.add(250, 5000, HOLE | ZERO).unwrap(); // crosses end: truncated
        e.add(5250, 10, 0).unwrap(); // past end: ignored
        assert_eq!(e.list(), &[Extent { offset: 100, length: 150, typ: 0 },
                               Extent { offset: 250, length: 750, typ: 3 }]);
    }

    #[test]
    fn gaps_and_late_starts_are_errors() {
        let mut e = Extents::new(0, 100);
        assert!(e.add(10, 10, 0).is_err());
        e.add(0, 10, 0).unwrap();
        assert!(e.add(20, 10, 0).is_err());
        assert!(e.add(10, u64::MAX, 0).is_err());
    }
}
