//! A whole transaction as it sits in the ring: descriptor blocks, data
//! blocks, commit block, contiguous (a transaction never wraps).
//!
//! Block 0 (a descriptor block) carries the transaction header after the
//! common 32-byte block header:
//!
//! | bytes | field                                                     |
//! |-------|-----------------------------------------------------------|
//! | 32-35 | descriptor_blocks (d, at least 1)                         |
//! | 36-39 | data_blocks (n)                                           |
//! | 40-47 | durable_seq: every transaction up to this one was durably |
//! |       | committed before this transaction was written             |
//! | 48-   | descriptors                                               |
//!
//! Descriptor blocks 1..d carry descriptors from byte 32. Then come n data
//! blocks (the data area) and, at index d + n, the commit block:
//!
//! | bytes | field                                                     |
//! |-------|-----------------------------------------------------------|
//! | 32-35 | descriptor_blocks (d)                                     |
//! | 36-39 | data_blocks (n)                                           |
//! | 40-43 | transaction checksum: CRC32C salted with (journal_id,     |
//! |       | seq) over blocks 0..d+n exactly as stored                 |
//! | 44-47 | reserved (zero)                                           |

use super::block::{
    seal_block, starts_with_magic, BlockHeader, BlockType, BLOCK_HEADER_BYTES, BLOCK_MAGIC,
};
use super::bounds::TargetBounds;
use super::bytes::{be_u32, be_u64, put_u32, put_u64, reserved_zero, slice};
use super::checksum::{salt, salted_append};
use super::descriptor::{decode_descriptor_area, Descriptor};
use super::error::JournalFormatError;

/// Byte offset of the first descriptor in block 0.
pub const FIRST_BLOCK_DESCRIPTORS_OFFSET: usize = 48;
/// Byte offset of the commit block's reserved bytes (zero to its end).
pub const COMMIT_RESERVED_OFFSET: usize = 44;
/// Byte offset of the first descriptor in continuation blocks.
pub const NEXT_BLOCK_DESCRIPTORS_OFFSET: usize = BLOCK_HEADER_BYTES;

const STRUCTURE: &str = "journal transaction";

/// The header of a transaction, from its block 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransactionHeader {
    /// Sequence number.
    pub seq: u64,
    /// Number of descriptor blocks (at least 1).
    pub descriptor_blocks: u32,
    /// Number of data blocks.
    pub data_blocks: u32,
    /// Highest sequence number known durably committed when this
    /// transaction was written; always below `seq`.
    pub durable_seq: u64,
}

impl TransactionHeader {
    /// Blocks the transaction occupies, commit block included.
    #[must_use]
    pub fn total_blocks(&self) -> u64 {
        u64::from(self.descriptor_blocks) + u64::from(self.data_blocks) + 1
    }

    /// Verifies block 0 of a transaction (magic, salted checksum, type,
    /// index) and decodes its header. Does not look at the other blocks.
    pub fn decode(block0: &[u8], journal_id: u64) -> Result<Self, JournalFormatError> {
        let block = BlockHeader::decode(block0, journal_id)?;
        if block.block_type != BlockType::Descriptor {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "block_type",
                4,
                u64::from(block.block_type.code()),
                "a transaction starts with a descriptor block",
            ));
        }
        if block.index != 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "block_index",
                16,
                u64::from(block.index),
                "a transaction starts with descriptor block 0",
            ));
        }
        let header = Self {
            seq: block.seq,
            descriptor_blocks: be_u32(block0, 32, STRUCTURE)?,
            data_blocks: be_u32(block0, 36, STRUCTURE)?,
            durable_seq: be_u64(block0, 40, STRUCTURE)?,
        };
        if header.descriptor_blocks == 0 {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "descriptor_blocks",
                32,
                0,
                "must be at least 1",
            ));
        }
        if header.durable_seq >= header.seq {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "durable_seq",
                40,
                header.durable_seq,
                "must be below the transaction's sequence number",
            ));
        }
        Ok(header)
    }
}

