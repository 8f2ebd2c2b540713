//! The journal: creation, opening (with replay), and what the engine asks
//! about it. Commit lives in `commit.rs`, checkpoint in `checkpoint.rs`.

use qj_spec::journal::{
    blocks_needed, Descriptor, JournalFormatError, JournalGeometry, JournalHeader, TargetBounds,
};

use crate::apply::{DeviceTarget, OverlayTarget};
use crate::commit::Queued;
use crate::dedup::DedupConsumer;
use crate::error::JournalError;
use crate::group_commit::GroupCommit;
use crate::guards::GuardSet;
use crate::options::{JournalOptions, ReplayMode};
use crate::overlay::Overlay;
use crate::region::Region;
use crate::replay::{replay, ReplayReport};
use crate::revoke::RevokeTable;
use crate::ring::Ring;
use crate::scan::scan;
use crate::stats::{Counters, JournalStats};
use crate::sync::{Arc, Condvar, Mutex, RwLock};
use crate::transaction::Transaction;
use crate::Storage;

/// What the journal keeps in memory about a transaction until it is
/// synced, so that checkpoint never re-reads the ring.
#[derive(Debug)]
pub(crate) struct LiveTx {
    pub descriptors: Vec<Descriptor>,
    pub data: Vec<u8>,
}

/// Mutable journal state, under one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub ring: Ring<Arc<LiveTx>>,
    /// Sequence number the next transaction gets.
    pub next_seq: u64,
    /// Every transaction up to this one is durably committed.
    pub committed_seq: u64,
    /// Every transaction up to this one is applied in place, durably, and
    /// the header says so.
    pub synced_seq: u64,
    /// The largest `durable_seq` of a committed transaction.
    pub anchored_seq: u64,
    /// Copy sources and checksummed ranges of unsynced transactions.
    pub guards: GuardSet,
    /// The first device failure; the journal refuses work after it.
    pub poisoned: Option<String>,
    /// Transactions answered with an error (refused at plan time or lost
    /// with a failed batch), counted in queue order as batches finish, and
    /// the first one's error: a flush-only item queued after any of them
    /// fails ([`JournalError::EarlierCommitFailed`]).
    pub failed_commits: (u64, Option<String>),
}

/// What the header lock protects: header writes are serialized so that
/// generations alternate slots strictly.
#[derive(Debug)]
pub(crate) struct HeaderState {
    pub generation: u64,
}

/// How full the ring is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JournalFill {
    /// Blocks in the ring.
    pub ring_blocks: u64,
    /// Blocks held by unsynced transactions (padding included).
    pub used_blocks: u64,
    /// Block size in bytes.
    pub block_size: u64,
}

impl JournalFill {
    /// Free blocks.
    #[must_use]
    pub fn free_blocks(&self) -> u64 {
        self.ring_blocks - self.used_blocks
    }

    /// Free bytes.
    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        self.free_blocks() * self.block_size
    }

    /// Fill level in percent.
    #[must_use]
    pub fn used_percent(&self) -> u64 {
        self.used_blocks * 100 / self.ring_blocks
    }
}

/// A qjournal on a region of a [`Storage`].
///
/// All methods take `&self`: many threads may commit at once (their
/// transactions are grouped into shared flushes) while another checkpoints.
#[derive(Debug)]
pub struct Journal<S: Storage> {
    pub(crate) storage: S,
    pub(crate) base_offset: u64,
    pub(crate) geometry: JournalGeometry,
    pub(crate) bounds: TargetBounds,
    pub(crate) options: JournalOptions,
    pub(crate) journal_id: u64,
    pub(crate) read_only: bool,
    pub(crate) overlay: Overlay,
    pub(crate) state: Mutex<State>,
    /// Signalled (with `state`) when `committed_seq` advances or the
    /// journal is poisoned.
    pub(crate) committed: Condvar,
    pub(crate) header: Mutex<HeaderState>,
    pub(crate) revokes: RwLock<RevokeTable>,
    pub(crate) checkpoint_lock: Mutex<()>,
    /// Merged target ranges written by checkpoints that commits ran by
    /// themselves (ring full), until the engine takes them.
    pub(crate) auto_checkpoint_ranges: Mutex<Vec<(u64, u64)>>,
    pub(crate) group: GroupCommit<Queued, Result<u64, JournalError>>,
    pub(crate) counters: Counters,
}

