//! The metadata-overlap guard, always on: the image's metadata map built at
//! open, the checks on the write path, and marking the image corrupt when
//! one fires.
//!
//! What is guarded (QEMU's `overlap-check=all` and the journal): a guest
//! data write never lands on a cluster the map names; a cluster the map
//! names is never allocated (`refcount.rs`) and never released as data.
//! On a violation the operation fails, the corrupt bit (incompatible
//! bit 1) is written in place and made durable, the image refuses every
//! later write and flush (it is poisoned), and reads go on. `qj check -r
//! all` repairs the image and clears the bit, as `qemu-img check -r all`
//! does.

use qj_journal::Storage;
use qj_spec::qcow2::features::INCOMPAT_CORRUPT_MASK;
use qj_spec::qcow2::{read_table_entry, Header, L1Entry, SnapshotHeader, SNAPSHOT_HEADER_LEN};
use qj_spec::units::{Geometry, HostOffset};

use super::Image;
use crate::backend::MetadataBackend;
use crate::error::{Error, IoContext, Result};
use crate::metadata_map::{MetadataKind, MetadataMap};

/// Byte offset of the incompatible feature field in the qcow2 header.
const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;
/// QEMU's limit on the bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
/// 1024 bytes for each of at most 65535 bitmaps).
const BITMAP_DIRECTORY_BYTES_MAX: u64 = 1024 * 65535;

/// Where the metadata of an image lives, as its header and tables say:
/// everything but the refcount blocks (the refcount side adds those as it
/// reads the refcount table). A structure that overlaps another is an
/// error naming both; a read-only open may ignore it (reads need no
/// guard), a writable one must not.
pub(super) fn load_metadata_map(
    storage: &dyn Storage,
    backend: &dyn MetadataBackend,
    header: &Header,
    l1_entries: &[u64],
) -> Result<MetadataMap> {
    let g = header.geometry();
    let mut map = MetadataMap::new();
    let mut add = |offset: u64, bytes: u64, kind: MetadataKind| -> Result<()> {
        let first = g.host_cluster(HostOffset(offset));
        let end = g.clusters_for(offset.saturating_add(bytes.max(1)));
        map.insert(first, end - first.0, kind).map_err(|o| {
            Error::Corrupt(format!(
                "the {} at {offset:#x} overlaps the {} at cluster {}",
                o.added, o.existing, o.cluster.0
            ))
        })
    };
    add(0, 1, MetadataKind::Header)?;
    add(
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * g.cluster_size(),
        MetadataKind::RefcountTable,
    )?;
    add(
        header.l1_table_offset,
        u64::from(header.l1_size) * 8,
        MetadataKind::ActiveL1,
    )?;
    for &raw in l1_entries {
        if let Some(l2) = L1Entry(raw).l2_offset() {
            add(l2.0, g.cluster_size(), MetadataKind::L2Table)?;
        }
    }
    if let Some(journal) = header.journal() {
        add(journal.offset, journal.size, MetadataKind::Journal)?;
    }
    if let Some(bitmaps) = header.bitmaps() {
        add(
            bitmaps.bitmap_directory_offset,
            bitmaps.bitmap_directory_size,
            MetadataKind::BitmapDirectory,
        )?;
        // The size comes from the file: bound it before allocating, by
        // QEMU's limit and by the file itself (QEMU refuses both).
        let end = bitmaps
            .bitmap_directory_offset
            .checked_add(bitmaps.bitmap_directory_size);
        let file_len = storage.len().ctx(|| "reading the image size".into())?;
        if bitmaps.bitmap_directory_size > BITMAP_DIRECTORY_BYTES_MAX
            || end.is_none_or(|e| e > file_len)
        {
            return Err(Error::Corrupt(format!(
                "the bitmap directory (bitmaps extension, bitmap_directory_size {} at {:#x}) \
                 is larger than QEMU's limit of {BITMAP_DIRECTORY_BYTES_MAX} bytes or ends past \
                 the end of the file ({file_len} bytes)",
                bitmaps.bitmap_directory_size, bitmaps.bitmap_directory_offset
            )));
        }
        let mut dir = vec![0u8; bitmaps.bitmap_directory_size as usize];
        backend.read_metadata(
            storage,
            &mut dir,
            HostOffset(bitmaps.bitmap_directory_offset),
        )?;
        for entry in qj_spec::qcow2::decode_bitmap_directory(&dir, bitmaps.nb_bitmaps)? {
            add(
                entry.bitmap_table_offset,
                u64::from(entry.bitmap_table_size) * 8,
                MetadataKind::BitmapTable,
            )?;
        }
    }
    if header.nb_snapshots > 0 {
        let snapshots = read_snapshot_table(storage, backend, header)?;
        let file_len = storage
            .len()
            .ctx(|| "reading the image length".into())?
            .max(backend.held_end());
        super::snapshot::validate_snapshot_entries(&snapshots.0, g, file_len)?;
        let table_end = snapshots.1;
        add(
            header.snapshots_offset,
            table_end - header.snapshots_offset,
            MetadataKind::SnapshotTable,
        )?;
        for snapshot in &snapshots.0 {
            let bytes = u64::from(snapshot.l1_size) * 8;
            add(snapshot.l1_table_offset, bytes, MetadataKind::SnapshotL1)?;
            let mut raw = vec![0u8; bytes as usize];
            backend.read_metadata(storage, &mut raw, HostOffset(snapshot.l1_table_offset))?;
            for i in 0..snapshot.l1_size as usize {
                if let Some(l2) = L1Entry(read_table_entry(&raw, i)).l2_offset() {
                    if !g.is_aligned(l2.0) {
                        return Err(Error::Corrupt(format!(
                            "snapshot {:?} L1 entry {i} points to misaligned L2 table offset {l2}",
                            snapshot.name
                        )));
                    }
                    add(l2.0, g.cluster_size(), MetadataKind::L2Table)?;
                }
            }
        }
    }
    Ok(map)
}