/// What the encoder needs besides the operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransactionParams {
    /// The journal id salting every checksum.
    pub journal_id: u64,
    /// The transaction's sequence number.
    pub seq: u64,
    /// See [`TransactionHeader::durable_seq`].
    pub durable_seq: u64,
    /// Block size in bytes.
    pub block_size: usize,
}

/// A transaction encoded into whole blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTransaction {
    /// Its header.
    pub header: TransactionHeader,
    /// All blocks, the commit block last.
    pub bytes: Vec<u8>,
    block_size: usize,
}

impl EncodedTransaction {
    /// Every block but the commit block (what the two-flush protocol writes
    /// before its first flush).
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.bytes[..self.bytes.len() - self.block_size]
    }

    /// The commit block.
    #[must_use]
    pub fn commit_block(&self) -> &[u8] {
        &self.bytes[self.bytes.len() - self.block_size..]
    }

    /// Blocks the transaction occupies.
    #[must_use]
    pub fn total_blocks(&self) -> u64 {
        self.header.total_blocks()
    }
}

/// Number of blocks `descriptors` and `data_bytes` of data would take,
/// commit block included, without encoding (for space checks).
#[must_use]
pub fn blocks_needed(block_size: usize, descriptors: &[Descriptor], data_bytes: usize) -> u64 {
    // Escapes are unknown until the data is seen; count the worst case of
    // one 4-byte entry per data block.
    let data_blocks = data_bytes.div_ceil(block_size);
    let worst_escape = if data_blocks > 0 {
        8 + (4 * data_blocks).div_ceil(8) * 8
    } else {
        0
    };
    let cap = block_size - FIRST_BLOCK_DESCRIPTORS_OFFSET;
    let sizes = descriptors
        .iter()
        .flat_map(|d| d.clone().split_to_fit(cap))
        .map(|d| d.encoded_len())
        .chain(std::iter::once(worst_escape).filter(|s| *s > 0));
    descriptor_blocks_for(block_size, sizes) as u64 + data_blocks as u64 + 1
}

fn descriptor_blocks_for(block_size: usize, sizes: impl Iterator<Item = usize>) -> usize {
    let mut blocks = 1;
    let mut room = block_size - FIRST_BLOCK_DESCRIPTORS_OFFSET;
    for size in sizes {
        if size > room {
            blocks += 1;
            room = block_size - NEXT_BLOCK_DESCRIPTORS_OFFSET;
        }
        room = room.saturating_sub(size);
    }
    blocks
}

