//! The in-memory dedup index: content hash to host cluster, and for each
//! indexed cluster the guest clusters believed to map it.
//!
//! The owners are candidates, not facts: every use checks the owner's L2
//! entry under its table lock, and a candidate that no longer maps the
//! cluster is dropped then. They let the image find the one L2 entry whose
//! COPIED flag must change when a cluster's refcount moves between 1 and 2
//! without scanning the tables.
//!
//! Every change that must survive a crash is queued as a [`DedupChange`]
//! and taken by the next epoch, so it is committed in the same journal
//! transaction as the L2 entries and refcounts it goes with.

use std::collections::HashMap;

use qj_journal::DedupOp;
use serde::Serialize;

use super::hash::ClusterHash;

/// One index change for the journal: an insertion or a deletion of
/// `hash -> host_offset` (spec §8.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupChange {
    /// Insertion or deletion.
    pub op: DedupOp,
    /// Host offset of the cluster.
    pub host_offset: u64,
    /// Its content's SHA-256.
    pub hash: ClusterHash,
}

/// What the index holds and what it did, for `qj info` and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DedupStats {
    /// Indexed clusters.
    pub entries: u64,
    /// Upper bound on indexed clusters (memory bound).
    pub entries_max: u64,
    /// Guest clusters mapped to an indexed cluster beyond its first owner,
    /// as far as this open knows (clusters the image does not store twice).
    pub clusters_saved: u64,
    /// Memory held by the index, in bytes (an estimate from the tables'
    /// capacities).
    pub memory_bytes: u64,
    /// Whole-cluster writes mapped to an existing cluster in this open.
    pub hits: u64,
    /// Whole-cluster writes not indexed because the index was full.
    pub not_indexed_full: u64,
    /// Hash matches whose bytes differed (a collision, or a stale entry).
    pub compare_mismatches: u64,
    /// Entries dropped at open because they did not hold (bad offset,
    /// free cluster, metadata, content that does not match).
    pub dropped_at_open: u64,
    /// Entries of the persisted index that no longer held after an
    /// unclean shutdown (the index was older than the log: spec §3.6) and
    /// were dropped at open.
    pub persisted_stale_at_open: u64,
    /// Entries read from the persisted index at open.
    pub persisted_loaded: u64,
    /// Why the persisted index was ignored at open, if it was (damaged:
    /// truncated, bad checksum, past the end of the file, over metadata).
    pub persisted_ignored: Option<String>,
}

#[derive(Debug, Clone)]
struct Indexed {
    hash: ClusterHash,
    /// Guest clusters that may map this cluster (see the module comment).
    owners: Vec<u64>,
}

/// Bytes of one `by_hash` slot: the key, the value, a control byte.
const BY_HASH_SLOT_BYTES: u64 = 32 + 8 + 1;
/// Bytes of one `by_cluster` slot: key, hash, owners vector, control byte.
const BY_CLUSTER_SLOT_BYTES: u64 = 8 + 32 + 24 + 1;

/// The index. Not thread-safe by itself: the image keeps it behind a lock
/// that is a leaf (nothing else is locked while it is held).
#[derive(Debug)]
pub struct DedupIndex {
    by_hash: HashMap<ClusterHash, u64>,
    by_cluster: HashMap<u64, Indexed>,
    /// Shared clusters that are not indexed (any more: the index an open
    /// rebuilds may lack entries whose clusters are still shared), with
    /// the guest clusters that map them, found by the walk at open: when
    /// such a cluster's refcount falls back to 1, the last mapping needs
    /// its COPIED flag back too. Bounded like the index.
    shared: HashMap<u64, Vec<u64>>,
    pending: Vec<DedupChange>,
    entries_max: usize,
    cluster_bits: u32,
    /// Counters reported by [`DedupIndex::stats`].
    pub counters: DedupStats,
}

impl DedupIndex {
    /// An empty index for clusters of `1 << cluster_bits` bytes, holding at
    /// most `entries_max` clusters.
    pub fn new(cluster_bits: u32, entries_max: usize) -> Self {
        Self {
            by_hash: HashMap::new(),
            by_cluster: HashMap::new(),
            shared: HashMap::new(),
            pending: Vec::new(),
            entries_max,
            cluster_bits,
            counters: DedupStats::default(),
        }
    }

