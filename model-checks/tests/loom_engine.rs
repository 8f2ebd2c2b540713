//! loom models of the engine's concurrent parts, run on the production
//! code: `qj-engine` takes every lock and atomic from `qj_engine::sync`,
//! which is loom's under `--cfg loom`, so these models explore the
//! interleavings of the real `TableCache`, `RefcountState` and `Image`.
//!
//! Run (see `model-checks/LOOM.md` for the bound and what is covered):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p qj-model-checks --test loom_engine --release
//! ```
//!
//! Each model asserts the property that matters (one load, whole tables,
//! no lost change, one mapping, no leak, distinct clusters), not merely the
//! absence of a panic or deadlock.

#![cfg(loom)]

use std::collections::BTreeMap;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use qj_engine::cache::TableCache;
use qj_engine::check::{check, RepairMode};
use qj_engine::sync::Mutex;
use qj_engine::{
    BackingSource, CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage,
};
use qj_spec::qcow2::read_table_entry;
use qj_spec::units::HostOffset;

/// The preemption bound used when `LOOM_MAX_PREEMPTIONS` is not set (CI
/// sets it to the same value). Every deliberate bug in `LOOM.md` is caught
/// at two; three costs about five times as much (seconds in all) and covers
/// schedules where both threads are interrupted mid-operation.
const PREEMPTIONS_DEFAULT: usize = 3;

/// Scheduling points one execution may take. The image models spend most
/// of theirs single-threaded (creating, opening and filling the image before
/// the threads start), far above loom's default of 1000.
const BRANCHES_MAX: usize = 20_000;

/// Runs `model` under loom with the documented bound.
fn check_model(model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS_DEFAULT);
    }
    builder.max_branches = builder.max_branches.max(BRANCHES_MAX);
    builder.check(model);
}

// ---- the metadata cache ------------------------------------------------

/// Table size in the cache models: four 512-byte sectors, so that a
/// table's write-back can be two runs (changed sectors with a clean one
/// between them).
const TABLE_BYTES: usize = 2048;
/// The cache's smallest bound (`TableCache::new` raises anything lower).
const TABLES_MAX: usize = 4;

/// A device whose every access is a loom scheduling point, so that models
/// explore the windows between taking a write-back and the bytes landing.
#[derive(Default)]
struct Disk {
    tables: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl Disk {
    fn with_tables(tables: &[(u64, u64)]) -> Self {
        let disk = Self::default();
        for &(offset, value) in tables {
            disk.tables.lock().insert(offset, table_with(value));
        }
        disk
    }

    fn read(&self, offset: HostOffset, buf: &mut [u8]) {
        match self.tables.lock().get(&offset.0) {
            Some(bytes) => buf.copy_from_slice(bytes),
            None => buf.fill(0),
        }
    }

    fn write(&self, offset: HostOffset, bytes: &[u8]) {
        let table_offset = offset.0 / TABLE_BYTES as u64 * TABLE_BYTES as u64;
        let at = (offset.0 - table_offset) as usize;
        let mut tables = self.tables.lock();
        let table = tables
            .entry(table_offset)
            .or_insert_with(|| vec![0; TABLE_BYTES]);
        table[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn entry(&self, table: HostOffset, index: usize) -> u64 {
        let mut buf = vec![0; TABLE_BYTES];
        self.read(table, &mut buf);
        read_table_entry(&buf, index)
    }
}

/// A table whose every entry holds `value`.
fn table_with(value: u64) -> Vec<u8> {
    let mut bytes = vec![0; TABLE_BYTES];
    for i in 0..TABLE_BYTES / 8 {
        qj_spec::qcow2::write_table_entry(&mut bytes, i, value);
    }
    bytes
}

fn table_offset(index: u64) -> HostOffset {
    HostOffset(index * TABLE_BYTES as u64)
}

/// Looks a table up, loading it from `disk` on a miss.
fn lookup(
    cache: &TableCache,
    disk: &Disk,
    offset: HostOffset,
) -> Arc<qj_engine::cache::CachedTable> {
    cache
        .get(offset, |buf| {
            disk.read(offset, buf);
            Ok(())
        })
        .expect("the model's loads do not fail")
}

/// The flush path's write-back, as `Image::persist` does it: take every
/// dirty table's changed sectors (the production
/// `TableCache::take_writebacks`), write them to the device, and only then
/// drop the pins.
fn write_back(cache: &TableCache, disk: &Disk) {
    let mut runs = Vec::new();
    let pins = cache.take_writebacks(|offset, _fresh, bytes| runs.push((offset, bytes)));
    for (offset, bytes) in runs {
        disk.write(offset, &bytes);
    }
    drop(pins);
}

/// Concurrent lookups of one table load it once, and neither caller sees
/// the table before its bytes are all in place.
#[test]
fn lookups_of_one_table_load_it_once_and_whole() {
    check_model(|| {
        const LOADED: u8 = 0xa5;
        let cache = Arc::new(TableCache::new("L2", TABLE_BYTES, TABLES_MAX));
        let loads = Arc::new(AtomicUsize::new(0));
        let lookups: Vec<_> = (0..2)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                thread::spawn(move || {
                    let entry = cache
                        .get(table_offset(1), |buf| {
                            // The load is two steps with a scheduling point
                            // between them, as a device read would be.
                            buf[..TABLE_BYTES / 2].fill(LOADED);
                            loads.fetch_add(1, Ordering::SeqCst);
                            buf[TABLE_BYTES / 2..].fill(LOADED);
                            Ok(())
                        })
                        .expect("the load does not fail");
                    assert!(
                        entry.data.read().bytes.iter().all(|&b| b == LOADED),
                        "a lookup returned a table before its load completed"
                    );
                    entry
                })
            })
            .collect();
        let entries: Vec<_> = lookups.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "concurrent lookups of one table loaded it more than once"
        );
        assert!(
            Arc::ptr_eq(&entries[0], &entries[1]),
            "concurrent lookups of one table got two different entries"
        );
    });
}

