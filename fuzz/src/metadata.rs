//! Which clusters of an image hold metadata, found by walking the header,
//! the refcount table, the L1 and L2 tables, the snapshot table, the bitmap
//! directory and the journal extension with the `spec` decoders alone, so
//! that the whole-image target can tell when a guest write lands on one,
//! and which clusters hold guest data, so that it can tell an image whose
//! metadata doubles as guest data. The walk never trusts a count: it reads
//! only bytes inside the file.

use std::collections::{BTreeMap, BTreeSet};

use qj_spec::qcow2::{
    decode_bitmap_directory, decode_snapshot_table, read_table_entry, Header, L1Entry, L2Entry,
    BITMAP_TABLE_ENTRY_OFFSET_MASK,
};

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
const REFCOUNT_TABLE_OFFSET_MASK: u64 = !0x1ff;

/// The journal's two 512-byte header slots at the start of its region.
const JOURNAL_HEADER_SLOTS_BYTES: u64 = 1024;

/// Metadata clusters by cluster index, each with what it holds.
pub type MetadataClusters = BTreeMap<u64, &'static str>;

/// Where an image keeps its metadata and its guest data.
#[derive(Debug)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The metadata clusters.
    pub metadata: MetadataClusters,
    /// The clusters L2 entries (active or of a snapshot) map guest data to.
    pub data: BTreeSet<u64>,
    /// Whether two entries of the active L2 tables map one data cluster.
    pub active_data_shared: bool,
}

impl Layout {
    /// Whether some cluster is both metadata and guest data: `check`
    /// counts that as two references and, with a refcount of 2, calls the
    /// image clean (so does qemu-img check), yet a table that is also data
    /// cannot be kept consistent by writes to either.
    #[must_use]
    pub fn metadata_is_data(&self) -> bool {
        self.data.iter().any(|c| self.metadata.contains_key(c))
    }

    /// Whether one data cluster is mapped twice by the active tables (not
    /// by a snapshot: that sharing is what snapshots are). `check` and
    /// qemu-img check call that consistent with a refcount of 2, but a
    /// write to either entry copies it, and the other entry is left with
    /// a refcount of 1 and no COPIED flag: an `OFLAG_COPIED` error, which
    /// QEMU's own writes leave the same way (qemu-io replaying the target's
    /// writes on the finding's image gave the same three errors).
    #[must_use]
    pub fn active_data_is_shared(&self) -> bool {
        self.active_data_shared
    }
}

/// The layout of `image`, or `None` when its header does not decode (then
/// nothing in it is metadata the engine would use).
#[must_use]
pub fn layout(image: &[u8]) -> Option<Layout> {
    let header = Header::decode(image).ok()?;
    let mut walk = Walk {
        image,
        cluster_bits: header.cluster_bits,
        clusters: MetadataClusters::new(),
        data: BTreeSet::new(),
        active_data: BTreeSet::new(),
        active_data_shared: false,
    };
    let cluster_size = 1u64 << header.cluster_bits;
    walk.range(0, cluster_size, "header");

    let reftable_len = u64::from(header.refcount_table_clusters) << header.cluster_bits;
    walk.range(header.refcount_table_offset, reftable_len, "refcount table");
    for raw in walk.entries(header.refcount_table_offset, reftable_len) {
        walk.range(
            raw & REFCOUNT_TABLE_OFFSET_MASK,
            cluster_size,
            "refcount block",
        );
    }

    walk.l1(header.l1_table_offset, header.l1_size, true);

    if header.nb_snapshots > 0 {
        if let Some(table) = image.get(usize::try_from(header.snapshots_offset).ok()?..) {
            if let Ok(snapshots) = decode_snapshot_table(table, header.nb_snapshots) {
                let len = snapshots.iter().map(|s| s.encoded_len() as u64 + 8).sum();
                walk.range(header.snapshots_offset, len, "snapshot table");
                for s in &snapshots {
                    walk.l1(s.l1_table_offset, s.l1_size, false);
                }
            }
        }
    }

    if let Some(ext) = header.bitmaps() {
        walk.range(
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            "bitmap directory",
        );
        let directory = usize::try_from(ext.bitmap_directory_offset)
            .ok()
            .and_then(|at| image.get(at..));
        if let Some(Ok(bitmaps)) = directory.map(|d| decode_bitmap_directory(d, ext.nb_bitmaps)) {
            for b in &bitmaps {
                let len = u64::from(b.bitmap_table_size) * 8;
                walk.range(b.bitmap_table_offset, len, "bitmap table");
                for raw in walk.entries(b.bitmap_table_offset, len) {
                    walk.range(
                        raw & BITMAP_TABLE_ENTRY_OFFSET_MASK,
                        cluster_size,
                        "bitmap data",
                    );
                }
            }
        }
    }

    // The journal's ring is a log: with logged data (spec 8.2) guest bytes
    // travel through it by design. Its two header slots never hold them.
    if let Some(journal) = header.journal() {
        walk.range(
            journal.offset,
            journal.size.min(JOURNAL_HEADER_SLOTS_BYTES),
            "journal header slots",
        );
    }
    Some(Layout {
        cluster_bits: header.cluster_bits,
        metadata: walk.clusters,
        data: walk.data,
        active_data_shared: walk.active_data_shared,
    })
}

