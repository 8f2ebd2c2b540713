//! L1, L2 and refcount table entries. The first byte picks the geometry
//! (cluster bits 9..=21, refcount order 0..=6); the rest is a table.
//! L1 and L2 entries re-encode to their raw value less the reserved bits
//! (compressed L2 entries less the COPIED bit); refcounts read back what was stored
//! and a store touches only its own entry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::qcow2::{
    get_refcount, read_table_entry, set_refcount, try_read_table_entry, write_table_entry, L1Entry,
    L2Entry, L2_COMPRESSED, L2_COPIED,
};
use qj_spec::units::Geometry;

/// Entries examined per input: the decoders are per entry, so a longer
/// table only repeats the same work.
const ENTRIES_MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, table)) = data.split_first() else {
        return;
    };
    let cluster_bits = Geometry::CLUSTER_BITS_MIN
        + u32::from(selector & 0x0f)
            % (Geometry::CLUSTER_BITS_MAX - Geometry::CLUSTER_BITS_MIN + 1);
    let refcount_order = u32::from(selector >> 4) % (Geometry::REFCOUNT_ORDER_MAX + 1);

    let entries = (table.len() / 8).min(ENTRIES_MAX);
    let mut rewritten = table.to_vec();
    for index in 0..entries {
        let raw = read_table_entry(table, index);
        assert_eq!(try_read_table_entry(table, index), Some(raw));

        let l1 = L1Entry(raw);
        let canonical = L1Entry::new(l1.l2_offset().unwrap_or_default(), l1.is_copied());
        assert_eq!(
            canonical.0,
            raw & !L1Entry::RESERVED_MASK,
            "L1 entry {raw:#x} does not re-encode"
        );
        if let Some(l2) = l1.l2_offset() {
            assert_eq!(l2.0 % 512, 0, "L1 offset {l2} not aligned");
        }

        let l2 = L2Entry::decode(raw, cluster_bits);
        // A compressed entry has no reserved bits, and its COPIED bit (an
        // error `check` reports) is not part of what it decodes to; nor is
        // the COPIED bit of an entry without a cluster, which QEMU ignores.
        let want = if raw & L2_COMPRESSED != 0 || l2 == L2Entry::Unallocated {
            raw & !L2_COPIED & !L2Entry::reserved_bits(raw, cluster_bits)
        } else {
            raw & !L2Entry::reserved_bits(raw, cluster_bits)
        };
        assert_eq!(
            l2.encode(cluster_bits),
            want,
            "L2 entry {raw:#x} with {cluster_bits} cluster bits decodes to {l2:?}, which does not re-encode"
        );
        if let (L2Entry::Normal { offset, .. }, Some(allocated)) = (l2, l2.allocated_offset()) {
            assert_eq!(offset, allocated);
        }

        write_table_entry(&mut rewritten, index, raw);
    }
    assert_eq!(
        rewritten, table,
        "writing back what was read changed the table"
    );
    assert_eq!(try_read_table_entry(table, table.len() / 8), None);

    refcounts(table, refcount_order);
});

/// Every refcount of `block` (the first ones, bounded): in range, stored
/// back unchanged, and a changed store touches only its entry.
fn refcounts(block: &[u8], refcount_order: u32) {
    let bits = 1u64 << refcount_order;
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let count = (block.len() as u64 * 8 / bits).min(ENTRIES_MAX as u64);
    let mut copy = block.to_vec();
    for index in 0..count {
        let value = get_refcount(block, index, refcount_order);
        assert!(value <= max, "refcount {value} wider than {bits} bits");
        set_refcount(&mut copy, index, refcount_order, value);
    }
    assert_eq!(copy, block, "storing the refcounts read changed the block");

    for index in 0..count {
        let old = get_refcount(block, index, refcount_order);
        let new = !old & max;
        set_refcount(&mut copy, index, refcount_order, new);
        assert_eq!(get_refcount(&copy, index, refcount_order), new);
        for neighbour in [index.wrapping_sub(1), index + 1] {
            if neighbour < count {
                assert_eq!(
                    get_refcount(&copy, neighbour, refcount_order),
                    get_refcount(block, neighbour, refcount_order),
                    "setting refcount {index} changed refcount {neighbour}"
                );
            }
        }
        set_refcount(&mut copy, index, refcount_order, old);
    }
    assert_eq!(copy, block);
}
