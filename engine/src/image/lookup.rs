//! From a guest cluster to its L1 and L2 entries. Every entry is validated
//! here, before any caller reads or writes through it.

use qj_spec::qcow2::{read_table_entry, L1Entry, L2Entry};
use qj_spec::units::{GuestCluster, GuestOffset, HostOffset};

use super::Image;
use crate::cache::CachedTable;
use crate::error::{Error, IoContext, Result};
use crate::sync::{Arc as SyncArc, Ordering};

impl Image {
    /// Splits `[offset, offset + len)` into per-cluster pieces:
    /// (guest cluster, offset in cluster, length, offset in the request).
    pub(super) fn pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (GuestCluster, usize, usize, usize)> {
        let cs = self.geometry.cluster_size();
        let g = self.geometry;
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let cluster = g.guest_cluster(GuestOffset(pos));
            let in_cluster = g.offset_in_cluster(pos);
            let n = (cs - in_cluster).min(end - pos);
            let item = (
                cluster,
                in_cluster as usize,
                n as usize,
                (pos - offset) as usize,
            );
            pos += n;
            Some(item)
        })
    }

    pub(super) fn l1_entry(&self, cluster: GuestCluster) -> Result<L1Entry> {
        let index = self.geometry.l1_index(cluster) as usize;
        let raw = self.l1.read().entries.get(index).copied().unwrap_or(0);
        let entry = L1Entry(raw);
        if let Some(o) = entry.l2_offset() {
            if !self.geometry.is_aligned(o.0) {
                return Err(Error::Corrupt(format!(
                    "L1 entry {index} points to misaligned L2 table offset {o}"
                )));
            }
        }
        Ok(entry)
    }

    pub(super) fn load_l2(&self, offset: HostOffset) -> Result<SyncArc<CachedTable>> {
        let storage = &*self.storage;
        let backend = &*self.backend;
        self.l2_cache
            .get(offset, |buf| backend.read_metadata(storage, buf, offset))
    }

    pub(super) fn l2_entry(&self, table: &[u8], cluster: GuestCluster) -> Result<L2Entry> {
        let index = self.geometry.l2_index(cluster) as usize;
        let raw = read_table_entry(table, index);
        let entry = L2Entry::decode(raw, self.geometry.cluster_bits);
        if let L2Entry::Normal { offset, .. }
        | L2Entry::Zero {
            preallocated: Some(offset),
            ..
        } = entry
        {
            if !self.geometry.is_aligned(offset.0) {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {} points to misaligned offset {offset}",
                    cluster.0
                )));
            }
            self.check_in_file(offset, cluster)?;
        }
        Ok(entry)
    }

    /// A data cluster must start inside the file. One past the end would
    /// read as zeros instead of the guest's data, and an in-place write to
    /// it would modify a corrupt image; the caller errors first. Like QEMU's
    /// check, the last cluster may be partly past the end (QEMU leaves the
    /// file short of a full cluster). Every cluster this image allocates is
    /// written before its entry is set, so the slow path (asking the device)
    /// runs only for entries the file does not cover.
    fn check_in_file(&self, offset: HostOffset, cluster: GuestCluster) -> Result<()> {
        if offset.0 < self.file_len_seen.load(Ordering::Acquire) {
            return Ok(());
        }
        let file_len = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        self.file_len_seen.fetch_max(file_len, Ordering::AcqRel);
        // Logged data (`backend/logged_data.rs`) reaches the file at
        // checkpoint: until then its cluster may lie past the end.
        if offset.0 >= file_len && !self.backend.holds_data(offset) {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {} points to offset {offset}, past the end of the file ({file_len} bytes)",
                cluster.0
            )));
        }
        Ok(())
    }

    /// The L2 entry of `cluster`, or `None` when no L2 table maps it.
    pub(super) fn entry_of(&self, cluster: GuestCluster) -> Result<Option<L2Entry>> {
        let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
            return Ok(None);
        };
        let table = self.load_l2(l2)?;
        let t = table.data.read();
        self.l2_entry(&t.bytes, cluster).map(Some)
    }
}
