//! Malformed qcow2 structures: each must come back as a typed error naming
//! the field, never a panic or a silently accepted value.

use qj_spec::qcow2::features::*;
use qj_spec::qcow2::*;
use qj_spec::units::Geometry;
use qj_spec::FormatError;

fn fresh() -> Header {
    let mut h = Header::new_v3(
        Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        },
        64 << 20,
    );
    h.l1_size = 1;
    h.l1_table_offset = 0x30000;
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn field_of(e: FormatError) -> &'static str {
    match e {
        FormatError::Field { field, .. } => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn fixed_header_fields_are_validated() {
    let good = fresh().encode().unwrap();
    let cases: [(usize, u32, &str); 7] = [
        (0, 0x1234_5678, "magic"),
        (4, 4, "version"),
        (20, 8, "cluster_bits"),
        (20, 22, "cluster_bits"),
        (96, 7, "refcount_order"),
        (100, 100, "header_length"),
        (100, 108, "header_length"),
    ];
    for (at, value, want) in cases {
        let mut b = good.clone();
        put32(&mut b, at, value);
        assert_eq!(
            field_of(Header::decode(&b).unwrap_err()),
            want,
            "byte {at} = {value}"
        );
    }
    let mut b = good.clone();
    put32(&mut b, 32, 3);
    assert_eq!(field_of(Header::decode(&b).unwrap_err()), "crypt_method");
}

#[test]
fn short_input_is_truncated_not_a_panic() {
    let good = fresh().encode().unwrap();
    for len in [0, 4, 71, 72, 103] {
        match Header::decode(&good[..len]) {
            Err(FormatError::Truncated { need, have, .. }) => {
                assert!(need > have, "len {len}");
                assert_eq!(have, len as u64);
            }
            other => panic!("len {len}: {other:?}"),
        }
    }
    // The fixed header alone decodes: the rest of the cluster reads as zeros.
    assert_eq!(Header::decode(&good[..112]).unwrap(), fresh());
}

#[test]
fn extension_running_past_the_cluster_names_its_length() {
    let mut b = fresh().encode().unwrap();
    put32(&mut b, 112, 0x1234);
    put32(&mut b, 116, 65536);
    match Header::decode(&b).unwrap_err() {
        FormatError::Field { field, offset, .. } => {
            assert_eq!(field, "length");
            assert_eq!(offset, 116);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn backing_file_name_bounds() {
    let mut h = fresh();
    h.backing_file = Some("x".repeat(1024));
    assert_eq!(field_of(h.encode().unwrap_err()), "backing_file_size");
    let mut b = fresh().encode().unwrap();
    b[8..16].copy_from_slice(&0x200u64.to_be_bytes());
    put32(&mut b, 16, 2000);
    assert_eq!(
        field_of(Header::decode(&b).unwrap_err()),
        "backing_file_size"
    );
    b[8..16].copy_from_slice(&0x20000u64.to_be_bytes());
    put32(&mut b, 16, 1);
    assert_eq!(
        field_of(Header::decode(&b).unwrap_err()),
        "backing_file_offset"
    );
}

#[test]
fn unknown_extension_survives_byte_for_byte() {
    let mut h = fresh();
    h.extensions.push(HeaderExtension::Unknown {
        kind: 0xdead_beef,
        data: vec![1, 2, 3, 4, 5],
    });
    // A feature table with garbage after a name cannot be re-encoded from
    // the structured form, so it must be kept raw.
    let mut odd_table = vec![0u8; 48];
    odd_table[2..6].copy_from_slice(b"abc\0");
    odd_table[10] = 0x7f;
    h.extensions.push(HeaderExtension::Unknown {
        kind: EXT_FEATURE_NAME_TABLE,
        data: odd_table.clone(),
    });
    let bytes = h.encode().unwrap();
    let back = Header::decode(&bytes).unwrap();
    assert_eq!(back.extensions, h.extensions);
    assert_eq!(back.encode().unwrap(), bytes);
}

#[test]
fn extension_payloads_are_validated() {
    let bad_len = HeaderExtension::decode(EXT_JOURNAL, &[0; 8], 120).unwrap_err();
    assert_eq!(field_of(bad_len), "length");
    let bad_len = HeaderExtension::decode(EXT_BITMAPS, &[0; 16], 120).unwrap_err();
    assert_eq!(field_of(bad_len), "length");
    let mut reserved = [0u8; 24];
    reserved[7] = 1;
    assert_eq!(
        field_of(HeaderExtension::decode(EXT_BITMAPS, &reserved, 120).unwrap_err()),
        "reserved"
    );
    assert_eq!(
        field_of(HeaderExtension::decode(EXT_BACKING_FORMAT, &[0xff, 0xfe], 120).unwrap_err()),
        "format name"
    );
    assert_eq!(
        field_of(HeaderExtension::decode(EXT_BACKING_FORMAT, &[b'a'; 16], 120).unwrap_err()),
        "length"
    );
}

#[test]
fn unsupported_features_are_named() {
    let unsupported = |h: &Header| match h.unsupported_features() {
        Err(FormatError::Unsupported(what)) => what,
        other => panic!("{other:?}"),
    };
    let mut h = fresh();
    h.crypt_method = CRYPT_LUKS;
    assert!(unsupported(&h).contains("encryption"));
    let mut h = fresh();
    h.incompatible_features |= INCOMPAT_DATA_FILE_MASK;
    assert_eq!(unsupported(&h), "external data file");
    let mut h = fresh();
    h.incompatible_features |= INCOMPAT_EXTL2_MASK;
    assert_eq!(unsupported(&h), "extended L2 entries");
    let mut h = fresh();
    h.compression_type = COMPRESSION_ZSTD;
    h.incompatible_features |= INCOMPAT_COMPRESSION_MASK;
    assert_eq!(unsupported(&h), "compression type zstd");
    let mut h = fresh();
    h.incompatible_features |= INCOMPAT_COMPRESSION_MASK;
    assert_eq!(
        field_of(h.unsupported_features().unwrap_err()),
        "incompatible_features"
    );
    let mut h = fresh();
    h.incompatible_features |= 1 << 20;
    assert_eq!(unsupported(&h), "unknown incompatible feature bit 20");
    h.extensions
        .push(HeaderExtension::FeatureNameTable(vec![FeatureName::new(
            FeatureKind::Incompatible,
            20,
            "frobnication",
        )]));
    assert_eq!(
        unsupported(&h),
        "unknown incompatible feature bit 20 (frobnication)"
    );
    let mut h = fresh();
    h.incompatible_features |= INCOMPAT_CORRUPT_MASK;
    assert_eq!(h.unsupported_features(), Err(FormatError::MarkedCorrupt));
    let mut h = fresh();
    h.incompatible_features |= INCOMPAT_DIRTY_MASK | INCOMPAT_JOURNAL_DIRTY_MASK;
    h.compatible_features |= 1 << 33;
    h.autoclear_features |= 1 << 40;
    assert_eq!(h.unsupported_features(), Ok(()));
}

#[test]
fn layout_errors_name_the_field() {
    let file_len = 0x40000;
    fresh().validate_layout(file_len).unwrap();
    type Mutation = Box<dyn Fn(&mut Header)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|h| h.l1_table_offset = 0x30200), "l1_table_offset"),
        (Box::new(|h| h.l1_table_offset = 0x40000), "l1_table_offset"),
        (Box::new(|h| h.l1_table_offset = !0xffff), "l1_table_offset"),
        (Box::new(|h| h.l1_size = 0), "l1_size"),
        (Box::new(|h| h.l1_size = (32 << 20) / 8 + 1), "l1_size"),
        (
            Box::new(|h| h.refcount_table_offset = 0),
            "refcount_table_offset",
        ),
        (
            Box::new(|h| h.refcount_table_offset = 0x10008),
            "refcount_table_offset",
        ),
        (
            Box::new(|h| h.refcount_table_clusters = 4),
            "refcount_table_offset",
        ),
        (
            Box::new(|h| h.refcount_table_clusters = 0),
            "refcount_table_clusters",
        ),
        (
            Box::new(|h| h.refcount_table_clusters = 129),
            "refcount_table_clusters",
        ),
        (Box::new(|h| h.size = (1 << 61) + 1), "size"),
        (
            Box::new(|h| {
                h.nb_snapshots = 1;
                h.snapshots_offset = 0x20100;
            }),
            "snapshots_offset",
        ),
        (Box::new(|h| h.nb_snapshots = 65537), "nb_snapshots"),
    ];
    for (i, (mutate, want)) in cases.iter().enumerate() {
        let mut h = fresh();
        mutate(&mut h);
        assert_eq!(
            field_of(h.validate_layout(file_len).unwrap_err()),
            *want,
            "case {i}"
        );
    }
}

#[test]
fn snapshot_table_errors() {
    let snap = SnapshotHeader {
        l1_table_offset: 0x50000,
        l1_size: 1,
        id: "1".into(),
        name: "n".into(),
        date_sec: 1,
        date_nsec: 2,
        vm_clock_nsec: 3,
        vm_state_size: 0,
        extra_data: vec![0; 16],
    };
    let table = encode_snapshot_table(&[snap.clone(), snap.clone()]).unwrap();
    assert_eq!(
        decode_snapshot_table(&table, 2).unwrap(),
        vec![snap.clone(), snap]
    );
    assert!(matches!(
        decode_snapshot_table(&table[..table.len() - 1], 2),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        decode_snapshot_table(&table, 3),
        Err(FormatError::Truncated { .. })
    ));
    let mut big_extra = table.clone();
    big_extra[36..40].copy_from_slice(&2000u32.to_be_bytes());
    assert_eq!(
        field_of(decode_snapshot_table(&big_extra, 1).unwrap_err()),
        "extra_data_size"
    );
    assert_eq!(
        field_of(decode_snapshot_table(&table, 70000).unwrap_err()),
        "nb_snapshots"
    );
}

#[test]
fn bitmap_directory_truncation() {
    let e = BitmapDirectoryEntry {
        bitmap_table_offset: 0x60000,
        bitmap_table_size: 1,
        flags: BITMAP_FLAG_AUTO,
        bitmap_type: 1,
        granularity_bits: 16,
        extra_data: vec![],
        name: "b".into(),
    };
    let dir = encode_bitmap_directory(std::slice::from_ref(&e)).unwrap();
    assert_eq!(dir.len(), 32);
    assert_eq!(decode_bitmap_directory(&dir, 1).unwrap(), vec![e]);
    assert!(matches!(
        decode_bitmap_directory(&dir[..24], 1),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        decode_bitmap_directory(&dir, 2),
        Err(FormatError::Truncated { .. })
    ));
}
