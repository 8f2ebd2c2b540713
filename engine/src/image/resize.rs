//! Growing and shrinking the guest disk.

use qj_spec::qcow2::L2Entry;
use qj_spec::units::{GuestCluster, GuestOffset, HostCluster};

use super::{Backing, Image};
use crate::error::{Error, Result};
use crate::metadata_map::MetadataKind;
use crate::sync::Ordering;

impl Image {
    /// Changes the virtual size. Growing maps the new space as zeros (also
    /// over a larger backing file); shrinking releases the clusters past the
    /// new end. The change is durable after the next flush.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let new_size = new_size.next_multiple_of(512);
        self.refuse_resize_for_bitmaps(new_size)?;
        let _gate = self.gate.write();
        let op = self.begin_op();
        let r = self.resize_locked(new_size);
        self.poisoned(r)?;
        drop(op);
        drop(_gate);
        self.maybe_evict()?;
        self.sync_if_writethrough()
    }

    fn resize_locked(&self, new_size: u64) -> Result<()> {
        let old_size = self.virtual_size();
        let g = self.geometry;
        let needed = g.l1_entries_for(new_size);
        if needed * 8 > crate::create::L1_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} needs an L1 table over the 32 MiB limit"
            )));
        }
        if new_size < old_size {
            if self.header.lock().mem.nb_snapshots > 0 {
                return Err(Error::Unsupported(
                    "shrinking an image with internal snapshots".into(),
                ));
            }
            // Release every cluster past the new end (rounded up to a cluster:
            // the cluster holding the new end keeps its head).
            let first = g.clusters_for(new_size);
            let last = g.clusters_for(old_size);
            for c in first..last {
                let cluster = GuestCluster(c);
                let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
                    continue;
                };
                let table = self.load_l2(l2)?;
                let mut t = table.data.write();
                let old = self.l2_entry(&t.bytes, cluster)?;
                if old != L2Entry::Unallocated {
                    self.entries_changed.fetch_add(1, Ordering::Relaxed);
                    t.set_entry(g.l2_index(cluster) as usize, 0);
                    drop(t);
                    self.release_entry(old)?;
                    self.dedup_after_release(old, cluster)?;
                }
            }
        } else if needed as usize > self.l1.read().entries.len() {
            self.grow_l1(needed)?;
        }
        if new_size > old_size {
            self.grow_bitmaps(new_size)?;
        }
        self.virtual_size.store(new_size, Ordering::Release);
        {
            let mut h = self.header.lock();
            h.mem.size = new_size;
            h.dirty = true;
        }
        if new_size > old_size {
            self.zero_grown_range(old_size, new_size)?;
        }
        Ok(())
    }

    /// Makes `[old_size, new_size)` read as zeros after a grow. Whatever
    /// the image maps there must go: stale bytes a shrink left in the last
    /// cluster, a larger backing file, and entries past the old end whose
    /// size change a crash lost (the L2 write reached the disk, the header
    /// did not; found by the crash harness).
    fn zero_grown_range(&self, old_size: u64, new_size: u64) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let backing_size = self.backing.as_ref().map_or(0, Backing::size);
        let reads_zero = |entry: Option<L2Entry>, guest: u64| match entry {
            None | Some(L2Entry::Unallocated) => guest >= backing_size,
            Some(L2Entry::Zero { .. }) => true,
            Some(_) => false,
        };
        // The rest of the cluster that held the old end.
        let tail_end = old_size.next_multiple_of(cs).min(new_size);
        if tail_end > old_size {
            for (cluster, in_cluster, n, _) in self.pieces(old_size, tail_end - old_size) {
                let guest = g.guest_offset(cluster).0 + in_cluster as u64;
                if !reads_zero(self.entry_of(cluster)?, guest) {
                    self.write_piece(cluster, in_cluster, &vec![0u8; n])?;
                }
            }
        }
        // Whole clusters past it. Bounded by the number of clusters in the
        // range; ranges without an L2 table (and no backing data) are
        // skipped a table at a time.
        let mut pos = tail_end;
        while pos < new_size {
            let cluster = g.guest_cluster(GuestOffset(pos));
            let entry = self.entry_of(cluster)?;
            if entry.is_none() && pos >= backing_size {
                pos = g
                    .guest_offset(GuestCluster((g.l1_index(cluster) + 1) * g.l2_entries()))
                    .0;
                continue;
            }
            if !reads_zero(entry, pos) {
                let n = cs.min(new_size - pos) as usize;
                self.zero_piece(cluster, 0, n, false)?;
            }
            pos += cs;
        }
        Ok(())
    }

    /// Moves the L1 table to fresh clusters with room for `needed` entries.
    /// The header switches to it in one write, after it is durable (it is
    /// `fresh`); the old table is freed by the usual rules.
    fn grow_l1(&self, needed: u64) -> Result<()> {
        let g = self.geometry;
        let mut l1 = self.l1.write();
        let old_entries = l1.entries.len() as u64;
        let new_entries = needed
            .max(old_entries + old_entries / 2)
            .min(crate::create::L1_BYTES_MAX / 8);
        let clusters = g.clusters_for(new_entries * 8).max(1);
        let old_clusters = g.clusters_for(old_entries * 8).max(1);
        let mut rc = self.refcounts.lock();
        let start =
            rc.allocate_contiguous(&*self.storage, &*self.backend, &self.counters, clusters)?;
        let old_start = g.host_cluster(l1.offset);
        for i in 0..old_clusters {
            rc.free_metadata(&*self.storage, &*self.backend, HostCluster(old_start.0 + i))?;
        }
        drop(rc);
        {
            let mut map = self.metadata.write();
            map.remove(old_start);
            map.insert(start, clusters, MetadataKind::ActiveL1)
                .map_err(|o| Error::Corrupt(format!("new L1 table overlaps the {}", o.existing)))?;
        }
        self.fresh_tables.fetch_add(clusters, Ordering::Relaxed);
        l1.entries.resize(new_entries as usize, 0);
        l1.offset = g.host_offset(start);
        l1.fresh = true;
        l1.dirty_clusters.clear();
        let mut h = self.header.lock();
        h.mem.l1_table_offset = l1.offset.0;
        h.mem.l1_size = new_entries as u32;
        h.dirty = true;
        Ok(())
    }
}
