//! The revoke table: which device ranges later transactions revoked, so
//! that checkpoint and replay skip those bytes of earlier transactions.
//!
//! A revoke in transaction R covers the writes and copy targets of every
//! transaction with a smaller sequence number; never R's own.

use qj_spec::journal::RevokeRange;

/// Revoked ranges with the sequence number of the revoking transaction.
#[derive(Clone, Debug, Default)]
pub struct RevokeTable {
    entries: Vec<(RevokeRange, u64)>,
}

impl RevokeTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that transaction `seq` revokes `range`.
    pub fn insert(&mut self, range: RevokeRange, seq: u64) {
        self.entries.push((range, seq));
    }

    /// Forgets revokes of transactions up to `seq`: everything they cover is
    /// older still, hence synced.
    pub fn forget_through(&mut self, seq: u64) {
        self.entries.retain(|(_, revoking)| *revoking > seq);
    }

    /// Number of recorded revokes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no revoke is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The parts of `[start, start + length)` that transaction `seq` may
    /// still write: the range minus every range revoked by a later
    /// transaction. Returned sorted, as (offset, length).
    #[must_use]
    pub fn unrevoked(&self, start: u64, length: u64, seq: u64) -> Vec<(u64, u64)> {
        let end = start.saturating_add(length);
        let mut cuts: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|(_, revoking)| *revoking > seq)
            .map(|(r, _)| {
                (
                    r.offset.max(start),
                    r.offset.saturating_add(r.length).min(end),
                )
            })
            .filter(|(a, b)| a < b)
            .collect();
        if cuts.is_empty() {
            return vec![(start, length)];
        }
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = start;
        for (cut_start, cut_end) in cuts {
            if cut_start > at {
                out.push((at, cut_start - at));
            }
            at = at.max(cut_end);
        }
        if at < end {
            out.push((at, end - at));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revokes_cover_only_earlier_transactions() {
        let mut t = RevokeTable::new();
        t.insert(
            RevokeRange {
                offset: 100,
                length: 50,
            },
            5,
        );
        t.insert(
            RevokeRange {
                offset: 120,
                length: 60,
            },
            7,
        );
        assert_eq!(t.unrevoked(0, 300, 4), vec![(0, 100), (180, 120)]);
        assert_eq!(
            t.unrevoked(0, 300, 5),
            vec![(0, 120), (180, 120)],
            "5's own revoke does not cover 5"
        );
        assert_eq!(t.unrevoked(0, 300, 7), vec![(0, 300)]);
        assert_eq!(t.unrevoked(110, 10, 1), Vec::<(u64, u64)>::new());
        t.forget_through(5);
        assert_eq!(t.len(), 1);
        assert_eq!(t.unrevoked(0, 300, 4), vec![(0, 120), (180, 120)]);
    }
}
