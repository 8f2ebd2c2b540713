//! Header extensions: the type-length-value records between the fixed
//! header and the backing file name.
//!
//! Framing (docs/interop/qcow2.txt): u32 type, u32 length, `length` bytes of
//! data, zero padding to a multiple of 8. Type 0 ends the list. Extensions
//! we do not know are kept byte for byte, because QEMU does the same and an
//! image must survive a round trip through us unchanged.

use super::bytes::{be_u32, be_u64, pad8, slice};
use super::features::{FeatureKind, FeatureName};
use crate::error::FormatError;

/// Type of the end-of-extensions marker.
pub const EXT_END: u32 = 0;
/// Type of the backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Type of the feature name table extension.
pub const EXT_FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// Type of the persistent bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Type of the full disk encryption header pointer extension (LUKS).
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// Type of the external data file name extension.
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// Type of the qjournal extension ("qjrn").
pub const EXT_JOURNAL: u32 = 0x716a_726e;

/// Longest backing format name QEMU accepts (it keeps it in a 16-byte
/// buffer with a terminating NUL).
pub const BACKING_FORMAT_LEN_MAX: usize = 15;

const STRUCTURE: &str = "qcow2 header extension";

/// The bitmaps extension: where the bitmap directory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub bitmap_directory_size: u64,
    /// Offset of the bitmap directory in the image file (cluster aligned).
    pub bitmap_directory_offset: u64,
}

impl BitmapsExtension {
    /// Encoded length: nb_bitmaps, 4 reserved bytes, size, offset.
    pub const ENCODED_LEN: usize = 24;
}

/// The qjournal extension: where the journal lives in the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalExtension {
    /// Byte offset of the journal in the image file (cluster aligned).
    pub offset: u64,
    /// Size of the journal in bytes (a multiple of the cluster size).
    pub size: u64,
    /// Flags; bit 0: commit with the draft's two-flush protocol instead of
    /// the single-flush one; bit 1: log small writes into fresh clusters in
    /// the transaction (logged data); bit 2: deduplication. Other bits are
    /// reserved (zero).
    pub flags: u64,
}

impl JournalExtension {
    /// Encoded length: offset, size and flags, each u64.
    pub const ENCODED_LEN: usize = 24;
    /// The first version of the extension had no flags word; it decodes
    /// with `flags` 0.
    pub const ENCODED_LEN_NO_FLAGS: usize = 16;
    /// Flag bit 0: the two-flush (draft) commit protocol.
    pub const FLAG_TWO_FLUSH_COMMIT: u64 = 1;
    /// Flag bit 1: writers carry small writes into fresh clusters in the
    /// transaction (logged data, spec 8.2). Replay does not depend on it.
    pub const FLAG_LOG_DATA: u64 = 2;
    /// Flag bit 2: whole-cluster writes are deduplicated; the journal
    /// carries the dedup index's insertions and deletions (spec 3.1, 8.5).
    pub const FLAG_DEDUP: u64 = 4;
    /// Flags this version knows.
    pub const FLAGS_KNOWN: u64 =
        Self::FLAG_TWO_FLUSH_COMMIT | Self::FLAG_LOG_DATA | Self::FLAG_DEDUP;
}

