//! Deduplication of whole clusters on journalled images: the write path,
//! the index kept in step through the journal (replay after a crash), the
//! COPIED flags of shared clusters, and QEMU reading and writing a
//! deduplicated image.

mod common;

use std::sync::Arc;

use common::{
    assert_engine_check_clean, assert_qemu_io_sees, in_dir, pattern, qemu_check_json, qemu_io,
    read, temp_dir,
};
use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

const CLUSTER: usize = 4096;

fn dedup_create_options(virtual_size: u64) -> CreateOptions {
    CreateOptions {
        virtual_size,
        cluster_size: CLUSTER as u64,
        journal: Some(JournalConfig {
            size_bytes: 1 << 20,
            two_flush: false,
            log_data: false,
            dedup: true,
        }),
        ..CreateOptions::default()
    }
}

/// A new dedup image in memory, opened read-write.
fn dedup_image(virtual_size: u64) -> (Arc<dyn Storage>, Image) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), &dedup_create_options(virtual_size)).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    (storage, image)
}

/// `qemu-img check` finds no corruption, and no leak but the clusters of
/// the journal and of the persisted dedup index (QEMU does not know the
/// extensions that reference them).
fn assert_check_clean(path: &std::path::Path) {
    let outcome = qemu_check_json(path);
    let storage = qj_engine::FileStorage::open(path, false).unwrap();
    let header = Image::read_header(&storage).unwrap();
    let ext = header.journal().unwrap();
    let cs = CLUSTER as u64;
    let mut ours: std::collections::BTreeSet<u64> =
        (ext.offset / cs..(ext.offset + ext.size) / cs).collect();
    if let Some(index) = header.dedup_index() {
        let index = index.unwrap();
        assert!(index.clusters > 0 || index.offset == 0);
        ours.extend(index.offset / cs..index.offset / cs + u64::from(index.clusters));
    }
    assert!(outcome.json.get("corruptions").is_none(), "{outcome:?}");
    assert_eq!(outcome.leaked_clusters(), ours, "{outcome:?}");
}

/// The persisted index extension of the image on `storage`.
fn persisted_index(
    storage: &dyn Storage,
) -> Option<qj_spec::qcow2::dedup_index::DedupIndexExtension> {
    Image::read_header(storage)
        .unwrap()
        .dedup_index()
        .map(|r| r.unwrap())
        .filter(|i| !i.is_empty())
}

#[test]
fn the_index_survives_a_close_without_rehashing() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x21, CLUSTER);
    let b = pattern(0x22, CLUSTER);
    image.write(&a, 0).unwrap();
    image.write(&a, CLUSTER as u64).unwrap();
    image.write(&b, 2 * CLUSTER as u64).unwrap();
    image.close().unwrap();
    let ext = persisted_index(&*storage).expect("close wrote the index");
    assert_eq!((ext.entries, ext.clusters_saved, ext.clusters), (2, 1, 1));
    assert_engine_check_clean(&*storage);

    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let stats = image.dedup_stats().unwrap();
    assert_eq!((stats.persisted_loaded, stats.entries), (2, 2));
    assert_eq!(stats.clusters_saved, 1);
    assert_eq!(image.dedup_cost().unwrap().hashed, 0, "open hashed nothing");
    let len = storage.len().unwrap();
    image.write(&b, 3 * CLUSTER as u64).unwrap();
    image.flush().unwrap();
    assert_eq!(image.dedup_stats().unwrap().hits, 1);
    assert!(storage.len().unwrap() <= len, "b was shared, not written");
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
    assert_eq!(persisted_index(&*storage).unwrap().clusters_saved, 2);

    // A crash in the next session: the extension still names the index
    // of the last close, and the journal holds what changed since; the
    // open rehashes the persisted entries (the journal was dirty) and
    // finds them good.
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    image
        .write(&pattern(0x23, CLUSTER), 5 * CLUSTER as u64)
        .unwrap();
    image.flush().unwrap();
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let stats = image.dedup_stats().unwrap();
    assert_eq!(stats.persisted_loaded, 2);
    assert_eq!(
        (stats.dropped_at_open, stats.persisted_stale_at_open),
        (0, 0)
    );
    assert_eq!(stats.entries, 3, "the persisted two and the journal's one");
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_damaged_persisted_index_is_ignored_and_dropped() {
    for damage in ["checksum", "past-end", "over-metadata", "truncated"] {
        let (storage, image) = dedup_image(1 << 20);
        let a = pattern(0x31, CLUSTER);
        image.write(&a, 0).unwrap();
        image.write(&a, CLUSTER as u64).unwrap();
        image.close().unwrap();
        let mut header = Image::read_header(&*storage).unwrap();
        let mut ext = persisted_index(&*storage).unwrap();
        match damage {
            "checksum" => {
                storage.write_at(&[0xff], ext.offset + 3).unwrap();
            }
            "past-end" => ext.offset = storage.len().unwrap() + 16 * CLUSTER as u64,
            "over-metadata" => ext.offset = header.l1_table_offset,
            _ => ext.entries = 1 << 40,
        }
        header.set_dedup_index(Some(ext));
        storage.write_at(&header.encode().unwrap(), 0).unwrap();

        let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
        let stats = image.dedup_stats().unwrap();
        assert_eq!(stats.entries, 0, "{damage}: never used");
        assert!(stats.persisted_ignored.is_some(), "{damage}: said why");
        // Writing a again does not map to anything the damaged index named.
        image.write(&a, 2 * CLUSTER as u64).unwrap();
        assert_eq!(read(&image, 2 * CLUSTER as u64, CLUSTER), a);
        assert_eq!(read(&image, 0, CLUSTER), a);
        image.close().unwrap();
        let report = check(&*storage, RepairMode::None, &[]).unwrap();
        assert_eq!(report.corruptions, 0, "{damage}: {:?}", report.messages);
    }
}

