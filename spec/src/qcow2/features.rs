//! qcow2 feature bits (bit numbers and masks) and the feature name table.
//!
//! QEMU allocates incompatible, compatible and autoclear bits from the
//! bottom. The qjournal bits sit at 60 so that QEMU's growth does not reach
//! them for a long time (the 2013 draft used bits that QEMU has since given
//! to other features).

/// Incompatible bit 0: the image was not closed cleanly; refcounts may be
/// stale (only meaningful with lazy refcounts).
pub const INCOMPAT_DIRTY_BIT: u32 = 0;
/// Incompatible bit 1: QEMU detected metadata corruption.
pub const INCOMPAT_CORRUPT_BIT: u32 = 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE_BIT: u32 = 2;
/// Incompatible bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION_BIT: u32 = 3;
/// Incompatible bit 4: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2_BIT: u32 = 4;
/// Incompatible bit 60 (qjournal): the journal holds committed transactions
/// not yet checkpointed into the metadata, so the metadata alone is stale
/// and a tool that does not know the journal must not open the image.
pub const INCOMPAT_JOURNAL_DIRTY_BIT: u32 = 60;

/// Compatible bit 0: refcounts may be updated lazily (dirty bit guards them).
pub const COMPAT_LAZY_REFCOUNTS_BIT: u32 = 0;

/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS_BIT: u32 = 0;
/// Autoclear bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW_BIT: u32 = 1;
/// Autoclear bit 60 (qjournal): the journal extension is consistent with
/// the image. A writer that does not know the journal clears it, which tells
/// us to discard the journal instead of replaying it over newer metadata.
pub const AUTOCLEAR_JOURNAL_VALID_BIT: u32 = 60;

/// Mask of [`INCOMPAT_DIRTY_BIT`].
pub const INCOMPAT_DIRTY_MASK: u64 = 1 << INCOMPAT_DIRTY_BIT;
/// Mask of [`INCOMPAT_CORRUPT_BIT`].
pub const INCOMPAT_CORRUPT_MASK: u64 = 1 << INCOMPAT_CORRUPT_BIT;
/// Mask of [`INCOMPAT_DATA_FILE_BIT`].
pub const INCOMPAT_DATA_FILE_MASK: u64 = 1 << INCOMPAT_DATA_FILE_BIT;
/// Mask of [`INCOMPAT_COMPRESSION_BIT`].
pub const INCOMPAT_COMPRESSION_MASK: u64 = 1 << INCOMPAT_COMPRESSION_BIT;
/// Mask of [`INCOMPAT_EXTL2_BIT`].
pub const INCOMPAT_EXTL2_MASK: u64 = 1 << INCOMPAT_EXTL2_BIT;
/// Mask of [`INCOMPAT_JOURNAL_DIRTY_BIT`].
pub const INCOMPAT_JOURNAL_DIRTY_MASK: u64 = 1 << INCOMPAT_JOURNAL_DIRTY_BIT;
/// Every incompatible bit this crate has a name for.
pub const INCOMPAT_KNOWN_MASK: u64 = INCOMPAT_DIRTY_MASK
    | INCOMPAT_CORRUPT_MASK
    | INCOMPAT_DATA_FILE_MASK
    | INCOMPAT_COMPRESSION_MASK
    | INCOMPAT_EXTL2_MASK
    | INCOMPAT_JOURNAL_DIRTY_MASK;
/// Mask of [`COMPAT_LAZY_REFCOUNTS_BIT`].
pub const COMPAT_LAZY_REFCOUNTS_MASK: u64 = 1 << COMPAT_LAZY_REFCOUNTS_BIT;
/// Mask of [`AUTOCLEAR_BITMAPS_BIT`].
pub const AUTOCLEAR_BITMAPS_MASK: u64 = 1 << AUTOCLEAR_BITMAPS_BIT;
/// Mask of [`AUTOCLEAR_DATA_FILE_RAW_BIT`].
pub const AUTOCLEAR_DATA_FILE_RAW_MASK: u64 = 1 << AUTOCLEAR_DATA_FILE_RAW_BIT;
/// Mask of [`AUTOCLEAR_JOURNAL_VALID_BIT`].
pub const AUTOCLEAR_JOURNAL_VALID_MASK: u64 = 1 << AUTOCLEAR_JOURNAL_VALID_BIT;

/// Which of the three feature bitmaps a feature-name-table entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features` (type 0).
    Incompatible,
    /// `compatible_features` (type 1).
    Compatible,
    /// `autoclear_features` (type 2).
    Autoclear,
}

impl FeatureKind {
    /// The on-disk type byte.
    #[must_use]
    pub const fn to_byte(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        }
    }

    /// The kind for an on-disk type byte, `None` for types qcow2 does not define.
    #[must_use]
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }
}

/// One 48-byte entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which feature bitmap the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number (0..=63).
    pub bit: u8,
    /// Human-readable name, at most [`FeatureName::NAME_LEN_MAX`] bytes, no NUL.
    pub name: String,
}

impl FeatureName {
    /// Size of one on-disk entry: type, bit, 46 bytes of NUL-padded name.
    pub const ENCODED_LEN: usize = 48;
    /// Longest name an entry holds.
    pub const NAME_LEN_MAX: usize = 46;

    /// An entry; a convenience for building tables.
    #[must_use]
    pub fn new(kind: FeatureKind, bit: u8, name: &str) -> Self {
        FeatureName {
            kind,
            bit,
            name: name.to_owned(),
        }
    }
}

/// The feature name table this project writes: QEMU's standard names
/// (exact strings of QEMU 10's block/qcow2.c, so that a table we write is
/// the table QEMU writes, plus ours) followed by the two qjournal bits.
/// QEMU prints the name instead of the bit number when refusing an image
/// with an unknown incompatible bit, so "journal dirty" is what a user of an
/// older tool sees.
#[must_use]
pub fn qjournal_feature_names() -> Vec<FeatureName> {
    use FeatureKind::{Autoclear, Compatible, Incompatible};
    let bit = |b: u32| u8::try_from(b).unwrap_or(u8::MAX);
    vec![
        FeatureName::new(Incompatible, bit(INCOMPAT_DIRTY_BIT), "dirty bit"),
        FeatureName::new(Incompatible, bit(INCOMPAT_CORRUPT_BIT), "corrupt bit"),
        FeatureName::new(
            Incompatible,
            bit(INCOMPAT_DATA_FILE_BIT),
            "external data file",
        ),
        FeatureName::new(
            Incompatible,
            bit(INCOMPAT_COMPRESSION_BIT),
            "compression type",
        ),
        FeatureName::new(Incompatible, bit(INCOMPAT_EXTL2_BIT), "extended L2 entries"),
        FeatureName::new(Compatible, bit(COMPAT_LAZY_REFCOUNTS_BIT), "lazy refcounts"),
        FeatureName::new(Autoclear, bit(AUTOCLEAR_BITMAPS_BIT), "bitmaps"),
        FeatureName::new(
            Autoclear,
            bit(AUTOCLEAR_DATA_FILE_RAW_BIT),
            "raw external data",
        ),
        FeatureName::new(
            Incompatible,
            bit(INCOMPAT_JOURNAL_DIRTY_BIT),
            "journal dirty",
        ),
        FeatureName::new(Autoclear, bit(AUTOCLEAR_JOURNAL_VALID_BIT), "journal valid"),
    ]
}
