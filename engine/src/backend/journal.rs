//! The journalled backend: every epoch becomes one qjournal transaction;
//! metadata reaches its place in the image only at checkpoint.
//!
//! The ordering rules, all enforced here (the journal's own commit,
//! checkpoint and replay rules are in `spec/qjournal.md` §11):
//!
//! 1. The qcow2 "journal dirty" bit (incompatible bit 60) is durable before
//!    the first transaction commits ([`JournalBackend::submit`] writes and
//!    flushes it first). A program that does not know the journal then
//!    refuses the image instead of reading metadata that lacks committed
//!    updates. It is cleared only after a checkpoint synced everything
//!    ([`JournalBackend::clean_shutdown`]).
//! 2. Guest data is durable no later than the transaction that references
//!    it. Two-flush commit: the first flush covers the data. Single-flush
//!    commit: the one flush covers data and transaction together, and each
//!    newly referenced data cluster is described by a data checksum
//!    descriptor, so replay drops a transaction whose data did not land
//!    (and every later one: none was acknowledged).
//! 3. A checksummed data cluster is not rewritten in place until its
//!    transaction is anchored (a later durable transaction records it as
//!    acknowledged) or synced: otherwise replay would find a mismatch and
//!    drop a transaction whose commit had returned
//!    ([`JournalBackend::before_data_write`]).
//! 4. A cluster freed while its checksum is unsynced is not reused until
//!    synced ([`JournalBackend::may_reuse`]): the journal refuses a later
//!    journalled write into a checksummed range, and replay idempotence
//!    needs the range stable.
//! 5. Metadata clusters freed in an epoch are revoked in that epoch's
//!    transaction, so replay never writes old metadata over the data a
//!    reused cluster holds (the draft's L1-reuse example); the image reuses
//!    them only after that transaction is durable (refcount.rs).
//! 6. A delayed copy-on-write (`delayed_cow.rs`) travels in the transaction
//!    that links its target ([`JournalBackend::submit`]), so replay never
//!    exposes the target's untouched bytes unfilled. Until the copy is
//!    synced, reads of those bytes go to the source
//!    ([`MetadataBackend::patch_data_read`]), a write into them first
//!    makes the copy happen, in place if its transaction is not submitted,
//!    else by commit and checkpoint (so the copy, applied later, cannot
//!    overwrite the write), and neither source nor target is reused
//!    ([`JournalBackend::may_reuse`]): a replay run twice must copy the
//!    same bytes into a cluster no one else owns.
//!
//! 7. Logged data (`logged_data.rs`, with [`OpenOptions::log_fresh_data`])
//!    travels in the transaction that links its cluster (the same
//!    [`JournalBackend::submit`] takes both), so it is durable exactly when
//!    the entry is. While a cluster's newest bytes are in the journal, a
//!    later write into it joins the next transaction instead of the file
//!    ([`MetadataBackend::absorb_data_write`]): written in place, it would
//!    be overwritten by the older logged bytes at checkpoint or replay.
//!    Reads come from memory until the last such transaction is synced,
//!    and the cluster is not reused until then ([`JournalBackend::may_reuse`]):
//!    a replay would write the old bytes over the next owner's. Logged
//!    clusters get no data checksum: their bytes are in the transaction.
//!    Nor are they the source of a delayed copy (rule 6 reads that from
//!    the file, which does not have them yet: [`MetadataBackend::delay_copy`]
//!    refuses). A synced cluster may stay kept, as the ranges of it the
//!    file holds: a write either joins it (logged again, under this rule,
//!    and read as the file's bytes under the logged ones) or drops it
//!    before going in place; a freed one is dropped (`logged_data.rs`,
//!    *Kept clusters*).
//!
//! [`OpenOptions::log_fresh_data`]: crate::OpenOptions::log_fresh_data
//!
//! Until a checkpoint, the newest content of journalled metadata lives in
//! the journal, not in place: reads of metadata go through an overlay of
//! every submitted write ([`JournalBackend::read_metadata`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use qj_journal::{
    CheckpointReport, CommitProtocol, CommitTicket, DedupConsumer, DedupEvent, DedupOp, Journal,
    JournalError, JournalOptions, JournalStats, NoDedup, Overlay, ReplayMode, ReplayReport,
    Storage, Transaction,
};
use qj_spec::journal::{checksum, DedupEntry};
use qj_spec::qcow2::features::INCOMPAT_JOURNAL_DIRTY_MASK;
use qj_spec::qcow2::JournalExtension;
use qj_spec::units::{HostCluster, HostOffset};

use super::checkpointer::{Checkpointer, Next};
use super::delayed_cow::{CopyState, PendingCopies};
use super::logged_data::{LoggedData, LoggedRead};
use super::{BackendKind, DelayedCopy, Epoch, MetadataBackend, NewData};
use crate::error::{Error, IoContext, Result};
pub use crate::mutation::JournalMutation;
use crate::stats::Counters;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

/// Highest host offset a journalled write may target: the largest offset an
/// L2 entry can hold (bits 9-55).
pub(crate) const DEVICE_LIMIT_BYTES: u64 = 1 << 56;

/// The commit protocol the image's journal extension names.
pub(crate) fn commit_protocol(ext: &JournalExtension) -> CommitProtocol {
    if ext.flags & JournalExtension::FLAG_TWO_FLUSH_COMMIT != 0 {
        CommitProtocol::TwoFlush
    } else {
        CommitProtocol::SingleFlush
    }
}