/// A failed load leaves nothing behind that a concurrent caller could be
/// handed: every caller that succeeds gets the entry the cache keeps (so
/// its changes are written back), and the table is then cached.
#[test]
fn failed_load_leaves_no_orphan_entry() {
    check_model(|| {
        const LOADED: u8 = 0x3c;
        let cache = Arc::new(TableCache::new("L2", TABLE_BYTES, TABLES_MAX));
        let attempts = Arc::new(AtomicUsize::new(0));
        let lookups: Vec<_> = (0..2)
            .map(|_| {
                let (cache, attempts) = (cache.clone(), attempts.clone());
                thread::spawn(move || {
                    cache.get(table_offset(1), |buf| {
                        // The first read of the table fails (a transient
                        // device error); later ones succeed.
                        if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                            return Err(qj_engine::Error::Corrupt("injected read failure".into()));
                        }
                        buf.fill(LOADED);
                        Ok(())
                    })
                })
            })
            .collect();
        let results: Vec<_> = lookups.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            results.iter().any(|r| r.is_err()),
            "the injected failure reached no caller"
        );
        let attempts_before = attempts.load(Ordering::SeqCst);
        let cached = cache
            .get(table_offset(1), |buf| {
                attempts.fetch_add(1, Ordering::SeqCst);
                buf.fill(LOADED);
                Ok(())
            })
            .expect("the retry succeeds");
        for entry in results.iter().flatten() {
            assert!(entry.data.read().bytes.iter().all(|&b| b == LOADED));
            assert!(
                Arc::ptr_eq(entry, &cached),
                "a caller was handed an entry the cache does not hold: its changes would never be written back"
            );
            assert_eq!(
                attempts.load(Ordering::SeqCst),
                attempts_before,
                "a table a caller loaded successfully was not cached"
            );
        }
    });
}

