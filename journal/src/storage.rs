//! The storage layer: the one door through which every byte of the journal
//! and of the engine reaches a device.
//!
//! It is deliberately tiny (positioned read and write, flush, length) so that
//! the crash harness can put a simulated device with a volatile write cache
//! underneath and see every ordering decision the layers above make.
//!
//! Durability contract, relied on by every ordering rule in this project:
//! a write is durable only after a later [`Storage::flush`] has returned.
//! Before that, a power loss may keep any subset of unflushed writes, and
//! any subset of the 512-byte sectors of each of them.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::file_length::{Extending, FileLength};

/// A byte-addressed device with a volatile write cache.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`. Bytes at or past the end of the
    /// device read as zeros (a qcow2 file may legitimately end before the
    /// last cluster it maps, after a crash during growth).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the device if needed. Not
    /// durable until the next [`Storage::flush`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write that completed before this call durable
    /// (`fdatasync` on a file).
    fn flush(&self) -> io::Result<()>;

    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the device holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) the device to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Labels this point in the device's write log, for a device that keeps
    /// one (a dm-log-writes MARK: a replay tool can stop here); nothing
    /// otherwise. It has no effect on the content. It returns nothing: a
    /// log that fails to record a label fails every later write and flush,
    /// so the failure still reaches a caller that can report it.
    ///
    /// The label comes as format arguments, so that a device without a log
    /// costs no allocation on the commit path.
    fn mark(&self, _label: fmt::Arguments<'_>) {}

    /// How many writes of one batch of disjoint writes (a checkpoint's,
    /// `checkpoint.rs`) are worth having in flight at once. One, unless
    /// each write waits for the device itself (`O_DIRECT`): then one at a
    /// time leaves the device idle between them, and a checkpoint that
    /// falls behind the commits makes the engine write in place what it
    /// would have logged (`engine/src/backend/logged_data.rs`).
    fn concurrent_writes(&self) -> usize {
        1
    }
}

impl<T: Storage + ?Sized> Storage for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn mark(&self, label: fmt::Arguments<'_>) {
        (**self).mark(label);
    }
    fn concurrent_writes(&self) -> usize {
        (**self).concurrent_writes()
    }
}

impl<T: Storage + ?Sized> Storage for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn mark(&self, label: fmt::Arguments<'_>) {
        (**self).mark(label);
    }
    fn concurrent_writes(&self) -> usize {
        (**self).concurrent_writes()
    }
}

/// A regular file; flush is `fdatasync`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
    len: FileLength,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Self::from_file(file, writable)
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::from_file(file, true)
    }

    /// Wraps an already open file. Writable: this handle must be the only
    /// one that changes the file's length (its length is kept in memory).
    pub fn from_file(file: File, writable: bool) -> io::Result<Self> {
        let len = FileLength::of(&file, writable)?;
        Ok(Self {
            file,
            writable,
            len,
        })
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "storage opened read-only",
            ))
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                // End of file: the rest reads as zeros (see the trait contract).
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        // No reservation for a buffered file (`file_length.rs` says why).
        self.file.write_all_at(buf, offset)?;
        self.len.wrote(offset + buf.len() as u64, Extending::NOT);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.len.get(&self.file)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.len.set_len(len, || self.file.set_len(len))
    }
}

/// A device in memory whose writes are durable at once; for unit tests and
/// for in-memory images. The crash harness has its own device with a
/// volatile cache.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty device.
    pub fn new() -> Self {
        Self::default()
    }

    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(buf.len()).min(bytes.len());
        let n = end - start;
        buf[..n].copy_from_slice(&bytes[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let mut bytes = self.bytes.write();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        self.bytes.write().resize(len, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn Storage) {
        s.write_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut buf = [0xffu8; 8];
        s.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello\0\0\0", "bytes past the end read as zeros");
        s.set_len(12).unwrap();
        s.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"he\0\0\0\0\0\0");
        s.flush().unwrap();
    }

    #[test]
    fn mem_storage_reads_back_and_zero_fills() {
        exercise(&MemStorage::new());
    }

    #[test]
    fn file_storage_reads_back_and_zero_fills() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&FileStorage::create(&dir.path().join("f")).unwrap());
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        FileStorage::create(&path).unwrap();
        let ro = FileStorage::open(&path, false).unwrap();
        assert!(ro.write_at(b"x", 0).is_err());
        assert!(ro.set_len(1).is_err());
    }

    #[test]
    fn a_writable_file_knows_its_length_and_a_reader_sees_the_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 100]).unwrap();
        let file = FileStorage::open(&path, true).unwrap();
        let reader = FileStorage::open(&path, false).unwrap();
        let on_disk = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(file.len().unwrap(), 100, "from the file at open");
        file.write_at(b"x", 10).unwrap();
        assert_eq!((file.len().unwrap(), on_disk()), (100, 100));
        file.write_at(b"tail", 70_000).unwrap();
        assert_eq!(
            (file.len().unwrap(), on_disk()),
            (70_004, 70_004),
            "a buffered file reserves nothing past its length"
        );
        assert_eq!(reader.len().unwrap(), 70_004, "a reader asks the file");
        file.set_len(5_000).unwrap();
        assert_eq!((file.len().unwrap(), on_disk()), (5_000, 5_000));
        file.set_len(9_000).unwrap();
        assert_eq!((file.len().unwrap(), reader.len().unwrap()), (9_000, 9_000));
    }
}
