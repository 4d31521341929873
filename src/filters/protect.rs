//! `protect`: refuse writes that would change protected byte ranges
//! (`protect=START-END`, inclusive, or `protect=~START-END` for everything
//! outside it; repeatable).
//!
//! A write, trim or zero touching a protected range reads the current
//! bytes there first: a write that leaves them as they are (identical
//! bytes, or zeroes over zeroes) goes through, any other fails with EPERM
//! and nbdkit's message, before anything is written. Reads are untouched.
//!
//! Unlike nbdkit (1.32 to 1.44), ranges are merged with the larger of the
//! two ends: nbdkit takes the end of the range sorted second, so
//! `protect=0-1023 protect=256-511` leaves 512–1023 unprotected there
//! (README, "Known differences").

use crate::backend::{BlockSize, Caps, Extents, Filter, FilterEntry, Flags, Handle, Next, Param};
use crate::error::{Error, ErrorKind, Result};
use crate::util::log;
use crate::util::parse::parse_unsigned;

/// The largest offset a range may reach (nbdkit's INT64_MAX).
const MAX_END: u64 = i64::MAX as u64;

/// Bytes compared per read of the layer below.
const CHUNK: u64 = 1 << 20;

/// One protected range, inclusive, with the `protect=` text it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
    text: String,
}

/// Parses one `protect=` value into the ranges it protects (none, one or
/// two), as nbdkit's `parse_range`.
fn parse_range(value: &str) -> Result<Vec<Range>> {
    let (negate, v) = match value.strip_prefix('~') {
        Some(v) => (true, v),
        None => (false, value),
    };
    let Some((s, e)) = v.split_once('-') else {
        return Err(Error::invalid(format!("cannot parse range, missing '-': {value}")));
    };
    let start = if s.is_empty() { 0 } else { parse_unsigned("range", s, u64::MAX)? };
    let end = if e.is_empty() { MAX_END } else { parse_unsigned("range", e, u64::MAX)? };
    if end < start {
        return Err(Error::invalid(format!("invalid range, end < start: {value}")));
    }
    let r = |start, end| Range { start, end, text: value.to_string() };
    Ok(if !negate {
        vec![r(start, end)]
    } else {
        let mut v = Vec::new();
        if start > 0 {
            v.push(r(0, start - 1));
        }
        if end < MAX_END {
            v.push(r(end + 1, MAX_END));
        }
        v
    })
}

/// Sorts and merges overlapping or adjacent ranges; a merged range keeps
/// the text of its first part and ends at the largest end.
fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(1) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[derive(Default)]
struct Protect {
    ranges: Vec<Range>,
}

impl Filter for Protect {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        if key != "protect" {
            return Ok(Param::NotMine);
        }
        self.ranges.extend(parse_range(value)?);
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        self.ranges = merge(std::mem::take(&mut self.ranges));
        for r in &self.ranges {
            crate::debug!("protect: protected range {}-{} ({})", r.start, r.end, r.text);
        }
        Ok(())
    }

    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let next = next.open(readonly, export, is_tls)?;
        // The ranges live as long as the chain, which is leaked after
        // get_ready; a copy per connection keeps the handle 'static anyway.
        Ok(Box::new(ProtectHandle { next, ranges: self.ranges.clone().into() }))
    }
}

struct ProtectHandle {
    next: Box<dyn Handle>,
    ranges: std::sync::Arc<[Range]>,
}

impl ProtectHandle {
    /// True if `[offset, offset+count)` overlaps a protected range.
    fn touches_protected(&self, count: u64, offset: u64) -> bool {
        if count == 0 {
            return false;
        }
        let end = offset.saturating_add(count - 1);
        let first = self.ranges.partition_point(|r| r.end < offset);
        self.ranges.get(first).is_some_and(|r| r.start <= end)
    }

