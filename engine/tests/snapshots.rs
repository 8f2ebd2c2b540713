//! Internal snapshots made, applied and deleted by qj (issue 17 items 4
//! and 5), on both backends, with QEMU's tools as the oracle: `qemu-img
//! snapshot -l` lists ours, `qemu-img convert -l` reads them back byte for
//! byte, QEMU applies and deletes them, we apply and delete QEMU's, and
//! `qemu-img check` is clean after every step (on the journal, its own
//! clusters are the only leaks QEMU reports: it does not know the
//! extension). Our own check must find no leak at all.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{
    assert_checks_clean, assert_qemu_io_sees, assert_same_disk, convert_raw, file_bytes, in_dir,
    path_str, qemu_check_json, qemu_img, read_all, temp_dir,
};
use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Error, FileStorage, Image, JournalConfig, OpenOptions, Storage};
use qj_spec::qcow2::{
    decode_bitmap_directory, decode_snapshot_table, read_table_entry, Header, SnapshotHeader,
    BITMAP_TABLE_ENTRY_OFFSET_MASK,
};

const CLUSTER: u64 = 65536;
const SIZE: u64 = 8 << 20;

fn create(dir: &tempfile::TempDir, journal: bool, cluster: u64, journal_bytes: u64) -> PathBuf {
    let path = in_dir(dir, if journal { "j.qcow2" } else { "o.qcow2" });
    let opts = CreateOptions {
        virtual_size: SIZE,
        cluster_size: cluster,
        journal: journal.then(|| JournalConfig {
            size_bytes: journal_bytes,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    };
    Image::create_path(&path, &opts).expect("create");
    path
}

fn open_rw(path: &Path) -> Image {
    Image::open_path(path, &OpenOptions::read_write()).expect("open read-write")
}

fn header(path: &Path) -> Header {
    let storage = FileStorage::open(path, false).expect("open file");
    Image::read_header(&storage).expect("header")
}

/// The header's snapshot fields, the active L1 offset, and the table's
/// entries: what a snapshot operation changes.
fn snapshot_table(path: &Path) -> (u32, u64, u64, Vec<SnapshotHeader>) {
    let h = header(path);
    let bytes = file_bytes(path);
    let table = decode_snapshot_table(&bytes[h.snapshots_offset as usize..], h.nb_snapshots)
        .expect("the snapshot table decodes");
    (h.nb_snapshots, h.snapshots_offset, h.l1_table_offset, table)
}

/// Writes `byte` over `[offset, offset + len)` through qj and the model.
fn write(image: &Image, model: &mut [u8], byte: u8, offset: u64, len: u64) {
    image
        .write(&vec![byte; len as usize], offset)
        .expect("write");
    model[offset as usize..(offset + len) as usize].fill(byte);
}

/// `qemu-img snapshot -l` names, in order.
fn qemu_list(path: &Path) -> Vec<String> {
    qemu_img(&["snapshot", "-l", path_str(path)])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn snapshot_round_trip(journal: bool, cluster: u64) {
    let when = |step: &str| format!("journal {journal}, cluster {cluster}: {step}");
    let dir = temp_dir();
    let path = create(&dir, journal, cluster, 16 << 20);
    let mut model = vec![0u8; SIZE as usize];

    // A: data in two L2 tables' worth of clusters, partial and whole.
    let image = open_rw(&path);
    write(&image, &mut model, 0x11, 0, 3 * cluster);
    write(&image, &mut model, 0x12, 5 * cluster + 100, 300);
    write(&image, &mut model, 0x13, SIZE - 2 * cluster, 2 * cluster);
    image.write_zeroes(cluster, cluster).expect("zero");
    model[cluster as usize..2 * cluster as usize].fill(0);
    let created = image.snapshot_create("one").expect("create one");
    assert_eq!(created.id, "1");
    assert_eq!(created.disk_size(), Some(SIZE));
    assert_eq!(created.vm_state_size, 0);
    let a = model.clone();
    assert_eq!(
        image.snapshot_create("one").unwrap_err().to_string(),
        "invalid argument: a snapshot named \"one\" already exists"
    );
    // B: overwrites of shared clusters copy them; a new cluster too.
    write(&image, &mut model, 0x21, 10, 20);
    write(&image, &mut model, 0x22, 2 * cluster, cluster);
    write(&image, &mut model, 0x23, 40 * cluster, cluster);
    image.snapshot_create("two").expect("create two");
    let b = model.clone();
    write(&image, &mut model, 0x31, 0, cluster);
    assert_same_disk(&read_all(&image), &model, &when("our read after create"));
    image.close().expect("close");
    assert_checks_clean(&path, &when("after two creates"));
    assert_eq!(qemu_list(&path), ["one", "two"], "{}", when("list"));
    assert_same_disk(
        &convert_raw(&path, Some("one")),
        &a,
        &when("one as QEMU reads it"),
    );
    assert_same_disk(
        &convert_raw(&path, Some("two")),
        &b,
        &when("two as QEMU reads it"),
    );
    assert_same_disk(
        &convert_raw(&path, None),
        &model,
        &when("active as QEMU reads it"),
    );

    // Apply one: the active disk is A again; writing after it copies.
    let image = open_rw(&path);
    let listed: Vec<String> = image
        .snapshots()
        .expect("list")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, ["one", "two"]);
    image.snapshot_apply("one").expect("apply one");
    assert_same_disk(&read_all(&image), &a, &when("our read after apply"));
    model = a.clone();
    write(&image, &mut model, 0x41, 0, 100);
    image.close().expect("close");
    assert_checks_clean(&path, &when("after apply"));
    assert_qemu_io_sees(&path, &model);
    assert_same_disk(
        &convert_raw(&path, Some("one")),
        &a,
        &when("one after a write"),
    );

    // Delete one (by id): two and the active disk keep their bytes.
    let image = open_rw(&path);
    image.snapshot_delete("1").expect("delete one");
    image.close().expect("close");
    assert_checks_clean(&path, &when("after delete"));
    assert_eq!(qemu_list(&path), ["two"], "{}", when("list after delete"));
    assert_same_disk(
        &convert_raw(&path, Some("two")),
        &b,
        &when("two after delete"),
    );
    assert_same_disk(
        &convert_raw(&path, None),
        &model,
        &when("active after delete"),
    );

    // QEMU creates one, applies ours and deletes it; we apply and delete
    // QEMU's.
    qemu_img(&["snapshot", "-c", "three", path_str(&path)]);
    let c = model.clone();
    qemu_img(&["snapshot", "-a", "two", path_str(&path)]);
    qemu_img(&["snapshot", "-d", "two", path_str(&path)]);
    let image = open_rw(&path);
    assert_same_disk(&read_all(&image), &b, &when("our read of QEMU's apply"));
    image
        .snapshot_apply("three")
        .expect("apply QEMU's snapshot");
    assert_same_disk(&read_all(&image), &c, &when("our apply of QEMU's snapshot"));
    image
        .snapshot_delete("three")
        .expect("delete QEMU's snapshot");
    image.close().expect("close");
    assert_checks_clean(&path, &when("after we deleted QEMU's snapshot"));
    assert!(qemu_list(&path).is_empty(), "{}", when("no snapshot left"));
    assert_eq!(header(&path).nb_snapshots, 0);
    assert_qemu_io_sees(&path, &c);
}

#[test]
fn snapshots_round_trip_with_qemu_on_flush_ordering() {
    snapshot_round_trip(false, CLUSTER);
}

#[test]
fn snapshots_round_trip_with_qemu_on_the_journal() {
    snapshot_round_trip(true, CLUSTER);
}

#[test]
fn snapshots_round_trip_with_small_clusters_on_both_backends() {
    // 4 KiB clusters: the 8 MiB disk spans four L2 tables.
    snapshot_round_trip(false, 4096);
    snapshot_round_trip(true, 4096);
}

/// On the journal each operation is one transaction; on flush ordering it
/// is QEMU's sequence of flushed steps.
#[test]
fn each_operation_is_one_journal_transaction() {
    let dir = temp_dir();
    let path = create(&dir, true, CLUSTER, 16 << 20);
    let image = open_rw(&path);
    image.write(&[7; 4096], 0).expect("write");
    image.flush().expect("flush");
    let committed = || image.info().unwrap().journal.unwrap().committed_seq;
    type Op = fn(&Image) -> qj_engine::Result<()>;
    let ops: [(&str, Op); 3] = [
        ("create", |i| i.snapshot_create("s").map(|_| ())),
        ("apply", |i| i.snapshot_apply("s")),
        ("delete", |i| i.snapshot_delete("s")),
    ];
    for (what, op) in ops {
        let before = committed();
        op(&image).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(committed(), before + 1, "{what}: one transaction");
    }
    image.close().expect("close");
    assert_checks_clean(&path, "journal transactions");

    let dir = temp_dir();
    let path = create(&dir, false, CLUSTER, 0);
    let image = open_rw(&path);
    image.write(&[7; 4096], 0).expect("write");
    image.flush().expect("flush");
    let before = image.stats().flushes;
    image.snapshot_create("s").expect("create");
    // Counts and COPIED flags, flushed; then the L1 copy and the table,
    // flushed; then the header, flushed.
    assert!(image.stats().flushes - before >= 4, "{:?}", image.stats());
    image.close().expect("close");
    assert_checks_clean(&path, "flush ordering");
}

/// Bad input: every refusal names what is wrong and writes nothing.
#[test]
fn bad_snapshot_requests_are_refused_and_write_nothing() {
    for journal in [false, true] {
        let dir = temp_dir();
        let path = create(&dir, journal, CLUSTER, 16 << 20);
        let image = open_rw(&path);
        image.write(&[1; 4096], 0).expect("write");
        image.snapshot_create("a").expect("create");
        image.close().expect("close");
        // QEMU makes a second snapshot with the same name.
        qemu_img(&["snapshot", "-c", "a", path_str(&path)]);
        let table_before = snapshot_table(&path);
        let image = open_rw(&path);
        let errors = [
            image.snapshot_apply("nope").unwrap_err(),
            image.snapshot_delete("nope").unwrap_err(),
            image.snapshot_apply("a").unwrap_err(),
            image.snapshot_create("a").unwrap_err(),
            image.snapshot_create("").unwrap_err(),
        ];
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("snapshot \"nope\" not found"), "{text:?}");
        assert!(text[1].contains("snapshot \"nope\" not found"), "{text:?}");
        assert!(
            text[2].contains("ambiguous") && text[2].contains("ids 1, 2"),
            "{text:?}"
        );
        assert!(text[3].contains("already exists"), "{text:?}");
        assert!(text[4].contains("snapshot name"), "{text:?}");
        image.close().expect("close");
        assert_eq!(
            snapshot_table(&path),
            table_before,
            "journal {journal}: a refusal changed the snapshot table"
        );
        // By id the duplicate is no problem.
        let image = open_rw(&path);
        image.snapshot_delete("2").expect("delete by id");
        image.close().expect("close");
        assert_checks_clean(&path, "after deleting by id");
    }
}

/// A snapshot table entry whose L1 copy lies past the end of the file, and
/// one that repeats an id: a writable open is refused naming the field,
/// nothing is written, and both checks still report the image.
#[test]
fn a_damaged_snapshot_table_is_refused_naming_the_field() {
    // Both entries have 1-byte ids and names and 24 bytes of extra data:
    // entry 0 is 66 bytes, entry 1 starts at 72, its id at 72 + 40 + 24.
    for (field, at, value) in [
        ("l1_table_offset", 0u64, (1u64 << 40).to_be_bytes().to_vec()),
        ("l1_size", 8, (u32::MAX).to_be_bytes().to_vec()),
        ("extra_data_size", 72 + 36, 2000u32.to_be_bytes().to_vec()),
        ("id_str", 72 + 64, b"1".to_vec()),
        ("name", 72 + 65, vec![0xff]),
    ] {
        let dir = temp_dir();
        let path = create(&dir, false, CLUSTER, 0);
        let image = open_rw(&path);
        image.write(&[1; 4096], 0).expect("write");
        image.snapshot_create("a").expect("create a");
        image.snapshot_create("b").expect("create b");
        image.close().expect("close");
        let h = header(&path);
        let storage = FileStorage::open(&path, true).expect("open file");
        storage
            .write_at(&value, h.snapshots_offset + at)
            .expect("damage");
        drop(storage);
        let before = file_bytes(&path);
        let err = Image::open_path(&path, &OpenOptions::read_write()).unwrap_err();
        assert!(
            matches!(err, Error::Format(_)) && err.to_string().contains(field),
            "{field}: {err}"
        );
        assert_eq!(file_bytes(&path), before, "{field}: the refused open wrote");
        // Read-only: the active disk still reads; listing reports the field.
        let image = Image::open_path(&path, &OpenOptions::read_only()).expect("read-only");
        let listed = image.snapshots().unwrap_err();
        assert!(listed.to_string().contains(field), "{field}: {listed}");
        drop(image);
        if !matches!(field, "id_str" | "name") {
            // QEMU's check does not look at ids or names.
            let storage = FileStorage::open(&path, false).expect("open file");
            let ours = check(&storage, RepairMode::None, &[]).expect("check");
            assert_ne!(ours.exit_code(), 0, "{field}: our check saw nothing");
            let qemu = common::run("qemu-img", &["check", "-f", "qcow2", path_str(&path)]);
            assert_ne!(qemu.status.code(), Some(0), "{field}: QEMU's check");
        }
    }
}

/// An operation whose metadata cannot fit one journal transaction is
/// refused before anything changes, naming both sizes.
#[test]
fn a_snapshot_larger_than_one_transaction_is_refused() {
    let dir = temp_dir();
    let path = create(&dir, true, 4096, 96 << 10);
    let image = open_rw(&path);
    for i in 0..4u64 {
        image.write(&[1; 4096], i * (2 << 20)).expect("write");
    }
    image.flush().expect("flush");
    drop(image);
    let table_before = snapshot_table(&path);
    let image = open_rw(&path);
    let err = image.snapshot_create("big").unwrap_err();
    assert!(
        err.to_string()
            .contains("more than one journal transaction holds"),
        "{err}"
    );
    image.close().expect("close");
    assert_eq!(snapshot_table(&path), table_before);
    assert_checks_clean(&path, "after the refusal");
}

/// Host clusters holding the bitmaps extension's directory, tables and
/// data, with their bytes.
fn bitmap_bytes(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let bytes = file_bytes(path);
    let header = Header::decode(&bytes).expect("a valid header");
    let ext = header.bitmaps().expect("a bitmaps extension");
    let cs = header.geometry().cluster_size();
    let cluster = |offset: u64| {
        // The last cluster of the file may be short: past the end reads
        // as zeros.
        let at = (offset / cs * cs) as usize;
        let end = (at + cs as usize).min(bytes.len());
        let mut content = bytes[at..end].to_vec();
        content.resize(cs as usize, 0);
        (offset / cs, content)
    };
    let mut clusters = vec![cluster(ext.bitmap_directory_offset)];
    let dir_at = ext.bitmap_directory_offset as usize;
    let directory = decode_bitmap_directory(
        &bytes[dir_at..dir_at + ext.bitmap_directory_size as usize],
        ext.nb_bitmaps,
    )
    .expect("a valid bitmap directory");
    for bitmap in directory {
        clusters.push(cluster(bitmap.bitmap_table_offset));
        for i in 0..bitmap.bitmap_table_size as usize {
            let entry = read_table_entry(&bytes[bitmap.bitmap_table_offset as usize..], i)
                & BITMAP_TABLE_ENTRY_OFFSET_MASK;
            if entry != 0 {
                clusters.push(cluster(entry));
            }
        }
    }
    clusters
}

/// A snapshot carries no bitmaps (QEMU's rule): creating, applying and
/// deleting one leaves the bitmaps extension, its directory, tables and
/// data exactly as they were, and QEMU finds no corruption; the only
/// leaks it may report are the bitmap clusters themselves (which it stops
/// counting when a writer cleared autoclear bit 0).
#[test]
fn snapshots_leave_the_bitmaps_extension_alone() {
    let dir = temp_dir();
    let path = in_dir(&dir, "bitmaps.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&path), "4M"]);
    qemu_img(&["bitmap", "--add", path_str(&path), "b0"]);
    common::qemu_io(&path, false, &["write -P 0x5a 0 192k".to_owned()]);
    let before = bitmap_bytes(&path);
    let extension_before = header(&path).bitmaps();
    let image = open_rw(&path);
    image.snapshot_create("s").expect("create");
    image.write(&[1; 4096], 0).expect("write");
    image.snapshot_apply("s").expect("apply");
    image.snapshot_delete("s").expect("delete");
    image.close().expect("close");
    assert_eq!(header(&path).bitmaps(), extension_before);
    assert_eq!(bitmap_bytes(&path), before, "bitmap clusters changed");
    let outcome = qemu_check_json(&path);
    assert!(matches!(outcome.exit, Some(0 | 3)), "{outcome:?}");
    let bitmap_clusters: BTreeSet<u64> = before.iter().map(|(c, _)| *c).collect();
    assert!(
        outcome.leaked_clusters().is_subset(&bitmap_clusters),
        "{outcome:?}"
    );
}
