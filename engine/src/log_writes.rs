//! A [`Storage`] that records every write, flush and length change reaching
//! the image file, in issue order, as a dm-log-writes log (the format of
//! Linux's dm-log-writes target and QEMU's `blklogwrites` filter, in
//! `qj_spec::log_writes`), so that external crash-replay tools and
//! `qj crash replay` can explore the crash states of a real run.
//!
//! What the log holds:
//! - a write: the 512-byte sectors it covers, as they are on the device
//!   right after it (a write that is not sector-aligned is logged as its
//!   whole covering sectors, read back from the device);
//! - a flush: a FLUSH entry after the device flush returned, and then the
//!   super block's `nr_entries` is brought up to date and the log synced
//!   (as QEMU does: entries after the last flush are not part of the log
//!   if the writer dies);
//! - a length change: a growth is a discard of the new sectors (they read
//!   as zeros), a truncation a discard of the sectors cut off, after the
//!   sector the new end falls in (logged as a write);
//! - [`Storage::mark`]: a MARK entry carrying the label (guest operations,
//!   journal commits).
//!
//! Every operation holds one lock across the device operation and the log
//! append, so the log order is the order in which the device saw them. A
//! log append that fails poisons the log: every later write, flush and
//! length change fails, so no write reaches the image unlogged.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use qj_journal::Storage;
use qj_spec::log_writes::{LogEntry, LogSuper, ENTRY_BYTES};

/// Log sector size: the guest sector size of every consumer we know (QEMU
/// logs with `log-sector-size=512`, replay tools check 512-byte sectors).
pub const LOG_SECTOR_BYTES: u32 = 512;

const SECTOR: u64 = LOG_SECTOR_BYTES as u64;

/// Longest label kept; longer ones are cut at a character boundary.
pub const LABEL_BYTES_MAX: usize = LOG_SECTOR_BYTES as usize - ENTRY_BYTES;

#[derive(Debug)]
struct LogState {
    file: File,
    /// Next free log sector.
    next_sector: u64,
    /// Entries written so far.
    nr_entries: u64,
    /// Why the log stopped recording, if it did.
    poisoned: Option<String>,
}

impl LogState {
    fn check(&self) -> io::Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(io::Error::other(format!(
                "the write log failed earlier ({why}); refusing to write unlogged"
            ))),
        }
    }

    fn append(&mut self, header_sector: &[u8], data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len() as u64 % SECTOR, 0);
        let at = self.next_sector * SECTOR;
        let result = self
            .file
            .write_all_at(header_sector, at)
            .and_then(|()| self.file.write_all_at(data, at + SECTOR));
        if let Err(e) = result {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.next_sector += 1 + data.len() as u64 / SECTOR;
        self.nr_entries += 1;
        Ok(())
    }

    fn entry(&mut self, entry: LogEntry, data: &[u8]) -> io::Result<()> {
        let header = entry
            .encode(&[], LOG_SECTOR_BYTES)
            .map_err(io::Error::other)?;
        self.append(&header, data)
    }

    /// Brings `nr_entries` in the super block up to date and syncs the log.
    fn publish(&mut self) -> io::Result<()> {
        let sector = LogSuper {
            nr_entries: self.nr_entries,
            sector_bytes: LOG_SECTOR_BYTES,
        }
        .encode();
        let result = self
            .file
            .write_all_at(&sector, 0)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = &result {
            self.poisoned = Some(e.to_string());
        }
        result
    }
}

/// A device whose every change is also appended to a dm-log-writes log.
#[derive(Debug)]
pub struct LogWritesStorage {
    inner: Arc<dyn Storage>,
    log: Mutex<LogState>,
}

impl LogWritesStorage {
    /// Logs every change to `inner` into a new log at `log_path` (created,
    /// or truncated if it exists). The log starts empty: replay it on a copy
    /// of the device as it is now.
    pub fn create(inner: Arc<dyn Storage>, log_path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(log_path)?;
        let mut state = LogState {
            file,
            next_sector: 1,
            nr_entries: 0,
            poisoned: None,
        };
        state.publish()?;
        Ok(Self {
            inner,
            log: Mutex::new(state),
        })
    }

    /// Logs `[first_sector, end_sector)` as a write of what the device holds
    /// there now.
    fn log_sectors(
        &self,
        log: &mut LogState,
        first_sector: u64,
        end_sector: u64,
    ) -> io::Result<()> {
        let bytes = usize::try_from((end_sector - first_sector) * SECTOR)
            .map_err(|_| io::Error::other("write too large to log"))?;
        let mut data = vec![0u8; bytes];
        self.inner.read_at(&mut data, first_sector * SECTOR)?;
        log.entry(
            LogEntry::write(first_sector, end_sector - first_sector),
            &data,
        )
    }
}

