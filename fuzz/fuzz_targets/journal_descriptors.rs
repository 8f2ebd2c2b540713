//! A descriptor area of a journal block, every descriptor kind. Decoded
//! descriptors re-encode to the bytes they came from where the format is
//! canonical (everything but the ignored body of a no-op, the padding of an
//! odd escape list and of dedup hashes), and always re-decode to the same
//! descriptor with the same size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::journal::descriptor::decode_descriptor_area;
use qj_spec::journal::Descriptor;

/// Whether every byte of `descriptor`'s encoding is determined by its
/// decoded value.
fn is_canonical(descriptor: &Descriptor) -> bool {
    match descriptor {
        Descriptor::NoOp { .. } | Descriptor::DedupInsert(_) | Descriptor::DedupDelete(_) => false,
        Descriptor::Escape(indices) => indices.len() % 2 == 0,
        Descriptor::WriteData(_)
        | Descriptor::Copy(_)
        | Descriptor::Revoke(_)
        | Descriptor::DataChecksum(_)
        | Descriptor::Private { .. } => true,
    }
}

fuzz_target!(|data: &[u8]| {
    // One descriptor at a time, the way the area decoder walks them.
    let mut at = 0usize;
    while at < data.len() {
        let Ok((descriptor, size)) = Descriptor::decode(&data[at..], at as u64) else {
            break;
        };
        assert!(size >= 8 && size % 8 == 0 && at + size <= data.len());
        assert_eq!(descriptor.encoded_len(), size, "{descriptor:?}");
        let mut encoded = Vec::new();
        descriptor
            .encode_into(&mut encoded)
            .expect("a decoded descriptor must encode");
        assert_eq!(encoded.len(), size);
        if is_canonical(&descriptor) {
            assert_eq!(
                &encoded[..],
                &data[at..at + size],
                "descriptor at byte {at} does not re-encode to its bytes: {descriptor:?}"
            );
        }
        assert_eq!(
            Descriptor::decode(&encoded, 0).expect("our own encoding decodes"),
            (descriptor.clone(), size)
        );
        // Splitting to fit a smaller block keeps the type and the entries.
        let parts = descriptor.clone().split_to_fit(size / 2);
        assert!(parts
            .iter()
            .all(|p| p.type_code() == descriptor.type_code()));
        assert_eq!(
            parts.iter().map(Descriptor::count).sum::<usize>(),
            descriptor.count()
        );
        at += size;
    }
    if at >= data.len() {
        let all = decode_descriptor_area(data, 0).expect("every descriptor decoded one by one");
        assert_eq!(
            all.iter().map(Descriptor::encoded_len).sum::<usize>(),
            data.len()
        );
    } else {
        assert!(decode_descriptor_area(data, 0).is_err());
    }
});
