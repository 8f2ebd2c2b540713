//! Commit: validate, queue for group commit, and (as the leader) write a
//! batch into the ring and make it durable with the configured protocol.

use qj_spec::journal::{
    encode_padding, encode_transaction, Descriptor, EncodedTransaction, RevokeRange,
    TransactionParams,
};

use crate::apply::merge_ranges;
use crate::error::JournalError;
use crate::group_commit::BatchPipeline;
use crate::guards::Guard;
use crate::journal::{Journal, LiveTx};
use crate::options::{CommitProtocol, WhenFull};
use crate::ring::Placement;
use crate::stats::Counters;
use crate::sync::Arc;
use crate::transaction::Transaction;
use crate::Storage;

/// A transaction queued by [`Journal::commit_enqueue`], to be passed to
/// [`Journal::commit_wait`].
#[derive(Debug)]
#[must_use = "an enqueued transaction must be waited for"]
pub struct CommitTicket(u64);

/// A transaction of the current batch with its ring space, not yet durable.
pub(crate) struct Planned {
    index: usize,
    seq: u64,
    placement: Placement,
    encoded: EncodedTransaction,
    revokes: Vec<RevokeRange>,
    durable_seq: u64,
}

type Results = Vec<Option<Result<u64, JournalError>>>;

/// What a committer queues for group commit.
#[derive(Debug)]
pub(crate) enum Queued {
    /// A transaction to commit.
    Commit(Transaction),
    /// No transaction: only the batch's flush ([`Journal::flush_enqueue`]).
    Flush,
}

/// A batch between its stages.
pub(crate) struct WrittenBatch {
    results: Results,
    /// Written, not yet durable.
    planned: Vec<Planned>,
    /// Item indexes of the flush-only items: answered at finish.
    flushes: Vec<usize>,
    /// The first device error of the batch.
    failure: Option<JournalError>,
}

/// The journal's side of the group-commit pipeline.
pub(crate) struct CommitPipeline<'a, S: Storage> {
    pub journal: &'a Journal<S>,
}

impl<S: Storage> BatchPipeline<Queued, Result<u64, JournalError>> for CommitPipeline<'_, S> {
    type Batch = WrittenBatch;

    /// Plans every transaction into the ring and writes the batch (for the
    /// two-flush protocol, up to and including the commit blocks' first
    /// flush).
    fn write(&self, items: Vec<Queued>) -> WrittenBatch {
        let journal = self.journal;
        let first_seq = journal.state.lock().next_seq;
        let mut batch = WrittenBatch {
            results: items.iter().map(|_| None).collect(),
            planned: Vec::new(),
            flushes: Vec::new(),
            failure: None,
        };
        for (index, item) in items.into_iter().enumerate() {
            let tx = match item {
                Queued::Commit(tx) => tx,
                Queued::Flush => {
                    batch.flushes.push(index);
                    continue;
                }
            };
            if let Err(e) =
                journal.plan(index, tx, first_seq, &mut batch.planned, &mut batch.results)
            {
                batch.results[index] = Some(Err(e));
            }
        }
        if let Err(e) = journal.write_planned_blocks(&batch.planned) {
            batch.failure = Some(e);
        }
        batch
    }

    fn flush(&self, batch: &mut WrittenBatch) {
        if batch.failure.is_some() || (batch.planned.is_empty() && batch.flushes.is_empty()) {
            return;
        }
        // Ordering: one flush makes the whole batch durable (for two-flush,
        // the commit blocks written after the first flush). A crash before
        // it returns may keep any subset of the batch's sectors; replay
        // then finds a block or transaction checksum that fails and drops
        // that transaction and all after it, none of which was
        // acknowledged. This flush may overlap the next batch's writes:
        // they are not acknowledged before this batch finishes. It also
        // covers every storage write that completed before a flush-only
        // item was queued: that is the whole of such an item's promise.
        if let Err(e) = self.journal.region().flush() {
            batch.failure = Some(e);
        } else {
            Counters::add(&self.journal.counters.commit_flushes, 1);
        }
    }

    fn finish(&self, mut batch: WrittenBatch) -> Vec<Result<u64, JournalError>> {
        let outcome = match batch.failure.take() {
            // A failed flush with nothing planned still broke a promise
            // (flush-only items): poison as a failed commit does.
            Some(e) if batch.planned.is_empty() => Err(self.journal.poison(e)),
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.journal
            .finish_planned(outcome, &mut batch.planned, &mut batch.results);
        // Batches finish in order, so every transaction queued before a
        // flush-only item has its answer now: walk the batch in queue
        // order. A flush-only item promises every transaction queued before
        // it durable. One refused at plan time (a guard, a full ring) is
        // not, and its owner may not even have seen the error yet: a
        // caller that flushes for another thread's transaction (the engine
        // does, when that thread gathered its metadata) must not hear Ok.
        // So a flush-only item fails once any earlier transaction failed.
        let mut state = self.journal.state.lock();
        let mut flushes = batch.flushes.iter().copied().peekable();
        for index in 0..batch.results.len() {
            if flushes.next_if_eq(&index).is_none() {
                if !matches!(batch.results[index], Some(Ok(_))) {
                    let (count, first) = &mut state.failed_commits;
                    *count += 1;
                    if first.is_none() {
                        *first = Some(match &batch.results[index] {
                            Some(Err(e)) => e.to_string(),
                            _ => "transaction lost by an earlier failure in its batch".into(),
                        });
                    }
                }
                continue;
            }
            batch.results[index] = Some(match (&state.poisoned, &state.failed_commits) {
                (Some(reason), _) => Err(JournalError::Poisoned {
                    reason: reason.clone(),
                }),
                (None, (0, _)) => Ok(state.committed_seq),
                (None, (failed, first)) => Err(JournalError::EarlierCommitFailed {
                    failed: *failed,
                    first: first.clone().unwrap_or_default(),
                }),
            });
        }
        drop(state);
        batch
            .results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(JournalError::Poisoned {
                        reason: "transaction lost by an earlier failure in its batch".into(),
                    })
                })
            })
            .collect()
    }
}

