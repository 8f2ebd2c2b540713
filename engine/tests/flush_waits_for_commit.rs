//! A flush with nothing left to gather still waits for the commit that
//! carries its writes. Two NBD connections, say: A writes a new cluster and
//! flushes, and A's persist gathers the L2 entry and starts committing; B
//! flushes while A's commit is in flight and finds an empty epoch. B's
//! flush must not return before A's transaction is durable, or a crash
//! right after B's acknowledgment loses a write B was told is durable (it
//! did so when an empty epoch meant "flush the file and return").

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

const CLUSTER: u64 = 65536;

/// Memory whose next flush, once armed, holds until the test opens it.
#[derive(Debug)]
struct GatedFlushDisk {
    inner: MemStorage,
    armed: AtomicBool,
    entered: SyncSender<()>,
    open: Mutex<Receiver<()>>,
}

impl Storage for GatedFlushDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered
                .send(())
                .expect("the test waits for the held flush");
            self.open
                .lock()
                .unwrap()
                .recv()
                .expect("the test opens the held flush");
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn a_flush_with_an_empty_epoch_returns_after_the_commit_in_flight() {
    for journal in [true, false] {
        flush_with_an_empty_epoch_waits(journal);
    }
}

/// The scenario on a journal image, or on flush ordering (whose submit
/// flushes in order under the image's submit lock).
fn flush_with_an_empty_epoch_waits(journal: bool) {
    let (entered_tx, entered_rx) = sync_channel(1);
    let (open_tx, open_rx) = channel();
    let disk = Arc::new(GatedFlushDisk {
        inner: MemStorage::new(),
        armed: AtomicBool::new(false),
        entered: entered_tx,
        open: Mutex::new(open_rx),
    });
    let opts = CreateOptions {
        virtual_size: 64 << 20,
        journal: journal.then(|| JournalConfig {
            size_bytes: 1 << 20,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    };
    Image::create_shared(disk.clone(), &opts).unwrap();
    let image = Image::open(disk.clone(), &OpenOptions::read_write()).unwrap();
    // The first commit also writes the journal-dirty bit: get it done.
    image.write(&[1; 4096], 5 * CLUSTER).unwrap();
    image.flush().unwrap();

    // Order of events, to compare without timing anything.
    let clock = AtomicU64::new(0);
    let (mut released_at, mut b_returned_at) = (0, 0);
    std::thread::scope(|s| {
        let image = &image;
        disk.armed.store(true, Ordering::SeqCst);
        let a = s.spawn(move || {
            image.write(&[2; 4096], 0).unwrap();
            image.flush().unwrap();
        });
        // A's commit is written and its flush is held.
        entered_rx.recv().unwrap();
        let b = s.spawn(|| {
            image.flush().unwrap();
            clock.fetch_add(1, Ordering::SeqCst)
        });
        // A wrong B returns while A's flush is held; give it the time to
        // (this only makes a wrong B likelier to be caught: a right B
        // waits whatever the schedule).
        std::thread::sleep(Duration::from_millis(50));
        released_at = clock.fetch_add(1, Ordering::SeqCst);
        open_tx.send(()).unwrap();
        a.join().unwrap();
        b_returned_at = b.join().unwrap();
    });
    assert!(
        b_returned_at > released_at,
        "B's flush returned before A's commit was durable (journal: {journal})"
    );
    let mut buf = [0u8; 4096];
    image.read(&mut buf, 0).unwrap();
    assert_eq!(buf, [2; 4096]);
    image.close().unwrap();
}
