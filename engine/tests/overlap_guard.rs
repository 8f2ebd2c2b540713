//! The metadata-overlap guard (issue 12 item 2, QEMU's iotest 060): a
//! corrupt L2 entry or refcount must never let guest bytes or a new table
//! land on metadata. Each case corrupts one field of a clean image, then
//! asserts: the operation fails naming the structure; nothing but the
//! corrupt bit changed on disk; the image stays readable; a writable open
//! is refused; `check -r all` repairs it and clears the bit; both checks
//! then call it clean. On both backends.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_check_clean, file_bytes, in_dir, info_json, qemu_check_json, temp_dir};
use qj_engine::check::{check, RepairMode};
use qj_engine::metadata_map::MetadataKind;
use qj_engine::{CreateOptions, Error, FileStorage, Image, JournalConfig, OpenOptions};
use qj_spec::qcow2::{features::INCOMPAT_CORRUPT_MASK, Header};

const CLUSTER: u64 = 65536;
/// Bit 63 of an L1/L2 entry: refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
const COMPRESSED: u64 = 1 << 62;

/// A 64 MiB image whose guest clusters 0 and 1 hold 0x11 and 0x22.
fn image(dir: &tempfile::TempDir, journal: bool) -> PathBuf {
    let path = in_dir(dir, if journal { "j.qcow2" } else { "o.qcow2" });
    let opts = CreateOptions {
        virtual_size: 64 << 20,
        journal: journal.then(|| JournalConfig {
            size_bytes: 1 << 20,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    };
    Image::create_path(&path, &opts).expect("create");
    let image = Image::open_path(&path, &OpenOptions::read_write()).expect("open");
    image.write(&[0x11; CLUSTER as usize], 0).expect("write");
    image
        .write(&[0x22; CLUSTER as usize], CLUSTER)
        .expect("write");
    image.close().expect("close");
    path
}

fn header(path: &Path) -> Header {
    Header::decode(&file_bytes(path)).expect("header")
}

fn u64_at(path: &Path, offset: u64) -> u64 {
    let b = file_bytes(path);
    u64::from_be_bytes(b[offset as usize..offset as usize + 8].try_into().unwrap())
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Host offset of the L2 table mapping guest cluster 0.
fn l2_table(path: &Path) -> u64 {
    u64_at(path, header(path).l1_table_offset) & 0x00ff_ffff_ffff_fe00
}

/// Host offset of the first refcount block.
fn refcount_block(path: &Path) -> u64 {
    u64_at(path, header(path).refcount_table_offset) & !0x1ff
}

/// The guard's outcome for one damaged image: `op` must fail with an
/// overlap on `kind`, leave every byte but the corrupt bit as it was, and
/// the image must then be readable, refused for writing, and repairable.
fn assert_refused_and_repairable(
    path: &Path,
    kind: MetadataKind,
    op: impl FnOnce(&Image) -> qj_engine::Result<()>,
) {
    let image = Image::open_path(path, &OpenOptions::read_write()).expect("open");
    // After the open: a journal's open writes its own header slot.
    let before = file_bytes(path);
    match op(&image) {
        Err(Error::MetadataOverlap { kind: k, .. }) => assert_eq!(k, kind, "{}", path.display()),
        other => panic!(
            "{}: expected an overlap with the {kind}, got {other:?}",
            path.display()
        ),
    }
    // Poisoned: a later write or flush is refused too, and writes nothing.
    assert!(image.write(&[0x55; 512], 10 * CLUSTER).is_err());
    assert!(image.flush().is_err());
    drop(image);

    let after = file_bytes(path);
    assert_eq!(before.len(), after.len(), "the file length changed");
    let changed: Vec<usize> = (0..after.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(
        changed.iter().all(|&i| (72..80).contains(&i)),
        "bytes other than the incompatible features changed: {:?}",
        &changed[..changed.len().min(16)]
    );
    assert!(header(path).incompatible_features & INCOMPAT_CORRUPT_MASK != 0);
    assert_eq!(
        info_json(path)["format-specific"]["data"]["corrupt"],
        serde_json::Value::Bool(true),
        "QEMU must see the corrupt bit"
    );

    // Readable, as in QEMU; not writable until repaired.
    let ro = Image::open_path(path, &OpenOptions::read_only()).expect("read-only open");
    let mut buf = vec![0u8; CLUSTER as usize];
    ro.read(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0x11), "guest cluster 0 lost");
    drop(ro);
    let err = Image::open_path(path, &OpenOptions::read_write()).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");

    let storage = FileStorage::open(path, true).unwrap();
    let repaired = check(&storage, RepairMode::All, &[]).expect("repair");
    assert_eq!(repaired.corruptions, 0, "{:?}", repaired.messages);
    let again = check(&storage, RepairMode::None, &[]).expect("check");
    assert_eq!(again.exit_code(), 0, "{:?}", again.messages);
    drop(storage);
    assert_eq!(
        header(path).incompatible_features & INCOMPAT_CORRUPT_MASK,
        0
    );
    assert_qemu_agrees(path);
    let image = Image::open_path(path, &OpenOptions::read_write()).expect("writable after repair");
    image.close().expect("close");
}

/// `qemu-img check` finds no corruption, and no leak but the journal's
/// clusters (QEMU does not know the extension that references them).
fn assert_qemu_agrees(path: &Path) {
    if header(path).journal().is_none() {
        return assert_check_clean(path);
    }
    let outcome = qemu_check_json(path);
    assert_eq!(outcome.exit, Some(3), "{outcome:?}");
    let journal = header(path).journal().unwrap();
    let journal_clusters: std::collections::BTreeSet<u64> =
        (journal.offset / CLUSTER..(journal.offset + journal.size) / CLUSTER).collect();
    assert_eq!(outcome.leaked_clusters(), journal_clusters, "{outcome:?}");
}

fn write_cluster_1(image: &Image) -> qj_engine::Result<()> {
    image.write(&[0x33; CLUSTER as usize], CLUSTER)
}

#[test]
fn a_guest_write_through_an_l2_entry_naming_metadata_is_refused() {
    for journal in [false, true] {
        let dir = temp_dir();
        let probe = image(&dir, journal);
        let h = header(&probe);
        let mut targets = vec![
            (h.refcount_table_offset, MetadataKind::RefcountTable),
            (refcount_block(&probe), MetadataKind::RefcountBlock),
            (h.l1_table_offset, MetadataKind::ActiveL1),
            (l2_table(&probe), MetadataKind::L2Table),
        ];
        if let Some(j) = h.journal() {
            targets.push((j.offset + CLUSTER, MetadataKind::Journal));
        }
        for (target, kind) in targets {
            let path = image(&dir, journal);
            let entry = l2_table(&path) + 8;
            poke(&path, entry, &(COPIED | target).to_be_bytes());
            assert_refused_and_repairable(&path, kind, write_cluster_1);
        }
    }
}

#[test]
fn a_metadata_cluster_with_refcount_zero_is_never_handed_out() {
    for journal in [false, true] {
        let dir = temp_dir();
        for (pick, kind) in [
            (0u8, MetadataKind::Header),
            (1, MetadataKind::ActiveL1),
            (2, MetadataKind::L2Table),
        ] {
            let path = image(&dir, journal);
            let h = header(&path);
            let cluster = match pick {
                0 => 0,
                1 => h.l1_table_offset / CLUSTER,
                _ => l2_table(&path) / CLUSTER,
            };
            // 16-bit refcounts: entry `cluster` of the first block.
            poke(&path, refcount_block(&path) + cluster * 2, &[0, 0]);
            // An allocating write far from the data takes the lowest free
            // cluster: the one whose count was just zeroed.
            assert_refused_and_repairable(&path, kind, |image| {
                image.write(&[0x44; 4096], 32 << 20)
            });
        }
    }
}

#[test]
fn a_compressed_entry_reaching_into_the_l1_table_is_never_released() {
    for journal in [false, true] {
        let dir = temp_dir();
        let path = image(&dir, journal);
        let l1 = header(&path).l1_table_offset;
        // Compressed descriptor for 64 KiB clusters: offset in bits 0..54,
        // (sectors - 1) above; one sector at the L1 table.
        let entry = COMPRESSED | l1;
        poke(&path, l2_table(&path) + 8, &entry.to_be_bytes());
        assert_refused_and_repairable(&path, MetadataKind::ActiveL1, |image| {
            // Overwriting, zeroing or discarding the cluster would drop the
            // compressed cluster's references.
            image.discard(CLUSTER, CLUSTER)
        });
    }
}

#[test]
fn a_clean_image_has_every_structure_in_the_map_and_passes_the_guard() {
    // The guard must not fire on a healthy image of either backend, with
    // allocation growing the L1 and refcount tables.
    for journal in [false, true] {
        let dir = temp_dir();
        let path = image(&dir, journal);
        let image = Image::open_path(&path, &OpenOptions::read_write()).expect("open");
        image.resize(8 << 30).expect("grow");
        for i in 0..64u64 {
            image
                .write(&[i as u8; 4096], i * (128 << 20))
                .expect("write");
        }
        image.close().expect("close");
        let storage = FileStorage::open(&path, false).unwrap();
        assert_eq!(
            check(&storage, RepairMode::None, &[]).unwrap().exit_code(),
            0
        );
        assert_qemu_agrees(&path);
    }
}