/// A table inserted fresh (just allocated) is visible to a lookup only
/// with all its bytes, never zeros or a mix.
#[test]
fn fresh_table_is_published_whole() {
    check_model(|| {
        const FRESH: u8 = 0x5a;
        const ON_DISK: u8 = 0x11;
        let cache = Arc::new(TableCache::new("L2", TABLE_BYTES, TABLES_MAX));
        let inserter = {
            let cache = cache.clone();
            thread::spawn(move || cache.insert_fresh(table_offset(2), vec![FRESH; TABLE_BYTES]))
        };
        let looker = {
            let cache = cache.clone();
            thread::spawn(move || {
                let entry = cache
                    .get(table_offset(2), |buf| {
                        buf.fill(ON_DISK);
                        Ok(())
                    })
                    .expect("the load does not fail");
                let first = entry.data.read().bytes[0];
                assert!(
                    first == FRESH || first == ON_DISK,
                    "a lookup saw a table that was neither loaded nor filled ({first:#x})"
                );
                assert!(
                    entry.data.read().bytes.iter().all(|&b| b == first),
                    "a lookup saw a half-filled table"
                );
                entry
            })
        };
        let fresh = inserter.join().unwrap();
        let seen = looker.join().unwrap();
        if Arc::ptr_eq(&fresh, &seen) {
            assert!(seen.data.read().bytes.iter().all(|&b| b == FRESH));
        }
        // Whatever the order, the cache now holds the fresh table, dirty.
        let held = cache
            .get(table_offset(2), |_| {
                panic!("a table inserted fresh was loaded from disk")
            })
            .unwrap();
        assert!(Arc::ptr_eq(&held, &fresh), "the fresh table was replaced");
        let data = held.data.read();
        assert!(
            data.dirty && data.fresh,
            "the fresh table lost its dirty state"
        );
    });
}

/// A table whose write-back was taken but whose bytes have not reached the
/// device yet must not be evicted: a lookup would reload the old bytes and
/// the change would be lost for good (the cache then holds the stale copy).
/// Also: eviction never drops a dirty table.
#[test]
fn table_being_written_back_is_not_lost() {
    check_model(|| {
        const OLD: u64 = 1;
        const NEW: u64 = 2;
        // Five tables on disk; the cache holds four (its bound).
        let disk = Arc::new(Disk::with_tables(&[
            (table_offset(0).0, OLD),
            (table_offset(1).0, OLD),
            (table_offset(2).0, OLD),
            (table_offset(3).0, OLD),
            (table_offset(4).0, OLD),
        ]));
        let cache = Arc::new(TableCache::new("L2", TABLE_BYTES, TABLES_MAX));
        // Table 0 is the least recently used, and dirty.
        for i in 0..4 {
            lookup(&cache, &disk, table_offset(i));
        }
        lookup(&cache, &disk, table_offset(0))
            .data
            .write()
            .set_entry(0, NEW);
        for i in 1..4 {
            lookup(&cache, &disk, table_offset(i));
        }

        let flusher = {
            let (cache, disk) = (cache.clone(), disk.clone());
            thread::spawn(move || write_back(&cache, &disk))
        };
        let reader = {
            let (cache, disk) = (cache.clone(), disk.clone());
            thread::spawn(move || {
                // A miss takes the cache over its bound; eviction follows,
                // as after every guest read.
                lookup(&cache, &disk, table_offset(4));
                cache.evict();
                let entry = lookup(&cache, &disk, table_offset(0));
                let value = read_table_entry(&entry.data.read().bytes, 0);
                assert_eq!(
                    value, NEW,
                    "a change was lost: the table was evicted while dirty, or before its write-back reached the disk"
                );
            })
        };
        flusher.join().unwrap();
        reader.join().unwrap();
        write_back(&cache, &disk);
        assert_eq!(
            disk.entry(table_offset(0), 0),
            NEW,
            "the change never reached the disk"
        );
        let entry = lookup(&cache, &disk, table_offset(0));
        assert_eq!(read_table_entry(&entry.data.read().bytes, 0), NEW);
    });
}

