//! Checkpoint (the draft's "sync"): apply committed transactions in place,
//! make that durable, then advance the header's synced sequence number and
//! free their ring space.

use qj_spec::journal::JournalHeader;

use crate::apply::{apply_transaction, merge_ranges, OverlayTarget};
use crate::error::JournalError;
use crate::journal::{Journal, LiveTx};
use crate::options::Mutation;
use crate::overlay::Overlay;
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
    /// Bytes written in place: the last version of each range, once (a
    /// range that several transactions wrote counts once).
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
        // The revoke table stays read-locked until the in-place writes are
        // issued: a commit carrying a revoke publishes it under the write
        // lock before returning, so a range is either skipped here or
        // reused by the caller only after these writes.
        let revokes = self.revokes.read();
        // The transactions are applied in order to an overlay, and only
        // its result reaches the device: each range once, with the bytes
        // of the last transaction that wrote it (jbd2 writes a buffer's
        // last version, too). A table sector that every commit changed is
        // written once per checkpoint, not once per commit. Which version
        // lands first does not matter: until the header below names
        // `last_seq` synced, replay re-applies all of these transactions
        // in order over whatever a crash left in place.
        let mut overlay = Overlay::new();
        for (seq, tx) in &batch {
            let mut target = OverlayTarget {
                storage: &self.storage,
                overlay: &mut overlay,
            };
            let applied = apply_transaction(&mut target, *seq, &tx.descriptors, &tx.data, &revokes)
                .map_err(|e| self.poison(e))?;
            report.bytes_revoked += applied.bytes_revoked;
            ranges.extend(applied.ranges);
        }
        report.bytes_written = self.write_in_place(&overlay).map_err(|e| self.poison(e))?;
        drop(revokes);
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

    /// Writes a checkpoint's overlay in place, in offset order, joining
    /// extents that touch into writes of up to [`IN_PLACE_WRITE_BYTES_MAX`]
    /// (an overlay keeps a range that later writes split as several
    /// extents). Returns the bytes written.
    fn write_in_place(&self, overlay: &Overlay) -> Result<u64, JournalError> {
        let mut written = 0;
        let mut pending: Option<(u64, Vec<u8>)> = None;
        let issue = |(offset, bytes): (u64, Vec<u8>)| {
            self.storage
                .write_at(&bytes, offset)
                .map_err(|e| JournalError::io("write", offset, e))
                .map(|()| bytes.len() as u64)
        };
        // Bounded by the overlay's extents.
        for (offset, bytes) in overlay.extents() {
            match &mut pending {
                Some((start, joined))
                    if *start + joined.len() as u64 == offset
                        && joined.len() + bytes.len() <= IN_PLACE_WRITE_BYTES_MAX =>
                {
                    joined.extend_from_slice(bytes);
                }
                _ => {
                    if let Some(done) = pending.replace((offset, bytes.to_vec())) {
                        written += issue(done)?;
                    }
                }
            }
        }
        if let Some(done) = pending {
            written += issue(done)?;
        }
        Ok(written)
    }
}

/// The largest in-place write a checkpoint joins from touching extents.
const IN_PLACE_WRITE_BYTES_MAX: usize = 1 << 20;
