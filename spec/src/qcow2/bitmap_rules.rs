//! What makes a bitmap directory, a directory entry and a bitmap table entry
//! valid (QEMU's `check_dir_entry` and `check_table_entry` in
//! block/qcow2-bitmap.c), and the bitmap layout every reader and writer
//! must agree on.
//!
//! Each rule names the field it rejects, so that a refused image tells the
//! user which byte is wrong.

use super::bitmap::{
    BitmapDirectoryEntry, BITMAPS_MAX, BITMAP_DIRECTORY_LEN_MAX, BITMAP_FLAG_AUTO,
    BITMAP_FLAG_EXTRA_DATA_COMPATIBLE, BITMAP_FLAG_IN_USE, BITMAP_TABLE_ENTRY_ALL_ONES,
    BITMAP_TABLE_ENTRY_OFFSET_MASK, BITMAP_TABLE_ENTRY_RESERVED_MASK,
};
use super::extension::BitmapsExtension;
use crate::error::FormatError;

const DIRECTORY: &str = "qcow2 bitmap directory";
const EXTENSION: &str = "bitmaps extension";
const TABLE: &str = "qcow2 bitmap table";

/// Smallest granularity QEMU accepts: 512 bytes per bit (BME_MIN_GRANULARITY_BITS).
pub const BITMAP_GRANULARITY_BITS_MIN: u8 = 9;
/// Largest granularity QEMU accepts: 2 GiB per bit (BME_MAX_GRANULARITY_BITS).
pub const BITMAP_GRANULARITY_BITS_MAX: u8 = 31;
/// The only bitmap type: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's BME_MAX_NAME_SIZE.
pub const BITMAP_NAME_LEN_MAX: usize = 1023;
/// QEMU's BME_MAX_TABLE_SIZE: entries of one bitmap table.
pub const BITMAP_TABLE_ENTRIES_MAX: u64 = 0x800_0000;
/// Every flag the format defines.
pub const BITMAP_FLAGS_KNOWN: u32 =
    BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO | BITMAP_FLAG_EXTRA_DATA_COMPATIBLE;

/// Bits a bitmap of `granularity_bits` has for a disk of `disk_size_bytes`.
#[must_use]
pub fn bitmap_bit_count(disk_size_bytes: u64, granularity_bits: u8) -> u64 {
    disk_size_bytes.div_ceil(1u64 << granularity_bits)
}

/// Entries of the bitmap table of such a bitmap: one per cluster of bitmap
/// data, each bit of data covering one granule (qcow2.txt "Bitmap table").
#[must_use]
pub fn bitmap_table_entries(disk_size_bytes: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_bit_count(disk_size_bytes, granularity_bits).div_ceil(cluster_size * 8)
}

/// The bitmaps extension's own fields: a bitmap count and a directory size
/// within QEMU's limits, and a cluster-aligned directory offset.
pub fn validate_bitmaps_extension(
    ext: &BitmapsExtension,
    cluster_size: u64,
) -> Result<(), FormatError> {
    if ext.nb_bitmaps == 0 || ext.nb_bitmaps > BITMAPS_MAX {
        return Err(FormatError::field(
            EXTENSION,
            "nb_bitmaps",
            0,
            format!("{}, must be 1 to {BITMAPS_MAX}", ext.nb_bitmaps),
        ));
    }
    if ext.bitmap_directory_size == 0 || ext.bitmap_directory_size > BITMAP_DIRECTORY_LEN_MAX {
        return Err(FormatError::field(
            EXTENSION,
            "bitmap_directory_size",
            8,
            format!(
                "{}, must be 1 to {BITMAP_DIRECTORY_LEN_MAX} bytes",
                ext.bitmap_directory_size
            ),
        ));
    }
    if ext.bitmap_directory_offset == 0 || !ext.bitmap_directory_offset.is_multiple_of(cluster_size)
    {
        return Err(FormatError::field(
            EXTENSION,
            "bitmap_directory_offset",
            16,
            format!(
                "{:#x} is not a cluster-aligned offset past the header",
                ext.bitmap_directory_offset
            ),
        ));
    }
    Ok(())
}

