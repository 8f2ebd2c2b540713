//! Bad input: byte-patched images must fail with a typed error that names
//! the field, never panic, and never be written to. A corrupt entry found
//! at read time is an error, not zeros or someone else's data. Random byte
//! flips in the metadata clusters never make open, read or write panic.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use common::*;
use proptest::prelude::*;
use qj_engine::{BackingSource, CreateOptions, Error, Image, MemStorage, OpenOptions};
use qj_spec::error::FormatError;
use qj_spec::qcow2::{read_table_entry, Header, L1Entry, L2_COPIED};
use qj_spec::units::HostOffset;

const CLUSTER: u64 = 4096;
const DISK: u64 = 4 << 20;

/// A valid image of ours with data under two L2 tables, and its guest disk.
struct Good {
    bytes: Vec<u8>,
    header: Header,
    model: Vec<u8>,
}

impl Good {
    fn new(dir: &tempfile::TempDir) -> Good {
        let path = in_dir(dir, "good.qcow2");
        Image::create_path(
            &path,
            &CreateOptions {
                virtual_size: DISK,
                cluster_size: CLUSTER,
                refcount_bits: 16,
                ..CreateOptions::default()
            },
        )
        .expect("create");
        let image = Image::open_path(&path, &OpenOptions::read_write()).expect("open");
        let mut model = vec![0u8; DISK as usize];
        // Guest cluster 0 first, so that its L2 entry is easy to find; the
        // second L2 table (2 MiB and up) gets data too.
        for (byte, offset, len) in [
            (0x11u8, 0u64, 10_000u64),
            (0x22, (2 << 20) + 5000, 3000),
            (0x33, 3 << 20, 8192),
        ] {
            image
                .write(&vec![byte; len as usize], offset)
                .expect("write");
            model[offset as usize..(offset + len) as usize].fill(byte);
        }
        image.close().expect("close");
        let bytes = file_bytes(&path);
        let header = Header::decode(&bytes).expect("our own header decodes");
        Good {
            bytes,
            header,
            model,
        }
    }

    /// Host offset of the L2 table that maps guest cluster 0.
    fn first_l2(&self) -> u64 {
        let at = self.header.l1_table_offset as usize;
        L1Entry(read_table_entry(&self.bytes[at..], 0))
            .l2_offset()
            .expect("guest cluster 0 is mapped")
            .0
    }
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// Sets autoclear bit 7, which no one defines: a read-write open that
/// succeeds clears it (a header write), so one that wrote anything before
/// refusing the image would show in the file.
fn with_autoclear_bit(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes[95] |= 0x80;
    bytes
}

/// Both opens fail; `expect` judges the error; the file is unchanged.
fn assert_refused(path: &Path, bytes: &[u8], what: &str, expect: impl Fn(&Error) -> bool) {
    std::fs::write(path, bytes).expect("writing the bad image");
    for opts in [OpenOptions::read_only(), OpenOptions::read_write()] {
        let writable = opts.writable;
        match Image::open_path(path, &opts) {
            Ok(_) => panic!("{what}: the image opened (writable: {writable})"),
            Err(e) => assert!(
                expect(&e),
                "{what} (writable: {writable}): unexpected error: {e:?}"
            ),
        }
        assert!(
            file_bytes(path) == bytes,
            "{what}: a failed open (writable: {writable}) modified the file"
        );
    }
}

/// The error is a [`FormatError::Field`] naming `field`, and its text names it.
fn names_field(field: &'static str) -> impl Fn(&Error) -> bool {
    move |e| {
        matches!(e, Error::Format(FormatError::Field { field: f, .. }) if *f == field)
            && e.to_string().contains(field)
    }
}

#[test]
fn a_good_image_with_an_unknown_autoclear_bit_opens_and_loses_it() {
    // The control for every refusal below: the bit is cleared by a
    // successful read-write open, so a refused open that wrote would show.
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "control.qcow2");
    std::fs::write(&path, with_autoclear_bit(good.bytes.clone())).expect("write");
    let image = Image::open_path(&path, &OpenOptions::read_write()).expect("open");
    assert_same_disk(&read_all(&image), &good.model, "control");
    image.close().expect("close");
    let header = Header::decode(&file_bytes(&path)).expect("header");
    assert_eq!(header.autoclear_features, 0);
}