    /// The cluster holding content `hash`, with its candidate owners.
    pub fn lookup(&self, hash: &ClusterHash) -> Option<(u64, Vec<u64>)> {
        let cluster = *self.by_hash.get(hash)?;
        let owners = self.by_cluster.get(&cluster)?.owners.clone();
        Some((cluster, owners))
    }

    /// Whether host cluster `cluster` is indexed.
    pub fn contains(&self, cluster: u64) -> bool {
        self.by_cluster.contains_key(&cluster)
    }

    /// Whether the index has room for one more cluster.
    pub fn has_room(&self) -> bool {
        self.by_cluster.len() < self.entries_max
    }

    /// Indexes host cluster `cluster` with content `hash`, mapped by guest
    /// cluster `owner`, and queues the insertion. False (nothing changes)
    /// when the index is full or already knows the hash or the cluster.
    pub fn insert(&mut self, cluster: u64, hash: ClusterHash, owner: u64) -> bool {
        if !self.has_room() {
            self.counters.not_indexed_full += 1;
            return false;
        }
        if self.by_hash.contains_key(&hash) || self.by_cluster.contains_key(&cluster) {
            return false;
        }
        self.by_hash.insert(hash, cluster);
        self.by_cluster.insert(
            cluster,
            Indexed {
                hash,
                owners: vec![owner],
            },
        );
        self.pending.push(DedupChange {
            op: DedupOp::Insert,
            host_offset: cluster << self.cluster_bits,
            hash,
        });
        true
    }

    /// Removes host cluster `cluster` and queues the deletion (its
    /// refcount reached zero). Nothing happens if it is not indexed.
    pub fn remove(&mut self, cluster: u64) {
        if let Some(entry) = self.by_cluster.remove(&cluster) {
            self.by_hash.remove(&entry.hash);
            self.pending.push(DedupChange {
                op: DedupOp::Delete,
                host_offset: cluster << self.cluster_bits,
                hash: entry.hash,
            });
        }
    }

    /// Forgets `cluster` without a deletion for the journal: for entries
    /// found invalid at open, which no transaction has to undo (and for
    /// the crash harness's `DedupSkipDeletion` mutation).
    pub fn forget(&mut self, cluster: u64) {
        if let Some(entry) = self.by_cluster.remove(&cluster) {
            self.by_hash.remove(&entry.hash);
        }
    }

    /// Records that guest cluster `owner` now maps `cluster`.
    pub fn add_owner(&mut self, cluster: u64, owner: u64) {
        if let Some(entry) = self.by_cluster.get_mut(&cluster) {
            if !entry.owners.contains(&owner) {
                entry.owners.push(owner);
            }
        }
    }

    /// Records that guest cluster `owner` maps `cluster`, a shared cluster
    /// that is not indexed (the walk at open). Nothing beyond the bound.
    pub fn add_shared_owner(&mut self, cluster: u64, owner: u64) {
        if self.by_cluster.contains_key(&cluster) {
            return self.add_owner(cluster, owner);
        }
        if !self.shared.contains_key(&cluster) && self.shared.len() >= self.entries_max {
            return;
        }
        let owners = self.shared.entry(cluster).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }

    /// Records that guest cluster `owner` no longer maps `cluster`.
    pub fn remove_owner(&mut self, cluster: u64, owner: u64) {
        if let Some(entry) = self.by_cluster.get_mut(&cluster) {
            entry.owners.retain(|&o| o != owner);
        }
        if let Some(owners) = self.shared.get_mut(&cluster) {
            owners.retain(|&o| o != owner);
            if owners.is_empty() {
                self.shared.remove(&cluster);
            }
        }
    }

    /// The candidate owners of `cluster` (indexed, or shared and known).
    pub fn owners(&self, cluster: u64) -> Vec<u64> {
        match self.by_cluster.get(&cluster) {
            Some(e) => e.owners.clone(),
            None => self.shared.get(&cluster).cloned().unwrap_or_default(),
        }
    }

    /// Every indexed cluster with its hash, in no particular order.
    pub fn entries(&self) -> Vec<(u64, ClusterHash)> {
        self.by_cluster.iter().map(|(&c, e)| (c, e.hash)).collect()
    }

