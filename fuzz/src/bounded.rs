//! A device in memory with a capacity: the whole-image target's storage.
//!
//! A fuzzed header can make a repair extend the file to gigabytes (a
//! refcount block "outside the image" is repaired by growing the file to
//! it, as QEMU does); in a sparse file that costs nothing, in memory it
//! costs seconds per input. A full device is also a real condition, so
//! refusing to grow past the capacity (ENOSPC) exercises the engine's
//! error paths instead of hiding them.

use std::io;

use qj_engine::{MemStorage, Storage};

/// Largest device the whole-image target gives the engine.
pub const DEVICE_BYTES_MAX: u64 = 16 << 20;

/// [`MemStorage`] that refuses to grow past `DEVICE_BYTES_MAX`.
#[derive(Debug)]
pub struct BoundedStorage {
    inner: MemStorage,
}

impl BoundedStorage {
    /// A device holding `bytes` (which may exceed the capacity: it only
    /// bounds growth).
    #[must_use]
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            inner: MemStorage::from_bytes(bytes),
        }
    }

    /// A copy of the whole content.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }

    fn fits(&self, end: Option<u64>) -> io::Result<()> {
        match end {
            Some(end) if end <= DEVICE_BYTES_MAX.max(self.inner.len()?) => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the fuzzing device holds at most {DEVICE_BYTES_MAX} bytes"),
            )),
        }
    }
}

impl Storage for BoundedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fits(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fits(Some(len))?;
        self.inner.set_len(len)
    }
}