/// Zero-fill unit of a new journal region.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// Byte offset of the incompatible feature field in the qcow2 header.
const INCOMPATIBLE_FEATURES_OFFSET: usize = 72;

/// How a data cluster is protected by a data checksum (rule 3).
#[derive(Debug, Clone, Copy)]
enum DataGuard {
    /// In the epoch with this engine ticket, not yet committed.
    Submitted(u64),
    /// In the committed transaction with this sequence number.
    Committed(u64),
}

/// Submitted metadata not yet known to be in place.
#[derive(Debug, Default)]
struct Pending {
    overlay: Overlay,
    /// Epochs submitted and not yet waited for.
    in_flight: u64,
    /// How many times `overlay` was emptied (`forget_synced`): a metadata
    /// read that saw it change re-reads (`read_metadata`).
    overlay_resets: u64,
}

/// Tries of a metadata read (`read_metadata`), the last under the `pending`
/// lock: each retry means a checkpoint finished while the read was in
/// flight, which takes far longer than the read.
const METADATA_READ_TRIES_MAX: u32 = 3;

/// Tries of a data read of a kept cluster joined again (`read_data`), the
/// last under the logged-data lock: each retry means a checkpoint forgot
/// logged bytes while the read was in flight.
const DATA_READ_TRIES_MAX: u32 = 3;

/// The journalled backend.
#[derive(Debug)]
pub struct JournalBackend {
    journal: Journal<Arc<dyn Storage>>,
    protocol: CommitProtocol,
    cluster_size: u64,
    mutation: JournalMutation,
    pending: Mutex<Pending>,
    tickets: Mutex<HashMap<u64, (CommitTicket, Vec<u64>)>>,
    next_ticket: AtomicU64,
    guards: Mutex<BTreeMap<u64, DataGuard>>,
    guard_count: AtomicUsize,
    dirty_bit_on_disk: AtomicBool,
    /// Journal counters already folded into the engine's.
    folded: Mutex<JournalStats>,
    /// In-place bytes written by checkpoints.
    checkpoint_bytes: AtomicU64,
    /// Checkpoints since open (the open's replay counts as one).
    checkpoints: AtomicU64,
    /// Whether the journal was dirty at open (an unclean shutdown).
    opened_dirty: bool,
    /// Transactions replayed when the journal was opened.
    replayed: u64,
    /// What that replay found that the user must hear about.
    replay_warning: Option<String>,
    /// Whether partial writes into shared clusters delay their copy.
    delayed_cow: bool,
    /// Delayed copies not yet synced (rule 6).
    copies: Mutex<PendingCopies>,
    copy_count: AtomicUsize,
    /// Clusters whose delayed copy was made in place before its
    /// transaction was submitted: the next epoch checksums them whole.
    copied_in_place: Mutex<Vec<(HostOffset, u64)>>,
    /// Whether writes into fresh clusters past the end of the file travel
    /// in the transaction (rule 7).
    log_fresh_data: bool,
    /// Logged data not yet synced, and the ranges of kept clusters
    /// (rule 7).
    logged: Mutex<LoggedData>,
    /// Clusters `logged` holds, kept ones too: read without its lock, so
    /// that an image that never logged takes no lock per data write.
    logged_count: AtomicUsize,
    /// The background checkpoint thread's requests, when it runs.
    checkpointer: Checkpointer,
    /// Dedup entries replay found, until the image takes them.
    replayed_dedup: Mutex<Vec<DedupEvent>>,
}

fn journal_err(e: JournalError) -> Error {
    Error::Journal(e.to_string())
}

impl JournalBackend {
    /// Formats a journal of `size_bytes` at `offset` on `storage`.
    pub fn format(
        storage: Arc<dyn Storage>,
        offset: HostOffset,
        size_bytes: u64,
        block_size: u32,
        protocol: CommitProtocol,
    ) -> Result<()> {
        // Zeros over the whole region first, so that the file system has
        // blocks under the ring: a commit then overwrites allocated blocks,
        // and its flush commits no file-system metadata (a sparse ring
        // allocates blocks on its first lap, which costs every such flush
        // as much as a write that grows the file). Once per journal.
        let zeros = vec![0u8; ZERO_FILL_CHUNK_BYTES];
        let mut at = 0;
        while at < size_bytes {
            let n = (size_bytes - at).min(ZERO_FILL_CHUNK_BYTES as u64);
            storage
                .write_at(&zeros[..n as usize], offset.0 + at)
                .ctx(|| format!("zero-filling the journal at {:#x}", offset.0 + at))?;
            at += n;
        }
        let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
        options.commit_protocol = protocol;
        Journal::create(storage, offset.0, size_bytes, block_size, options).map_err(journal_err)?;
        Ok(())
    }