/// A change to the bytes of a good image.
type Patch = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn header_fields_out_of_range_are_refused_by_name() {
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "bad.qcow2");
    let file_len = good.bytes.len() as u64;
    let past_end = file_len.next_multiple_of(CLUSTER) + 64 * CLUSTER;
    let cases: Vec<(&str, &'static str, Patch)> = vec![
        ("bad magic", "magic", Box::new(|b| b[0] ^= 0xff)),
        ("version 4", "version", Box::new(|b| put_u32(b, 4, 4))),
        (
            "cluster_bits 8",
            "cluster_bits",
            Box::new(|b| put_u32(b, 20, 8)),
        ),
        (
            "cluster_bits 22",
            "cluster_bits",
            Box::new(|b| put_u32(b, 20, 22)),
        ),
        (
            "cluster_bits 2^32-1",
            "cluster_bits",
            Box::new(|b| put_u32(b, 20, u32::MAX)),
        ),
        (
            "absurd virtual size",
            "size",
            Box::new(|b| put_u64(b, 24, u64::MAX)),
        ),
        (
            "crypt_method 7",
            "crypt_method",
            Box::new(|b| put_u32(b, 32, 7)),
        ),
        (
            "absurd L1 size",
            "l1_size",
            Box::new(|b| put_u32(b, 36, u32::MAX)),
        ),
        (
            "L1 too small for the disk",
            "l1_size",
            Box::new(|b| put_u32(b, 36, 1)),
        ),
        (
            "L1 table offset not cluster aligned",
            "l1_table_offset",
            Box::new(move |b| {
                let at = u64::from_be_bytes(b[40..48].try_into().unwrap());
                put_u64(b, 40, at + 512);
            }),
        ),
        (
            "L1 table past the end of the file",
            "l1_table_offset",
            Box::new(move |b| put_u64(b, 40, past_end)),
        ),
        (
            "refcount table offset not cluster aligned",
            "refcount_table_offset",
            Box::new(|b| put_u64(b, 48, CLUSTER + 512)),
        ),
        (
            "refcount table past the end of the file",
            "refcount_table_offset",
            Box::new(move |b| put_u64(b, 48, past_end)),
        ),
        (
            "refcount table overlapping the header",
            "refcount_table_offset",
            Box::new(|b| put_u64(b, 48, 0)),
        ),
        (
            "no refcount table",
            "refcount_table_clusters",
            Box::new(|b| put_u32(b, 56, 0)),
        ),
        (
            "absurd refcount table size",
            "refcount_table_clusters",
            Box::new(|b| put_u32(b, 56, u32::MAX)),
        ),
        (
            "snapshot table not cluster aligned",
            "snapshots_offset",
            Box::new(|b| {
                put_u32(b, 60, 1);
                put_u64(b, 64, CLUSTER + 8);
            }),
        ),
        (
            "refcount_order 7",
            "refcount_order",
            Box::new(|b| put_u32(b, 96, 7)),
        ),
        (
            "header length not a multiple of 8",
            "header_length",
            Box::new(|b| put_u32(b, 100, 108)),
        ),
        (
            "header length below version 3's minimum",
            "header_length",
            Box::new(|b| put_u32(b, 100, 96)),
        ),
        (
            "header length past the cluster",
            "header_length",
            Box::new(|b| put_u32(b, 100, CLUSTER as u32 + 8)),
        ),
        (
            "backing file name inside the fixed header",
            "backing_file_offset",
            Box::new(|b| {
                put_u64(b, 8, 16);
                put_u32(b, 16, 4);
            }),
        ),
        (
            "backing file name past the header cluster",
            "backing_file_size",
            Box::new(|b| {
                put_u64(b, 8, 2048);
                put_u32(b, 16, 3000);
            }),
        ),
    ];
    for (what, field, patch) in cases {
        let mut bytes = with_autoclear_bit(good.bytes.clone());
        patch(&mut bytes);
        assert_refused(&path, &bytes, what, names_field(field));
    }
}

