//! The cluster-management interface: the one door every qcow2 metadata
//! change passes through on its way to the disk.
//!
//! The image keeps metadata in memory (L1 table, refcount table, cached L2
//! tables and refcount blocks, the header) and changes it there. When the
//! guest flushes, or a cache must make room, the image gathers every change
//! since the last time into an [`Epoch`], sorted by *ordering class*, and
//! hands it to its [`MetadataBackend`]. The classes say what each write
//! depends on; each backend turns that into durable state its own way:
//!
//! - [`ordered::FlushOrdering`] writes the classes in place, in dependency
//!   order, with a device flush between dependent groups (QEMU's way);
//! - the journalled backend writes the whole epoch as one journal
//!   transaction and applies it in place only at checkpoint.
//!
//! Both see exactly the same epochs, which is what makes their flush counts,
//! bytes and crash behaviour comparable.

pub(crate) mod checkpointer;
pub mod delayed_cow;
pub mod journal;
pub(crate) mod journal_usable;
pub mod logged_data;
pub mod ordered;

use std::fmt;
use std::sync::Arc;

use qj_journal::Storage;
use qj_spec::units::{HostCluster, HostOffset};

pub use delayed_cow::DelayedCopy;

use crate::error::{IoContext, Result};
use crate::stats::Counters;

/// One metadata write: `bytes` go to `offset` in the image file.
#[derive(Clone, PartialEq, Eq)]
pub struct MetadataWrite {
    /// Where in the image file.
    pub offset: HostOffset,
    /// The new content (a whole table cluster, or a header cluster).
    pub bytes: Vec<u8>,
}

impl fmt::Debug for MetadataWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MetadataWrite({}, {} bytes)",
            self.offset,
            self.bytes.len()
        )
    }
}

/// A range of guest data an epoch newly references (never across a
/// cluster boundary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewData {
    /// Where the range starts.
    pub offset: HostOffset,
    /// Its length in bytes.
    pub length: u64,
    /// CRC-32C of the bytes on disk there, taken from the buffer that was
    /// written if nothing has written into the cluster since (only when
    /// [`MetadataBackend::checksums_new_data`]); `None`: read them back.
    pub crc32c: Option<u32>,
}

/// Every metadata change of one epoch (the span between two persists),
/// grouped by what it depends on.
///
/// The classes, and the dependency each expresses:
/// - `fresh_refcount`: refcount blocks and refcount table clusters allocated
///   in this epoch. Nothing on disk points to them yet.
/// - `refcount_links`: the writes that make fresh refcount structures
///   reachable: refcount table entries pointing to fresh blocks, or a header
///   switching to a fresh refcount table. Depend on `fresh_refcount`.
/// - `refcount_blocks`: existing refcount blocks with changed counts.
///   Depend on `refcount_links` (a count in an unreachable block counts for
///   nothing).
/// - `fresh_tables`: L2 tables and L1 tables allocated in this epoch.
/// - `tables`: existing L2 tables and L1 entries changed in place, and the
///   header when it switches to a fresh L1 table or changes size. They make
///   clusters reachable, so they depend on everything above *and* on the
///   guest data written into newly referenced clusters.
/// - `new_data`: host ranges of guest data that entries in `tables` or
///   `fresh_tables` newly reference (their content was written before the
///   epoch was gathered): the whole cluster, or only the bytes written
///   when the rest of the cluster is a hole past the end of the file.
/// - `freed_metadata`: clusters that held metadata and were freed in this
///   epoch; a journal must revoke its earlier writes to them.
#[derive(Debug, Default)]
pub struct Epoch {
    /// Fresh refcount blocks and refcount table clusters.
    pub fresh_refcount: Vec<MetadataWrite>,
    /// Links to fresh refcount structures (table entries, header switch).
    pub refcount_links: Vec<MetadataWrite>,
    /// Changed existing refcount blocks.
    pub refcount_blocks: Vec<MetadataWrite>,
    /// Fresh L2 and L1 tables.
    pub fresh_tables: Vec<MetadataWrite>,
    /// Changed existing L2 tables, L1 table chunks, and the header.
    pub tables: Vec<MetadataWrite>,
    /// Newly referenced guest data ranges.
    pub new_data: Vec<NewData>,
    /// Freed metadata clusters.
    pub freed_metadata: Vec<HostCluster>,
    /// Dedup index changes (`dedup/`): insertions for clusters this epoch
    /// links, deletions for clusters it frees. Only a journal carries them,
    /// in the transaction that carries the entries and counts.
    pub dedup: Vec<crate::dedup::DedupChange>,
}

impl Epoch {
    /// Whether the epoch holds no metadata change at all.
    pub fn is_empty(&self) -> bool {
        self.fresh_refcount.is_empty()
            && self.refcount_links.is_empty()
            && self.refcount_blocks.is_empty()
            && self.fresh_tables.is_empty()
            && self.tables.is_empty()
            && self.dedup.is_empty()
    }

