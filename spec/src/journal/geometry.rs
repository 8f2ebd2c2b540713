//! Where things sit inside a journal region: the header area, then the
//! ring of log blocks. All offsets here are relative to the start of the
//! region (the caller adds the region's base offset on the device).

use super::error::JournalFormatError;

/// Smallest block size order (512 bytes: one sector, the unit a power loss
/// keeps or loses whole in our device model).
pub const BLOCK_SIZE_ORDER_MIN: u32 = 9;
/// Largest block size order (64 KiB: a descriptor's size field is 16 bits,
/// so a descriptor can never need more than one block).
pub const BLOCK_SIZE_ORDER_MAX: u32 = 16;
/// Bytes of one header slot.
pub const HEADER_SLOT_BYTES: u64 = 512;
/// Bytes reserved at the start of the region for the two header slots,
/// before rounding up to whole blocks.
pub const HEADER_AREA_MIN_BYTES: u64 = 2 * HEADER_SLOT_BYTES;
/// The smallest ring that can hold a transaction and its padding.
pub const RING_BLOCKS_MIN: u64 = 4;

const STRUCTURE: &str = "journal geometry";

/// The shape of one journal region: block size and size, and the derived
/// header area and ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalGeometry {
    block_size_order: u32,
    size_bytes: u64,
}

impl JournalGeometry {
    /// Validates a block size order and a region size (errors point at the
    /// header slot fields that carry them).
    pub fn new(block_size_order: u32, size_bytes: u64) -> Result<Self, JournalFormatError> {
        Self::checked(block_size_order, size_bytes, 12, 16)
    }

    pub(crate) fn checked(
        block_size_order: u32,
        size_bytes: u64,
        order_offset: u64,
        size_offset: u64,
    ) -> Result<Self, JournalFormatError> {
        if !(BLOCK_SIZE_ORDER_MIN..=BLOCK_SIZE_ORDER_MAX).contains(&block_size_order) {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "block_size_order",
                order_offset,
                u64::from(block_size_order),
                "must be 9 to 16 (512 B to 64 KiB)",
            ));
        }
        let block_size = 1u64 << block_size_order;
        if !size_bytes.is_multiple_of(block_size) {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "journal_size",
                size_offset,
                size_bytes,
                "not a multiple of the block size",
            ));
        }
        let geometry = Self {
            block_size_order,
            size_bytes,
        };
        let ring_bytes = size_bytes.checked_sub(geometry.header_area_bytes());
        let ring_blocks = ring_bytes.map(|bytes| bytes >> block_size_order);
        match ring_blocks {
            Some(blocks) if blocks < RING_BLOCKS_MIN => Err(JournalFormatError::field(
                STRUCTURE,
                "journal_size",
                size_offset,
                size_bytes,
                "too small: the ring needs at least 4 blocks after the header area",
            )),
            None => Err(JournalFormatError::field(
                STRUCTURE,
                "journal_size",
                size_offset,
                size_bytes,
                "smaller than the header area",
            )),
            Some(blocks) if blocks > u64::from(u32::MAX) => Err(JournalFormatError::field(
                STRUCTURE,
                "journal_size",
                size_offset,
                size_bytes,
                "the ring has more than 2^32-1 blocks",
            )),
            Some(_) => Ok(geometry),
        }
    }

    /// log2 of the block size.
    #[must_use]
    pub const fn block_size_order(&self) -> u32 {
        self.block_size_order
    }

    /// The block size in bytes.
    #[must_use]
    pub const fn block_size(&self) -> u64 {
        1 << self.block_size_order
    }

    /// The whole region in bytes (header area and ring).
    #[must_use]
    pub const fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes before the ring: two 512-byte header slots, rounded up to a
    /// whole block so that ring blocks stay block aligned.
    #[must_use]
    pub const fn header_area_bytes(&self) -> u64 {
        let block = self.block_size();
        if block > HEADER_AREA_MIN_BYTES {
            block
        } else {
            HEADER_AREA_MIN_BYTES
        }
    }

    /// Number of blocks in the ring.
    #[must_use]
    pub const fn ring_blocks(&self) -> u32 {
        // `new` checked that this fits in u32.
        ((self.size_bytes - self.header_area_bytes()) >> self.block_size_order) as u32
    }

    /// Offset (from the region start) of ring block `index`, which the
    /// caller has checked is below [`Self::ring_blocks`].
    #[must_use]
    pub const fn ring_block_offset(&self, index: u32) -> u64 {
        self.header_area_bytes() + ((index as u64) << self.block_size_order)
    }

    /// Offset (from the region start) of header slot 0 or 1.
    #[must_use]
    pub const fn header_slot_offset(slot: usize) -> u64 {
        if slot == 0 {
            0
        } else {
            HEADER_SLOT_BYTES
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blocks_get_two_header_blocks() {
        let g = JournalGeometry::new(9, 512 * 10).unwrap();
        assert_eq!(g.header_area_bytes(), 1024);
        assert_eq!(g.ring_blocks(), 8);
        assert_eq!(g.ring_block_offset(0), 1024);
        let g = JournalGeometry::new(12, 4096 * 10).unwrap();
        assert_eq!(g.header_area_bytes(), 4096);
        assert_eq!(g.ring_blocks(), 9);
        assert_eq!(g.ring_block_offset(8), 4096 * 9);
    }

    #[test]
    fn bad_geometry_names_the_field() {
        let err = JournalGeometry::new(8, 4096).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "block_size_order",
                ..
            }
        ));
        let err = JournalGeometry::new(17, 1 << 20).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "block_size_order",
                ..
            }
        ));
        let err = JournalGeometry::new(12, 4096 * 10 + 512).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "journal_size",
                ..
            }
        ));
        let err = JournalGeometry::new(12, 4096 * 4).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "journal_size",
                ..
            }
        ));
        let err = JournalGeometry::new(9, 512).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "journal_size",
                ..
            }
        ));
    }
}
