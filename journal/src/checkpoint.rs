//! Checkpoint (the draft's "sync"): apply committed transactions in place,
//! make that durable, then advance the header's synced sequence number and
//! free their ring space.

use qj_spec::journal::JournalHeader;

use crate::apply::{apply_transaction, merge_ranges, DeviceTarget};
use crate::error::JournalError;
use crate::journal::{Journal, LiveTx};
use crate::options::Mutation;
use crate::stats::Counters;
use crate::sync::Arc;
use crate::Storage;

/// What a checkpoint did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointReport {
    /// The synced sequence number afterwards.
    pub synced_seq: u64,
    /// Transactions applied.
    pub transactions: u64,
    /// Bytes written in place.
    pub bytes_written: u64,
    /// Bytes skipped because later transactions revoked them.
    pub bytes_revoked: u64,
    /// Target ranges written, merged, as (offset, length): the engine can
    /// mark the matching cache entries clean.
    pub ranges_written: Vec<(u64, u64)>,
    /// Device flushes issued (0 when there was nothing to sync, else 2).
    pub flushes: u64,
}

impl<S: Storage> Journal<S> {
    /// Applies every committed transaction to its targets and advances the
    /// synced sequence number, freeing their ring space. Commits may go on
    /// concurrently; they are synced by a later checkpoint.
    pub fn checkpoint(&self) -> Result<CheckpointReport, JournalError> {
        self.check_usable()?;
        let _checkpointing = self.checkpoint_lock.lock();
        self.checkpoint_locked()
    }

    /// [`Self::checkpoint`] unless one is running already (`None`): for a
    /// caller that only wants ring space or memory back, which the running
    /// one gives. Waiting for it instead, every committer that finds the
    /// ring past its threshold queues behind the running checkpoint's
    /// in-place writes, only to find little left to sync.
    pub fn try_checkpoint(&self) -> Option<Result<CheckpointReport, JournalError>> {
        if let Err(e) = self.check_usable() {
            return Some(Err(e));
        }
        let _checkpointing = self.checkpoint_lock.try_lock()?;
        Some(self.checkpoint_locked())
    }

    /// [`Self::checkpoint`] with the checkpoint lock held by the caller.
    pub(crate) fn checkpoint_locked(&self) -> Result<CheckpointReport, JournalError> {
        self.check_usable()?;
        let batch: Vec<(u64, Arc<LiveTx>)> = {
            let state = self.state.lock();
            state
                .ring
                .extents()
                .take_while(|e| e.committed)
                .map(|e| (e.seq, Arc::clone(&e.payload)))
                .collect()
        };
        let Some(last_seq) = batch.last().map(|(seq, _)| *seq) else {
            return Ok(CheckpointReport {
                synced_seq: self.synced_seq(),
                ..CheckpointReport::default()
            });
        };
        let flush_before_header = self.options.mutation != Mutation::CheckpointBeforeFlush;
        let mut report = CheckpointReport {
            synced_seq: last_seq,
            transactions: batch.len() as u64,
            flushes: if flush_before_header { 2 } else { 1 },
            ..CheckpointReport::default()
        };
        let mut ranges = Vec::new();
        for (seq, tx) in &batch {
            // The revoke table stays read-locked while this transaction's
            // writes are issued: a commit carrying a revoke publishes it
            // under the write lock before returning, so a range is either
            // skipped here or reused by the caller only after this write.
            let revokes = self.revokes.read();
            let mut target = DeviceTarget {
                storage: &self.storage,
            };
            let applied = apply_transaction(&mut target, *seq, &tx.descriptors, &tx.data, &revokes)
                .map_err(|e| self.poison(e))?;
            drop(revokes);
            report.bytes_written += applied.bytes_written;
            report.bytes_revoked += applied.bytes_revoked;
            ranges.extend(applied.ranges);
        }
        let region = self.region();
        // Ordering: the in-place writes must be durable before the header
        // says they are synced; after that header, replay no longer
        // re-applies these transactions. Skipping this flush is a
        // deliberate bug for the crash harness (never set otherwise): the
        // header may then become durable while the in-place writes are lost.
        if flush_before_header {
            region.flush().map_err(|e| self.poison(e))?;
        }
        {
            let mut header = self.header.lock();
            let tail_block = self.state.lock().ring.tail_after(last_seq);
            header.generation += 1;
            let advanced = JournalHeader {
                geometry: self.geometry,
                journal_id: self.journal_id,
                generation: header.generation,
                synced_seq: last_seq,
                tail_block,
            };
            // Ordering (inside): the header is durable before the ring
            // space it frees is reused; otherwise a crash could leave the
            // old header pointing at blocks already overwritten by newer
            // transactions, and replay would stop there and lose them.
            header.generation = region
                .publish_header(&advanced)
                .map_err(|e| self.poison(e))?;
        }
        {
            let mut state = self.state.lock();
            state.ring.release_through(last_seq);
            assert!(last_seq > state.synced_seq && last_seq <= state.committed_seq);
            state.synced_seq = last_seq;
            state.guards.forget_through(last_seq);
        }
        self.revokes.write().forget_through(last_seq);
        Counters::add(&self.counters.checkpoints, 1);
        Counters::add(&self.counters.checkpoint_flushes, report.flushes);
        report.ranges_written = merge_ranges(ranges);
        Ok(report)
    }
}
