//! The journalled backend: behaviour, flush counts, replay after a crash,
//! revokes in practice, and interop with QEMU.

mod common;

use common::{pattern, read};

use std::process::Command;
use std::sync::Arc;

use qj_engine::backend::journal::JournalMutation;
use qj_engine::check::{check, RepairMode};
use qj_engine::{
    BackendKind, BackingSource, CreateOptions, FileStorage, Image, JournalConfig, MemStorage,
    OpenOptions, Storage,
};

fn journal_opts(virtual_size: u64, cluster_size: u64, two_flush: bool) -> CreateOptions {
    CreateOptions {
        virtual_size,
        cluster_size,
        journal: Some(JournalConfig {
            size_bytes: 1 << 20,
            two_flush,
            log_data: false,
            dedup: false,
        }),
        ..CreateOptions::default()
    }
}

fn mem_image(opts: &CreateOptions) -> (Arc<dyn Storage>, Image) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), opts).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    (storage, image)
}

#[test]
fn journalled_image_reads_back_and_checks_clean() {
    let (storage, image) = mem_image(&journal_opts(8 << 20, 4096, false));
    assert_eq!(image.backend_kind(), BackendKind::Journal);
    for i in 0..64u64 {
        image
            .write(&pattern(i as u8, 4096), i * 65536 + 512)
            .unwrap();
        if i % 8 == 0 {
            image.flush().unwrap();
        }
    }
    image.discard(0, 65536 * 4).unwrap();
    image.close().unwrap();
    assert_checks_clean(&*storage);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    for i in 4..64u64 {
        assert_eq!(
            read(&image, i * 65536 + 512, 4096),
            pattern(i as u8, 4096),
            "cluster {i}"
        );
    }
    assert_eq!(read(&image, 0, 4096), vec![0; 4096]);
    image.close().unwrap();
}

#[test]
fn single_flush_commits_cost_one_flush_and_overwrites_no_journal_traffic() {
    for (two_flush, flushes_per_commit) in [(false, 1), (true, 2)] {
        // A journal large enough that no checkpoint runs in between.
        let mut opts = journal_opts(64 << 20, 65536, two_flush);
        opts.journal = Some(JournalConfig {
            size_bytes: 16 << 20,
            two_flush,
            log_data: false,
            dedup: false,
        });
        let (_storage, image) = mem_image(&opts);
        // The first commit also sets the journal-dirty bit (one more flush).
        image.write(&pattern(1, 4096), 0).unwrap();
        image.flush().unwrap();
        let before = image.stats();
        for i in 1..33u64 {
            image.write(&pattern(i as u8, 4096), i * 65536).unwrap();
            image.flush().unwrap();
        }
        let d = image.stats().since(&before);
        assert_eq!(
            d.flushes,
            32 * flushes_per_commit,
            "two_flush {two_flush}: {d:?}"
        );
        assert!(d.journal_bytes > 0);
        assert_eq!(
            d.metadata_bytes, 0,
            "no metadata in place before a checkpoint: {d:?}"
        );
        // One more commit anchors every earlier one (spec 8.6): from then
        // on, overwrites of allocated clusters cost no journal traffic at
        // all, only the flush of the data.
        image.write(&pattern(9, 4096), 40 * 65536).unwrap();
        image.flush().unwrap();
        // Many more overwrites than an epoch's bound would allow changed
        // entries: none changes metadata, so none persists early.
        let before = image.stats();
        for round in 0..200u64 {
            for i in 1..33u64 {
                image
                    .write(&pattern(7, 4096), i * 65536 + (round % 16) * 4096)
                    .unwrap();
            }
        }
        image.flush().unwrap();
        let d = image.stats().since(&before);
        assert_eq!(d.journal_bytes, 0, "{d:?}");
        assert_eq!(d.flushes, 1, "{d:?}");
        // Rewriting the cluster the last commit checksummed first anchors
        // that commit: one empty transaction, once.
        let before = image.stats();
        image.write(&pattern(8, 4096), 40 * 65536).unwrap();
        image.write(&pattern(8, 4096), 40 * 65536 + 8192).unwrap();
        let d = image.stats().since(&before);
        let expect_anchor = u64::from(!two_flush);
        assert_eq!(d.flushes, expect_anchor, "{d:?}");
        image.close().unwrap();
    }
}

