//! Background checkpoints (`OpenOptions::background_checkpoint`,
//! `backend/checkpointer.rs`): the image's own thread applies committed
//! transactions in place, so no guest flush waits for a checkpoint. What
//! must hold: the in-place writes come from that thread, not from the
//! flushers; every acknowledged write reads back, after a clean close and
//! after a crash (abandon); and a checkpoint that fails there fails the
//! next flush instead of going unnoticed.

mod common;

use common::{assert_engine_check_clean, pattern, read};

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// A disk that notes which threads wrote to it, can fail every write made
/// by the checkpoint thread, and can stage one race: armed, the checkpoint
/// thread's first write waits until the reader thread has read a table
/// from the disk, and that read returns only when the test releases it, so
/// the whole checkpoint falls between the reader's read and its look at
/// the journal's overlay.
#[derive(Debug, Default)]
struct WatchedDisk {
    inner: MemStorage,
    writers: Mutex<Vec<String>>,
    fail_checkpoint_writes: AtomicBool,
    race_armed: AtomicBool,
    checkpoint_waiting: AtomicBool,
    /// (reader has read, test released the reader)
    stage: Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl WatchedDisk {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn writes_by_checkpoint_thread(&self) -> usize {
        self.writers
            .lock()
            .unwrap()
            .iter()
            .filter(|w| *w == CHECKPOINT_THREAD)
            .count()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&(bool, bool)) -> bool) {
        let started = std::time::Instant::now();
        let mut stage = self.stage.lock().unwrap();
        while !done(&stage) {
            assert!(
                started.elapsed() < RACE_WAIT_MAX,
                "waited too long for {what}"
            );
            stage = self
                .changed
                .wait_timeout(stage, std::time::Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }
}

impl Storage for WatchedDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)?;
        let thread = std::thread::current().name().unwrap_or("").to_string();
        if self.race_armed.load(Ordering::SeqCst)
            && thread == READER_THREAD
            && buf.len() as u64 == SMALL_CLUSTER
            && !self.stage.lock().unwrap().0
        {
            self.stage.lock().unwrap().0 = true;
            self.changed.notify_all();
            self.wait_for("the test to release the reader", |s| s.1);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        if thread == CHECKPOINT_THREAD {
            if self.fail_checkpoint_writes.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            if self.race_armed.load(Ordering::SeqCst) {
                self.checkpoint_waiting.store(true, Ordering::SeqCst);
                self.wait_for("the reader to read the table", |s| s.0);
            }
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
    // The thread may not have run yet on a loaded machine, or may still be
    // inside its checkpoint: wait for it, bounded.
    let mut journal = image.info().unwrap().journal.unwrap();
    for _ in 0..SYNC_POLLS_MAX {
        if journal.synced_seq > synced_at_open && disk.writes_by_checkpoint_thread() > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        journal = image.info().unwrap().journal.unwrap();
    }
    assert!(
        disk.writes_by_checkpoint_thread() > 0,
        "no write came from the checkpoint thread"
    );
    assert!(
        journal.synced_seq > synced_at_open,
        "no checkpoint synced anything: {journal:?}"
    );
    assert_reads_back(&image, WRITES);
    image.close().unwrap();
    assert_engine_check_clean(&*storage);
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
    assert_engine_check_clean(&*storage);
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
    assert_engine_check_clean(&*storage);
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
    // Past WRITES (the thread not yet run on a loaded machine), the same
    // clusters again with the same bytes, 10 ms apart, bounded.
    for i in 0..WRITES + u64::from(SYNC_POLLS_MAX) {
        if i >= WRITES {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match write_flushed(&image, i % WRITES) {
            Ok(()) => acknowledged = (i + 1).min(WRITES),
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
    assert_engine_check_clean(&*storage);
}

/// The cluster size of the race test: small, so that its image has many
/// L2 tables and the cache (at least four tables) can lose one.
const SMALL_CLUSTER: u64 = 4096;
/// Guest bytes one L2 table maps at that cluster size.
const TABLE_SPAN: u64 = SMALL_CLUSTER / 8 * SMALL_CLUSTER;
/// The thread that reads the table the checkpoint races with.
const READER_THREAD: &str = "reader";
/// Bound of every wait in the race test.
const RACE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// A table read from the disk just before a checkpoint writes that table in
/// place and empties the journal's overlay must not come back without the
/// committed entries: the read must see the overlay of its own moment, or
/// read again (`JournalBackend::read_metadata`). Without that, the guest
/// read below returns zeros for a written, flushed cluster.
#[test]
fn a_table_read_across_a_checkpoint_keeps_its_committed_entries() {
    let disk = WatchedDisk::new();
    let storage: Arc<dyn Storage> = disk.clone();
    Image::create_shared(
        storage.clone(),
        &CreateOptions {
            virtual_size: 8 * TABLE_SPAN,
            cluster_size: SMALL_CLUSTER,
            journal: Some(JournalConfig {
                size_bytes: 1 << 20,
                two_flush: false,
                log_data: false,
                dedup: false,
            }),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // Table 0 in place, as a checkpoint at close leaves it.
    let image = open(&storage, false);
    image.write(&pattern(1, 4096), 0).unwrap();
    image.close().unwrap();

    let opts = OpenOptions {
        background_checkpoint: true,
        cache_bytes_max: 0,
        ..OpenOptions::read_write()
    };
    let image = Arc::new(Image::open(storage.clone(), &opts).unwrap());
    // A new entry in table 0, committed: in the journal's overlay only.
    let written = pattern(7, 4096);
    image.write(&written, SMALL_CLUSTER).unwrap();
    image.flush().unwrap();
    // Tables 1..=5 push table 0 out of the cache (it holds four).
    for table in 1..=5 {
        image.write(&pattern(2, 4096), table * TABLE_SPAN).unwrap();
        image.flush().unwrap();
    }
    // Commits until one asks the thread for a checkpoint (the ring at half).
    disk.race_armed.store(true, Ordering::SeqCst);
    let mut cluster = 1;
    while image.info().unwrap().journal.unwrap().used_percent < 50 {
        assert!(
            cluster < TABLE_SPAN / SMALL_CLUSTER,
            "the ring never filled"
        );
        image
            .write(&pattern(3, 4096), TABLE_SPAN + cluster * SMALL_CLUSTER)
            .unwrap();
        image.flush().unwrap();
        cluster += 1;
    }
    let started = std::time::Instant::now();
    while !disk.checkpoint_waiting.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < RACE_WAIT_MAX,
            "no background checkpoint started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let reader = {
        let image = Arc::clone(&image);
        std::thread::Builder::new()
            .name(READER_THREAD.into())
            .spawn(move || read(&image, SMALL_CLUSTER, 4096))
            .unwrap()
    };
    // The checkpoint goes on once the reader has read table 0; wait until
    // it synced everything, then (its last step) emptied the overlay.
    let started = std::time::Instant::now();
    loop {
        let journal = image.info().unwrap().journal.unwrap();
        if journal.synced_seq == journal.committed_seq {
            break;
        }
        assert!(
            started.elapsed() < RACE_WAIT_MAX,
            "the checkpoint never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    disk.stage.lock().unwrap().1 = true;
    disk.changed.notify_all();
    let got = reader.join().unwrap();
    assert!(
        got == written,
        "a committed L2 entry was lost: the flushed cluster reads {:02x?}..., not {:02x?}...",
        &got[..8],
        &written[..8]
    );
    disk.race_armed.store(false, Ordering::SeqCst);
    Arc::try_unwrap(image).unwrap().close().unwrap();
    assert_engine_check_clean(&*storage);
}