#[test]
fn l1_entries_pointing_outside_the_file_or_misaligned_are_refused() {
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "bad.qcow2");
    let l1 = good.header.l1_table_offset as usize;
    let first_l2 = good.first_l2();
    let past_end = (good.bytes.len() as u64).next_multiple_of(CLUSTER) + 64 * CLUSTER;
    for (what, l2) in [
        ("L2 table past the end of the file", past_end),
        ("L2 table not cluster aligned", first_l2 + 512),
    ] {
        let mut bytes = with_autoclear_bit(good.bytes.clone());
        put_u64(&mut bytes, l1, L1Entry::new(HostOffset(l2), true).0);
        assert_refused(&path, &bytes, what, |e| {
            names_field("l2_table_offset")(e)
                && matches!(e, Error::Format(FormatError::Field { offset, .. }) if *offset == l1 as u64)
        });
    }
}

#[test]
fn refcount_blocks_outside_the_file_or_misaligned_are_refused() {
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "bad.qcow2");
    let table = good.header.refcount_table_offset as usize;
    let block = read_table_entry(&good.bytes[table..], 0);
    let past_end = (good.bytes.len() as u64).next_multiple_of(CLUSTER) + 64 * CLUSTER;
    for (what, entry, says) in [
        (
            "refcount block past the end of the file",
            past_end,
            "past the end",
        ),
        (
            "refcount block not cluster aligned",
            block + 512,
            "misaligned",
        ),
    ] {
        let mut bytes = with_autoclear_bit(good.bytes.clone());
        put_u64(&mut bytes, table, entry);
        assert_refused(&path, &bytes, what, |e| {
            let text = e.to_string();
            matches!(e, Error::Corrupt(_))
                && text.contains("refcount table entry 0")
                && text.contains(says)
        });
    }
}

/// Cutting the file anywhere before its last cluster loses something the
/// metadata points to: open or a read of the whole disk fails, and nothing
/// ever reads as zeros in place of data.
#[test]
fn truncated_files_fail_at_open_or_read() {
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "short.qcow2");
    let file_len = good.bytes.len() as u64;
    for (len, field) in [
        (0, None),
        (50, None),
        (100, None),
        (CLUSTER, Some("l1_table_offset")),
        (CLUSTER + 100, Some("l1_table_offset")),
    ] {
        let bytes = good.bytes[..len as usize].to_vec();
        assert_refused(
            &path,
            &bytes,
            &format!("truncated to {len}"),
            |e| match field {
                None => matches!(e, Error::Format(FormatError::Truncated { .. })),
                Some(f) => names_field(f)(e),
            },
        );
    }
    let mut len = 2 * CLUSTER;
    while len < file_len {
        let bytes = with_autoclear_bit(good.bytes[..len as usize].to_vec());
        std::fs::write(&path, &bytes).expect("write");
        match Image::open_path(&path, &OpenOptions::read_only()) {
            Err(_) => {
                // Refused at open: a read-write open must refuse too, untouched.
                assert!(
                    Image::open_path(&path, &OpenOptions::read_write()).is_err(),
                    "truncated to {len}: read-only refused, read-write opened"
                );
                assert!(file_bytes(&path) == bytes, "truncated to {len}: modified");
            }
            Ok(image) => {
                let mut buf = vec![0u8; DISK as usize];
                let err = image
                    .read(&mut buf, 0)
                    .expect_err(&format!("truncated to {len}: the whole disk read"));
                assert!(
                    err.to_string().contains("past the end of the file"),
                    "truncated to {len}: {err}"
                );
            }
        }
        len += CLUSTER;
    }
}