    /// Opens the journal at `offset`, replaying committed transactions:
    /// in place when `writable`, else into an in-memory overlay (nothing is
    /// written). Whether the dirty bit is durable on disk comes from the
    /// header the caller read. `delayed_cow`: carry the copies of partial
    /// writes into shared clusters in the journal (rule 6).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        storage: Arc<dyn Storage>,
        offset: HostOffset,
        size_bytes: u64,
        cluster_size: u64,
        protocol: CommitProtocol,
        writable: bool,
        dirty_bit_on_disk: bool,
        mutation: JournalMutation,
        delayed_cow: bool,
        log_fresh_data: bool,
        dedup: bool,
    ) -> Result<(Self, ReplayReport)> {
        let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
        options.commit_protocol = protocol;
        if let JournalMutation::Journal(journal_mutation) = mutation {
            options.mutation = journal_mutation;
        }
        options.replay_mode = if writable {
            ReplayMode::Apply
        } else {
            ReplayMode::InMemory
        };
        // An image with dedup hands the index's entries to the image (which
        // checks them against the metadata); any other refuses a log that
        // holds some rather than drop a committed update (spec §8.5).
        let mut events = Vec::new();
        let consumer: &mut dyn DedupConsumer = if dedup { &mut events } else { &mut NoDedup };
        let (journal, report) = Journal::open(storage, offset.0, size_bytes, options, consumer)
            .map_err(|e| {
                Error::Journal(format!(
                    "{e}; the image's committed metadata could not be replayed ({})",
                    crate::backend::journal_usable::SALVAGE_ADVICE
                ))
            })?;
        let overlay = if writable {
            Overlay::new()
        } else {
            journal.overlay().clone()
        };
        let backend = Self {
            journal,
            protocol,
            cluster_size,
            mutation,
            pending: Mutex::new(Pending {
                overlay,
                in_flight: 0,
                overlay_resets: 0,
            }),
            tickets: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(1),
            guards: Mutex::new(BTreeMap::new()),
            guard_count: AtomicUsize::new(0),
            dirty_bit_on_disk: AtomicBool::new(dirty_bit_on_disk),
            folded: Mutex::new(JournalStats::default()),
            checkpoint_bytes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(u64::from(report.transactions_replayed > 0)),
            opened_dirty: dirty_bit_on_disk,
            replayed: report.transactions_replayed,
            replay_warning: report.torn_tail_warning(),
            delayed_cow,
            copies: Mutex::new(PendingCopies::default()),
            copy_count: AtomicUsize::new(0),
            copied_in_place: Mutex::new(Vec::new()),
            log_fresh_data: log_fresh_data && writable,
            // Held: a quarter of the ring (a checkpoint makes room at three
            // quarters of that, `wait_durable`). One transaction's data: an
            // eighth (plus what later writes into its clusters add, at most
            // the held bound), so that with its metadata (epochs are kept
            // to a quarter, `epoch_bytes_max`) it stays within half the ring.
            logged: Mutex::new({
                let mut logged = LoggedData::new(cluster_size, size_bytes / 4, size_bytes / 8);
                if mutation == JournalMutation::LoggedZerosOverKept {
                    logged.break_kept_transactions();
                }
                logged
            }),
            logged_count: AtomicUsize::new(0),
            checkpointer: Checkpointer::default(),
            replayed_dedup: Mutex::new(events),
        };
        Ok((backend, report))
    }

    /// The journal itself (sequence numbers, fill, statistics).
    pub fn journal(&self) -> &Journal<Arc<dyn Storage>> {
        &self.journal
    }

    /// The commit protocol in use.
    pub fn protocol(&self) -> CommitProtocol {
        self.protocol
    }

    /// Sets or clears the journal-dirty bit in the header in place and
    /// flushes. Only the incompatible-features field changes; the rest of
    /// the in-place header (possibly older than journalled header writes)
    /// is left as it is.
    fn write_dirty_bit(&self, storage: &dyn Storage, set: bool, counters: &Counters) -> Result<()> {
        let mut sector = [0u8; 512];
        storage
            .read_at(&mut sector, 0)
            .ctx(|| "reading the header".into())?;
        let at = INCOMPATIBLE_FEATURES_OFFSET;
        let mut features = u64::from_be_bytes(sector[at..at + 8].try_into().expect("8 bytes"));
        if set {
            features |= INCOMPAT_JOURNAL_DIRTY_MASK;
        } else {
            features &= !INCOMPAT_JOURNAL_DIRTY_MASK;
        }
        sector[at..at + 8].copy_from_slice(&features.to_be_bytes());
        storage
            .write_at(&sector, 0)
            .ctx(|| "writing the journal-dirty bit".into())?;
        counters.metadata_write(sector.len());
        counters.flush();
        storage
            .flush()
            .ctx(|| "flushing the journal-dirty bit".into())?;
        self.dirty_bit_on_disk.store(set, Ordering::SeqCst);
        Ok(())
    }

    /// Folds journal counters (commit and checkpoint flushes, ring bytes)
    /// into the engine's, so both backends report in one shape.
    fn fold_stats(&self, counters: &Counters) {
        // The snapshot is taken under the lock: each journal counter only
        // grows, so the folds, serialised here, see it grow too. Taken
        // before the lock, a thread could fold an older snapshot after a
        // newer one and subtract past zero (found by the stress test).
        let mut folded = self.folded.lock();
        let now = self.journal.stats();
        assert!(
            now.commit_flushes >= folded.commit_flushes
                && now.checkpoint_flushes >= folded.checkpoint_flushes
                && now.blocks_written >= folded.blocks_written,
            "journal counters only grow"
        );
        let flushes = (now.commit_flushes + now.checkpoint_flushes)
            - (folded.commit_flushes + folded.checkpoint_flushes);
        counters.flushes.fetch_add(flushes, Ordering::Relaxed);
        let block = self.journal.geometry().block_size();
        counters.journal_bytes.fetch_add(
            (now.blocks_written - folded.blocks_written) * block,
            Ordering::Relaxed,
        );
        *folded = now;
    }

    /// Applies every committed transaction in place. Called without the
    /// image's gate; the journal serialises it with commits.
    pub fn checkpoint(&self, counters: &Counters) -> Result<()> {
        let report = self.journal.checkpoint().map_err(journal_err)?;
        self.after_checkpoint(report, counters);
        Ok(())
    }

    /// [`Self::checkpoint`] unless another thread is making one: that one
    /// gives back the ring space and logged memory this caller wants.
    fn checkpoint_unless_running(&self, counters: &Counters) -> Result<()> {
        match self.journal.try_checkpoint() {
            Some(report) => {
                self.after_checkpoint(report.map_err(journal_err)?, counters);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether the ring, or the logged bytes held, are past the point
    /// where a checkpoint should make room.
    fn checkpoint_wanted(&self) -> bool {
        // Rule 7's memory bound: logged bytes leave memory only at a
        // checkpoint, so make one at three quarters of the bound (else new
        // clusters would go in place until the ring fills).
        let logged_full = self.logged_count.load(Ordering::SeqCst) > 0 && {
            let (held, max) = self.logged.lock().held_bytes();
            held >= max / 4 * 3
        };
        self.journal.needs_checkpoint() || logged_full
    }

    /// Counts a checkpoint and drops the state it made unnecessary.
    fn after_checkpoint(&self, report: CheckpointReport, counters: &Counters) {
        self.checkpoints.fetch_add(1, Ordering::SeqCst);
        self.checkpoint_bytes
            .fetch_add(report.bytes_written, Ordering::Relaxed);
        counters
            .metadata_bytes
            .fetch_add(report.bytes_written, Ordering::Relaxed);
        counters
            .metadata_writes
            .fetch_add(report.ranges_written.len() as u64, Ordering::Relaxed);
        self.fold_stats(counters);
        self.forget_synced();
    }

    /// Drops what a checkpoint made unnecessary: guards of synced
    /// transactions, and the overlay once nothing is in flight or unsynced.
    fn forget_synced(&self) {
        let synced = self.journal.synced_seq();
        {
            let mut guards = self.guards.lock();
            guards.retain(|_, g| !matches!(g, DataGuard::Committed(s) if *s <= synced));
            self.guard_count.store(guards.len(), Ordering::SeqCst);
        }
        {
            let mut copies = self.copies.lock();
            copies.forget_synced(synced);
            self.copy_count.store(copies.len(), Ordering::SeqCst);
        }
        if self.logged_count.load(Ordering::SeqCst) > 0 {
            let mut logged = self.logged.lock();
            logged.forget_synced(synced);
            self.logged_count.store(logged.len(), Ordering::SeqCst);
        }
        let mut pending = self.pending.lock();
        if pending.in_flight == 0 && !self.journal.has_unsynced() && !self.journal.is_read_only() {
            pending.overlay = Overlay::new();
            pending.overlay_resets += 1;
        }
    }

    /// At clean close: checkpoint everything, then clear the dirty bit
    /// (rule 1: only once the journal header saying so is durable, which
    /// the checkpoint's own flush guarantees).
    pub fn clean_shutdown(&self, storage: &dyn Storage, counters: &Counters) -> Result<()> {
        if self.journal.is_read_only() {
            return Ok(());
        }
        if self.journal.has_unsynced() {
            self.checkpoint(counters)?;
        }
        if self.dirty_bit_on_disk.load(Ordering::SeqCst) && !self.journal.has_unsynced() {
            self.write_dirty_bit(storage, false, counters)?;
        }
        Ok(())
    }

    /// Rule 6, before guest data is written to `[offset, offset + len)`:
    /// if that touches the untouched bytes of a pending delayed copy, as
    /// its target or as its source, the copy must happen first: into the
    /// target it would later overwrite the write; from the source it would
    /// later copy the write's bytes instead of the old ones. A source is
    /// written in place only under deduplication: when the copies took its
    /// refcount down to 1, its last mapping gets COPIED back.
    fn copy_before_write(&self, offset: HostOffset, len: u64, counters: &Counters) -> Result<()> {
        let cs = self.cluster_size;
        let affected = |copies: &PendingCopies| {
            let mut found = copies.sourced_from(offset.0, len, cs);
            found.extend(copies.touched_by(offset.0, len, cs));
            found
        };
        if affected(&self.copies.lock())
            .iter()
            .any(|(_, state)| *state != CopyState::Gathering)
        {
            // Its transaction is enqueued: the copy descriptor will be
            // applied at checkpoint (or replay) whatever we do now. Commit
            // (every earlier transaction durable) and checkpoint (applied
            // in place and synced), then write. Rare: a second partial
            // write into the untouched part of a cluster copied in an
            // earlier epoch, or a write into a source, before the next
            // checkpoint.
            self.anchor(counters)?;
            self.checkpoint(counters)?;
        }
        // Held across the copies: two writers into one pending cluster
        // must not both copy (the second copy would land after the first
        // writer's data), and readers must not see one half made.
        let mut copies = self.copies.lock();
        for (copy, state) in affected(&copies) {
            // Not `Gathering`: its transaction was enqueued before the
            // anchor above (submits take the exclusive gate, and this
            // write holds it shared), so the anchor's commit returned after
            // it was committed and the checkpoint applied the copy in place.
            // Only the bookkeeping lags: the persist that owns it records
            // the commit when its own wait returns (found by the stress
            // test's delayed copy-on-write run), and the entry leaves at the
            // next checkpoint.
            if state != CopyState::Gathering {
                continue;
            }
            // Not submitted: copy now, as an immediate copy-on-write would
            // have, and let the epoch's data checksum cover the whole
            // cluster.
            let storage = self.journal.storage();
            let mut buf = vec![0u8; cs as usize];
            for &(at, length) in &copy.untouched {
                let piece = &mut buf[..length as usize];
                storage.read_at(piece, copy.source + at).ctx(|| {
                    format!("reading the source of a delayed copy at {:#x}", copy.source)
                })?;
                storage
                    .write_at(piece, copy.target + at)
                    .ctx(|| format!("making a delayed copy into {:#x}", copy.target))?;
                counters.data_write(piece.len());
            }
            copies.remove(copy.target);
            self.copy_count.store(copies.len(), Ordering::SeqCst);
            self.copied_in_place
                .lock()
                .push((HostOffset(copy.target), cs));
        }
        Ok(())
    }

    /// Commits an empty transaction and waits: once durable, every earlier
    /// acknowledged transaction is anchored (its data checksums are no
    /// longer checked at replay).
    fn anchor(&self, counters: &Counters) -> Result<()> {
        let mut tx = Transaction::new();
        tx.no_op();
        self.journal.commit(tx).map_err(journal_err)?;
        self.fold_stats(counters);
        Ok(())
    }
}

impl JournalBackend {
    /// Only guest data to make durable: no transaction needed, but a flush
    /// of its own would be wrong as well as costly. Wrong: the metadata of
    /// the caller's writes may sit in an earlier epoch whose transaction is
    /// still in group commit (another thread's persist gathered it), and
    /// returning before that transaction is durable would acknowledge a
    /// write a crash loses. Costly: every concurrent flusher would issue
    /// one. A flush-only item returns after the batch it joins is durable,
    /// and batches finish in order (rule 2 for the data: that batch's flush
    /// follows every data write that completed before this call).
    fn enqueue_flush_only(&self) -> Result<u64> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst);
        let commit = self.journal.flush_enqueue().map_err(journal_err)?;
        // Counted in flight like a transaction (wait_durable ends it).
        self.pending.lock().in_flight += 1;
        self.tickets.lock().insert(ticket, (commit, Vec::new()));
        Ok(ticket)
    }
}

