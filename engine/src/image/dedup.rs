//! The image side of deduplication (`crate::dedup`): the whole-cluster
//! write path, the COPIED flags of shared clusters, deletions when a
//! cluster is freed, and the index an open starts with.
//!
//! Why COPIED matters: qcow2 says an L2 entry may be written in place only
//! when its cluster's refcount is 1 (the COPIED flag). A deduplicated
//! cluster has refcount > 1, so every entry that maps it must lose the flag
//! before the count rises (a write through it would change every mapping),
//! and the last one left must get it back when the count falls to 1 (QEMU's
//! check calls a refcount-1 cluster without it a corruption). Indexed
//! clusters are never written in place at all, even at refcount 1: the
//! index would then name a cluster whose content no longer has the hash. A
//! write into one allocates a new cluster (copy-on-write) and the old one
//! is freed, with its deletion, in the same transaction.
//!
//! Why a cluster whose sharing just ended is not written in place either:
//! the COPIED flag comes back in the epoch that drops the other mapping,
//! but a data write reaches the file at once. Written in place before that
//! epoch is durable, a crash that loses the epoch leaves the other guest
//! cluster mapping the new bytes (a write it never saw). So until the epoch
//! is durable the cluster is copied on write, like a shared one; the old
//! cluster is freed, and like every freed cluster it is not reused before
//! the epoch that freed it is durable (`refcount.rs`). The cost is one
//! cluster copy, only for a write that follows an unsharing in the same
//! epoch, and no extra flush (spec §3.6).
//!
//! Lock order: an L2 table, then the refcounts, then the index (a leaf:
//! nothing is locked while it is held). One table lock at a time.

use std::time::Instant;

use qj_journal::DedupOp;
use qj_spec::qcow2::L2Entry;
use qj_spec::units::{GuestCluster, HostCluster, HostOffset};

use super::dedup_persist::PersistedClusters;
use super::Image;
use crate::dedup::{cluster_hash, ClusterHash, DedupIndex, DedupStats, HASH_ALGORITHM_SHA256};
use crate::error::Result;
use crate::mutation::JournalMutation;
use crate::sync::{Mutex, Ordering};

/// Estimated bytes one indexed cluster costs in memory (both tables'
/// slots at the hash tables' load factor, one owner), used to turn the
/// memory bound into an entry bound. `DedupStats::memory_bytes` reports
/// what is really held.
pub const DEDUP_BYTES_PER_ENTRY: u64 = 160;

/// The dedup state of an image opened for writing with dedup on.
#[derive(Debug)]
pub(crate) struct ImageDedup {
    pub(super) index: Mutex<DedupIndex>,
    /// Map to a cluster whose hash matches without comparing the bytes.
    trust_hash: bool,
    mutation: JournalMutation,
    /// Nanoseconds spent hashing and comparing, and how many of each.
    hash_ns: crate::sync::AtomicU64,
    hashed: crate::sync::AtomicU64,
    compare_ns: crate::sync::AtomicU64,
    compared: crate::sync::AtomicU64,
    /// Number of the epoch being gathered (counts persists).
    epoch: crate::sync::AtomicU64,
    /// Host clusters given their COPIED flag back in an epoch not yet
    /// durable, with that epoch's number: never written in place until
    /// it is. Bounded by the entries an epoch changes: each durable
    /// epoch removes its own.
    unshared: Mutex<std::collections::HashMap<u64, u64>>,
    /// The clusters of the index the header names (`dedup_persist.rs`).
    pub(super) persisted: Mutex<Option<PersistedClusters>>,
    /// The backend's checkpoint count when the index was last written.
    pub(super) persisted_at_checkpoint: crate::sync::AtomicU64,
    /// Whether the index changed since it was last written.
    pub(super) changed: crate::sync::AtomicBool,
}

/// What the write path does with a whole-cluster write.
pub(super) enum DedupWrite {
    /// The guest cluster maps a cluster with the same content: done.
    Done,
    /// Write as usual; then index the new cluster under this hash, if any.
    Write(Option<ClusterHash>),
}

/// Result of trying to take a reference on an indexed cluster through one
/// of its owners.
enum Reserve {
    /// The refcount is raised and the owner's COPIED flag cleared.
    Reserved,
    /// The owner is the guest cluster being written, and it already holds
    /// these bytes.
    Same,
    /// The candidate does not map the cluster (any more).
    NotOwner,
    /// The cluster cannot take this write (bytes differ, refcount full).
    Refused,
}

