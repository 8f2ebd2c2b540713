//! Delayed copy-on-write: the bookkeeping of copies a journal carries
//! instead of making before a write returns.
//!
//! A partial write into a cluster the image shares (an L2 entry without
//! COPIED: an internal snapshot holds it too) must give the guest a private
//! cluster holding the old bytes around the written ones. Copying them
//! first costs a read and a write of up to a whole cluster on every such
//! write. With a journal the copy can wait: the write puts only the guest's
//! bytes into the new cluster, and the transaction that links the new
//! cluster carries a copy descriptor for the untouched ranges (spec 8.3),
//! applied at checkpoint or replay. Until then the untouched ranges of the
//! new cluster hold nothing of value, and the engine must serve them from
//! the source.
//!
//! The rules this file keeps the state for (the journalled backend enforces
//! them, `journal.rs` rule 6):
//! - the copy is in the same transaction as the L2 entry that makes its
//!   target reachable, so replay never exposes the target unfilled;
//! - reads of an untouched range go to the source until the copy is synced;
//! - a write into an untouched range first makes the copy happen (in place
//!   if its transaction is not submitted yet; by committing and
//!   checkpointing otherwise), so a later copy never overwrites it;
//! - neither the source nor the target is reused until the copy is synced
//!   (a copy replayed again would read a changed source, or overwrite the
//!   next owner's data).

use std::collections::BTreeMap;

/// A delayed copy as the image registers it: fill the untouched ranges of
/// the fresh cluster at `target` from the same ranges of `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayedCopy {
    /// Byte offset of the fresh cluster in the image file.
    pub target: u64,
    /// Byte offset of the shared cluster it copies from.
    pub source: u64,
    /// Untouched ranges, as (offset in the cluster, length in bytes): the
    /// parts before and after the written bytes (at most two, none empty).
    pub untouched: Vec<(u64, u64)>,
}

/// Where a delayed copy is on its way to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// Registered; its transaction has not been submitted.
    Gathering,
    /// In the epoch with this engine ticket, enqueued, not known committed.
    Submitted(u64),
    /// In the committed transaction with this sequence number.
    Committed(u64),
}

/// Copies not yet synced, by target cluster offset.
#[derive(Debug, Default)]
pub struct PendingCopies {
    copies: BTreeMap<u64, (DelayedCopy, CopyState)>,
}

/// Bytes of `[a, a + a_len)` that fall in `[b, b + b_len)`, as a range.
fn intersect(a: u64, a_len: u64, b: u64, b_len: u64) -> Option<(u64, u64)> {
    let start = a.max(b);
    let end = (a + a_len).min(b + b_len);
    // Not `then_some`: its argument is computed first, and `end - start`
    // underflows for disjoint ranges.
    if start < end {
        Some((start, end - start))
    } else {
        None
    }
}

impl PendingCopies {
    /// Number of copies not yet known synced.
    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Registers a copy whose L2 entry is about to be set.
    pub fn register(&mut self, copy: DelayedCopy, cluster_size: u64) {
        assert!(
            copy.target.is_multiple_of(cluster_size) && copy.source.is_multiple_of(cluster_size)
        );
        assert!(!copy.untouched.is_empty() && copy.untouched.len() <= 2);
        assert!(copy
            .untouched
            .iter()
            .all(|&(at, len)| len > 0 && at + len <= cluster_size));
        let previous = self
            .copies
            .insert(copy.target, (copy, CopyState::Gathering));
        // A target is a freshly allocated cluster, and a cluster with a
        // pending copy is not reused until the copy is synced.
        assert!(previous.is_none(), "two pending copies into one cluster");
    }

    /// Every copy registered since the last submit, as journal copy
    /// chunks (target, source, length); they are `Submitted(ticket)` now.
    pub fn take_gathering(&mut self, ticket: u64) -> Vec<(u64, u64, u64)> {
        let mut chunks = Vec::new();
        for (copy, state) in self.copies.values_mut() {
            if *state == CopyState::Gathering {
                *state = CopyState::Submitted(ticket);
                chunks.extend(
                    copy.untouched
                        .iter()
                        .map(|&(at, len)| (copy.target + at, copy.source + at, len)),
                );
            }
        }
        chunks
    }

    /// The epoch of `ticket` committed as transaction `seq`.
    pub fn committed(&mut self, ticket: u64, seq: u64) {
        for (_, state) in self.copies.values_mut() {
            if *state == CopyState::Submitted(ticket) {
                *state = CopyState::Committed(seq);
            }
        }
    }

    /// Forgets copies a checkpoint applied in place (transactions up to
    /// `synced_seq`).
    pub fn forget_synced(&mut self, synced_seq: u64) {
        self.copies.retain(
            |_, (_, state)| !matches!(state, CopyState::Committed(seq) if *seq <= synced_seq),
        );
    }

    /// Removes the copy into `target` (it was made some other way).
    pub fn remove(&mut self, target: u64) -> Option<DelayedCopy> {
        self.copies.remove(&target).map(|(copy, _)| copy)
    }

