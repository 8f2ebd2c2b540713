//! Two-level refcounts and cluster allocation.
//!
//! All refcount state sits behind one mutex ([`RefcountState`]): the refcount
//! table (fully in memory), the refcount-block cache, the free-cluster index
//! and the frees waiting for durability. Allocation takes the lowest free
//! cluster from the index and raises its count in the cached block; it never
//! scans refcounts.
//!
//! Ordering rules owned here:
//! - A cluster whose count dropped to zero is not handed out again until the
//!   change that unreferenced it is durable ([`RefcountState::after_durable`]).
//!   Reusing it earlier would let a crash show the old owner's entry pointing
//!   at the new owner's bytes.
//! - With a backend that defers decrements (flush ordering), a free only
//!   records the cluster; its count drops after the persist that made the
//!   cleared entry durable, so the decrement reaches the disk in a later epoch.
//! - New refcount blocks describe themselves when they can (the block lands
//!   in the range it covers), and a new refcount table is counted in blocks
//!   reachable from it before a header write switches to it; both are
//!   `fresh` and the backend writes them before the links to them.
//!
//! Guard owned here: no cluster that the [`MetadataMap`] names is ever
//! handed out, as data or as a new refcount structure, and no data
//! reference to one is dropped. A metadata cluster with refcount zero is a
//! corrupt image; allocating it would put guest bytes or a new table over
//! live metadata (QEMU's overlap check refuses the same).

use std::collections::BTreeSet;

use qj_journal::Storage;
use qj_spec::qcow2::{
    get_refcount, read_table_entry, set_refcount, used_entries, write_table_entry,
};
use qj_spec::units::{Geometry, HostCluster, HostOffset};

use crate::backend::{MetadataBackend, MetadataWrite};
use crate::cache::{TableCache, WritebackPins};
use crate::error::{Error, Result};
use crate::free_index::FreeIndex;
use crate::metadata_map::{MetadataKind, MetadataMap};
use crate::stats::Counters;
use crate::sync::Ordering;

/// The image's metadata map, shared by the image and its refcounts. A plain
/// (not loom-modelled) lock: it is a leaf, never held while another lock is
/// taken or I/O is done, so it takes no part in any lock order.
pub type SharedMetadataMap = std::sync::Arc<parking_lot::RwLock<MetadataMap>>;

/// The refcount table, the block cache, and the free-cluster index.
#[derive(Debug)]
pub struct RefcountState {
    geometry: Geometry,
    /// Refcount table entries: host offsets of refcount blocks (0: none).
    table: Vec<u64>,
    /// Where the refcount table lives.
    table_offset: HostOffset,
    /// Clusters the table occupies.
    table_clusters: u64,
    /// The table was moved in this epoch: all of it is fresh and the header
    /// must switch to it.
    table_fresh: bool,
    /// Indices of table clusters changed in place in this epoch.
    table_dirty_clusters: BTreeSet<u64>,
    /// Cached refcount blocks.
    pub blocks: TableCache,
    /// Free clusters.
    free: FreeIndex,
    /// Frees whose decrement waits for durability (deferring backends).
    deferred_decrements: Vec<HostCluster>,
    /// Clusters at count zero that wait for durability before reuse.
    pending_release: Vec<HostCluster>,
    /// Refcount structure clusters allocated since the last epoch was
    /// taken (new blocks, a moved table): a measure of the epoch's size.
    pub fresh_clusters: u64,
    /// Clusters at count zero that the backend does not let us reuse yet.
    parked: Vec<HostCluster>,
    /// Metadata clusters freed in this epoch (a journal revokes them).
    freed_metadata: Vec<HostCluster>,
    defer_decrements: bool,
    /// Where metadata lives: the allocation guard's map, kept current here
    /// for the refcount table and blocks.
    metadata: SharedMetadataMap,
}

/// Frees of one epoch, applied once it is durable.
#[derive(Debug, Default)]
#[must_use = "frees must be applied once their epoch is durable"]
pub struct Releases {
    /// Clusters whose count drops now (deferring backends).
    decrements: Vec<HostCluster>,
    /// Clusters already at zero, reusable now.
    releases: Vec<HostCluster>,
}

/// A cluster the free index handed out had count zero when the index was
/// built, so a count above 1 after the increment means the disk changed
/// under us: a corrupt image whose guest data overlaps a refcount block
/// (the block was freed as data and reloaded with guest bytes). That comes
/// from disk bytes, so it is an error, not an assertion.
fn check_fresh_count(cluster: HostCluster, count: u64) -> Result<()> {
    if count != 1 {
        return Err(Error::Corrupt(format!(
            "newly allocated cluster {} has refcount {count}, not 1: metadata overlaps guest data",
            cluster.0
        )));
    }
    Ok(())
}