/// The entries decoded from a directory must fill its `directory_size`
/// bytes exactly (QEMU's bitmap_list_load).
pub fn validate_directory_fill(
    entries: &[BitmapDirectoryEntry],
    directory_size: u64,
) -> Result<(), FormatError> {
    let used: u64 = entries
        .iter()
        .map(|e| e.encoded_len().next_multiple_of(8) as u64)
        .sum();
    if used != directory_size {
        return Err(FormatError::field(
            EXTENSION,
            "bitmap_directory_size",
            8,
            format!(
                "{directory_size} bytes, but its {} entries use {used}",
                entries.len()
            ),
        ));
    }
    Ok(())
}

/// One directory entry, found at byte `at` of the directory, for an image
/// of `cluster_size` and a disk of `disk_size_bytes`. A bitmap in use may
/// be stale in size (QEMU allows that), any other must cover the disk.
pub fn validate_bitmap_entry(
    e: &BitmapDirectoryEntry,
    at: u64,
    cluster_size: u64,
    disk_size_bytes: u64,
) -> Result<(), FormatError> {
    let bad = |field: &'static str, delta: u64, reason: String| {
        Err(FormatError::field(DIRECTORY, field, at + delta, reason))
    };
    let name = &e.name;
    if e.bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
        return bad(
            "type",
            16,
            format!(
                "bitmap {name:?}: type {} is unknown (1: dirty tracking)",
                e.bitmap_type
            ),
        );
    }
    if !(BITMAP_GRANULARITY_BITS_MIN..=BITMAP_GRANULARITY_BITS_MAX).contains(&e.granularity_bits) {
        return bad(
            "granularity_bits",
            17,
            format!(
                "bitmap {name:?}: {} is out of range ({BITMAP_GRANULARITY_BITS_MIN} to {BITMAP_GRANULARITY_BITS_MAX})",
                e.granularity_bits
            ),
        );
    }
    if e.flags & !BITMAP_FLAGS_KNOWN != 0 {
        return bad(
            "flags",
            12,
            format!(
                "bitmap {name:?}: unknown flags {:#x}",
                e.flags & !BITMAP_FLAGS_KNOWN
            ),
        );
    }
    if name.is_empty() || name.len() > BITMAP_NAME_LEN_MAX {
        return bad(
            "name_size",
            18,
            format!("{} bytes, must be 1 to {BITMAP_NAME_LEN_MAX}", name.len()),
        );
    }
    if e.bitmap_table_offset == 0 || !e.bitmap_table_offset.is_multiple_of(cluster_size) {
        return bad(
            "bitmap_table_offset",
            0,
            format!(
                "bitmap {name:?}: {:#x} is not a cluster-aligned offset past the header",
                e.bitmap_table_offset
            ),
        );
    }
    let entries = u64::from(e.bitmap_table_size);
    if entries == 0 || entries > BITMAP_TABLE_ENTRIES_MAX {
        return bad(
            "bitmap_table_size",
            8,
            format!("bitmap {name:?}: {entries} entries, must be 1 to {BITMAP_TABLE_ENTRIES_MAX}"),
        );
    }
    // QEMU's rule: a consistent bitmap covers at least the disk (an
    // in-use one may be stale after a resize).
    let needed = bitmap_table_entries(disk_size_bytes, e.granularity_bits, cluster_size);
    if e.flags & BITMAP_FLAG_IN_USE == 0 && entries < needed {
        return bad(
            "bitmap_table_size",
            8,
            format!(
                "bitmap {name:?}: {entries} entries, but a disk of {disk_size_bytes} bytes needs {needed}"
            ),
        );
    }
    Ok(())
}

