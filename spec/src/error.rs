//! The one error type of the format layer: every decoder in this crate
//! returns it, naming the structure, the field and the byte offset.

/// Why bytes could not be decoded (or a value could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// A field holds a value the format does not allow.
    #[error("{structure}: field `{field}` at byte {offset}: {reason}")]
    Field {
        /// The structure being decoded, e.g. "qcow2 header".
        structure: &'static str,
        /// The field holding the bad value.
        field: &'static str,
        /// Byte offset of the field (in the slice given to the decoder, or
        /// in the image file when the caller knows it).
        offset: u64,
        /// What is wrong with the value.
        reason: String,
    },
    /// Fewer bytes than the structure needs.
    #[error("{structure}: truncated: need {need} bytes, have {have}")]
    Truncated {
        /// The structure being decoded.
        structure: &'static str,
        /// Bytes the structure needs.
        need: u64,
        /// Bytes that were available.
        have: u64,
    },
    /// A feature this implementation does not support (names it, e.g.
    /// "extended L2 entries", "external data file", "encryption",
    /// "compression type zstd", "unknown incompatible feature bit 20").
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// The image carries the corrupt bit (incompatible bit 1): QEMU found
    /// metadata corruption and refuses read-write use until `check -r`
    /// clears it.
    #[error("image is marked corrupt (incompatible feature bit 1); repair it with check -r all")]
    MarkedCorrupt,
}

impl FormatError {
    /// Shorthand for [`FormatError::Field`].
    #[must_use]
    pub fn field(
        structure: &'static str,
        field: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        FormatError::Field {
            structure,
            field,
            offset,
            reason: reason.into(),
        }
    }
}
