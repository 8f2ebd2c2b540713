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

    /// Writes the overlay in place, touching extents joined into writes
    /// of up to [`IN_PLACE_WRITE_BYTES_MAX`], and starts an empty one.
    fn spill(&mut self) -> Result<(), JournalError> {
        let overlay = std::mem::take(&mut self.overlay);
        self.held_bytes = 0;
        let extents: Vec<(u64, &[u8])> = overlay.extents().collect();
        let mut runs: Vec<&[(u64, &[u8])]> = Vec::new();
        let mut first = 0;
        // Bounded by the extents: each round takes at least one.
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
            runs.push(&extents[first..end]);
            self.written_bytes += joined_len as u64;
            first = end;
        }
        write_disjoint(self.storage, &runs)
    }
}

/// Fewest writes worth spreading over several threads: below it, starting
/// them costs more than the device time they would overlap.
const CONCURRENT_WRITES_MIN: usize = 16;

/// The name of a checkpoint's extra writer threads (15 bytes at most, as
/// Linux keeps them).
const WRITER_THREAD_NAME: &str = "qj-ckpt-writer";

/// Writes `runs` in place, each a run of touching extents (ascending,
/// disjoint) as one write, with as many in flight at once as the storage
/// asks for ([`Storage::concurrent_writes`]): each thread a contiguous
/// share in offset order, joining one run at a time (so a spill holds at
/// most one joined buffer a thread beside the overlay). Returns when all
/// are done, with the first failure in offset order.
///
/// Ordering: none among these writes. They cover disjoint bytes, so the
/// order they land in cannot change what the device ends up holding, and
/// a crash may keep any subset of them whatever the order: replay
/// re-applies the whole batch until the header says it is synced. What
/// must come after all of them (the flush before that header) comes after
/// this function returns, which is after every thread has finished.
fn write_disjoint<S: Storage>(storage: &S, runs: &[&[(u64, &[u8])]]) -> Result<(), JournalError> {
    let mut end = 0;
    for run in runs {
        for &(offset, bytes) in *run {
            assert!(
                offset >= end,
                "in-place writes overlap or are out of order at {offset:#x}"
            );
            end = offset + bytes.len() as u64;
        }
    }
    let write_share = |share: &[&[(u64, &[u8])]]| -> Result<(), JournalError> {
        for run in share {
            let offset = run[0].0;
            let joined;
            let bytes = if let [(_, only)] = run {
                only
            } else {
                joined = run
                    .iter()
                    .flat_map(|(_, b)| b.iter().copied())
                    .collect::<Vec<u8>>();
                &joined[..]
            };
            storage
                .write_at(bytes, offset)
                .map_err(|e| JournalError::io("write", offset, e))?;
        }
        Ok(())
    };
    let threads = storage.concurrent_writes().clamp(1, CONCURRENT_WRITES_MAX);
    if threads == 1 || runs.len() < CONCURRENT_WRITES_MIN {
        return write_share(runs);
    }
    let share = runs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut shares = runs.chunks(share);
        let own = shares.next().unwrap_or_default();
        let others: Vec<_> = shares
            .map(|s| {
                std::thread::Builder::new()
                    .name(WRITER_THREAD_NAME.into())
                    .spawn_scoped(scope, move || write_share(s))
                    .map_err(|_| s)
            })
            .collect();
        let mut result = write_share(own);
        for other in others {
            let done = match other {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // The system gave no thread: this one writes the share.
                Err(share) => write_share(share),
            };
            // Every share runs to its end or its own failure, so none is
            // left in flight when this returns.
            result = result.and(done);
        }
        result
    })
}

