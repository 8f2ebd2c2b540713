//! L2 table entries (standard 64-bit entries; extended L2 is unsupported).

use crate::units::HostOffset;

/// Bit 63: refcount is exactly 1 (writable in place). Never set on
/// compressed entries.
pub const L2_COPIED: u64 = 1 << 63;
/// Bit 62: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard entry: the cluster reads as zeros.
pub const L2_ZERO: u64 = 1;
/// Bits 9..=55 of a standard entry: the host offset.
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard entry: 1..=8 and 56..=61.
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Compressed data is addressed in 512-byte sectors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// One decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Raw 0 (reserved or COPIED bits without an offset are dropped):
    /// reads from the backing file, or as zeros.
    Unallocated,
    /// Bit 0 set: reads as zeros; may keep a preallocated host cluster.
    Zero {
        /// The preallocated cluster, if any.
        preallocated: Option<HostOffset>,
        /// The COPIED flag.
        copied: bool,
    },
    /// Data at `offset` (which a valid image keeps cluster aligned; check
    /// reports misaligned ones).
    Normal {
        /// The host offset of the data cluster.
        offset: HostOffset,
        /// The COPIED flag.
        copied: bool,
    },
    /// Bit 62: compressed data starting at `host_offset` (any byte), at most
    /// `compressed_size_max` bytes long.
    Compressed {
        /// Host byte offset of the compressed data.
        host_offset: u64,
        /// Bytes from `host_offset` to the end of its last 512-byte sector.
        compressed_size_max: u64,
    },
}

/// Bit position of the sector count in a compressed entry (QEMU's csize_shift).
const fn compressed_size_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// Mask of the sector count field after shifting (QEMU's csize_mask).
const fn compressed_size_mask(cluster_bits: u32) -> u64 {
    (1 << (cluster_bits - 8)) - 1
}

impl L2Entry {
    /// Decodes a raw entry of an image with `cluster_bits` (9..=21), the
    /// same way as QEMU's qcow2_get_cluster_type without subclusters.
    #[must_use]
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        debug_assert!((9..=21).contains(&cluster_bits));
        if raw & L2_COMPRESSED != 0 {
            let shift = compressed_size_shift(cluster_bits);
            let host_offset = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & compressed_size_mask(cluster_bits)) + 1;
            L2Entry::Compressed {
                host_offset,
                compressed_size_max: sectors * COMPRESSED_SECTOR_SIZE
                    - (host_offset & (COMPRESSED_SECTOR_SIZE - 1)),
            }
        } else {
            let copied = raw & L2_COPIED != 0;
            let offset = raw & L2_OFFSET_MASK;
            if raw & L2_ZERO != 0 {
                L2Entry::Zero {
                    preallocated: (offset != 0).then_some(HostOffset(offset)),
                    copied,
                }
            } else if offset == 0 {
                L2Entry::Unallocated
            } else {
                L2Entry::Normal {
                    offset: HostOffset(offset),
                    copied,
                }
            }
        }
    }

    /// The raw entry. A compressed entry's size is rounded up to whole
    /// sectors, as the format stores it; sizes beyond what the sector count
    /// field holds are clamped (a caller bug, asserted in debug builds).
    #[must_use]
    pub fn encode(&self, cluster_bits: u32) -> u64 {
        debug_assert!((9..=21).contains(&cluster_bits));
        let copied_bit = |copied: bool| if copied { L2_COPIED } else { 0 };
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero {
                preallocated,
                copied,
            } => L2_ZERO | preallocated.map_or(0, |o| o.0 & L2_OFFSET_MASK) | copied_bit(copied),
            L2Entry::Normal { offset, copied } => (offset.0 & L2_OFFSET_MASK) | copied_bit(copied),
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                let shift = compressed_size_shift(cluster_bits);
                debug_assert_eq!(host_offset >> shift, 0, "compressed offset too large");
                let end = (host_offset & (COMPRESSED_SECTOR_SIZE - 1)) + compressed_size_max;
                let sectors = end.div_ceil(COMPRESSED_SECTOR_SIZE).max(1);
                debug_assert!(sectors - 1 <= compressed_size_mask(cluster_bits));
                let field = (sectors - 1).min(compressed_size_mask(cluster_bits));
                L2_COMPRESSED | (field << shift) | (host_offset & ((1u64 << shift) - 1))
            }
        }
    }

    /// The reserved bits set in a raw entry: bits 1..=8 and 56..=61 of a
    /// standard entry; a compressed entry has none (its COPIED bit is
    /// checked separately).
    #[must_use]
    pub fn reserved_bits(raw: u64, cluster_bits: u32) -> u64 {
        debug_assert!((9..=21).contains(&cluster_bits));
        if raw & L2_COMPRESSED != 0 {
            0
        } else {
            raw & L2_STD_RESERVED_MASK
        }
    }

    /// The host cluster this entry keeps allocated (normal or preallocated
    /// zero), if any.
    #[must_use]
    pub fn allocated_offset(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Normal { offset, .. } => Some(offset),
            L2Entry::Zero { preallocated, .. } => preallocated,
            L2Entry::Unallocated | L2Entry::Compressed { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_entries_written_by_qemu_img_convert_c() {
        // Two adjacent compressed clusters of a 64 KiB-cluster image.
        let first = L2Entry::decode(0x4500_0000_0005_0000, 16);
        assert_eq!(
            first,
            L2Entry::Compressed {
                host_offset: 0x50000,
                compressed_size_max: 21 * 512
            }
        );
        let second = L2Entry::decode(0x4500_0000_0005_28ec, 16);
        assert_eq!(
            second,
            L2Entry::Compressed {
                host_offset: 0x528ec,
                compressed_size_max: 21 * 512 - 0xec
            }
        );
        assert_eq!(first.encode(16), 0x4500_0000_0005_0000);
        assert_eq!(second.encode(16), 0x4500_0000_0005_28ec);
    }

    #[test]
    fn standard_entries() {
        let raw = L2_COPIED | 0x50000;
        assert_eq!(
            L2Entry::decode(raw, 16),
            L2Entry::Normal {
                offset: HostOffset(0x50000),
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, 16),
            L2Entry::Zero {
                preallocated: None,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(L2_COPIED | 0x60000 | 1, 16).allocated_offset(),
            Some(HostOffset(0x60000))
        );
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::reserved_bits(0x8100_0000_0005_0000, 16),
            0x0100_0000_0000_0000
        );
        assert_eq!(L2Entry::reserved_bits(0x50002, 16), 2);
        assert_eq!(
            L2Entry::reserved_bits(L2_COMPRESSED | 0x3f00_0000_0000_01fe, 16),
            0
        );
    }
}