/// Time spent hashing and comparing, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DedupCost {
    /// Clusters hashed.
    pub hashed: u64,
    /// Total nanoseconds hashing.
    pub hash_ns: u64,
    /// Hash matches confirmed by comparing bytes.
    pub compared: u64,
    /// Total nanoseconds reading and comparing.
    pub compare_ns: u64,
}

impl ImageDedup {
    pub(super) fn new(
        index: DedupIndex,
        trust_hash: bool,
        mutation: JournalMutation,
    ) -> ImageDedup {
        ImageDedup {
            index: Mutex::new(index),
            trust_hash,
            mutation,
            hash_ns: Default::default(),
            hashed: Default::default(),
            compare_ns: Default::default(),
            compared: Default::default(),
            epoch: Default::default(),
            unshared: Default::default(),
            persisted: Mutex::new(None),
            persisted_at_checkpoint: Default::default(),
            changed: Default::default(),
        }
    }
}

impl Image {
    /// The dedup index's state, if the image deduplicates (opened for
    /// writing with dedup on).
    pub fn dedup_stats(&self) -> Option<DedupStats> {
        self.dedup.as_ref().map(|d| d.index.lock().stats())
    }

    /// Time spent hashing and comparing so far, if the image deduplicates.
    pub fn dedup_cost(&self) -> Option<DedupCost> {
        self.dedup.as_ref().map(|d| DedupCost {
            hashed: d.hashed.load(Ordering::Relaxed),
            hash_ns: d.hash_ns.load(Ordering::Relaxed),
            compared: d.compared.load(Ordering::Relaxed),
            compare_ns: d.compare_ns.load(Ordering::Relaxed),
        })
    }

    /// Every indexed cluster's host offset with its hash (tests, check).
    pub fn dedup_entries(&self) -> Vec<(u64, ClusterHash)> {
        let Some(d) = &self.dedup else {
            return Vec::new();
        };
        let cb = self.geometry.cluster_bits;
        let mut entries: Vec<_> = d
            .index
            .lock()
            .entries()
            .into_iter()
            .map(|(c, h)| (c << cb, h))
            .collect();
        entries.sort();
        entries
    }

    /// Whether host cluster `offset` must not be written in place even
    /// with its COPIED flag: it is indexed (its bytes must keep their
    /// hash), or its sharing ended in an epoch not yet durable (see the
    /// module documentation). Either way it is copied on write.
    pub(super) fn dedup_no_in_place(&self, offset: HostOffset) -> bool {
        self.dedup.as_ref().is_some_and(|d| {
            let cluster = self.geometry.host_cluster(offset).0;
            // One leaf lock at a time.
            let indexed = d.index.lock().contains(cluster);
            indexed || d.unshared.lock().contains_key(&cluster)
        })
    }

    /// Called by a persist once it gathered its epoch (under the exclusive
    /// gate): returns that epoch's number; later unsharings belong to the
    /// next one.
    pub(super) fn dedup_epoch_gathered(&self) -> u64 {
        self.dedup
            .as_ref()
            .map_or(0, |d| d.epoch.fetch_add(1, Ordering::SeqCst))
    }

    /// Called once epoch `epoch` (and so every earlier one) is durable:
    /// the clusters unshared in it may be written in place again.
    pub(super) fn dedup_epoch_durable(&self, epoch: u64) {
        if let Some(d) = &self.dedup {
            d.unshared.lock().retain(|_, e| *e > epoch);
        }
    }

    /// Whether a whole-cluster write must take the dedup path.
    pub(super) fn dedups(&self) -> bool {
        self.dedup.is_some()
    }

    /// The dedup changes for the epoch being gathered.
    pub(super) fn take_dedup_changes(&self) -> Vec<crate::dedup::DedupChange> {
        match &self.dedup {
            Some(d) => {
                let changes = d.index.lock().take_pending();
                if !changes.is_empty() {
                    d.changed.store(true, Ordering::SeqCst);
                }
                changes
            }
            None => Vec::new(),
        }
    }

