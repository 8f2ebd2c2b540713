//! The journal's checksums: CRC32C (Castagnoli), salted for log blocks.
//!
//! A log block's checksum is seeded with the journal id and the block's
//! sequence number. The id defeats blocks left by an earlier journal in the
//! same place (a re-format, or every earlier session: the id changes at
//! each read-write open); the sequence number defeats a block from an
//! earlier lap of the ring that happens to sit where the reader looks.

/// CRC32C of `bytes`, unsalted (header slots, data checksum descriptors).
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The running CRC after the salt: CRC32C over `journal_id` then `seq`,
/// both big-endian. Continue it with [`salted_append`].
#[must_use]
pub fn salt(journal_id: u64, seq: u64) -> u32 {
    let mut salt_bytes = [0u8; 16];
    salt_bytes[..8].copy_from_slice(&journal_id.to_be_bytes());
    salt_bytes[8..].copy_from_slice(&seq.to_be_bytes());
    crc32c::crc32c(&salt_bytes)
}

/// Continues a running CRC32C over more bytes.
#[must_use]
pub fn salted_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// The salted checksum of a block whose 4-byte checksum field sits at
/// `field_offset`: that field counts as zeros, so a block can be sealed
/// and verified without copying it.
#[must_use]
pub fn block_checksum(journal_id: u64, seq: u64, block: &[u8], field_offset: usize) -> u32 {
    let split = field_offset.min(block.len());
    let after = field_offset.saturating_add(4).min(block.len());
    let crc = salted_append(salt(journal_id, seq), &block[..split]);
    let crc = salted_append(crc, &[0u8; 4][..after - split]);
    salted_append(crc, &block[after..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C (RFC 3720, iSCSI).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn block_checksum_treats_the_field_as_zero() {
        let mut block = vec![0x5au8; 64];
        let sealed = block_checksum(7, 9, &block, 28);
        block[28..32].copy_from_slice(&sealed.to_be_bytes());
        assert_eq!(block_checksum(7, 9, &block, 28), sealed);
        let mut zeroed = block.clone();
        zeroed[28..32].fill(0);
        assert_eq!(
            salted_append(salt(7, 9), &zeroed),
            sealed,
            "same as a CRC over the block with the field zeroed"
        );
        assert_ne!(block_checksum(8, 9, &block, 28), sealed, "id salts it");
        assert_ne!(block_checksum(7, 10, &block, 28), sealed, "seq salts it");
    }
}
