//! A qcow2 image: open, read, write, write zeroes, discard, flush, resize,
//! close; shared by many threads through `&self`.
//!
//! Locking, in the order locks are taken (never the other way round):
//! 1. `gate` (shared by every metadata-changing guest operation, exclusive
//!    for flush and resize): a persist sees whole operations only, never an
//!    allocation whose refcount is raised but whose L2 entry is not yet set.
//!    Reads do not take it.
//! 2. `l1` (read for lookups, write to link a new or copied L2 table).
//! 3. one L2 table's lock (read to read or overwrite an allocated cluster,
//!    write to change an entry). A read holds it across its data I/O, so
//!    that a concurrent discard cannot free the cluster mid-read. An
//!    in-place overwrite lets go of it before its data write and relies
//!    on the gate instead: a freed cluster is reused only after a gather
//!    under the exclusive gate (`write.rs`, `write_piece`).
//! 4. `refcounts` (allocation and frees; metadata I/O only).
//!
//! Write-back: metadata changes stay in memory until the guest flushes or a
//! cache needs room; then [`Image::flush`] gathers them into an
//! [`Epoch`](crate::backend::Epoch) for the backend.
//!
//! Where each concern lives:
//! - `open.rs`: creating and opening an image, reading and validating the
//!   header and the L1 table;
//! - `backing.rs`: the backing file and the chain behind it;
//! - `journal_admin.rs`: turning the journal on and off, re-creating it;
//! - `lookup.rs`: from a guest cluster to its validated L1 and L2 entries;
//! - `read.rs` and `write.rs`: guest reads; guest writes, write zeroes,
//!   discard and copy-on-write;
//! - `persist.rs`: flush, gathering an epoch, write-back and eviction;
//! - `resize.rs`: growing and shrinking the guest disk;
//! - `snapshot.rs`: internal snapshots (create, list, apply, delete);
//! - `inspect.rs`: `info` and `map`.

mod backing;
mod bitmaps;
mod dedup;
mod dedup_persist;
mod guard;
mod inspect;
mod journal_admin;
mod lookup;
mod new_data;
mod open;
mod persist;
mod read;
mod resize;
mod snapshot;
mod write;

use std::collections::BTreeSet;
use std::sync::Arc;

use qj_journal::{MemStorage, Storage};
use qj_spec::qcow2::Header;
use qj_spec::units::{Geometry, HostOffset};

pub use self::backing::{Backing, BACKING_CHAIN_DEPTH_MAX};
pub use self::bitmaps::BitmapInfo;
pub use self::dedup::{DedupCost, DEDUP_BYTES_PER_ENTRY};
pub use self::inspect::{ImageInfo, MapExtent};
pub use crate::backend::JournalInfo;
use crate::backend::{BackendKind, MetadataBackend, MetadataWrite};
use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::lock::ImageLock;
use crate::mutation::{JournalMutation, OrderingMutation};
use crate::options::{CreateOptions, OpenOptions};
use crate::refcount::{RefcountState, SharedMetadataMap};
use crate::stats::{Counters, Stats};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, RwLock};

/// The header as it is in memory and as it was last made durable.
#[derive(Debug)]
struct HeaderState {
    mem: Header,
    disk: Header,
    dirty: bool,
}

/// The active L1 table, fully in memory.
#[derive(Debug)]
struct L1State {
    entries: Vec<u64>,
    offset: HostOffset,
    /// Clusters of the table changed in place in this epoch.
    dirty_clusters: BTreeSet<u64>,
    /// The table was moved in this epoch (growth): all of it is fresh.
    fresh: bool,
}

