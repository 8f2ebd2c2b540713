//! The qcow2 header: the fixed fields, the extensions and the backing file
//! name, all inside the first cluster of the image.

use std::borrow::Cow;

use super::bytes::{be_u32, be_u64, slice};
use super::extension::{
    decode_extensions, BitmapsExtension, HeaderExtension, JournalExtension, EXT_BITMAPS,
    EXT_JOURNAL,
};
use super::features::*;
use super::QCOW2_MAGIC;
use crate::error::FormatError;
use crate::units::Geometry;

const STRUCTURE: &str = "qcow2 header";

/// Length of the version 2 header (and of the fields common to v2 and v3).
pub const HEADER_V2_LEN: u32 = 72;
/// Minimum length of a version 3 header (without the compression type).
pub const HEADER_V3_MIN_LEN: u32 = 104;
/// Length of a version 3 header with the compression type byte and its padding.
pub const HEADER_V3_COMPRESSION_LEN: u32 = 112;
/// Longest backing file name QEMU accepts.
pub const BACKING_FILE_NAME_LEN_MAX: u32 = 1023;
/// QEMU's limit on the active L1 table (QCOW_MAX_L1_SIZE): 32 MiB.
pub const L1_SIZE_BYTES_MAX: u64 = 32 << 20;
/// QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE): 8 MiB.
pub const REFCOUNT_TABLE_SIZE_BYTES_MAX: u64 = 8 << 20;
/// QEMU's limit on the number of snapshots (QCOW_MAX_SNAPSHOTS).
pub const SNAPSHOTS_MAX: u32 = 65536;
/// Largest virtual size we accept: QEMU's L1 limit with 2 MiB clusters maps
/// 2^61 bytes, and no qcow2 geometry maps more.
pub const VIRTUAL_SIZE_BYTES_MAX: u64 = 1 << 61;
/// crypt_method: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// crypt_method: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// crypt_method: LUKS.
pub const CRYPT_LUKS: u32 = 2;
/// compression_type: zlib (the default; the only one we support).
pub const COMPRESSION_ZLIB: u8 = 0;
/// compression_type: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// The decoded qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in the header cluster (0: none).
    /// [`Header::encode`] recomputes it from `backing_file`.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes. Recomputed by `encode`.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table (cluster aligned).
    pub l1_table_offset: u64,
    /// Offset of the refcount table (cluster aligned).
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table (cluster aligned).
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3; 0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3; 0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v2: always 4).
    pub refcount_order: u32,
    /// Length of the fixed header in bytes (v2: 72).
    pub header_length: u32,
    /// 0 zlib, 1 zstd; only stored when header_length > 104.
    pub compression_type: u8,
    /// Bytes of header fields newer than this implementation (from byte
    /// 112 to `header_length`), preserved as QEMU preserves them.
    pub unknown_header_fields: Vec<u8>,
    /// The extensions in file order, without the end marker.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

fn field(name: &'static str, offset: u64, reason: impl Into<String>) -> FormatError {
    FormatError::field(STRUCTURE, name, offset, reason)
}

