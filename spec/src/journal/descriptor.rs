//! Descriptors: the operations of a transaction, packed into descriptor
//! blocks.
//!
//! Every descriptor starts with 8 bytes (big-endian):
//!
//! | bytes | field                                                   |
//! |-------|---------------------------------------------------------|
//! | 0-1   | type                                                    |
//! | 2-3   | size in bytes, these 8 included; a multiple of 8        |
//! | 4-7   | count: number of entries that follow                    |
//!
//! followed by `count` entries of the type's layout, zero-padded to the
//! size. A descriptor never spans two blocks.

use super::bytes::{be_u16, be_u32, be_u64, put_u16, put_u32, put_u64, reserved_zero, slice};
use super::error::JournalFormatError;

/// Bytes of the common descriptor header.
pub const DESCRIPTOR_HEADER_BYTES: usize = 8;
/// The largest descriptor (the 16-bit size field, rounded down to 8).
pub const DESCRIPTOR_MAX_BYTES: usize = 65528;
/// Longest hash a dedup entry may carry.
pub const DEDUP_HASH_MAX_BYTES: usize = 64;
/// First type code of the private range: descriptors a reader that does
/// not know them skips (they must not change what replay writes).
pub const PRIVATE_TYPE_MIN: u16 = 0x8000;

/// Type codes.
pub mod code {
    /// No action.
    pub const NO_OP: u16 = 0;
    /// Write data stored in the transaction's data blocks.
    pub const WRITE_DATA: u16 = 1;
    /// Copy bytes from one device range to another.
    pub const COPY: u16 = 2;
    /// Revoke earlier transactions' writes to ranges.
    pub const REVOKE: u16 = 3;
    /// Insert dedup hash entries.
    pub const DEDUP_INSERT: u16 = 4;
    /// Delete dedup hash entries.
    pub const DEDUP_DELETE: u16 = 5;
    /// Checksums of device data the transaction depends on.
    pub const DATA_CHECKSUM: u16 = 6;
    /// Data blocks whose leading magic was escaped.
    pub const ESCAPE: u16 = 7;
}

const STRUCTURE: &str = "journal descriptor";

/// One chunk of a write-data descriptor: `length` bytes at byte
/// `data_offset` of the transaction's data area go to device offset
/// `target`. Entry layout: target u64, length u32, data_offset u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteChunk {
    /// Absolute device offset written.
    pub target: u64,
    /// Bytes written (at least 1).
    pub length: u32,
    /// Where the bytes start in the data area (the data blocks of the
    /// transaction, concatenated and unescaped).
    pub data_offset: u32,
}

/// One chunk of a copy descriptor. Entry layout: target u64, source u64,
/// length u32, reserved u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyChunk {
    /// Absolute device offset written.
    pub target: u64,
    /// Absolute device offset read; never overlaps the target.
    pub source: u64,
    /// Bytes copied (at least 1).
    pub length: u32,
}

/// A revoked range. Entry layout: offset u64, length u64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevokeRange {
    /// First revoked device byte.
    pub offset: u64,
    /// Bytes revoked (at least 1).
    pub length: u64,
}

/// One entry of a data checksum descriptor. Entry layout: target u64,
/// length u32, crc32c u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataChecksumChunk {
    /// First device byte covered.
    pub target: u64,
    /// Bytes covered (at least 1).
    pub length: u32,
    /// Plain (unsalted) CRC32C of those bytes.
    pub crc32c: u32,
}

/// One dedup hash table entry. Layout: host_offset u64, hash_algorithm u8,
/// hash_length u8, reserved u16, reserved u32, then the hash, zero-padded
/// to a multiple of 8.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupEntry {
    /// Host offset of the cluster whose content has this hash.
    pub host_offset: u64,
    /// Hash function (1 = SHA-256; other values are the consumer's).
    pub hash_algorithm: u8,
    /// The hash, 1 to 64 bytes.
    pub hash: Vec<u8>,
}

