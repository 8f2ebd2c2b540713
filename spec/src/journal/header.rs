//! The journal header: two 512-byte slots at the start of the region.
//!
//! Layout of one slot (all integers big-endian):
//!
//! | bytes   | field                  |
//! |---------|------------------------|
//! | 0-7     | magic "qjournal"       |
//! | 8-11    | version (1)            |
//! | 12-15   | block_size_order       |
//! | 16-23   | journal_size (bytes)   |
//! | 24-31   | journal_id             |
//! | 32-39   | generation             |
//! | 40-47   | synced_seq             |
//! | 48-51   | tail_block             |
//! | 52-55   | incompatible_features  |
//! | 56-507  | reserved (zero)        |
//! | 508-511 | CRC32C of bytes 0-507  |
//!
//! A header update writes the slot `generation % 2`, which never holds the
//! newest sealed header, flushes, then writes the same content with the
//! next generation to the other slot (the mirror): a torn update leaves
//! the previous header in charge, and once the mirror is written both
//! slots describe the same journal, so one damaged slot loses nothing.
//!
//! A reader takes the newest *sealed* slot (magic and checksum hold) and
//! then validates its fields; a sealed slot with an unknown version,
//! unknown feature bits or non-zero reserved bytes refuses the journal.
//! It never falls back to the older slot for that: the newer slot may
//! describe a log the older one cannot find.

use super::bytes::{be_u32, be_u64, put_u32, put_u64, slice};
use super::checksum::crc32c;
use super::error::JournalFormatError;
use super::geometry::{JournalGeometry, HEADER_SLOT_BYTES};

/// "qjournal" in ASCII.
pub const HEADER_MAGIC: u64 = u64::from_be_bytes(*b"qjournal");
/// The only version this code writes and reads.
pub const HEADER_VERSION: u32 = 1;
/// Byte offset of the slot checksum.
pub const HEADER_CRC_OFFSET: usize = 508;
/// Byte offset of the first reserved byte (reserved up to the checksum).
pub const HEADER_RESERVED_OFFSET: usize = 56;

const STRUCTURE: &str = "journal header";

/// The decoded content of one header slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Block size and region size.
    pub geometry: JournalGeometry,
    /// Random, non-zero; salts every log block checksum. Changes at every
    /// read-write open, which kills every block written before.
    pub journal_id: u64,
    /// Counts header writes; the slot written is `generation % 2`, the
    /// reader takes the valid slot with the larger generation.
    pub generation: u64,
    /// Every transaction with a sequence number up to this one has been
    /// applied to its targets and those writes are durable.
    pub synced_seq: u64,
    /// Ring index where the log starts: transaction `synced_seq + 1` (or a
    /// padding block announcing it) is here, if it exists.
    pub tail_block: u32,
}

impl JournalHeader {
    /// The slot this header is written to.
    #[must_use]
    pub const fn slot(&self) -> usize {
        (self.generation % 2) as usize
    }

