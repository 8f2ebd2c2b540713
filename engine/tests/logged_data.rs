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

#[test]
fn a_write_into_never_written_bytes_of_a_checkpointed_cluster_is_logged_and_survives_a_crash() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    create(&storage, false);
    let image = open(&storage);
    fill_past_a_checkpoint(&image);
    let mut model = vec![0u8; 3 * CLUSTER as usize];
    for i in 0..3 {
        model[(i * CLUSTER) as usize..][..4096].copy_from_slice(&pattern(i as u8, 4096));
    }
    let mut write = |image: &Image, seed: u8, offset: u64, len: usize| {
        let data = pattern(seed, len);
        image.write(&data, offset).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    };
    let before = image.stats();
    // Into bytes a kept cluster never held: logged, nothing in place.
    write(&image, 201, 8192, 4096);
    image.flush().unwrap();
    let d = image.stats().since(&before);
    assert_eq!(d.data_bytes, 0, "logged, not written in place: {d:?}");
    assert!(d.journal_bytes >= 4096, "{d:?}");
    // Inside the written bytes of another: in place (its blocks are
    // written).
    let before = image.stats();
    write(&image, 202, CLUSTER + 1024, 1024);
    image.flush().unwrap();
    assert_eq!(image.stats().since(&before).data_bytes, 1024);
    // And past them, after the in-place write dropped the copy: in place
    // too, and the cluster reads whole.
    let before = image.stats();
    write(&image, 203, CLUSTER + 16384, 512);
    assert_eq!(image.stats().since(&before).data_bytes, 512);
    // Not flushed: may be lost, so checked only before the crash.
    write(&image, 204, 2 * CLUSTER + 32768, 4096);
    let span = 3 * CLUSTER as usize;
    assert!(read(&image, 0, span) == model[..span], "before the crash");
    image.abandon();
    model[2 * CLUSTER as usize + 32768..2 * CLUSTER as usize + 32768 + 4096].fill(0);
    for (what, image) in [
        (
            "in-memory replay",
            Image::open(storage.clone(), &OpenOptions::read_only()).unwrap(),
        ),
        ("replay in place", open(&storage)),
    ] {
        let back = read(&image, 0, span);
        assert!(
            back[..2 * CLUSTER as usize] == model[..2 * CLUSTER as usize],
            "{what}"
        );
        // The unflushed write into the third cluster: all or nothing.
        let third = &back[2 * CLUSTER as usize..];
        let unflushed = 32768..32768 + 4096;
        assert!(
            third[..unflushed.start] == model[2 * CLUSTER as usize..][..unflushed.start],
            "{what}"
        );
        assert!(
            third[unflushed.clone()].iter().all(|&b| b == 0)
                || third[unflushed.clone()] == pattern(204, 4096)[..],
            "{what}"
        );
        if what == "replay in place" {
            image.close().unwrap();
        }
    }
    assert_engine_check_clean(&*storage);
}

#[test]
fn a_discarded_kept_cluster_is_reused_with_none_of_its_old_bytes() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    create(&storage, false);
    let image = open(&storage);
    fill_past_a_checkpoint(&image);
    let old = host_of(&image, 0).unwrap();
    image.discard(0, CLUSTER).unwrap();
    // Frees take effect once the discard is durable.
    image.flush().unwrap();
    image.flush().unwrap();
    let guest = 1000 * CLUSTER;
    image.write(&pattern(7, 512), guest + 4096).unwrap();
    assert_eq!(
        host_of(&image, guest + 4096).map(|h| h - 4096),
        Some(old),
        "the test needs the freed cluster reused"
    );
    let mut expected = vec![0u8; CLUSTER as usize];
    expected[4096..4096 + 512].copy_from_slice(&pattern(7, 512));
    assert!(
        read(&image, guest, CLUSTER as usize) == expected,
        "bytes differ"
    );
    assert!(read(&image, 0, 4096) == vec![0; 4096], "bytes differ");
    image.flush().unwrap();
    image.close().unwrap();
    let image = open(&storage);
    assert!(
        read(&image, guest, CLUSTER as usize) == expected,
        "bytes differ"
    );
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}

