//! I/O statistics in one shape for both backends, so the two can be
//! compared on the same work.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Live counters, shared by the image and its backend.
#[derive(Debug, Default)]
pub struct Counters {
    /// Device flushes (fdatasync) issued.
    pub flushes: AtomicU64,
    /// Metadata writes issued in place (tables, refcounts, header).
    pub metadata_writes: AtomicU64,
    /// Bytes of metadata written in place.
    pub metadata_bytes: AtomicU64,
    /// Bytes written to the journal ring.
    pub journal_bytes: AtomicU64,
    /// Guest data writes issued to the device (including copy-on-write).
    pub data_writes: AtomicU64,
    /// Bytes of guest data written to the device.
    pub data_bytes: AtomicU64,
    /// Guest operations served (read, write, zero, discard, flush).
    pub guest_ops: AtomicU64,
    /// Clusters allocated.
    pub clusters_allocated: AtomicU64,
    /// Clusters freed.
    pub clusters_freed: AtomicU64,
}

impl Counters {
    /// Counts one metadata write of `bytes` bytes.
    pub fn metadata_write(&self, bytes: usize) {
        self.metadata_writes.fetch_add(1, Relaxed);
        self.metadata_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts one guest data write of `bytes` bytes.
    pub fn data_write(&self, bytes: usize) {
        self.data_writes.fetch_add(1, Relaxed);
        self.data_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts one device flush.
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> Stats {
        Stats {
            flushes: self.flushes.load(Relaxed),
            metadata_writes: self.metadata_writes.load(Relaxed),
            metadata_bytes: self.metadata_bytes.load(Relaxed),
            journal_bytes: self.journal_bytes.load(Relaxed),
            data_writes: self.data_writes.load(Relaxed),
            data_bytes: self.data_bytes.load(Relaxed),
            guest_ops: self.guest_ops.load(Relaxed),
            clusters_allocated: self.clusters_allocated.load(Relaxed),
            clusters_freed: self.clusters_freed.load(Relaxed),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Device flushes issued.
    pub flushes: u64,
    /// Metadata writes issued in place.
    pub metadata_writes: u64,
    /// Bytes of metadata written in place.
    pub metadata_bytes: u64,
    /// Bytes written to the journal ring.
    pub journal_bytes: u64,
    /// Guest data writes issued.
    pub data_writes: u64,
    /// Bytes of guest data written.
    pub data_bytes: u64,
    /// Guest operations served.
    pub guest_ops: u64,
    /// Clusters allocated.
    pub clusters_allocated: u64,
    /// Clusters freed.
    pub clusters_freed: u64,
}

impl Stats {
    /// The change from `earlier` to `self`.
    #[must_use]
    pub fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            flushes: self.flushes - earlier.flushes,
            metadata_writes: self.metadata_writes - earlier.metadata_writes,
            metadata_bytes: self.metadata_bytes - earlier.metadata_bytes,
            journal_bytes: self.journal_bytes - earlier.journal_bytes,
            data_writes: self.data_writes - earlier.data_writes,
            data_bytes: self.data_bytes - earlier.data_bytes,
            guest_ops: self.guest_ops - earlier.guest_ops,
            clusters_allocated: self.clusters_allocated - earlier.clusters_allocated,
            clusters_freed: self.clusters_freed - earlier.clusters_freed,
        }
    }

    /// Bytes written to the device in total (data, metadata in place, journal).
    #[must_use]
    pub fn bytes_written(&self) -> u64 {
        self.data_bytes + self.metadata_bytes + self.journal_bytes
    }
}
