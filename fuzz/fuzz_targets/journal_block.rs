//! One log block: the common block header behind its salted checksum. The
//! block is tried as it is and resealed with the target's journal id (so
//! the field checks behind the checksum are reached). A decoded header
//! re-encodes, resealed, to the very block it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::journal::block::seal_block;
use qj_spec::journal::{BlockHeader, BlockType, BLOCK_HEADER_BYTES};

/// The journal id every block of this target is sealed with.
const JOURNAL_ID: u64 = 0x716a_6675_7a7a_0001;
/// Largest block examined (the largest journal block is 64 KiB, but the
/// header logic does not depend on the size past the header).
const BLOCK_BYTES_MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let block = &data[..data.len().min(BLOCK_BYTES_MAX)];
    if block.len() < BLOCK_HEADER_BYTES {
        assert!(BlockHeader::decode(block, JOURNAL_ID).is_err());
        return;
    }
    let mut sealed = block.to_vec();
    seal_block(&mut sealed, JOURNAL_ID);
    for bytes in [block, &sealed[..]] {
        let Ok(header) = BlockHeader::decode(bytes, JOURNAL_ID) else {
            continue;
        };
        assert_eq!(
            BlockType::from_code(header.block_type.code()),
            Some(header.block_type)
        );
        if header.block_type != BlockType::Descriptor {
            assert_eq!(header.used_bytes, 0);
        }
        let mut again = bytes.to_vec();
        header.encode_into(&mut again);
        seal_block(&mut again, JOURNAL_ID);
        assert_eq!(again, bytes, "block header {header:?} does not re-encode");
        assert_eq!(BlockHeader::decode(&again, JOURNAL_ID), Ok(header));
    }
});