impl DedupEntry {
    /// Encoded bytes of this entry.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        16 + round_up_8(self.hash.len())
    }
}

/// One decoded descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Descriptor {
    /// Does nothing; `size_bytes` (a multiple of 8, at least 8) of space.
    NoOp {
        /// Total size of the descriptor.
        size_bytes: u16,
    },
    /// Write literal data from the data area.
    WriteData(Vec<WriteChunk>),
    /// Copy device bytes.
    Copy(Vec<CopyChunk>),
    /// Revoke writes of all earlier transactions to these ranges.
    Revoke(Vec<RevokeRange>),
    /// Insert dedup entries (handed to the consumer, not written).
    DedupInsert(Vec<DedupEntry>),
    /// Delete dedup entries (handed to the consumer, not written).
    DedupDelete(Vec<DedupEntry>),
    /// The transaction is valid only if these ranges hold these checksums.
    DataChecksum(Vec<DataChecksumChunk>),
    /// Data blocks (indices into the data area) whose first 4 bytes were
    /// the block magic and are stored as zeros.
    Escape(Vec<u32>),
    /// A type of the private range (0x8000-0xffff), carried verbatim.
    Private {
        /// The type code.
        descriptor_type: u16,
        /// The count field.
        count: u32,
        /// The bytes after the 8-byte header.
        payload: Vec<u8>,
    },
}

const fn round_up_8(n: usize) -> usize {
    (n + 7) & !7
}

impl Descriptor {
    /// The type code.
    #[must_use]
    pub fn type_code(&self) -> u16 {
        match self {
            Self::NoOp { .. } => code::NO_OP,
            Self::WriteData(_) => code::WRITE_DATA,
            Self::Copy(_) => code::COPY,
            Self::Revoke(_) => code::REVOKE,
            Self::DedupInsert(_) => code::DEDUP_INSERT,
            Self::DedupDelete(_) => code::DEDUP_DELETE,
            Self::DataChecksum(_) => code::DATA_CHECKSUM,
            Self::Escape(_) => code::ESCAPE,
            Self::Private {
                descriptor_type, ..
            } => *descriptor_type,
        }
    }

    /// Number of entries (the count field).
    #[must_use]
    pub fn count(&self) -> usize {
        match self {
            Self::NoOp { .. } => 0,
            Self::WriteData(v) => v.len(),
            Self::Copy(v) => v.len(),
            Self::Revoke(v) => v.len(),
            Self::DedupInsert(v) | Self::DedupDelete(v) => v.len(),
            Self::DataChecksum(v) => v.len(),
            Self::Escape(v) => v.len(),
            Self::Private { count, .. } => *count as usize,
        }
    }

