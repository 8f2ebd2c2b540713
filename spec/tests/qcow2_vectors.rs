//! qcow2 structures captured from images made by qemu-img 10.0.2
//! (`vectors/gen.sh`): decode them, assert the fields QEMU wrote, and check
//! that encoding reproduces QEMU's bytes exactly.

use qj_spec::qcow2::features::*;
use qj_spec::qcow2::*;
use qj_spec::units::Geometry;

/// Bytes of a vector file, padded with zeros to `len` (the generator
/// trims trailing zeros).
fn vector(name: &str, len: usize) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex: String = text.split_whitespace().collect();
    assert_eq!(hex.len() % 2, 0, "{path}: odd number of hex digits");
    let mut bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect();
    assert!(bytes.len() <= len, "{path}: longer than {len}");
    bytes.resize(len, 0);
    bytes
}

fn qemu_feature_table() -> Vec<FeatureName> {
    // What QEMU 10 writes: ours minus the two qjournal entries.
    qjournal_feature_names()
        .into_iter()
        .filter(|n| !n.name.starts_with("journal"))
        .collect()
}

#[test]
fn default_image_header_decodes_and_reencodes_byte_for_byte() {
    let bytes = vector("default_64k_header", 65536);
    let h = Header::decode(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.size, 64 << 20);
    assert_eq!(h.crypt_method, 0);
    assert_eq!(h.l1_size, 1);
    assert_eq!(h.l1_table_offset, 0x30000);
    assert_eq!(h.refcount_table_offset, 0x10000);
    assert_eq!(h.refcount_table_clusters, 1);
    assert_eq!(h.nb_snapshots, 0);
    assert_eq!(h.incompatible_features, 0);
    assert_eq!(h.compatible_features, 0);
    assert_eq!(h.autoclear_features, 0);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type, COMPRESSION_ZLIB);
    assert_eq!(h.backing_file, None);
    assert_eq!(
        h.extensions,
        vec![HeaderExtension::FeatureNameTable(qemu_feature_table())],
        "QEMU's feature names, in QEMU's order"
    );
    assert_eq!(
        h.geometry(),
        Geometry {
            cluster_bits: 16,
            refcount_order: 4
        }
    );
    h.unsupported_features().unwrap();
    h.validate_layout(0x40000).unwrap();
    assert_eq!(h.encode().unwrap(), bytes);
}

#[test]
fn version_2_header_has_72_bytes_and_implied_fields() {
    let bytes = vector("v2_header", 65536);
    let h = Header::decode(&bytes).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.l1_size, 2);
    assert!(h.extensions.is_empty());
    assert_eq!(h.encode().unwrap(), bytes);
}

#[test]
fn one_bit_refcounts_with_4k_clusters() {
    let bytes = vector("rc1_4k_header", 4096);
    let h = Header::decode(&bytes).unwrap();
    assert_eq!(h.cluster_bits, 12);
    assert_eq!(h.refcount_order, 0);
    assert_eq!(h.size, 16 << 20);
    assert_eq!(h.l1_size, 8, "one L2 table maps 2 MiB with 4 KiB clusters");
    assert_eq!(h.encode().unwrap(), bytes);
}

#[test]
fn backing_file_name_and_format() {
    let bytes = vector("backing_header", 65536);
    let h = Header::decode(&bytes).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("default.qcow2"));
    assert_eq!(h.backing_file_offset, 0x210);
    assert_eq!(h.backing_file_size, 13);
    assert_eq!(h.backing_format(), Some("qcow2"));
    assert_eq!(
        h.extensions[0],
        HeaderExtension::BackingFormat("qcow2".into())
    );
    assert_eq!(
        h.encode().unwrap(),
        bytes,
        "name placed right after the end marker, as QEMU does"
    );
}

#[test]
fn bitmaps_extension_and_directory() {
    let bytes = vector("bitmaps_header", 65536);
    let h = Header::decode(&bytes).unwrap();
    assert!(h.has_autoclear(AUTOCLEAR_BITMAPS_BIT));
    let b = h.bitmaps().expect("bitmaps extension");
    assert_eq!(b.nb_bitmaps, 2);
    assert_eq!(b.bitmap_directory_size, 0x48);
    assert_eq!(b.bitmap_directory_offset, 0x80000);
    assert_eq!(h.encode().unwrap(), bytes);

    let dir = vector("bitmaps_directory", 0x48);
    let entries = decode_bitmap_directory(&dir, b.nb_bitmaps).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].name, "bm0");
    assert_eq!(entries[0].bitmap_table_offset, 0x60000);
    assert_eq!(entries[0].bitmap_table_size, 1);
    assert_eq!(entries[0].flags, BITMAP_FLAG_AUTO);
    assert_eq!(entries[0].bitmap_type, 1);
    assert_eq!(entries[0].granularity_bits, 16);
    assert_eq!(entries[1].name, "second-bitmap");
    assert_eq!(entries[1].granularity_bits, 17);
    assert_eq!(entries[1].bitmap_table_offset, 0x70000);
    assert_eq!(encode_bitmap_directory(&entries).unwrap(), dir);
}