    /// Fails with EPERM if writing `data` (None: zeroes) over
    /// `[offset, offset+count)` would change a protected byte.
    fn check(&self, count: u64, offset: u64, data: Option<&[u8]>) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(count - 1); // inclusive
        // First range that ends at or after `offset`.
        let first = self.ranges.partition_point(|r| r.end < offset);
        let debug = log::debug_flag("protect", "write") != 0;
        let mut buf = Vec::new();
        for r in self.ranges[first..].iter().take_while(|r| r.start <= end) {
            let (a, b) = (r.start.max(offset), r.end.min(end));
            if debug {
                log::debug(&format!("protect: checking protected region offset {a} length {}", b - a + 1));
            }
            let mut pos = a;
            while pos <= b {
                let n = (b - pos + 1).min(CHUNK);
                buf.resize(n as usize, 0);
                self.next.pread(&mut buf, pos, Flags::NONE)?;
                let same = match data {
                    Some(d) => {
                        let at = (pos - offset) as usize;
                        d[at..at + n as usize] == buf[..]
                    }
                    None => buf.iter().all(|&x| x == 0),
                };
                if !same {
                    return Err(Error::new(
                        ErrorKind::Perm,
                        format!("protect filter prevented write to protected range {}", r.text),
                    ));
                }
                pos += n;
            }
        }
        Ok(())
    }
}