    /// Every metadata write of the epoch, in dependency order.
    pub fn writes_in_order(&self) -> impl Iterator<Item = &MetadataWrite> {
        self.fresh_refcount
            .iter()
            .chain(&self.refcount_links)
            .chain(&self.refcount_blocks)
            .chain(&self.fresh_tables)
            .chain(&self.tables)
    }
}

/// A journal's state, as a backend that has one reports it (the journal
/// part of [`ImageInfo`](crate::image::ImageInfo)).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct JournalInfo {
    /// Host offset of the journal region.
    pub offset: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// `single-flush` or `two-flush` (the draft's).
    pub commit_protocol: String,
    /// Ring fill in percent.
    pub used_percent: u64,
    /// Last committed sequence number.
    pub committed_seq: u64,
    /// Last synced (checkpointed) sequence number.
    pub synced_seq: u64,
    /// Whether committed transactions wait for a checkpoint.
    pub unsynced: bool,
    /// The qcow2 "journal dirty" bit as it is in the header in place.
    pub dirty_bit: bool,
    /// Transactions the last open replayed (in place, or in memory for a
    /// read-only open).
    pub replayed_transactions: u64,
    /// Whether small writes into fresh clusters travel in the journal
    /// (logged data) on this open.
    pub log_data: bool,
    /// What the last open's replay found that the user must hear about (a
    /// torn last transaction that may have been acknowledged).
    pub replay_warning: Option<String>,
}

/// Which backend an image runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BackendKind {
    /// QEMU-style flush ordering.
    FlushOrdering,
    /// The qjournal.
    Journal,
}

