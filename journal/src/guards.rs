//! The ranges that unsynced transactions guard (copy sources and
//! checksummed data), indexed by where they start.
//!
//! Why an index: every transaction planned is checked against every guard
//! (a later journalled write into a guarded range is refused, rule in
//! `spec/qjournal.md` §8.6), and with the single-flush protocol each
//! newly written data cluster is a guard until the next checkpoint: a few
//! thousand of them. Kept in a list, that check ran under the journal's
//! state lock for a whole scan per target of each transaction, and the
//! plain journal's batch write stage took twice as long as logged
//! data's (558-651 us against 184-289 us, 8 NBD connections flushing).

use std::collections::BTreeMap;

/// A range later transactions must leave alone until the transaction that
/// guards it is synced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Guard {
    /// The guarding transaction.
    pub seq: u64,
    /// First byte of the range.
    pub start: u64,
    /// Length of the range in bytes.
    pub length: u64,
    /// Why a write into it is refused, for the error.
    pub what: &'static str,
}

/// Every guard of the unsynced transactions.
#[derive(Debug, Default)]
pub(crate) struct GuardSet {
    /// Guards by their start; several may start at one offset.
    by_start: BTreeMap<u64, Vec<Guard>>,
    /// The longest guard ever held: an overlapping guard starts at most
    /// this far before the range asked about.
    length_max: u64,
}

impl GuardSet {
    /// Adds a guard.
    pub(crate) fn insert(&mut self, guard: Guard) {
        self.length_max = self.length_max.max(guard.length);
        self.by_start.entry(guard.start).or_default().push(guard);
    }

    /// A guard that overlaps `[start, start + length)`, if any (as the
    /// journal has always counted overlap: a guard starting before `start`
    /// and ending after it overlaps even an empty range there).
    pub(crate) fn overlapping(&self, start: u64, length: u64) -> Option<&Guard> {
        let end = start.saturating_add(length);
        self.by_start
            .range(start.saturating_sub(self.length_max)..end)
            .flat_map(|(_, guards)| guards)
            .find(|g| g.start.saturating_add(g.length) > start)
    }

    /// Drops the guards of transactions up to `synced_seq`.
    pub(crate) fn forget_through(&mut self, synced_seq: u64) {
        self.by_start.retain(|_, guards| {
            guards.retain(|g| g.seq > synced_seq);
            !guards.is_empty()
        });
    }

    /// How many guards are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_start.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(seq: u64, start: u64, length: u64) -> Guard {
        Guard {
            seq,
            start,
            length,
            what: "test",
        }
    }

    /// The list the index replaced, as the oracle.
    fn overlaps_any(guards: &[Guard], start: u64, length: u64) -> bool {
        guards.iter().any(|g| {
            start < g.start.saturating_add(g.length) && g.start < start.saturating_add(length)
        })
    }

    #[test]
    fn finds_exactly_the_guards_a_scan_finds() {
        let guards = [
            guard(1, 0x1000, 0x1000),
            guard(2, 0x10000, 0x10000),
            guard(3, 0x10000, 0x200),
            guard(4, 0x30000, 1),
            guard(5, u64::MAX - 10, 10),
        ];
        let mut set = GuardSet::default();
        for g in guards {
            set.insert(g);
        }
        assert_eq!(set.len(), 5);
        let probes = [
            0u64,
            0xfff,
            0x1000,
            0x1fff,
            0x2000,
            0xffff,
            0x10000,
            0x1ffff,
            0x20000,
            0x2ffff,
            0x30000,
            0x30001,
            u64::MAX - 11,
            u64::MAX - 1,
        ];
        for &start in &probes {
            for length in [0u64, 1, 2, 0x100, 0x1000, 0x10000, u64::MAX] {
                assert_eq!(
                    set.overlapping(start, length).is_some(),
                    overlaps_any(&guards, start, length),
                    "[{start:#x}, +{length:#x})"
                );
            }
        }
    }

    #[test]
    fn forgetting_drops_synced_guards_only() {
        let mut set = GuardSet::default();
        set.insert(guard(1, 0x1000, 0x1000));
        set.insert(guard(2, 0x1000, 0x1000));
        set.insert(guard(3, 0x8000, 0x1000));
        set.forget_through(2);
        assert_eq!(set.len(), 1);
        assert!(set.overlapping(0x1000, 0x1000).is_none());
        assert_eq!(set.overlapping(0x8800, 1).map(|g| g.seq), Some(3));
        set.forget_through(3);
        assert_eq!(set.len(), 0);
        assert!(set.overlapping(0, u64::MAX).is_none());
    }
}
