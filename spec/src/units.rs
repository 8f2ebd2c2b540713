//! Newtype offsets and indices, so that guest and host units never mix.
//!
//! qcow2 arithmetic juggles four kinds of numbers that are all `u64`: byte
//! offsets in the guest's disk, byte offsets in the image file, and cluster
//! indices on either side. Confusing them is the classic qcow2 bug (an L2
//! index used as a refcount index, a host offset written where a cluster
//! index belongs). Each kind gets its own type; conversions go through
//! [`Geometry`], which knows the cluster size.

use std::fmt;

macro_rules! unit {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

unit!(
    /// A byte offset in the guest-visible disk.
    GuestOffset
);
unit!(
    /// A byte offset in the image file.
    HostOffset
);
unit!(
    /// The index of a cluster in the image file: host offset / cluster size.
    HostCluster
);
unit!(
    /// The index of a cluster in the guest-visible disk: guest offset / cluster size.
    GuestCluster
);

/// The cluster and refcount geometry of one image: every unit conversion
/// lives here so that shifts and masks are written once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size in bytes (9 to 21).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0 to 6).
    pub refcount_order: u32,
}

impl Geometry {
    /// Smallest cluster size qcow2 allows (512 B).
    pub const CLUSTER_BITS_MIN: u32 = 9;
    /// Largest cluster size qcow2 allows (2 MiB).
    pub const CLUSTER_BITS_MAX: u32 = 21;
    /// Largest refcount order (64-bit refcounts).
    pub const REFCOUNT_ORDER_MAX: u32 = 6;

    /// The cluster size in bytes.
    #[must_use]
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of 8-byte entries in one L2 table (or one refcount table cluster).
    #[must_use]
    pub const fn l2_entries(&self) -> u64 {
        1 << (self.cluster_bits - 3)
    }

    /// Number of refcount entries in one refcount block.
    #[must_use]
    pub const fn refcounts_per_block(&self) -> u64 {
        // cluster_bits + 3 bits per byte - refcount_order bits per entry.
        1 << (self.cluster_bits + 3 - self.refcount_order)
    }

    /// The refcount width in bits.
    #[must_use]
    pub const fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The largest refcount value an entry can hold.
    #[must_use]
    pub const fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << (1u32 << self.refcount_order)) - 1
        }
    }

    /// Bytes of guest space mapped by one L2 table.
    #[must_use]
    pub const fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// The guest cluster holding `offset`.
    #[must_use]
    pub const fn guest_cluster(&self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits)
    }

    /// The host cluster holding `offset`.
    #[must_use]
    pub const fn host_cluster(&self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits)
    }

    /// The first byte of host cluster `cluster`.
    #[must_use]
    pub const fn host_offset(&self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0 << self.cluster_bits)
    }

    /// The first byte of guest cluster `cluster`.
    #[must_use]
    pub const fn guest_offset(&self, cluster: GuestCluster) -> GuestOffset {
        GuestOffset(cluster.0 << self.cluster_bits)
    }

    /// Byte position of a guest offset inside its cluster.
    #[must_use]
    pub const fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Whether a host offset sits on a cluster boundary.
    #[must_use]
    pub const fn is_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }

    /// The L1 index whose L2 table maps guest cluster `cluster`.
    #[must_use]
    pub const fn l1_index(&self, cluster: GuestCluster) -> u64 {
        cluster.0 >> (self.cluster_bits - 3)
    }

    /// The entry index inside its L2 table of guest cluster `cluster`.
    #[must_use]
    pub const fn l2_index(&self, cluster: GuestCluster) -> u64 {
        cluster.0 & (self.l2_entries() - 1)
    }

    /// The refcount table index whose refcount block covers host cluster `cluster`.
    #[must_use]
    pub const fn refcount_table_index(&self, cluster: HostCluster) -> u64 {
        cluster.0 >> (self.cluster_bits + 3 - self.refcount_order)
    }

    /// The entry index of host cluster `cluster` inside its refcount block.
    #[must_use]
    pub const fn refcount_block_index(&self, cluster: HostCluster) -> u64 {
        cluster.0 & (self.refcounts_per_block() - 1)
    }

    /// Number of L1 entries needed to map a guest disk of `virtual_size` bytes.
    #[must_use]
    pub const fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }

    /// Number of clusters needed to hold `bytes` bytes.
    #[must_use]
    pub const fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_default_image() {
        let g = Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.refcounts_per_block(), 32768);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.refcount_max(), 0xffff);
        let c = g.guest_cluster(GuestOffset(3 * (512 << 20) + 5 * 65536 + 7));
        assert_eq!(g.l1_index(c), 3);
        assert_eq!(g.l2_index(c), 5);
        assert_eq!(g.refcount_table_index(HostCluster(32768 * 2 + 9)), 2);
        assert_eq!(g.refcount_block_index(HostCluster(32768 * 2 + 9)), 9);
    }

    #[test]
    fn refcount_max_for_every_order() {
        let want = [1u64, 3, 15, 255, 65535, u32::MAX as u64, u64::MAX];
        for (order, want) in want.iter().enumerate() {
            let g = Geometry {
                cluster_bits: 9,
                refcount_order: order as u32,
            };
            assert_eq!(g.refcount_max(), *want, "order {order}");
        }
    }
}