/// How metadata reaches the disk. See the module documentation.
pub trait MetadataBackend: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Whether refcount decrements must wait until the change that
    /// unreferences the cluster is durable (true for flush ordering: a
    /// decrement that reached the disk before the cleared L2 entry would
    /// leave an entry pointing at a free cluster). A journal makes both
    /// durable atomically, so it applies them in the same epoch.
    fn defers_refcount_decrements(&self) -> bool;

    /// Starts making every write of `epoch` durable, together with every
    /// guest data write that completed before this call, and returns a
    /// ticket for [`MetadataBackend::wait_durable`]. Called with the image's
    /// gate held exclusively (so epochs are submitted in order); it must not
    /// wait for other threads. Once the ticket is durable, a crash leaves the
    /// image with all of the epoch; a crash before leaves it consistent
    /// (flush ordering: possibly with leaks; journal: clean, with all or none
    /// of the epoch).
    fn submit(&self, storage: &dyn Storage, epoch: Epoch, counters: &Counters) -> Result<u64>;

    /// Returns when the epoch of `ticket` (and every earlier one) is
    /// durable. Called without the gate, so that a journal can batch the
    /// epochs of many threads into one commit.
    fn wait_durable(&self, storage: &dyn Storage, ticket: u64, counters: &Counters) -> Result<()>;

    /// A ticket for [`MetadataBackend::wait_durable`] that is durable once
    /// every epoch submitted before this call is, and every guest data
    /// write that completed before it: what a flush needs whose operations
    /// an earlier epoch already holds. Unlike [`MetadataBackend::submit`],
    /// called without the gate, under the image's submit order only. `None`
    /// where the backend has no such ticket, or needs an epoch after all
    /// (the flush then gathers one under the gate, as usual).
    fn flush_only(&self) -> Option<Result<u64>> {
        None
    }

    /// Called before guest data is written to `[offset, offset + len)` of
    /// a data cluster (never across clusters). A journal may first have to
    /// make an earlier transaction's data checksum unnecessary.
    fn before_data_write(&self, offset: HostOffset, len: u64, counters: &Counters) -> Result<()> {
        let _ = (offset, len, counters);
        Ok(())
    }

    /// Offers to carry a delayed copy-on-write (`delayed_cow.rs`): called
    /// before the L2 entry that links `copy.target` is set, with the
    /// image's gate held shared and the L2 table locked. True: the backend
    /// fills the untouched ranges from the source in the transaction that
    /// links the target, and serves reads of them until then. False: the
    /// image must copy now (flush ordering has no way to delay it).
    fn delay_copy(&self, copy: &DelayedCopy) -> bool {
        let _ = copy;
        false
    }

    /// Whether some guest data reads are served (or patched) from memory
    /// rather than the file: delayed copies, logged data, an in-memory
    /// replay. While false, a data cluster reads exactly as the file holds
    /// it at the offset its L2 entry names.
    fn serves_reads_from_memory(&self) -> bool {
        false
    }

    /// Called after guest data was read from `[offset, offset + buf.len())`
    /// of a data cluster (never across clusters): replaces bytes the disk
    /// does not hold yet (the untouched ranges of a delayed copy, or what an
    /// in-memory replay found).
    fn patch_data_read(&self, buf: &mut [u8], offset: HostOffset) -> Result<()> {
        let _ = (buf, offset);
        Ok(())
    }

    /// Offers to carry `data`, written at `in_cluster` into the fresh
    /// cluster at `cluster` past the end of the file, in the transaction
    /// that links it (`logged_data.rs`). Called with the gate held shared
    /// and the L2 table locked, before the entry is set. True: the backend
    /// has the bytes, serves reads of the cluster and takes every later
    /// write into it ([`MetadataBackend::absorb_data_write`]) until they
    /// are in place; the image writes nothing. False: write in place.
    fn log_fresh_data(&self, cluster: HostOffset, in_cluster: u64, data: &[u8]) -> bool {
        let _ = (cluster, in_cluster, data);
        false
    }

    /// Whether `submit` checksums [`Epoch::new_data`]: if so, the image
    /// takes each range's checksum from the buffer it wrote, so the submit
    /// need not read the bytes back.
    fn checksums_new_data(&self) -> bool {
        false
    }

    /// Called before guest data is written to `offset` (never across
    /// clusters): true if the backend took the write (the cluster's newest
    /// bytes are logged data), and the image must not write in place.
    fn absorb_data_write(&self, offset: HostOffset, data: &[u8]) -> bool {
        let _ = (offset, data);
        false
    }

    /// Reads guest data at `offset` of a data cluster (never across
    /// clusters), as the backend knows it. Called with the cluster's L2
    /// table locked.
    fn read_data(&self, storage: &dyn Storage, buf: &mut [u8], offset: HostOffset) -> Result<()> {
        storage
            .read_at(buf, offset.0)
            .ctx(|| format!("reading guest data at host {offset}"))?;
        self.patch_data_read(buf, offset)
    }

    /// Whether the backend holds the data at `offset` that the file does not
    /// (yet): a data cluster past the end of the file is then no corruption.
    fn holds_data(&self, offset: HostOffset) -> bool {
        let _ = offset;
        false
    }

    /// One past the last byte the backend holds for the file beyond what
    /// the file holds (a journal replayed in memory: its tables and data may
    /// lie past the end of the file); 0 if none.
    fn held_end(&self) -> u64 {
        0
    }

    /// Whether a cluster whose count reached zero, and whose unreferencing
    /// is durable, may be handed out again now.
    fn may_reuse(&self, cluster: HostCluster) -> bool {
        let _ = cluster;
        true
    }

    /// How many times committed metadata was applied in place since open
    /// (a journal's checkpoints; the open's replay counts as one): the
    /// persisted dedup index is rewritten after each (spec §3.6).
    fn checkpoints(&self) -> u64 {
        0
    }

    /// Whether the image was opened after an unclean shutdown (a journal
    /// found dirty): a persisted dedup index may then be older than the
    /// log and is rehashed before use (spec §3.6).
    fn opened_dirty(&self) -> bool {
        false
    }

    /// Writes everything durable so far to its place (a journal's
    /// checkpoint; nothing to do in place already).
    fn checkpoint(&self, storage: &dyn Storage, counters: &Counters) -> Result<()> {
        let _ = (storage, counters);
        Ok(())
    }

    /// Starts a thread that makes this backend's checkpoints, so that no
    /// flush waits for one (`checkpointer.rs`). Nothing to do where nothing
    /// is checkpointed.
    fn start_background_checkpoints(self: Arc<Self>, counters: Arc<Counters>) -> Result<()> {
        let _ = counters;
        Ok(())
    }

    /// Ends that thread, after any checkpoint it is making, and waits for
    /// it. Idempotent.
    fn stop_background_checkpoints(&self) {}

    /// Leaves the image clean for programs that do not know this backend
    /// (called by a clean close after the last persist).
    fn shutdown(&self, storage: &dyn Storage, counters: &Counters) -> Result<()> {
        let _ = (storage, counters);
        Ok(())
    }

    /// Whether `submit` must run before guest operations resume (under the
    /// image's gate). False lets guest I/O go on during a synchronous
    /// submit (flush ordering writes and flushes in it).
    fn submits_under_gate(&self) -> bool {
        false
    }

    /// The largest epoch, in bytes, the backend can take at once; the image
    /// persists early when an epoch grows towards it. `None`: no limit.
    fn epoch_bytes_max(&self) -> Option<u64> {
        None
    }

    /// Takes the dedup entries the journal's replay found at open, in log
    /// order (spec §8.5); empty for backends without a journal and for
    /// images without dedup.
    fn take_replayed_dedup(&self) -> Vec<qj_journal::DedupEvent> {
        Vec::new()
    }

    /// The journal's state, for backends that have one.
    fn journal_info(&self) -> Option<JournalInfo> {
        None
    }

    /// Reads metadata at `offset`, as the backend knows it (a journal may
    /// hold writes not yet checkpointed in place).
    fn read_metadata(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        offset: HostOffset,
    ) -> Result<()>;
}