/// Device ranges a transaction writes (write-data and copy targets).
fn targets(descriptors: &[Descriptor]) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
    descriptors.iter().enumerate().flat_map(|(i, d)| {
        let ranges: Vec<(u64, u64)> = match d {
            Descriptor::WriteData(chunks) => chunks
                .iter()
                .map(|c| (c.target, u64::from(c.length)))
                .collect(),
            Descriptor::Copy(chunks) => chunks
                .iter()
                .map(|c| (c.target, u64::from(c.length)))
                .collect(),
            _ => Vec::new(),
        };
        ranges
            .into_iter()
            .map(move |(start, length)| (i, start, length))
    })
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl<S: Storage> Journal<S> {
    /// Commits `tx` and returns its sequence number. When this returns
    /// `Ok`, the transaction survives any crash: replay will apply it
    /// (unless a later committed transaction revoked its ranges). Threads
    /// committing at the same time share flushes (group commit).
    ///
    /// Refused without effect: targets outside the device limit or inside
    /// the journal, a transaction larger than the ring, a write into the
    /// copy source or checksummed range of an unsynced transaction. When
    /// the ring is full the commit checkpoints (or fails with
    /// [`JournalError::Full`], per the options).
    pub fn commit(&self, tx: Transaction) -> Result<u64, JournalError> {
        let ticket = self.commit_enqueue(tx)?;
        self.commit_wait(ticket)
    }

    /// Checks `tx` like [`Journal::commit`] and queues it for group commit
    /// without waiting; [`Journal::commit_wait`] returns its result.
    /// Transactions enqueued by one caller are committed in the order it
    /// enqueued them (sequence numbers follow that order), so a caller can
    /// fix the order under its own lock and wait outside it, letting other
    /// threads' transactions join the same batch.
    pub fn commit_enqueue(&self, tx: Transaction) -> Result<CommitTicket, JournalError> {
        self.check_usable()?;
        for (index, descriptor) in tx.descriptors().iter().enumerate() {
            self.bounds
                .check(descriptor, 0)
                .map_err(|source| JournalError::RefusedDescriptor { index, source })?;
        }
        let needed_blocks = self.blocks_needed(&tx);
        let ring_blocks = u64::from(self.geometry.ring_blocks());
        if needed_blocks > ring_blocks {
            return Err(JournalError::TooLarge {
                needed_blocks,
                ring_blocks,
            });
        }
        Ok(CommitTicket(self.group.enqueue(Queued::Commit(tx))))
    }

    /// Queues a flush without a transaction; [`Journal::commit_wait`]
    /// returns the committed sequence number once every storage write that
    /// completed before this call, and every transaction enqueued before
    /// it, is durable. It shares the flush of the batch it lands in, so a
    /// caller with only data to make durable joins other threads' commits
    /// instead of flushing on its own (and cannot return before an earlier
    /// transaction that its data depends on is committed).
    ///
    /// If any transaction enqueued before it failed (since the journal
    /// opened, even one refused without effect), it fails with
    /// [`JournalError::EarlierCommitFailed`]: that transaction will never
    /// be durable, and the caller may be flushing on its behalf.
    pub fn flush_enqueue(&self) -> Result<CommitTicket, JournalError> {
        self.check_usable()?;
        Ok(CommitTicket(self.group.enqueue(Queued::Flush)))
    }

    /// How many transactions were answered with an error since the journal
    /// opened. Counted in queue order before any later item is answered:
    /// a caller whose `Ok` must also cover transactions other threads
    /// queued earlier checks this after its wait (the count may include
    /// later failures too, which only makes it stricter).
    #[must_use]
    pub fn failed_commits(&self) -> u64 {
        self.state.lock().failed_commits.0
    }

    /// Waits for a transaction queued by [`Journal::commit_enqueue`] and
    /// returns its sequence number; when this returns `Ok`, it survives any
    /// crash, as after [`Journal::commit`].
    pub fn commit_wait(&self, ticket: CommitTicket) -> Result<u64, JournalError> {
        self.group.wait(ticket.0, &CommitPipeline { journal: self })
    }

    /// Refuses a transaction that would break the copy and data checksum
    /// rules (see the spec): a copy source or checksummed range must not
    /// change until its transaction is synced, or replay would not be
    /// idempotent.
    fn check_guards(&self, descriptors: &[Descriptor]) -> Result<(), JournalError> {
        let refuse = |reason, offset, length| {
            Err(JournalError::Refused {
                reason,
                offset,
                length,
            })
        };
        for (i, d) in descriptors.iter().enumerate() {
            match d {
                Descriptor::Copy(chunks) => {
                    for (k, c) in chunks.iter().enumerate() {
                        let later = targets(descriptors)
                            .filter(|(j, _, _)| *j > i)
                            .map(|(_, s, l)| (s, l));
                        let later_in_same = chunks[k + 1..]
                            .iter()
                            .map(|c| (c.target, u64::from(c.length)));
                        for (start, length) in later.chain(later_in_same) {
                            if overlaps(start, length, c.source, u64::from(c.length)) {
                                return refuse("target overwrites the source of an earlier copy in the same transaction", start, length);
                            }
                        }
                    }
                }
                Descriptor::DataChecksum(chunks) => {
                    for c in chunks {
                        for (_, start, length) in targets(descriptors) {
                            if overlaps(start, length, c.target, u64::from(c.length)) {
                                return refuse(
                                    "transaction writes into its own checksummed range",
                                    start,
                                    length,
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let state = self.state.lock();
        for (_, start, length) in targets(descriptors) {
            if let Some(guard) = state.guards.overlapping(start, length) {
                return refuse(guard.what, start, length);
            }
        }
        for d in descriptors {
            if let Descriptor::Revoke(ranges) = d {
                for r in ranges {
                    if state.guards.overlapping(r.offset, r.length).is_some() {
                        return refuse(
                            "revokes (frees) the source of an unsynced copy or a checksummed range",
                            r.offset,
                            r.length,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Encodes one transaction and finds it room in the ring, checkpointing
    /// (after committing what the batch already holds) when full.
    fn plan(
        &self,
        index: usize,
        tx: Transaction,
        batch_first_seq: u64,
        planned: &mut Vec<Planned>,
        results: &mut Results,
    ) -> Result<(), JournalError> {
        self.check_usable()?;
        let (descriptors, data) = tx.into_parts();
        self.check_guards(&descriptors)?;
        let (seq, durable_seq) = {
            let state = self.state.lock();
            (state.next_seq, state.committed_seq)
        };
        // durable_seq may lag behind by the time the blocks are written
        // (a checkpoint below commits earlier planned ones first); it is a
        // lower bound, which is all its meaning requires.
        let params = TransactionParams {
            journal_id: self.journal_id,
            seq,
            durable_seq,
            block_size: self.geometry.block_size() as usize,
        };
        let encoded = encode_transaction(&params, &descriptors, &data)
            .map_err(|source| JournalError::RefusedDescriptor { index: 0, source })?;
        let tx_blocks = u32::try_from(encoded.total_blocks()).unwrap_or(u32::MAX);
        let mut revokes = Vec::new();
        let mut guards = Vec::new();
        for d in &descriptors {
            match d {
                Descriptor::Revoke(ranges) => revokes.extend_from_slice(ranges),
                Descriptor::Copy(chunks) => guards.extend(chunks.iter().map(|c| Guard {
                    seq,
                    start: c.source,
                    length: u64::from(c.length),
                    what: "target overwrites the source of an unsynced copy",
                })),
                Descriptor::DataChecksum(chunks) => guards.extend(chunks.iter().map(|c| Guard {
                    seq,
                    start: c.target,
                    length: u64::from(c.length),
                    what: "target overwrites a range an unsynced transaction checksums",
                })),
                _ => {}
            }
        }
        let live = Arc::new(LiveTx { descriptors, data });
        // Bounded: three rounds (as is, after a checkpoint, after a rewind).
        for round in 0..3 {
            let allocated = {
                let mut state = self.state.lock();
                match state.ring.allocate(seq, tx_blocks, Arc::clone(&live)) {
                    Ok(placement) => {
                        state.next_seq = seq + 1;
                        for &guard in &guards {
                            state.guards.insert(guard);
                        }
                        Some(placement)
                    }
                    Err(_) => None,
                }
            };
            if let Some(placement) = allocated {
                planned.push(Planned {
                    index,
                    seq,
                    placement,
                    encoded,
                    revokes,
                    durable_seq,
                });
                return Ok(());
            }
            match (round, self.options.when_full) {
                (0, WhenFull::Checkpoint) => {
                    // A checkpoint syncs committed transactions only, so
                    // earlier batches (still flushing) must finish and
                    // this batch's planned part is committed first.
                    self.wait_for_earlier_batches(batch_first_seq)?;
                    let written = self.write_planned_blocks(planned);
                    let flushed = written.and_then(|()| {
                        let flushed = self.region().flush();
                        if flushed.is_ok() {
                            Counters::add(&self.counters.commit_flushes, 1);
                        }
                        flushed
                    });
                    let failed = flushed.is_err();
                    self.finish_planned(flushed, planned, results);
                    if failed {
                        return Err(JournalError::Poisoned {
                            reason: "the batch failed to commit".into(),
                        });
                    }
                    let _checkpointing = self.checkpoint_lock.lock();
                    let report = self.checkpoint_locked()?;
                    let mut ranges = self.auto_checkpoint_ranges.lock();
                    // Merging keeps this bounded by the distinct ranges.
                    let mut all = std::mem::take(&mut *ranges);
                    all.extend(report.ranges_written);
                    *ranges = merge_ranges(all);
                }
                (1, WhenFull::Checkpoint) => self.rewind_if_empty()?,
                _ => break,
            }
        }
        let fill = self.fill();
        Err(JournalError::Full {
            needed_blocks: u64::from(tx_blocks),
            free_blocks: fill.free_blocks(),
            ring_blocks: fill.ring_blocks,
        })
    }

    /// With nothing live, moves the log start to ring block 0 so that a
    /// transaction longer than either side of the old head fits.
    fn rewind_if_empty(&self) -> Result<(), JournalError> {
        let mut header = self.header.lock();
        let synced_seq = {
            let state = self.state.lock();
            if !state.ring.is_empty() || state.ring.head() == 0 {
                return Ok(());
            }
            state.synced_seq
        };
        header.generation += 1;
        let rewound = qj_spec::journal::JournalHeader {
            geometry: self.geometry,
            journal_id: self.journal_id,
            generation: header.generation,
            synced_seq,
            tail_block: 0,
        };
        let region = self.region();
        // Ordering: the previous header's mirror is durable before this
        // update overwrites the slot beside it (publish_header's
        // precondition); nothing else flushed since, if the log was
        // emptied by a checkpoint.
        region.flush().map_err(|e| self.poison(e))?;
        // Ordering (inside): the header says "the log starts at block 0"
        // durably before a transaction is written there, or replay would
        // look for it at the old head and miss it.
        header.generation = region
            .publish_header(&rewound)
            .map_err(|e| self.poison(e))?;
        Counters::add(&self.counters.checkpoint_flushes, 2);
        self.state.lock().ring.rewind();
        Ok(())
    }

    /// Waits until every batch before this one has finished, so that all
    /// transactions before `batch_first_seq` are committed (or the journal
    /// is poisoned).
    fn wait_for_earlier_batches(&self, batch_first_seq: u64) -> Result<(), JournalError> {
        let mut state = self.state.lock();
        // Bounded: earlier batches are past their write stage and finish
        // without needing anything this thread holds.
        while state.committed_seq + 1 < batch_first_seq && state.poisoned.is_none() {
            state = self.committed.wait(state);
        }
        match &state.poisoned {
            Some(reason) => Err(JournalError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Ends the life of written transactions: on success they become
    /// committed (in order) and their results `Ok(seq)`; on failure, or if
    /// an earlier batch poisoned the journal, every one fails. Empties
    /// `planned`.
    pub(crate) fn finish_planned(
        &self,
        outcome: Result<(), JournalError>,
        planned: &mut Vec<Planned>,
        results: &mut Results,
    ) {
        let Some(last_seq) = planned.last().map(|p| p.seq) else {
            return;
        };
        let failure = match outcome {
            Err(error) => Some(self.poison(error).to_string()),
            // An earlier batch failed: this one may depend on transactions
            // that never became durable, so it must not be acknowledged.
            Ok(()) => self.state.lock().poisoned.clone(),
        };
        if let Some(reason) = failure {
            self.state.lock().ring.forget_uncommitted();
            for p in planned.drain(..) {
                results[p.index] = Some(Err(JournalError::Poisoned {
                    reason: reason.clone(),
                }));
            }
            return;
        }
        {
            let mut state = self.state.lock();
            state.ring.mark_committed_through(last_seq);
            assert!(last_seq > state.committed_seq, "commit order");
            assert_eq!(
                planned.first().map(|p| p.seq),
                Some(state.committed_seq + 1),
                "batches finish in order"
            );
            state.committed_seq = last_seq;
            let anchored = planned.iter().map(|p| p.durable_seq).max().unwrap_or(0);
            state.anchored_seq = state.anchored_seq.max(anchored);
        }
        // Revokes become visible to checkpoint now that they are durable,
        // and before the commits return: a caller may reuse a revoked range
        // as soon as its commit returns, and from then on no checkpoint may
        // write the old content there. A batch without revokes leaves the
        // table alone: a checkpoint holds it read-locked from applying its
        // first transaction until all of its in-place writes are issued
        // (milliseconds with logged data), and every batch would wait that
        // out. Batches finish in order, so one that carries revokes (freed
        // metadata: rare) delays the ones behind it.
        if planned.iter().any(|p| !p.revokes.is_empty()) {
            let mut table = self.revokes.write();
            for p in planned.iter() {
                for range in &p.revokes {
                    table.insert(*range, p.seq);
                }
            }
        }
        self.committed.notify_all();
        // A write log gets one label per durable commit, so a replay tool
        // can stop exactly at a commit point.
        for p in planned.iter() {
            self.storage.mark(format_args!("txn {} commit", p.seq));
        }
        Counters::add(&self.counters.commits, planned.len() as u64);
        for p in planned.drain(..) {
            results[p.index] = Some(Ok(p.seq));
        }
    }

    /// Writes the planned transactions: everything but the final flush,
    /// which the caller issues (the pipeline's flush stage, or directly).
    pub(crate) fn write_planned_blocks(&self, planned: &[Planned]) -> Result<(), JournalError> {
        if planned.is_empty() {
            return Ok(());
        }
        let region = self.region();
        let bs = region.block_size();
        let mut writes: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut blocks_written = 0;
        let two_flush = self.options.commit_protocol == CommitProtocol::TwoFlush;
        for p in planned {
            if let Some(at) = p.placement.pad_at {
                writes.push((at, encode_padding(bs, self.journal_id, p.seq)));
                blocks_written += 1;
            }
            let bytes = if two_flush {
                p.encoded.body()
            } else {
                &p.encoded.bytes
            };
            writes.push((p.placement.tx_start, bytes.to_vec()));
            blocks_written += p.encoded.total_blocks();
        }
        self.write_runs(&writes)?;
        if two_flush {
            // Ordering (the draft's protocol): descriptor, data and padding
            // blocks durable before any commit block is written, so a
            // commit block on disk always describes blocks that are on
            // disk. The commit blocks' own flush is the caller's.
            region.flush()?;
            Counters::add(&self.counters.commit_flushes, 1);
            let commits: Vec<(u32, Vec<u8>)> = planned
                .iter()
                .map(|p| {
                    let commit_index = p.placement.tx_start + (p.encoded.total_blocks() as u32 - 1);
                    (commit_index, p.encoded.commit_block().to_vec())
                })
                .collect();
            self.write_runs(&commits)?;
        }
        Counters::add(&self.counters.blocks_written, blocks_written);
        Ok(())
    }

    /// Writes (ring index, whole blocks) pieces, merging pieces that follow
    /// each other in the ring into one device write.
    fn write_runs(&self, pieces: &[(u32, Vec<u8>)]) -> Result<(), JournalError> {
        let region = self.region();
        let bs = region.block_size() as u64;
        let mut run_start = 0u32;
        let mut run: Vec<u8> = Vec::new();
        for (index, bytes) in pieces {
            let run_end = u64::from(run_start) + run.len() as u64 / bs;
            if !run.is_empty() && u64::from(*index) != run_end {
                region.write_blocks(run_start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = *index;
            }
            run.extend_from_slice(bytes);
        }
        if !run.is_empty() {
            region.write_blocks(run_start, &run)?;
        }
        Ok(())
    }
}