/// L2 entries checked when used: a data cluster past the end of the file
/// or not aligned is an error for reads and writes, the rest of the disk
/// still reads, and the image is not modified.
#[test]
fn bad_l2_entries_fail_reads_and_writes_without_modifying_the_image() {
    let dir = temp_dir();
    let good = Good::new(&dir);
    let path = in_dir(&dir, "bad.qcow2");
    let l2 = good.first_l2() as usize;
    let data = read_table_entry(&good.bytes[l2..], 0) & !L2_COPIED;
    let past_end = (good.bytes.len() as u64).next_multiple_of(CLUSTER) + 64 * CLUSTER;
    for (what, entry, says) in [
        (
            "data cluster past the end of the file",
            past_end,
            "past the end of the file",
        ),
        ("data cluster not cluster aligned", data + 512, "misaligned"),
    ] {
        let mut bytes = good.bytes.clone();
        put_u64(&mut bytes, l2, entry | L2_COPIED);
        std::fs::write(&path, &bytes).expect("write");

        let image = Image::open_path(&path, &OpenOptions::read_only()).expect("open");
        let mut buf = vec![0u8; 512];
        let err = image.read(&mut buf, 0).expect_err(what);
        assert!(
            matches!(err, Error::Corrupt(_)) && err.to_string().contains(says),
            "{what}: {err:?}"
        );
        // The rest of the disk is still readable.
        let mut rest = vec![0u8; (DISK - CLUSTER) as usize];
        image
            .read(&mut rest, CLUSTER)
            .expect("the other clusters read");
        assert_same_disk(&rest, &good.model[CLUSTER as usize..], what);
        drop(image);

        let image = Image::open_path(&path, &OpenOptions::read_write()).expect("open");
        assert!(
            image.write(&[0x55; 100], 10).is_err(),
            "{what}: partial write"
        );
        assert!(
            image.write(&[0x55; CLUSTER as usize], 0).is_err(),
            "{what}: whole write"
        );
        assert!(
            image.write_zeroes(0, CLUSTER).is_err(),
            "{what}: write_zeroes"
        );
        let _ = image.close();
        assert!(
            file_bytes(&path) == bytes,
            "{what}: the corrupt image was modified"
        );
    }
}

/// A small image with 512-byte clusters whose first clusters hold every
/// kind of metadata: header, refcount table and block, L1, L2, data.
fn fuzz_seed_image() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(build_fuzz_seed_image)
}

fn build_fuzz_seed_image() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    Image::create(
        &*storage,
        &CreateOptions {
            virtual_size: 256 << 10,
            cluster_size: 512,
            refcount_bits: 16,
            ..CreateOptions::default()
        },
    )
    .expect("create");
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).expect("open");
    for (byte, offset, len) in [(1u8, 0u64, 1500u64), (2, 40_000, 700), (3, 200_000, 512)] {
        image
            .write(&vec![byte; len as usize], offset)
            .expect("write");
    }
    image.close().expect("close");
    storage.to_bytes()
}

