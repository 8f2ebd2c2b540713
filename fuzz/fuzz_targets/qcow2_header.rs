//! The qcow2 header with its extensions, feature name table and backing
//! file name: whatever decodes re-encodes, the fixed fields come back byte
//! for byte, and the encoding is a fixpoint of decode -> encode.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::error::FormatError;
use qj_spec::qcow2::{FeatureKind, Header, HEADER_V2_LEN, HEADER_V3_MIN_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    // The accessors that `info` and `check` call on a decoded header must
    // not panic either, whatever the layout claims.
    let _ = header.validate_layout(data.len() as u64);
    let _ = header.validate_layout(u64::MAX);
    let _ = header.unsupported_features();
    let _ = header.backing_format();
    let _ = header.bitmaps();
    let _ = header.journal();
    for bit in 0..64 {
        for kind in [
            FeatureKind::Incompatible,
            FeatureKind::Compatible,
            FeatureKind::Autoclear,
        ] {
            let _ = header.feature_name(kind, bit);
        }
    }

    let encoded = match header.encode() {
        Ok(encoded) => encoded,
        // QEMU accepts extensions that fill the header cluster without an
        // end marker; the encoder always writes one, so such a header
        // cannot be rewritten in place: a clear error, the only one allowed.
        Err(FormatError::Field {
            field: "header_length",
            ..
        }) => return,
        Err(e) => panic!("a header that decoded does not encode: {e}"),
    };
    let again = Header::decode(&encoded).expect("our own encoding must decode");
    let mut want = header.clone();
    // Only where the backing file name lands may move (encode packs it
    // right after the extensions), and its length field, which means
    // nothing without a name (offset 0), is recomputed.
    want.backing_file_offset = again.backing_file_offset;
    want.backing_file_size = again.backing_file_size;
    assert_eq!(
        again.backing_file_size as usize,
        header.backing_file.as_ref().map_or(0, String::len)
    );
    assert_eq!(again, want, "decode(encode(h)) differs from h");
    assert_eq!(
        again.encode().expect("re-encode"),
        encoded,
        "encode is not a fixpoint of decode -> encode"
    );

    // The fixed fields are canonical: magic, version, cluster bits, size,
    // crypt method, table offsets and counts (bytes 0..8 and 20..72), and
    // for version 3 the feature bits, refcount order and header length.
    let fixed_end = if header.version == 3 {
        HEADER_V3_MIN_LEN
    } else {
        HEADER_V2_LEN
    } as usize;
    let input = |range: std::ops::Range<usize>| -> Vec<u8> {
        range.map(|i| data.get(i).copied().unwrap_or(0)).collect()
    };
    assert_eq!(input(0..8), encoded[0..8], "magic/version changed");
    assert_eq!(
        input(20..fixed_end),
        encoded[20..fixed_end],
        "fixed header fields changed in the round trip"
    );
});