/// Encodes a transaction. `data` is the data area that write chunks point
/// into; descriptors too large for a block are split; data blocks that
/// would start with the block magic are escaped (an escape descriptor is
/// appended), so that no data block on disk ever looks like a log block.
pub fn encode_transaction(
    params: &TransactionParams,
    descriptors: &[Descriptor],
    data: &[u8],
) -> Result<EncodedTransaction, JournalFormatError> {
    let bs = params.block_size;
    assert!(
        bs.is_power_of_two() && bs >= 512,
        "block size {bs} is not a valid journal block size"
    );
    if params.durable_seq >= params.seq {
        return Err(JournalFormatError::field(
            STRUCTURE,
            "durable_seq",
            40,
            params.durable_seq,
            "must be below the transaction's sequence number",
        ));
    }
    let data_len_u32 = u32::try_from(data.len()).map_err(|_| {
        JournalFormatError::field(
            STRUCTURE,
            "data_blocks",
            36,
            data.len() as u64,
            "data area over 4 GiB",
        )
    })?;
    for (index, d) in descriptors.iter().enumerate() {
        match d {
            Descriptor::Escape(_) => {
                return Err(JournalFormatError::field(
                    STRUCTURE,
                    "type",
                    index as u64,
                    u64::from(d.type_code()),
                    "escape descriptors are added by the encoder",
                ))
            }
            Descriptor::WriteData(chunks) => {
                for c in chunks {
                    let end = u64::from(c.data_offset) + u64::from(c.length);
                    if end > u64::from(data_len_u32) || c.length == 0 {
                        return Err(JournalFormatError::field(
                            STRUCTURE,
                            "data_offset",
                            index as u64,
                            u64::from(c.data_offset),
                            "write chunk is empty or reaches past the data area",
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    let data_blocks = data.len().div_ceil(bs);
    let mut area = vec![0u8; data_blocks * bs];
    area[..data.len()].copy_from_slice(data);
    let mut escaped = Vec::new();
    for (index, block) in area.chunks_exact_mut(bs).enumerate() {
        if starts_with_magic(block) {
            block[..4].fill(0);
            escaped.push(index as u32);
        }
    }

    let first_room = bs - FIRST_BLOCK_DESCRIPTORS_OFFSET;
    let mut all: Vec<Descriptor> = descriptors
        .iter()
        .flat_map(|d| d.clone().split_to_fit(first_room))
        .collect();
    if !escaped.is_empty() {
        all.extend(Descriptor::Escape(escaped).split_to_fit(first_room));
    }
    let mut areas: Vec<Vec<u8>> = vec![Vec::new()];
    let mut room = first_room;
    for d in &all {
        let mut encoded = Vec::with_capacity(d.encoded_len());
        d.encode_into(&mut encoded)?;
        if encoded.len() > first_room {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "size",
                2,
                encoded.len() as u64,
                "descriptor does not fit in one block",
            ));
        }
        if encoded.len() > room {
            areas.push(Vec::new());
            room = bs - NEXT_BLOCK_DESCRIPTORS_OFFSET;
        }
        room -= encoded.len();
        if let Some(last) = areas.last_mut() {
            last.extend_from_slice(&encoded);
        }
    }

    let descriptor_blocks = areas.len();
    let header = TransactionHeader {
        seq: params.seq,
        descriptor_blocks: u32::try_from(descriptor_blocks).map_err(|_| {
            JournalFormatError::field(
                STRUCTURE,
                "descriptor_blocks",
                32,
                descriptor_blocks as u64,
                "too many",
            )
        })?,
        data_blocks: u32::try_from(data_blocks).map_err(|_| {
            JournalFormatError::field(STRUCTURE, "data_blocks", 36, data_blocks as u64, "too many")
        })?,
        durable_seq: params.durable_seq,
    };
    let total = descriptor_blocks + data_blocks + 1;
    let mut bytes = vec![0u8; total * bs];
    for (index, descriptor_area) in areas.iter().enumerate() {
        let block = &mut bytes[index * bs..(index + 1) * bs];
        BlockHeader {
            block_type: BlockType::Descriptor,
            seq: params.seq,
            index: index as u32,
            used_bytes: descriptor_area.len() as u32,
        }
        .encode_into(block);
        let start = if index == 0 {
            put_u32(block, 32, header.descriptor_blocks);
            put_u32(block, 36, header.data_blocks);
            put_u64(block, 40, header.durable_seq);
            FIRST_BLOCK_DESCRIPTORS_OFFSET
        } else {
            NEXT_BLOCK_DESCRIPTORS_OFFSET
        };
        block[start..start + descriptor_area.len()].copy_from_slice(descriptor_area);
        seal_block(block, params.journal_id);
    }
    bytes[descriptor_blocks * bs..(descriptor_blocks + data_blocks) * bs].copy_from_slice(&area);
    let body_end = (total - 1) * bs;
    let checksum = salted_append(salt(params.journal_id, params.seq), &bytes[..body_end]);
    let commit = &mut bytes[body_end..];
    BlockHeader {
        block_type: BlockType::Commit,
        seq: params.seq,
        index: (descriptor_blocks + data_blocks) as u32,
        used_bytes: 0,
    }
    .encode_into(commit);
    put_u32(commit, 32, header.descriptor_blocks);
    put_u32(commit, 36, header.data_blocks);
    put_u32(commit, 40, checksum);
    seal_block(commit, params.journal_id);
    Ok(EncodedTransaction {
        header,
        bytes,
        block_size: bs,
    })
}

/// Verifies the integrity of a whole transaction read from the ring:
/// block 0 (with `expected_seq`), every continuation block, the commit
/// block and the transaction checksum. An `Err` that
/// [`JournalFormatError::is_integrity`] says the transaction was not
/// completely written (a torn write, or stale blocks where its blocks
/// should be); offsets are from the transaction's first byte.
pub fn verify_transaction(
    blocks: &[u8],
    journal_id: u64,
    block_size: usize,
    expected_seq: u64,
) -> Result<TransactionHeader, JournalFormatError> {
    let block0 = slice(blocks, 0, block_size, STRUCTURE)?;
    let header = TransactionHeader::decode(block0, journal_id)?;
    if header.seq != expected_seq {
        return Err(JournalFormatError::WrongSequence {
            structure: STRUCTURE,
            offset: 8,
            found: header.seq,
            expected: expected_seq,
        });
    }
    let total = usize::try_from(header.total_blocks()).unwrap_or(usize::MAX);
    let need = total.saturating_mul(block_size);
    if blocks.len() != need {
        return Err(JournalFormatError::Truncated {
            structure: STRUCTURE,
            need_bytes: need as u64,
            have_bytes: blocks.len() as u64,
        });
    }
    let d = header.descriptor_blocks as usize;
    let commit_index = total - 1;
    for index in (1..d).chain(std::iter::once(commit_index)) {
        let at = index * block_size;
        let block = &blocks[at..at + block_size];
        let block_header =
            BlockHeader::decode(block, journal_id).map_err(|e| e.shifted(at as u64))?;
        if block_header.seq != header.seq {
            return Err(JournalFormatError::WrongSequence {
                structure: STRUCTURE,
                offset: at as u64 + 8,
                found: block_header.seq,
                expected: header.seq,
            });
        }
        let want = if index == commit_index {
            BlockType::Commit
        } else {
            BlockType::Descriptor
        };
        if block_header.block_type != want {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "block_type",
                at as u64 + 4,
                u64::from(block_header.block_type.code()),
                "block of the wrong type inside a transaction",
            ));
        }
        if block_header.index as usize != index {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "block_index",
                at as u64 + 16,
                u64::from(block_header.index),
                "block index does not match its position",
            ));
        }
    }
    let commit_at = commit_index * block_size;
    let commit = &blocks[commit_at..];
    for (offset, want, field) in [
        (32usize, header.descriptor_blocks, "descriptor_blocks"),
        (36, header.data_blocks, "data_blocks"),
    ] {
        let found = be_u32(commit, offset, STRUCTURE)?;
        if found != want {
            return Err(JournalFormatError::field(
                STRUCTURE,
                field,
                (commit_at + offset) as u64,
                u64::from(found),
                "commit block disagrees with block 0",
            ));
        }
    }
    let stored = be_u32(commit, 40, STRUCTURE)?;
    let computed = salted_append(salt(journal_id, header.seq), &blocks[..commit_at]);
    if stored != computed {
        return Err(JournalFormatError::BadChecksum {
            structure: STRUCTURE,
            offset: (commit_at + 40) as u64,
            stored,
            computed,
        });
    }
    reserved_zero(commit, COMMIT_RESERVED_OFFSET, commit_at as u64, STRUCTURE)?;
    Ok(header)
}

/// A transaction after [`parse_transaction`]: its descriptors in order and
/// its unescaped data area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedTransaction {
    /// The header.
    pub header: TransactionHeader,
    /// Every descriptor in log order, escape descriptors included.
    pub descriptors: Vec<Descriptor>,
    /// Byte offset (from the transaction start) of each descriptor.
    pub descriptor_offsets: Vec<u64>,
    /// The data area: data blocks concatenated, escapes undone.
    pub data: Vec<u8>,
}