#[test]
fn duplicate_clusters_are_stored_once() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0xa1, CLUSTER);
    let b = pattern(0xb2, CLUSTER);
    image.write(&a, 0).unwrap();
    image.flush().unwrap();
    let len_after_one = storage.len().unwrap();
    for i in 1..8u64 {
        image.write(&a, i * CLUSTER as u64).unwrap();
    }
    image.write(&b, 8 * CLUSTER as u64).unwrap();
    image.flush().unwrap();
    let stats = image.dedup_stats().expect("a dedup image deduplicates");
    assert_eq!(stats.hits, 7);
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.clusters_saved, 7);
    assert_eq!(
        storage.len().unwrap(),
        len_after_one + CLUSTER as u64,
        "seven copies of a took no space; b took one cluster"
    );
    for i in 0..8u64 {
        assert_eq!(read(&image, i * CLUSTER as u64, CLUSTER), a);
    }
    assert_eq!(read(&image, 8 * CLUSTER as u64, CLUSTER), b);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn writes_into_shared_clusters_copy_and_frees_delete() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x11, CLUSTER);
    for i in 0..3u64 {
        image.write(&a, i * CLUSTER as u64).unwrap();
    }
    // A partial write into one mapping copies it; the others keep a.
    image.write(&[0xee; 100], CLUSTER as u64 + 10).unwrap();
    let mut expected = a.clone();
    expected[10..110].fill(0xee);
    assert_eq!(read(&image, CLUSTER as u64, CLUSTER), expected);
    assert_eq!(read(&image, 0, CLUSTER), a);
    assert_eq!(read(&image, 2 * CLUSTER as u64, CLUSTER), a);
    image.flush().unwrap();
    assert_engine_check_clean(&*storage);
    // Discarding one of the two left: the last gets COPIED back (check
    // would call a refcount-1 cluster without it a corruption).
    image.discard(0, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    assert_engine_check_clean(&*storage);
    assert_eq!(image.dedup_stats().unwrap().entries, 1);
    // Overwriting the indexed cluster itself (refcount 1): copied, and the
    // old one leaves the index with its deletion.
    let c = pattern(0x33, CLUSTER);
    image.write(&c, 2 * CLUSTER as u64).unwrap();
    image.flush().unwrap();
    let stats = image.dedup_stats().unwrap();
    assert_eq!(stats.entries, 1, "a left the index, c entered it");
    assert_eq!(read(&image, 2 * CLUSTER as u64, CLUSTER), c);
    image.discard(2 * CLUSTER as u64, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    assert_eq!(image.dedup_stats().unwrap().entries, 0);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn rewriting_the_same_bytes_writes_nothing() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x42, CLUSTER);
    image.write(&a, 0).unwrap();
    image.flush().unwrap();
    let written = image.stats().data_bytes;
    image.write(&a, 0).unwrap();
    image.flush().unwrap();
    assert_eq!(
        image.stats().data_bytes,
        written,
        "same bytes: nothing to write"
    );
    assert_eq!(read(&image, 0, CLUSTER), a);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn zero_clusters_never_enter_the_index() {
    let (_storage, image) = dedup_image(1 << 20);
    let zeros = vec![0u8; CLUSTER];
    image.write(&zeros, 0).unwrap();
    image.write(&zeros, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    let stats = image.dedup_stats().unwrap();
    assert_eq!((stats.entries, stats.hits), (0, 0));
    image.close().unwrap();
}

#[test]
fn replay_after_a_crash_feeds_the_index() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x5a, CLUSTER);
    let b = pattern(0x6b, CLUSTER);
    image.write(&a, 0).unwrap();
    image.write(&a, CLUSTER as u64).unwrap();
    image.write(&b, 2 * CLUSTER as u64).unwrap();
    image.flush().unwrap();
    // b's cluster is freed: its deletion is in the journal too.
    image.discard(2 * CLUSTER as u64, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    image.abandon();

    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let entries = image.dedup_entries();
    assert_eq!(
        entries.len(),
        1,
        "a stays indexed, b was deleted: {entries:?}"
    );
    let stats = image.dedup_stats().unwrap();
    assert_eq!(stats.clusters_saved, 1, "both mappings of a were found");
    let len = storage.len().unwrap();
    image.write(&a, 3 * CLUSTER as u64).unwrap();
    image.flush().unwrap();
    assert_eq!(image.dedup_stats().unwrap().hits, 1);
    assert_eq!(storage.len().unwrap(), len, "the replayed entry was used");
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_stale_entry_is_never_used() {
    // Trusting the hash skips the comparison at write time, so the entry
    // must have been checked at open: overwrite the indexed cluster behind
    // the engine's back, crash, reopen, and write the old bytes again.
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x77, CLUSTER);
    image.write(&a, 0).unwrap();
    image.flush().unwrap();
    // A second transaction anchors the first, so replay does not verify
    // its data checksum (which would drop it as torn).
    image
        .write(&pattern(0x78, CLUSTER), 5 * CLUSTER as u64)
        .unwrap();
    image.flush().unwrap();
    let (host, _) = image
        .dedup_entries()
        .into_iter()
        .min()
        .expect("two entries");
    image.abandon();
    storage.write_at(&pattern(0x99, CLUSTER), host).unwrap();
    let opts = OpenOptions {
        dedup_trust_hash: true,
        ..OpenOptions::read_write()
    };
    let image = Image::open(storage.clone(), &opts).unwrap();
    assert_eq!(
        image.dedup_entries().len(),
        1,
        "only the good entry is left"
    );
    assert_eq!(image.dedup_stats().unwrap().dropped_at_open, 1);
    image.write(&a, CLUSTER as u64).unwrap();
    assert_eq!(read(&image, CLUSTER as u64, CLUSTER), a);
    image.close().unwrap();
}

#[test]
fn a_full_index_stops_indexing_new_clusters() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), &dedup_create_options(1 << 20)).unwrap();
    let opts = OpenOptions {
        dedup_memory_bytes_max: 2 * qj_engine::image::DEDUP_BYTES_PER_ENTRY,
        ..OpenOptions::read_write()
    };
    let image = Image::open(storage.clone(), &opts).unwrap();
    for i in 0..4u8 {
        image
            .write(&pattern(i + 1, CLUSTER), u64::from(i) * CLUSTER as u64)
            .unwrap();
    }
    let stats = image.dedup_stats().unwrap();
    assert_eq!((stats.entries, stats.entries_max), (2, 2));
    assert_eq!(stats.not_indexed_full, 2);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn dedup_is_refused_without_a_journal_and_toggles_with_one() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let plain = CreateOptions {
        virtual_size: 1 << 20,
        ..CreateOptions::default()
    };
    Image::create_shared(storage.clone(), &plain).unwrap();
    let err = Image::set_dedup(storage.clone(), true).unwrap_err();
    assert!(err.to_string().contains("dedup needs a journal"), "{err}");

    let (storage, image) = dedup_image(1 << 20);
    image.close().unwrap();
    Image::set_dedup(storage.clone(), false).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert!(image.dedup_stats().is_none());
    assert!(image.info().unwrap().journal.is_some(), "the journal stays");
    image.close().unwrap();
    Image::set_dedup(storage.clone(), true).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert!(image.dedup_stats().is_some());
    image.close().unwrap();
}