    /// Decides a whole-cluster write of `data` into guest `cluster`: maps
    /// it to an indexed cluster with the same content, or says to write it
    /// (and under which hash to index the new cluster). Caller holds the
    /// gate and no table lock.
    pub(super) fn dedup_write(&self, cluster: GuestCluster, data: &[u8]) -> Result<DedupWrite> {
        let Some(d) = &self.dedup else {
            return Ok(DedupWrite::Write(None));
        };
        // Zero clusters stay zero clusters: never indexed, never shared.
        if data.iter().all(|&b| b == 0) {
            return Ok(DedupWrite::Write(None));
        }
        let started = Instant::now();
        let hash = cluster_hash(data);
        d.hash_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        d.hashed.fetch_add(1, Ordering::Relaxed);
        let Some((target, owners)) = d.index.lock().lookup(&hash) else {
            return Ok(DedupWrite::Write(Some(hash)));
        };
        for owner in owners {
            match self.dedup_reserve(d, target, GuestCluster(owner), cluster, data)? {
                Reserve::Reserved => {
                    self.dedup_link(d, target, cluster)?;
                    return Ok(DedupWrite::Done);
                }
                Reserve::Same => return Ok(DedupWrite::Done),
                Reserve::NotOwner => d.index.lock().remove_owner(target, owner),
                Reserve::Refused => return Ok(DedupWrite::Write(None)),
            }
        }
        // No live owner left: the cluster is not worth sharing, and the
        // hash stays taken, so the new copy is not indexed.
        Ok(DedupWrite::Write(None))
    }

    /// Takes a reference on indexed cluster `target` through `owner`'s L2
    /// entry, whose table lock keeps the cluster from being freed meanwhile.
    fn dedup_reserve(
        &self,
        d: &ImageDedup,
        target: u64,
        owner: GuestCluster,
        writing: GuestCluster,
        data: &[u8],
    ) -> Result<Reserve> {
        let l1 = self.l1_entry(owner)?;
        let Some(l2) = l1.l2_offset() else {
            return Ok(Reserve::NotOwner);
        };
        let table = self.load_l2(l2)?;
        let mut t = table.data.write();
        let L2Entry::Normal { offset, copied } = self.l2_entry(&t.bytes, owner)? else {
            return Ok(Reserve::NotOwner);
        };
        if self.geometry.host_cluster(offset).0 != target {
            return Ok(Reserve::NotOwner);
        }
        if !d.trust_hash {
            let started = Instant::now();
            let mut bytes = vec![0u8; data.len()];
            self.backend.read_data(&*self.storage, &mut bytes, offset)?;
            let same = bytes == data;
            d.compare_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            d.compared.fetch_add(1, Ordering::Relaxed);
            if !same {
                d.index.lock().counters.compare_mismatches += 1;
                return Ok(Reserve::Refused);
            }
        }
        if owner == writing {
            return Ok(Reserve::Same);
        }
        if copied && !l1.is_copied() {
            // A refcount-1 cluster in a table shared with a snapshot: the
            // flag cannot be cleared without changing the snapshot.
            return Ok(Reserve::Refused);
        }
        {
            let mut rc = self.refcounts.lock();
            let cluster = HostCluster(target);
            if rc.get(&*self.storage, &*self.backend, cluster)? >= self.geometry.refcount_max() {
                return Ok(Reserve::Refused);
            }
            if d.mutation != JournalMutation::DedupSkipIncrement {
                rc.increment(&*self.storage, &*self.backend, cluster)?;
            }
        }
        if copied {
            self.entries_changed.fetch_add(1, Ordering::Relaxed);
            t.set_entry(
                self.geometry.l2_index(owner) as usize,
                L2Entry::Normal {
                    offset,
                    copied: false,
                }
                .encode(self.geometry.cluster_bits),
            );
        }
        Ok(Reserve::Reserved)
    }

    /// Maps guest `cluster` to `target`, on which a reference was taken
    /// for it, and drops the reference its old entry held.
    fn dedup_link(&self, d: &ImageDedup, target: u64, cluster: GuestCluster) -> Result<()> {
        let table = self.owned_l2(cluster)?;
        let mut t = table.data.write();
        let old = self.l2_entry(&t.bytes, cluster)?;
        let offset = self.geometry.host_offset(HostCluster(target));
        let undo = |this: &Self| {
            this.refcounts
                .lock()
                .free(&*this.storage, &*this.backend, HostCluster(target))
        };
        if matches!(old, L2Entry::Normal { offset: o, .. } if o == offset) {
            // Already mapped here (through another owner's reservation):
            // give the extra reference back.
            drop(t);
            return undo(self);
        }
        if let Err(e) = self.guard_release(old) {
            drop(t);
            undo(self)?;
            return Err(e);
        }
        self.entries_changed.fetch_add(1, Ordering::Relaxed);
        t.set_entry(
            self.geometry.l2_index(cluster) as usize,
            L2Entry::Normal {
                offset,
                copied: false,
            }
            .encode(self.geometry.cluster_bits),
        );
        {
            let mut index = d.index.lock();
            index.add_owner(target, cluster.0);
            index.counters.hits += 1;
        }
        let released = self.release_entry(old);
        drop(t);
        released?;
        self.dedup_after_release(old, cluster)
    }

