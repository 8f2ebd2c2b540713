//! Big-endian u64 entries of L1, L2 and refcount tables.

/// Entry `index` of a table of big-endian u64 entries.
///
/// # Panics
/// If `index` is outside the table: indices come from our own loops over a
/// table we sized, so an out-of-range index is a bug in the caller, never a
/// property of the image. Use [`try_read_table_entry`] for indices derived
/// from disk bytes.
#[must_use]
pub fn read_table_entry(table: &[u8], index: usize) -> u64 {
    match try_read_table_entry(table, index) {
        Some(v) => v,
        None => panic!(
            "table entry {index} outside a table of {} bytes",
            table.len()
        ),
    }
}

/// Entry `index`, or `None` when it lies outside the table.
#[must_use]
pub fn try_read_table_entry(table: &[u8], index: usize) -> Option<u64> {
    let start = index.checked_mul(8)?;
    let bytes = table.get(start..start.checked_add(8)?)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(bytes);
    Some(u64::from_be_bytes(raw))
}

/// Sets entry `index` to `value`.
///
/// # Panics
/// If `index` is outside the table (a caller bug, see [`read_table_entry`]).
pub fn write_table_entry(table: &mut [u8], index: usize, value: u64) {
    let len = table.len();
    let slot = index
        .checked_mul(8)
        .and_then(|start| table.get_mut(start..start.checked_add(8)?));
    match slot {
        Some(slot) => slot.copy_from_slice(&value.to_be_bytes()),
        None => panic!("table entry {index} outside a table of {len} bytes"),
    }
}

/// Number of whole entries in a table of `table_len_bytes`.
#[must_use]
pub const fn table_entries(table_len_bytes: usize) -> usize {
    table_len_bytes / 8
}
