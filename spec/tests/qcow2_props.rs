//! Property tests: decoders never panic on arbitrary bytes, and encoding
//! is the inverse of decoding.

use proptest::prelude::*;
use qj_spec::qcow2::*;
use qj_spec::units::{Geometry, HostOffset};

fn arb_extension() -> impl Strategy<Value = HeaderExtension> {
    prop_oneof![
        "[a-z0-9]{0,15}".prop_map(HeaderExtension::BackingFormat),
        proptest::collection::vec(
            (0u8..3, 0u8..64, "[a-z ]{0,46}").prop_map(|(k, bit, name)| FeatureName {
                kind: FeatureKind::from_byte(k).expect("0..3 are kinds"),
                bit,
                name,
            }),
            0..8
        )
        .prop_map(HeaderExtension::FeatureNameTable),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(n, s, o)| HeaderExtension::Bitmaps(
            BitmapsExtension {
                nb_bitmaps: n,
                bitmap_directory_size: s,
                bitmap_directory_offset: o
            }
        )),
        "[a-z./]{0,40}".prop_map(HeaderExtension::ExternalDataFile),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, size)| HeaderExtension::Journal(
            JournalExtension {
                offset,
                size,
                flags: 0
            }
        )),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_filter("not a known type", |(k, _)| {
                ![
                    EXT_END,
                    EXT_BACKING_FORMAT,
                    EXT_FEATURE_NAME_TABLE,
                    EXT_BITMAPS,
                    EXT_EXTERNAL_DATA_FILE,
                    EXT_JOURNAL,
                ]
                .contains(k)
            })
            .prop_map(|(kind, data)| HeaderExtension::Unknown { kind, data }),
    ]
}

