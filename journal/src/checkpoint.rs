//! Checkpoint (the draft's "sync"): apply committed transactions in place,
//! make that durable, then advance the header's synced sequence number and
//! free their ring space.

use qj_spec::journal::JournalHeader;

use crate::apply::{apply_transaction, merge_ranges, ApplyTarget, OverlayTarget};
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
    /// Bytes written in place: the last version of each range, once per
    /// overlay (a range that several transactions wrote counts once, unless
    /// the overlay was written out between them).
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
        let mut target = CoalescingTarget::new(&self.storage, OVERLAY_BYTES_MAX);
        for (seq, tx) in &batch {
            let applied = apply_transaction(&mut target, *seq, &tx.descriptors, &tx.data, &revokes)
                .map_err(|e| self.poison(e))?;
            report.bytes_revoked += applied.bytes_revoked;
            ranges.extend(applied.ranges);
        }
        target.spill().map_err(|e| self.poison(e))?;
        report.bytes_written = target.written_bytes;
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
}

/// Most bytes a checkpoint's overlay holds before it is written in place
/// and started again. Copies make the bound needed: a copy descriptor
/// takes 24 bytes of the ring but puts its whole target (up to a cluster)
/// in the overlay. Writing part of the batch early changes nothing: the
/// overlay is applied in order, and a crash before the header is replayed
/// from the start of the batch either way.
const OVERLAY_BYTES_MAX: u64 = 64 << 20;

/// The largest in-place write a checkpoint joins from touching extents
/// (an overlay keeps a range that later writes split as several): large
/// enough that a table or a logged cluster goes as one write, small
/// enough that the joining buffer stays a small share of the overlay.
const IN_PLACE_WRITE_BYTES_MAX: usize = 1 << 20;

/// Where a checkpoint applies its batch: an overlay over the device,
/// written in place when it has taken more than `held_bytes_max` and at
/// the end.
struct CoalescingTarget<'a, S: Storage> {
    storage: &'a S,
    overlay: Overlay,
    /// Bytes written into the overlay since it was last written in place:
    /// at least what it holds.
    held_bytes: u64,
    /// [`OVERLAY_BYTES_MAX`] (smaller in tests).
    held_bytes_max: u64,
    /// Bytes written in place so far.
    written_bytes: u64,
}

impl<'a, S: Storage> CoalescingTarget<'a, S> {
    fn new(storage: &'a S, held_bytes_max: u64) -> Self {
        Self {
            storage,
            overlay: Overlay::new(),
            held_bytes: 0,
            held_bytes_max,
            written_bytes: 0,
        }
    }

    /// Writes the overlay in place, in offset order, touching extents
    /// joined into writes of up to [`IN_PLACE_WRITE_BYTES_MAX`], and starts
    /// an empty one.
    fn spill(&mut self) -> Result<(), JournalError> {
        let overlay = std::mem::take(&mut self.overlay);
        self.held_bytes = 0;
        let extents: Vec<(u64, &[u8])> = overlay.extents().collect();
        let mut first = 0;
        // Bounded by the extents: each round writes at least one.
        while first < extents.len() {
            let (offset, bytes) = extents[first];
            let mut end = first + 1;
            let mut joined_len = bytes.len();
            while let Some(&(next, next_bytes)) = extents.get(end) {
                let touches = offset + joined_len as u64 == next;
                if !touches || joined_len + next_bytes.len() > IN_PLACE_WRITE_BYTES_MAX {
                    break;
                }
                joined_len += next_bytes.len();
                end += 1;
            }
            let write = |buf: &[u8]| {
                self.storage
                    .write_at(buf, offset)
                    .map_err(|e| JournalError::io("write", offset, e))
            };
            if end == first + 1 {
                write(bytes)?;
            } else {
                write(
                    &extents[first..end]
                        .iter()
                        .flat_map(|(_, b)| b.iter().copied())
                        .collect::<Vec<u8>>(),
                )?;
            }
            self.written_bytes += joined_len as u64;
            first = end;
        }
        Ok(())
    }
}

impl<S: Storage> ApplyTarget for CoalescingTarget<'_, S> {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), JournalError> {
        OverlayTarget {
            storage: self.storage,
            overlay: &mut self.overlay,
        }
        .read(buf, offset)
    }
    fn write(&mut self, bytes: &[u8], offset: u64) -> Result<(), JournalError> {
        self.overlay.write(offset, bytes);
        self.held_bytes += bytes.len() as u64;
        if self.held_bytes > self.held_bytes_max {
            self.spill()?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn read(storage: &MemStorage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        storage.read_at(&mut buf, offset).unwrap();
        buf
    }

    /// Past its budget the overlay goes to the device early, and what
    /// follows still lands as if each write went there in order: a later
    /// write wins, and a read (a copy's source) sees both halves.
    #[test]
    fn an_overlay_past_its_budget_is_written_early_with_the_same_result() {
        let storage = MemStorage::new();
        let mut target = CoalescingTarget::new(&storage, 1000);
        target.write(&[1; 600], 0).unwrap();
        target.write(&[2; 100], 100).unwrap();
        assert_eq!(read(&storage, 0, 700), vec![0; 700], "under the budget");
        target.write(&[3; 400], 600).unwrap();
        assert_eq!(target.held_bytes, 0, "past the budget: written");
        let mut want = vec![1u8; 1000];
        want[100..200].fill(2);
        want[600..1000].fill(3);
        assert_eq!(read(&storage, 0, 1000), want);
        assert_eq!(
            target.written_bytes, 1000,
            "touching extents, each byte once"
        );
        target.write(&[4; 50], 950).unwrap();
        let mut seen = vec![0u8; 100];
        target.read(&mut seen, 900).unwrap();
        assert_eq!(seen[..50], [3; 50]);
        assert_eq!(seen[50..], [4; 50]);
        target.spill().unwrap();
        want[950..1000].fill(4);
        assert_eq!(read(&storage, 0, 1000), want);
        assert_eq!(target.written_bytes, 1050);
    }
}
