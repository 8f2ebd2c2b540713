//! The 32-byte header every log block written by the journal starts with
//! (descriptor, commit and padding blocks; data blocks have none), and the
//! padding block, which is nothing but that header.
//!
//! | bytes | field                                                   |
//! |-------|---------------------------------------------------------|
//! | 0-3   | magic "qjbk"                                            |
//! | 4-5   | block_type: 1 descriptor, 2 commit, 3 padding           |
//! | 6-7   | reserved (zero)                                         |
//! | 8-15  | sequence number of the transaction                      |
//! | 16-19 | index of the block inside its transaction               |
//! | 20-23 | used_bytes: descriptor bytes in this block (else 0)     |
//! | 24-27 | reserved (zero)                                         |
//! | 28-31 | CRC32C salted with (journal_id, sequence), field as 0   |

use super::bytes::{be_u16, be_u32, be_u64, put_u16, put_u32, put_u64, reserved_zero, slice};
use super::checksum::block_checksum;
use super::error::JournalFormatError;

/// "qjbk" in ASCII. A data block never starts with it on disk (it is
/// escaped, see [`super::Descriptor::Escape`]).
pub const BLOCK_MAGIC: u32 = u32::from_be_bytes(*b"qjbk");
/// Bytes of the common block header.
pub const BLOCK_HEADER_BYTES: usize = 32;
/// Byte offset of the block checksum.
pub const BLOCK_CRC_OFFSET: usize = 28;

const STRUCTURE: &str = "journal block header";

/// What a log block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// Holds descriptors; block 0 of a transaction also holds its header.
    Descriptor,
    /// Closes a transaction with the checksum over all its other blocks.
    Commit,
    /// Says the rest of the ring is unused: the transaction with this
    /// block's sequence number starts at ring block 0.
    Padding,
}

impl BlockType {
    /// The on-disk code.
    #[must_use]
    pub const fn code(self) -> u16 {
        match self {
            Self::Descriptor => 1,
            Self::Commit => 2,
            Self::Padding => 3,
        }
    }

    /// Parses the on-disk code.
    #[must_use]
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(Self::Descriptor),
            2 => Some(Self::Commit),
            3 => Some(Self::Padding),
            _ => None,
        }
    }
}

/// The decoded common header of a log block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// What the block is.
    pub block_type: BlockType,
    /// The transaction it belongs to (for padding: the one that follows).
    pub seq: u64,
    /// Its index inside the transaction (0 for padding).
    pub index: u32,
    /// Descriptor bytes stored in this block (0 for other types).
    pub used_bytes: u32,
}

impl BlockHeader {
    /// Writes the header into the first 32 bytes of `block`, checksum field
    /// zero; [`seal_block`] fills it once the rest of the block is final.
    pub fn encode_into(&self, block: &mut [u8]) {
        put_u32(block, 0, BLOCK_MAGIC);
        put_u16(block, 4, self.block_type.code());
        put_u16(block, 6, 0);
        put_u64(block, 8, self.seq);
        put_u32(block, 16, self.index);
        put_u32(block, 20, self.used_bytes);
        put_u32(block, 24, 0);
        put_u32(block, BLOCK_CRC_OFFSET, 0);
    }

    /// Verifies magic and salted checksum of a whole block, then decodes
    /// its header. Integrity failures (magic, checksum) come first so that a
    /// stale or torn block is never judged on its other fields.
    pub fn decode(block: &[u8], journal_id: u64) -> Result<Self, JournalFormatError> {
        let _ = slice(block, 0, BLOCK_HEADER_BYTES, STRUCTURE)?;
        let magic = be_u32(block, 0, STRUCTURE)?;
        if magic != BLOCK_MAGIC {
            return Err(JournalFormatError::BadMagic {
                structure: STRUCTURE,
                offset: 0,
                found: u64::from(magic),
                expected: u64::from(BLOCK_MAGIC),
            });
        }
        let seq = be_u64(block, 8, STRUCTURE)?;
        let stored = be_u32(block, BLOCK_CRC_OFFSET, STRUCTURE)?;
        let computed = block_checksum(journal_id, seq, block, BLOCK_CRC_OFFSET);
        if stored != computed {
            return Err(JournalFormatError::BadChecksum {
                structure: STRUCTURE,
                offset: BLOCK_CRC_OFFSET as u64,
                stored,
                computed,
            });
        }
        let code = be_u16(block, 4, STRUCTURE)?;
        let block_type = BlockType::from_code(code).ok_or_else(|| {
            JournalFormatError::field(
                STRUCTURE,
                "block_type",
                4,
                u64::from(code),
                "unknown block type",
            )
        })?;
        let reserved_low = be_u16(block, 6, STRUCTURE)?;
        if reserved_low != 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "reserved",
                6,
                u64::from(reserved_low),
                "must be zero",
            ));
        }
        let reserved_high = be_u32(block, 24, STRUCTURE)?;
        if reserved_high != 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "reserved",
                24,
                u64::from(reserved_high),
                "must be zero",
            ));
        }
        let header = Self {
            block_type,
            seq,
            index: be_u32(block, 16, STRUCTURE)?,
            used_bytes: be_u32(block, 20, STRUCTURE)?,
        };
        if block_type != BlockType::Descriptor && header.used_bytes != 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "used_bytes",
                20,
                u64::from(header.used_bytes),
                "must be zero outside descriptor blocks",
            ));
        }
        if block_type == BlockType::Padding {
            // A padding block is nothing but its header.
            reserved_zero(block, BLOCK_HEADER_BYTES, 0, STRUCTURE)?;
        }
        Ok(header)
    }
}