    /// Encoded size in bytes (may exceed [`DESCRIPTOR_MAX_BYTES`]; see
    /// [`Self::split_to_fit`]).
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let body = match self {
            Self::NoOp { size_bytes } => {
                return usize::from(*size_bytes).max(DESCRIPTOR_HEADER_BYTES);
            }
            Self::WriteData(v) => 16 * v.len(),
            Self::Copy(v) => 24 * v.len(),
            Self::Revoke(v) => 16 * v.len(),
            Self::DedupInsert(v) | Self::DedupDelete(v) => {
                v.iter().map(DedupEntry::encoded_len).sum()
            }
            Self::DataChecksum(v) => 16 * v.len(),
            Self::Escape(v) => 4 * v.len(),
            Self::Private { payload, .. } => payload.len(),
        };
        DESCRIPTOR_HEADER_BYTES + round_up_8(body)
    }

    /// Splits a descriptor whose encoding is larger than `max_bytes` into
    /// several of the same type, entries in the same order (entries are
    /// independent, so the split does not change what replay does).
    /// No-op and private descriptors are not split.
    #[must_use]
    pub fn split_to_fit(self, max_bytes: usize) -> Vec<Descriptor> {
        fn chunks<T: Clone>(
            items: Vec<T>,
            per: usize,
            wrap: fn(Vec<T>) -> Descriptor,
        ) -> Vec<Descriptor> {
            let per = per.max(1);
            if items.is_empty() {
                return vec![wrap(items)];
            }
            items.chunks(per).map(|c| wrap(c.to_vec())).collect()
        }
        let max_bytes = max_bytes.min(DESCRIPTOR_MAX_BYTES);
        if self.encoded_len() <= max_bytes {
            return vec![self];
        }
        let room = max_bytes.saturating_sub(DESCRIPTOR_HEADER_BYTES);
        match self {
            Self::WriteData(v) => chunks(v, room / 16, Self::WriteData),
            Self::Copy(v) => chunks(v, room / 24, Self::Copy),
            Self::Revoke(v) => chunks(v, room / 16, Self::Revoke),
            Self::DataChecksum(v) => chunks(v, room / 16, Self::DataChecksum),
            Self::Escape(v) => chunks(v, (room / 8) * 2, Self::Escape),
            Self::DedupInsert(v) => split_dedup(v, room, Self::DedupInsert),
            Self::DedupDelete(v) => split_dedup(v, room, Self::DedupDelete),
            other @ (Self::NoOp { .. } | Self::Private { .. }) => vec![other],
        }
    }

    /// Appends the encoding to `out`. Fails for a descriptor larger than
    /// [`DESCRIPTOR_MAX_BYTES`] or with a field out of range (a dedup hash
    /// of 0 or more than 64 bytes, a private type below 0x8000).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), JournalFormatError> {
        let size = self.encoded_len();
        if size > DESCRIPTOR_MAX_BYTES {
            return Err(JournalFormatError::field(
                STRUCTURE,
                "size",
                2,
                size as u64,
                "descriptor larger than 65528 bytes",
            ));
        }
        let count = u32::try_from(self.count()).map_err(|_| {
            JournalFormatError::field(
                STRUCTURE,
                "count",
                4,
                self.count() as u64,
                "too many entries",
            )
        })?;
        let start = out.len();
        out.resize(start + size, 0);
        let buf = &mut out[start..];
        put_u16(buf, 0, self.type_code());
        put_u16(buf, 2, size as u16);
        put_u32(buf, 4, count);
        let mut at = DESCRIPTOR_HEADER_BYTES;
        match self {
            Self::NoOp { .. } => {}
            Self::WriteData(v) => {
                for c in v {
                    put_u64(buf, at, c.target);
                    put_u32(buf, at + 8, c.length);
                    put_u32(buf, at + 12, c.data_offset);
                    at += 16;
                }
            }
            Self::Copy(v) => {
                for c in v {
                    put_u64(buf, at, c.target);
                    put_u64(buf, at + 8, c.source);
                    put_u32(buf, at + 16, c.length);
                    at += 24;
                }
            }
            Self::Revoke(v) => {
                for r in v {
                    put_u64(buf, at, r.offset);
                    put_u64(buf, at + 8, r.length);
                    at += 16;
                }
            }
            Self::DedupInsert(v) | Self::DedupDelete(v) => {
                for e in v {
                    if e.hash.is_empty() || e.hash.len() > DEDUP_HASH_MAX_BYTES {
                        out.truncate(start);
                        return Err(JournalFormatError::field(
                            STRUCTURE,
                            "hash_length",
                            (at + 9) as u64,
                            e.hash.len() as u64,
                            "dedup hash must be 1 to 64 bytes",
                        ));
                    }
                    put_u64(buf, at, e.host_offset);
                    buf[at + 8] = e.hash_algorithm;
                    buf[at + 9] = e.hash.len() as u8;
                    buf[at + 16..at + 16 + e.hash.len()].copy_from_slice(&e.hash);
                    at += e.encoded_len();
                }
            }
            Self::DataChecksum(v) => {
                for c in v {
                    put_u64(buf, at, c.target);
                    put_u32(buf, at + 8, c.length);
                    put_u32(buf, at + 12, c.crc32c);
                    at += 16;
                }
            }
            Self::Escape(v) => {
                for index in v {
                    put_u32(buf, at, *index);
                    at += 4;
                }
            }
            Self::Private {
                descriptor_type,
                payload,
                ..
            } => {
                if *descriptor_type < PRIVATE_TYPE_MIN {
                    out.truncate(start);
                    return Err(JournalFormatError::field(
                        STRUCTURE,
                        "type",
                        0,
                        u64::from(*descriptor_type),
                        "private descriptor types start at 0x8000",
                    ));
                }
                buf[at..at + payload.len()].copy_from_slice(payload);
            }
        }
        Ok(())
    }

    /// Decodes the descriptor at the start of `bytes` (the rest of its
    /// block's descriptor area) and returns it with its size. `base` is
    /// the offset of `bytes` in the caller's structure, for errors.
    pub fn decode(bytes: &[u8], base: u64) -> Result<(Descriptor, usize), JournalFormatError> {
        let err = |field: &'static str, at: usize, value: u64, reason: &'static str| {
            JournalFormatError::field(STRUCTURE, field, base + at as u64, value, reason)
        };
        let truncated = |_| {
            err(
                "size",
                2,
                bytes.len() as u64,
                "descriptor header overruns its block",
            )
        };
        let type_code = be_u16(bytes, 0, STRUCTURE).map_err(truncated)?;
        let size = usize::from(be_u16(bytes, 2, STRUCTURE).map_err(truncated)?);
        let count = be_u32(bytes, 4, STRUCTURE).map_err(truncated)?;
        if size < DESCRIPTOR_HEADER_BYTES || size % 8 != 0 {
            return Err(err(
                "size",
                2,
                size as u64,
                "must be a multiple of 8 and at least 8",
            ));
        }
        if size > bytes.len() {
            return Err(err("size", 2, size as u64, "descriptor overruns its block"));
        }
        let body = &bytes[DESCRIPTOR_HEADER_BYTES..size];
        let count_usize = count as usize;
        let fixed = |entry_bytes: usize| -> Result<(), JournalFormatError> {
            let need = count_usize
                .checked_mul(entry_bytes)
                .map(round_up_8)
                .ok_or_else(|| err("count", 4, u64::from(count), "entry count overflows"))?;
            if need != body.len() {
                return Err(err(
                    "size",
                    2,
                    size as u64,
                    "does not match the entry count",
                ));
            }
            // The padding to a multiple of 8 after the entries.
            reserved_zero(body, count_usize * entry_bytes, base + 8, STRUCTURE)
        };
        let field_u64 = |at: usize| be_u64(body, at, STRUCTURE).map_err(|e| e.shifted(base + 8));
        let field_u32 = |at: usize| be_u32(body, at, STRUCTURE).map_err(|e| e.shifted(base + 8));
        let descriptor = match type_code {
            code::NO_OP => {
                if count != 0 {
                    return Err(err(
                        "count",
                        4,
                        u64::from(count),
                        "a no-op descriptor has no entries",
                    ));
                }
                reserved_zero(body, 0, base + 8, STRUCTURE)?;
                Descriptor::NoOp {
                    size_bytes: size as u16,
                }
            }
            code::WRITE_DATA => {
                fixed(16)?;
                let mut chunks = Vec::with_capacity(count_usize);
                for i in 0..count_usize {
                    let at = i * 16;
                    let chunk = WriteChunk {
                        target: field_u64(at)?,
                        length: field_u32(at + 8)?,
                        data_offset: field_u32(at + 12)?,
                    };
                    if chunk.length == 0 {
                        return Err(err(
                            "length",
                            8 + at + 8,
                            0,
                            "a write chunk must not be empty",
                        ));
                    }
                    chunks.push(chunk);
                }
                Descriptor::WriteData(chunks)
            }
            code::COPY => {
                fixed(24)?;
                let mut chunks = Vec::with_capacity(count_usize);
                for i in 0..count_usize {
                    let at = i * 24;
                    let chunk = CopyChunk {
                        target: field_u64(at)?,
                        source: field_u64(at + 8)?,
                        length: field_u32(at + 16)?,
                    };
                    if chunk.length == 0 {
                        return Err(err(
                            "length",
                            8 + at + 16,
                            0,
                            "a copy chunk must not be empty",
                        ));
                    }
                    let reserved = field_u32(at + 20)?;
                    if reserved != 0 {
                        return Err(err(
                            "reserved",
                            8 + at + 20,
                            u64::from(reserved),
                            "must be zero",
                        ));
                    }
                    chunks.push(chunk);
                }
                Descriptor::Copy(chunks)
            }
            code::REVOKE => {
                fixed(16)?;
                let mut ranges = Vec::with_capacity(count_usize);
                for i in 0..count_usize {
                    let at = i * 16;
                    let range = RevokeRange {
                        offset: field_u64(at)?,
                        length: field_u64(at + 8)?,
                    };
                    if range.length == 0 {
                        return Err(err(
                            "length",
                            8 + at + 8,
                            0,
                            "a revoked range must not be empty",
                        ));
                    }
                    if range.offset.checked_add(range.length).is_none() {
                        return Err(err(
                            "length",
                            8 + at + 8,
                            range.length,
                            "range end overflows",
                        ));
                    }
                    ranges.push(range);
                }
                Descriptor::Revoke(ranges)
            }
            code::DEDUP_INSERT | code::DEDUP_DELETE => {
                let mut entries = Vec::with_capacity(count_usize.min(body.len() / 16));
                let mut at = 0usize;
                for _ in 0..count_usize {
                    let head = slice(body, at, 16, STRUCTURE).map_err(|_| {
                        err(
                            "count",
                            4,
                            u64::from(count),
                            "dedup entries overrun the descriptor",
                        )
                    })?;
                    let host_offset = field_u64(at)?;
                    let head = &head[8..];
                    let (algorithm, hash_len) = (head[0], usize::from(head[1]));
                    if hash_len == 0 || hash_len > DEDUP_HASH_MAX_BYTES {
                        return Err(err(
                            "hash_length",
                            8 + at + 9,
                            hash_len as u64,
                            "dedup hash must be 1 to 64 bytes",
                        ));
                    }
                    if head[2..].iter().any(|b| *b != 0) {
                        return Err(err("reserved", 8 + at + 10, 0, "must be zero"));
                    }
                    let hash = slice(body, at + 16, hash_len, STRUCTURE).map_err(|_| {
                        err(
                            "hash_length",
                            8 + at + 9,
                            hash_len as u64,
                            "hash overruns the descriptor",
                        )
                    })?;
                    let padded =
                        slice(body, at + 16, round_up_8(hash_len), STRUCTURE).map_err(|_| {
                            err(
                                "hash_length",
                                8 + at + 9,
                                hash_len as u64,
                                "hash padding overruns the descriptor",
                            )
                        })?;
                    reserved_zero(padded, hash_len, base + 8 + (at + 16) as u64, STRUCTURE)?;
                    entries.push(DedupEntry {
                        host_offset,
                        hash_algorithm: algorithm,
                        hash: hash.to_vec(),
                    });
                    at += 16 + round_up_8(hash_len);
                }
                if at != body.len() {
                    return Err(err(
                        "size",
                        2,
                        size as u64,
                        "does not match the dedup entries",
                    ));
                }
                if type_code == code::DEDUP_INSERT {
                    Descriptor::DedupInsert(entries)
                } else {
                    Descriptor::DedupDelete(entries)
                }
            }
            code::DATA_CHECKSUM => {
                fixed(16)?;
                let mut chunks = Vec::with_capacity(count_usize);
                for i in 0..count_usize {
                    let at = i * 16;
                    let chunk = DataChecksumChunk {
                        target: field_u64(at)?,
                        length: field_u32(at + 8)?,
                        crc32c: field_u32(at + 12)?,
                    };
                    if chunk.length == 0 {
                        return Err(err(
                            "length",
                            8 + at + 8,
                            0,
                            "a checksummed range must not be empty",
                        ));
                    }
                    chunks.push(chunk);
                }
                Descriptor::DataChecksum(chunks)
            }
            code::ESCAPE => {
                fixed(4)?;
                let mut indices = Vec::with_capacity(count_usize);
                for i in 0..count_usize {
                    indices.push(field_u32(i * 4)?);
                }
                Descriptor::Escape(indices)
            }
            t if t >= PRIVATE_TYPE_MIN => Descriptor::Private {
                descriptor_type: t,
                count,
                payload: body.to_vec(),
            },
            t => return Err(err("type", 0, u64::from(t), "unknown descriptor type")),
        };
        Ok((descriptor, size))
    }
}

