//! Failures of the disk (issue 12 item 6): a disk that fills up, and
//! flushes that fail. Whatever fails, the image afterwards has no
//! corruption; a journal image has no leak; and turning the journal on
//! leaves no leaked journal cluster however far it got.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};

const CLUSTER: u64 = 65536;
/// No capacity limit.
const UNLIMITED: u64 = u64::MAX;

/// No flush is set to fail.
const NO_FAILING_FLUSH: u32 = u32::MAX;

/// A disk of `capacity` bytes whose flush number `fail_flush` (counting
/// from 0 at the time it is set) fails with EIO.
#[derive(Debug)]
struct FailingDisk {
    inner: MemStorage,
    capacity: AtomicU64,
    fail_flush: AtomicU32,
}

impl FailingDisk {
    fn new(inner: MemStorage) -> Arc<Self> {
        Arc::new(Self {
            inner,
            capacity: AtomicU64::new(UNLIMITED),
            fail_flush: AtomicU32::new(NO_FAILING_FLUSH),
        })
    }

    fn room_for(&self, end: u64) -> io::Result<()> {
        if end > self.capacity.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

impl Storage for FailingDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.room_for(offset + buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        match self.fail_flush.load(Ordering::SeqCst) {
            NO_FAILING_FLUSH => {}
            0 => {
                self.fail_flush.store(NO_FAILING_FLUSH, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            n => self.fail_flush.store(n - 1, Ordering::SeqCst),
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.room_for(len)?;
        self.inner.set_len(len)
    }
}

/// A flush-ordering image of 64 MiB with 1 MiB of data, as bytes.
fn image_bytes() -> Vec<u8> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        virtual_size: 64 << 20,
        ..CreateOptions::default()
    };
    Image::create_shared(storage.clone(), &opts).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    image.write(&vec![0x5a; 1 << 20], 0).unwrap();
    image.close().unwrap();
    let mut bytes = vec![0u8; storage.len().unwrap() as usize];
    storage.read_at(&mut bytes, 0).unwrap();
    bytes
}

fn assert_clean(storage: &dyn Storage, leaks_allowed: bool, what: &str) -> u64 {
    let report = check(storage, RepairMode::None, &[]).unwrap();
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    assert_eq!(report.check_errors, 0, "{what}: {:?}", report.messages);
    if !leaks_allowed {
        assert_eq!(report.leaks, 0, "{what}: {:?}", report.messages);
    }
    report.leaks
}

#[test]
fn turning_the_journal_on_with_a_disk_filling_up_leaks_nothing() {
    let base = image_bytes();
    let journal = JournalConfig {
        size_bytes: 1 << 20,
        ..JournalConfig::default()
    };
    let (mut failed, mut succeeded) = (0, 0);
    // Every capacity from "no room at all" to "room for everything", in
    // steps finer than a cluster: the disk fills at every step of the way.
    let mut capacity = base.len() as u64;
    while capacity <= base.len() as u64 + (1 << 20) + 4 * CLUSTER {
        let disk = FailingDisk::new(MemStorage::from_bytes(base.clone()));
        disk.capacity.store(capacity, Ordering::SeqCst);
        let outcome = Image::enable_journal(disk.clone(), &journal);
        disk.capacity.store(UNLIMITED, Ordering::SeqCst);
        let what = format!("capacity {capacity}: {outcome:?}");
        // Counts past the end of the file are invisible to a check (QEMU's
        // too) until the file grows over them: grow it, so that a journal
        // region counted but never linked shows as the leak it is.
        let len = disk.len().unwrap();
        disk.set_len(len + (2 << 20)).unwrap();
        assert_clean(&*disk, false, &what);
        disk.set_len(len).unwrap();
        let header = Image::read_header(&*disk).unwrap();
        match outcome {
            Ok(()) => {
                succeeded += 1;
                assert!(header.journal().is_some(), "{what}");
            }
            Err(e) => {
                failed += 1;
                assert!(header.journal().is_none(), "{what}");
                assert!(e.to_string().contains("os error 28"), "{what}");
            }
        }
        // The guest data is intact either way.
        let image = Image::open(disk.clone(), &OpenOptions::read_only()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        image.read(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a), "{what}");
        capacity += 16 << 10;
    }
    assert!(
        failed > 0 && succeeded > 0,
        "{failed} failed, {succeeded} succeeded"
    );
}

/// A new, empty 64 MiB image (with a 1 MiB journal if asked) on a
/// failing disk without limits yet.
fn new_disk(journal: bool) -> Arc<FailingDisk> {
    let disk = FailingDisk::new(MemStorage::new());
    let opts = CreateOptions {
        virtual_size: 64 << 20,
        journal: journal.then(|| JournalConfig {
            size_bytes: 1 << 20,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    };
    Image::create_shared(disk.clone(), &opts).unwrap();
    disk
}

/// Writes until the disk (of `capacity` bytes) refuses, then reopens on
/// an unlimited disk and does more: the image has no corruption, and a
/// journal image no leak.
fn fill_up(journal: bool, capacity: u64) -> u64 {
    let disk = new_disk(journal);
    disk.capacity.store(capacity, Ordering::SeqCst);
    let image = Image::open(disk.clone(), &OpenOptions::read_write()).unwrap();
    // Bounded: 64 clusters at most, one flush each.
    for i in 0..64u64 {
        let ok = image.write(&[i as u8 + 1; 4096], i * CLUSTER).is_ok() && image.flush().is_ok();
        if !ok {
            break;
        }
    }
    image.abandon();
    disk.capacity.store(UNLIMITED, Ordering::SeqCst);
    let what = format!("journal {journal}, capacity {capacity}");
    let image = Image::open(disk.clone(), &OpenOptions::read_write()).expect(&what);
    image.write(&[0xee; 4096], 63 * CLUSTER).unwrap();
    image.close().unwrap();
    assert_clean(&*disk, !journal, &what)
}

#[test]
fn a_disk_that_fills_up_under_writes_corrupts_nothing() {
    for journal in [false, true] {
        let mut leaks_max = 0;
        for extra_kib in (0..1024).step_by(48) {
            let base = if journal { 1 << 20 } else { 0 } + 4 * CLUSTER;
            leaks_max = leaks_max.max(fill_up(journal, base + extra_kib * 1024));
        }
        if journal {
            assert_eq!(leaks_max, 0);
        }
    }
}

#[test]
fn a_failed_flush_loses_nothing_the_next_open_does_not_recover_cleanly() {
    for journal in [false, true] {
        for failing_flush in 0..4u32 {
            let disk = new_disk(journal);
            let image = Image::open(disk.clone(), &OpenOptions::read_write()).unwrap();
            image.write(&[1; 4096], 0).unwrap();
            image.flush().unwrap();
            // Flush number `failing_flush` of the next persist fails.
            image.write(&[2; 4096], CLUSTER).unwrap();
            disk.fail_flush.store(failing_flush, Ordering::SeqCst);
            let flushed = image.flush();
            disk.fail_flush.store(NO_FAILING_FLUSH, Ordering::SeqCst);
            // A failed flush poisons the image: later writes are refused
            // rather than built on a state the disk may not have.
            if flushed.is_err() {
                assert!(image.write(&[3; 512], 2 * CLUSTER).is_err());
            }
            image.abandon();
            let what = format!("journal {journal}, flush {failing_flush}: {flushed:?}");
            let image = Image::open(disk.clone(), &OpenOptions::read_write()).expect(&what);
            let mut buf = vec![0u8; 4096];
            image.read(&mut buf, 0).unwrap();
            assert!(
                buf.iter().all(|&b| b == 1),
                "{what}: a flushed write was lost"
            );
            image.close().unwrap();
            assert_clean(&*disk, !journal, &what);
        }
    }
}