    /// Applies one replayed descriptor entry (spec §8.5): inserting a
    /// mapping that exists and deleting one that does not are no-ops, and
    /// nothing is queued (the change is already in the journal). A replayed
    /// insertion may go past the memory bound: the journal holds it anyway.
    pub fn replay(&mut self, op: DedupOp, cluster: u64, hash: ClusterHash) {
        match op {
            DedupOp::Insert => {
                if let Some(old) = self.by_hash.get(&hash).copied() {
                    if old == cluster {
                        return;
                    }
                    // A hash names one cluster: a newer insertion wins.
                    self.by_cluster.remove(&old);
                }
                if let Some(old) = self.by_cluster.remove(&cluster) {
                    self.by_hash.remove(&old.hash);
                }
                self.by_hash.insert(hash, cluster);
                self.by_cluster.insert(
                    cluster,
                    Indexed {
                        hash,
                        owners: Vec::new(),
                    },
                );
            }
            DedupOp::Delete => {
                if self
                    .by_cluster
                    .get(&cluster)
                    .is_some_and(|e| e.hash == hash)
                {
                    self.by_cluster.remove(&cluster);
                    self.by_hash.remove(&hash);
                }
            }
        }
    }

    /// Whether changes wait for the next epoch.
    #[must_use]
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the changes queued since the last call, in order.
    pub fn take_pending(&mut self) -> Vec<DedupChange> {
        std::mem::take(&mut self.pending)
    }

    /// Drops every entry (and every queued change): the index no longer
    /// describes the image.
    pub fn clear(&mut self) {
        self.by_hash.clear();
        self.by_cluster.clear();
        self.pending.clear();
    }

    /// Estimated memory held, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        let owners: usize = self.by_cluster.values().map(|e| e.owners.capacity()).sum();
        self.by_hash.capacity() as u64 * BY_HASH_SLOT_BYTES
            + self.by_cluster.capacity() as u64 * BY_CLUSTER_SLOT_BYTES
            + owners as u64 * 8
    }

    /// The counters with the current sizes filled in.
    pub fn stats(&self) -> DedupStats {
        let saved: usize = self
            .by_cluster
            .values()
            .map(|e| e.owners.len().saturating_sub(1))
            .sum();
        DedupStats {
            entries: self.by_cluster.len() as u64,
            entries_max: self.entries_max as u64,
            clusters_saved: saved as u64,
            memory_bytes: self.memory_bytes(),
            ..self.counters.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ClusterHash {
        [b; 32]
    }

    #[test]
    fn insert_and_remove_queue_changes_in_order() {
        let mut index = DedupIndex::new(16, 10);
        assert!(index.insert(5, h(1), 100));
        assert!(!index.insert(6, h(1), 101), "a hash names one cluster");
        index.remove(5);
        index.remove(5);
        let changes = index.take_pending();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].op, DedupOp::Insert);
        assert_eq!(changes[0].host_offset, 5 << 16);
        assert_eq!(changes[1].op, DedupOp::Delete);
        assert!(index.lookup(&h(1)).is_none());
        assert!(index.take_pending().is_empty());
    }

    #[test]
    fn full_index_takes_nothing_more() {
        let mut index = DedupIndex::new(16, 1);
        assert!(index.insert(5, h(1), 0));
        assert!(!index.insert(6, h(2), 1));
        assert_eq!(index.stats().not_indexed_full, 1);
        assert_eq!(index.stats().entries, 1);
    }

    #[test]
    fn replay_repeats_are_harmless() {
        let mut index = DedupIndex::new(16, 10);
        for _ in 0..2 {
            index.replay(DedupOp::Insert, 5, h(1));
            index.replay(DedupOp::Delete, 7, h(2));
        }
        assert_eq!(index.lookup(&h(1)).map(|(c, _)| c), Some(5));
        index.replay(DedupOp::Delete, 5, h(1));
        index.replay(DedupOp::Delete, 5, h(1));
        assert!(index.lookup(&h(1)).is_none());
        assert!(index.take_pending().is_empty(), "replay queues nothing");
    }

    #[test]
    fn owners_are_tracked_and_counted_as_saved() {
        let mut index = DedupIndex::new(16, 10);
        index.insert(5, h(1), 100);
        index.add_owner(5, 101);
        index.add_owner(5, 101);
        assert_eq!(index.owners(5), vec![100, 101]);
        assert_eq!(index.stats().clusters_saved, 1);
        index.remove_owner(5, 100);
        assert_eq!(index.stats().clusters_saved, 0);
        assert!(index.stats().memory_bytes > 0);
    }
}
