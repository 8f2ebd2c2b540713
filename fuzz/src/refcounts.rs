//! Refcounts that `check` cannot see: like qemu-img check, it compares
//! refcounts with references only for the clusters inside the file, so a
//! nonzero refcount past the end of the file is neither a leak nor an
//! error until the file grows over it. Then it is a leak, in QEMU too.

use qj_spec::qcow2::{get_refcount, read_table_entry, Header};

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
const REFCOUNT_TABLE_OFFSET_MASK: u64 = !0x1ff;

/// Whether `image` stores a nonzero refcount for a cluster at or past the
/// end of the file (as far as its refcount blocks lie inside the file).
#[must_use]
pub fn refcounts_past_end(image: &[u8]) -> bool {
    let Ok(header) = Header::decode(image) else {
        return false;
    };
    let cluster_bits = header.cluster_bits;
    let cluster_size = 1usize << cluster_bits;
    let clusters_in_file = (image.len() as u64).div_ceil(cluster_size as u64);
    let per_block = ((cluster_size as u64) * 8) >> header.refcount_order;
    let Some(table) = usize::try_from(header.refcount_table_offset)
        .ok()
        .and_then(|at| image.get(at..))
    else {
        return false;
    };
    let entries = ((u64::from(header.refcount_table_clusters) << cluster_bits) / 8)
        .min(table.len() as u64 / 8) as usize;
    (0..entries).any(|index| {
        let block_offset = read_table_entry(table, index) & REFCOUNT_TABLE_OFFSET_MASK;
        let block = usize::try_from(block_offset)
            .ok()
            .and_then(|at| image.get(at..at.checked_add(cluster_size)?));
        let Some(block) = block.filter(|_| block_offset != 0) else {
            return false;
        };
        let first = index as u64 * per_block;
        (0..per_block)
            .filter(|i| first + i >= clusters_in_file)
            .any(|i| get_refcount(block, i, header.refcount_order) != 0)
    })
}
