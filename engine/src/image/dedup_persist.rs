//! The persisted dedup index (spec §3.6, `qj_spec::qcow2::dedup_index`):
//! written into clusters the "qjdx" extension names, in the first
//! transaction after each checkpoint and at a clean close, and read back by
//! the next open for writing so that it does not rehash the image.
//!
//! Why it can be trusted, and when it is rehashed: the index is written in
//! a transaction, as the in-memory index stood when that transaction's
//! epoch was gathered (under the exclusive gate), with the header naming
//! it and the free of the previous index's clusters. Replay then applies,
//! in log order, every dedup descriptor the log still holds; for every
//! cluster they name, the last one has the final word (spec §8.5). What
//! the log no longer holds (transactions a checkpoint synced after the
//! index was written and before a newer one was) may have changed an
//! entry the index still has, so after an unclean shutdown (the journal
//! was dirty) open rehashes the persisted entries and drops those that no
//! longer hold; after a clean close the index was written last and is
//! exact. An entry is never used unchecked; losing one only costs sharing.

use qj_spec::qcow2::dedup_index::{
    decode_index, encode_index, DedupIndexExtension, DEDUP_INDEX_ENTRY_BYTES,
};
use qj_spec::qcow2::{read_table_entry, L1Entry, L2Entry};
use qj_spec::units::{HostCluster, HostOffset};

use super::Image;
use crate::dedup::ClusterHash;
use crate::error::{IoContext, Result};
use crate::sync::Ordering;

/// A persisted index found at open: its entries, and its clusters.
pub(super) struct LoadedIndex {
    /// (host offset, hash) pairs.
    pub entries: Vec<(u64, ClusterHash)>,
    /// The index clusters, if the extension named a readable index.
    pub clusters: Option<PersistedClusters>,
    /// Why the extension was ignored, if it was.
    pub ignored: Option<String>,
}

/// The clusters a persisted index occupies.
#[derive(Debug, Clone, Copy)]
pub(super) struct PersistedClusters {
    /// The first index cluster.
    pub first: HostCluster,
    /// How many (contiguous).
    pub clusters: u64,
    /// Whether they may be freed when the index is replaced: each counted
    /// once, and mapped by no L2 entry (`dedup_tables_map`).
    pub free_ok: bool,
}

impl Image {
    /// Reads the persisted index the header names, if any. A damaged
    /// extension or index (truncated, bad checksum, past the end of the
    /// file, over metadata) is ignored and dropped from the in-memory
    /// header (the first transaction makes that durable): never used, and
    /// its clusters are not freed (they may be someone else's; if they
    /// were the index's, `qj check -r leaks` frees them). A good one stays
    /// in the header until a newer index replaces it.
    ///
    /// The extension stays (empty, [`DedupIndexExtension::EMPTY`], when no
    /// index is persisted) unless `remove`: dedup is being turned off.
    pub(super) fn dedup_load_persisted(&self, remove: bool) -> Result<LoadedIndex> {
        let found = self.header.lock().mem.dedup_index();
        let empty = |ignored: Option<String>| LoadedIndex {
            entries: Vec::new(),
            clusters: None,
            ignored,
        };
        let loaded = match &found {
            None => empty(None),
            Some(Err(why)) => empty(Some(why.clone())),
            Some(Ok(ext)) if ext.is_empty() => empty(None),
            Some(Ok(ext)) => match self.dedup_read_persisted(ext)? {
                Ok(loaded) => loaded,
                Err(why) => empty(Some(why)),
            },
        };
        let mut h = self.header.lock();
        if remove {
            if found.is_some() {
                h.mem.set_dedup_index(None);
                h.dirty = true;
            }
        } else if loaded.clusters.is_none() && found != Some(Ok(DedupIndexExtension::EMPTY)) {
            h.mem.set_dedup_index(Some(DedupIndexExtension::EMPTY));
            h.dirty = true;
        }
        Ok(loaded)
    }