/// Open, read everything, and (when it opens read-write) write, zero,
/// discard, grow, flush and close. Errors are fine; panics are not.
fn exercise(bytes: Vec<u8>) {
    let mut opts = OpenOptions::read_only();
    opts.backing = BackingSource::Ignore;
    opts.cache_bytes_max = 0;
    let storage = Arc::new(MemStorage::from_bytes(bytes.clone()));
    if let Ok(image) = Image::open(storage, &opts) {
        let size = image.virtual_size().min(1 << 20) as usize;
        let mut buf = vec![0u8; size];
        let _ = image.read(&mut buf, 0);
        let _ = image.map();
        let _ = image.info();
    }
    opts.writable = true;
    let metadata = named_metadata_clusters(&bytes);
    let storage = Arc::new(MemStorage::from_bytes(bytes.clone()));
    if let Ok(image) = Image::open(storage.clone(), &opts) {
        let size = image.virtual_size();
        if size >= 4096 {
            let _ = image.write(&[0x5a; 3000], 100);
            let _ = image.write_zeroes(512, 1024);
            let _ = image.discard(0, 2048);
            let _ = image.write(&[0xa5; 512], size - 512);
            let _ = image.flush();
            let _ = image.resize(size + 4096);
        }
        let _ = image.close();
    }
    // The overlap guard: the guest bytes written above never land on a
    // cluster the damaged image's own header and tables name as metadata.
    let after = storage.to_bytes();
    for cluster in metadata {
        let range = |b: &[u8]| {
            let start = (cluster as usize * 512).min(b.len());
            b[start..(start + 512).min(b.len())].to_vec()
        };
        let (old, new) = (range(&bytes), range(&after));
        for pattern in [0x5a_u8, 0xa5] {
            assert!(
                has_run(&old, pattern) || !has_run(&new, pattern),
                "guest bytes {pattern:#x} landed on metadata cluster {cluster}"
            );
        }
    }
}

/// Whether `bytes` hold 64 or more bytes of `pattern` in a row: guest data
/// (a table holds no such run of these values).
fn has_run(bytes: &[u8], pattern: u8) -> bool {
    bytes.windows(64).any(|w| w.iter().all(|&b| b == pattern))
}

/// The clusters (of the seed's 512 bytes) that the damaged image's header,
/// first refcount table entry and first L1 entry name as metadata.
fn named_metadata_clusters(bytes: &[u8]) -> Vec<u64> {
    let Ok(header) = qj_spec::qcow2::Header::decode(bytes) else {
        return vec![0];
    };
    let entry = |at: u64| {
        bytes
            .get(at as usize..at as usize + 8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    let mut clusters = vec![
        0,
        header.refcount_table_offset / 512,
        header.l1_table_offset / 512,
    ];
    let block = entry(header.refcount_table_offset) & 0x00ff_ffff_ffff_fe00;
    let l2 = entry(header.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    clusters.extend([block / 512, l2 / 512].into_iter().filter(|&c| c != 0));
    clusters
}

/// Found by the fuzz test: byte 6 of the first L2 entry set to 4 points
/// guest cluster 0 at the refcount block. Writes then land on the block, a
/// discard frees it as data, and the reloaded block holds guest bytes: the
/// next allocation finds a nonzero count. That is a corrupt image (an
/// error), not a broken invariant (a panic).
#[test]
fn guest_data_overlapping_a_refcount_block_is_an_error_not_a_panic() {
    let mut bytes = fuzz_seed_image().to_vec();
    let l2_first_entry = 4 * 512;
    assert_eq!(
        read_table_entry(&bytes[l2_first_entry..], 0) & !L2_COPIED,
        5 * 512,
        "the seed image's layout changed: header, refcount table, refcount block, L1, L2, data"
    );
    bytes[l2_first_entry + 6] = 4;
    let outcome = catch_unwind(AssertUnwindSafe(|| exercise(bytes)));
    assert!(outcome.is_ok(), "panicked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random bytes anywhere in the image (its first 8 clusters hold the
    /// header, refcount table and block, L1 and L2 tables): open fails or
    /// succeeds, and nothing panics.
    #[test]
    fn flipped_metadata_bytes_never_panic(
        flips in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8)
    ) {
        let mut bytes = fuzz_seed_image().to_vec();
        for &(at, value) in &flips {
            if let Some(b) = bytes.get_mut(at) {
                *b = value;
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(bytes)));
        prop_assert!(outcome.is_ok(), "panicked on flips (offset, new byte) {:?}", flips);
    }

    /// Random bytes in the first L2 entries (cluster 4 of the seed), where
    /// a damaged entry points guest writes at metadata most often: the
    /// overlap guard keeps every one of them off the metadata (`exercise`
    /// asserts it), and nothing panics.
    #[test]
    fn damaged_l2_entries_never_put_guest_bytes_on_metadata(
        flips in proptest::collection::vec((2048usize..2048 + 64, any::<u8>()), 1..4)
    ) {
        let mut bytes = fuzz_seed_image().to_vec();
        for &(at, value) in &flips {
            bytes[at] = value;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(bytes)));
        prop_assert!(outcome.is_ok(), "failed on flips (offset, new byte) {:?}", flips);
    }
}

/// Found by the whole-image fuzz target: an L1 entry names the L1 table
/// itself as an L2 table (and the snapshot table sits on the header). The
/// repair of a misaligned preallocated "L2 entry" then wrote into the L1
/// table, and the refcount rebuild's debug assertion fired. Now the repair
/// stops at the same overlap check as QEMU's (`qemu-img check -r all`
/// fails with "ERROR: Overlap check failed", exit 1): no panic, a check
/// error, and neither the header's fields nor the L1 entries' offsets are
/// rewritten as L2 entries.
#[test]
fn a_repair_never_writes_an_l2_entry_into_the_header_or_the_l1_table() {
    let bytes = include_bytes!("data/l1-entry-naming-its-own-table.qcow2.bin").to_vec();
    let storage = MemStorage::from_bytes(bytes.clone());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        qj_engine::check::check(&storage, qj_engine::check::RepairMode::All, &[])
    }));
    let report = outcome
        .expect("the repair must not panic")
        .expect("the check completes");
    assert!(report.check_errors > 0, "{:?}", report.messages);
    assert!(
        report
            .messages
            .iter()
            .any(|m| m == "ERROR: Overlap check failed"),
        "{:?}",
        report.messages
    );
    let after = storage.to_bytes();
    // The L1 table (1 KiB clusters, at 0xc00, 2 entries): only the COPIED
    // flag (bit 63) of an entry may change, as QEMU's repair of OFLAG_COPIED
    // does; the offsets stay.
    for i in 0..2 {
        let at = 0xc00 + i * 8;
        let old = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let new = u64::from_be_bytes(after[at..at + 8].try_into().unwrap());
        assert_eq!(old & !(1 << 63), new & !(1 << 63), "L1 entry {i} rewritten");
    }
}