impl Storage for LogWritesStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        log.check()?;
        self.inner.write_at(buf, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::other("write range overflows"))?;
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            // The common case: log the caller's bytes, no read-back.
            return log.entry(
                LogEntry::write(offset / SECTOR, buf.len() as u64 / SECTOR),
                buf,
            );
        }
        self.log_sectors(&mut log, offset / SECTOR, end.div_ceil(SECTOR))
    }

    fn flush(&self) -> io::Result<()> {
        let mut log = self.log.lock();
        log.check()?;
        self.inner.flush()?;
        log.entry(LogEntry::flush(), &[])?;
        log.publish()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut log = self.log.lock();
        log.check()?;
        let old = self.inner.len()?;
        self.inner.set_len(len)?;
        let (old_end, new_end) = (old.div_ceil(SECTOR), len.div_ceil(SECTOR));
        if len > old {
            if new_end > old_end {
                log.entry(LogEntry::discard(old_end, new_end - old_end), &[])?;
            }
            return Ok(());
        }
        if !len.is_multiple_of(SECTOR) && len < old {
            // The bytes after the new end in its last sector now read as
            // zeros.
            self.log_sectors(&mut log, len / SECTOR, new_end)?;
        }
        if old_end > new_end {
            log.entry(LogEntry::discard(new_end, old_end - new_end), &[])?;
        }
        Ok(())
    }

    fn mark(&self, label: std::fmt::Arguments<'_>) {
        let label = label.to_string();
        let mut cut = label.len().min(LABEL_BYTES_MAX);
        while !label.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut log = self.log.lock();
        if log.check().is_err() {
            return;
        }
        let header = match LogEntry::encode_mark(&label[..cut], LOG_SECTOR_BYTES) {
            Ok(header) => header,
            Err(e) => {
                log.poisoned = Some(e.to_string());
                return;
            }
        };
        // A failure poisons the log: the next write or flush reports it.
        let _ = log.append(&header, &[]);
    }
}

impl Drop for LogWritesStorage {
    fn drop(&mut self) {
        let log = self.log.get_mut();
        if log.poisoned.is_none() {
            // Count the entries after the last flush too: the writer ended
            // cleanly. Nothing can report a failure here; the log then
            // simply ends at the last flush, which is a valid log.
            let _ = log.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qj_journal::MemStorage;
    use qj_spec::log_writes::{decode_log, EntryKind};

    fn logged(ops: impl FnOnce(&LogWritesStorage)) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let device = Arc::new(MemStorage::new());
        let storage = LogWritesStorage::create(device.clone(), &path).unwrap();
        ops(&storage);
        drop(storage);
        (std::fs::read(&path).unwrap(), device.to_bytes())
    }

    /// Replays a decoded log onto a zeroed device of the same length.
    fn replay(log: &[u8], len: usize) -> Vec<u8> {
        let decoded = decode_log(log).unwrap();
        let mut device = vec![0u8; len];
        for entry in &decoded.entries {
            let at = entry.device_offset(512) as usize;
            let n = entry.device_len(512) as usize;
            if device.len() < at + n {
                device.resize(at + n, 0);
            }
            match entry.kind {
                EntryKind::Write { .. } => {
                    device[at..at + n].copy_from_slice(&log[entry.data.clone()]);
                }
                EntryKind::Discard => device[at..at + n].fill(0),
                EntryKind::Flush | EntryKind::Mark => {}
            }
        }
        device
    }

    #[test]
    fn writes_flushes_and_marks_are_logged_in_order() {
        let (log, device) = logged(|s| {
            s.write_at(&[1u8; 1024], 512).unwrap();
            s.mark(format_args!("op 1 write 0x200+1024"));
            s.flush().unwrap();
            s.write_at(&[2u8; 10], 700).unwrap();
        });
        let decoded = decode_log(&log).unwrap();
        let kinds: Vec<String> = decoded.entries.iter().map(ToString::to_string).collect();
        assert_eq!(
            kinds,
            [
                "write sectors 1+2",
                "mark \"op 1 write 0x200+1024\"",
                "flush",
                "write sectors 1+1"
            ]
        );
        assert_eq!(&replay(&log, 0)[..device.len()], &device[..]);
    }

    #[test]
    fn nr_entries_is_current_at_each_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let storage = LogWritesStorage::create(Arc::new(MemStorage::new()), &path).unwrap();
        storage.write_at(&[1u8; 512], 0).unwrap();
        storage.flush().unwrap();
        storage.write_at(&[2u8; 512], 512).unwrap();
        // The writer has not ended: the entry after the flush is not
        // counted yet, as in a log whose writer died.
        let log = std::fs::read(&path).unwrap();
        assert_eq!(decode_log(&log).unwrap().entries.len(), 2);
        drop(storage);
        let log = std::fs::read(&path).unwrap();
        assert_eq!(decode_log(&log).unwrap().entries.len(), 3);
    }

    #[test]
    fn length_changes_replay_to_the_same_bytes() {
        let (log, device) = logged(|s| {
            s.write_at(&[3u8; 4096], 0).unwrap();
            s.set_len(8192).unwrap();
            s.write_at(&[4u8; 512], 8192).unwrap();
            s.set_len(1000).unwrap();
            s.set_len(3000).unwrap();
        });
        let replayed = replay(&log, 0);
        assert_eq!(&replayed[..device.len()], &device[..]);
        assert!(replayed[device.len()..].iter().all(|&b| b == 0));
        // No entry is empty: the same length again logs nothing.
        let (log, _) = logged(|s| s.set_len(0).unwrap());
        assert!(decode_log(&log).unwrap().entries.is_empty());
    }

    #[test]
    fn long_labels_are_cut_to_fit_the_sector() {
        let (log, _) = logged(|s| s.mark(format_args!("{}", "é".repeat(400))));
        let decoded = decode_log(&log).unwrap();
        assert_eq!(decoded.entries[0].label.len(), 480);
    }
}