impl MetadataBackend for JournalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Journal
    }

    fn defers_refcount_decrements(&self) -> bool {
        false
    }

    fn submit(&self, storage: &dyn Storage, epoch: Epoch, counters: &Counters) -> Result<u64> {
        let logged_dirty =
            self.logged_count.load(Ordering::SeqCst) > 0 && self.logged.lock().has_dirty();
        if epoch.is_empty() && !logged_dirty {
            return self.enqueue_flush_only();
        }
        // Rule 1.
        if !self.dirty_bit_on_disk.load(Ordering::SeqCst)
            && self.mutation != JournalMutation::SkipDirtyBit
        {
            self.write_dirty_bit(storage, true, counters)?;
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst);
        let mut tx = Transaction::new();
        for w in epoch.writes_in_order() {
            tx.write(w.offset.0, &w.bytes).map_err(journal_err)?;
        }
        // Rule 6: every copy registered since the last submit belongs to
        // this epoch (registration and the L2 entry happen under the gate
        // this submit holds exclusively).
        if self.copy_count.load(Ordering::SeqCst) > 0 {
            for (target, source, length) in self.copies.lock().take_gathering(ticket) {
                let length = u32::try_from(length).expect("within one cluster");
                tx.copy(target, source, length).map_err(journal_err)?;
            }
        }
        // Rule 7: the logged data of the clusters this epoch links (and
        // every later write into logged clusters) rides with it.
        if logged_dirty {
            for (offset, bytes) in self.logged.lock().take_dirty(ticket) {
                tx.write(offset, &bytes).map_err(journal_err)?;
            }
        }
        // Dedup index changes ride with the entries and counts they describe.
        for change in &epoch.dedup {
            let entry = DedupEntry {
                host_offset: change.host_offset,
                hash_algorithm: crate::dedup::HASH_ALGORITHM_SHA256,
                hash: change.hash.to_vec(),
            };
            match change.op {
                DedupOp::Insert => tx.dedup_insert(entry),
                DedupOp::Delete => tx.dedup_delete(entry),
            }
            .map_err(journal_err)?;
        }
        // Rule 5.
        if self.mutation != JournalMutation::SkipRevokes {
            for cluster in &epoch.freed_metadata {
                tx.revoke(cluster.0 * self.cluster_size, self.cluster_size)
                    .map_err(journal_err)?;
            }
        }
        // Rule 2. The data was written before this epoch was gathered and
        // cannot change before the commit (the gate was held while
        // gathering; rule 3 guards it after).
        let mut guarded = Vec::new();
        let copied_in_place = std::mem::take(&mut *self.copied_in_place.lock());
        if self.protocol == CommitProtocol::SingleFlush
            && self.mutation != JournalMutation::SkipDataChecksums
        {
            let mut data = vec![0u8; self.cluster_size as usize];
            let logged = (self.logged_count.load(Ordering::SeqCst) > 0).then(|| self.logged.lock());
            let copied = copied_in_place.iter().map(|&(offset, length)| NewData {
                offset,
                length,
                crc32c: None,
            });
            for range in epoch.new_data.iter().copied().chain(copied) {
                let NewData { offset, length, .. } = range;
                // Rule 7: logged bytes are in the transaction itself.
                if logged.as_ref().is_some_and(|l| l.holds(offset.0)) {
                    continue;
                }
                // The write's own checksum when nothing wrote into the
                // cluster since (`image/new_data.rs`); else the bytes are
                // read back. Either way they are the bytes on the device
                // now: the gate is held exclusively, so no write is in
                // flight, and rule 3 keeps them until the commit.
                let crc32c = match range.crc32c {
                    Some(crc32c) if !cfg!(debug_assertions) => crc32c,
                    known => {
                        let buf = &mut data[..length as usize];
                        storage
                            .read_at(buf, offset.0)
                            .ctx(|| format!("reading data at {offset} to checksum"))?;
                        let read = checksum::crc32c(buf);
                        // Tests (debug builds) hold the write-time checksum
                        // to the device's bytes: a stale one would make
                        // replay drop an acknowledged transaction.
                        assert!(
                            known.is_none_or(|k| k == read),
                            "write-time checksum of {offset}+{length} is stale"
                        );
                        read
                    }
                };
                tx.data_checksum_of(offset.0, length, crc32c)
                    .map_err(journal_err)?;
                // Guards are per cluster: a range never crosses one.
                guarded.push(offset.0 - offset.0 % self.cluster_size);
            }
        }
        {
            let mut pending = self.pending.lock();
            for w in epoch.writes_in_order() {
                pending.overlay.write(w.offset.0, &w.bytes);
            }
            pending.in_flight += 1;
        }
        if !guarded.is_empty() {
            let mut guards = self.guards.lock();
            for &offset in &guarded {
                guards.insert(offset, DataGuard::Submitted(ticket));
            }
            self.guard_count.store(guards.len(), Ordering::SeqCst);
        }
        let commit = self.journal.commit_enqueue(tx).map_err(journal_err)?;
        self.tickets.lock().insert(ticket, (commit, guarded));
        Ok(ticket)
    }

    fn wait_durable(&self, _storage: &dyn Storage, ticket: u64, counters: &Counters) -> Result<()> {
        if ticket == 0 {
            return Ok(());
        }
        let (commit, guarded) = self
            .tickets
            .lock()
            .remove(&ticket)
            .expect("every submitted ticket is waited for once");
        let result = self.journal.commit_wait(commit);
        self.pending.lock().in_flight -= 1;
        let seq = result.map_err(journal_err)?;
        // Ordering: an epoch's Ok also promises every earlier epoch durable
        // (this caller's metadata may sit in one another thread gathered).
        // If an earlier transaction failed, its owner may not have seen the
        // error and poisoned the image yet; the journal counts it before
        // answering anything queued later, so refuse here. Later failures
        // counted too only make this stricter: the image is poisoned anyway.
        let failed = self.journal.failed_commits();
        if failed > 0 {
            return Err(Error::Poisoned(format!(
                "{failed} journal transaction(s) failed; an earlier epoch may not be durable"
            )));
        }
        if let Some(why) = self.checkpointer.failure() {
            return Err(Error::Poisoned(format!(
                "a background checkpoint failed: {why}"
            )));
        }
        if self.copy_count.load(Ordering::SeqCst) > 0 {
            self.copies.lock().committed(ticket, seq);
        }
        if self.logged_count.load(Ordering::SeqCst) > 0 {
            self.logged.lock().committed(ticket, seq);
        }
        if !guarded.is_empty() {
            let mut guards = self.guards.lock();
            for offset in guarded {
                if let Some(g) = guards.get_mut(&offset) {
                    if matches!(g, DataGuard::Submitted(t) if *t == ticket) {
                        *g = DataGuard::Committed(seq);
                    }
                }
            }
        }
        self.fold_stats(counters);
        if self.checkpoint_wanted() {
            if self.checkpointer.is_running() {
                self.checkpointer.request();
            } else {
                self.checkpoint_unless_running(counters)?;
            }
        }
        Ok(())
    }

    fn read_metadata(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        offset: HostOffset,
    ) -> Result<()> {
        // Ordering: the bytes read in place and the overlay must be of one
        // moment. A checkpoint that writes the newer bytes in place and then
        // empties the overlay between this read and its patch would leave
        // the read with the older bytes and nothing to patch them: a table
        // loaded into a cache like that loses committed entries. So a read
        // that saw the overlay emptied reads again, and the last try reads
        // under the lock (no checkpoint can empty it meanwhile).
        for _ in 1..METADATA_READ_TRIES_MAX {
            let resets = self.pending.lock().overlay_resets;
            storage
                .read_at(buf, offset.0)
                .ctx(|| format!("reading metadata at {offset}"))?;
            let pending = self.pending.lock();
            if pending.overlay_resets == resets {
                pending.overlay.patch(buf, offset.0);
                return Ok(());
            }
        }
        let pending = self.pending.lock();
        storage
            .read_at(buf, offset.0)
            .ctx(|| format!("reading metadata at {offset}"))?;
        pending.overlay.patch(buf, offset.0);
        Ok(())
    }

    fn before_data_write(&self, offset: HostOffset, len: u64, counters: &Counters) -> Result<()> {
        if self.copy_count.load(Ordering::SeqCst) > 0
            && self.mutation != JournalMutation::SkipCopyBeforeWrite
        {
            self.copy_before_write(offset, len, counters)?;
        }
        if self.guard_count.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let first = offset.0 - offset.0 % self.cluster_size;
        // Data writes never cross a cluster: one guard to look at.
        debug_assert!(offset.0 + len <= first + self.cluster_size);
        // Rule 3: anchor before rewriting. The guarded transaction was
        // enqueued before this write could start (submit runs under the
        // image's gate), so a commit queued now finishes after it, and a
        // second one, written after that was acknowledged, records it:
        // two anchoring commits suffice even if the submitter has not yet
        // learnt its sequence number. The guard itself stays until the
        // transaction is synced: the journal refuses journalled writes
        // into the range until then, so the cluster must not be reused
        // as metadata (rule 4, `may_reuse`).
        for anchors in 0..3 {
            let Some(guard) = self.guards.lock().get(&first).copied() else {
                return Ok(());
            };
            let anchored = match guard {
                DataGuard::Committed(seq) => seq <= self.journal.anchored_seq(),
                DataGuard::Submitted(_) => anchors >= 2,
            };
            if anchored {
                return Ok(());
            }
            self.anchor(counters)?;
        }
        Ok(())
    }

    fn delay_copy(&self, copy: &DelayedCopy) -> bool {
        if !self.delayed_cow || self.journal.is_read_only() {
            return false;
        }
        // Rule 6 reads a delayed copy's untouched bytes from the source in
        // the file (`patch_data_read`, `copy_before_write`), and a source
        // whose newest bytes are logged (rule 7) does not have them there
        // before its checkpoint: that copy is made now, from what reads
        // see. Caught by `engine/tests/logged_data.rs`
        // (`a_snapshot_of_a_logged_cluster_keeps_its_bytes_through_copy_on_write`).
        if self.logged_count.load(Ordering::SeqCst) > 0 && self.logged.lock().holds(copy.source) {
            return false;
        }
        let mut copies = self.copies.lock();
        copies.register(copy.clone(), self.cluster_size);
        self.copy_count.store(copies.len(), Ordering::SeqCst);
        true
    }

    fn patch_data_read(&self, buf: &mut [u8], offset: HostOffset) -> Result<()> {
        if self.copy_count.load(Ordering::SeqCst) > 0 {
            // Rule 6: untouched bytes of a delayed copy are still at the
            // source. The lock keeps a copy being made in place
            // (`copy_before_write`) from interleaving with this read.
            let copies = self.copies.lock();
            let len = buf.len() as u64;
            for (at, source, length) in copies.redirects(offset.0, len, self.cluster_size) {
                let piece = &mut buf[at as usize..(at + length) as usize];
                self.journal
                    .storage()
                    .read_at(piece, source)
                    .ctx(|| format!("reading the source of a delayed copy at {source:#x}"))?;
            }
        }
        if self.journal.is_read_only() {
            // An in-memory replay's copies landed in the overlay.
            self.pending.lock().overlay.patch(buf, offset.0);
        }
        Ok(())
    }

    fn checksums_new_data(&self) -> bool {
        // The condition rule 2's checksums are written under in `submit`.
        self.protocol == CommitProtocol::SingleFlush
            && self.mutation != JournalMutation::SkipDataChecksums
    }

    fn log_fresh_data(&self, cluster: HostOffset, in_cluster: u64, data: &[u8]) -> bool {
        if !self.log_fresh_data {
            return false;
        }
        let mut logged = self.logged.lock();
        let taken = logged.log_fresh(cluster.0, in_cluster, data);
        self.logged_count.store(logged.len(), Ordering::SeqCst);
        taken
    }

    fn absorb_data_write(&self, offset: HostOffset, data: &[u8]) -> bool {
        // A cluster cannot become logged under a writer unseen here: a
        // fresh cluster is logged before its entry is set, a kept one is
        // held (and counted) before any writer can reach it again, and a
        // writer that found the entry set holds the gate, without which the
        // cluster cannot be freed and reused as a fresh one (a reuse waits
        // for a gather under the exclusive gate).
        if self.logged_count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let mut logged = self.logged.lock();
        if self.mutation == JournalMutation::WriteLoggedInPlace && logged.is_submitted(offset.0) {
            return false;
        }
        let absorbed = logged.absorb(offset.0, data);
        // A kept cluster the write did not join is gone.
        self.logged_count.store(logged.len(), Ordering::SeqCst);
        absorbed
    }

    fn read_data(&self, storage: &dyn Storage, buf: &mut [u8], offset: HostOffset) -> Result<()> {
        let read_file = |buf: &mut [u8]| {
            storage
                .read_at(buf, offset.0)
                .ctx(|| format!("reading guest data at host {offset}"))
        };
        if self.logged_count.load(Ordering::SeqCst) > 0 {
            // Rule 7. Decided under the lock: a checkpoint forgets a
            // cluster only after its bytes are in place, so either they are
            // served from here or the file already holds them. A kept
            // cluster joined again is the file's bytes under the logged
            // ones, which must be of one moment, as in `read_metadata`: a
            // read that a forget overtook reads again, and the last try
            // reads under the lock (no forget can come meanwhile).
            for last in (1..=DATA_READ_TRIES_MAX).map(|i| i == DATA_READ_TRIES_MAX) {
                let logged = self.logged.lock();
                match logged.read(buf, offset.0) {
                    LoggedRead::NotHeld => break,
                    LoggedRead::Served => return Ok(()),
                    LoggedRead::FileThenPatch(ticket) if last => {
                        read_file(buf)?;
                        let patched = logged.patch(buf, offset.0, ticket);
                        assert!(patched, "a forget ran under the logged-data lock");
                        drop(logged);
                        return self.patch_data_read(buf, offset);
                    }
                    LoggedRead::FileThenPatch(ticket) => {
                        drop(logged);
                        read_file(buf)?;
                        if self.logged.lock().patch(buf, offset.0, ticket) {
                            return self.patch_data_read(buf, offset);
                        }
                    }
                }
            }
        }
        read_file(buf)?;
        self.patch_data_read(buf, offset)
    }

    fn serves_reads_from_memory(&self) -> bool {
        // Rules 6 and 7, and a read-only open's in-memory replay: the
        // cases `read_data` and `patch_data_read` consult memory for.
        // A kept cluster (`logged_data.rs`) reads as the file holds it:
        // only logged bytes not yet synced are served or patched from
        // memory.
        self.copy_count.load(Ordering::SeqCst) > 0
            || (self.logged_count.load(Ordering::SeqCst) > 0
                && self.logged.lock().held_bytes().0 > 0)
            || self.journal.is_read_only()
    }

    fn held_end(&self) -> u64 {
        if !self.journal.is_read_only() {
            // Replay wrote in place; logged data comes later, into clusters
            // the image allocates past the end.
            return 0;
        }
        self.pending.lock().overlay.end()
    }

    fn holds_data(&self, offset: HostOffset) -> bool {
        (self.logged_count.load(Ordering::SeqCst) > 0 && self.logged.lock().holds(offset.0))
            || (self.journal.is_read_only() && self.pending.lock().overlay.covers(offset.0))
    }

    fn may_reuse(&self, cluster: HostCluster) -> bool {
        // Rule 7 (and a kept cluster is dropped here,
        // before anything else can own its bytes).
        if self.logged_count.load(Ordering::SeqCst) > 0 {
            let mut logged = self.logged.lock();
            let may = logged.may_reuse(cluster.0 * self.cluster_size);
            self.logged_count.store(logged.len(), Ordering::SeqCst);
            if !may {
                return false;
            }
        }
        // Rule 6.
        if self.copy_count.load(Ordering::SeqCst) > 0
            && self.mutation != JournalMutation::SkipCopyBeforeWrite
            && self.copies.lock().protects(cluster.0 * self.cluster_size)
        {
            return false;
        }
        if self.guard_count.load(Ordering::SeqCst) == 0 {
            return true;
        }
        let synced = self.journal.synced_seq();
        // Rule 4.
        match self.guards.lock().get(&(cluster.0 * self.cluster_size)) {
            None => true,
            Some(DataGuard::Committed(seq)) => *seq <= synced,
            Some(DataGuard::Submitted(_)) => false,
        }
    }

    fn flush_only(&self) -> Option<Result<u64>> {
        // Logged data needs no transaction here: the caller's writes into
        // logged clusters completed before the epoch that holds them was
        // gathered, which took their bytes (rule 7). Bytes other threads
        // logged since are theirs to flush.
        Some(self.enqueue_flush_only())
    }

    fn submits_under_gate(&self) -> bool {
        // Submit only enqueues the transaction (the wait comes later,
        // without the gate); it also reads the new data for checksums and
        // guards it, which no guest write may race.
        true
    }

    fn epoch_bytes_max(&self) -> Option<u64> {
        // A transaction must fit the ring: keep epochs to a quarter of it,
        // so a checkpoint can make room while others are still unsynced.
        let fill = self.journal.fill();
        Some(fill.ring_blocks * self.journal.geometry().block_size() / 4)
    }

    fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::SeqCst)
    }

    fn opened_dirty(&self) -> bool {
        self.opened_dirty
    }

    fn take_replayed_dedup(&self) -> Vec<DedupEvent> {
        std::mem::take(&mut *self.replayed_dedup.lock())
    }

    fn journal_info(&self) -> Option<super::JournalInfo> {
        let fill = self.journal.fill();
        Some(super::JournalInfo {
            offset: self.journal.base_offset(),
            size: self.journal.geometry().size_bytes(),
            commit_protocol: match self.protocol {
                CommitProtocol::SingleFlush => "single-flush".into(),
                CommitProtocol::TwoFlush => "two-flush".into(),
            },
            used_percent: fill.used_percent(),
            committed_seq: self.journal.committed_seq(),
            synced_seq: self.journal.synced_seq(),
            unsynced: self.journal.has_unsynced(),
            dirty_bit: self.dirty_bit_on_disk.load(Ordering::SeqCst),
            replayed_transactions: self.replayed,
            log_data: self.log_fresh_data,
            replay_warning: self.replay_warning.clone(),
        })
    }

    fn checkpoint(&self, _storage: &dyn Storage, counters: &Counters) -> Result<()> {
        JournalBackend::checkpoint(self, counters)
    }

    fn shutdown(&self, storage: &dyn Storage, counters: &Counters) -> Result<()> {
        self.clean_shutdown(storage, counters)
    }

    fn start_background_checkpoints(self: Arc<Self>, counters: Arc<Counters>) -> Result<()> {
        if self.journal.is_read_only() {
            return Ok(());
        }
        let backend = Arc::clone(&self);
        let thread = std::thread::Builder::new()
            .name("qj-checkpoint".into())
            .spawn(move || {
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while backend.checkpointer.next() == Next::Checkpoint {
                        // Requests made while the last checkpoint ran may
                        // have been answered by it: checkpoints back to back
                        // each cost two flushes and a header write.
                        if !backend.checkpoint_wanted() {
                            continue;
                        }
                        // Blocking, not `try_checkpoint`: a checkpoint made
                        // meanwhile by a commit that found the ring full
                        // does not forget what it synced (`forget_synced`).
                        backend.checkpoint(&counters)?;
                    }
                    Ok::<(), Error>(())
                }));
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => backend.checkpointer.failed(e.to_string()),
                    Err(_) => backend
                        .checkpointer
                        .failed("the checkpoint thread panicked".into()),
                }
            })
            .map_err(|e| Error::Io {
                context: "starting the checkpoint thread".into(),
                source: e,
            })?;
        self.checkpointer.started(thread);
        Ok(())
    }

    fn stop_background_checkpoints(&self) {
        self.checkpointer.stop();
    }
}