#[test]
fn snapshot_table_round_trips() {
    let bytes = vector("snapshots_header", 65536);
    let h = Header::decode(&bytes).unwrap();
    assert_eq!(h.nb_snapshots, 2);
    assert_eq!(h.snapshots_offset, 0xc0000);
    assert_eq!(h.encode().unwrap(), bytes);

    let table = vector("snapshot_table", 65536);
    let snaps = decode_snapshot_table(&table, h.nb_snapshots).unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(
        (snaps[0].id.as_str(), snaps[0].name.as_str()),
        ("1", "first")
    );
    assert_eq!(
        (snaps[1].id.as_str(), snaps[1].name.as_str()),
        ("2", "second snapshot")
    );
    assert_eq!(snaps[0].l1_table_offset, 0x70000);
    assert_eq!(snaps[0].l1_size, 1);
    assert_eq!(snaps[0].vm_state_size, 0);
    assert_eq!(snaps[0].extra_data.len(), 24);
    assert_eq!(snaps[0].disk_size(), Some(64 << 20));
    assert_eq!(snaps[0].vm_state_size_large(), Some(0));
    assert_eq!(snaps[0].icount(), Some(0));
    let encoded = encode_snapshot_table(&snaps).unwrap();
    assert_eq!(encoded.len(), snapshot_table_len(&snaps));
    assert_eq!(
        encoded.len(),
        72 + 40 + 24 + 1 + 15,
        "second entry starts 8-aligned"
    );
    assert_eq!(encoded[..], table[..encoded.len()]);
    assert!(table[encoded.len()..].iter().all(|&b| b == 0));
}

#[test]
fn refcount_blocks_of_every_width_match_qemu_packing() {
    // 512-byte clusters: header, reftable, refblock, L1, L2, four data
    // clusters, then (with a snapshot) the snapshot's L1 and the snapshot
    // table. The snapshot shares the L2 and data clusters: refcount 2.
    let with_snapshot = [1u64, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1];
    for order in 0..=6u32 {
        let bits = 1u32 << order;
        let block = vector(&format!("refblock_{bits}"), 512);
        let want: &[u64] = if order == 0 { &[1; 9] } else { &with_snapshot };
        let entries = 512 * 8 / u64::from(bits);
        for i in 0..entries {
            let expected = want.get(i as usize).copied().unwrap_or(0);
            assert_eq!(
                get_refcount(&block, i, order),
                expected,
                "order {order} entry {i}"
            );
        }
        let mut rebuilt = vec![0u8; 512];
        for i in 0..entries {
            set_refcount(&mut rebuilt, i, order, get_refcount(&block, i, order));
        }
        assert_eq!(
            rebuilt, block,
            "order {order}: set_refcount writes QEMU's layout"
        );
    }
}

#[test]
fn journal_extension_without_flags_word_decodes_with_flags_zero() {
    let mut data = Vec::new();
    data.extend_from_slice(&0x50000u64.to_be_bytes());
    data.extend_from_slice(&0x20000u64.to_be_bytes());
    let ext = HeaderExtension::decode(0x716a_726e, &data, 200).unwrap();
    assert_eq!(
        ext,
        HeaderExtension::Journal(JournalExtension {
            offset: 0x50000,
            size: 0x20000,
            flags: 0
        })
    );
    // Bits 0 to 2 are known (bit 2: deduplication); bit 3 is reserved and
    // refused.
    data.extend_from_slice(&7u64.to_be_bytes());
    let ext = HeaderExtension::decode(0x716a_726e, &data, 200).unwrap();
    assert!(matches!(ext, HeaderExtension::Journal(j) if j.flags == 7));
    data.truncate(16);
    data.extend_from_slice(&8u64.to_be_bytes());
    let err = HeaderExtension::decode(0x716a_726e, &data, 200).unwrap_err();
    assert!(err.to_string().contains("flags"), "{err}");
}

#[test]
fn journal_extension_and_feature_bits_round_trip() {
    let mut h = Header::decode(&vector("default_64k_header", 65536)).unwrap();
    h.extensions = vec![HeaderExtension::FeatureNameTable(qjournal_feature_names())];
    h.set_journal(Some(JournalExtension {
        offset: 0x50000,
        size: 0x20000,
        flags: JournalExtension::FLAG_TWO_FLUSH_COMMIT,
    }));
    h.incompatible_features |= INCOMPAT_JOURNAL_DIRTY_MASK;
    h.autoclear_features |= AUTOCLEAR_JOURNAL_VALID_MASK;
    let bytes = h.encode().unwrap();
    // Journal extension right after the feature table: magic, length 24,
    // offset, size, flags.
    let at = 112 + 8 + 10 * 48;
    assert_eq!(bytes[at..at + 8], [0x71, 0x6a, 0x72, 0x6e, 0, 0, 0, 24]);
    assert_eq!(bytes[at + 8 + 16..at + 8 + 24], [0, 0, 0, 0, 0, 0, 0, 1]);
    let back = Header::decode(&bytes).unwrap();
    assert_eq!(back, h);
    assert_eq!(
        back.journal(),
        Some(JournalExtension {
            offset: 0x50000,
            size: 0x20000,
            flags: JournalExtension::FLAG_TWO_FLUSH_COMMIT,
        })
    );
    assert_eq!(
        back.feature_name(FeatureKind::Incompatible, 60),
        Some("journal dirty")
    );
    assert_eq!(
        back.feature_name(FeatureKind::Autoclear, 60),
        Some("journal valid")
    );
    back.unsupported_features()
        .expect("journal dirty is ours to handle");
    h.set_journal(None);
    assert_eq!(h.journal(), None);
}