#[test]
fn qemu_reads_exactly_and_copies_on_write() {
    let dir = temp_dir();
    let path = in_dir(&dir, "dedup.qcow2");
    let size = 16 * CLUSTER as u64;
    Image::create_path(&path, &dedup_create_options(size)).unwrap();
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    let mut model = vec![0u8; size as usize];
    for i in 0..6usize {
        let byte = if i % 2 == 0 { 0xaa } else { 0xbb };
        image
            .write(&vec![byte; CLUSTER], (i * CLUSTER) as u64)
            .unwrap();
        model[i * CLUSTER..(i + 1) * CLUSTER].fill(byte);
    }
    assert_eq!(image.dedup_stats().unwrap().hits, 4);
    image.close().unwrap();
    assert_check_clean(&path);
    assert_qemu_io_sees(&path, &model);

    // QEMU writes into a shared cluster: it copies, the other mappings
    // keep their bytes, and its check stays clean.
    qemu_io(
        &path,
        false,
        &[format!("write -P 0xcc {} 512", 2 * CLUSTER)],
    );
    model[2 * CLUSTER..2 * CLUSTER + 512].fill(0xcc);
    assert_check_clean(&path);
    assert_qemu_io_sees(&path, &model);

    // QEMU cleared "journal valid": the index is gone (QEMU may have freed
    // or rewritten indexed clusters), and writing 0xaa again does not
    // map to anything stale.
    let image = Image::open_path(&path, &OpenOptions::read_write()).unwrap();
    assert!(image.dedup_entries().is_empty(), "the index was dropped");
    image
        .write(&vec![0xaa; CLUSTER], (8 * CLUSTER) as u64)
        .unwrap();
    model[8 * CLUSTER..9 * CLUSTER].fill(0xaa);
    image
        .write(&vec![0xaa; CLUSTER], (9 * CLUSTER) as u64)
        .unwrap();
    model[9 * CLUSTER..10 * CLUSTER].fill(0xaa);
    assert_eq!(
        image.dedup_stats().unwrap().hits,
        1,
        "new entries dedup again"
    );
    image.close().unwrap();
    assert_check_clean(&path);
    assert_qemu_io_sees(&path, &model);
}

