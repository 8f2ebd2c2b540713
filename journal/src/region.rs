//! The journal region on its device: header slots and ring blocks,
//! addressed by ring index, with every device error tagged by operation and
//! offset.

use qj_spec::journal::{JournalFormatError, JournalGeometry, JournalHeader};

use crate::error::JournalError;
use crate::Storage;

/// Largest read the scanners issue at once.
pub(crate) const READ_CHUNK_BYTES: u64 = 1 << 20;

/// A journal region: `geometry.size_bytes()` bytes at `base` on `storage`.
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    pub storage: &'a dyn Storage,
    pub base: u64,
    pub geometry: JournalGeometry,
}

impl<'a> Region<'a> {
    /// Reads and decodes both header slots of the region at `base`. Only a
    /// device error is an `Err`; bad slots come back as their decode errors.
    #[allow(clippy::type_complexity)]
    pub fn read_slots(
        storage: &dyn Storage,
        base: u64,
    ) -> Result<[Result<JournalHeader, JournalFormatError>; 2], JournalError> {
        let mut slots = [0u8; 1024];
        storage
            .read_at(&mut slots, base)
            .map_err(|e| JournalError::io("read", base, e))?;
        Ok([
            JournalHeader::decode(&slots[..512]),
            JournalHeader::decode(&slots[512..]),
        ])
    }

    /// Device offset of ring block `index`.
    pub fn block_offset(&self, index: u32) -> u64 {
        debug_assert!(index < self.geometry.ring_blocks());
        self.base + self.geometry.ring_block_offset(index)
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.geometry.block_size() as usize
    }

    /// Reads whole blocks starting at ring block `index`; the caller keeps
    /// the read inside the ring.
    pub fn read_blocks(&self, index: u32, buf: &mut [u8]) -> Result<(), JournalError> {
        let blocks = (buf.len() / self.block_size()) as u64;
        assert!(
            u64::from(index) + blocks <= u64::from(self.geometry.ring_blocks()),
            "read of {blocks} blocks at {index} leaves the ring"
        );
        let offset = self.block_offset(index);
        self.storage
            .read_at(buf, offset)
            .map_err(|e| JournalError::io("read", offset, e))
    }

    /// Writes whole blocks starting at ring block `index`, inside the ring.
    pub fn write_blocks(&self, index: u32, bytes: &[u8]) -> Result<(), JournalError> {
        let blocks = (bytes.len() / self.block_size()) as u64;
        assert!(
            bytes.len().is_multiple_of(self.block_size()),
            "partial block write"
        );
        assert!(
            u64::from(index) + blocks <= u64::from(self.geometry.ring_blocks()),
            "write of {blocks} blocks at {index} leaves the ring"
        );
        let offset = self.block_offset(index);
        self.storage
            .write_at(bytes, offset)
            .map_err(|e| JournalError::io("write", offset, e))
    }

    /// Writes `header` to its slot (`generation % 2`). One 512-byte,
    /// sector-aligned write: a crash keeps or loses it whole in our device
    /// model, and even a torn slot only fails its CRC and leaves the other,
    /// older slot in charge.
    pub fn write_header(&self, header: &JournalHeader) -> Result<(), JournalError> {
        let offset = self.base + JournalGeometry::header_slot_offset(header.slot());
        self.storage
            .write_at(&header.encode(), offset)
            .map_err(|e| JournalError::io("write", offset, e))
    }

    /// Flushes the device.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.storage
            .flush()
            .map_err(|e| JournalError::io("flush", 0, e))
    }
}