/// Reads, flush, extents and cache pass through untouched. A `Handle`
/// rather than a `FilterHandle`, as reads are not changed: the plugin's
/// zero-copy and no-wait reads are passed down, and so is its zero-copy
/// write when the write touches no protected range (otherwise the server
/// falls back to `pwrite`, which checks the bytes).
impl Handle for ProtectHandle {
    fn size(&self) -> Result<u64> {
        self.next.size()
    }
    fn caps(&self) -> Result<Caps> {
        self.next.caps()
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.next.block_size()
    }
    fn export_description(&self) -> Option<String> {
        self.next.export_description()
    }
    fn blocks(&self) -> bool {
        self.next.blocks()
    }
    fn brief(&self) -> bool {
        self.next.brief()
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.next.pread(buf, offset, flags)
    }
    fn pread_lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        self.next.pread_lend(count, offset, sink)
    }
    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        self.next.pread_nowait(buf, offset)
    }
    fn pwrite_fill(&self, count: usize, offset: u64, flags: Flags,
                   fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        if self.touches_protected(count as u64, offset) {
            return None;
        }
        self.next.pwrite_fill(count, offset, flags, fill)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check(buf.len() as u64, offset, Some(buf))?;
        self.next.pwrite(buf, offset, flags)
    }
    fn flush(&self, flags: Flags) -> Result<()> {
        self.next.flush(flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(count, offset, None)?;
        self.next.trim(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(count, offset, None)?;
        self.next.zero(count, offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.next.extents(count, offset, flags, ext)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.next.cache(count, offset, flags)
    }
}

inventory::submit! {
    FilterEntry {
        name: "protect",
        alias: None,
        longname: "nbdkit protect filter",
        description: "nbdkit protect filter: refuse writes that change protected ranges of bytes",
        help: "protect=<START>-<END>      Protect range of bytes START-END (inclusive).",
        new: || Box::<Protect>::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testutil::MemNext;
    use proptest::prelude::*;

    fn ranges(args: &[&str]) -> Vec<(u64, u64)> {
        let mut f = Protect::default();
        for a in args {
            f.config("protect", a).unwrap();
        }
        f.config_complete().unwrap();
        f.ranges.iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn parsing_and_messages() {
        assert_eq!(ranges(&["0-511"]), [(0, 511)]);
        assert_eq!(ranges(&["-511"]), [(0, 511)]);
        assert_eq!(ranges(&["512-"]), [(512, MAX_END)]);
        assert_eq!(ranges(&["-"]), [(0, MAX_END)]);
        assert_eq!(ranges(&["~-"]), []);
        assert_eq!(ranges(&["~1024-2047"]), [(0, 1023), (2048, MAX_END)]);
        assert_eq!(ranges(&["~0-2047"]), [(2048, MAX_END)]);
        assert_eq!(ranges(&["0x10-0x1f", "010-017"]), [(8, 31)]);
        let e = |v: &str| parse_range(v).unwrap_err().message().to_string();
        assert_eq!(e("5"), "cannot parse range, missing '-': 5");
        assert_eq!(e("5-1"), "invalid range, end < start: 5-1");
        assert_eq!(e("~5-1"), "invalid range, end < start: ~5-1");
        assert!(e("x-1").starts_with("range: "));
        assert!(e("1-2-3").starts_with("range: "));
    }

    #[test]
    fn contained_ranges_merge_to_the_larger_end() {
        // nbdkit's quirk would give 0-511 here.
        assert_eq!(ranges(&["0-1023", "256-511"]), [(0, 1023)]);
        assert_eq!(ranges(&["256-511", "0-1023"]), [(0, 1023)]);
        assert_eq!(ranges(&["0-511", "512-1023", "2048-4095", "1024-1024"]), [(0, 1024), (2048, 4095)]);
        assert_eq!(ranges(&["0-511", "256-1023"]), [(0, 1023)]);
    }

    fn handle(args: &[&str], next: &MemNext) -> Box<dyn Handle> {
        let mut f = Protect::default();
        for a in args {
            f.config("protect", a).unwrap();
        }
        f.config_complete().unwrap();
        f.open(next, false, "", false).unwrap()
    }

    #[test]
    fn only_writes_that_change_protected_bytes_fail() {
        let next = MemNext::new(8192);
        next.state.lock().unwrap().data[100..105].copy_from_slice(b"hello");
        let h = handle(&["0-511", "~1024-4095"], &next);
        let e = h.pwrite(b"x", 4096, Flags::NONE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Perm);
        assert_eq!(e.message(), "protect filter prevented write to protected range ~1024-4095");
        let e = h.pwrite(&[1; 10], 95, Flags::NONE).unwrap_err();
        assert_eq!(e.message(), "protect filter prevented write to protected range 0-511");
        // One byte over the edge of a protected range.
        assert!(h.pwrite(&[1; 512], 512 - 1, Flags::NONE).is_err());
        assert!(h.pwrite(&[1; 512], 4096 - 511, Flags::NONE).is_err());
        assert_eq!(next.calls().iter().filter(|c| **c == "pwrite").count(), 0);
        // Identical bytes, zeroes over zeroes, and unprotected bytes pass.
        h.pwrite(b"\0\0\0\0\0hello\0", 95, Flags::NONE).unwrap();
        h.pwrite(&[9; 512], 1024, Flags::NONE).unwrap();
        h.pwrite(&[9; 3072], 1024, Flags::NONE).unwrap();
        h.zero(100, 200, Flags::NONE).unwrap();
        h.trim(4096, 4096, Flags::NONE).unwrap();
        assert_eq!(h.zero(512, 0, Flags::NONE).unwrap_err().kind(), ErrorKind::Perm);
        assert_eq!(h.trim(1, 104, Flags::NONE).unwrap_err().kind(), ErrorKind::Perm);
        assert_eq!(&next.state.lock().unwrap().data[100..105], b"hello");
    }

    #[test]
    fn zero_copy_writes_only_away_from_protected_ranges() {
        let next = MemNext::new(8192);
        let h = handle(&["1000-1999"], &next);
        let mut fill = |_: &mut [&mut [u8]]| true;
        // The in-memory disk has no zero-copy write: None either way, but
        // a write near a range must not even ask it.
        assert!(h.pwrite_fill(10, 995, Flags::NONE, &mut fill).is_none());
        assert!(h.pwrite_fill(10, 0, Flags::NONE, &mut fill).is_none());
        let f = Protect { ranges: merge(parse_range("1000-1999").unwrap()) };
        let ph = ProtectHandle { next: next.open(false, "", false).unwrap(), ranges: f.ranges.clone().into() };
        assert!(ph.touches_protected(10, 995) && ph.touches_protected(1, 1999) && ph.touches_protected(5000, 0));
        assert!(!ph.touches_protected(1000, 0) && !ph.touches_protected(10, 2000) && !ph.touches_protected(0, 5));
    }

    proptest! {
        /// Against a model: a write passes iff it changes no protected byte,
        /// and a refused write changes nothing.
        #[test]
        fn writes_match_the_model(prot in prop::collection::vec((0u64..4096, 0u64..600), 1..4),
                                  writes in prop::collection::vec((0u64..4000, 1usize..600, any::<u8>()), 1..20)) {
            let args: Vec<String> = prot.iter().map(|(s, l)| format!("{s}-{}", s + l)).collect();
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let next = MemNext::new(5000);
            let h = handle(&refs, &next);
            let protected = |i: u64| prot.iter().any(|&(s, l)| (s..=s + l).contains(&i));
            for (off, len, val) in writes {
                let len = len.min(5000 - off as usize);
                let before = next.state.lock().unwrap().data.clone();
                let changes = (off..off + len as u64).any(|i| protected(i) && before[i as usize] != val);
                let r = h.pwrite(&vec![val; len], off, Flags::NONE);
                prop_assert_eq!(r.is_err(), changes);
                if changes {
                    prop_assert_eq!(&next.state.lock().unwrap().data, &before);
                }
            }
        }
    }
}
