//! Verdicts of a read-only check, remembered with the bytes the check read.
//!
//! A check is a deterministic function of the bytes it reads: run on
//! another image that holds the same bytes everywhere the first run read,
//! it reads the same places and reaches the same verdict. The states of
//! one crash point mostly differ in a few sectors, often guest data that a
//! metadata check never reads, so most checks of a point can reuse an
//! earlier verdict after comparing the ranges it read (pages the images
//! share compare by pointer).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qj_journal::Storage;

use crate::medium::Medium;

/// Most verdicts remembered (the latest): bounds the memory and the
/// comparisons each lookup makes.
pub(crate) const ENTRIES_MAX: usize = 8;

/// Most read ranges one entry keeps: a check that reads more (a copy of
/// the whole device, in pieces) is not remembered.
const READS_MAX: usize = 4096;

/// One verdict and what it depended on.
struct Entry<T> {
    image: Medium,
    /// Byte ranges read, sorted and merged.
    reads: Vec<(u64, u64)>,
    value: T,
}

/// Verdicts of one check (one function of an image) and the reads behind
/// each.
pub(crate) struct CheckMemo<T> {
    entries: VecDeque<Entry<T>>,
}

impl<T: Clone> CheckMemo<T> {
    /// An empty memo.
    pub(crate) fn new() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }

    /// The verdict of `check` on `image`: an earlier one whose reads find
    /// the same bytes in `image`, or `check` run on a device holding
    /// `image` that records what it reads. Errors are not remembered, and
    /// neither is a run that wrote to the device (a check must not).
    pub(crate) fn run<E>(
        &mut self,
        image: &Medium,
        check: impl FnOnce(Arc<dyn Storage>) -> Result<T, E>,
    ) -> Result<T, E> {
        if let Some(entry) = self.entries.iter().find(|e| e.matches(image)) {
            return Ok(entry.value.clone());
        }
        let device = Arc::new(RecordingDevice::new(image.clone()));
        let value = check(device.clone())?;
        if let Some(reads) = device.reads() {
            if self.entries.len() >= ENTRIES_MAX {
                self.entries.pop_front();
            }
            self.entries.push_back(Entry {
                image: image.clone(),
                reads,
                value: value.clone(),
            });
        }
        Ok(value)
    }
}

impl<T> Entry<T> {
    fn matches(&self, image: &Medium) -> bool {
        image.len_bytes() == self.image.len_bytes()
            && self
                .reads
                .iter()
                .all(|&(offset, len)| image.same_range(&self.image, offset, len))
    }
}

/// A device over a medium that records every range read; writes go to the
/// medium but make the run unfit to remember.
struct RecordingDevice {
    medium: Mutex<Medium>,
    reads: Mutex<Vec<(u64, u64)>>,
    wrote: AtomicBool,
}

impl fmt::Debug for RecordingDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingDevice")
            .field("medium", &*self.medium.lock())
            .finish()
    }
}

impl RecordingDevice {
    fn new(medium: Medium) -> Self {
        Self {
            medium: Mutex::new(medium),
            reads: Mutex::new(Vec::new()),
            wrote: AtomicBool::new(false),
        }
    }

    /// The ranges read, sorted and merged; `None` if the device was
    /// written or too many ranges were read to be worth comparing.
    fn reads(&self) -> Option<Vec<(u64, u64)>> {
        if self.wrote.load(Ordering::Relaxed) {
            return None;
        }
        let mut reads = std::mem::take(&mut *self.reads.lock());
        if reads.len() > READS_MAX {
            return None;
        }
        reads.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(reads.len());
        for (offset, len) in reads {
            match merged.last_mut() {
                Some((start, merged_len)) if offset <= *start + *merged_len => {
                    *merged_len = (*merged_len).max(offset + len - *start);
                }
                _ => merged.push((offset, len)),
            }
        }
        Some(merged)
    }

    fn wrote(&self) {
        self.wrote.store(true, Ordering::Relaxed);
    }
}