    /// The pending copy (and its state) whose untouched ranges a write of
    /// `[offset, offset + length)` would touch.
    pub fn touched_by(
        &self,
        offset: u64,
        length: u64,
        cluster_size: u64,
    ) -> Option<(DelayedCopy, CopyState)> {
        let target = offset - offset % cluster_size;
        let (copy, state) = self.copies.get(&target)?;
        let touches = copy
            .untouched
            .iter()
            .any(|&(at, len)| intersect(offset, length, target + at, len).is_some());
        touches.then(|| (copy.clone(), *state))
    }

    /// Every pending copy (and its state) whose untouched ranges a write
    /// of `[offset, offset + length)` would change at the source.
    pub fn sourced_from(
        &self,
        offset: u64,
        length: u64,
        cluster_size: u64,
    ) -> Vec<(DelayedCopy, CopyState)> {
        let source = offset - offset % cluster_size;
        self.copies
            .values()
            .filter(|(copy, _)| {
                copy.source == source
                    && copy
                        .untouched
                        .iter()
                        .any(|&(at, len)| intersect(offset, length, source + at, len).is_some())
            })
            .map(|(copy, state)| (copy.clone(), *state))
            .collect()
    }

    /// The source ranges to read instead of the target for a read of
    /// `[offset, offset + length)` (inside one cluster): (offset in the
    /// read buffer, source offset, length).
    pub fn redirects(&self, offset: u64, length: u64, cluster_size: u64) -> Vec<(u64, u64, u64)> {
        let target = offset - offset % cluster_size;
        let Some((copy, _)) = self.copies.get(&target) else {
            return Vec::new();
        };
        copy.untouched
            .iter()
            .filter_map(|&(at, len)| intersect(offset, length, target + at, len))
            .map(|(start, len)| (start - offset, copy.source + (start - target), len))
            .collect()
    }

    /// Whether `cluster_offset` is the source or the target of a copy not
    /// known synced: it must not be reused yet.
    pub fn protects(&self, cluster_offset: u64) -> bool {
        self.copies.contains_key(&cluster_offset)
            || self
                .copies
                .values()
                .any(|(copy, _)| copy.source == cluster_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    #[test]
    fn disjoint_ranges_do_not_intersect() {
        assert_eq!(intersect(0, 10, 20, 5), None);
        assert_eq!(intersect(20, 5, 0, 10), None);
        assert_eq!(intersect(0, 10, 10, 5), None);
        assert_eq!(intersect(0, 10, 5, 10), Some((5, 5)));
    }

    fn copy(target: u64, source: u64, written: (u64, u64)) -> DelayedCopy {
        let (at, len) = written;
        let mut untouched = Vec::new();
        if at > 0 {
            untouched.push((0, at));
        }
        if at + len < CS {
            untouched.push((at + len, CS - at - len));
        }
        DelayedCopy {
            target,
            source,
            untouched,
        }
    }

    #[test]
    fn a_copy_goes_through_its_states_once() {
        let mut p = PendingCopies::default();
        p.register(copy(8 * CS, 2 * CS, (1024, 512)), CS);
        assert_eq!(
            p.take_gathering(7),
            vec![
                (8 * CS, 2 * CS, 1024),
                (8 * CS + 1536, 2 * CS + 1536, CS - 1536)
            ]
        );
        assert!(p.take_gathering(8).is_empty(), "submitted once");
        p.committed(8, 3);
        p.forget_synced(5);
        assert_eq!(p.len(), 1, "ticket 8 was not this copy's");
        p.committed(7, 6);
        p.forget_synced(5);
        assert!(p.protects(8 * CS) && p.protects(2 * CS) && !p.protects(3 * CS));
        p.forget_synced(6);
        assert!(p.is_empty());
    }

    #[test]
    fn reads_of_untouched_bytes_go_to_the_source() {
        let mut p = PendingCopies::default();
        p.register(copy(8 * CS, 2 * CS, (1024, 512)), CS);
        // A read across the written range: before and after it redirect.
        assert_eq!(
            p.redirects(8 * CS + 512, 2048, CS),
            vec![(0, 2 * CS + 512, 512), (1024, 2 * CS + 1536, 1024)]
        );
        assert!(p.redirects(8 * CS + 1024, 512, CS).is_empty());
        assert!(p.redirects(9 * CS, 512, CS).is_empty());
    }

    #[test]
    fn only_writes_into_untouched_bytes_need_the_copy_first() {
        let mut p = PendingCopies::default();
        p.register(copy(8 * CS, 2 * CS, (0, 512)), CS);
        assert!(p.touched_by(8 * CS, 512, CS).is_none());
        let (found, state) = p.touched_by(8 * CS + 256, 512, CS).unwrap();
        assert_eq!((found.target, state), (8 * CS, CopyState::Gathering));
        assert!(p.remove(8 * CS).is_some());
        assert!(p.touched_by(8 * CS + 256, 512, CS).is_none());
    }
}