#[test]
fn committed_writes_survive_abandon_and_replay_cleanly() {
    for two_flush in [false, true] {
        let (storage, image) = mem_image(&journal_opts(8 << 20, 4096, two_flush));
        for i in 0..40u64 {
            image.write(&pattern(i as u8, 8192), i * 8192).unwrap();
        }
        image.flush().unwrap();
        image.write(&pattern(99, 4096), 1 << 20).unwrap(); // not flushed
        image.abandon();
        let header = Image::read_header(&*storage).unwrap();
        assert!(
            header.has_incompatible(60),
            "journal dirty bit set while unsynced"
        );
        // A read-only open replays in memory and writes nothing.
        let bytes_before = storage_bytes(&*storage);
        let ro = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
        for i in 0..40u64 {
            assert_eq!(read(&ro, i * 8192, 8192), pattern(i as u8, 8192));
        }
        drop(ro);
        assert!(
            storage_bytes(&*storage) == bytes_before,
            "read-only open wrote"
        );
        // A read-write open replays in place; the image is clean, no leak.
        let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
        for i in 0..40u64 {
            assert_eq!(read(&image, i * 8192, 8192), pattern(i as u8, 8192));
        }
        image.close().unwrap();
        assert_checks_clean(&*storage);
        assert!(
            !Image::read_header(&*storage).unwrap().has_incompatible(60),
            "clean close clears the bit"
        );
    }
}

/// A new cluster's data checksum is taken from the write's own buffer
/// (`image/new_data.rs`); a later write into the cluster before the persist
/// (in place, or the cluster freed and allocated again) must drop it, else
/// the checksum describes bytes the disk no longer holds and replay drops
/// the commit. Debug builds also compare every such checksum with the disk
/// at submit, so a stale one fails the flush below.
#[test]
fn data_rewritten_before_its_persist_replays_with_its_newest_bytes() {
    let cs = 65536u64;
    let (storage, image) = mem_image(&journal_opts(8 << 20, cs, false));
    // A fresh cluster, then overwritten in place before any flush.
    image.write(&pattern(1, 4096), 0).unwrap();
    image.write(&pattern(2, 4096), 0).unwrap();
    image.write(&pattern(3, 4096), 8192).unwrap();
    // A cluster written, freed and its guest range written again.
    image.write(&pattern(4, 4096), 2 * cs).unwrap();
    image.discard(2 * cs, cs).unwrap();
    image.write(&pattern(5, 4096), 3 * cs + 4096).unwrap();
    image.write(&pattern(6, 4096), 2 * cs + 4096).unwrap();
    image.flush().unwrap();
    image.abandon();
    let expected = [(0, 2), (8192, 3), (3 * cs + 4096, 5), (2 * cs + 4096, 6)];
    let ro = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
    for (offset, seed) in expected {
        assert_eq!(read(&ro, offset, 4096), pattern(seed, 4096), "at {offset}");
    }
    assert_eq!(read(&ro, 2 * cs, 4096), vec![0; 4096], "discarded");
    drop(ro);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    for (offset, seed) in expected {
        assert_eq!(
            read(&image, offset, 4096),
            pattern(seed, 4096),
            "at {offset}"
        );
    }
    image.close().unwrap();
    assert_checks_clean(&*storage);
}

/// Our check finds no corruption and no leak.
fn assert_checks_clean(storage: &dyn Storage) {
    let report = check(storage, RepairMode::None, &[]).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
}

fn storage_bytes(s: &dyn Storage) -> Vec<u8> {
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_at(&mut b, 0).unwrap();
    b
}

/// The draft's example: an L1 table journalled, then moved by growth and
/// freed, its cluster reused for guest data; replay must not write the old
/// L1 over the data. Fails with revokes switched off.
fn l1_reuse_scenario(mutation: JournalMutation) -> bool {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    // 512-byte clusters: an L2 table maps 32 KiB, so 64 KiB needs 2 L1 entries.
    Image::create_shared(storage.clone(), &journal_opts(64 << 10, 512, false)).unwrap();
    let opts = OpenOptions {
        journal_mutation: mutation,
        ..OpenOptions::read_write()
    };
    let image = Image::open(storage.clone(), &opts).unwrap();
    let l1_before = image.info().unwrap().l1_table_offset;
    image.write(&pattern(1, 512), 0).unwrap(); // journals an L1 entry
    image.flush().unwrap();
    image.resize(64 << 20).unwrap(); // the L1 table moves; the old one is freed
    image.flush().unwrap();
    image.flush().unwrap();
    // Fill clusters the first L2 table maps (so no new table is needed)
    // until the old L1 cluster is reused for guest data.
    let mut reused_at = None;
    for i in 1..64u64 {
        let offset = i * 512;
        image.write(&pattern(0xa0, 512), offset).unwrap();
        let map = image.map().unwrap();
        if map
            .iter()
            .any(|e| e.offset == Some(l1_before) && e.start == offset)
        {
            reused_at = Some(offset);
            break;
        }
    }
    let reused_at = reused_at.expect("the old L1 cluster is reused for data");
    image.flush().unwrap();
    image.abandon(); // crash before any checkpoint
    let image = Image::open(storage, &OpenOptions::read_write()).unwrap();
    let intact = read(&image, reused_at, 512) == pattern(0xa0, 512);
    image.abandon();
    intact
}