/// Writes 4 KiB at the start of 1,000 clusters, flushing every 50: past
/// three quarters of the logged bytes a 16 MiB ring holds, so checkpoints
/// write the first clusters in place and the image keeps them.
fn fill_past_a_checkpoint(image: &Image) {
    for i in 0..1000u64 {
        image.write(&pattern(i as u8, 4096), i * CLUSTER).unwrap();
        if i % 50 == 49 {
            image.flush().unwrap();
        }
    }
    image.flush().unwrap();
}

#[test]
fn a_snapshot_of_a_logged_cluster_keeps_its_bytes_through_copy_on_write() {
    // (fresh: logged bytes not yet checkpointed; kept: a checkpointed
    // cluster written again past its bytes, logged again.)
    for kept in [false, true] {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        create(&storage, false);
        let image = open(&storage);
        let (logged_at, seed) = if kept {
            fill_past_a_checkpoint(&image);
            (16384, 77)
        } else {
            (0, 1)
        };
        image.write(&pattern(seed, 4096), logged_at).unwrap();
        image.flush().unwrap();
        image.snapshot_create("s").unwrap();
        // Copy-on-write of the shared cluster: its untouched bytes, the
        // logged ones among them, come from the source.
        image.write(&pattern(2, 512), 40000).unwrap();
        assert_eq!(
            read(&image, logged_at, 4096),
            pattern(seed, 4096),
            "kept {kept}"
        );
        // A second write into the untouched part in the same epoch.
        image.write(&pattern(3, 512), 50000).unwrap();
        image.flush().unwrap();
        assert_eq!(
            read(&image, logged_at, 4096),
            pattern(seed, 4096),
            "kept {kept}"
        );
        assert!(read(&image, 40000, 512) == pattern(2, 512), "bytes differ");
        image.close().unwrap();
        let image = open(&storage);
        assert_eq!(
            read(&image, logged_at, 4096),
            pattern(seed, 4096),
            "kept {kept}, reopened"
        );
        assert!(read(&image, 50000, 512) == pattern(3, 512), "bytes differ");
        image.close().unwrap();
        assert_engine_check_clean(&*storage);
    }
}

/// Reads of kept clusters joined again (the file's bytes under the logged
/// ones, `read_data`) see every write that completed before them, while
/// checkpoints write logged bytes in place and forget them underneath: a
/// read that a forget overtook reads again.
#[test]
fn reads_of_joined_kept_clusters_see_every_completed_write_while_checkpoints_run() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const CLUSTERS: u64 = 200;
    // Pieces 1..=8 of each cluster: bytes the fill never wrote, so each
    // write joins its kept cluster again.
    const WRITES: u64 = 8 * CLUSTERS;
    const READS_MAX: u64 = 100_000;
    let offset = |k: u64| (k % CLUSTERS) * CLUSTER + (k / CLUSTERS + 1) * 4096;
    let seed = |k: u64| (k % 251) as u8 + 1;
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    create(&storage, false);
    let image = open(&storage);
    fill_past_a_checkpoint(&image);
    let synced_before = image.info().unwrap().journal.unwrap().synced_seq;
    let done = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for reader in 0..2u64 {
            let (image, done, reads) = (&image, &done, &reads);
            s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15 ^ reader;
                for _ in 0..READS_MAX {
                    let completed = done.load(Ordering::Acquire);
                    if completed == WRITES {
                        break;
                    }
                    if completed == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let k = rng % completed;
                    let cluster = offset(k) - offset(k) % CLUSTER;
                    let back = read(image, cluster, (offset(k) - cluster) as usize + 4096);
                    assert!(
                        back[..4096] == pattern((cluster / CLUSTER) as u8, 4096)[..],
                        "the file's bytes of cluster {}",
                        cluster / CLUSTER
                    );
                    assert!(
                        back[back.len() - 4096..] == pattern(seed(k), 4096)[..],
                        "write {k}, completed before the read began"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for k in 0..WRITES {
            image.write(&pattern(seed(k), 4096), offset(k)).unwrap();
            if k % 16 == 15 {
                image.flush().unwrap();
            }
            done.store(k + 1, Ordering::Release);
        }
    });
    image.flush().unwrap();
    let synced_after = image.info().unwrap().journal.unwrap().synced_seq;
    assert!(
        synced_after > synced_before,
        "no checkpoint ran during the writes"
    );
    assert!(reads.load(Ordering::Relaxed) > 0, "no read ran");
    for k in 0..WRITES {
        assert!(
            read(&image, offset(k), 4096) == pattern(seed(k), 4096),
            "write {k}"
        );
    }
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
}