/// One header extension, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderExtension {
    /// 0xE2792ACA: the backing file's format name (e.g. "qcow2", "raw").
    BackingFormat(String),
    /// 0x6803f857: human-readable names of feature bits.
    FeatureNameTable(Vec<FeatureName>),
    /// 0x23852875: persistent dirty bitmaps.
    Bitmaps(BitmapsExtension),
    /// 0x44415441: name of the external data file.
    ExternalDataFile(String),
    /// 0x716a726e: the qjournal.
    Journal(JournalExtension),
    /// Any other type (including a feature name table that does not
    /// re-encode byte for byte): kept and re-encoded unchanged.
    Unknown {
        /// The extension type.
        kind: u32,
        /// The data, without padding.
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The on-disk type of this extension.
    #[must_use]
    pub fn kind(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNameTable(_) => EXT_FEATURE_NAME_TABLE,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::ExternalDataFile(_) => EXT_EXTERNAL_DATA_FILE,
            HeaderExtension::Journal(_) => EXT_JOURNAL,
            HeaderExtension::Unknown { kind, .. } => *kind,
        }
    }

    /// Decodes the data of one extension. `offset` is the byte offset of the
    /// data in the header cluster, for error messages.
    pub fn decode(kind: u32, data: &[u8], offset: u64) -> Result<HeaderExtension, FormatError> {
        match kind {
            EXT_END => Err(FormatError::field(
                STRUCTURE,
                "type",
                offset.saturating_sub(8),
                "type 0 is the end marker, not an extension",
            )),
            EXT_BACKING_FORMAT => {
                if data.len() > BACKING_FORMAT_LEN_MAX {
                    return Err(FormatError::field(
                        "backing format extension",
                        "length",
                        offset.saturating_sub(4),
                        format!(
                            "{} bytes, at most {BACKING_FORMAT_LEN_MAX} allowed",
                            data.len()
                        ),
                    ));
                }
                Ok(HeaderExtension::BackingFormat(utf8_name(
                    data,
                    "backing format extension",
                    "format name",
                    offset,
                )?))
            }
            EXT_EXTERNAL_DATA_FILE => Ok(HeaderExtension::ExternalDataFile(utf8_name(
                data,
                "external data file extension",
                "file name",
                offset,
            )?)),
            EXT_FEATURE_NAME_TABLE => Ok(match decode_feature_names(data) {
                // Keep the structured form only when it reproduces the
                // bytes: a table from another writer (odd length, garbage
                // after the NUL, unknown types) must survive unchanged.
                Some(names) if encode_feature_names(&names).ok().as_deref() == Some(data) => {
                    HeaderExtension::FeatureNameTable(names)
                }
                _ => HeaderExtension::Unknown {
                    kind,
                    data: data.to_vec(),
                },
            }),
            EXT_BITMAPS => {
                const S: &str = "bitmaps extension";
                if data.len() != BitmapsExtension::ENCODED_LEN {
                    return Err(FormatError::field(
                        S,
                        "length",
                        offset.saturating_sub(4),
                        format!(
                            "{} bytes, expected {}",
                            data.len(),
                            BitmapsExtension::ENCODED_LEN
                        ),
                    ));
                }
                let reserved = be_u32(data, 4, S)?;
                if reserved != 0 {
                    return Err(FormatError::field(
                        S,
                        "reserved",
                        offset + 4,
                        format!("{reserved:#x}, must be zero"),
                    ));
                }
                Ok(HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: be_u32(data, 0, S)?,
                    bitmap_directory_size: be_u64(data, 8, S)?,
                    bitmap_directory_offset: be_u64(data, 16, S)?,
                }))
            }
            EXT_JOURNAL => {
                const S: &str = "journal extension";
                if data.len() != JournalExtension::ENCODED_LEN
                    && data.len() != JournalExtension::ENCODED_LEN_NO_FLAGS
                {
                    return Err(FormatError::field(
                        S,
                        "length",
                        offset.saturating_sub(4),
                        format!(
                            "{} bytes, expected {}",
                            data.len(),
                            JournalExtension::ENCODED_LEN
                        ),
                    ));
                }
                let flags = if data.len() == JournalExtension::ENCODED_LEN {
                    be_u64(data, 16, S)?
                } else {
                    0
                };
                if flags & !JournalExtension::FLAGS_KNOWN != 0 {
                    return Err(FormatError::field(
                        S,
                        "flags",
                        offset + 16,
                        format!("unknown flag bits {flags:#x}"),
                    ));
                }
                Ok(HeaderExtension::Journal(JournalExtension {
                    offset: be_u64(data, 0, S)?,
                    size: be_u64(data, 8, S)?,
                    flags,
                }))
            }
            _ => Ok(HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            }),
        }
    }

    /// The extension's data bytes, without the type/length framing and
    /// without padding.
    pub fn encode_data(&self) -> Result<Vec<u8>, FormatError> {
        Ok(match self {
            HeaderExtension::BackingFormat(name) => {
                if name.len() > BACKING_FORMAT_LEN_MAX || name.contains('\0') {
                    return Err(FormatError::field(
                        "backing format extension",
                        "format name",
                        0,
                        format!("{name:?}: at most {BACKING_FORMAT_LEN_MAX} bytes, no NUL"),
                    ));
                }
                name.as_bytes().to_vec()
            }
            HeaderExtension::ExternalDataFile(name) => {
                if name.contains('\0') {
                    return Err(FormatError::field(
                        "external data file extension",
                        "file name",
                        0,
                        "contains a NUL byte",
                    ));
                }
                name.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNameTable(names) => encode_feature_names(names)?,
            HeaderExtension::Bitmaps(b) => {
                let mut out = Vec::with_capacity(BitmapsExtension::ENCODED_LEN);
                out.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&b.bitmap_directory_size.to_be_bytes());
                out.extend_from_slice(&b.bitmap_directory_offset.to_be_bytes());
                out
            }
            HeaderExtension::Journal(j) => {
                let mut out = Vec::with_capacity(JournalExtension::ENCODED_LEN);
                out.extend_from_slice(&j.offset.to_be_bytes());
                out.extend_from_slice(&j.size.to_be_bytes());
                out.extend_from_slice(&j.flags.to_be_bytes());
                out
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        })
    }

    /// The framed extension: type, length, data, zero padding to 8 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let data = self.encode_data()?;
        let len = u32::try_from(data.len()).map_err(|_| {
            FormatError::field(
                STRUCTURE,
                "length",
                4,
                format!("{} bytes do not fit in u32", data.len()),
            )
        })?;
        let padded = pad8(data.len())
            .ok_or_else(|| FormatError::field(STRUCTURE, "length", 4, "overflow"))?;
        let mut out = Vec::with_capacity(8 + padded);
        out.extend_from_slice(&self.kind().to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(8 + padded, 0);
        Ok(out)
    }
}

