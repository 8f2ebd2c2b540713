//! The persisted dedup index (spec §3.6, `qj_spec::qcow2::dedup_index`):
//! written at a clean close into clusters the "qjdx" extension names, read
//! back by the next open for writing so that it does not rehash the image.
//!
//! Why it can be trusted without rehashing: an open for writing takes the
//! index into memory and empties the extension in the header, and that
//! change (with the free of the index clusters) rides in the first
//! transaction the session commits. So while the extension is in the
//! header, nothing has changed since the index was written, except what
//! the journal still holds (the last transactions of the closing session,
//! whose dedup entries replay applies again: harmless, spec §8.5).

use qj_spec::qcow2::dedup_index::{
    decode_index, encode_index, DedupIndexExtension, DEDUP_INDEX_ENTRY_BYTES,
};
use qj_spec::qcow2::{read_table_entry, L1Entry, L2Entry};
use qj_spec::units::{HostCluster, HostOffset};

use super::Image;
use crate::dedup::ClusterHash;
use crate::error::{IoContext, Result};

/// A persisted index found at open: its entries, and its clusters if they
/// may be freed once the entries are in memory.
pub(super) struct LoadedIndex {
    /// (host offset, hash) pairs.
    pub entries: Vec<(u64, ClusterHash)>,
    /// The index clusters (first, count).
    pub clusters: Option<(HostCluster, u64)>,
    /// Why the extension was ignored, if it was.
    pub ignored: Option<String>,
}

impl Image {
    /// Reads the persisted index the header names, if any, and removes the
    /// extension from the in-memory header (the first transaction makes
    /// that durable). A damaged extension or index (truncated, bad
    /// checksum, past the end of the file, over metadata) is ignored and
    /// dropped: never used, and its clusters are not freed (they may be
    /// someone else's; if they were the index's, `qj check -r leaks` frees
    /// them).
    ///
    /// The extension stays, empty ([`DedupIndexExtension::EMPTY`]), unless
    /// `remove`: dedup is being turned off.
    pub(super) fn dedup_load_persisted(&self, remove: bool) -> Result<LoadedIndex> {
        let found = {
            let mut h = self.header.lock();
            let found = h.mem.dedup_index();
            if remove {
                if found.is_some() {
                    h.mem.set_dedup_index(None);
                    h.dirty = true;
                }
            } else if found != Some(Ok(DedupIndexExtension::EMPTY)) {
                h.mem.set_dedup_index(Some(DedupIndexExtension::EMPTY));
                h.dirty = true;
            }
            found
        };
        let empty = |ignored: Option<String>| LoadedIndex {
            entries: Vec::new(),
            clusters: None,
            ignored,
        };
        let ext = match found {
            None => return Ok(empty(None)),
            Some(Err(why)) => return Ok(empty(Some(why))),
            Some(Ok(ext)) if ext.is_empty() => return Ok(empty(None)),
            Some(Ok(ext)) => ext,
        };
        match self.dedup_read_persisted(&ext)? {
            Ok(loaded) => Ok(loaded),
            Err(why) => Ok(empty(Some(why))),
        }
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
            clusters: free_ok.then_some((first, clusters)),
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

    /// Frees the clusters of the index read at open (none of them is
    /// mapped by an L2 entry: `dedup_tables_map`).
    pub(super) fn dedup_free_persisted(&self, first: HostCluster, clusters: u64) -> Result<()> {
        let mut rc = self.refcounts.lock();
        for c in first.0..first.0 + clusters {
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
        if let Some((first, clusters)) = loaded.clusters {
            self.dedup_free_persisted(first, clusters)?;
        }
        Ok(())
    }

    /// Writes the in-memory index into fresh clusters and names them in
    /// the header (called by a clean close before the last persist, which
    /// commits counts, header and the index's data checksums together).
    pub(super) fn dedup_write_persisted(&self) -> Result<()> {
        let Some(stats) = self.dedup_stats() else {
            return Ok(());
        };
        let entries = self.dedup_entries();
        if entries.is_empty() {
            return Ok(());
        }
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
            let mut new_data = self.new_data.lock();
            for i in 0..clusters {
                new_data.push((HostOffset(offset.0 + i * cs), cs));
            }
        }
        let body = entries.len() * DEDUP_INDEX_ENTRY_BYTES;
        let ext = DedupIndexExtension {
            offset: offset.0,
            entries: entries.len() as u64,
            clusters_saved: stats.clusters_saved,
            clusters: clusters as u32,
            crc32c: crc32c(&bytes[..body]),
        };
        let mut h = self.header.lock();
        h.mem.set_dedup_index(Some(ext));
        h.dirty = true;
        Ok(())
    }
}

/// CRC32C through the spec crate's checksum (the index's checksum).
fn crc32c(bytes: &[u8]) -> u32 {
    qj_spec::journal::checksum::crc32c(bytes)
}
