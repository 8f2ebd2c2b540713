//! Logged data (`OpenOptions::log_fresh_data`, journal rule 7): writes into
//! fresh clusters past the end of the file travel in the transaction; the
//! file reaches them at checkpoint. What must hold: one flush per synced
//! allocating write and no data written in place before a checkpoint;
//! reads, later writes, discards and reuse see the logged bytes; a crash
//! (abandon) replays them, newest last; QEMU reads the closed image.

mod common;

use common::{assert_engine_check_clean, pattern, read};

use std::process::Command;
use std::sync::Arc;

use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

const CLUSTER: u64 = 64 << 10;

fn create(storage: &Arc<dyn Storage>, two_flush: bool) {
    Image::create_shared(
        storage.clone(),
        &CreateOptions {
            virtual_size: 64 << 20,
            cluster_size: CLUSTER,
            journal: Some(JournalConfig {
                size_bytes: 16 << 20,
                two_flush,
                log_data: false,
                dedup: false,
            }),
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn open(storage: &Arc<dyn Storage>) -> Image {
    let opts = OpenOptions {
        log_fresh_data: true,
        ..OpenOptions::read_write()
    };
    Image::open(storage.clone(), &opts).unwrap()
}

/// The host offset guest byte `guest` maps to, if allocated.
fn host_of(image: &Image, guest: u64) -> Option<u64> {
    image
        .map()
        .unwrap()
        .iter()
        .find(|e| e.start <= guest && guest < e.start + e.length && e.data)
        .and_then(|e| e.offset.map(|o| o + (guest - e.start)))
}

#[test]
fn synced_allocating_writes_flush_once_and_write_no_data_in_place() {
    for two_flush in [false, true] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        create(&storage, two_flush);
        let image = open(&storage);
        // The first commit also sets the journal-dirty bit.
        image.write(&pattern(1, 4096), 0).unwrap();
        image.flush().unwrap();
        let length_before = storage.len().unwrap();
        let before = image.stats();
        for i in 1..33u64 {
            image.write(&pattern(i as u8, 4096), i * CLUSTER).unwrap();
            image.flush().unwrap();
        }
        let d = image.stats().since(&before);
        eprintln!(
            "len {length_before:#x}: {:?}",
            (0..33u64)
                .map(|i| host_of(&image, i * CLUSTER).map(|h| format!("{h:#x}")))
                .collect::<Vec<_>>()
        );
        let per_commit = if two_flush { 2 } else { 1 };
        assert_eq!(d.flushes, 32 * per_commit, "{d:?}");
        assert_eq!(
            d.data_bytes, 0,
            "no data in place before a checkpoint: {d:?}"
        );
        assert_eq!(
            storage.len().unwrap(),
            length_before,
            "the file does not grow before a checkpoint"
        );
        assert!(d.journal_bytes >= 32 * 4096, "{d:?}");
        for i in 1..33u64 {
            assert_eq!(read(&image, i * CLUSTER, 4096), pattern(i as u8, 4096));
            assert_eq!(read(&image, i * CLUSTER + 4096, 512), vec![0; 512]);
        }
        image.close().unwrap();
        assert_engine_check_clean(&*storage);
        let image = open(&storage);
        for i in 0..33u64 {
            let seed = (i as u8).max(1);
            assert_eq!(read(&image, i * CLUSTER, 4096), pattern(seed, 4096));
        }
        image.close().unwrap();
    }
}

#[test]
fn later_writes_into_logged_clusters_win_after_a_crash() {
    for two_flush in [false, true] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        create(&storage, two_flush);
        let image = open(&storage);
        let mut model = vec![0u8; 8 * CLUSTER as usize];
        let mut write = |image: &Image, seed: u8, offset: u64, len: usize| {
            let data = pattern(seed, len);
            image.write(&data, offset).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        };
        // Logged, merged before the flush, then written again after it
        // (the next transaction), and again after a second flush.
        write(&image, 1, 0, 4096);
        write(&image, 2, 8192, 4096);
        image.flush().unwrap();
        write(&image, 3, 2048, 4096);
        write(&image, 4, CLUSTER + 512, 1024);
        image.flush().unwrap();
        write(&image, 5, 0, 1024);
        image.flush().unwrap();
        // Not flushed: may be lost.
        image.write(&pattern(6, 512), 3 * CLUSTER).unwrap();
        assert_eq!(
            read(&image, 0, 2 * CLUSTER as usize),
            &model[..2 * CLUSTER as usize]
        );
        image.abandon();

        let ro = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
        assert_eq!(
            read(&ro, 0, 2 * CLUSTER as usize),
            &model[..2 * CLUSTER as usize],
            "in-memory replay, two_flush {two_flush}"
        );
        drop(ro);
        let image = open(&storage);
        assert_eq!(
            read(&image, 0, 2 * CLUSTER as usize),
            &model[..2 * CLUSTER as usize],
            "replay in place, two_flush {two_flush}"
        );
        image.close().unwrap();
        assert_engine_check_clean(&*storage);
    }
}

#[test]
fn a_discarded_logged_cluster_is_not_reused_before_its_bytes_are_synced() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    create(&storage, false);
    let image = open(&storage);
    image.write(&pattern(1, 4096), 0).unwrap();
    image.flush().unwrap();
    let first = host_of(&image, 0);
    assert!(first.is_some());
    image.discard(0, CLUSTER).unwrap();
    image.flush().unwrap();
    // A new allocation must not take the discarded cluster: a replay
    // would write the old logged bytes over it.
    image.write(&pattern(2, 4096), 5 * CLUSTER).unwrap();
    image.flush().unwrap();
    let second = host_of(&image, 5 * CLUSTER);
    assert!(second.is_some());
    assert_ne!(second, first, "reused before synced");
    image.abandon();
    let image = open(&storage);
    assert_eq!(read(&image, 0, 4096), vec![0; 4096]);
    assert_eq!(read(&image, 5 * CLUSTER, 4096), pattern(2, 4096));
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

#[test]
fn qemu_reads_a_closed_image_written_with_logged_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logged.qcow2");
    Image::create_path(
        &path,
        &CreateOptions {
            virtual_size: 64 << 20,
            cluster_size: CLUSTER,
            journal: Some(JournalConfig {
                size_bytes: 4 << 20,
                two_flush: false,
                log_data: false,
                dedup: false,
            }),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let opts = OpenOptions {
        log_fresh_data: true,
        ..OpenOptions::read_write()
    };
    let image = Image::open_path(&path, &opts).unwrap();
    // More than the logged bound (an eighth of the 4 MiB ring) and more
    // than fits before a checkpoint: logged, in place and checkpointed.
    for i in 0..200u64 {
        image.write(&[i as u8 | 1; 4096], i * CLUSTER).unwrap();
        image.flush().unwrap();
    }
    image.close().unwrap();
    for i in [0u64, 1, 7, 63, 64, 199] {
        let out = Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c"])
            .arg(format!("read -P {} {} 4k", i as u8 | 1, i * CLUSTER))
            .arg(&path)
            .output()
            .expect("qemu-io is installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("verification failed"),
            "cluster {i}: {stdout}"
        );
    }
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&path)
        .output()
        .expect("qemu-img is installed");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["corruptions"].as_u64().unwrap_or(0), 0, "{json}");
    assert_eq!(
        json["leaks"].as_u64().unwrap_or(0),
        (4 << 20) / CLUSTER,
        "only the journal's clusters: {json}"
    );
}