#[test]
fn check_finds_stale_index_entries_and_repair_drops_them() {
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x41, CLUSTER);
    let b = pattern(0x42, CLUSTER);
    image.write(&a, 0).unwrap();
    image.write(&b, CLUSTER as u64).unwrap();
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
    let ext = persisted_index(&*storage).unwrap();
    assert_eq!(ext.entries, 2);
    // Rewrite a's cluster behind the engine's back: its entry is stale.
    let image = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
    let a_host = image.map().unwrap()[0].offset.unwrap();
    image.close().unwrap();
    storage.write_at(&pattern(0x99, CLUSTER), a_host).unwrap();

    let report = check(&*storage, RepairMode::None, &[]).unwrap();
    assert_eq!(report.corruptions, 1, "{:?}", report.messages);
    assert!(
        report.messages.iter().any(|m| m.contains("stale entry")),
        "{:?}",
        report.messages
    );
    let repaired = check(&*storage, RepairMode::All, &[]).unwrap();
    assert_eq!(
        (
            repaired.corruptions,
            repaired.corruptions_fixed,
            repaired.leaks
        ),
        (0, 1, 0),
        "{:?}",
        repaired.messages
    );
    assert_eq!(persisted_index(&*storage).unwrap().entries, 1);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert_eq!(image.dedup_stats().unwrap().entries, 1);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_shared_cluster_the_rebuilt_index_lacks_gets_copied_back() {
    // Found by the journal-dedup crash target: an index may lack clusters
    // that stay shared (lost with a crash, or past the memory bound);
    // freeing one of two mappings must still give the other its COPIED
    // flag back.
    let a = pattern(0x61, CLUSTER);
    let (storage, image) = a_shared_but_not_indexed(&a);
    image.discard(0, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

/// A dedup image whose index lacks `a`, which guest clusters 0 and 1
/// share: its persisted index is damaged, so open ignores it (an index
/// that lost the entry in a crash, or past its memory bound, behaves the
/// same).
fn a_shared_but_not_indexed(a: &[u8]) -> (Arc<dyn Storage>, Image) {
    let (storage, image) = dedup_image(1 << 20);
    image.write(a, 0).unwrap();
    image.write(a, CLUSTER as u64).unwrap();
    image.close().unwrap();
    let ext = persisted_index(&*storage).unwrap();
    storage.write_at(&[0xff], ext.offset + 3).unwrap();
    // The open that drops the damaged index leaves its cluster leaked (it
    // might not have been the index's); the leak repair frees it.
    Image::open(storage.clone(), &OpenOptions::read_write())
        .unwrap()
        .close()
        .unwrap();
    let repaired = check(&*storage, RepairMode::Leaks, &[]).unwrap();
    assert_eq!(repaired.leaks_fixed, 1, "{:?}", repaired.messages);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert!(image.dedup_entries().is_empty(), "a is not indexed");
    (storage, image)
}

#[test]
fn a_write_into_a_delayed_copys_source_makes_the_copy_first() {
    // Found by the journal-dedup crash target: a partial write into one of
    // two mappings of a shared cluster copies on write, the untouched
    // bytes by a delayed copy from the shared cluster; the other mapping,
    // now the only one, gets COPIED back and may be written in place. That
    // write must not reach the copy's source first, or the copy (read
    // through it now, replayed from it later) takes the new bytes.
    let a = pattern(0x61, CLUSTER);
    let (storage, image) = a_shared_but_not_indexed(&a);
    let head = pattern(0x70, CLUSTER / 2);
    image.write(&head, CLUSTER as u64).unwrap();
    let c = pattern(0x63, CLUSTER);
    image.write(&c, 0).unwrap();
    let mut expected = a.clone();
    expected[..CLUSTER / 2].copy_from_slice(&head);
    assert_eq!(read(&image, CLUSTER as u64, CLUSTER), expected, "live");
    image.flush().unwrap();
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert_eq!(read(&image, 0, CLUSTER), c);
    assert_eq!(
        read(&image, CLUSTER as u64, CLUSTER),
        expected,
        "after replay"
    );
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_cluster_indexed_after_an_in_place_write_is_checksummed_with_its_insertion() {
    // Found by the journal-dedup crash target: a whole-cluster write into
    // a private, unindexed cluster goes in place and indexes it; another
    // guest cluster then maps it. If the in-place bytes never reached the
    // device, replay must drop the transaction that indexes and links the
    // cluster (its data checksum fails), never map the old bytes twice.
    let (storage, image) = dedup_image(1 << 20);
    let old = pattern(0x41, CLUSTER / 2);
    image.write(&old, 0).unwrap();
    image.flush().unwrap();
    assert!(
        image.dedup_entries().is_empty(),
        "a partial write indexes nothing"
    );
    let c = pattern(0x43, CLUSTER);
    image.write(&c, 0).unwrap();
    image.write(&c, CLUSTER as u64).unwrap();
    let (indexed, _) = image.dedup_entries()[0];
    assert_eq!(
        image.dedup_stats().unwrap().hits,
        1,
        "the second write links"
    );
    image.flush().unwrap();
    image.abandon();
    // The device lost the in-place write (a volatile cache dropped it).
    let mut lost = old.clone();
    lost.resize(CLUSTER, 0);
    storage.write_at(&lost, indexed).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let first = read(&image, 0, CLUSTER);
    let second = read(&image, CLUSTER as u64, CLUSTER);
    assert_eq!(first, lost, "the torn transaction is dropped");
    assert_eq!(second, vec![0u8; CLUSTER], "and with it the link");
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_cluster_unshared_in_an_epoch_not_yet_durable_is_not_written_in_place() {
    // Found by the journal-dedup crash target (grow workload): a write
    // into one of two mappings of a shared cluster unshares it, and the
    // other mapping gets COPIED back in the same epoch. A write through
    // that mapping must not go in place before the epoch is durable: a
    // crash that loses it leaves the first guest cluster mapping the
    // shared cluster still, and it would read bytes it never wrote.
    let a = pattern(0x61, CLUSTER);
    let (storage, image) = a_shared_but_not_indexed(&a);
    let c = pattern(0x63, CLUSTER);
    image.write(&c, 0).unwrap();
    let head = pattern(0x70, CLUSTER / 2);
    image.write(&head, CLUSTER as u64).unwrap();
    let mut expected = a.clone();
    expected[..CLUSTER / 2].copy_from_slice(&head);
    assert_eq!(read(&image, 0, CLUSTER), c, "live");
    assert_eq!(read(&image, CLUSTER as u64, CLUSTER), expected, "live");
    // The crash: nothing of this epoch was committed.
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let first = read(&image, 0, CLUSTER);
    assert!(
        first == a || first == c,
        "guest cluster 0 reads neither its old nor its new bytes"
    );
    let second = read(&image, CLUSTER as u64, CLUSTER);
    assert!(second == a || second == expected, "guest cluster 1 is torn");
    image.close().unwrap();
    assert_engine_check_clean(&*storage);

    // Once the epoch that unshared it is durable, the cluster is written
    // in place again: nothing is allocated.
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    image.write(&c, 0).unwrap();
    image.flush().unwrap();
    let len = storage.len().unwrap();
    image.write(&head, CLUSTER as u64).unwrap();
    image.flush().unwrap();
    assert_eq!(storage.len().unwrap(), len, "written in place");
    assert_eq!(read(&image, CLUSTER as u64, CLUSTER), expected);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

/// The journal's synced sequence number (advanced by checkpoints).
fn synced_seq(image: &Image) -> u64 {
    image.info().unwrap().journal.unwrap().synced_seq
}

#[test]
fn the_index_written_after_a_checkpoint_survives_a_crash() {
    // Entries whose insertions a checkpoint synced out of the log are not
    // lost by a crash: the first transaction after the checkpoint writes
    // the index into clusters the extension names.
    let (storage, image) = dedup_image(4 << 20);
    let mut cluster = 0u64;
    let mut flushes = 0;
    // Each flush commits a transaction; the 1 MiB ring needs a checkpoint
    // after a few hundred (bounded: a checkpoint long before the bound).
    while synced_seq(&image) == 0 {
        assert!(flushes < 2000, "no checkpoint after {flushes} flushes");
        image
            .write(
                &pattern(cluster as u8 ^ 0x5c, CLUSTER),
                cluster * CLUSTER as u64,
            )
            .unwrap();
        image.flush().unwrap();
        cluster = (cluster + 1) % 1000;
        flushes += 1;
    }
    // One more transaction: it carries the index, and a duplicate.
    image
        .write(&pattern(0x5c, CLUSTER), 1001 * CLUSTER as u64)
        .unwrap();
    image.flush().unwrap();
    let before = image.dedup_entries();
    assert!(before.len() > 1);
    image.abandon();

    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let stats = image.dedup_stats().unwrap();
    assert!(stats.persisted_loaded > 0, "{stats:?}");
    assert_eq!(
        (stats.dropped_at_open, stats.persisted_stale_at_open),
        (0, 0)
    );
    assert_eq!(image.dedup_entries(), before, "no entry lost, none stale");
    // And they are used: a duplicate of the first cluster, whose
    // insertion the checkpoint synced, is shared.
    image
        .write(&pattern(0x5c, CLUSTER), 1002 * CLUSTER as u64)
        .unwrap();
    image.flush().unwrap();
    assert_eq!(image.dedup_stats().unwrap().hits, 1);
    assert_eq!(
        read(&image, 1002 * CLUSTER as u64, CLUSTER),
        pattern(0x5c, CLUSTER)
    );
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

/// The engine's check of the image file at `path` is clean.
fn assert_engine_check_clean_path(path: &std::path::Path) {
    let storage = qj_engine::FileStorage::open(path, false).unwrap();
    assert_engine_check_clean(&storage);
}

#[test]
fn internal_snapshots_keep_a_dedup_image_clean_and_its_index_exact() {
    let dir = temp_dir();
    let path = in_dir(&dir, "dedup-snap.qcow2");
    let size = 16 * CLUSTER as u64;
    Image::create_path(&path, &dedup_create_options(size)).unwrap();
    // A trusted hash: a stale entry would be used, not caught by a compare.
    let opts = OpenOptions {
        dedup_trust_hash: true,
        ..OpenOptions::read_write()
    };
    let c = |i: usize| (i * CLUSTER) as u64;
    let [a, b, d, e, f] = [0x51u8, 0x52, 0x53, 0x54, 0x55].map(|p| pattern(p, CLUSTER));
    let mut model = vec![0u8; size as usize];
    let put = |model: &mut Vec<u8>, image: &Image, i: usize, data: &[u8]| {
        image.write(data, c(i)).unwrap();
        model[i * CLUSTER..(i + 1) * CLUSTER].copy_from_slice(data);
    };
    let image = Image::open_path(&path, &opts).unwrap();
    for (i, data) in [&a, &a, &b, &b].into_iter().enumerate() {
        put(&mut model, &image, i, data);
    }
    assert_eq!(image.dedup_stats().unwrap().hits, 2);
    image.snapshot_create("s1").unwrap();
    let at_snapshot = model.clone();
    // Shared with the snapshot and deduplicated: a link, and overwrites.
    put(&mut model, &image, 4, &a);
    put(&mut model, &image, 0, &d);
    image.write(&[0x77; 512], c(2) + 512).unwrap();
    model[2 * CLUSTER + 512..2 * CLUSTER + 1024].fill(0x77);
    assert_eq!(read(&image, 0, size as usize), model);
    image.close().unwrap();
    assert_check_clean(&path);
    assert_engine_check_clean_path(&path);
    assert_qemu_io_sees(&path, &model);

    // Apply frees what only the active image held (d's cluster among
    // them): it leaves the index with its deletion.
    let image = Image::open_path(&path, &opts).unwrap();
    let d_host = image.map().unwrap()[0].offset.unwrap();
    assert!(image.dedup_entries().iter().any(|(o, _)| *o == d_host));
    image.snapshot_apply("s1").unwrap();
    model = at_snapshot.clone();
    assert_eq!(read(&image, 0, size as usize), model, "the snapshot's data");
    assert!(
        image.dedup_entries().iter().all(|(o, _)| *o != d_host),
        "the freed cluster left the index"
    );
    // Freed clusters are reused; d written again is never mapped to
    // whatever now holds the cluster d was in.
    put(&mut model, &image, 5, &e);
    put(&mut model, &image, 6, &f);
    put(&mut model, &image, 7, &d);
    put(&mut model, &image, 8, &a);
    assert_eq!(read(&image, 0, size as usize), model);
    image.close().unwrap();
    assert_check_clean(&path);
    assert_engine_check_clean_path(&path);
    assert_qemu_io_sees(&path, &model);

    // Delete: the snapshot's own clusters are freed, the shared ones stay.
    let image = Image::open_path(&path, &opts).unwrap();
    image.snapshot_delete("s1").unwrap();
    put(&mut model, &image, 9, &b);
    assert_eq!(read(&image, 0, size as usize), model);
    image.close().unwrap();
    assert_check_clean(&path);
    assert_engine_check_clean_path(&path);
    assert_qemu_io_sees(&path, &model);
    let image = Image::open_path(&path, &opts).unwrap();
    assert_eq!(image.dedup_stats().unwrap().dropped_at_open, 0);
    assert_eq!(read(&image, 0, size as usize), model);
    image.close().unwrap();
}

#[test]
fn after_an_unclean_shutdown_persisted_entries_are_rehashed() {
    // The persisted index may be older than the log after a crash (a
    // checkpoint synced changes it lacks): the open that finds the journal
    // dirty rehashes every persisted entry and drops, counted apart, those
    // whose cluster no longer has the hash. Simulated here by changing a
    // cluster behind the engine's back and marking the journal dirty.
    let (storage, image) = dedup_image(1 << 20);
    let a = pattern(0x61, CLUSTER);
    let b = pattern(0x62, CLUSTER);
    image.write(&a, 0).unwrap();
    image.write(&b, CLUSTER as u64).unwrap();
    image.close().unwrap();
    let a_host = {
        let image = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
        image.map().unwrap()[0].offset.unwrap()
    };
    let c = pattern(0x63, CLUSTER);
    storage.write_at(&c, a_host).unwrap();
    let mut header = Image::read_header(&*storage).unwrap();
    header.incompatible_features |= qj_spec::qcow2::features::INCOMPAT_JOURNAL_DIRTY_MASK;
    storage.write_at(&header.encode().unwrap(), 0).unwrap();
    // Check judges the dirty image as replayed: the stale entry is
    // expected there, noted and not counted.
    let report = check(&*storage, RepairMode::None, &[]).unwrap();
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    assert!(
        report
            .messages
            .iter()
            .any(|m| m.starts_with("NOTE dedup index entry")),
        "{:?}",
        report.messages
    );

    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let stats = image.dedup_stats().unwrap();
    assert_eq!(stats.persisted_loaded, 2);
    assert_eq!(
        (stats.persisted_stale_at_open, stats.dropped_at_open),
        (1, 0)
    );
    assert_eq!(image.dedup_entries().len(), 1, "b's entry stays");
    // a written again is stored, not mapped to the changed cluster.
    image.write(&a, 2 * CLUSTER as u64).unwrap();
    assert_eq!(read(&image, 2 * CLUSTER as u64, CLUSTER), a);
    assert_eq!(image.dedup_stats().unwrap().hits, 0);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn an_entry_only_a_snapshot_maps_leaves_the_persisted_index_too() {
    // Found in review: X is indexed, then only a snapshot maps it. The
    // next clean open drops X from memory (nothing to share through), so
    // when the snapshot's deletion frees X no deletion is logged. Unless
    // that open rewrites the persisted index, X's cluster, reused by an
    // unindexed partial write, would come back at the following clean
    // open (persisted entries are trusted then), and a write of X's bytes
    // would be mapped onto other data (the hash is trusted here).
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), &dedup_create_options(8 * CLUSTER as u64)).unwrap();
    let opts = OpenOptions {
        dedup_trust_hash: true,
        ..OpenOptions::read_write()
    };
    let x = pattern(0x58, CLUSTER);
    let image = Image::open(storage.clone(), &opts).unwrap();
    image.write(&x, 0).unwrap();
    let x_host = image.map().unwrap()[0].offset.unwrap();
    image.snapshot_create("s").unwrap();
    image.write(&pattern(0x59, CLUSTER), 0).unwrap();
    image.close().unwrap();

    let image = Image::open(storage.clone(), &opts).unwrap();
    assert!(image.dedup_entries().iter().all(|(o, _)| *o != x_host));
    image.snapshot_delete("s").unwrap();
    // Frees are reusable once durable; partial writes fill fresh clusters.
    image.flush().unwrap();
    for i in 1..6 {
        image.write(&[0x5a; 512], (i * CLUSTER) as u64).unwrap();
    }
    image.close().unwrap();
    // The persisted index names the guest's overwrite alone, not X.
    assert_eq!(persisted_index(&*storage).unwrap().entries, 1);

    let image = Image::open(storage.clone(), &opts).unwrap();
    assert!(
        image.dedup_entries().iter().all(|(o, _)| *o != x_host),
        "a clean open brought back an entry the last session dropped"
    );
    image.write(&x, 6 * CLUSTER as u64).unwrap();
    assert_eq!(read(&image, 6 * CLUSTER as u64, CLUSTER), x);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}
