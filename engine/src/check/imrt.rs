//! The in-memory refcount table: references counted while walking the
//! metadata, stored packed at the image's own refcount width exactly like
//! QEMU's (so that an entry saturates where the image's would, and so that
//! a rebuild can write slices of it to disk as refcount blocks).

use qj_spec::qcow2::{get_refcount, set_refcount};
use qj_spec::units::Geometry;

/// Most bytes the table may take (8 GiB of 64-bit refcounts would be a
/// 1-billion-cluster image; refuse before allocating that).
pub const IMRT_BYTES_MAX: u64 = 1 << 30;

/// Counted references per host cluster.
#[derive(Debug, Clone)]
pub(crate) struct Imrt {
    geometry: Geometry,
    /// Packed entries; always a whole number of clusters long so that any
    /// refcount block's slice is in bounds.
    bytes: Vec<u8>,
    /// Logical number of entries (host clusters covered).
    clusters: u64,
}

impl Imrt {
    /// A table of `clusters` zero entries, or `None` if it would exceed
    /// [`IMRT_BYTES_MAX`].
    pub fn new(geometry: Geometry, clusters: u64) -> Option<Imrt> {
        let mut t = Imrt {
            geometry,
            bytes: Vec::new(),
            clusters: 0,
        };
        t.grow(clusters)?;
        Some(t)
    }

    /// Number of entries.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Bytes needed for `entries` packed entries, rounded up to clusters.
    fn byte_len_for(&self, entries: u64) -> Option<u64> {
        let bits = entries.checked_mul(u64::from(self.geometry.refcount_bits()))?;
        let bytes = bits.div_ceil(8);
        let clusters = self.geometry.clusters_for(bytes).max(1);
        clusters.checked_mul(self.geometry.cluster_size())
    }

    /// Whether [`Imrt::grow`] to `clusters` entries would stay within the
    /// memory bound.
    #[must_use]
    pub fn can_grow(&self, clusters: u64) -> bool {
        clusters <= self.clusters
            || self
                .byte_len_for(clusters)
                .is_some_and(|len| len <= IMRT_BYTES_MAX)
    }

    /// Grows to at least `clusters` entries (never shrinks); `None` past the
    /// memory bound.
    #[must_use]
    pub fn grow(&mut self, clusters: u64) -> Option<()> {
        if clusters <= self.clusters {
            return Some(());
        }
        if !self.can_grow(clusters) {
            return None;
        }
        let len = self.byte_len_for(clusters)?;
        self.bytes.resize(usize::try_from(len).ok()?, 0);
        self.clusters = clusters;
        Some(())
    }

    /// References counted for `cluster` (0 past the end).
    pub fn get(&self, cluster: u64) -> u64 {
        if cluster >= self.clusters {
            return 0;
        }
        get_refcount(&self.bytes, cluster, self.geometry.refcount_order)
    }

    /// Sets the entry of `cluster`, which must be inside the table and
    /// `value` within the refcount width.
    pub fn set(&mut self, cluster: u64, value: u64) {
        assert!(
            cluster < self.clusters,
            "imrt entry {cluster} of {}",
            self.clusters
        );
        assert!(value <= self.geometry.refcount_max());
        set_refcount(
            &mut self.bytes,
            cluster,
            self.geometry.refcount_order,
            value,
        );
    }

    /// The bytes of refcount block `index` as it would be on disk.
    pub fn block(&self, index: u64) -> &[u8] {
        let size = self.geometry.cluster_size() as usize;
        let start = usize::try_from(index).expect("block index fits usize") * size;
        &self.bytes[start..start + size]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_slices_at_the_image_width() {
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: 1,
        };
        let mut t = Imrt::new(g, 3).unwrap();
        assert_eq!(t.bytes.len(), 512, "rounded up to one cluster");
        t.set(1, 2);
        t.set(2, 1);
        assert_eq!(t.block(0)[0], 0b0001_1000);
        assert!(t.grow(2049).is_some());
        assert_eq!(
            t.bytes.len(),
            1024,
            "2049 2-bit entries need a second cluster"
        );
        assert_eq!(t.get(1), 2);
        assert_eq!(t.get(5000), 0);
    }
}