/// Fills the checksum field of a finished block (its header already holds
/// the sequence number that salts it).
pub fn seal_block(block: &mut [u8], journal_id: u64) {
    let seq = u64::from_be_bytes(block[8..16].try_into().unwrap_or([0; 8]));
    let crc = block_checksum(journal_id, seq, block, BLOCK_CRC_OFFSET);
    put_u32(block, BLOCK_CRC_OFFSET, crc);
}

/// A sealed padding block announcing that transaction `seq` starts at ring
/// block 0.
#[must_use]
pub fn encode_padding(block_size: usize, journal_id: u64, seq: u64) -> Vec<u8> {
    assert!(
        block_size >= BLOCK_HEADER_BYTES,
        "block size below the block header"
    );
    let mut block = vec![0u8; block_size];
    BlockHeader {
        block_type: BlockType::Padding,
        seq,
        index: 0,
        used_bytes: 0,
    }
    .encode_into(&mut block);
    seal_block(&mut block, journal_id);
    block
}

/// Whether a block starts with the log block magic (a fast filter only;
/// [`BlockHeader::decode`] is the real test).
#[must_use]
pub fn starts_with_magic(block: &[u8]) -> bool {
    block.get(..4) == Some(&BLOCK_MAGIC.to_be_bytes()[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trip_and_salt() {
        let block = encode_padding(512, 77, 9);
        let header = BlockHeader::decode(&block, 77).unwrap();
        assert_eq!(header.block_type, BlockType::Padding);
        assert_eq!(header.seq, 9);
        assert!(matches!(
            BlockHeader::decode(&block, 78),
            Err(JournalFormatError::BadChecksum { offset: 28, .. })
        ));
        let mut torn = block.clone();
        torn[300] = 1;
        assert!(BlockHeader::decode(&torn, 77).unwrap_err().is_integrity());
        assert!(matches!(
            BlockHeader::decode(&[0u8; 512], 77),
            Err(JournalFormatError::BadMagic { .. })
        ));
        assert!(BlockHeader::decode(&block[..10], 77).is_err());
    }

    #[test]
    fn non_zero_reserved_bytes_behind_a_good_checksum_are_structural() {
        // (flipped byte, offset of the field the error names)
        for (at, field_at) in [
            (6, 6),
            (7, 6),
            (24, 24),
            (27, 24),
            (32, 32),
            (300, 300),
            (511, 511),
        ] {
            let mut block = encode_padding(512, 5, 1);
            block[at] = 1;
            seal_block(&mut block, 5);
            let err = BlockHeader::decode(&block, 5).unwrap_err();
            assert!(!err.is_integrity(), "byte {at}: {err}");
            assert_eq!(err.offset(), Some(field_at), "byte {at}: {err}");
            assert!(
                matches!(
                    err,
                    JournalFormatError::Field {
                        field: "reserved",
                        ..
                    }
                ),
                "byte {at}: {err}"
            );
        }
    }

    #[test]
    fn unknown_type_behind_a_good_checksum_is_structural() {
        let mut block = encode_padding(512, 5, 1);
        block[5] = 9;
        seal_block(&mut block, 5);
        let err = BlockHeader::decode(&block, 5).unwrap_err();
        assert!(!err.is_integrity());
        assert!(matches!(
            err,
            JournalFormatError::Field {
                field: "block_type",
                offset: 4,
                ..
            }
        ));
    }
}
