//! Counters the journal keeps, to measure flushes per commit and batching.

use crate::sync::{AtomicU64, Ordering};

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalStats {
    /// Transactions committed.
    pub commits: u64,
    /// Group-commit batches (each batch is one leader's turn).
    pub batches: u64,
    /// Device flushes issued by commits.
    pub commit_flushes: u64,
    /// Checkpoints that synced something.
    pub checkpoints: u64,
    /// Device flushes issued by checkpoints (and by header rewinds).
    pub checkpoint_flushes: u64,
    /// Ring blocks written by commits (padding included).
    pub blocks_written: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub commit_flushes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_flushes: AtomicU64,
    pub blocks_written: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, batches: u64) -> JournalStats {
        JournalStats {
            commits: self.commits.load(Ordering::Relaxed),
            batches,
            commit_flushes: self.commit_flushes.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            checkpoint_flushes: self.checkpoint_flushes.load(Ordering::Relaxed),
            blocks_written: self.blocks_written.load(Ordering::Relaxed),
        }
    }
}