/// Entry `index` of a bitmap table: reserved bits clear, and an entry with
/// a cluster offset is cluster aligned and has no all-ones flag.
pub fn validate_bitmap_table_entry(
    entry: u64,
    index: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
    let problem = if entry & BITMAP_TABLE_ENTRY_RESERVED_MASK != 0 {
        "has reserved bits set"
    } else if offset != 0 && entry & BITMAP_TABLE_ENTRY_ALL_ONES != 0 {
        "has both an offset and the all-ones flag"
    } else if !offset.is_multiple_of(cluster_size) {
        "points to a cluster that is not aligned"
    } else {
        return Ok(());
    };
    Err(FormatError::field(
        TABLE,
        "entry",
        index * 8,
        format!("entry {index} ({entry:#018x}) {problem}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            bitmap_table_offset: 0x30000,
            bitmap_table_size: 1,
            flags: BITMAP_FLAG_AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data: Vec::new(),
            name: "b0".into(),
        }
    }

    fn field_of(r: Result<(), FormatError>) -> &'static str {
        match r {
            Err(FormatError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn table_size_follows_disk_granularity_and_cluster() {
        // 1 GiB at 64 KiB per bit: 16384 bits = 2 KiB of data, one cluster.
        assert_eq!(bitmap_table_entries(1 << 30, 16, 65536), 1);
        // 1 TiB at 512 bytes per bit: 2^31 bits = 256 MiB = 4096 clusters.
        assert_eq!(bitmap_table_entries(1 << 40, 9, 65536), 4096);
        assert_eq!(bitmap_bit_count(65537, 16), 2);
    }

    #[test]
    fn each_bad_field_is_named() {
        let ok = entry();
        validate_bitmap_entry(&ok, 0, 65536, 1 << 30).unwrap();
        let mut e = ok.clone();
        e.bitmap_type = 2;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "type"
        );
        let mut e = ok.clone();
        e.granularity_bits = 8;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "granularity_bits"
        );
        e.granularity_bits = 32;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "granularity_bits"
        );
        let mut e = ok.clone();
        e.flags |= 1 << 5;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "flags"
        );
        let mut e = ok.clone();
        e.bitmap_table_offset = 0x30200;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "bitmap_table_offset"
        );
        let mut e = ok.clone();
        e.bitmap_table_size = 0;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 1 << 30)),
            "bitmap_table_size"
        );
        // Too small for the disk: 1 entry covers 32 GiB at 64 KiB per bit.
        e.bitmap_table_size = 1;
        assert_eq!(
            field_of(validate_bitmap_entry(&e, 0, 65536, 64 << 30)),
            "bitmap_table_size"
        );
        // An in-use bitmap may be stale in size.
        e.flags |= BITMAP_FLAG_IN_USE;
        validate_bitmap_entry(&e, 0, 65536, 64 << 30).unwrap();
    }

    #[test]
    fn extension_and_table_entries_are_checked() {
        let ext = BitmapsExtension {
            nb_bitmaps: 1,
            bitmap_directory_size: 32,
            bitmap_directory_offset: 0x20000,
        };
        validate_bitmaps_extension(&ext, 65536).unwrap();
        let bad = BitmapsExtension {
            bitmap_directory_size: 0,
            ..ext
        };
        assert_eq!(
            field_of(validate_bitmaps_extension(&bad, 65536)),
            "bitmap_directory_size"
        );
        let bad = BitmapsExtension {
            bitmap_directory_offset: 0x20008,
            ..ext
        };
        assert_eq!(
            field_of(validate_bitmaps_extension(&bad, 65536)),
            "bitmap_directory_offset"
        );
        let bad = BitmapsExtension {
            nb_bitmaps: 0,
            ..ext
        };
        assert_eq!(
            field_of(validate_bitmaps_extension(&bad, 65536)),
            "nb_bitmaps"
        );
        validate_directory_fill(&[entry()], 32).unwrap();
        assert_eq!(
            field_of(validate_directory_fill(&[entry()], 40)),
            "bitmap_directory_size"
        );
        validate_bitmap_table_entry(0, 0, 65536).unwrap();
        validate_bitmap_table_entry(1, 0, 65536).unwrap();
        validate_bitmap_table_entry(0x50000, 0, 65536).unwrap();
        assert!(validate_bitmap_table_entry(0x50001, 0, 65536).is_err());
        assert!(validate_bitmap_table_entry(0x50200, 0, 65536).is_err());
        assert!(validate_bitmap_table_entry(1 << 60, 0, 65536).is_err());
    }
}