    /// Indexes the cluster `host` that guest `cluster` now maps with the
    /// bytes of `hash`. Caller holds the table lock of `cluster`.
    pub(super) fn dedup_insert(&self, host: HostOffset, hash: ClusterHash, cluster: GuestCluster) {
        if let Some(d) = &self.dedup {
            d.index
                .lock()
                .insert(self.geometry.host_cluster(host).0, hash, cluster.0);
        }
    }

    /// Called by `release_entry` after a data cluster lost a reference,
    /// with the refcounts locked: at zero it leaves the index, and the
    /// deletion joins the transaction that frees it.
    pub(super) fn dedup_freed(&self, cluster: HostCluster, count: u64) {
        let Some(d) = &self.dedup else {
            return;
        };
        if count != 0 {
            return;
        }
        let mut index = d.index.lock();
        if d.mutation == JournalMutation::DedupSkipDeletion {
            index.forget(cluster.0);
        } else {
            index.remove(cluster.0);
        }
    }

    /// After guest `cluster` stopped mapping what `old` names (the caller
    /// holds no table lock): the last mapping of a deduplicated cluster
    /// gets its COPIED flag back when the refcount is down to 1.
    pub(super) fn dedup_after_release(&self, old: L2Entry, cluster: GuestCluster) -> Result<()> {
        let Some(d) = &self.dedup else {
            return Ok(());
        };
        let L2Entry::Normal { offset, .. } = old else {
            return Ok(());
        };
        let host = self.geometry.host_cluster(offset);
        let owners = {
            let mut index = d.index.lock();
            index.remove_owner(host.0, cluster.0);
            index.owners(host.0)
        };

        for owner in owners {
            let owner = GuestCluster(owner);
            let l1 = self.l1_entry(owner)?;
            let Some(l2) = l1.l2_offset() else {
                d.index.lock().remove_owner(host.0, owner.0);
                continue;
            };
            let table = self.load_l2(l2)?;
            let mut t = table.data.write();
            let L2Entry::Normal { offset: o, copied } = self.l2_entry(&t.bytes, owner)? else {
                drop(t);
                d.index.lock().remove_owner(host.0, owner.0);
                continue;
            };
            if o != offset {
                drop(t);
                d.index.lock().remove_owner(host.0, owner.0);
                continue;
            }
            // Decided under the owner's table lock: a reservation through
            // this owner (which raises the count) waits for it.
            let count = self
                .refcounts
                .lock()
                .get(&*self.storage, &*self.backend, host)?;
            if count == 1 && !copied && l1.is_copied() {
                // Under the gate: the epoch number is the one this change
                // is gathered into.
                d.unshared
                    .lock()
                    .insert(host.0, d.epoch.load(Ordering::SeqCst));
                self.entries_changed.fetch_add(1, Ordering::Relaxed);
                t.set_entry(
                    self.geometry.l2_index(owner) as usize,
                    L2Entry::Normal {
                        offset,
                        copied: true,
                    }
                    .encode(self.geometry.cluster_bits),
                );
            }
            return Ok(());
        }
        Ok(())
    }

