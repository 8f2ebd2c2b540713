//! Background checkpoints (`OpenOptions::background_checkpoint`,
//! `backend/checkpointer.rs`): the image's own thread applies committed
//! transactions in place, so no guest flush waits for a checkpoint. What
//! must hold: the in-place writes come from that thread, not from the
//! flushers; every acknowledged write reads back, after a clean close and
//! after a crash (abandon); and a checkpoint that fails there fails the
//! next flush instead of going unnoticed.

mod common;

use common::{pattern, read};

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

const CLUSTER: u64 = 64 << 10;
/// The name `JournalBackend` gives its checkpoint thread.
const CHECKPOINT_THREAD: &str = "qj-checkpoint";
/// Clusters written, each flushed: with a 1 MiB ring and logged data,
/// several checkpoints' worth.
const WRITES: u64 = 200;
/// How many times (10 ms apart) a test looks for the thread's checkpoint
/// to have finished: 10 s.
const SYNC_POLLS_MAX: u32 = 1000;

/// A disk that notes which threads wrote to it, and that can fail every
/// write made by the checkpoint thread.
#[derive(Debug)]
struct WatchedDisk {
    inner: MemStorage,
    writers: Mutex<Vec<String>>,
    fail_checkpoint_writes: AtomicBool,
}

impl WatchedDisk {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemStorage::new(),
            writers: Mutex::new(Vec::new()),
            fail_checkpoint_writes: AtomicBool::new(false),
        })
    }

    fn writes_by_checkpoint_thread(&self) -> usize {
        self.writers
            .lock()
            .unwrap()
            .iter()
            .filter(|w| *w == CHECKPOINT_THREAD)
            .count()
    }
}

impl Storage for WatchedDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        if thread == CHECKPOINT_THREAD && self.fail_checkpoint_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.writers.lock().unwrap().push(thread);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn create(storage: &Arc<dyn Storage>) {
    Image::create_shared(
        storage.clone(),
        &CreateOptions {
            virtual_size: 64 << 20,
            cluster_size: CLUSTER,
            journal: Some(JournalConfig {
                size_bytes: 1 << 20,
                two_flush: false,
                log_data: true,
                dedup: false,
            }),
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn open(storage: &Arc<dyn Storage>, background_checkpoint: bool) -> Image {
    let opts = OpenOptions {
        background_checkpoint,
        ..OpenOptions::read_write()
    };
    Image::open(storage.clone(), &opts).unwrap()
}

fn assert_clean(storage: &dyn Storage) {
    let report = check(storage, RepairMode::None, &[]).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:?}",
        report.messages
    );
}

/// 4 KiB into cluster `i` (a fresh cluster each: logged data), flushed.
fn write_flushed(image: &Image, i: u64) -> io::Result<()> {
    image
        .write(&pattern(i as u8, 4096), i * CLUSTER)
        .and_then(|()| image.flush())
        .map_err(|e| io::Error::other(e.to_string()))
}

fn assert_reads_back(image: &Image, writes: u64) {
    for i in 0..writes {
        assert_eq!(
            read(image, i * CLUSTER, 4096),
            pattern(i as u8, 4096),
            "cluster {i}"
        );
    }
}

#[test]
fn checkpoints_run_on_their_own_thread_and_every_flushed_write_reads_back() {
    let disk = WatchedDisk::new();
    let storage: Arc<dyn Storage> = disk.clone();
    create(&storage);
    let image = open(&storage, true);
    let synced_at_open = image.info().unwrap().journal.unwrap().synced_seq;
    for i in 0..WRITES {
        write_flushed(&image, i).unwrap();
    }
    assert!(
        disk.writes_by_checkpoint_thread() > 0,
        "no write came from the checkpoint thread"
    );
    // The thread may still be inside its checkpoint: wait for it, bounded.
    let mut journal = image.info().unwrap().journal.unwrap();
    for _ in 0..SYNC_POLLS_MAX {
        if journal.synced_seq > synced_at_open {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        journal = image.info().unwrap().journal.unwrap();
    }
    assert!(
        journal.synced_seq > synced_at_open,
        "no checkpoint synced anything: {journal:?}"
    );
    assert_reads_back(&image, WRITES);
    image.close().unwrap();
    assert_clean(&*storage);
    let image = open(&storage, false);
    assert_reads_back(&image, WRITES);
    image.close().unwrap();
}

#[test]
fn without_the_option_flushers_make_the_checkpoints() {
    let disk = WatchedDisk::new();
    let storage: Arc<dyn Storage> = disk.clone();
    create(&storage);
    let image = open(&storage, false);
    for i in 0..WRITES {
        write_flushed(&image, i).unwrap();
    }
    assert_eq!(disk.writes_by_checkpoint_thread(), 0);
    assert!(image.info().unwrap().journal.unwrap().synced_seq > 0);
    image.close().unwrap();
    assert_clean(&*storage);
}

#[test]
fn a_crash_while_the_thread_runs_keeps_every_flushed_write() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    create(&storage);
    let image = open(&storage, true);
    for i in 0..WRITES {
        write_flushed(&image, i).unwrap();
    }
    // As a kill would: nothing written back, the thread stopped.
    image.abandon();
    let image = open(&storage, false);
    assert_reads_back(&image, WRITES);
    image.close().unwrap();
    assert_clean(&*storage);
}

#[test]
fn a_failed_background_checkpoint_fails_a_later_flush_and_loses_nothing_acknowledged() {
    let disk = WatchedDisk::new();
    let storage: Arc<dyn Storage> = disk.clone();
    create(&storage);
    let image = open(&storage, true);
    disk.fail_checkpoint_writes.store(true, Ordering::SeqCst);
    let mut acknowledged = 0;
    let mut failure = None;
    for i in 0..WRITES {
        match write_flushed(&image, i) {
            Ok(()) => acknowledged = i + 1,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let failure = failure.expect("a flush must fail once a background checkpoint failed");
    // Whichever refuses first (the journal, stopped by the failed
    // checkpoint, or the backend, which kept the thread's error), the
    // message names the device's error.
    assert!(
        failure.contains("Input/output error"),
        "the error names the failure: {failure}"
    );
    // Once failed, the image stays refused.
    assert!(write_flushed(&image, WRITES).is_err());
    drop(image);
    disk.fail_checkpoint_writes.store(false, Ordering::SeqCst);
    let image = open(&storage, false);
    assert_reads_back(&image, acknowledged);
    image.close().unwrap();
    assert_clean(&*storage);
}