/// A change made while the table is being written back is neither lost
/// (it stays dirty for the next write-back) nor written half: entries
/// changed under one lock reach the disk together.
#[test]
fn change_during_write_back_is_kept_whole() {
    check_model(|| {
        const OLD: u64 = 1;
        const NEW: u64 = 7;
        // Entries in different sectors: two runs of one write-back.
        const FIRST: usize = 0;
        const LAST: usize = TABLE_BYTES / 8 - 1;
        let disk = Arc::new(Disk::with_tables(&[(table_offset(0).0, OLD)]));
        let cache = Arc::new(TableCache::new("L2", TABLE_BYTES, TABLES_MAX));
        // Both sectors dirty already, so that the flusher has two runs to
        // take whatever the order.
        {
            let entry = lookup(&cache, &disk, table_offset(0));
            let mut data = entry.data.write();
            data.set_entry(FIRST + 1, OLD);
            data.set_entry(LAST - 1, OLD);
        }

        let writer = {
            let (cache, disk) = (cache.clone(), disk.clone());
            thread::spawn(move || {
                let entry = lookup(&cache, &disk, table_offset(0));
                let mut data = entry.data.write();
                data.set_entry(FIRST, NEW);
                data.set_entry(LAST, NEW);
            })
        };
        let flusher = {
            let (cache, disk) = (cache.clone(), disk.clone());
            thread::spawn(move || {
                write_back(&cache, &disk);
                let (first, last) = (
                    disk.entry(table_offset(0), FIRST),
                    disk.entry(table_offset(0), LAST),
                );
                assert_eq!(
                    first, last,
                    "a write-back wrote half of a change made under one lock"
                );
            })
        };
        writer.join().unwrap();
        flusher.join().unwrap();
        write_back(&cache, &disk);
        assert_eq!(disk.entry(table_offset(0), FIRST), NEW, "a change was lost");
        assert_eq!(disk.entry(table_offset(0), LAST), NEW, "a change was lost");
    });
}

// ---- allocation, through the whole image -------------------------------

/// Smallest cluster: one L2 table maps 64 guest clusters (32 KiB).
const CLUSTER_BYTES: usize = 512;
/// Guest clusters one L2 table maps.
const L2_ENTRIES: u64 = CLUSTER_BYTES as u64 / 8;
/// Two L2 tables' worth of guest disk.
const DISK_BYTES: u64 = 2 * L2_ENTRIES * CLUSTER_BYTES as u64;

/// The image models' device: every access is a loom scheduling point (so
/// that models explore data and metadata I/O interleaved with the locks),
/// and it remembers what the last flush made durable.
#[derive(Debug, Default)]
struct LoomDisk {
    bytes: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
}

impl LoomDisk {
    /// What a power cut now would leave: the content as of the last flush.
    fn durable_copy(&self) -> MemStorage {
        MemStorage::from_bytes(self.durable.lock().clone())
    }
}

impl Storage for LoomDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let bytes = self.bytes.lock();
        let start = usize::try_from(offset).unwrap().min(bytes.len());
        let end = (start + buf.len()).min(bytes.len());
        buf[..end - start].copy_from_slice(&bytes[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut bytes = self.bytes.lock();
        let start = usize::try_from(offset).unwrap();
        if bytes.len() < start + buf.len() {
            bytes.resize(start + buf.len(), 0);
        }
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let now = self.bytes.lock().clone();
        *self.durable.lock() = now;
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.bytes.lock().resize(usize::try_from(len).unwrap(), 0);
        Ok(())
    }
}

/// A fresh image on a [`LoomDisk`], opened read-write on the
/// flush-ordering backend.
fn fresh_image() -> (std::sync::Arc<LoomDisk>, Image) {
    image_with(DISK_BYTES, OpenOptions::read_write())
}

/// A fresh image of `virtual_size` bytes on a [`LoomDisk`], opened with `opts`.
fn image_with(virtual_size: u64, opts: OpenOptions) -> (std::sync::Arc<LoomDisk>, Image) {
    image_created(
        CreateOptions {
            virtual_size,
            cluster_size: CLUSTER_BYTES as u64,
            ..CreateOptions::default()
        },
        opts,
    )
}

/// A fresh image created with `create` on a [`LoomDisk`], opened with `opts`.
fn image_created(create: CreateOptions, opts: OpenOptions) -> (std::sync::Arc<LoomDisk>, Image) {
    let disk = std::sync::Arc::new(LoomDisk::default());
    Image::create_shared(disk.clone(), &create).expect("creating the model's image");
    disk.flush().unwrap();
    let image = Image::open(disk.clone(), &opts).expect("opening it");
    (disk, image)
}