impl Header {
    /// A version 3 header with 112-byte fixed part (as QEMU 10 writes it),
    /// zlib compression, no features, no extensions, and every table offset
    /// zero: the caller fills in the layout.
    #[must_use]
    pub fn new_v3(geometry: Geometry, size: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: geometry.cluster_bits,
            size,
            crypt_method: CRYPT_NONE,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: geometry.refcount_order,
            header_length: HEADER_V3_COMPRESSION_LEN,
            compression_type: COMPRESSION_ZLIB,
            unknown_header_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        }
    }

    /// Parses the header from the first bytes of the image (pass at least
    /// the first cluster, or the whole file if it is shorter; missing bytes
    /// of the first cluster read as zeros, as they do from a short file).
    ///
    /// Checks magic, version, header_length (>= 104 for v3, multiple of 8,
    /// within the cluster), cluster_bits 9..=21, refcount_order 0..=6,
    /// crypt_method, extension framing and backing file name bounds.
    /// Unsupported features are not refused here (see
    /// [`Header::unsupported_features`]) so that `info` and `check` can still
    /// describe the image; table offsets are checked by
    /// [`Header::validate_layout`].
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let have = bytes.len() as u64;
        if bytes.len() < HEADER_V2_LEN as usize {
            return Err(FormatError::Truncated {
                structure: STRUCTURE,
                need: u64::from(HEADER_V2_LEN),
                have,
            });
        }
        let magic = be_u32(bytes, 0, STRUCTURE)?;
        if magic != QCOW2_MAGIC {
            return Err(field(
                "magic",
                0,
                format!("{magic:#010x}, expected {QCOW2_MAGIC:#010x}"),
            ));
        }
        let version = be_u32(bytes, 4, STRUCTURE)?;
        if version != 2 && version != 3 {
            return Err(field(
                "version",
                4,
                format!("{version}, only 2 and 3 exist"),
            ));
        }
        let cluster_bits = be_u32(bytes, 20, STRUCTURE)?;
        if !(Geometry::CLUSTER_BITS_MIN..=Geometry::CLUSTER_BITS_MAX).contains(&cluster_bits) {
            return Err(field(
                "cluster_bits",
                20,
                format!(
                    "{cluster_bits}, must be {}..={}",
                    Geometry::CLUSTER_BITS_MIN,
                    Geometry::CLUSTER_BITS_MAX
                ),
            ));
        }
        let cluster_size = 1usize << cluster_bits;

        let mut h = Header {
            version,
            backing_file_offset: be_u64(bytes, 8, STRUCTURE)?,
            backing_file_size: be_u32(bytes, 16, STRUCTURE)?,
            cluster_bits,
            size: be_u64(bytes, 24, STRUCTURE)?,
            crypt_method: be_u32(bytes, 32, STRUCTURE)?,
            l1_size: be_u32(bytes, 36, STRUCTURE)?,
            l1_table_offset: be_u64(bytes, 40, STRUCTURE)?,
            refcount_table_offset: be_u64(bytes, 48, STRUCTURE)?,
            refcount_table_clusters: be_u32(bytes, 56, STRUCTURE)?,
            nb_snapshots: be_u32(bytes, 60, STRUCTURE)?,
            snapshots_offset: be_u64(bytes, 64, STRUCTURE)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_V2_LEN,
            compression_type: COMPRESSION_ZLIB,
            unknown_header_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };

        if version == 3 {
            if bytes.len() < HEADER_V3_MIN_LEN as usize {
                return Err(FormatError::Truncated {
                    structure: STRUCTURE,
                    need: u64::from(HEADER_V3_MIN_LEN),
                    have,
                });
            }
            h.incompatible_features = be_u64(bytes, 72, STRUCTURE)?;
            h.compatible_features = be_u64(bytes, 80, STRUCTURE)?;
            h.autoclear_features = be_u64(bytes, 88, STRUCTURE)?;
            h.refcount_order = be_u32(bytes, 96, STRUCTURE)?;
            h.header_length = be_u32(bytes, 100, STRUCTURE)?;
            if h.header_length < HEADER_V3_MIN_LEN {
                return Err(field(
                    "header_length",
                    100,
                    format!(
                        "{}, version 3 needs at least {HEADER_V3_MIN_LEN}",
                        h.header_length
                    ),
                ));
            }
            if !h.header_length.is_multiple_of(8) {
                return Err(field(
                    "header_length",
                    100,
                    format!("{}, must be a multiple of 8", h.header_length),
                ));
            }
            if h.header_length as usize > cluster_size {
                return Err(field(
                    "header_length",
                    100,
                    format!(
                        "{}, exceeds the cluster size {cluster_size}",
                        h.header_length
                    ),
                ));
            }
            let header_len = h.header_length as usize;
            if bytes.len() < header_len {
                return Err(FormatError::Truncated {
                    structure: STRUCTURE,
                    need: u64::from(h.header_length),
                    have,
                });
            }
            if h.header_length > HEADER_V3_MIN_LEN {
                h.compression_type = bytes[HEADER_V3_MIN_LEN as usize];
            }
            if h.header_length > HEADER_V3_COMPRESSION_LEN {
                h.unknown_header_fields =
                    bytes[HEADER_V3_COMPRESSION_LEN as usize..header_len].to_vec();
            }
        }

        if h.refcount_order > Geometry::REFCOUNT_ORDER_MAX {
            return Err(field(
                "refcount_order",
                96,
                format!(
                    "{}, at most {} (64-bit refcounts)",
                    h.refcount_order,
                    Geometry::REFCOUNT_ORDER_MAX
                ),
            ));
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(field(
                "crypt_method",
                32,
                format!("{}, must be 0, 1 or 2", h.crypt_method),
            ));
        }

        // Missing bytes of the first cluster read as zeros, like the tail of
        // a short file does through `Storage::read_at`.
        let cluster: Cow<[u8]> = if bytes.len() >= cluster_size {
            Cow::Borrowed(&bytes[..cluster_size])
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(cluster_size, 0);
            Cow::Owned(padded)
        };

        let extensions_end = if h.backing_file_offset != 0 {
            if h.backing_file_offset < u64::from(h.header_length) {
                return Err(field(
                    "backing_file_offset",
                    8,
                    format!(
                        "{} lies inside the fixed header ({} bytes)",
                        h.backing_file_offset, h.header_length
                    ),
                ));
            }
            if h.backing_file_offset > cluster_size as u64 {
                return Err(field(
                    "backing_file_offset",
                    8,
                    format!(
                        "{}, past the header cluster ({cluster_size} bytes)",
                        h.backing_file_offset
                    ),
                ));
            }
            if h.backing_file_size > BACKING_FILE_NAME_LEN_MAX
                || h.backing_file_offset + u64::from(h.backing_file_size) > cluster_size as u64
            {
                return Err(field(
                    "backing_file_size",
                    16,
                    format!(
                        "{} bytes at offset {}: longer than {BACKING_FILE_NAME_LEN_MAX} or past the header cluster",
                        h.backing_file_size, h.backing_file_offset
                    ),
                ));
            }
            // Both bounds were checked against the cluster size just above.
            let name_at = h.backing_file_offset as usize;
            let name = slice(&cluster, name_at, h.backing_file_size as usize, STRUCTURE)?;
            let name = String::from_utf8(name.to_vec()).map_err(|e| {
                field(
                    "backing file name",
                    h.backing_file_offset,
                    format!("not UTF-8: {e}"),
                )
            })?;
            h.backing_file = Some(name);
            name_at
        } else {
            cluster_size
        };

        let header_len = h.header_length as usize;
        let area = slice(&cluster, header_len, extensions_end - header_len, STRUCTURE)?;
        h.extensions = decode_extensions(area, u64::from(h.header_length))?;
        Ok(h)
    }

    /// The full header cluster (exactly one cluster of bytes): fixed part
    /// (v3: 104 bytes, or 112 and more when the compression type or newer
    /// fields are written; `header_length` is kept if larger), extensions
    /// each padded to 8, end marker, then the backing file name, with
    /// backing_file_offset/size set to where the name landed. Err if a field
    /// cannot be represented or the result does not fit in one cluster.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.version != 2 && self.version != 3 {
            return Err(field(
                "version",
                4,
                format!("{}, only 2 and 3 exist", self.version),
            ));
        }
        if !(Geometry::CLUSTER_BITS_MIN..=Geometry::CLUSTER_BITS_MAX).contains(&self.cluster_bits) {
            return Err(field(
                "cluster_bits",
                20,
                format!("{} out of range", self.cluster_bits),
            ));
        }
        if self.refcount_order > Geometry::REFCOUNT_ORDER_MAX {
            return Err(field(
                "refcount_order",
                96,
                format!("{} out of range", self.refcount_order),
            ));
        }
        let cluster_size = 1usize << self.cluster_bits;
        let fixed_len = if self.version == 2 {
            if self.incompatible_features != 0
                || self.compatible_features != 0
                || self.autoclear_features != 0
                || self.refcount_order != 4
                || self.compression_type != COMPRESSION_ZLIB
                || !self.unknown_header_fields.is_empty()
            {
                return Err(field(
                    "version",
                    4,
                    "version 2 cannot store feature bits, refcount_order other than 4, a compression type or extra header fields",
                ));
            }
            HEADER_V2_LEN as usize
        } else {
            if !self.header_length.is_multiple_of(8)
                || !self.unknown_header_fields.len().is_multiple_of(8)
            {
                return Err(field(
                    "header_length",
                    100,
                    format!(
                        "{} (with {} bytes of newer fields): must be a multiple of 8",
                        self.header_length,
                        self.unknown_header_fields.len()
                    ),
                ));
            }
            let needed = if self.compression_type != COMPRESSION_ZLIB
                || !self.unknown_header_fields.is_empty()
            {
                HEADER_V3_COMPRESSION_LEN as usize + self.unknown_header_fields.len()
            } else {
                HEADER_V3_MIN_LEN as usize
            };
            needed.max(self.header_length as usize)
        };
        let too_big = |what: &str, at: usize| {
            field(
                "header_length",
                100,
                format!("{what} ends at byte {at}, past the header cluster ({cluster_size} bytes)"),
            )
        };
        if fixed_len > cluster_size {
            return Err(too_big("fixed header", fixed_len));
        }

        let mut buf = vec![0u8; cluster_size];
        let mut pos = fixed_len;
        for ext in &self.extensions {
            let framed = ext.encode()?;
            let end = pos + framed.len();
            if end > cluster_size {
                return Err(too_big("header extensions", end));
            }
            buf[pos..end].copy_from_slice(&framed);
            pos = end;
        }
        // End marker: type 0, length 0 (the buffer is already zero).
        pos += 8;
        if pos > cluster_size {
            return Err(too_big("extension end marker", pos));
        }
        let (backing_offset, backing_size) = match &self.backing_file {
            Some(name) => {
                let len = name.len();
                if len > BACKING_FILE_NAME_LEN_MAX as usize {
                    return Err(field(
                        "backing_file_size",
                        16,
                        format!("{len} bytes, at most {BACKING_FILE_NAME_LEN_MAX}"),
                    ));
                }
                if pos + len > cluster_size {
                    return Err(too_big("backing file name", pos + len));
                }
                buf[pos..pos + len].copy_from_slice(name.as_bytes());
                (pos as u64, len as u32)
            }
            None => (0, 0),
        };

        let put32 =
            |buf: &mut [u8], at: usize, v: u32| buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |buf: &mut [u8], at: usize, v: u64| buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut buf, 0, QCOW2_MAGIC);
        put32(&mut buf, 4, self.version);
        put64(&mut buf, 8, backing_offset);
        put32(&mut buf, 16, backing_size);
        put32(&mut buf, 20, self.cluster_bits);
        put64(&mut buf, 24, self.size);
        put32(&mut buf, 32, self.crypt_method);
        put32(&mut buf, 36, self.l1_size);
        put64(&mut buf, 40, self.l1_table_offset);
        put64(&mut buf, 48, self.refcount_table_offset);
        put32(&mut buf, 56, self.refcount_table_clusters);
        put32(&mut buf, 60, self.nb_snapshots);
        put64(&mut buf, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut buf, 72, self.incompatible_features);
            put64(&mut buf, 80, self.compatible_features);
            put64(&mut buf, 88, self.autoclear_features);
            put32(&mut buf, 96, self.refcount_order);
            // fixed_len <= cluster_size <= 2 MiB, so it fits in u32.
            put32(&mut buf, 100, fixed_len as u32);
            if fixed_len > HEADER_V3_MIN_LEN as usize {
                buf[HEADER_V3_MIN_LEN as usize] = self.compression_type;
            }
            let unknown_at = HEADER_V3_COMPRESSION_LEN as usize;
            buf[unknown_at..unknown_at + self.unknown_header_fields.len()]
                .copy_from_slice(&self.unknown_header_fields);
        }
        Ok(buf)
    }

    /// The cluster and refcount geometry.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
        }
    }

    /// Whether incompatible bit `bit` is set.
    #[must_use]
    pub fn has_incompatible(&self, bit: u32) -> bool {
        bit < 64 && self.incompatible_features & (1 << bit) != 0
    }

    /// Whether autoclear bit `bit` is set.
    #[must_use]
    pub fn has_autoclear(&self, bit: u32) -> bool {
        bit < 64 && self.autoclear_features & (1 << bit) != 0
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        self.has_incompatible(INCOMPAT_DIRTY_BIT)
    }

    /// Whether the corrupt bit is set.
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        self.has_incompatible(INCOMPAT_CORRUPT_BIT)
    }

    /// Returns Err naming the first feature this implementation cannot
    /// handle: encryption, external data file, extended L2 entries, a
    /// compression type other than zlib (or the compression bit set with
    /// zlib, which QEMU also refuses), any incompatible bit we do not know,
    /// and last the corrupt bit ([`FormatError::MarkedCorrupt`]). The dirty
    /// bit and the journal-dirty bit are handled by the engine (refcount
    /// rebuild, journal replay) and are accepted here.
    pub fn unsupported_features(&self) -> Result<(), FormatError> {
        let unsupported = |what: &str| Err(FormatError::Unsupported(what.to_owned()));
        if self.crypt_method != CRYPT_NONE {
            return unsupported(if self.crypt_method == CRYPT_AES {
                "encryption (AES)"
            } else {
                "encryption (LUKS)"
            });
        }
        if self.has_incompatible(INCOMPAT_DATA_FILE_BIT)
            || self
                .extensions
                .iter()
                .any(|e| matches!(e, HeaderExtension::ExternalDataFile(_)))
        {
            return unsupported("external data file");
        }
        if self.has_incompatible(INCOMPAT_EXTL2_BIT) {
            return unsupported("extended L2 entries");
        }
        match self.compression_type {
            COMPRESSION_ZLIB => {
                if self.has_incompatible(INCOMPAT_COMPRESSION_BIT) {
                    return Err(field(
                        "incompatible_features",
                        72,
                        "compression type bit (3) is set but the compression type is zlib",
                    ));
                }
            }
            COMPRESSION_ZSTD => return unsupported("compression type zstd"),
            other => return unsupported(&format!("compression type {other}")),
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN_MASK;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self.feature_name(FeatureKind::Incompatible, bit);
            return unsupported(&match name {
                Some(name) => format!("unknown incompatible feature bit {bit} ({name})"),
                None => format!("unknown incompatible feature bit {bit}"),
            });
        }
        if self.is_corrupt() {
            return Err(FormatError::MarkedCorrupt);
        }
        Ok(())
    }

    /// The name the image's own feature name table gives a bit, if any.
    #[must_use]
    pub fn feature_name(&self, kind: FeatureKind, bit: u32) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::FeatureNameTable(names) => names
                .iter()
                .find(|n| n.kind == kind && u32::from(n.bit) == bit)
                .map(|n| n.name.as_str()),
            _ => None,
        })
    }

    /// Structural checks against the file length: table offsets aligned and
    /// inside the file, the refcount table clear of the header cluster, table
    /// sizes within QEMU's limits, L1 large enough for `size`. Every error
    /// names the field.
    pub fn validate_layout(&self, file_len: u64) -> Result<(), FormatError> {
        let g = self.geometry();
        if !(Geometry::CLUSTER_BITS_MIN..=Geometry::CLUSTER_BITS_MAX).contains(&self.cluster_bits)
            || self.refcount_order > Geometry::REFCOUNT_ORDER_MAX
        {
            return Err(field(
                "cluster_bits",
                20,
                "geometry out of range; decode the header first",
            ));
        }
        let cluster_size = g.cluster_size();
        if self.size > VIRTUAL_SIZE_BYTES_MAX {
            return Err(field(
                "size",
                24,
                format!("{} bytes, at most 2^61", self.size),
            ));
        }

        // L1 table.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > L1_SIZE_BYTES_MAX {
            return Err(field(
                "l1_size",
                36,
                format!(
                    "{} entries ({l1_bytes} bytes), QEMU allows at most {L1_SIZE_BYTES_MAX} bytes",
                    self.l1_size
                ),
            ));
        }
        let l1_needed = g.l1_entries_for(self.size);
        if u64::from(self.l1_size) < l1_needed {
            return Err(field(
                "l1_size",
                36,
                format!(
                    "{} entries, a disk of {} bytes needs {l1_needed}",
                    self.l1_size, self.size
                ),
            ));
        }
        if !g.is_aligned(self.l1_table_offset) {
            return Err(field(
                "l1_table_offset",
                40,
                format!("{:#x} is not cluster aligned", self.l1_table_offset),
            ));
        }
        if self.l1_size > 0 {
            if self.l1_table_offset == 0 {
                return Err(field(
                    "l1_table_offset",
                    40,
                    "0 overlaps the header cluster",
                ));
            }
            let end = self.l1_table_offset.checked_add(l1_bytes);
            if end.is_none_or(|end| end > file_len) {
                return Err(field(
                    "l1_table_offset",
                    40,
                    format!("table of {l1_bytes} bytes at {:#x} runs past the end of the file ({file_len} bytes)", self.l1_table_offset),
                ));
            }
        }

        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(field(
                "refcount_table_clusters",
                56,
                "0: the image has no refcount table",
            ));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if reftable_bytes > REFCOUNT_TABLE_SIZE_BYTES_MAX {
            return Err(field(
                "refcount_table_clusters",
                56,
                format!(
                    "{} clusters ({reftable_bytes} bytes), QEMU allows at most {REFCOUNT_TABLE_SIZE_BYTES_MAX} bytes",
                    self.refcount_table_clusters
                ),
            ));
        }
        if !g.is_aligned(self.refcount_table_offset) {
            return Err(field(
                "refcount_table_offset",
                48,
                format!("{:#x} is not cluster aligned", self.refcount_table_offset),
            ));
        }
        if self.refcount_table_offset < cluster_size {
            return Err(field(
                "refcount_table_offset",
                48,
                "overlaps the header cluster",
            ));
        }
        let end = self.refcount_table_offset.checked_add(reftable_bytes);
        if end.is_none_or(|end| end > file_len) {
            return Err(field(
                "refcount_table_offset",
                48,
                format!(
                    "table of {reftable_bytes} bytes at {:#x} runs past the end of the file ({file_len} bytes)",
                    self.refcount_table_offset
                ),
            ));
        }

        // Snapshot table.
        if self.nb_snapshots > SNAPSHOTS_MAX {
            return Err(field(
                "nb_snapshots",
                60,
                format!("{}, QEMU allows at most {SNAPSHOTS_MAX}", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            if !g.is_aligned(self.snapshots_offset) || self.snapshots_offset == 0 {
                return Err(field(
                    "snapshots_offset",
                    64,
                    format!(
                        "{:#x} is not a cluster-aligned offset past the header",
                        self.snapshots_offset
                    ),
                ));
            }
            if self.snapshots_offset >= file_len {
                return Err(field(
                    "snapshots_offset",
                    64,
                    format!(
                        "{:#x} is past the end of the file ({file_len} bytes)",
                        self.snapshots_offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The first extension of type `kind`.
    #[must_use]
    pub fn find_extension(&self, kind: u32) -> Option<&HeaderExtension> {
        self.extensions.iter().find(|e| e.kind() == kind)
    }

    /// The backing file format name, if the extension is present.
    #[must_use]
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The bitmaps extension, if present.
    #[must_use]
    pub fn bitmaps(&self) -> Option<BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }

    /// The qjournal extension, if present.
    #[must_use]
    pub fn journal(&self) -> Option<JournalExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Journal(j) => Some(*j),
            _ => None,
        })
    }

    /// Replaces the qjournal extension (or removes it with `None`), keeping
    /// the position of an existing one so other extensions do not move.
    pub fn set_journal(&mut self, journal: Option<JournalExtension>) {
        let at = self.extensions.iter().position(|e| e.kind() == EXT_JOURNAL);
        match (at, journal) {
            (Some(i), Some(j)) => self.extensions[i] = HeaderExtension::Journal(j),
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(j)) => self.extensions.push(HeaderExtension::Journal(j)),
            (None, None) => {}
        }
    }

    /// Replaces the bitmaps extension (or removes it with `None`), keeping
    /// the position of an existing one so other extensions do not move.
    pub fn set_bitmaps(&mut self, bitmaps: Option<BitmapsExtension>) {
        let at = self.extensions.iter().position(|e| e.kind() == EXT_BITMAPS);
        match (at, bitmaps) {
            (Some(i), Some(b)) => self.extensions[i] = HeaderExtension::Bitmaps(b),
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(b)) => self.extensions.push(HeaderExtension::Bitmaps(b)),
            (None, None) => {}
        }
    }
}
