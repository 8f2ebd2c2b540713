//! The internal snapshot table and the persistent bitmap directory. The
//! first byte picks the structure (low bit) and the entry count (the rest);
//! the remaining bytes are the table. Every decoded entry re-encodes to the
//! very bytes it came from (both formats are canonical up to the padding
//! between entries), and the whole table re-decodes to the same entries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::qcow2::{
    decode_bitmap_directory, decode_snapshot_table, encode_bitmap_directory, encode_snapshot_table,
    snapshot_table_len,
};

/// Rounds up to the 8-byte boundary each entry starts on.
fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, table)) = data.split_first() else {
        return;
    };
    let count = u32::from(selector >> 1);
    if selector & 1 == 0 {
        snapshots(table, count);
    } else {
        bitmaps(table, count);
    }
});

fn snapshots(table: &[u8], count: u32) {
    let Ok(entries) = decode_snapshot_table(table, count) else {
        return;
    };
    assert_eq!(entries.len(), count as usize);
    let mut at = 0usize;
    for entry in &entries {
        at = pad8(at);
        let mut encoded = Vec::new();
        entry
            .encode_into(&mut encoded)
            .expect("a decoded snapshot entry must encode");
        assert_eq!(encoded.len(), entry.encoded_len());
        assert_eq!(
            &table[at..at + encoded.len()],
            &encoded[..],
            "snapshot entry at table byte {at} does not re-encode to its bytes"
        );
        at += encoded.len();
    }
    let encoded = encode_snapshot_table(&entries).expect("encode the decoded table");
    assert_eq!(encoded.len(), snapshot_table_len(&entries));
    assert_eq!(encoded.len(), at);
    assert_eq!(
        decode_snapshot_table(&encoded, count).expect("re-decode"),
        entries
    );
}

fn bitmaps(directory: &[u8], count: u32) {
    let Ok(entries) = decode_bitmap_directory(directory, count) else {
        return;
    };
    assert_eq!(entries.len(), count as usize);
    let encoded = encode_bitmap_directory(&entries).expect("a decoded directory must encode");
    let mut at = 0usize;
    for entry in &entries {
        let len = entry.encoded_len();
        assert_eq!(
            &directory[at..at + len],
            &encoded[at..at + len],
            "bitmap directory entry at byte {at} does not re-encode to its bytes"
        );
        at = pad8(at + len);
    }
    assert_eq!(encoded.len(), at);
    assert_eq!(
        decode_bitmap_directory(&encoded, count).expect("re-decode"),
        entries
    );
}
