//! L1 table entries: pointers to L2 tables.

use crate::units::HostOffset;

/// One raw L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Bit 63: the L2 table's refcount is exactly 1, so it may be written in
    /// place (no snapshot shares it).
    pub const COPIED: u64 = 1 << 63;
    /// Bits 9..=55: the L2 table's host offset.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// Bits 0..=8 and 56..=62: must be zero.
    pub const RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;

    /// No L2 table: the whole range reads from the backing file or as zeros.
    #[must_use]
    pub const fn unallocated() -> Self {
        L1Entry(0)
    }

    /// An entry pointing at the L2 table at `l2` (cluster aligned, below 2^56).
    #[must_use]
    pub fn new(l2: HostOffset, copied: bool) -> Self {
        debug_assert_eq!(l2.0 & !Self::OFFSET_MASK, 0, "L2 offset {l2} not encodable");
        L1Entry((l2.0 & Self::OFFSET_MASK) | if copied { Self::COPIED } else { 0 })
    }

    /// The L2 table's offset, `None` when the entry has none.
    #[must_use]
    pub const fn l2_offset(&self) -> Option<HostOffset> {
        match self.0 & Self::OFFSET_MASK {
            0 => None,
            offset => Some(HostOffset(offset)),
        }
    }

    /// Whether the COPIED flag is set.
    #[must_use]
    pub const fn is_copied(&self) -> bool {
        self.0 & Self::COPIED != 0
    }

    /// The reserved bits that are set (0 in a valid entry).
    #[must_use]
    pub const fn reserved_bits(&self) -> u64 {
        self.0 & Self::RESERVED_MASK
    }
}
