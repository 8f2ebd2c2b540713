//! References from persistent dirty bitmaps (QEMU's
//! qcow2_check_bitmaps_refcounts): the bitmap directory, each bitmap table
//! and each bitmap data cluster.

use qj_spec::qcow2::features::AUTOCLEAR_BITMAPS_BIT;
use qj_spec::qcow2::{
    decode_bitmap_directory, validate_bitmap_entry, validate_bitmaps_extension,
    validate_directory_fill, BitmapDirectoryEntry, BitmapsExtension, BITMAPS_MAX,
    BITMAP_DIRECTORY_LEN_MAX, BITMAP_FLAG_IN_USE, BITMAP_TABLE_ENTRY_ALL_ONES,
    BITMAP_TABLE_ENTRY_OFFSET_MASK, BITMAP_TABLE_ENTRY_RESERVED_MASK,
};

use super::checker::Checker;
use super::error::CheckError;
use super::image::{read_table, read_vec};
use super::imrt::Imrt;
use super::report::Tally;

/// QEMU's BME_MAX_TABLE_SIZE: entries of one bitmap table.
const BITMAP_TABLE_ENTRIES_MAX: u64 = 0x800_0000;
/// QEMU's BME_MAX_PHYS_SIZE: bytes of one bitmap's data.
const BITMAP_PHYS_BYTES_MAX: u64 = 0x2000_0000;
/// QEMU's BME_MIN/MAX_GRANULARITY_BITS.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// QEMU's BME_MAX_NAME_SIZE.
const BITMAP_NAME_LEN_MAX: usize = 1023;
/// Flags other than in_use and auto (QEMU's BME_RESERVED_FLAGS).
const BITMAP_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;

/// QEMU's check_table_entry: reserved bits clear, and an entry with an
/// offset has no all-ones flag and a cluster-aligned offset.
fn table_entry_is_valid(entry: u64, cluster_size: u64) -> bool {
    if entry & BITMAP_TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
    offset == 0 || (entry & BITMAP_TABLE_ENTRY_ALL_ONES == 0 && offset.is_multiple_of(cluster_size))
}

impl Checker<'_> {
    /// What is wrong with a directory that failed QEMU's checks, naming
    /// the field (the qcow2 spec's rules, `bitmap_rules.rs`).
    fn directory_problem(&self, ext: &BitmapsExtension) -> Result<String, CheckError> {
        let cluster_size = self.cluster_size();
        if let Err(e) = validate_bitmaps_extension(ext, cluster_size) {
            return Ok(e.to_string());
        }
        let dir = read_vec(
            self.storage,
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            "the bitmap directory",
        )?;
        let entries = match decode_bitmap_directory(&dir, ext.nb_bitmaps) {
            Ok(entries) => entries,
            Err(e) => return Ok(e.to_string()),
        };
        if let Err(e) = validate_directory_fill(&entries, ext.bitmap_directory_size) {
            return Ok(e.to_string());
        }
        let mut at = ext.bitmap_directory_offset;
        for e in &entries {
            if let Err(err) = validate_bitmap_entry(e, at, cluster_size, self.image.header.size) {
                return Ok(err.to_string());
            }
            if !e.extra_data.is_empty() {
                return Ok(format!("bitmap {:?} has extra data", e.name));
            }
            at += e.encoded_len().next_multiple_of(8) as u64;
        }
        Ok("an entry breaks QEMU's limits".into())
    }

    /// QEMU's check_dir_entry.
    fn bitmap_entry_is_valid(&self, e: &BitmapDirectoryEntry) -> bool {
        let cluster_size = self.cluster_size();
        let shape_ok = e.bitmap_table_size != 0
            && e.bitmap_table_offset != 0
            && e.bitmap_table_offset.is_multiple_of(cluster_size)
            && u64::from(e.bitmap_table_size) <= BITMAP_TABLE_ENTRIES_MAX
            && GRANULARITY_BITS.contains(&e.granularity_bits)
            && e.flags & BITMAP_RESERVED_FLAGS == 0
            && e.name.len() <= BITMAP_NAME_LEN_MAX
            && e.bitmap_type == BITMAP_TYPE_DIRTY_TRACKING;
        if !shape_ok {
            return false;
        }
        let phys_bytes = u64::from(e.bitmap_table_size) * cluster_size;
        if phys_bytes > BITMAP_PHYS_BYTES_MAX {
            return false;
        }
        // A consistent bitmap must cover the whole disk (an in-use one may
        // be stale after a resize).
        let covered = u128::from(phys_bytes * 8) << e.granularity_bits;
        e.flags & BITMAP_FLAG_IN_USE != 0 || u128::from(self.image.header.size) <= covered
    }

    /// Counts bitmap references. Returns false when the directory or a
    /// bitmap table cannot be loaded (counted as a corruption), where QEMU
    /// aborts the check.
    pub fn count_bitmaps(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
    ) -> Result<bool, CheckError> {
        // Without the autoclear bit QEMU ignores the extension: the bitmaps
        // are inconsistent and their clusters are leaks.
        if !self.image.header.has_autoclear(AUTOCLEAR_BITMAPS_BIT) {
            return Ok(true);
        }
        let Some(ext) = self.image.header.bitmaps() else {
            return Ok(true);
        };
        if ext.nb_bitmaps == 0 {
            return Ok(true);
        }
        let cluster_size = self.cluster_size();
        self.inc_refcounts(
            imrt,
            tally,
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
        )?;

        let entries = if ext.nb_bitmaps > BITMAPS_MAX
            || ext.bitmap_directory_size == 0
            || ext.bitmap_directory_size > BITMAP_DIRECTORY_LEN_MAX
        {
            None
        } else {
            let dir = read_vec(
                self.storage,
                ext.bitmap_directory_offset,
                ext.bitmap_directory_size,
                "the bitmap directory",
            )?;
            decode_bitmap_directory(&dir, ext.nb_bitmaps)
                .ok()
                .filter(|entries| {
                    // The entries must fill the directory exactly, without extra
                    // data (QEMU supports none) and within the constraints.
                    let used: u64 = entries
                        .iter()
                        .map(|e| e.encoded_len().div_ceil(8) as u64 * 8)
                        .sum();
                    used == ext.bitmap_directory_size
                        && entries
                            .iter()
                            .all(|e| e.extra_data.is_empty() && self.bitmap_entry_is_valid(e))
                })
        };
        let Some(entries) = entries else {
            let why = self.directory_problem(&ext)?;
            self.msg(format!("ERROR bitmap directory is broken: {why}"));
            tally.corruptions += 1;
            return Ok(false);
        };

        for e in entries {
            let table_entries = u64::from(e.bitmap_table_size);
            self.inc_refcounts(imrt, tally, e.bitmap_table_offset, table_entries * 8)?;
            let table = read_table(
                self.storage,
                e.bitmap_table_offset,
                table_entries,
                "a bitmap table",
            )?;
            if !table
                .iter()
                .all(|&entry| table_entry_is_valid(entry, cluster_size))
            {
                self.msg(format!(
                    "ERROR bitmap '{}' has a corrupted bitmap table",
                    e.name
                ));
                tally.corruptions += 1;
                return Ok(false);
            }
            for entry in table {
                let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
                if offset != 0 {
                    self.inc_refcounts(imrt, tally, offset, cluster_size)?;
                }
            }
        }
        Ok(true)
    }
}
