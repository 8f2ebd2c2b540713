//! The persistent bitmap directory and bitmap table entries.

use super::bytes::{be_u16, be_u32, be_u64, pad8, slice};
use crate::error::FormatError;

const STRUCTURE: &str = "qcow2 bitmap directory";

/// Size of the fixed part of a bitmap directory entry.
pub const BITMAP_DIRECTORY_ENTRY_LEN: usize = 24;
/// QEMU's limit on the number of bitmaps (QCOW2_MAX_BITMAPS).
pub const BITMAPS_MAX: u32 = 65535;
/// QEMU's limit on the directory size (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const BITMAP_DIRECTORY_LEN_MAX: u64 = 64 << 20;
/// Bitmap flag: the bitmap was in use when the image was last written and
/// is inconsistent.
pub const BITMAP_FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: QEMU tracks writes in this bitmap automatically.
pub const BITMAP_FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: extra data may be ignored by readers that do not know it.
pub const BITMAP_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Bits 9..=55 of a bitmap table entry: the data cluster's offset.
pub const BITMAP_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry without an offset: the cluster is all ones.
pub const BITMAP_TABLE_ENTRY_ALL_ONES: u64 = 1;
/// Reserved bits of a bitmap table entry: 1..=8 and 56..=63.
pub const BITMAP_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub bitmap_table_offset: u64,
    /// Entries in the bitmap table.
    pub bitmap_table_size: u32,
    /// `BITMAP_FLAG_*` bits.
    pub flags: u32,
    /// 1: dirty tracking bitmap.
    pub bitmap_type: u8,
    /// log2 of the bytes of guest disk one bit covers.
    pub granularity_bits: u8,
    /// Extra data, kept verbatim.
    pub extra_data: Vec<u8>,
    /// The bitmap's name.
    pub name: String,
}

impl BitmapDirectoryEntry {
    /// Bytes of this entry without trailing padding.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        BITMAP_DIRECTORY_ENTRY_LEN + self.extra_data.len() + self.name.len()
    }
}

/// Decodes `nb_bitmaps` directory entries from `bytes` (the directory, as
/// long as the extension's bitmap_directory_size says). Each entry is padded
/// to 8 bytes.
pub fn decode_bitmap_directory(
    bytes: &[u8],
    nb_bitmaps: u32,
) -> Result<Vec<BitmapDirectoryEntry>, FormatError> {
    if nb_bitmaps > BITMAPS_MAX {
        return Err(FormatError::field(
            "bitmaps extension",
            "nb_bitmaps",
            0,
            format!("{nb_bitmaps}, QEMU allows at most {BITMAPS_MAX}"),
        ));
    }
    let mut entries = Vec::with_capacity((nb_bitmaps as usize).min(1024));
    let mut pos = 0usize;
    for _ in 0..nb_bitmaps {
        let at = pos as u64;
        let fixed = slice(bytes, pos, BITMAP_DIRECTORY_ENTRY_LEN, STRUCTURE)?;
        let name_len = usize::from(be_u16(fixed, 18, STRUCTURE)?);
        let extra_len = usize::try_from(be_u32(fixed, 20, STRUCTURE)?).unwrap_or(usize::MAX);
        let extra_at = pos + BITMAP_DIRECTORY_ENTRY_LEN;
        let extra = slice(bytes, extra_at, extra_len, STRUCTURE)?;
        let name_at = extra_at + extra_len;
        let name = slice(bytes, name_at, name_len, STRUCTURE)?;
        let name = String::from_utf8(name.to_vec()).map_err(|e| {
            FormatError::field(STRUCTURE, "name", name_at as u64, format!("not UTF-8: {e}"))
        })?;
        entries.push(BitmapDirectoryEntry {
            bitmap_table_offset: be_u64(fixed, 0, STRUCTURE)?,
            bitmap_table_size: be_u32(fixed, 8, STRUCTURE)?,
            flags: be_u32(fixed, 12, STRUCTURE)?,
            bitmap_type: fixed[16],
            granularity_bits: fixed[17],
            extra_data: extra.to_vec(),
            name,
        });
        pos = pad8(name_at + name_len).ok_or_else(|| {
            FormatError::field(STRUCTURE, "name_size", at + 18, "entry size overflows")
        })?;
    }
    Ok(entries)
}

/// The directory bytes for `entries`, each padded to 8 bytes.
pub fn encode_bitmap_directory(entries: &[BitmapDirectoryEntry]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    for e in entries {
        let name_len = u16::try_from(e.name.len()).map_err(|_| {
            FormatError::field(
                STRUCTURE,
                "name_size",
                out.len() as u64 + 18,
                "name longer than 65535 bytes",
            )
        })?;
        let extra_len = u32::try_from(e.extra_data.len()).map_err(|_| {
            FormatError::field(
                STRUCTURE,
                "extra_data_size",
                out.len() as u64 + 20,
                "extra data too long",
            )
        })?;
        out.extend_from_slice(&e.bitmap_table_offset.to_be_bytes());
        out.extend_from_slice(&e.bitmap_table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.bitmap_type);
        out.push(e.granularity_bits);
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&e.extra_data);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(pad8(out.len()).unwrap_or(usize::MAX), 0);
    }
    Ok(out)
}