fn random_id(avoid: u64) -> Result<u64, JournalError> {
    // Bounded: a random u64 equals 0 or `avoid` with probability 2^-63.
    for _ in 0..16 {
        let mut bytes = [0u8; 8];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| JournalError::io("random", 0, std::io::Error::other(e.to_string())))?;
        let id = u64::from_be_bytes(bytes);
        if id != 0 && id != avoid {
            return Ok(id);
        }
    }
    Err(JournalError::io(
        "random",
        0,
        std::io::Error::other("no usable journal id from the RNG"),
    ))
}

fn check_region(
    base_offset: u64,
    geometry: &JournalGeometry,
    options: &JournalOptions,
) -> Result<(), JournalError> {
    if !base_offset.is_multiple_of(geometry.block_size()) {
        return Err(JournalError::Parameter {
            field: "base_offset",
            value: base_offset,
            reason: "not a multiple of the block size",
        });
    }
    let end = base_offset
        .checked_add(geometry.size_bytes())
        .ok_or(JournalError::Parameter {
            field: "size_bytes",
            value: geometry.size_bytes(),
            reason: "region end overflows",
        })?;
    if end > options.device_limit_bytes {
        return Err(JournalError::Parameter {
            field: "device_limit_bytes",
            value: options.device_limit_bytes,
            reason: "the journal region itself reaches past the device limit",
        });
    }
    if options.queue_capacity == 0 || options.checkpoint_threshold_percent > 100 {
        return Err(JournalError::Parameter {
            field: "queue_capacity",
            value: options.queue_capacity as u64,
            reason: "queue capacity must be at least 1 and the checkpoint threshold at most 100",
        });
    }
    Ok(())
}

impl<S: Storage> Journal<S> {
    /// Formats `size_bytes` at `base_offset` of `storage` as an empty
    /// journal with blocks of `block_size` bytes (512 B to 64 KiB, a power
    /// of two) and returns it open.
    ///
    /// Both header slots are written and flushed before this returns; the
    /// region is a journal only from then on, so a caller must not publish
    /// it (for qcow2: the header extension) before.
    pub fn create(
        storage: S,
        base_offset: u64,
        size_bytes: u64,
        block_size: u32,
        options: JournalOptions,
    ) -> Result<Self, JournalError> {
        if !block_size.is_power_of_two() {
            return Err(JournalError::Parameter {
                field: "block_size",
                value: u64::from(block_size),
                reason: "not a power of two",
            });
        }
        let geometry = JournalGeometry::new(block_size.trailing_zeros(), size_bytes)
            .map_err(|source| JournalError::format(base_offset, source))?;
        check_region(base_offset, &geometry, &options)?;
        let journal_id = random_id(0)?;
        let region = Region {
            storage: &storage,
            base: base_offset,
            geometry,
        };
        let mut header = JournalHeader {
            geometry,
            journal_id,
            generation: 0,
            synced_seq: 0,
            tail_block: 0,
        };
        // Both slots, so that no older journal's header in the other slot
        // (with a larger generation) can win over this one.
        region.write_slot(&header)?;
        header.generation = 1;
        region.write_slot(&header)?;
        region.flush()?;
        Ok(Self::assemble(
            storage,
            base_offset,
            geometry,
            options,
            journal_id,
            1,
            0,
            0,
            false,
            Overlay::new(),
        ))
    }