impl Storage for RecordingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.medium.lock().read(buf, offset);
        self.reads.lock().push((offset, buf.len() as u64));
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.wrote();
        self.medium.lock().write(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        // The length is compared on every lookup: no need to record it.
        Ok(self.medium.lock().len_bytes())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.wrote();
        self.medium.lock().set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A check that reads the byte at 0 and, if it is odd, the byte at
    /// `far`: the verdict is the sum.
    fn sum_check(far: u64, runs: &Cell<u32>) -> impl Fn(Arc<dyn Storage>) -> io::Result<u64> + '_ {
        move |dev| {
            runs.set(runs.get() + 1);
            let mut byte = [0u8];
            dev.read_at(&mut byte, 0)?;
            let mut sum = u64::from(byte[0]);
            if byte[0] % 2 == 1 {
                dev.read_at(&mut byte, far)?;
                sum += u64::from(byte[0]);
            }
            Ok(sum)
        }
    }

    fn image(first: u8, far_byte: u8, far: u64, data_byte: u8) -> Medium {
        let mut m = Medium::from_bytes(&[0u8; 64 << 10]);
        m.write(&[first], 0).unwrap();
        m.write(&[far_byte], far).unwrap();
        // Bytes no check reads.
        m.write(&[data_byte; 512], 32 << 10).unwrap();
        m
    }

    #[test]
    fn reuses_a_verdict_only_where_every_byte_read_is_the_same() {
        let far = 40_000;
        let runs = Cell::new(0);
        let check = sum_check(far, &runs);
        let mut memo = CheckMemo::new();
        assert_eq!(memo.run(&image(1, 5, far, 0), &check).unwrap(), 6);
        // Only unread bytes differ: reused.
        assert_eq!(memo.run(&image(1, 5, far, 9), &check).unwrap(), 6);
        assert_eq!(runs.get(), 1);
        // A byte the first run read differs: run again.
        assert_eq!(memo.run(&image(1, 7, far, 0), &check).unwrap(), 8);
        assert_eq!(runs.get(), 2);
        // An even first byte: the far byte is not read, so it may differ.
        assert_eq!(memo.run(&image(2, 5, far, 0), &check).unwrap(), 2);
        assert_eq!(memo.run(&image(2, 200, far, 0), &check).unwrap(), 2);
        assert_eq!(runs.get(), 3);
        // Another length is another image.
        let mut longer = image(2, 5, far, 0);
        longer.set_len(128 << 10).unwrap();
        assert_eq!(memo.run(&longer, &check).unwrap(), 2);
        assert_eq!(runs.get(), 4);
    }

    #[test]
    fn a_check_that_writes_or_fails_is_not_remembered() {
        let runs = Cell::new(0);
        let mut memo: CheckMemo<u64> = CheckMemo::new();
        let writer = |dev: Arc<dyn Storage>| {
            runs.set(runs.get() + 1);
            dev.write_at(&[1], 0).map(|()| 0u64)
        };
        let img = image(0, 0, 100, 0);
        memo.run(&img, writer).unwrap();
        memo.run(&img, writer).unwrap();
        assert_eq!(runs.get(), 2);
        let failing = |_dev: Arc<dyn Storage>| -> io::Result<u64> {
            runs.set(runs.get() + 1);
            Err(io::Error::other("no"))
        };
        assert!(memo.run(&img, failing).is_err());
        assert!(memo.run(&img, failing).is_err());
        assert_eq!(runs.get(), 4);
    }

    #[test]
    fn reads_are_merged() {
        let dev = RecordingDevice::new(Medium::from_bytes(&[0u8; 4096]));
        let mut buf = [0u8; 100];
        dev.read_at(&mut buf, 200).unwrap();
        dev.read_at(&mut buf, 0).unwrap();
        dev.read_at(&mut buf, 100).unwrap();
        dev.read_at(&mut buf[..10], 250).unwrap();
        dev.read_at(&mut buf, 1000).unwrap();
        assert_eq!(dev.reads(), Some(vec![(0, 300), (1000, 100)]));
    }
}