prop_compose! {
    fn arb_header()(
        v3 in any::<bool>(),
        cluster_bits in 12u32..=21,
        refcount_order in 0u32..=6,
        fields in any::<[u64; 8]>(),
        small in any::<[u32; 4]>(),
        features in any::<[u64; 3]>(),
        compression in 0u8..3,
        unknown_words in 0usize..3,
        extensions in proptest::collection::vec(arb_extension(), 0..4),
        backing in proptest::option::of("[a-z0-9./]{0,60}"),
    ) -> Header {
        let mut h = Header::new_v3(Geometry { cluster_bits, refcount_order }, fields[0]);
        h.l1_table_offset = fields[1];
        h.refcount_table_offset = fields[2];
        h.snapshots_offset = fields[3];
        h.crypt_method = small[0] % 3;
        h.l1_size = small[1];
        h.refcount_table_clusters = small[2];
        h.nb_snapshots = small[3];
        h.backing_file = backing;
        if v3 {
            h.incompatible_features = features[0];
            h.compatible_features = features[1];
            h.autoclear_features = features[2];
            h.compression_type = compression;
            h.unknown_header_fields = vec![0xa5; unknown_words * 8];
            h.header_length = if compression == 0 && unknown_words == 0 { 104 } else { 112 + 8 * unknown_words as u32 };
            h.extensions = extensions;
        } else {
            h.version = 2;
            h.refcount_order = 4;
            h.header_length = 72;
            h.compression_type = 0;
            // v2 images may carry extensions too (QEMU writes the backing format).
            h.extensions = extensions;
        }
        if let Some(name) = &h.backing_file {
            h.backing_file_size = name.len() as u32;
        }
        h
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Header::decode(&bytes);
    }

    #[test]
    fn header_decode_never_panics_on_mutated_valid_header(
        h in arb_header(),
        flips in proptest::collection::vec((0usize..700, any::<u8>()), 1..8),
        cut in 0usize..800,
    ) {
        let mut bytes = h.encode().unwrap();
        for (at, v) in flips {
            if let Some(b) = bytes.get_mut(at) { *b = v; }
        }
        let _ = Header::decode(&bytes[..cut.min(bytes.len())]);
        if let Ok(d) = Header::decode(&bytes) {
            let _ = d.validate_layout(1 << 30);
            let _ = d.unsupported_features();
        }
    }

    #[test]
    fn header_round_trips(h in arb_header()) {
        let bytes = h.encode().unwrap();
        prop_assert_eq!(bytes.len() as u64, h.geometry().cluster_size());
        let back = Header::decode(&bytes).unwrap();
        let mut want = h.clone();
        // encode places the backing file name itself.
        want.backing_file_offset = back.backing_file_offset;
        prop_assert_eq!(&back, &want);
        prop_assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn snapshot_and_bitmap_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), n in 0u32..10) {
        let _ = decode_snapshot_table(&bytes, n);
        let _ = decode_bitmap_directory(&bytes, n);
    }

    #[test]
    fn snapshot_table_round_trips(entries in proptest::collection::vec(
        (any::<u64>(), any::<u32>(), "[0-9]{1,4}", "[a-z ]{0,20}", any::<[u32; 3]>(), any::<u64>(),
         proptest::collection::vec(any::<u8>(), 0..40)),
        0..6)
    ) {
        let entries: Vec<SnapshotHeader> = entries.into_iter().map(|(l1, l1_size, id, name, t, clock, extra)| SnapshotHeader {
            l1_table_offset: l1, l1_size, id, name, date_sec: t[0], date_nsec: t[1],
            vm_clock_nsec: clock, vm_state_size: t[2], extra_data: extra,
        }).collect();
        let bytes = encode_snapshot_table(&entries).unwrap();
        prop_assert_eq!(bytes.len(), snapshot_table_len(&entries));
        prop_assert_eq!(decode_snapshot_table(&bytes, entries.len() as u32).unwrap(), entries);
    }

    #[test]
    fn l2_entries_round_trip(raw in any::<u64>(), cluster_bits in 9u32..=21) {
        let entry = L2Entry::decode(raw, cluster_bits);
        let again = L2Entry::decode(entry.encode(cluster_bits), cluster_bits);
        prop_assert_eq!(again, entry);
        // Entries without reserved bits, COPIED-on-compressed or stray bits
        // on an unallocated entry re-encode to the same raw value.
        let stray = match entry {
            L2Entry::Unallocated => raw,
            L2Entry::Compressed { .. } => raw & L2_COPIED,
            _ => L2Entry::reserved_bits(raw, cluster_bits),
        };
        if stray == 0 {
            prop_assert_eq!(entry.encode(cluster_bits), raw);
        }
    }

    #[test]
    fn l1_entries_round_trip(offset in 0u64..(1 << 47), copied in any::<bool>()) {
        let l2 = HostOffset(offset << 9);
        let e = L1Entry::new(l2, copied);
        prop_assert_eq!(e.l2_offset(), (offset != 0).then_some(l2));
        prop_assert_eq!(e.is_copied(), copied);
        prop_assert_eq!(e.reserved_bits(), 0);
    }

    #[test]
    fn refcounts_round_trip_for_every_order(order in 0u32..=6, values in proptest::collection::vec(any::<u64>(), 1..64)) {
        let g = Geometry { cluster_bits: 9, refcount_order: order };
        let mut block = vec![0u8; 512];
        let n = values.len().min(g.refcounts_per_block() as usize);
        for (i, v) in values.iter().take(n).enumerate() {
            set_refcount(&mut block, i as u64, order, v & g.refcount_max());
        }
        for (i, v) in values.iter().take(n).enumerate() {
            prop_assert_eq!(get_refcount(&block, i as u64, order), v & g.refcount_max());
        }
        // Entries past the ones written stay zero: no write spills over.
        for i in n as u64..g.refcounts_per_block() {
            prop_assert_eq!(get_refcount(&block, i, order), 0);
        }
    }

    #[test]
    fn used_entries_is_one_past_the_last_nonzero_count(order in 0u32..=6, counts in proptest::collection::vec((0u64..4096, any::<u64>()), 0..6)) {
        let g = Geometry { cluster_bits: 9, refcount_order: order };
        let mut block = vec![0u8; 512];
        for (index, value) in counts {
            set_refcount(&mut block, index % g.refcounts_per_block(), order, value & g.refcount_max());
        }
        let expected = (0..g.refcounts_per_block())
            .rev()
            .find(|&i| get_refcount(&block, i, order) != 0)
            .map_or(0, |last| last + 1);
        prop_assert_eq!(used_entries(&block, order), expected);
    }
}