fn split_dedup(
    entries: Vec<DedupEntry>,
    room: usize,
    wrap: fn(Vec<DedupEntry>) -> Descriptor,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let mut group = Vec::new();
    let mut group_bytes = 0;
    for entry in entries {
        let len = entry.encoded_len();
        if !group.is_empty() && group_bytes + len > room {
            out.push(wrap(std::mem::take(&mut group)));
            group_bytes = 0;
        }
        group_bytes += len;
        group.push(entry);
    }
    if !group.is_empty() || out.is_empty() {
        out.push(wrap(group));
    }
    out
}

/// Decodes every descriptor of one block's descriptor area (`used_bytes`
/// long). `base` is the area's offset for errors.
pub fn decode_descriptor_area(
    area: &[u8],
    base: u64,
) -> Result<Vec<Descriptor>, JournalFormatError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    // Each descriptor is at least 8 bytes, so this loop runs at most
    // area.len() / 8 times.
    while at < area.len() {
        let (descriptor, size) = Descriptor::decode(&area[at..], base + at as u64)?;
        debug_assert!(size >= DESCRIPTOR_HEADER_BYTES);
        out.push(descriptor);
        at += size;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Descriptor> {
        vec![
            Descriptor::NoOp { size_bytes: 24 },
            Descriptor::WriteData(vec![
                WriteChunk {
                    target: 0x10000,
                    length: 512,
                    data_offset: 0,
                },
                WriteChunk {
                    target: 0x30000,
                    length: 8,
                    data_offset: 512,
                },
            ]),
            Descriptor::Copy(vec![CopyChunk {
                target: 0x50000,
                source: 0x60000,
                length: 4096,
            }]),
            Descriptor::Revoke(vec![RevokeRange {
                offset: 0x70000,
                length: 0x10000,
            }]),
            Descriptor::DedupInsert(vec![DedupEntry {
                host_offset: 0x80000,
                hash_algorithm: 1,
                hash: vec![0xab; 32],
            }]),
            Descriptor::DedupDelete(vec![DedupEntry {
                host_offset: 0x90000,
                hash_algorithm: 1,
                hash: vec![0xcd; 5],
            }]),
            Descriptor::DataChecksum(vec![DataChecksumChunk {
                target: 0xa0000,
                length: 4096,
                crc32c: 0xdead_beef,
            }]),
            Descriptor::Escape(vec![0, 3, 7]),
            Descriptor::Private {
                descriptor_type: 0x8001,
                count: 2,
                payload: vec![1, 2, 3, 4, 5, 6, 7, 8],
            },
        ]
    }

    #[test]
    fn every_type_round_trips() {
        for d in samples() {
            let mut buf = Vec::new();
            d.encode_into(&mut buf).unwrap();
            assert_eq!(buf.len(), d.encoded_len());
            assert_eq!(buf.len() % 8, 0);
            let (back, size) = Descriptor::decode(&buf, 0).unwrap();
            assert_eq!(back, d);
            assert_eq!(size, buf.len());
        }
    }

    #[test]
    fn padding_and_no_op_bodies_must_be_zero() {
        let no_op = Descriptor::NoOp { size_bytes: 16 };
        let escape = Descriptor::Escape(vec![5]);
        let dedup = Descriptor::DedupInsert(vec![DedupEntry {
            host_offset: 0x10000,
            hash_algorithm: 1,
            hash: vec![0xaa; 3],
        }]);
        // (descriptor, a padding byte inside it)
        for (d, pad_at) in [(no_op, 12usize), (escape, 13), (dedup, 8 + 16 + 5)] {
            let mut buf = Vec::new();
            d.encode_into(&mut buf).unwrap();
            assert_eq!(Descriptor::decode(&buf, 0).unwrap().0, d);
            buf[pad_at] = 0x5a;
            let err = Descriptor::decode(&buf, 100).unwrap_err();
            assert_eq!(
                err,
                JournalFormatError::field(
                    STRUCTURE,
                    "reserved",
                    100 + pad_at as u64,
                    0x5a,
                    "reserved bytes must be zero"
                ),
                "{d:?}"
            );
        }
    }

    #[test]
    fn overrunning_descriptor_is_named() {
        let mut buf = Vec::new();
        samples()[1].encode_into(&mut buf).unwrap();
        let err = Descriptor::decode(&buf[..buf.len() - 8], 100).unwrap_err();
        assert_eq!(
            err,
            JournalFormatError::field(
                STRUCTURE,
                "size",
                102,
                buf.len() as u64,
                "descriptor overruns its block"
            )
        );
        let err = Descriptor::decode(&buf[..5], 0).unwrap_err();
        assert!(matches!(
            err,
            JournalFormatError::Field { field: "size", .. }
        ));
    }

    #[test]
    fn unknown_and_malformed_fields_are_named() {
        let mut buf = Vec::new();
        samples()[2].encode_into(&mut buf).unwrap();
        buf[1] = 9;
        assert!(matches!(
            Descriptor::decode(&buf, 0),
            Err(JournalFormatError::Field {
                field: "type",
                offset: 0,
                value: 9,
                ..
            })
        ));
        buf[1] = 2;
        buf[7] = 2;
        assert!(matches!(
            Descriptor::decode(&buf, 0),
            Err(JournalFormatError::Field { field: "size", .. })
        ));
        buf[7] = 1;
        buf[8 + 16..8 + 20].fill(0);
        assert!(matches!(
            Descriptor::decode(&buf, 0),
            Err(JournalFormatError::Field {
                field: "length",
                offset: 24,
                ..
            })
        ));
    }

    #[test]
    fn split_keeps_order_and_fits() {
        let chunks: Vec<WriteChunk> = (0..100)
            .map(|i| WriteChunk {
                target: i * 4096,
                length: 4096,
                data_offset: (i * 4096) as u32,
            })
            .collect();
        let parts = Descriptor::WriteData(chunks.clone()).split_to_fit(512 - 48);
        assert!(parts.len() > 1);
        let mut joined = Vec::new();
        for p in &parts {
            assert!(p.encoded_len() <= 512 - 48);
            match p {
                Descriptor::WriteData(v) => joined.extend_from_slice(v),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(joined, chunks);
        let entries: Vec<DedupEntry> = (0..40)
            .map(|i| DedupEntry {
                host_offset: i,
                hash_algorithm: 1,
                hash: vec![i as u8; 32],
            })
            .collect();
        let parts = Descriptor::DedupInsert(entries).split_to_fit(480);
        assert!(parts.iter().all(|p| p.encoded_len() <= 480));
        assert_eq!(parts.iter().map(Descriptor::count).sum::<usize>(), 40);
    }

    #[test]
    fn area_decodes_in_order() {
        let mut area = Vec::new();
        for d in samples() {
            d.encode_into(&mut area).unwrap();
        }
        assert_eq!(decode_descriptor_area(&area, 0).unwrap(), samples());
    }
}