/// Refuses to hand out `[first, first + clusters)` when any of it holds
/// metadata: its refcount says free, the metadata map says otherwise, and
/// the map wins.
fn guard_claim(
    map: &MetadataMap,
    geometry: Geometry,
    first: HostCluster,
    clusters: u64,
) -> Result<()> {
    match map.overlapping(first, clusters) {
        None => Ok(()),
        Some((cluster, kind)) => Err(Error::MetadataOverlap {
            kind,
            offset: geometry.host_offset(cluster).0,
            what: "allocation of a cluster whose refcount is 0".into(),
        }),
    }
}

/// Bound on nested refcount-structure growth for one allocation: a new
/// block may need a bigger table, whose clusters may need one more block.
const GROWTH_DEPTH_MAX: u32 = 4;

impl RefcountState {
    /// Loads the refcount table and builds the free index by reading every
    /// refcount block once. `file_clusters` is the file length in clusters.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        geometry: Geometry,
        table_offset: HostOffset,
        table_clusters: u64,
        file_clusters: u64,
        cache_tables_max: usize,
        metadata: SharedMetadataMap,
    ) -> Result<Self> {
        let cs = geometry.cluster_size();
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        backend.read_metadata(storage, &mut raw, table_offset)?;
        let entries = (table_clusters * cs / 8) as usize;
        let table: Vec<u64> = (0..entries).map(|i| read_table_entry(&raw, i)).collect();

        // Build the free index: the end is one past the last cluster with a
        // nonzero count; below it, every zero count is a hole.
        let rpb = geometry.refcounts_per_block();
        let mut used_end = 0u64;
        // Holes as [start, end) runs, not one entry per cluster: a block
        // covers up to 2^24 clusters (2 MiB clusters, 1-bit refcounts), and
        // a list of every free cluster in it would take 128 MiB.
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut add_hole = |start: u64, end: u64| match holes.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => holes.push((start, end)),
        };
        let mut block = vec![0u8; cs as usize];
        for (ti, &entry) in table.iter().enumerate() {
            let first = ti as u64 * rpb;
            if first >= file_clusters.max(used_end) && entry == 0 {
                continue;
            }
            let offset = entry & !0x1ff;
            if offset == 0 {
                add_hole(first, first + rpb);
                continue;
            }
            if !geometry.is_aligned(offset) {
                return Err(Error::Corrupt(format!(
                    "refcount table entry {ti} holds misaligned block offset {offset:#x}"
                )));
            }
            // A block past the end would read as zeros and make every cluster
            // it covers look free: allocation would then hand out live data.
            if geometry.host_cluster(HostOffset(offset)).0 >= file_clusters {
                return Err(Error::Corrupt(format!(
                    "refcount table entry {ti} points past the end of the file (block offset {offset:#x})"
                )));
            }
            backend.read_metadata(storage, &mut block, HostOffset(offset))?;
            if let Err(o) = metadata.write().insert(
                geometry.host_cluster(HostOffset(offset)),
                1,
                MetadataKind::RefcountBlock,
            ) {
                return Err(Error::Corrupt(format!(
                    "refcount table entry {ti} points at a block at {offset:#x} that overlaps the {}",
                    o.existing
                )));
            }
            // Only the entries up to the last nonzero count need a look:
            // the rest of the block is one hole.
            let used = used_entries(&block, geometry.refcount_order);
            for i in 0..used {
                if get_refcount(&block, i, geometry.refcount_order) == 0 {
                    add_hole(first + i, first + i + 1);
                } else {
                    used_end = first + i + 1;
                }
            }
            if used < rpb {
                add_hole(first + used, first + rpb);
            }
        }
        let mut free = FreeIndex::new(used_end);
        for (start, end) in holes.into_iter().take_while(|&(start, _)| start < used_end) {
            for c in start..end.min(used_end) {
                free.release(HostCluster(c));
            }
        }
        let block_cache_tables = cache_tables_max;
        Ok(Self {
            geometry,
            table,
            table_offset,
            table_clusters,
            table_fresh: false,
            table_dirty_clusters: BTreeSet::new(),
            blocks: TableCache::new("refcount blocks", cs as usize, block_cache_tables),
            free,
            deferred_decrements: Vec::new(),
            pending_release: Vec::new(),
            freed_metadata: Vec::new(),
            parked: Vec::new(),
            fresh_clusters: 0,
            defer_decrements: backend.defers_refcount_decrements(),
            metadata,
        })
    }

    /// Where the refcount table lives and how many clusters it spans.
    pub fn table_location(&self) -> (HostOffset, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// The free index (read-only view, for statistics).
    pub fn free_index(&self) -> &FreeIndex {
        &self.free
    }

    /// The refcount of `cluster`.
    pub fn get(
        &self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        cluster: HostCluster,
    ) -> Result<u64> {
        let ti = self.geometry.refcount_table_index(cluster) as usize;
        let Some(&entry) = self.table.get(ti) else {
            return Ok(0);
        };
        let offset = HostOffset(entry & !0x1ff);
        if offset.0 == 0 {
            return Ok(0);
        }
        let block = self.load_block(storage, backend, offset)?;
        let data = block.data.read();
        Ok(get_refcount(
            &data.bytes,
            self.geometry.refcount_block_index(cluster),
            self.geometry.refcount_order,
        ))
    }

    fn load_block(
        &self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        offset: HostOffset,
    ) -> Result<crate::sync::Arc<crate::cache::CachedTable>> {
        self.blocks
            .get(offset, |buf| backend.read_metadata(storage, buf, offset))
    }

    /// Adds `delta` to the count of `cluster`, creating its refcount block
    /// (and growing the table) if needed. Returns the new count.
    fn add(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        cluster: HostCluster,
        delta: i64,
        depth: u32,
    ) -> Result<u64> {
        let ti = self.geometry.refcount_table_index(cluster);
        let offset = self.ensure_block(storage, backend, ti, depth)?;
        let block = self.load_block(storage, backend, offset)?;
        let mut data = block.data.write();
        let index = self.geometry.refcount_block_index(cluster);
        let order = self.geometry.refcount_order;
        let old = get_refcount(&data.bytes, index, order);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&n| n <= self.geometry.refcount_max())
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(Error::Corrupt(format!(
                "refcount of cluster {} would go from {old} by {delta} out of range (max {})",
                cluster.0,
                self.geometry.refcount_max()
            )));
        };
        set_refcount(&mut data.bytes, index, order, new);
        let bit = index << order;
        data.mark_dirty((bit / 8) as usize, (1usize << order).div_ceil(8));
        Ok(new)
    }

    /// The block for table index `ti`, created if missing.
    fn ensure_block(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        ti: u64,
        depth: u32,
    ) -> Result<HostOffset> {
        if depth > GROWTH_DEPTH_MAX {
            return Err(Error::Corrupt(
                "refcount structure growth does not converge".into(),
            ));
        }
        if ti as usize >= self.table.len() {
            self.grow_table(storage, backend, ti, depth)?;
        }
        let entry = self.table[ti as usize] & !0x1ff;
        if entry != 0 {
            return Ok(HostOffset(entry));
        }
        // A new block, placed inside the range it covers when it can, so
        // that it counts itself and needs no other block. When that range
        // has no free cluster (a contiguous allocation is taking all of
        // it), the block goes elsewhere and is counted where it lands,
        // which may create one more block (bounded by `depth`).
        let rpb = self.geometry.refcounts_per_block();
        let first = ti * rpb;
        let (cluster, self_describing) = match self.free.first_free_in(first, first + rpb) {
            Some(c) => {
                self.free.take_specific(c);
                (c, true)
            }
            None => (self.free.take_one(), false),
        };
        guard_claim(&self.metadata.read(), self.geometry, cluster, 1)?;
        let offset = self.geometry.host_offset(cluster);
        let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
        if self_describing {
            set_refcount(
                &mut bytes,
                self.geometry.refcount_block_index(cluster),
                self.geometry.refcount_order,
                1,
            );
        }
        self.blocks.insert_fresh(offset, bytes);
        self.metadata
            .write()
            .insert(cluster, 1, MetadataKind::RefcountBlock)
            .map_err(|o| {
                Error::Corrupt(format!("new refcount block overlaps the {}", o.existing))
            })?;
        self.fresh_clusters += 1;
        self.table[ti as usize] = offset.0;
        self.mark_table_entry_dirty(ti);
        if !self_describing {
            let count = self.add(storage, backend, cluster, 1, depth + 1)?;
            if count != 1 {
                return Err(Error::Corrupt(format!(
                    "new refcount block at {offset} had a nonzero count"
                )));
            }
        }
        Ok(offset)
    }

    fn mark_table_entry_dirty(&mut self, ti: u64) {
        if !self.table_fresh {
            self.table_dirty_clusters
                .insert(ti * 8 / self.geometry.cluster_size());
        }
    }

    /// Moves the refcount table to a larger run of fresh clusters so that it
    /// has an entry `ti`. The old table is freed once the header switch is
    /// durable (by the usual free rules).
    fn grow_table(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        ti: u64,
        depth: u32,
    ) -> Result<()> {
        let per_cluster = self.geometry.cluster_size() / 8;
        let needed = (ti + 1).max(self.table.len() as u64 * 2);
        let new_clusters = needed.div_ceil(per_cluster);
        // QEMU refuses refcount tables over 8 MiB (QCOW_MAX_REFTABLE_SIZE).
        if new_clusters * self.geometry.cluster_size() > 8 << 20 {
            return Err(Error::InvalidArgument(format!(
                "refcount table would grow past 8 MiB ({new_clusters} clusters)"
            )));
        }
        let start = self.free.take_contiguous(new_clusters);
        guard_claim(&self.metadata.read(), self.geometry, start, new_clusters)?;
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters;
        let was_fresh = self.table_fresh;
        self.table.resize((new_clusters * per_cluster) as usize, 0);
        self.table_offset = self.geometry.host_offset(start);
        self.table_clusters = new_clusters;
        self.table_fresh = true;
        self.table_dirty_clusters.clear();
        self.fresh_clusters += new_clusters;
        {
            let mut map = self.metadata.write();
            map.remove(self.geometry.host_cluster(old_offset));
            map.insert(start, new_clusters, MetadataKind::RefcountTable)
                .map_err(|o| {
                    Error::Corrupt(format!("new refcount table overlaps the {}", o.existing))
                })?;
        }
        for i in 0..new_clusters {
            self.add(storage, backend, HostCluster(start.0 + i), 1, depth + 1)?;
        }
        for i in 0..old_clusters {
            let old = HostCluster(self.geometry.host_cluster(old_offset).0 + i);
            if was_fresh {
                // Never reachable from disk: reusable once this epoch is durable.
                self.add(storage, backend, old, -1, depth + 1)?;
                self.pending_release.push(old);
            } else {
                self.free_metadata(storage, backend, old)?;
            }
        }
        Ok(())
    }

    /// Allocates one cluster with refcount 1.
    #[must_use = "an allocated cluster must be referenced or freed"]
    pub fn allocate(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        counters: &Counters,
    ) -> Result<HostCluster> {
        let cluster = self.free.take_one();
        guard_claim(&self.metadata.read(), self.geometry, cluster, 1)?;
        let count = self.add(storage, backend, cluster, 1, 0)?;
        check_fresh_count(cluster, count)?;
        counters.clusters_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(cluster)
    }

    /// Allocates `count` contiguous clusters with refcount 1.
    #[must_use = "allocated clusters must be referenced or freed"]
    pub fn allocate_contiguous(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        counters: &Counters,
        count: u64,
    ) -> Result<HostCluster> {
        let start = self.free.take_contiguous(count);
        guard_claim(&self.metadata.read(), self.geometry, start, count)?;
        for i in 0..count {
            let c = self.add(storage, backend, HostCluster(start.0 + i), 1, 0)?;
            check_fresh_count(HostCluster(start.0 + i), c)?;
        }
        counters
            .clusters_allocated
            .fetch_add(count, Ordering::Relaxed);
        Ok(start)
    }

    /// Adds one reference to an allocated cluster (a shared cluster gains an owner).
    pub fn increment(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        cluster: HostCluster,
    ) -> Result<u64> {
        self.add(storage, backend, cluster, 1, 0)
    }

    /// Drops one reference to `cluster` (guest data). See the module rules
    /// for when the count actually drops and when the cluster is reusable.
    /// A data reference to a metadata cluster is a corrupt entry: dropping
    /// it would let the metadata be allocated over, so it is refused.
    pub fn free(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        cluster: HostCluster,
    ) -> Result<()> {
        if let Some(kind) = self.metadata.read().kind_of(cluster) {
            return Err(Error::MetadataOverlap {
                kind,
                offset: self.geometry.host_offset(cluster).0,
                what: "release of a data reference".into(),
            });
        }
        if self.defer_decrements {
            self.deferred_decrements.push(cluster);
            return Ok(());
        }
        if self.add(storage, backend, cluster, -1, 0)? == 0 {
            self.pending_release.push(cluster);
        }
        Ok(())
    }

    /// Drops one reference to a cluster that held metadata (an L2 table, an
    /// old L1 or refcount table): like [`Self::free`], and when its count
    /// reaches zero it is recorded so that a journal revokes its earlier
    /// writes to it (the draft's L1-reuse hazard). A table still shared with
    /// a snapshot keeps its journal history.
    pub fn free_metadata(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        cluster: HostCluster,
    ) -> Result<()> {
        if self.defer_decrements {
            // Flush ordering journals nothing, so there is nothing to revoke.
            self.deferred_decrements.push(cluster);
            return Ok(());
        }
        if self.add(storage, backend, cluster, -1, 0)? == 0 {
            self.freed_metadata.push(cluster);
            self.pending_release.push(cluster);
        }
        Ok(())
    }

    /// Takes the refcount part of an epoch: fresh structures, links to them,
    /// changed blocks, and freed metadata clusters. The header switch to a
    /// moved table is returned as `Some((offset, clusters))`. The blocks
    /// taken are added to `pins`: hold them until the backend has the epoch.
    pub fn take_epoch(
        &mut self,
        fresh_refcount: &mut Vec<MetadataWrite>,
        refcount_links: &mut Vec<MetadataWrite>,
        refcount_blocks: &mut Vec<MetadataWrite>,
        freed_metadata: &mut Vec<HostCluster>,
        pins: &mut WritebackPins,
    ) -> Option<(HostOffset, u64)> {
        self.fresh_clusters = 0;
        pins.append(self.blocks.take_writebacks(|offset, fresh, bytes| {
            let w = MetadataWrite { offset, bytes };
            if fresh {
                fresh_refcount.push(w);
            } else {
                refcount_blocks.push(w);
            }
        }));
        let cs = self.geometry.cluster_size() as usize;
        let encode_cluster = |table: &[u64], i: u64| {
            let mut bytes = vec![0u8; cs];
            let per = cs / 8;
            for (j, &e) in table[i as usize * per..(i as usize + 1) * per]
                .iter()
                .enumerate()
            {
                write_table_entry(&mut bytes, j, e);
            }
            bytes
        };
        freed_metadata.append(&mut self.freed_metadata);
        if self.table_fresh {
            for i in 0..self.table_clusters {
                fresh_refcount.push(MetadataWrite {
                    offset: HostOffset(self.table_offset.0 + i * cs as u64),
                    bytes: encode_cluster(&self.table, i),
                });
            }
            self.table_fresh = false;
            self.table_dirty_clusters.clear();
            return Some((self.table_offset, self.table_clusters));
        }
        for i in std::mem::take(&mut self.table_dirty_clusters) {
            refcount_links.push(MetadataWrite {
                offset: HostOffset(self.table_offset.0 + i * cs as u64),
                bytes: encode_cluster(&self.table, i),
            });
        }
        None
    }

    /// Whether anything is waiting for a persist.
    pub fn has_pending(&self) -> bool {
        self.table_fresh
            || !self.table_dirty_clusters.is_empty()
            || self.blocks.dirty_count() > 0
            || !self.deferred_decrements.is_empty()
            || !self.pending_release.is_empty()
    }

    /// Takes the frees of the epoch being gathered: they may take effect
    /// only once that epoch is durable ([`Self::after_durable`]).
    pub fn take_releases(&mut self) -> Releases {
        Releases {
            decrements: std::mem::take(&mut self.deferred_decrements),
            releases: std::mem::take(&mut self.pending_release),
        }
    }

    /// Called once the epoch `releases` was taken with is durable: the
    /// unreferencing of every cluster it freed is durable now, so deferred
    /// decrements may be applied (they reach the disk in a later epoch, and
    /// a crash before that only leaks) and clusters at zero may be reused.
    pub fn after_durable(
        &mut self,
        storage: &dyn Storage,
        backend: &dyn MetadataBackend,
        counters: &Counters,
        releases: Releases,
    ) -> Result<()> {
        let mut free_now = releases.releases;
        for cluster in releases.decrements {
            if self.add(storage, backend, cluster, -1, 0)? == 0 {
                free_now.push(cluster);
            }
        }
        // Clusters the backend still protects (a journal's unsynced data
        // checksum) wait, and are offered again after later epochs.
        free_now.append(&mut self.parked);
        let (free_now, parked): (Vec<_>, Vec<_>) =
            free_now.into_iter().partition(|&c| backend.may_reuse(c));
        self.parked = parked;
        for cluster in free_now {
            // A freed block's cached copy is stale from now on.
            self.blocks.forget(self.geometry.host_offset(cluster));
            self.free.release(cluster);
            counters.clusters_freed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether `cluster` is free for allocation.
    pub fn is_free(&self, cluster: HostCluster) -> bool {
        self.free.is_free(cluster)
    }
}