/// Closes the image (everything written back) and asserts that our check,
/// which reads the device without the engine's caches, finds every
/// refcount equal to its references: no leak, no cluster with two owners.
fn close_and_check(storage: &LoomDisk, image: Arc<Image>) {
    let image = Arc::try_unwrap(image).unwrap_or_else(|_| panic!("the image is still shared"));
    image.close().expect("closing the image");
    let report = check(storage, RepairMode::None, &[]).expect("checking the image");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "the closed image is not clean: {:?}",
        report.messages
    );
}

/// The content of one guest cluster, asserting it is one byte value.
fn cluster_value(image: &Image, guest_cluster: u64) -> u8 {
    let mut buf = vec![0; CLUSTER_BYTES];
    image
        .read(&mut buf, guest_cluster * CLUSTER_BYTES as u64)
        .expect("reading a cluster");
    assert!(
        buf.iter().all(|&b| b == buf[0]),
        "guest cluster {guest_cluster} holds a mix of two writes"
    );
    buf[0]
}

/// Host offsets of the guest clusters that hold data, by guest offset.
fn data_mappings(image: &Image) -> BTreeMap<u64, u64> {
    let mut mappings = BTreeMap::new();
    for extent in image.map().expect("mapping the image") {
        if let (true, Some(host)) = (extent.data, extent.offset) {
            for at in (0..extent.length).step_by(CLUSTER_BYTES) {
                mappings.insert(extent.start + at, host + at);
            }
        }
    }
    mappings
}

