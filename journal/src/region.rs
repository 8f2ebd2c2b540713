//! The journal region on its device: header slots and ring blocks,
//! addressed by ring index, with every device error tagged by operation and
//! offset.

use qj_spec::journal::{JournalGeometry, JournalHeader};

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
    /// Reads both header slots of the region at `base`, as stored.
    pub fn read_slots(storage: &dyn Storage, base: u64) -> Result<[u8; 1024], JournalError> {
        let mut slots = [0u8; 1024];
        storage
            .read_at(&mut slots, base)
            .map_err(|e| JournalError::io("read", base, e))?;
        Ok(slots)
    }

    /// The header in charge of the region at `base`: the newest sealed
    /// slot, decoded. A sealed slot whose fields fail (unknown version or
    /// feature bits, reserved bytes, out of range) refuses the journal
    /// instead of letting the older slot take over: the older slot may
    /// describe a log that no longer exists (spec 4.2).
    pub fn current_header(storage: &dyn Storage, base: u64) -> Result<JournalHeader, JournalError> {
        let slots = Self::read_slots(storage, base)?;
        let (slot0, slot1) = slots.split_at(512);
        let slot = JournalHeader::newest_sealed(slot0, slot1).map_err(|errors| {
            let (slot0, slot1) = *errors;
            JournalError::NoValidHeader {
                device_offset: base,
                slot0: Box::new(slot0),
                slot1: Box::new(slot1),
            }
        })?;
        let bytes = if slot == 0 { slot0 } else { slot1 };
        JournalHeader::decode(bytes).map_err(|source| JournalError::RefusedHeader {
            slot,
            device_offset: base + JournalGeometry::header_slot_offset(slot),
            source,
        })
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

    /// Makes `header` the current header: writes it to its slot
    /// (`generation % 2`), flushes, then writes its mirror (the same
    /// content, next generation) to the other slot. Returns the mirror's
    /// generation, the one the next update must follow.
    ///
    /// Each slot write is one 512-byte, sector-aligned write: a crash keeps
    /// or loses it whole in our device model, and even a torn slot only
    /// fails its CRC. Before the flush the previous header is in charge;
    /// after it `header` is, whatever became of the mirror. The mirror
    /// needs no flush of its own: the next flush of anything (the commit
    /// that reuses ring space, or the flush every header update starts
    /// with) makes it durable, so a transaction that depends on this header
    /// is never acknowledged while the other slot still describes an older
    /// state. Precondition: the device was flushed after the previous
    /// mirror was written, so that slot is durable before it is
    /// overwritten.
    pub fn publish_header(&self, header: &JournalHeader) -> Result<u64, JournalError> {
        self.write_slot(header)?;
        // Ordering: the new header must be durable before anything relies
        // on it (see each caller), and before its mirror overwrites the
        // other slot, the previous header's only copy.
        self.flush()?;
        let mirror = header.mirror();
        self.write_slot(&mirror)?;
        Ok(mirror.generation)
    }

    /// Writes `header` to its slot (`generation % 2`).
    pub fn write_slot(&self, header: &JournalHeader) -> Result<(), JournalError> {
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