/// Most threads one checkpoint writes with, whatever the storage asks.
const CONCURRENT_WRITES_MAX: usize = 16;

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

    /// A memory device that asks for concurrent writes, and records how
    /// many were in flight at once. The first write waits (at most ten
    /// seconds) until two have been in flight at once, so that written one
    /// at a time the batch shows a single write in flight (and takes ten
    /// seconds). Writes at `fail_at` fail.
    #[derive(Debug)]
    struct Concurrent {
        inner: MemStorage,
        in_flight: std::sync::Mutex<(usize, usize, bool)>,
        started: std::sync::Condvar,
        fail_at: Option<u64>,
    }

    impl Concurrent {
        fn new(fail_at: Option<u64>) -> Self {
            Self {
                inner: MemStorage::new(),
                in_flight: std::sync::Mutex::new((0, 0, false)),
                started: std::sync::Condvar::new(),
                fail_at,
            }
        }

        fn most_in_flight(&self) -> usize {
            self.in_flight.lock().unwrap().1
        }
    }

    impl Storage for Concurrent {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut state = self.in_flight.lock().unwrap();
            let (now, most, first_seen) = &mut *state;
            *now += 1;
            *most = (*most).max(*now);
            self.started.notify_all();
            if !std::mem::replace(first_seen, true) {
                state = self
                    .started
                    .wait_timeout_while(state, std::time::Duration::from_secs(10), |s| s.1 < 2)
                    .unwrap()
                    .0;
            }
            drop(state);
            let result = if Some(offset) == self.fail_at {
                Err(std::io::Error::other("injected write failure"))
            } else {
                self.inner.write_at(buf, offset)
            };
            self.in_flight.lock().unwrap().0 -= 1;
            result
        }
        fn flush(&self) -> std::io::Result<()> {
            self.inner.flush()
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn concurrent_writes(&self) -> usize {
            4
        }
    }

    /// 64 extents of 512 bytes, one every 4 KiB, each its own write.
    fn spread_writes(target: &mut CoalescingTarget<'_, Concurrent>) {
        for i in 0..64u64 {
            target.write(&[i as u8 + 1; 512], i * 4096).unwrap();
        }
    }

    /// A storage that asks for concurrent writes gets several in flight,
    /// and ends up holding what one-at-a-time writing gives.
    #[test]
    fn a_spill_writes_concurrently_where_the_storage_asks_and_lands_every_byte() {
        let storage = Concurrent::new(None);
        let mut target = CoalescingTarget::new(&storage, OVERLAY_BYTES_MAX);
        spread_writes(&mut target);
        target.spill().unwrap();
        assert!(
            storage.most_in_flight() >= 2,
            "writes went one at a time ({} in flight at most)",
            storage.most_in_flight()
        );
        assert_eq!(target.written_bytes, 64 * 512);
        for i in 0..64u64 {
            let mut want = vec![0u8; 4096];
            want[..512].fill(i as u8 + 1);
            assert_eq!(read(&storage.inner, i * 4096, 4096), want, "extent {i}");
        }
    }

    /// A failed write fails the spill (the checkpoint then poisons the
    /// journal), and the writes of the other threads are all done when it
    /// returns.
    #[test]
    fn a_failed_concurrent_write_fails_the_spill_after_every_other_write() {
        let failing = 40 * 4096;
        let storage = Concurrent::new(Some(failing));
        let mut target = CoalescingTarget::new(&storage, OVERLAY_BYTES_MAX);
        spread_writes(&mut target);
        let e = target.spill().unwrap_err();
        assert!(e.to_string().contains("injected write failure"), "{e}");
        assert_eq!(
            storage.in_flight.lock().unwrap().0,
            0,
            "a write still in flight"
        );
        // Every share but the failing one (extents 32..48) ran to its end.
        for i in (0..32u64).chain(48..64) {
            let mut want = vec![0u8; 4096];
            want[..512].fill(i as u8 + 1);
            assert_eq!(read(&storage.inner, i * 4096, 4096), want, "extent {i}");
        }
    }

    /// Over an `O_DIRECT` file (four writers), pieces smaller than a block,
    /// several to a block and some across block boundaries, all land: they
    /// go by read-modify-write, through bounce buffers, from several
    /// threads. (Two threads rarely meet in one block: each writes a
    /// contiguous share, so only the blocks where shares meet are
    /// shared, and the `rmw` lock of `direct.rs` covers those.)
    #[test]
    fn a_concurrent_spill_of_pieces_sharing_blocks_over_o_direct_lands_every_byte() {
        // Beside the sources, on the machine's disk (/tmp may be tmpfs,
        // which has no O_DIRECT).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0xeeu8; 256 << 10]).unwrap();
        let storage =
            crate::DirectFileStorage::open(&path, true).expect("O_DIRECT on the project's disk");
        assert!(storage.concurrent_writes() > 1);
        let mut want = vec![0xeeu8; 256 << 10];
        let mut target = CoalescingTarget::new(&storage, OVERLAY_BYTES_MAX);
        // 600 pieces of 300 bytes, one every 400: several to a block, and
        // pieces across block boundaries.
        for i in 0..600u64 {
            let piece = [i as u8; 300];
            target.write(&piece, i * 400).unwrap();
            want[(i * 400) as usize..][..300].copy_from_slice(&piece);
        }
        target.spill().unwrap();
        drop(storage);
        assert!(
            std::fs::read(&path).unwrap() == want,
            "a piece or its neighbour lost"
        );
    }
}