#[test]
fn revoke_protects_a_reused_l1_cluster_and_its_absence_is_caught() {
    assert!(
        l1_reuse_scenario(JournalMutation::None),
        "data in the reused L1 cluster was overwritten at replay"
    );
    assert!(
        !l1_reuse_scenario(JournalMutation::SkipRevokes),
        "without revokes replay must clobber the data (the test would be blind otherwise)"
    );
}

// ---- QEMU interop ----------------------------------------------------------

fn qemu(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0]).args(&args[1..]).output();
    out.unwrap_or_else(|e| panic!("{} is required for this test: {e}", args[0]))
}

#[test]
fn qemu_reads_a_clean_journalled_image_and_refuses_a_dirty_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.qcow2");
    let p = path.to_str().unwrap();
    Image::create_path(&path, &journal_opts(16 << 20, 65536, false)).unwrap();
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    image.write(&vec![0xab; 65536 * 3], 65536).unwrap();
    image.flush().unwrap();
    image.close().unwrap();
    let out = qemu(&["qemu-img", "check", "--output=json", p]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json.get("corruptions")
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        0,
        "{json}"
    );
    // QEMU does not know the journal: exactly its clusters are leaks.
    assert_eq!(json["leaks"].as_u64(), Some((1 << 20) / 65536), "{json}");
    let out = qemu(&["qemu-io", "-r", "-c", "read -P 0xab 64k 192k", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));

    // A dirty journal: QEMU refuses, naming our bit.
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    image.write(&vec![0xcd; 4096], 8 << 20).unwrap();
    image.flush().unwrap();
    image.abandon();
    let out = qemu(&["qemu-img", "info", p]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("journal dirty"), "{err}");
}