/// Found by the whole-image fuzz target: a bitmaps extension whose
/// directory size says 8 GiB made a writable open allocate it before
/// reading. The size is bounded by QEMU's limit and by the file first, and
/// the open is refused by name, with nothing written.
#[test]
fn a_bitmap_directory_larger_than_the_file_is_refused_before_it_is_read() {
    let bytes = include_bytes!("data/bitmap-directory-of-8-gib.qcow2.bin").to_vec();
    let storage = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let mut opts = OpenOptions::read_write();
    opts.backing = BackingSource::Ignore;
    let err = Image::open(storage.clone(), &opts).expect_err("the open must be refused");
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("bitmap directory")),
        "{err}"
    );
    assert!(
        storage.to_bytes() == bytes,
        "a refused open wrote to the image"
    );
}

/// Found by the whole-image fuzz target: a journal image whose refcount
/// table names a block inside the journal passed the read-only probe of a
/// writable open (only a writable open builds the metadata map), and the
/// journal's open then wrote its header before the refcount side refused
/// the overlap. The probe now checks what a writable open checks.
#[test]
fn a_refcount_block_inside_the_journal_is_refused_before_anything_is_written() {
    let bytes = include_bytes!("data/refcount-block-inside-the-journal.qcow2.bin").to_vec();
    let storage = Arc::new(MemStorage::from_bytes(bytes.clone()));
    let mut opts = OpenOptions::read_write();
    opts.backing = BackingSource::Ignore;
    let err = Image::open(storage.clone(), &opts).expect_err("the open must be refused");
    assert!(
        matches!(&err, Error::Corrupt(m) if m.contains("overlaps the qjournal")),
        "{err}"
    );
    assert!(
        storage.to_bytes() == bytes,
        "a refused open wrote to the image"
    );
}