    /// Validates `ext` against the file and the metadata and reads its
    /// entries; `Ok(Err(why))` for an index to ignore.
    fn dedup_read_persisted(
        &self,
        ext: &DedupIndexExtension,
    ) -> Result<std::result::Result<LoadedIndex, String>> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_len = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        let clusters = u64::from(ext.clusters);
        let bytes_max = clusters * cs;
        if !g.is_aligned(ext.offset) || ext.offset == 0 {
            return Ok(Err(format!(
                "dedup index offset {:#x} is not a cluster past the header",
                ext.offset
            )));
        }
        if clusters == 0
            || ext
                .offset
                .checked_add(bytes_max)
                .is_none_or(|e| e > file_len)
        {
            return Ok(Err(format!(
                "dedup index of {clusters} cluster(s) at {:#x} is not inside the file ({file_len} bytes)",
                ext.offset
            )));
        }
        if ext.entry_bytes().is_none_or(|n| n > bytes_max) {
            return Ok(Err(format!(
                "dedup index: {} entries do not fit its {clusters} cluster(s) (truncated)",
                ext.entries
            )));
        }
        let first = g.host_cluster(HostOffset(ext.offset));
        if let Some((c, kind)) = self.metadata.read().overlapping(first, clusters) {
            return Ok(Err(format!(
                "dedup index at {:#x} overlaps the {} at cluster {}",
                ext.offset,
                kind.name(),
                c.0
            )));
        }
        let mut bytes = vec![0u8; bytes_max as usize];
        self.storage
            .read_at(&mut bytes, ext.offset)
            .ctx(|| format!("reading the dedup index at {:#x}", ext.offset))?;
        let entries = match decode_index(&bytes, ext) {
            Ok(entries) => entries,
            Err(why) => return Ok(Err(why)),
        };
        // Freed only if each cluster is counted exactly once (the index's
        // own reference) and no L2 entry, active or a snapshot's, maps it:
        // on a damaged image the count may not tell.
        let mut free_ok = true;
        {
            let rc = self.refcounts.lock();
            for c in first.0..first.0 + clusters {
                free_ok &= rc.get(&*self.storage, &*self.backend, HostCluster(c))? == 1;
            }
        }
        // Tables that cannot be read keep the clusters: a leak, never a
        // free of someone else's data.
        free_ok = free_ok && matches!(self.dedup_tables_map(first, clusters), Ok(false));
        Ok(Ok(LoadedIndex {
            entries,
            clusters: Some(PersistedClusters {
                first,
                clusters,
                free_ok,
            }),
            ignored: None,
        }))
    }

    /// Whether an L2 entry of the active tables or of a snapshot maps any
    /// of the clusters `[first, first + clusters)`. Each table is read once
    /// (tables shared between L1 tables are walked once), so the walk is
    /// bounded by the tables the image has; it runs only at an open that
    /// found a persisted index.
    fn dedup_tables_map(&self, first: HostCluster, clusters: u64) -> Result<bool> {
        let mut l1_tables = vec![self.l1.read().entries.clone()];
        for sn in self.snapshots()? {
            l1_tables.push(self.read_snapshot_l1(&sn)?);
        }
        let range = first.0..first.0 + clusters;
        let mut walked = std::collections::HashSet::new();
        for raw in l1_tables.into_iter().flatten() {
            let Some(l2) = L1Entry(raw).l2_offset() else {
                continue;
            };
            if !walked.insert(l2.0) {
                continue;
            }
            let table = self.load_l2(l2)?;
            let t = table.data.read();
            for i in 0..self.geometry.l2_entries() as usize {
                let entry =
                    L2Entry::decode(read_table_entry(&t.bytes, i), self.geometry.cluster_bits);
                let held = self.referenced_clusters(entry);
                if held.start < range.end && range.start < held.end {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Frees the clusters of a persisted index (by the free rules: reused
    /// only once the transaction that no longer names them is durable),
    /// unless they are not the index's alone.
    fn dedup_free_persisted(&self, persisted: PersistedClusters) -> Result<()> {
        if !persisted.free_ok {
            return Ok(());
        }
        let mut rc = self.refcounts.lock();
        let first = persisted.first.0;
        for c in first..first + persisted.clusters {
            rc.free(&*self.storage, &*self.backend, HostCluster(c))?;
        }
        Ok(())
    }

    /// Removes the persisted index from the header and frees its clusters
    /// when they are the index's alone (on an open that changes the
    /// image's structure: dedup or the journal turned off). A damaged
    /// extension is only removed.
    pub(super) fn dedup_drop_persisted(&self) -> Result<()> {
        let loaded = self.dedup_load_persisted(true)?;
        if let Some(persisted) = loaded.clusters {
            self.dedup_free_persisted(persisted)?;
        }
        Ok(())
    }

    /// Called by a persist under the exclusive gate, before it gathers its
    /// epoch: after a checkpoint (the open's replay counts as one), if the
    /// index changed since it was last written, this epoch writes it, so
    /// that a crash loses at most what changed since the last checkpoint
    /// (less: the log still holds most of it).
    pub(super) fn dedup_persist_after_checkpoint(&self) -> Result<()> {
        let Some(d) = &self.dedup else {
            return Ok(());
        };
        let checkpoints = self.backend.checkpoints();
        if checkpoints > d.persisted_at_checkpoint.load(Ordering::SeqCst)
            && (d.changed.load(Ordering::SeqCst) || d.index.lock().has_pending())
        {
            self.dedup_write_persisted()?;
        }
        Ok(())
    }

    /// Writes the in-memory index into fresh clusters, names them in the
    /// header and frees the previous index's clusters, all in the epoch
    /// being gathered (a clean close calls it before its last persist; a
    /// persist after a checkpoint, under the gate). No index at all (the
    /// empty extension) when there is no entry. Nothing to do when the
    /// index did not change since it was last written.
    pub(super) fn dedup_write_persisted(&self) -> Result<()> {
        let Some(d) = &self.dedup else {
            return Ok(());
        };
        d.persisted_at_checkpoint
            .store(self.backend.checkpoints(), Ordering::SeqCst);
        // Changes not yet taken by an epoch count too: this epoch takes
        // them, and the index written here includes them.
        let pending = d.index.lock().has_pending();
        let stats = d.index.lock().stats();
        // The extension also reports the clusters saved, which links
        // change without changing an entry.
        let saved_written = match self.header.lock().mem.dedup_index() {
            Some(Ok(ext)) => ext.clusters_saved,
            _ => 0,
        };
        if !d.changed.swap(false, Ordering::SeqCst)
            && !pending
            && stats.clusters_saved == saved_written
        {
            return Ok(());
        }
        let entries = self.dedup_entries();
        let previous = d.persisted.lock().take();
        let ext = if entries.is_empty() {
            DedupIndexExtension::EMPTY
        } else {
            let cs = self.geometry.cluster_size();
            let mut bytes = encode_index(&entries);
            let clusters = (bytes.len() as u64).div_ceil(cs);
            bytes.resize((clusters * cs) as usize, 0);
            let first = self.refcounts.lock().allocate_contiguous(
                &*self.storage,
                &*self.backend,
                &self.counters,
                clusters,
            )?;
            let offset = self.geometry.host_offset(first);
            self.storage
                .write_at(&bytes, offset.0)
                .ctx(|| format!("writing the dedup index at {offset}"))?;
            self.counters.metadata_write(bytes.len());
            {
                // Rule 2 of the journal: data the transaction depends on is
                // checksummed (one range per cluster).
                for i in 0..clusters {
                    self.record_new_data(HostOffset(offset.0 + i * cs), cs, None);
                }
            }
            *d.persisted.lock() = Some(PersistedClusters {
                first,
                clusters,
                free_ok: true,
            });
            let body = entries.len() * DEDUP_INDEX_ENTRY_BYTES;
            DedupIndexExtension {
                offset: offset.0,
                entries: entries.len() as u64,
                clusters_saved: stats.clusters_saved,
                clusters: clusters as u32,
                crc32c: crc32c(&bytes[..body]),
            }
        };
        {
            let mut h = self.header.lock();
            h.mem.set_dedup_index(Some(ext));
            h.dirty = true;
        }
        if let Some(previous) = previous {
            self.dedup_free_persisted(previous)?;
        }
        Ok(())
    }
}

/// CRC32C through the spec crate's checksum (the index's checksum).
fn crc32c(bytes: &[u8]) -> u32 {
    qj_spec::journal::checksum::crc32c(bytes)
}