struct Walk<'a> {
    image: &'a [u8],
    cluster_bits: u32,
    clusters: MetadataClusters,
    data: BTreeSet<u64>,
    /// The data clusters the active tables map, so far.
    active_data: BTreeSet<u64>,
    active_data_shared: bool,
}

impl Walk<'_> {
    /// Marks the clusters of `[offset, offset + len)` that lie in the file.
    fn range(&mut self, offset: u64, len: u64, what: &'static str) {
        if offset == 0 && what != "header" {
            return;
        }
        let end = offset.saturating_add(len).min(self.image.len() as u64);
        let mut cluster = offset >> self.cluster_bits;
        while cluster << self.cluster_bits < end {
            self.clusters.entry(cluster).or_insert(what);
            cluster += 1;
        }
    }

    /// The nonzero 8-byte entries of the table at `[offset, offset + len)`,
    /// as far as the file holds it.
    fn entries(&self, offset: u64, len: u64) -> Vec<u64> {
        let Ok(start) = usize::try_from(offset) else {
            return Vec::new();
        };
        let Some(table) = self.image.get(start..) else {
            return Vec::new();
        };
        let count = usize::try_from(len / 8)
            .unwrap_or(usize::MAX)
            .min(table.len() / 8);
        (0..count)
            .map(|i| read_table_entry(table, i))
            .filter(|&raw| raw != 0)
            .collect()
    }

    /// An L1 table of `size` entries, the L2 tables it points at and the
    /// data clusters they map; `active` for the image's own L1 table, not a
    /// snapshot's.
    fn l1(&mut self, offset: u64, size: u32, active: bool) {
        let (l1, l2) = if active {
            ("L1 table", "L2 table")
        } else {
            ("snapshot L1 table", "snapshot L2 table")
        };
        let len = u64::from(size) * 8;
        self.range(offset, len, l1);
        for raw in self.entries(offset, len) {
            if let Some(l2_offset) = L1Entry(raw).l2_offset() {
                self.range(l2_offset.0, 1 << self.cluster_bits, l2);
                for entry in self.entries(l2_offset.0, 1 << self.cluster_bits) {
                    let host = match L2Entry::decode(entry, self.cluster_bits) {
                        L2Entry::Compressed { host_offset, .. } => Some(host_offset),
                        other => other.allocated_offset().map(|o| o.0),
                    };
                    if let Some(host) = host {
                        self.data.insert(host >> self.cluster_bits);
                        if active && !self.active_data.insert(host >> self.cluster_bits) {
                            self.active_data_shared = true;
                        }
                    }
                }
            }
        }
    }
}
