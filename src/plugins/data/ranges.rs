//! A set of `u64` ranges (half-open, merged), for pages that are
//! allocated or overridden.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent ranges `start → end`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[lo, hi)`.
    pub fn insert(&mut self, mut lo: u64, mut hi: u64) {
        if lo >= hi {
            return;
        }
        // Merge with a range that starts before and reaches lo.
        if let Some((&s, &e)) = self.map.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        let inside: Vec<(u64, u64)> = self.map.range(lo..=hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.map.remove(&s);
            hi = hi.max(e);
        }
        self.map.insert(lo, hi);
    }

    /// Removes `[lo, hi)`.
    pub fn remove(&mut self, lo: u64, hi: u64) {
        if lo >= hi {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..lo).next_back() {
            if e > lo {
                self.map.insert(s, lo);
                if e > hi {
                    self.map.insert(hi, e);
                }
            }
        }
        let inside: Vec<(u64, u64)> = self.map.range(lo..hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.map.remove(&s);
            if e > hi {
                self.map.insert(hi, e);
            }
        }
    }

    /// True if `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.map.range(..=x).next_back().is_some_and(|(_, &e)| e > x)
    }

    /// From `x`: `(true, end)` if `x` is in a range ending at `end`, else
    /// `(false, start of the next range or u64::MAX)`.
    pub fn run_at(&self, x: u64) -> (bool, u64) {
        if let Some((_, &e)) = self.map.range(..=x).next_back().filter(|(_, &e)| e > x) {
            return (true, e);
        }
        (false, self.map.range(x..).next().map_or(u64::MAX, |(&s, _)| s))
    }

    /// True if all of `[lo, hi)` is in the set.
    pub fn covers(&self, lo: u64, hi: u64) -> bool {
        lo >= hi || matches!(self.run_at(lo), (true, e) if e >= hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_bitmap(ops in prop::collection::vec((any::<bool>(), 0u64..64, 0u64..64), 1..40)) {
            let mut set = RangeSet::default();
            let mut bits = [false; 64];
            for (add, a, b) in ops {
                let (lo, hi) = (a.min(b), a.max(b));
                if add { set.insert(lo, hi) } else { set.remove(lo, hi) }
                bits[lo as usize..hi as usize].fill(add);
                for x in 0..64u64 {
                    prop_assert_eq!(set.contains(x), bits[x as usize]);
                    let (inside, to) = set.run_at(x);
                    prop_assert_eq!(inside, bits[x as usize]);
                    let want = (x as usize..64).find(|&i| bits[i] != inside).map_or(if inside { 64 } else { u64::MAX }, |i| i as u64);
                    prop_assert_eq!(to, want);
                }
                // Ranges stay merged: no two touch.
                let v: Vec<_> = set.map.iter().collect();
                for w in v.windows(2) {
                    prop_assert!(w[0].1 < w[1].0);
                }
            }
        }
    }
}
