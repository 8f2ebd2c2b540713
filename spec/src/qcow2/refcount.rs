//! Refcount block entries of every width (refcount_order 0..=6).
//!
//! Sub-byte widths pack like QEMU (block/qcow2-refcount.c
//! get_refcount_ro0..2): entry i of width w = 2^order bits lives in byte
//! i / (8 / w), at bit (i % (8 / w)) * w, least significant first. Widths of
//! 8..=64 bits are big-endian integers.

/// Entry `index` of a refcount block of `refcount_order`.
///
/// # Panics
/// If the entry lies outside `block` or the order is above 6: indices come
/// from the geometry of a block we sized (a caller bug otherwise).
// Inlined so that loops over a block's entries hoist the width dispatch
// (opening an image reads every entry of every refcount block).
#[inline]
#[must_use]
pub fn get_refcount(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    assert!(refcount_order <= 6, "refcount_order {refcount_order}");
    let i = usize::try_from(index).expect("refcount index fits in usize");
    match refcount_order {
        0..=2 => {
            let width = 1usize << refcount_order;
            let per_byte = 8 / width;
            let shift = (i % per_byte) * width;
            u64::from((block[i / per_byte] >> shift) & ((1u8 << width) - 1))
        }
        3 => u64::from(block[i]),
        4 => {
            let at = i * 2;
            u64::from(u16::from_be_bytes([block[at], block[at + 1]]))
        }
        5 => {
            let at = i * 4;
            let mut raw = [0u8; 4];
            raw.copy_from_slice(&block[at..at + 4]);
            u64::from(u32::from_be_bytes(raw))
        }
        _ => {
            let at = i * 8;
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&block[at..at + 8]);
            u64::from_be_bytes(raw)
        }
    }
}

/// How many leading entries of a refcount block of `refcount_order` hold
/// everything nonzero: one past the last entry with a nonzero count, 0 for
/// a block of zeros. Found from the last nonzero byte, so the zero tail of
/// a block (free clusters past the end of the file) costs one byte scan.
///
/// # Panics
/// If the order is above 6.
#[must_use]
pub fn used_entries(block: &[u8], refcount_order: u32) -> u64 {
    assert!(refcount_order <= 6, "refcount_order {refcount_order}");
    let Some(last_byte) = last_nonzero_byte(block) else {
        return 0;
    };
    let width_bits = 1u32 << refcount_order;
    let entry = if width_bits >= 8 {
        last_byte / (width_bits / 8) as usize
    } else {
        // Entries pack least significant first: the highest set bit of the
        // byte belongs to the last nonzero entry in it.
        let per_byte = (8 / width_bits) as usize;
        let high_bit = 7 - block[last_byte].leading_zeros();
        last_byte * per_byte + (high_bit / width_bits) as usize
    };
    entry as u64 + 1
}

/// The index of the last nonzero byte of `block`. Whole 64-byte chunks are
/// tested first: an OR over a fixed-size chunk vectorises, where a search
/// byte by byte does not.
fn last_nonzero_byte(block: &[u8]) -> Option<usize> {
    const CHUNK_BYTES: usize = 64;
    let mut end = block.len();
    // Bounded by the block: one chunk per step, towards its start.
    while end > 0 {
        let start = end.saturating_sub(CHUNK_BYTES);
        let chunk = &block[start..end];
        if chunk.iter().fold(0u8, |any, &b| any | b) != 0 {
            return chunk.iter().rposition(|&b| b != 0).map(|i| start + i);
        }
        end = start;
    }
    None
}

/// Sets entry `index` of a refcount block of `refcount_order` to `value`.
/// The caller guarantees `value` fits the width (asserted in debug builds;
/// excess high bits are dropped in release builds).
///
/// # Panics
/// As [`get_refcount`].
pub fn set_refcount(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    assert!(refcount_order <= 6, "refcount_order {refcount_order}");
    let width_bits = 1u32 << refcount_order;
    debug_assert!(
        width_bits == 64 || value < (1u64 << width_bits),
        "refcount {value} does not fit {width_bits} bits"
    );
    let i = usize::try_from(index).expect("refcount index fits in usize");
    match refcount_order {
        0..=2 => {
            let width = 1usize << refcount_order;
            let per_byte = 8 / width;
            let shift = (i % per_byte) * width;
            let mask = ((1u8 << width) - 1) << shift;
            let byte = &mut block[i / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}