/// Two writers of the same unallocated guest cluster end with one mapping,
/// holding one writer's bytes whole, and no leaked cluster: the second
/// writer must see the first one's allocation under the table lock and
/// overwrite in place.
#[test]
fn writers_of_one_guest_cluster_end_with_one_mapping() {
    check_model(|| {
        let (storage, image) = fresh_image();
        // The L2 table exists already, so that the writers race on the data
        // allocation only.
        image
            .write(&[9; CLUSTER_BYTES], CLUSTER_BYTES as u64)
            .unwrap();
        image.flush().unwrap();
        let image = Arc::new(image);
        let writers: Vec<_> = [0xa1u8, 0xb2]
            .into_iter()
            .map(|value| {
                let image = image.clone();
                thread::spawn(move || image.write(&[value; CLUSTER_BYTES], 0).unwrap())
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let value = cluster_value(&image, 0);
        assert!(
            value == 0xa1 || value == 0xb2,
            "guest cluster 0 holds {value:#x}"
        );
        assert_eq!(
            data_mappings(&image).len(),
            2,
            "guest cluster 0 is not mapped once"
        );
        close_and_check(&storage, image);
    });
}

/// Two writers of different guest clusters in one range that has no L2
/// table yet both create it, at the same time: the second to take the L1
/// lock must find the first one's table and use it. Both writes survive,
/// in distinct clusters, and nothing leaks.
#[test]
fn writers_creating_one_l2_table_share_it() {
    check_model(|| {
        let (storage, image) = fresh_image();
        let image = Arc::new(image);
        concurrent_writes(&image, [(0, 0xa1), (1, 0xb2)]);
        close_and_check(&storage, image);
    });
}

/// Two writers allocating data clusters at the same time, in different L2
/// tables (so that only the allocator serialises them), get distinct
/// clusters; both writes survive and nothing leaks.
#[test]
fn concurrent_allocations_get_distinct_clusters() {
    check_model(|| {
        let (storage, image) = fresh_image();
        // Both L2 tables exist already, so that the writers race on the data
        // allocation only.
        for guest_cluster in [2, L2_ENTRIES + 2] {
            image
                .write(&[9; CLUSTER_BYTES], guest_cluster * CLUSTER_BYTES as u64)
                .unwrap();
        }
        image.flush().unwrap();
        let image = Arc::new(image);
        concurrent_writes(&image, [(0, 0xa1), (L2_ENTRIES, 0xb2)]);
        close_and_check(&storage, image);
    });
}

/// Two threads each write one whole guest cluster, `(guest cluster, byte)`,
/// at the same time; then both clusters must hold their bytes, in distinct
/// host clusters.
fn concurrent_writes(image: &Arc<Image>, writes: [(u64, u8); 2]) {
    let writers: Vec<_> = writes
        .into_iter()
        .map(|(guest_cluster, value)| {
            let image = image.clone();
            thread::spawn(move || {
                image
                    .write(
                        &[value; CLUSTER_BYTES],
                        guest_cluster * CLUSTER_BYTES as u64,
                    )
                    .unwrap()
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for (guest_cluster, value) in writes {
        assert_eq!(
            cluster_value(image, guest_cluster),
            value,
            "the write to guest cluster {guest_cluster} was lost"
        );
    }
    let mappings = data_mappings(image);
    let [(first, _), (second, _)] = writes;
    let host_of = |guest_cluster: u64| {
        mappings
            .get(&(guest_cluster * CLUSTER_BYTES as u64))
            .copied()
    };
    assert!(
        host_of(first).is_some() && host_of(second).is_some(),
        "a written cluster is unmapped: {mappings:?}"
    );
    assert_ne!(
        host_of(first),
        host_of(second),
        "two guest clusters got the same host cluster"
    );
}

// ---- write-back and eviction, through the whole image ------------------

/// A guest read during a flush sees every write that completed before it,
/// also when the read's own lookups push the L2 cache over its bound: the
/// tables the flush took for write-back are clean in the cache but not yet
/// on disk, and must not be evicted (and reloaded stale) until the backend
/// has them. The image is then clean.
#[test]
fn read_during_flush_sees_completed_writes() {
    check_model(|| {
        const TABLES_MAX: u64 = 4;
        let mut opts = OpenOptions::read_write();
        opts.cache_bytes_max = TABLES_MAX * CLUSTER_BYTES as u64;
        let range_bytes = L2_ENTRIES * CLUSTER_BYTES as u64;
        let (storage, image) = image_with((TABLES_MAX + 1) * range_bytes, opts);
        // The last range's table is on disk and out of the cache; ranges
        // 0..4 are written (dirty tables), range 0 least recently.
        image
            .write(&[0x44; CLUSTER_BYTES], TABLES_MAX * range_bytes)
            .unwrap();
        image.flush().unwrap();
        for range in 0..TABLES_MAX {
            image
                .write(&[0x10 + range as u8; CLUSTER_BYTES], range * range_bytes)
                .unwrap();
        }
        let image = Arc::new(image);
        let flusher = {
            let image = image.clone();
            thread::spawn(move || image.flush().unwrap())
        };
        let reader = {
            let image = image.clone();
            thread::spawn(move || {
                // A miss: the cache goes over its bound and the read evicts.
                assert_eq!(cluster_value(&image, TABLES_MAX * L2_ENTRIES), 0x44);
                assert_eq!(
                    cluster_value(&image, 0),
                    0x10,
                    "a read lost a completed write: its L2 table was evicted during the flush and reloaded stale"
                );
            })
        };
        flusher.join().unwrap();
        reader.join().unwrap();
        for range in 0..TABLES_MAX {
            assert_eq!(
                cluster_value(&image, range * L2_ENTRIES),
                0x10 + range as u8,
                "a completed write was lost after the flush"
            );
        }
        close_and_check(&storage, image);
    });
}

// ---- frees and flushes, through the whole image ------------------------

/// A guest read never returns another guest cluster's bytes: the cluster it
/// reads may be discarded and, after a flush, reused by a writer, but the
/// reader holds the L2 table's lock across its data read, so the free waits
/// for the read.
#[test]
fn reader_never_sees_a_reused_cluster() {
    check_model(|| {
        const OLD: u8 = 0xa1;
        const NEW: u8 = 0xb2;
        let (disk, image) = fresh_image();
        image.write(&[OLD; CLUSTER_BYTES], 0).unwrap();
        image.flush().unwrap();
        let old_host = data_mappings(&image)[&0];
        let image = Arc::new(image);
        let reader = {
            let image = image.clone();
            thread::spawn(move || {
                let value = cluster_value(&image, 0);
                assert!(
                    value == OLD || value == 0,
                    "a read of guest cluster 0 returned another cluster's bytes ({value:#x})"
                );
            })
        };
        let reuser = {
            let image = image.clone();
            thread::spawn(move || {
                image.discard(0, CLUSTER_BYTES as u64).unwrap();
                image.flush().unwrap();
                image
                    .write(&[NEW; CLUSTER_BYTES], CLUSTER_BYTES as u64)
                    .unwrap();
            })
        };
        reader.join().unwrap();
        reuser.join().unwrap();
        assert_eq!(cluster_value(&image, 0), 0);
        assert_eq!(cluster_value(&image, 1), NEW);
        // The model has teeth only if the freed cluster is the one reused.
        assert_eq!(
            data_mappings(&image).get(&(CLUSTER_BYTES as u64)),
            Some(&old_host),
            "the writer did not reuse the discarded cluster"
        );
        close_and_check(&disk, image);
    });
}

/// A flush returns only once every write that completed before it is
/// durable, also when it shares another thread's persist (the flush
/// coalescing of `op_gen` / `flushed_gen`): a power cut right after the
/// flush returns keeps the write.
#[test]
fn flush_makes_completed_writes_durable() {
    check_model(|| flushes_make_completed_writes_durable(fresh_image()));
}

/// The same on a journal image, where a flush whose write another thread's
/// persist already gathered and submitted does not gather at all: it
/// queues a flush-only ticket behind that transaction
/// (`Image::submit_flush_only`), which must not be durable before it.
#[test]
fn journal_flush_makes_completed_writes_durable() {
    check_model(|| {
        flushes_make_completed_writes_durable(image_created(
            CreateOptions {
                virtual_size: DISK_BYTES,
                cluster_size: CLUSTER_BYTES as u64,
                journal: Some(JournalConfig {
                    // The smallest journal: 8 clusters and 64 KiB.
                    size_bytes: (8 * CLUSTER_BYTES as u64 + (64 << 10)).next_multiple_of(4096),
                    ..JournalConfig::default()
                }),
                ..CreateOptions::default()
            },
            OpenOptions::read_write(),
        ))
    });
}

/// Two threads each write a cluster and flush; a power cut right after
/// either flush returns keeps that thread's write.
fn flushes_make_completed_writes_durable((disk, image): (std::sync::Arc<LoomDisk>, Image)) {
    {
        // The L2 table exists, so that each write is one allocation.
        image
            .write(&[9; CLUSTER_BYTES], 2 * CLUSTER_BYTES as u64)
            .unwrap();
        image.flush().unwrap();
        let image = Arc::new(image);
        let writers: Vec<_> = [(0u64, 0xa1u8), (1, 0xb2)]
            .into_iter()
            .map(|(guest_cluster, value)| {
                let (image, disk) = (image.clone(), disk.clone());
                thread::spawn(move || {
                    let offset = guest_cluster * CLUSTER_BYTES as u64;
                    image.write(&[value; CLUSTER_BYTES], offset).unwrap();
                    image.flush().unwrap();
                    // Power cut now: what is durable is consistent (leaks
                    // allowed: flush ordering may leave some) and holds the
                    // write.
                    let durable = disk.durable_copy();
                    let report = check(&durable, RepairMode::None, &[]).unwrap();
                    assert_eq!(
                        (report.corruptions, report.check_errors),
                        (0, 0),
                        "a power cut after a flush leaves a corrupt image: {:?}",
                        report.messages
                    );
                    let mut opts = OpenOptions::read_only();
                    opts.backing = BackingSource::Ignore;
                    let crashed = Image::open(std::sync::Arc::new(durable), &opts)
                        .expect("the durable image opens");
                    assert_eq!(
                        cluster_value(&crashed, guest_cluster),
                        value,
                        "a flush returned before the write that completed before it was durable"
                    );
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        close_and_check(&disk, image);
    }
}
