//! The in-memory index of free host clusters, built once at open so that
//! allocation never scans refcounts.
//!
//! Free space is kept as a set of ranges below `end` (the first cluster
//! past everything ever allocated); everything at or past `end` is free.
//! Taking one cluster takes the lowest free range, so the cost of an
//! allocation is O(log ranges), flat as the image grows, and the image
//! stays compact (holes are reused before the file grows).

use std::collections::BTreeMap;

use qj_spec::units::HostCluster;

/// Free host clusters, as ranges.
#[derive(Debug, Default, Clone)]
pub struct FreeIndex {
    /// start cluster -> length in clusters; ranges never touch or overlap.
    ranges: BTreeMap<u64, u64>,
    /// Every cluster at or past this index is free.
    end: u64,
}

impl FreeIndex {
    /// An index where everything at or past `end` is free and nothing below.
    pub fn new(end: u64) -> Self {
        Self {
            ranges: BTreeMap::new(),
            end,
        }
    }

    /// The first cluster past everything allocated.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Number of free ranges below `end` (a measure of fragmentation).
    pub fn hole_count(&self) -> usize {
        self.ranges.len()
    }

    /// Clusters free below `end`.
    pub fn free_below_end(&self) -> u64 {
        self.ranges.values().sum()
    }

    /// Whether `cluster` is free.
    pub fn is_free(&self, cluster: HostCluster) -> bool {
        if cluster.0 >= self.end {
            return true;
        }
        self.ranges
            .range(..=cluster.0)
            .next_back()
            .is_some_and(|(&start, &len)| cluster.0 < start + len)
    }

    /// Marks `cluster` free. It must be allocated (below `end`, not free).
    pub fn release(&mut self, cluster: HostCluster) {
        let c = cluster.0;
        assert!(c < self.end, "release of cluster {c} past end {}", self.end);
        assert!(!self.is_free(cluster), "double free of cluster {c}");
        let mut start = c;
        let mut len = 1;
        // Merge with the range ending just before.
        if let Some((&s, &l)) = self.ranges.range(..c).next_back() {
            if s + l == c {
                self.ranges.remove(&s);
                start = s;
                len += l;
            }
        }
        // Merge with the range starting just after.
        if let Some(&l) = self.ranges.get(&(c + 1)) {
            self.ranges.remove(&(c + 1));
            len += l;
        }
        if start + len == self.end {
            // The free range reaches the end: pull the end back instead.
            self.end = start;
        } else {
            self.ranges.insert(start, len);
        }
    }

    /// Takes the lowest free cluster.
    #[must_use = "an allocated cluster must be referenced or released"]
    pub fn take_one(&mut self) -> HostCluster {
        if let Some((&start, &len)) = self.ranges.iter().next() {
            self.ranges.remove(&start);
            if len > 1 {
                self.ranges.insert(start + 1, len - 1);
            }
            return HostCluster(start);
        }
        let c = self.end;
        self.end += 1;
        HostCluster(c)
    }

    /// Takes `count` contiguous free clusters (first fit), for tables that
    /// must be contiguous (L1, refcount table).
    #[must_use = "allocated clusters must be referenced or released"]
    pub fn take_contiguous(&mut self, count: u64) -> HostCluster {
        assert!(count > 0);
        let fit = self
            .ranges
            .iter()
            .find(|(_, &len)| len >= count)
            .map(|(&s, &l)| (s, l));
        if let Some((start, len)) = fit {
            self.ranges.remove(&start);
            if len > count {
                self.ranges.insert(start + count, len - count);
            }
            return HostCluster(start);
        }
        // A free range touching the end can be extended past it.
        let start = match self.ranges.iter().next_back() {
            Some((&s, &l)) if s + l == self.end => {
                self.ranges.remove(&s);
                s
            }
            _ => self.end,
        };
        self.end = start + count;
        HostCluster(start)
    }