/// Decodes the descriptors of a transaction that passed
/// [`verify_transaction`] and checks them: every descriptor inside its
/// block, write chunks inside the data area, copy sources apart from their
/// targets, every device range inside `bounds`, escapes well formed. Any
/// error is structural: the bytes are what the writer wrote, and it wrote
/// something invalid.
pub fn parse_transaction(
    blocks: &[u8],
    header: &TransactionHeader,
    block_size: usize,
    bounds: &TargetBounds,
) -> Result<ParsedTransaction, JournalFormatError> {
    let d = header.descriptor_blocks as usize;
    let n = header.data_blocks as usize;
    let mut descriptors = Vec::new();
    let mut descriptor_offsets = Vec::new();
    for index in 0..d {
        let at = index * block_size;
        let block = slice(blocks, at, block_size, STRUCTURE)?;
        let start = if index == 0 {
            FIRST_BLOCK_DESCRIPTORS_OFFSET
        } else {
            NEXT_BLOCK_DESCRIPTORS_OFFSET
        };
        let used = be_u32(block, 20, STRUCTURE)? as usize;
        if used > block_size - start {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "used_bytes",
                at as u64 + 20,
                used as u64,
                "descriptors overrun their block",
            ));
        }
        let area_base = (at + start) as u64;
        let area = &block[start..start + used];
        // After the descriptors: reserved to the end of the block.
        reserved_zero(block, start + used, at as u64, STRUCTURE)?;
        let mut within = 0u64;
        for descriptor in decode_descriptor_area(area, area_base)? {
            descriptor_offsets.push(area_base + within);
            within += descriptor.encoded_len() as u64;
            descriptors.push(descriptor);
        }
    }
    let data_start = d * block_size;
    let mut data = slice(blocks, data_start, n * block_size, STRUCTURE)?.to_vec();
    let mut escaped = vec![false; n];
    for (descriptor, at) in descriptors.iter().zip(&descriptor_offsets) {
        if let Descriptor::Escape(indices) = descriptor {
            for (i, index) in indices.iter().enumerate() {
                let entry_at = at + 8 + 4 * i as u64;
                let slot = escaped.get_mut(*index as usize).ok_or_else(|| {
                    JournalFormatError::field(
                        STRUCTURE,
                        "escape_index",
                        entry_at,
                        u64::from(*index),
                        "no such data block",
                    )
                })?;
                let block_start = *index as usize * block_size;
                if *slot || data[block_start..block_start + 4] != [0; 4] {
                    return Err(JournalFormatError::field(
                        STRUCTURE,
                        "escape_index",
                        entry_at,
                        u64::from(*index),
                        "escaped twice, or the escaped block does not start with zeros",
                    ));
                }
                *slot = true;
                data[block_start..block_start + 4].copy_from_slice(&BLOCK_MAGIC.to_be_bytes());
            }
        }
    }
    for (index, was_escaped) in escaped.iter().enumerate() {
        if !was_escaped && starts_with_magic(&data[index * block_size..]) {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "data_block",
                (data_start + index * block_size) as u64,
                index as u64,
                "data block starts with the block magic but is not escaped",
            ));
        }
    }
    for (descriptor, at) in descriptors.iter().zip(&descriptor_offsets) {
        bounds.check(descriptor, *at)?;
        match descriptor {
            Descriptor::WriteData(chunks) => {
                for (i, c) in chunks.iter().enumerate() {
                    let end = u64::from(c.data_offset) + u64::from(c.length);
                    if end > data.len() as u64 {
                        return Err(JournalFormatError::field(
                            STRUCTURE,
                            "data_offset",
                            at + 8 + 16 * i as u64 + 12,
                            u64::from(c.data_offset),
                            "write chunk reaches past the data blocks",
                        ));
                    }
                }
            }
            Descriptor::Copy(chunks) => {
                for (i, c) in chunks.iter().enumerate() {
                    let length = u64::from(c.length);
                    // Both ends were checked against overflow by `bounds`.
                    if c.source < c.target.saturating_add(length)
                        && c.target < c.source.saturating_add(length)
                    {
                        return Err(JournalFormatError::field(
                            STRUCTURE,
                            "source",
                            at + 8 + 24 * i as u64 + 8,
                            c.source,
                            "copy source overlaps its target",
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(ParsedTransaction {
        header: *header,
        descriptors,
        descriptor_offsets,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::descriptor::{CopyChunk, RevokeRange, WriteChunk};

    const ID: u64 = 0x1122_3344_5566_7788;
    const WIDE: TargetBounds = TargetBounds {
        journal_start: 0,
        journal_end: 0x1000,
        device_limit: u64::MAX,
    };

    fn params(seq: u64) -> TransactionParams {
        TransactionParams {
            journal_id: ID,
            seq,
            durable_seq: seq - 1,
            block_size: 512,
        }
    }

    fn sample() -> (Vec<Descriptor>, Vec<u8>) {
        let mut data = vec![0x11u8; 700];
        data[512..516].copy_from_slice(b"qjbk");
        let descriptors = vec![
            Descriptor::WriteData(vec![
                WriteChunk {
                    target: 0x10000,
                    length: 600,
                    data_offset: 0,
                },
                WriteChunk {
                    target: 0x20000,
                    length: 100,
                    data_offset: 600,
                },
            ]),
            Descriptor::Copy(vec![CopyChunk {
                target: 0x30000,
                source: 0x40000,
                length: 512,
            }]),
            Descriptor::Revoke(vec![RevokeRange {
                offset: 0x50000,
                length: 512,
            }]),
        ];
        (descriptors, data)
    }

    #[test]
    fn round_trip_with_escape() {
        let (descriptors, data) = sample();
        let tx = encode_transaction(&params(5), &descriptors, &data).unwrap();
        assert_eq!(tx.header.data_blocks, 2);
        assert_eq!(tx.bytes.len() as u64, tx.total_blocks() * 512);
        let stored_data = &tx.bytes[512..];
        assert!(
            !starts_with_magic(&stored_data[512..]),
            "the magic is escaped on disk"
        );
        let header = verify_transaction(&tx.bytes, ID, 512, 5).unwrap();
        let parsed = parse_transaction(&tx.bytes, &header, 512, &WIDE).unwrap();
        assert_eq!(&parsed.data[..700], &data[..]);
        assert_eq!(&parsed.descriptors[..3], &descriptors[..]);
        assert_eq!(parsed.descriptors[3], Descriptor::Escape(vec![1]));
        assert_eq!(
            blocks_needed(512, &descriptors, data.len()),
            tx.total_blocks()
        );
    }

    #[test]
    fn any_flipped_byte_fails_integrity() {
        let (descriptors, data) = sample();
        let tx = encode_transaction(&params(5), &descriptors, &data).unwrap();
        for i in (0..tx.bytes.len()).step_by(7) {
            let mut bytes = tx.bytes.clone();
            bytes[i] ^= 0x80;
            let err = verify_transaction(&bytes, ID, 512, 5).unwrap_err();
            assert!(err.is_integrity(), "flip at {i}: {err}");
        }
        assert!(matches!(
            verify_transaction(&tx.bytes, ID, 512, 6),
            Err(JournalFormatError::WrongSequence {
                found: 5,
                expected: 6,
                ..
            })
        ));
        assert!(verify_transaction(&tx.bytes, ID ^ 1, 512, 5)
            .unwrap_err()
            .is_integrity());
    }

    #[test]
    fn many_descriptors_take_several_blocks() {
        let chunks: Vec<WriteChunk> = (0..200)
            .map(|i| WriteChunk {
                target: 0x10000 + i * 8,
                length: 8,
                data_offset: (i * 8) as u32,
            })
            .collect();
        let descriptors = vec![Descriptor::WriteData(chunks)];
        let data = vec![7u8; 1600];
        let tx = encode_transaction(&params(9), &descriptors, &data).unwrap();
        assert!(tx.header.descriptor_blocks > 1);
        assert_eq!(
            blocks_needed(512, &descriptors, data.len()),
            tx.total_blocks()
        );
        let header = verify_transaction(&tx.bytes, ID, 512, 9).unwrap();
        let parsed = parse_transaction(&tx.bytes, &header, 512, &WIDE).unwrap();
        let joined: Vec<WriteChunk> = parsed
            .descriptors
            .iter()
            .flat_map(|d| match d {
                Descriptor::WriteData(v) => v.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(joined.len(), 200);
    }

    #[test]
    fn structural_errors_are_named() {
        let bad_copy = vec![Descriptor::Copy(vec![CopyChunk {
            target: 0x30000,
            source: 0x30100,
            length: 512,
        }])];
        let tx = encode_transaction(&params(3), &bad_copy, &[]).unwrap();
        let header = verify_transaction(&tx.bytes, ID, 512, 3).unwrap();
        let err = parse_transaction(&tx.bytes, &header, 512, &WIDE).unwrap_err();
        assert!(
            matches!(
                err,
                JournalFormatError::Field {
                    field: "source",
                    offset: 64,
                    ..
                }
            ),
            "{err}"
        );
        let into_journal = vec![
            Descriptor::Revoke(vec![]),
            Descriptor::WriteData(vec![WriteChunk {
                target: 0x800,
                length: 1,
                data_offset: 0,
            }]),
        ];
        let tx = encode_transaction(&params(3), &into_journal, &[1]).unwrap();
        let header = verify_transaction(&tx.bytes, ID, 512, 3).unwrap();
        let err = parse_transaction(&tx.bytes, &header, 512, &WIDE).unwrap_err();
        assert!(
            matches!(
                err,
                JournalFormatError::Field {
                    field: "target",
                    offset: 64,
                    ..
                }
            ),
            "{err}"
        );
        assert!(encode_transaction(
            &params(3),
            &[Descriptor::WriteData(vec![WriteChunk {
                target: 0,
                length: 2,
                data_offset: 0
            }])],
            &[1]
        )
        .is_err());
    }

    proptest::proptest! {
        #[test]
        fn mutated_transactions_never_panic(flips in proptest::collection::vec((0usize..2048, 0u8..=255), 1..8), resealed: bool) {
            let (descriptors, data) = sample();
            let tx = encode_transaction(&params(5), &descriptors, &data).unwrap();
            let mut bytes = tx.bytes.clone();
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            if resealed {
                // Re-seal every log block and the transaction checksum, so
                // the structural checks behind the checksums get exercised.
                let n = bytes.len();
                let crc = salted_append(salt(ID, 5), &bytes[..n - 512]);
                bytes[n - 512 + 40..n - 512 + 44].copy_from_slice(&crc.to_be_bytes());
                for block in bytes.chunks_mut(512) {
                    if starts_with_magic(block) {
                        let seq = u64::from_be_bytes(block[8..16].try_into().unwrap());
                        block[28..32].fill(0);
                        let crc = crate::journal::checksum::block_checksum(ID, seq, block, 28);
                        block[28..32].copy_from_slice(&crc.to_be_bytes());
                    }
                }
            }
            if let Ok(header) = verify_transaction(&bytes, ID, 512, 5) {
                let _ = parse_transaction(&bytes, &header, 512, &WIDE);
            }
            let _ = TransactionHeader::decode(&bytes[..512], ID);
            let _ = decode_descriptor_area(&bytes[48..512], 48);
        }
    }
}