/// An open qcow2 image. `Send + Sync`: share it with `Arc` and call any
/// method from any thread.
#[derive(Debug)]
pub struct Image {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    writable: bool,
    /// Shared with the backend's own thread, if it has one
    /// ([`OpenOptions::background_checkpoint`](crate::OpenOptions::background_checkpoint)).
    backend: Arc<dyn MetadataBackend>,
    counters: Arc<Counters>,
    header: Mutex<HeaderState>,
    l1: RwLock<L1State>,
    l2_cache: TableCache,
    refcounts: Mutex<RefcountState>,
    /// Where metadata lives (`guard.rs`): a leaf lock, looked up on every
    /// guest data write and allocation, updated as tables move.
    metadata: SharedMetadataMap,
    gate: RwLock<()>,
    backing: Option<Backing>,
    /// Host ranges newly referenced since the last persist (`new_data.rs`).
    new_data: Mutex<new_data::NewDataLog>,
    /// How many ranges `new_data` holds: lets a guest write skip its lock
    /// when it is empty (every overwrite between persists).
    new_data_held: AtomicUsize,
    /// Whole clusters of metadata that no cache holds (a snapshot's L1
    /// copy, a new snapshot table), written into fresh clusters: the next
    /// epoch carries them with the fresh tables.
    fresh_metadata: Mutex<Vec<MetadataWrite>>,
    /// Snapshot-order bug for the crash harness (`snapshot.rs`).
    ordering_mutation: OrderingMutation,
    /// Snapshot-atomicity bug for the crash harness (`snapshot.rs`).
    journal_mutation: JournalMutation,
    /// The persistent dirty bitmaps (`bitmaps.rs`). Lock order: after the
    /// gate, before the header, the refcounts and the metadata map.
    bitmaps: Mutex<bitmaps::BitmapState>,
    /// Set when a failure left memory and disk out of step.
    poison: Mutex<Option<String>>,
    virtual_size: AtomicU64,
    /// The longest the file has been seen to be: a data cluster below it
    /// exists; one at or past it is checked against the device.
    file_len_seen: AtomicU64,
    /// Every guest write, write zeroes, discard and resize is durable
    /// before it returns (cache modes writethrough and directsync).
    writethrough: bool,
    /// The file's locks (`lock.rs`), held while the image is open; `None`
    /// for devices opened without a path.
    lock: Option<ImageLock>,
    /// Set by `close` and `abandon`: Drop then does nothing.
    finished: AtomicBool,
    /// L2 and L1 table clusters allocated since the last epoch was
    /// gathered: with the refcount side's count and `entries_changed`, an
    /// upper bound of the next epoch's size.
    fresh_tables: AtomicU64,
    /// L2 entries changed since the last gather: with `fresh_tables`, what
    /// bounds the size of the next epoch (pure overwrites change none).
    entries_changed: AtomicU64,
    /// One persist at a time waits for the gate and gathers. Without it,
    /// every concurrent flusher queues for the gate exclusively, and each
    /// waiting writer of a reader-writer lock stops new readers: guest
    /// writes stalled behind a row of gathers, most of which find their
    /// operations already gathered by the one before. With it, those find
    /// that out before taking the gate (`submitted_gen`). Lock order: this,
    /// then the gate, then `submit_order`.
    gather_order: Mutex<()>,
    /// Serialises submits in gather order; held without the gate during an
    /// ordered persist's I/O. Lock order: gate, then this.
    submit_order: Mutex<()>,
    /// The dedup index (`dedup.rs`), on a journalled image with dedup on
    /// opened for writing.
    dedup: Option<dedup::ImageDedup>,
    /// Bumped by every guest operation that changes data or metadata as it
    /// starts, while it holds the gate ([`Image::begin_op`]).
    op_gen: AtomicU64,
    /// The highest `op_gen` of an operation that has completed: what a
    /// flush must cover (operations still running when it starts are not
    /// its to wait for, and may finish in any order).
    done_gen: AtomicU64,
    /// The `op_gen` a completed persist started at: every operation counted
    /// up to it is durable. Lets concurrent flushes share one persist.
    flushed_gen: AtomicU64,
    /// The `op_gen` at the gather of the last epoch handed to the backend
    /// (raised under `submit_order`, after the submit): every operation
    /// counted up to it is in that epoch or an earlier one.
    submitted_gen: AtomicU64,
}

/// An operation counted in `op_gen` while it runs; dropped, it counts as
/// done (`done_gen`). Hold it for the whole operation, inside the gate.
#[must_use = "the operation counts as done when this is dropped"]
pub(super) struct OpGen<'a> {
    image: &'a Image,
    gen: u64,
}

impl Drop for OpGen<'_> {
    fn drop(&mut self) {
        self.image.done_gen.fetch_max(self.gen, Ordering::SeqCst);
    }
}

impl Image {
    /// Counts an operation that changes data or metadata; the caller holds
    /// the gate (shared or exclusive) for as long as it holds the result.
    pub(super) fn begin_op(&self) -> OpGen<'_> {
        OpGen {
            image: self,
            gen: self.op_gen.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size.load(Ordering::Acquire)
    }

    /// The cluster and refcount geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The counters, as of now.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// The live counters (shared with the backend).
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Which backend the image runs on.
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// The device the image lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if let Some(why) = self.poison.lock().clone() {
            return Err(Error::Poisoned(why));
        }
        Ok(())
    }

    /// Records a failure that may have left memory and disk out of step.
    /// A metadata overlap also marks the image corrupt on disk (after the
    /// poison, so that no persist starts in between).
    fn poisoned<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            {
                let mut p = self.poison.lock();
                if p.is_none() {
                    *p = Some(e.to_string());
                }
            }
            if let Error::MetadataOverlap { .. } = e {
                if let Err(marking) = self.mark_corrupt() {
                    return Err(Error::Corrupt(format!(
                        "{e}; marking the image corrupt failed too: {marking}"
                    )));
                }
            }
        }
        result
    }

    /// Flushes and closes the image, leaving it clean: deferred refcount
    /// decrements are written too, so `check` finds no leak.
    pub fn close(self) -> Result<()> {
        self.finished.store(true, Ordering::Release);
        // The last checkpoint is the close's own, made inline below.
        self.backend.stop_background_checkpoints();
        if !self.writable || self.poison.lock().is_some() {
            return Ok(());
        }
        self.dedup_write_persisted()?;
        self.begin_storing_bitmaps();
        self.persist_all()?;
        self.finish_storing_bitmaps()?;
        self.backend.shutdown(&*self.storage, &self.counters)
    }

    /// Drops the image without writing anything back, as a process killed
    /// at this instant would: what is on the device is what a crash after
    /// the last completed flush could leave. A background checkpoint in
    /// progress (`OpenOptions::background_checkpoint`) is finished first:
    /// its writes, like a killed process's last ones, are of that kind.
    pub fn abandon(self) {
        self.finished.store(true, Ordering::Release);
        self.backend.stop_background_checkpoints();
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Always: the thread holds the backend, and with it the file.
        self.backend.stop_background_checkpoints();
        if self.finished.load(Ordering::Acquire) || !self.writable {
            return;
        }
        // Best effort for callers that forgot `close`; errors are lost here.
        if self.poison.lock().is_none() {
            let _ = self.persist_all();
        }
    }
}

/// An in-memory image, for tests and examples.
pub fn create_in_memory(opts: &CreateOptions) -> Result<Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), opts)?;
    Image::open(storage, &OpenOptions::read_write())
}