fn utf8_name(
    data: &[u8],
    structure: &'static str,
    field: &'static str,
    offset: u64,
) -> Result<String, FormatError> {
    if data.contains(&0) {
        return Err(FormatError::field(
            structure,
            field,
            offset,
            "contains a NUL byte",
        ));
    }
    String::from_utf8(data.to_vec())
        .map_err(|e| FormatError::field(structure, field, offset, format!("not UTF-8: {e}")))
}

/// Decodes a feature name table; `None` if any entry is not in the
/// canonical form we would write (then the caller keeps the raw bytes).
fn decode_feature_names(data: &[u8]) -> Option<Vec<FeatureName>> {
    if !data.len().is_multiple_of(FeatureName::ENCODED_LEN) {
        return None;
    }
    let mut names = Vec::with_capacity(data.len() / FeatureName::ENCODED_LEN);
    for entry in data.chunks_exact(FeatureName::ENCODED_LEN) {
        let kind = FeatureKind::from_byte(entry[0])?;
        let raw_name = &entry[2..];
        let name_len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        let name = std::str::from_utf8(&raw_name[..name_len]).ok()?;
        names.push(FeatureName {
            kind,
            bit: entry[1],
            name: name.to_owned(),
        });
    }
    Some(names)
}

fn encode_feature_names(names: &[FeatureName]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(names.len() * FeatureName::ENCODED_LEN);
    for (i, n) in names.iter().enumerate() {
        let offset = (i * FeatureName::ENCODED_LEN) as u64;
        if n.name.len() > FeatureName::NAME_LEN_MAX || n.name.contains('\0') {
            return Err(FormatError::field(
                "feature name table",
                "name",
                offset + 2,
                format!(
                    "{:?}: at most {} bytes, no NUL",
                    n.name,
                    FeatureName::NAME_LEN_MAX
                ),
            ));
        }
        if n.bit > 63 {
            return Err(FormatError::field(
                "feature name table",
                "bit",
                offset + 1,
                format!("{} is not a bit of a u64", n.bit),
            ));
        }
        out.push(n.kind.to_byte());
        out.push(n.bit);
        out.extend_from_slice(n.name.as_bytes());
        out.resize((i + 1) * FeatureName::ENCODED_LEN, 0);
    }
    Ok(out)
}

/// Decodes the extension area `area` (starting at byte `area_offset` of the
/// header cluster) up to the end marker or the end of the area.
pub(crate) fn decode_extensions(
    area: &[u8],
    area_offset: u64,
) -> Result<Vec<HeaderExtension>, FormatError> {
    let mut extensions = Vec::new();
    let mut pos = 0usize;
    // Each extension takes at least 8 bytes, so this bounds the loop.
    let iterations_max = area.len() / 8 + 1;
    for _ in 0..iterations_max {
        if pos >= area.len() {
            // QEMU accepts an extension area that fills the space up to the
            // backing file name without an end marker.
            return Ok(extensions);
        }
        let at = area_offset + pos as u64;
        if area.len() - pos < 8 {
            return Err(FormatError::field(
                STRUCTURE,
                "type",
                at,
                format!(
                    "{} bytes left before the end of the extension area, need 8",
                    area.len() - pos
                ),
            ));
        }
        let kind = be_u32(area, pos, STRUCTURE)?;
        let len = be_u32(area, pos + 4, STRUCTURE)?;
        if kind == EXT_END {
            return Ok(extensions);
        }
        let data_pos = pos + 8;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > area.len() - data_pos {
            return Err(FormatError::field(
                STRUCTURE,
                "length",
                at + 4,
                format!(
                    "extension {kind:#x} of {len} bytes runs past the end of the extension area ({} bytes left)",
                    area.len() - data_pos
                ),
            ));
        }
        let data = slice(area, data_pos, len, STRUCTURE)?;
        extensions.push(HeaderExtension::decode(kind, data, at + 8)?);
        pos = data_pos.saturating_add(pad8(len).unwrap_or(usize::MAX));
    }
    Err(FormatError::field(
        STRUCTURE,
        "type",
        area_offset,
        "too many extensions",
    ))
}