/// The snapshot table's entries and the offset one past its last byte.
/// Bounded: `validate_layout` limits the entry count to QEMU's, and each
/// entry to a fixed part plus at most 64 KiB of id, name and extra data.
pub(super) fn read_snapshot_table(
    storage: &dyn Storage,
    backend: &dyn MetadataBackend,
    header: &Header,
) -> Result<(Vec<SnapshotHeader>, u64)> {
    let mut entries = Vec::with_capacity(header.nb_snapshots.min(1024) as usize);
    let mut offset = header.snapshots_offset;
    for _ in 0..header.nb_snapshots {
        offset = offset.next_multiple_of(8);
        let mut fixed = [0u8; SNAPSHOT_HEADER_LEN];
        backend.read_metadata(storage, &mut fixed, HostOffset(offset))?;
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = u64::from(u32::from_be_bytes([
            fixed[36], fixed[37], fixed[38], fixed[39],
        ]))
        .min(qj_spec::qcow2::SNAPSHOT_EXTRA_DATA_LEN_MAX as u64 + 1);
        let len = SNAPSHOT_HEADER_LEN as u64 + extra_len + id_len + name_len;
        let mut bytes = vec![0u8; len as usize];
        backend.read_metadata(storage, &mut bytes, HostOffset(offset))?;
        let (entry, used) = SnapshotHeader::decode(&bytes, offset - header.snapshots_offset)?;
        entries.push(entry);
        offset += used as u64;
    }
    Ok((entries, offset))
}

impl Image {
    /// Allocates `clusters` contiguous clusters for new metadata of `kind`
    /// (a snapshot table or L1 copy, bitmap tables and data) and enters
    /// them in the guard's map before anything is written there, so that
    /// no guest write can land on them.
    pub(super) fn allocate_metadata_run(
        &self,
        clusters: u64,
        kind: MetadataKind,
    ) -> Result<HostOffset> {
        let first = self.refcounts.lock().allocate_contiguous(
            &*self.storage,
            &*self.backend,
            &self.counters,
            clusters,
        )?;
        self.metadata
            .write()
            .insert(first, clusters, kind)
            .map_err(|o| Error::Corrupt(format!("new {kind} overlaps the {}", o.existing)))?;
        Ok(self.geometry.host_offset(first))
    }

    /// Refuses a guest data write to `[host, host + len)` when its cluster
    /// holds metadata: the L2 entry that led here is corrupt.
    pub(super) fn guard_data_write(&self, host: u64, len: u64) -> Result<()> {
        let g: Geometry = self.geometry;
        let first = g.host_cluster(HostOffset(host));
        let clusters = g.clusters_for(host + len.max(1)) - first.0;
        match self.metadata.read().overlapping(first, clusters) {
            None => Ok(()),
            Some((cluster, kind)) => Err(Error::MetadataOverlap {
                kind,
                offset: g.host_offset(cluster).0.max(host),
                what: "guest data write".into(),
            }),
        }
    }

    /// Writes the corrupt bit into the header in place and makes it
    /// durable. Only the incompatible-features field is written: the rest
    /// of the in-place header may be older than a journal's copy, and must
    /// not change. Serialised with submits (the journal writes its dirty
    /// bit in the same field during a submit). A journal's replay would
    /// bring back a header without the bit, so open reads the bit from the
    /// header in place before any replay (`open.rs`).
    pub(super) fn mark_corrupt(&self) -> Result<()> {
        let _order = self.submit_order.lock();
        let mut field = [0u8; 8];
        self.storage
            .read_at(&mut field, INCOMPATIBLE_FEATURES_OFFSET)
            .ctx(|| "reading the header to mark it corrupt".into())?;
        let features = u64::from_be_bytes(field) | INCOMPAT_CORRUPT_MASK;
        self.storage
            .write_at(&features.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET)
            .ctx(|| "marking the image corrupt".into())?;
        self.counters.metadata_write(8);
        self.counters.flush();
        self.storage
            .flush()
            .ctx(|| "flushing the corrupt bit".into())?;
        let mut h = self.header.lock();
        h.mem.incompatible_features |= INCOMPAT_CORRUPT_MASK;
        h.disk.incompatible_features |= INCOMPAT_CORRUPT_MASK;
        Ok(())
    }
}
