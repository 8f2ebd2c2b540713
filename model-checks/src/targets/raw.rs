//! The raw target: the guest disk is the device. Correct by construction
//! (guest flush is device flush), so an exploration must find nothing; its
//! `skip-flush` mutation acknowledges flushes without flushing and must be
//! caught by check (c).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qj_journal::Storage;

use crate::target::{CheckSummary, CrashTarget, GuestDisk, TargetError};

/// Bytes moved per device request when copying or zeroing.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

/// Copies the first `len_bytes` of `backing` to `dev` at `dev_offset`.
pub(crate) fn copy_backing(
    backing: &dyn Storage,
    dev: &dyn Storage,
    len_bytes: u64,
    dev_offset: u64,
) -> Result<(), TargetError> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(CHUNK_BYTES as u64) as usize;
        backing.read_at(&mut buf[..n], done)?;
        dev.write_at(&buf[..n], dev_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

pub(crate) fn check_range(size_bytes: u64, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
    match offset.checked_add(len_bytes) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(TargetError::Invalid(format!(
            "request of {len_bytes} bytes at {offset} beyond the disk size {size_bytes}"
        ))),
    }
}

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawTarget {
    /// Mutation: `flush` returns without flushing the device.
    pub skip_flush: bool,
}

impl CrashTarget for RawTarget {
    fn name(&self) -> String {
        "raw".to_string()
    }

    fn mutation(&self) -> Option<String> {
        self.skip_flush.then(|| "skip-flush".to_string())
    }

    fn create(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        virtual_size_bytes: u64,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        dev.set_len(virtual_size_bytes)?;
        if let Some(backing) = backing {
            // A raw image has no backing chain: it starts as a copy.
            let len = backing.len()?.min(virtual_size_bytes);
            copy_backing(&*backing, &*dev, len, 0)?;
        }
        // create() must return a durable image.
        dev.flush()?;
        Ok(Box::new(RawDisk {
            dev,
            size_bytes: AtomicU64::new(virtual_size_bytes),
            skip_flush: self.skip_flush,
        }))
    }

    fn open(
        &self,
        dev: Arc<dyn Storage>,
        _backing: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        let size_bytes = dev.len()?;
        Ok(Box::new(RawDisk {
            dev,
            size_bytes: AtomicU64::new(size_bytes),
            skip_flush: self.skip_flush,
        }))
    }

    fn check(&self, _dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        // Raw has no metadata: nothing can be inconsistent.
        Ok(CheckSummary::default())
    }

    fn leaks_allowed(&self) -> bool {
        false
    }
}

struct RawDisk {
    dev: Arc<dyn Storage>,
    size_bytes: AtomicU64,
    skip_flush: bool,
}

impl GuestDisk for RawDisk {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, buf.len() as u64)?;
        Ok(self.dev.read_at(buf, offset)?)
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, buf.len() as u64)?;
        Ok(self.dev.write_at(buf, offset)?)
    }

    fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, len_bytes)?;
        let zeros = vec![0u8; CHUNK_BYTES];
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(CHUNK_BYTES as u64) as usize;
            self.dev.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        // Keeping the old content is a valid discard.
        check_range(self.size_bytes(), offset, len_bytes)
    }

    fn flush(&self) -> Result<(), TargetError> {
        if self.skip_flush {
            return Ok(());
        }
        Ok(self.dev.flush()?)
    }

    fn resize(&self, new_size_bytes: u64) -> Result<(), TargetError> {
        self.dev.set_len(new_size_bytes)?;
        // The size of a raw image is its length: make it durable at once so
        // that a later write inside the new area can never survive a crash
        // that the length change did not.
        self.dev.flush()?;
        self.size_bytes.store(new_size_bytes, Ordering::Release);
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<(), TargetError> {
        self.flush()
    }
}