    /// Builds the index an open for writing starts with: the persisted
    /// index (`dedup_persist.rs`), then the entries the journal's replay
    /// found (spec §8.5), in log order. Each entry is checked against the
    /// metadata (a data cluster inside the file, counted, not metadata) and
    /// dropped if it does not hold, so that no write is ever deduplicated
    /// against it. The journal's entries are also rehashed, and so are the
    /// persisted ones after an unclean shutdown (the index may be older
    /// than the log: see `dedup_persist.rs`); after a clean close the index
    /// was written last, and open does not rehash the image. Then one walk
    /// of the active L2 tables finds the owners.
    pub(super) fn dedup_start(
        &self,
        events: Vec<qj_journal::DedupEvent>,
        memory_bytes_max: u64,
        trust_hash: bool,
        mutation: JournalMutation,
    ) -> Result<ImageDedup> {
        let entries_max = (memory_bytes_max / DEDUP_BYTES_PER_ENTRY) as usize;
        let mut index = DedupIndex::new(self.geometry.cluster_bits, entries_max);
        let persisted = self.dedup_load_persisted(false)?;
        index.counters.persisted_ignored = persisted.ignored.clone();
        for &(offset, hash) in persisted.entries.iter().take(entries_max) {
            if self.geometry.is_aligned(offset) {
                let cluster = self.geometry.host_cluster(HostOffset(offset)).0;
                index.replay(DedupOp::Insert, cluster, hash);
            } else {
                index.counters.dropped_at_open += 1;
            }
        }
        index.counters.persisted_loaded = index.entries().len() as u64;
        let mut malformed = 0u64;
        let mut from_journal = std::collections::HashSet::new();
        let replayed_any = !events.is_empty();
        for event in events {
            let e = &event.entry;
            let hash: Option<ClusterHash> = e.hash.as_slice().try_into().ok();
            match hash {
                Some(hash)
                    if e.hash_algorithm == HASH_ALGORITHM_SHA256
                        && self.geometry.is_aligned(e.host_offset) =>
                {
                    let cluster = self.geometry.host_cluster(HostOffset(e.host_offset)).0;
                    index.replay(event.op, cluster, hash);
                    from_journal.insert(cluster);
                }
                _ => {
                    // Not ours to interpret: an insertion we cannot check
                    // is never used; a deletion of one is moot.
                    if event.op == DedupOp::Insert {
                        malformed += 1;
                    }
                }
            }
        }
        index.counters.dropped_at_open += malformed;
        let rehash_persisted = self.backend.opened_dirty();
        let file_len = self.storage.len().unwrap_or(0);
        let cs = self.geometry.cluster_size();
        let mut bytes = vec![0u8; cs as usize];
        for (cluster, hash) in index.entries() {
            let host = HostCluster(cluster);
            let offset = self.geometry.host_offset(host);
            let journalled = from_journal.contains(&cluster);
            let holds = offset.0 + cs <= file_len
                && self.metadata.read().kind_of(host).is_none()
                && self
                    .refcounts
                    .lock()
                    .get(&*self.storage, &*self.backend, host)?
                    > 0
                && (!(journalled || rehash_persisted) || {
                    // Rehashed whatever `trust_hash` says: with it no
                    // later comparison would catch one that does not hold.
                    self.backend.read_data(&*self.storage, &mut bytes, offset)?;
                    cluster_hash(&bytes) == hash
                });
            if !holds {
                index.forget(cluster);
                if journalled || !rehash_persisted {
                    index.counters.dropped_at_open += 1;
                } else {
                    index.counters.persisted_stale_at_open += 1;
                }
            }
        }
        let unowned_dropped = self.dedup_find_owners(&mut index)?;
        let changed = replayed_any
            || persisted.ignored.is_some()
            || unowned_dropped > 0
            || index.counters.dropped_at_open + index.counters.persisted_stale_at_open > 0;
        let dedup = ImageDedup::new(index, trust_hash, mutation);
        *dedup.persisted.lock() = persisted.clusters;
        dedup.changed.store(changed, Ordering::SeqCst);
        Ok(dedup)
    }

    /// Records, for every indexed cluster, the guest clusters of the active
    /// tables that map it; entries no active table maps are dropped (only
    /// a snapshot holds them: nothing to share through). Returns how many
    /// were dropped: the persisted index still names them, and must be
    /// rewritten, or a later clean open would trust an entry whose cluster
    /// was freed (no deletion is logged for an entry not in memory) and
    /// reused for other bytes.
    fn dedup_find_owners(&self, index: &mut DedupIndex) -> Result<u64> {
        let l1_len = self.l1.read().entries.len() as u64;
        let per_table = self.geometry.l2_entries();
        for i in 0..l1_len {
            let first = GuestCluster(i * per_table);
            let Some(l2) = self.l1_entry(first)?.l2_offset() else {
                continue;
            };
            let table = self.load_l2(l2)?;
            let t = table.data.read();
            for j in 0..per_table {
                let cluster = GuestCluster(i * per_table + j);
                if let Ok(L2Entry::Normal { offset, copied }) = self.l2_entry(&t.bytes, cluster) {
                    let host = self.geometry.host_cluster(offset).0;
                    if copied {
                        index.add_owner(host, cluster.0);
                    } else {
                        index.add_shared_owner(host, cluster.0);
                    }
                }
            }
        }
        let mut dropped = 0;
        for (cluster, _) in index.entries() {
            if index.owners(cluster).is_empty() {
                index.forget(cluster);
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}
