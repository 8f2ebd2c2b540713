//! The error type of the journal's on-disk formats.
//!
//! It is separate from the qcow2 [`crate::FormatError`] because replay must
//! tell two kinds of failure apart: an *integrity* failure (a magic, a
//! sequence number or a checksum that does not match: the bytes were never
//! completely written, or belong to an older lap of the ring) is the normal
//! end of a log, while a *structural* failure behind good checksums (a
//! descriptor overrunning its block, a target inside the journal) means a
//! buggy or foreign writer and must be reported. [`JournalFormatError::is_integrity`]
//! makes that split.

/// Why journal bytes could not be decoded, or a value could not be encoded.
///
/// `offset` is the byte offset of the offending field from the start of the
/// structure handed to the decoder (a header slot, a block, or the first
/// block of a transaction); callers that know where the structure lives on
/// the device add its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalFormatError {
    /// Fewer bytes than the structure needs.
    #[error("{structure}: truncated: need {need_bytes} bytes, have {have_bytes}")]
    Truncated {
        /// The structure being decoded, e.g. "journal header".
        structure: &'static str,
        /// Bytes the structure needs.
        need_bytes: u64,
        /// Bytes that were available.
        have_bytes: u64,
    },
    /// The magic number does not match: these bytes are not this structure.
    #[error("{structure}: bad magic at byte {offset}: found {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The structure being decoded.
        structure: &'static str,
        /// Byte offset of the magic field.
        offset: u64,
        /// The value found.
        found: u64,
        /// The value the format requires.
        expected: u64,
    },
    /// A stored CRC32C does not match the bytes it covers.
    #[error("{structure}: checksum at byte {offset} is {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The structure being decoded.
        structure: &'static str,
        /// Byte offset of the checksum field.
        offset: u64,
        /// The checksum found on disk.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// The block belongs to another transaction than the one being read
    /// (a stale block from an earlier lap, or the end of the log).
    #[error("{structure}: sequence number at byte {offset} is {found}, expected {expected}")]
    WrongSequence {
        /// The structure being decoded.
        structure: &'static str,
        /// Byte offset of the sequence field.
        offset: u64,
        /// The sequence number found.
        found: u64,
        /// The sequence number the reader expected.
        expected: u64,
    },
    /// A field holds a value the format does not allow.
    #[error("{structure}: field `{field}` at byte {offset} is {value:#x}: {reason}")]
    Field {
        /// The structure being decoded.
        structure: &'static str,
        /// The field holding the bad value.
        field: &'static str,
        /// Byte offset of the field.
        offset: u64,
        /// The value found (or, for encoders, the value refused).
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl JournalFormatError {
    /// Shorthand for [`JournalFormatError::Field`].
    #[must_use]
    pub fn field(
        structure: &'static str,
        field: &'static str,
        offset: u64,
        value: u64,
        reason: &'static str,
    ) -> Self {
        Self::Field {
            structure,
            field,
            offset,
            value,
            reason,
        }
    }

    /// Whether this failure says "these bytes were not (completely) written
    /// by this journal for this transaction" (magic, checksum, sequence,
    /// truncation), as opposed to a structural violation behind valid
    /// checksums.
    #[must_use]
    pub fn is_integrity(&self) -> bool {
        !matches!(self, Self::Field { .. })
    }

    /// The same error with `delta` added to its offset, for a caller that
    /// decoded a sub-structure and knows where it sits in the larger one.
    #[must_use]
    pub fn shifted(self, delta: u64) -> Self {
        match self {
            Self::Truncated { .. } => self,
            Self::BadMagic {
                structure,
                offset,
                found,
                expected,
            } => Self::BadMagic {
                structure,
                offset: offset.saturating_add(delta),
                found,
                expected,
            },
            Self::BadChecksum {
                structure,
                offset,
                stored,
                computed,
            } => Self::BadChecksum {
                structure,
                offset: offset.saturating_add(delta),
                stored,
                computed,
            },
            Self::WrongSequence {
                structure,
                offset,
                found,
                expected,
            } => Self::WrongSequence {
                structure,
                offset: offset.saturating_add(delta),
                found,
                expected,
            },
            Self::Field {
                structure,
                field,
                offset,
                value,
                reason,
            } => Self::Field {
                structure,
                field,
                offset: offset.saturating_add(delta),
                value,
                reason,
            },
        }
    }

    /// The byte offset the error points at, if it has one.
    #[must_use]
    pub fn offset(&self) -> Option<u64> {
        match self {
            Self::Truncated { .. } => None,
            Self::BadMagic { offset, .. }
            | Self::BadChecksum { offset, .. }
            | Self::WrongSequence { offset, .. }
            | Self::Field { offset, .. } => Some(*offset),
        }
    }
}