#[test]
fn after_qemu_writes_the_journal_is_recreated_and_qemus_data_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.qcow2");
    let p = path.to_str().unwrap();
    Image::create_path(&path, &journal_opts(16 << 20, 65536, false)).unwrap();
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    image.write(&vec![0x11; 65536], 0).unwrap();
    image.close().unwrap();
    let old_journal = Image::read_header(&FileStorage::open(&path, false).unwrap())
        .unwrap()
        .journal()
        .unwrap();
    // QEMU writes (clearing the unknown autoclear bit), frees the leaked
    // journal clusters, and reuses them for its own data: single-cluster
    // writes take the lowest free clusters, the old journal's.
    let out = qemu(&["qemu-img", "check", "-r", "leaks", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut io = vec!["qemu-io".to_string()];
    for i in 1..9u64 {
        io.push("-c".into());
        io.push(format!("write -P 0x22 {}k 64k", i * 64));
    }
    io.push(p.to_string());
    let io: Vec<&str> = io.iter().map(String::as_str).collect();
    assert!(qemu(&io).status.success());
    let map = qemu(&["qemu-img", "map", "--output=json", p]);
    let map = String::from_utf8_lossy(&map.stdout).to_string();
    assert!(
        map.contains(&format!("\"offset\": {}", old_journal.offset)),
        "QEMU reused the old journal's first cluster: {map}"
    );
    let header = Image::read_header(&FileStorage::open(&path, false).unwrap()).unwrap();
    assert!(!header.has_autoclear(60), "QEMU clears journal valid");
    // Our read-write open notices and re-creates the journal in fresh clusters.
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    assert_eq!(image.backend_kind(), BackendKind::Journal);
    assert_eq!(read(&image, 0, 65536), vec![0x11; 65536]);
    assert_eq!(read(&image, 65536, 8 * 65536), vec![0x22; 8 * 65536]);
    image.write(&vec![0x33; 4096], 4 << 20).unwrap();
    image.close().unwrap();
    let storage = FileStorage::open(&path, false).unwrap();
    let new_journal = Image::read_header(&storage).unwrap().journal().unwrap();
    assert!(
        new_journal.offset >= old_journal.offset + 65536,
        "the new journal avoids QEMU's clusters"
    );
    let report = check(&storage, RepairMode::None, &[]).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    let out = qemu(&[
        "qemu-io",
        "-r",
        "-c",
        "read -P 0x22 64k 512k",
        "-c",
        "read -P 0x33 4M 4k",
        "-c",
        "read -P 0x11 0 64k",
        p,
    ]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // QEMU rewrote the header with its own feature name table, without our
    // names; the re-created journal put them back, so that QEMU's refusal
    // of a dirty journal still names the bit.
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    image.write(&vec![0x44; 4096], 5 << 20).unwrap();
    image.flush().unwrap();
    image.abandon();
    let out = qemu(&["qemu-img", "info", p]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("journal dirty"),
        "{stderr}"
    );
    let _ = BackingSource::Ignore;
}

#[test]
fn unflushed_writes_larger_than_the_journal_persist_early_instead_of_failing() {
    // 4 KiB clusters: an L2 table maps 2 MiB. 400 writes 2 MiB apart each
    // create a fresh L2 table: 1.6 MiB of tables, more than the 1 MiB ring.
    let (storage, image) = mem_image(&journal_opts(1 << 30, 4096, false));
    for i in 0..400u64 {
        image.write(&pattern(i as u8, 4096), i * (2 << 20)).unwrap();
    }
    image.flush().unwrap();
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    for i in 0..400u64 {
        assert_eq!(
            read(&image, i * (2 << 20), 4096),
            pattern(i as u8, 4096),
            "write {i}"
        );
    }
    image.close().unwrap();
    assert_checks_clean(&*storage);
}

#[test]
fn a_journal_too_small_for_the_cluster_size_is_refused_at_creation() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut opts = journal_opts(1 << 30, 65536, false);
    opts.journal = Some(JournalConfig {
        size_bytes: 64 << 10,
        two_flush: false,
        log_data: false,
        dedup: false,
    });
    let err = Image::create_shared(storage, &opts).unwrap_err();
    assert!(err.to_string().contains("journal_size"), "{err}");
}

/// Found by the whole-image fuzz target: a read-write open of an image
/// whose journal is dirty replayed the journal in place, then refused the
/// image for a refcount table entry past the end of the file, leaving it
/// changed. A refused open must leave every byte as it was: the read-write
/// open first opens the image read-only, with the journal replayed in
/// memory, and refuses before it writes.
#[test]
fn refused_read_write_open_of_a_dirty_journal_writes_nothing() {
    let (storage, image) = mem_image(&journal_opts(1 << 20, 4096, false));
    image.write(&pattern(7, 8192), 0).unwrap();
    image.flush().unwrap();
    image.abandon();
    let header = Image::read_header(&*storage).unwrap();
    assert!(header.has_incompatible(60), "the journal is dirty");
    // Refcount table entry 12 points far past the end of the file, where
    // the journal's transactions do not reach.
    let entry_at = header.refcount_table_offset + 12 * 8;
    storage
        .write_at(&(1u64 << 54).to_be_bytes(), entry_at)
        .unwrap();
    let bytes_before = storage_bytes(&*storage);

    let Err(err) = Image::open(storage.clone(), &OpenOptions::read_write()) else {
        panic!("opened an image whose refcount table is corrupt");
    };
    assert!(
        err.to_string().contains("refcount table entry 12"),
        "the error names the entry: {err}"
    );
    assert!(
        storage_bytes(&*storage) == bytes_before,
        "the refused open replayed the journal in place"
    );
}

/// Found by the whole-image fuzz target: an image whose journal a program
/// without journal support invalidated (autoclear bit 60 clear) and whose
/// refcounts are too low (here the header cluster's is 0). The read-write
/// open re-created the journal in clusters the refcounts called free, the
/// header's among them, and zero-filled it over the tables. It now refuses
/// such an image, naming the corruption, before it writes anything.
#[test]
fn journal_is_not_re_created_over_clusters_in_use() {
    let (storage, image) = mem_image(&journal_opts(1 << 20, 4096, false));
    image.write(&pattern(3, 4096), 0).unwrap();
    image.close().unwrap();
    let mut header = Image::read_header(&*storage).unwrap();
    header.autoclear_features &= !(1 << 60);
    storage.write_at(&header.encode().unwrap(), 0).unwrap();
    let mut entry = [0u8; 8];
    storage
        .read_at(&mut entry, header.refcount_table_offset)
        .unwrap();
    let block_offset = u64::from_be_bytes(entry) & !0x1ff;
    let mut block = vec![0u8; 4096];
    storage.read_at(&mut block, block_offset).unwrap();
    qj_spec::qcow2::set_refcount(&mut block, 0, header.refcount_order, 0);
    storage.write_at(&block, block_offset).unwrap();
    let bytes_before = storage_bytes(&*storage);

    let Err(err) = Image::open(storage.clone(), &OpenOptions::read_write()) else {
        panic!("re-created a journal on an image with a refcount too low");
    };
    assert!(
        err.to_string().contains("corruption"),
        "the error names the corruption: {err}"
    );
    assert!(
        storage_bytes(&*storage) == bytes_before,
        "the refused open changed the image"
    );
}