    /// Encodes one slot.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_SLOT_BYTES as usize] {
        let mut slot = [0u8; HEADER_SLOT_BYTES as usize];
        put_u64(&mut slot, 0, HEADER_MAGIC);
        put_u32(&mut slot, 8, HEADER_VERSION);
        put_u32(&mut slot, 12, self.geometry.block_size_order());
        put_u64(&mut slot, 16, self.geometry.size_bytes());
        put_u64(&mut slot, 24, self.journal_id);
        put_u64(&mut slot, 32, self.generation);
        put_u64(&mut slot, 40, self.synced_seq);
        put_u32(&mut slot, 48, self.tail_block);
        put_u32(&mut slot, 52, 0);
        let crc = crc32c(&slot[..HEADER_CRC_OFFSET]);
        put_u32(&mut slot, HEADER_CRC_OFFSET, crc);
        slot
    }

    /// Checks that one slot is sealed (its magic and checksum hold) and
    /// returns its generation; says nothing about its other fields.
    pub fn unseal(bytes: &[u8]) -> Result<u64, JournalFormatError> {
        let slot = slice(bytes, 0, HEADER_SLOT_BYTES as usize, STRUCTURE)?;
        let magic = be_u64(slot, 0, STRUCTURE)?;
        if magic != HEADER_MAGIC {
            return Err(JournalFormatError::BadMagic {
                structure: STRUCTURE,
                offset: 0,
                found: magic,
                expected: HEADER_MAGIC,
            });
        }
        let stored = be_u32(slot, HEADER_CRC_OFFSET, STRUCTURE)?;
        let computed = crc32c(slice(slot, 0, HEADER_CRC_OFFSET, STRUCTURE)?);
        if stored != computed {
            return Err(JournalFormatError::BadChecksum {
                structure: STRUCTURE,
                offset: HEADER_CRC_OFFSET as u64,
                stored,
                computed,
            });
        }
        be_u64(slot, 32, STRUCTURE)
    }

    /// Decodes and validates one slot: sealed (see [`JournalHeader::unseal`])
    /// and every field known and in range, reserved bytes zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, JournalFormatError> {
        let generation = Self::unseal(bytes)?;
        let slot = slice(bytes, 0, HEADER_SLOT_BYTES as usize, STRUCTURE)?;
        let version = be_u32(slot, 8, STRUCTURE)?;
        if version != HEADER_VERSION {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "version",
                8,
                u64::from(version),
                "unsupported version (this implementation reads version 1)",
            ));
        }
        let incompatible = be_u32(slot, 52, STRUCTURE)?;
        if incompatible != 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "incompatible_features",
                52,
                u64::from(incompatible),
                "unknown incompatible journal features",
            ));
        }
        if let Some(at) = (HEADER_RESERVED_OFFSET..HEADER_CRC_OFFSET).find(|at| slot[*at] != 0) {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "reserved",
                at as u64,
                u64::from(slot[at]),
                "reserved bytes must be zero",
            ));
        }
        let geometry = JournalGeometry::checked(
            be_u32(slot, 12, STRUCTURE)?,
            be_u64(slot, 16, STRUCTURE)?,
            12,
            16,
        )?;
        let journal_id = be_u64(slot, 24, STRUCTURE)?;
        if journal_id == 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "journal_id",
                24,
                0,
                "must not be zero",
            ));
        }
        let tail_block = be_u32(slot, 48, STRUCTURE)?;
        if tail_block >= geometry.ring_blocks() {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "tail_block",
                48,
                u64::from(tail_block),
                "not below the number of ring blocks",
            ));
        }
        Ok(Self {
            geometry,
            journal_id,
            generation,
            synced_seq: be_u64(slot, 40, STRUCTURE)?,
            tail_block,
        })
    }

    /// Picks the slot in charge: the sealed one (see
    /// [`JournalHeader::unseal`]) with the larger generation, slot 0 on a
    /// tie. Its fields are not looked at: the caller decodes it with
    /// [`JournalHeader::decode`] and refuses the journal if that fails,
    /// rather than falling back to the older slot. Fails only if neither
    /// slot is sealed, returning both errors (boxed: they are large and
    /// this is the rare path).
    pub fn newest_sealed(
        slot0: &[u8],
        slot1: &[u8],
    ) -> Result<usize, Box<(JournalFormatError, JournalFormatError)>> {
        match (Self::unseal(slot0), Self::unseal(slot1)) {
            (Ok(a), Ok(b)) => Ok(usize::from(b > a)),
            (Ok(_), Err(_)) => Ok(0),
            (Err(_), Ok(_)) => Ok(1),
            (Err(a), Err(b)) => Err(Box::new((a, b))),
        }
    }

    /// The same header as the mirror written after it: the next
    /// generation, so the other slot.
    #[must_use]
    pub const fn mirror(&self) -> Self {
        Self {
            generation: self.generation + 1,
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JournalHeader {
        JournalHeader {
            geometry: JournalGeometry::new(12, 4096 * 16).unwrap(),
            journal_id: 0x0123_4567_89ab_cdef,
            generation: 5,
            synced_seq: 41,
            tail_block: 3,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(JournalHeader::decode(&h.encode()), Ok(h));
        assert_eq!(h.slot(), 1);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes;
            b[i] ^= 0x01;
            assert!(JournalHeader::decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let reseal = |mut b: [u8; 512]| {
            let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
            b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_be_bytes());
            b
        };
        let mut b = sample().encode();
        b[15] = 20;
        let err = JournalHeader::decode(&reseal(b)).unwrap_err();
        assert!(
            matches!(
                err,
                JournalFormatError::Field {
                    field: "block_size_order",
                    offset: 12,
                    ..
                }
            ),
            "{err}"
        );
        let mut b = sample().encode();
        b[23] = 1;
        let err = JournalHeader::decode(&reseal(b)).unwrap_err();
        assert!(
            matches!(
                err,
                JournalFormatError::Field {
                    field: "journal_size",
                    offset: 16,
                    ..
                }
            ),
            "{err}"
        );
        let mut b = sample().encode();
        b[48..52].copy_from_slice(&100u32.to_be_bytes());
        let err = JournalHeader::decode(&reseal(b)).unwrap_err();
        assert!(
            matches!(
                err,
                JournalFormatError::Field {
                    field: "tail_block",
                    offset: 48,
                    ..
                }
            ),
            "{err}"
        );
        let mut b = sample().encode();
        b[0] = b'x';
        let err = JournalHeader::decode(&b).unwrap_err();
        assert!(
            matches!(err, JournalFormatError::BadMagic { offset: 0, .. }),
            "{err}"
        );
        assert!(JournalHeader::decode(&b[..100]).is_err());
    }

    #[test]
    fn newest_sealed_slot_is_in_charge_even_with_unknown_fields() {
        let reseal = |mut b: [u8; 512]| {
            let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
            b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_be_bytes());
            b
        };
        let old = sample();
        let new = old.mirror();
        assert_eq!(new.generation, 6);
        assert_eq!(new.slot(), 1 - old.slot());
        let (old_bytes, new_bytes) = (old.encode(), new.encode());
        assert_eq!(JournalHeader::newest_sealed(&old_bytes, &new_bytes), Ok(1));
        assert_eq!(JournalHeader::newest_sealed(&new_bytes, &old_bytes), Ok(0));
        let mut torn = new_bytes;
        torn[100] ^= 1;
        assert_eq!(JournalHeader::newest_sealed(&torn, &old_bytes), Ok(1));
        assert!(JournalHeader::newest_sealed(&torn, &torn).is_err());
        // A newer slot with an unknown feature bit stays in charge, and
        // decoding it refuses the journal.
        let mut future = new_bytes;
        future[55] = 1;
        let future = reseal(future);
        assert_eq!(JournalHeader::newest_sealed(&old_bytes, &future), Ok(1));
        assert!(matches!(
            JournalHeader::decode(&future),
            Err(JournalFormatError::Field {
                field: "incompatible_features",
                ..
            })
        ));
    }

    #[test]
    fn non_zero_reserved_bytes_behind_a_good_checksum_are_refused() {
        let mut b = sample().encode();
        b[300] = 7;
        let crc = crc32c(&b[..HEADER_CRC_OFFSET]);
        b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(JournalHeader::unseal(&b), Ok(5));
        assert!(matches!(
            JournalHeader::decode(&b),
            Err(JournalFormatError::Field {
                field: "reserved",
                offset: 300,
                value: 7,
                ..
            })
        ));
    }
}
