//! What `qj info` and `qj map` show.

use qj_spec::qcow2::{HeaderExtension, L2Entry};
use qj_spec::units::GuestCluster;
use serde::Serialize;

use super::Image;
use crate::backend::{BackendKind, JournalInfo};
use crate::error::{IoContext, Result};

/// One extent of the guest disk as [`Image::map`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapExtent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the bytes are stored in this image (false: backing or zeros).
    pub data: bool,
    /// Whether the extent reads as zeros.
    pub zero: bool,
    /// Whether the extent is stored compressed.
    pub compressed: bool,
    /// Host offset of the first byte, for uncompressed data.
    pub offset: Option<u64>,
}

/// What `qj info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Image file length in bytes.
    pub file_length: u64,
    /// Backing file name from the header.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// The dirty bit (incompatible bit 0).
    pub dirty: bool,
    /// The corrupt bit (incompatible bit 1).
    pub corrupt: bool,
    /// Internal snapshots.
    pub snapshots: u32,
    /// L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Header extensions present, by name.
    pub extensions: Vec<String>,
    /// The metadata backend in use.
    pub backend: BackendKind,
    /// The journal, when the image has one in use.
    pub journal: Option<JournalInfo>,
    /// The persistent dirty bitmaps.
    pub bitmaps: Vec<super::BitmapInfo>,
    /// Why the bitmaps are not maintained or could not be read, if so.
    pub bitmaps_problem: Option<String>,
}

impl Image {
    /// A description of the image.
    pub fn info(&self) -> Result<ImageInfo> {
        let h = self.header.lock().mem.clone();
        let file_length = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        let extensions = h
            .extensions
            .iter()
            .map(|e| match e {
                HeaderExtension::BackingFormat(_) => "backing format".to_string(),
                HeaderExtension::FeatureNameTable(_) => "feature name table".to_string(),
                HeaderExtension::Bitmaps(_) => "bitmaps".to_string(),
                HeaderExtension::ExternalDataFile(_) => "external data file".to_string(),
                HeaderExtension::Journal(_) => "qjournal".to_string(),
                HeaderExtension::Unknown { kind, .. } => format!("unknown {kind:#010x}"),
            })
            .collect();
        Ok(ImageInfo {
            version: h.version,
            virtual_size: self.virtual_size(),
            cluster_size: self.geometry.cluster_size(),
            refcount_bits: self.geometry.refcount_bits(),
            file_length,
            backing_format: h.extensions.iter().find_map(|e| match e {
                HeaderExtension::BackingFormat(f) => Some(f.clone()),
                _ => None,
            }),
            backing_file: h.backing_file.clone(),
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            dirty: h.is_dirty(),
            corrupt: h.is_corrupt(),
            snapshots: h.nb_snapshots,
            l1_size: h.l1_size,
            l1_table_offset: h.l1_table_offset,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            extensions,
            backend: self.backend.kind(),
            journal: self.backend.journal_info(),
            bitmaps: self.bitmaps(),
            bitmaps_problem: self.bitmap_problem(),
        })
    }

    /// Whether every guest read is served from the file (or the backing
    /// file, or zeros) as [`Image::map`] describes it: no delayed copy,
    /// logged data or in-memory replay is consulted. While true, two images
    /// with the same map and the same bytes at a data extent's host offset
    /// read the same there.
    pub fn reads_as_mapped(&self) -> bool {
        !self.backend.serves_reads_from_memory()
    }

    /// Guest extents: what is stored here, zero, or left to the backing file.
    pub fn map(&self) -> Result<Vec<MapExtent>> {
        let g = self.geometry;
        let size = self.virtual_size();
        let mut out: Vec<MapExtent> = Vec::new();
        let clusters = g.clusters_for(size);
        let mut c = 0;
        while c < clusters {
            let cluster = GuestCluster(c);
            let start = g.guest_offset(cluster).0;
            // The clusters up to the next L2 table share this one.
            let next = ((g.l1_index(cluster) + 1) * g.l2_entries()).min(clusters);
            let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
                // A whole missing L2 table: skip its range at once.
                let end = (g.guest_offset(GuestCluster(next)).0).min(size);
                push_extent(
                    &mut out,
                    MapExtent {
                        start,
                        length: end - start,
                        data: false,
                        zero: self.backing.is_none(),
                        compressed: false,
                        offset: None,
                    },
                );
                c = next;
                continue;
            };
            // One table lookup and lock for all of its clusters.
            let table = self.load_l2(l2)?;
            let t = table.data.read();
            while c < next {
                let cluster = GuestCluster(c);
                let start = g.guest_offset(cluster).0;
                let length = g.cluster_size().min(size - start);
                let entry = self.l2_entry(&t.bytes, cluster)?;
                push_extent(&mut out, self.extent(entry, start, length));
                c += 1;
            }
        }
        Ok(out)
    }

    /// The extent of one guest cluster under L2 entry `entry`.
    fn extent(&self, entry: L2Entry, start: u64, length: u64) -> MapExtent {
        match entry {
            L2Entry::Unallocated => MapExtent {
                start,
                length,
                data: false,
                zero: self.backing.is_none(),
                compressed: false,
                offset: None,
            },
            L2Entry::Zero { .. } => MapExtent {
                start,
                length,
                data: false,
                zero: true,
                compressed: false,
                offset: None,
            },
            L2Entry::Normal { offset, .. } => MapExtent {
                start,
                length,
                data: true,
                zero: false,
                compressed: false,
                offset: Some(offset.0),
            },
            L2Entry::Compressed { .. } => MapExtent {
                start,
                length,
                data: true,
                zero: false,
                compressed: true,
                offset: None,
            },
        }
    }
}

fn push_extent(out: &mut Vec<MapExtent>, ext: MapExtent) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, ext.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.data == ext.data
            && last.zero == ext.zero
            && last.compressed == ext.compressed
            && contiguous
            && !ext.compressed
        {
            last.length += ext.length;
            return;
        }
    }
    out.push(ext);
}