    /// Opens the journal at `base_offset` (which must be `size_bytes`
    /// long) and replays it: the committed but unsynced transactions are
    /// applied in order, honouring revokes, up to the first torn or
    /// invalid one; dedup entries go to `dedup` in order.
    ///
    /// With [`ReplayMode::Apply`] the replayed writes are flushed and the
    /// log is retired by a new header (with a new journal id); the journal
    /// is then empty and ready to commit. With [`ReplayMode::InMemory`]
    /// nothing is written: [`Journal::overlay`] holds the replayed writes
    /// and the journal is read-only.
    ///
    /// A log damaged in the middle or holding an invalid transaction is
    /// refused with the device untouched, unless `options.salvage`.
    pub fn open(
        storage: S,
        base_offset: u64,
        size_bytes: u64,
        options: JournalOptions,
        dedup: &mut dyn DedupConsumer,
    ) -> Result<(Self, ReplayReport), JournalError> {
        let header = Region::current_header(&storage, base_offset)?;
        let geometry = header.geometry;
        if geometry.size_bytes() != size_bytes {
            return Err(JournalError::format(
                base_offset + JournalGeometry::header_slot_offset(header.slot()),
                JournalFormatError::field(
                    "journal header",
                    "journal_size",
                    16,
                    geometry.size_bytes(),
                    "does not match the region size the caller gave",
                ),
            ));
        }
        check_region(base_offset, &geometry, &options)?;
        let bounds = TargetBounds {
            journal_start: base_offset,
            journal_end: base_offset + size_bytes,
            device_limit: options.device_limit_bytes,
        };
        let region = Region {
            storage: &storage,
            base: base_offset,
            geometry,
        };
        let scanned = scan(&region, &header, &bounds, options.mutation)?;
        let offset_of = |index: u32| region.block_offset(index);
        match options.replay_mode {
            ReplayMode::Apply => {
                let mut target = DeviceTarget { storage: &storage };
                let replayed = replay(
                    scanned,
                    ReplayMode::Apply,
                    options.salvage,
                    options.mutation,
                    &mut target,
                    dedup,
                    &offset_of,
                )?;
                let last = replayed.report.last_replayed_seq;
                // Ordering: the replayed writes must be durable before the
                // header below retires the log; until then a crash simply
                // replays again (every operation is idempotent, see spec).
                region.flush()?;
                let journal_id = random_id(header.journal_id)?;
                let retired = JournalHeader {
                    geometry,
                    journal_id,
                    generation: header.generation + 1,
                    synced_seq: last,
                    tail_block: replayed.next_head,
                };
                // Ordering (inside): the new header (new id) is durable
                // before a transaction salted with the new id is written,
                // or a crash would leave the old header, whose replay
                // cannot see it. Its mirror makes both slots carry the new
                // id, so one damaged slot cannot hand the log to the old id.
                let generation = region.publish_header(&retired)?;
                let journal = Self::assemble(
                    storage,
                    base_offset,
                    geometry,
                    options,
                    journal_id,
                    generation,
                    replayed.next_head,
                    last,
                    false,
                    Overlay::new(),
                );
                Ok((journal, replayed.report))
            }
            ReplayMode::InMemory => {
                let mut overlay = Overlay::new();
                let mut target = OverlayTarget {
                    storage: &storage,
                    overlay: &mut overlay,
                };
                let replayed = replay(
                    scanned,
                    ReplayMode::InMemory,
                    options.salvage,
                    options.mutation,
                    &mut target,
                    dedup,
                    &offset_of,
                )?;
                let last = replayed.report.last_replayed_seq;
                let journal = Self::assemble(
                    storage,
                    base_offset,
                    geometry,
                    options,
                    header.journal_id,
                    header.generation,
                    replayed.next_head,
                    last,
                    true,
                    overlay,
                );
                Ok((journal, replayed.report))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        storage: S,
        base_offset: u64,
        geometry: JournalGeometry,
        options: JournalOptions,
        journal_id: u64,
        generation: u64,
        head: u32,
        synced_seq: u64,
        read_only: bool,
        overlay: Overlay,
    ) -> Self {
        let bounds = TargetBounds {
            journal_start: base_offset,
            journal_end: base_offset + geometry.size_bytes(),
            device_limit: options.device_limit_bytes,
        };
        let queue_capacity = options.queue_capacity;
        let gather_max = options.group_commit_gather_max;
        Self {
            storage,
            base_offset,
            geometry,
            bounds,
            options,
            journal_id,
            read_only,
            overlay,
            state: Mutex::new(State {
                ring: Ring::new(geometry.ring_blocks(), head),
                next_seq: synced_seq + 1,
                committed_seq: synced_seq,
                synced_seq,
                anchored_seq: synced_seq,
                guards: GuardSet::default(),
                poisoned: None,
                failed_commits: (0, None),
            }),
            committed: Condvar::new(),
            header: Mutex::new(HeaderState { generation }),
            revokes: RwLock::new(RevokeTable::new()),
            checkpoint_lock: Mutex::new(()),
            auto_checkpoint_ranges: Mutex::new(Vec::new()),
            group: GroupCommit::new(queue_capacity, gather_max),
            counters: Counters::default(),
        }
    }

    pub(crate) fn region(&self) -> Region<'_> {
        Region {
            storage: &self.storage,
            base: self.base_offset,
            geometry: self.geometry,
        }
    }

    /// Records the first device failure and returns the error; every later
    /// call fails until the journal is reopened.
    pub(crate) fn poison(&self, error: JournalError) -> JournalError {
        let mut state = self.state.lock();
        if state.poisoned.is_none() {
            state.poisoned = Some(error.to_string());
        }
        drop(state);
        self.committed.notify_all();
        error
    }

    pub(crate) fn check_usable(&self) -> Result<(), JournalError> {
        if self.read_only {
            return Err(JournalError::ReadOnly);
        }
        match &self.state.lock().poisoned {
            Some(reason) => Err(JournalError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The device.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Device offset of the region.
    #[must_use]
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Block size and region size.
    #[must_use]
    pub fn geometry(&self) -> JournalGeometry {
        self.geometry
    }

    /// This session's journal id.
    #[must_use]
    pub fn journal_id(&self) -> u64 {
        self.journal_id
    }

    /// Every transaction up to this sequence number survives any crash.
    #[must_use]
    pub fn committed_seq(&self) -> u64 {
        self.state.lock().committed_seq
    }

    /// Every transaction up to this sequence number is applied in place
    /// and the header says so.
    #[must_use]
    pub fn synced_seq(&self) -> u64 {
        self.state.lock().synced_seq
    }

    /// Transactions up to this sequence number are anchored: a later
    /// durable transaction (or the header) proves they were committed, so
    /// replay no longer checks their data checksums and the ranges those
    /// cover may be rewritten in place.
    #[must_use]
    pub fn anchored_seq(&self) -> u64 {
        let state = self.state.lock();
        state.anchored_seq.max(state.synced_seq)
    }

    /// Whether committed transactions are waiting for a checkpoint (the
    /// qcow2 "journal dirty" bit must be set while this is true).
    #[must_use]
    pub fn has_unsynced(&self) -> bool {
        let state = self.state.lock();
        state.committed_seq > state.synced_seq
    }

    /// How full the ring is.
    #[must_use]
    pub fn fill(&self) -> JournalFill {
        let state = self.state.lock();
        JournalFill {
            ring_blocks: u64::from(state.ring.ring_blocks()),
            used_blocks: state.ring.used_blocks(),
            block_size: self.geometry.block_size(),
        }
    }

    /// Whether the fill level reached the configured threshold.
    #[must_use]
    pub fn needs_checkpoint(&self) -> bool {
        self.fill().used_percent() >= u64::from(self.options.checkpoint_threshold_percent)
    }

    /// Blocks `tx` would take in the ring, commit block included (an upper
    /// bound: escapes are counted at their worst).
    #[must_use]
    pub fn blocks_needed(&self, tx: &Transaction) -> u64 {
        blocks_needed(
            self.geometry.block_size() as usize,
            tx.descriptors(),
            tx.data().len(),
        )
    }

    /// Whether an unsynced (or being committed) transaction writes or
    /// copies into `[offset, offset + length)`: if so, reusing the range
    /// outside the journal needs a revoke first.
    #[must_use]
    pub fn pending_overlap(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length);
        let overlaps = |start: u64, len: u64| start < end && offset < start.saturating_add(len);
        let state = self.state.lock();
        let found = state.ring.extents().any(|extent| {
            extent.payload.descriptors.iter().any(|d| match d {
                Descriptor::WriteData(chunks) => chunks
                    .iter()
                    .any(|c| overlaps(c.target, u64::from(c.length))),
                Descriptor::Copy(chunks) => chunks
                    .iter()
                    .any(|c| overlaps(c.target, u64::from(c.length))),
                _ => false,
            })
        });
        found
    }

    /// Takes the target ranges (merged, as (offset, length)) that
    /// checkpoints run inside commits (because the ring was full) wrote in
    /// place since the last call; explicit [`Journal::checkpoint`] calls
    /// report theirs directly.
    pub fn take_auto_checkpoint_ranges(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.auto_checkpoint_ranges.lock())
    }

    /// The writes an in-memory replay made (empty for other opens).
    #[must_use]
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Whether the journal was opened read-only (in-memory replay).
    #[must_use]
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Counters since open.
    #[must_use]
    pub fn stats(&self) -> JournalStats {
        self.counters.snapshot(self.group.batches())
    }
}