    /// Marks a specific free cluster as taken (used when an allocation must
    /// land in a given range, e.g. a self-describing refcount block).
    pub fn take_specific(&mut self, cluster: HostCluster) {
        let c = cluster.0;
        assert!(self.is_free(cluster), "cluster {c} is not free");
        if c >= self.end {
            // Clusters between the old end and c become free holes.
            if c > self.end {
                let old_end = self.end;
                self.end = c + 1;
                self.ranges.insert(old_end, c - old_end);
                self.merge_around(old_end);
            } else {
                self.end = c + 1;
            }
            return;
        }
        let (&s, &l) = self
            .ranges
            .range(..=c)
            .next_back()
            .expect("free cluster has a range");
        self.ranges.remove(&s);
        if c > s {
            self.ranges.insert(s, c - s);
        }
        if c + 1 < s + l {
            self.ranges.insert(c + 1, s + l - c - 1);
        }
    }

    /// The lowest free cluster in `[from, to)`, if any.
    pub fn first_free_in(&self, from: u64, to: u64) -> Option<HostCluster> {
        if from >= to {
            return None;
        }
        if let Some((&s, &l)) = self.ranges.range(..=from).next_back() {
            if from < s + l {
                return Some(HostCluster(from));
            }
        }
        if let Some((&s, _)) = self.ranges.range(from..to).next() {
            return Some(HostCluster(s));
        }
        (self.end < to).then(|| HostCluster(self.end.max(from)))
    }

    fn merge_around(&mut self, start: u64) {
        let Some(&len) = self.ranges.get(&start) else {
            return;
        };
        if let Some((&s, &l)) = self.ranges.range(..start).next_back() {
            if s + l == start {
                self.ranges.remove(&start);
                self.ranges.insert(s, l + len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reuses_lowest_hole_before_growing() {
        let mut f = FreeIndex::new(10);
        f.release(HostCluster(3));
        f.release(HostCluster(7));
        assert_eq!(f.take_one(), HostCluster(3));
        assert_eq!(f.take_one(), HostCluster(7));
        assert_eq!(f.take_one(), HostCluster(10));
        assert_eq!(f.end(), 11);
    }

    #[test]
    fn contiguous_takes_first_fit_or_extends_end() {
        let mut f = FreeIndex::new(10);
        f.release(HostCluster(2));
        f.release(HostCluster(4));
        f.release(HostCluster(5));
        assert_eq!(f.take_contiguous(2), HostCluster(4));
        f.release(HostCluster(9));
        // 9 touches the end: the end is pulled back to 9.
        assert_eq!(f.end(), 9);
        assert_eq!(f.take_contiguous(3), HostCluster(9));
        assert_eq!(f.end(), 12);
    }

    proptest! {
        /// The index agrees with a plain set of allocated clusters under any
        /// sequence of takes and releases.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec((0u8..4, 0u64..64), 1..200)) {
            let mut f = FreeIndex::new(0);
            let mut used = std::collections::BTreeSet::new();
            for (op, arg) in ops {
                match op {
                    0 => { let c = f.take_one(); prop_assert!(used.insert(c.0)); }
                    1 => { let n = arg % 4 + 1; let c = f.take_contiguous(n);
                           for i in 0..n { prop_assert!(used.insert(c.0 + i), "overlap at {}", c.0 + i); } }
                    2 => { if let Some(&c) = used.iter().nth(arg as usize % used.len().max(1)) {
                               used.remove(&c); f.release(HostCluster(c)); } }
                    _ => { if !used.contains(&arg) { f.take_specific(HostCluster(arg)); used.insert(arg); } }
                }
                for c in 0..80 { prop_assert_eq!(f.is_free(HostCluster(c)), !used.contains(&c), "cluster {}", c); }
                prop_assert_eq!(f.end(), used.iter().next_back().map_or(0, |m| m + 1), "end is one past the last used cluster");
            }
        }
    }
}
