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
//!    write to change an entry). Data I/O happens under this per-table lock
//!    only, so that a concurrent discard cannot free a cluster mid-I/O.
//! 4. `refcounts` (allocation and frees; metadata I/O only).
//!
//! Write-back: metadata changes stay in memory until the guest flushes or a
//! cache needs room; then [`Image::flush`] gathers them into an
//! [`Epoch`](crate::backend::Epoch) for the backend.

use std::collections::BTreeSet;
use std::path::Path;

use qj_journal::{CommitProtocol, FileStorage, MemStorage, Storage};
use qj_spec::qcow2::{
    features, read_table_entry, write_table_entry, Header, HeaderExtension, JournalExtension,
    L1Entry, L2Entry,
};
use qj_spec::units::{Geometry, GuestCluster, GuestOffset, HostCluster, HostOffset};
use serde::Serialize;

use crate::backend::journal::JournalBackend;
use crate::backend::ordered::FlushOrdering;
use crate::backend::{BackendKind, DelayedCopy, Epoch, MetadataBackend, MetadataWrite};
use crate::backing::Backing;
use crate::cache::{CachedTable, TableCache, WritebackPins};
use crate::compressed::inflate_cluster;
use crate::error::{Error, IoContext, Result};
use crate::options::{BackingFormat, BackingSource, CreateOptions, JournalConfig, OpenOptions};
use crate::refcount::RefcountState;
use crate::stats::{Counters, Stats};
use crate::sync::{Arc as SyncArc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock};
use std::sync::Arc;

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

/// One extent of the guest disk as [`Image::map`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapExtent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the bytes are stored in this image (false: backing or zeros).
    pub data: bool,
    /// Whether the extent reads as zeros.
    pub zero: bool,
    /// Whether the extent is stored compressed.
    pub compressed: bool,
    /// Host offset of the first byte, for uncompressed data.
    pub offset: Option<u64>,
}

/// What `qj info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Image file length in bytes.
    pub file_length: u64,
    /// Backing file name from the header.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// The dirty bit (incompatible bit 0).
    pub dirty: bool,
    /// The corrupt bit (incompatible bit 1).
    pub corrupt: bool,
    /// Internal snapshots.
    pub snapshots: u32,
    /// L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Header extensions present, by name.
    pub extensions: Vec<String>,
    /// The metadata backend in use.
    pub backend: BackendKind,
    /// The journal, when the image has one in use.
    pub journal: Option<JournalInfo>,
}

/// The journal part of [`ImageInfo`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
}

/// An open qcow2 image. `Send + Sync`: share it with `Arc` and call any
/// method from any thread.
#[derive(Debug)]
pub struct Image {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    writable: bool,
    backend: Box<dyn MetadataBackend>,
    counters: Arc<Counters>,
    header: Mutex<HeaderState>,
    l1: RwLock<L1State>,
    l2_cache: TableCache,
    refcounts: Mutex<RefcountState>,
    gate: RwLock<()>,
    backing: Option<Backing>,
    /// Host ranges newly referenced since the last persist.
    new_data: Mutex<Vec<(HostOffset, u64)>>,
    /// Set when a failure left memory and disk out of step.
    poison: Mutex<Option<String>>,
    virtual_size: AtomicU64,
    /// The longest the file has been seen to be: a data cluster below it
    /// exists; one at or past it is checked against the device.
    file_len_seen: AtomicU64,
    /// Set by `close` and `abandon`: Drop then does nothing.
    finished: AtomicBool,
    /// L2 and L1 table clusters allocated since the last epoch was
    /// gathered: with the refcount side's count and `entries_changed`, an
    /// upper bound of the next epoch's size.
    fresh_tables: AtomicU64,
    /// L2 entries changed since the last gather: with `fresh_tables`, what
    /// bounds the size of the next epoch (pure overwrites change none).
    entries_changed: AtomicU64,
    /// Serialises submits in gather order; held without the gate during an
    /// ordered persist's I/O. Lock order: gate, then this.
    submit_order: Mutex<()>,
    /// Bumped by every guest operation that changed data or metadata, while
    /// it holds the gate.
    op_gen: AtomicU64,
    /// The `op_gen` a completed persist started at: every operation counted
    /// up to it is durable. Lets concurrent flushes share one persist.
    flushed_gen: AtomicU64,
}

/// The header cluster is read in two steps: the fixed part names the
/// cluster size, then the whole cluster (extensions, backing name) is read.
const HEADER_PROBE_BYTES: usize = 512;

impl Image {
    /// Creates an empty image on `storage`. An image with a journal needs
    /// a shared device: use [`Image::create_shared`].
    pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        if opts.journal.is_some() {
            return Err(Error::InvalidArgument(
                "creating a journalled image needs a shared device (Image::create_shared)".into(),
            ));
        }
        crate::create::create(storage, opts)
    }

    /// Creates an empty image on `storage`, with a journal if asked.
    pub fn create_shared(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<()> {
        crate::create::create(&*storage, opts)?;
        if let Some(journal) = &opts.journal {
            Self::enable_journal(storage, journal)?;
        }
        Ok(())
    }

    /// Creates an empty image file at `path` (replacing any file there).
    pub fn create_path(path: &Path, opts: &CreateOptions) -> Result<()> {
        let storage = FileStorage::create(path).ctx(|| format!("creating {}", path.display()))?;
        Self::create_shared(Arc::new(storage), opts)
    }

    /// Opens the image file at `path`.
    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let storage =
            FileStorage::open(path, opts.writable).ctx(|| format!("opening {}", path.display()))?;
        let mut opts = opts.clone();
        if opts.base_dir.is_none() {
            opts.base_dir = path.parent().map(Path::to_path_buf);
        }
        Self::open(Arc::new(storage), &opts)
    }

    /// Opens an image on `storage`: with the journalled backend when the
    /// header locates a valid qjournal (replaying it first), else with the
    /// flush-ordering backend.
    ///
    /// A read-write open writes before it is done (the journal's replay in
    /// place, a re-created journal, cleared autoclear bits), so it first
    /// opens the image read-only, with the journal replayed in memory:
    /// whatever would refuse the image refuses it before any byte changes.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        if opts.writable {
            let mut read_only = opts.clone();
            read_only.writable = false;
            let probe = Self::open_unchecked(storage.clone(), &read_only)?;
            let header = probe.header.lock().mem.clone();
            probe.close()?;
            refuse_writing(&header)?;
        }
        Self::open_unchecked(storage, opts)
    }

    /// [`Image::open`] without the read-only probe of a read-write open.
    fn open_unchecked(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let header = Self::read_header(&*storage)?;
        let ordered = || Box::new(FlushOrdering::with_mutation(opts.ordering_mutation));
        let Some(ext) = header.journal() else {
            return Self::open_with_backend(storage, opts, ordered());
        };
        if !header.has_autoclear(features::AUTOCLEAR_JOURNAL_VALID_BIT) {
            // A program that does not know the journal opened the image
            // read-write since (QEMU clears unknown autoclear bits), which
            // it could do only while the journal was clean: the metadata in
            // place is authoritative and the journal's clusters may have
            // been freed and reused. Reading needs nothing from the journal;
            // writing gets a fresh one.
            if !opts.writable {
                return Self::open_with_backend(storage, opts, ordered());
            }
            return Self::recreate_journal(storage, opts, ext);
        }
        let file_len = storage.len().ctx(|| "reading the image length".into())?;
        let cs = header.geometry().cluster_size();
        let field = |name: &'static str, reason: String| {
            Error::Format(qj_spec::error::FormatError::Field {
                structure: "journal extension",
                field: name,
                offset: 0,
                reason,
            })
        };
        if ext.offset == 0 || ext.offset % cs != 0 {
            return Err(field(
                "offset",
                format!(
                    "{:#x} is not a cluster-aligned offset past the header",
                    ext.offset
                ),
            ));
        }
        if ext.size == 0
            || ext.size % cs != 0
            || ext
                .offset
                .checked_add(ext.size)
                .is_none_or(|end| end > file_len)
        {
            return Err(field(
                "size",
                format!(
                    "{:#x} at {:#x} is not whole clusters inside the file ({file_len:#x} bytes)",
                    ext.size, ext.offset
                ),
            ));
        }
        let protocol = crate::backend::journal::commit_protocol(&ext);
        let (backend, _replay) = JournalBackend::open(
            storage.clone(),
            HostOffset(ext.offset),
            ext.size,
            cs,
            protocol,
            opts.writable,
            header.has_incompatible(features::INCOMPAT_JOURNAL_DIRTY_BIT),
            opts.journal_mutation,
            opts.delayed_cow,
            opts.log_fresh_data || ext.flags & JournalExtension::FLAG_LOG_DATA != 0,
        )?;
        Self::open_with_backend(storage, opts, Box::new(backend))
    }

    /// Gives an image without a journal a fresh one: clusters allocated and
    /// counted, the region formatted, then one header write that links it.
    /// Each step is durable before the next, so a crash in between leaves
    /// at worst leaked clusters.
    pub fn enable_journal(storage: Arc<dyn Storage>, config: &JournalConfig) -> Result<()> {
        let image = Self::open_for_metadata_change(storage.clone())?;
        if image.header.lock().mem.journal().is_some() {
            return Err(Error::InvalidArgument(
                "the image already has a journal".into(),
            ));
        }
        let g = image.geometry;
        let cs = g.cluster_size();
        let size = config.size_bytes.next_multiple_of(cs);
        // Metadata is written back in 512-byte sectors: journal blocks of
        // the same size carry them without padding (4 KiB blocks made each
        // synced allocating write log 16 KiB instead of 2 KiB).
        let block_size = 512u32;
        // One operation's epoch may hold two fresh tables (an L2 table and
        // a refcount block) besides its sectors, and epochs are kept to a
        // quarter of the ring (`epoch_bytes_max`): 8 clusters and 64 KiB
        // of room cover that with margin.
        let size_min = 8 * cs + (64 << 10);
        if size < size_min || size > 1 << 32 {
            return Err(Error::InvalidArgument(format!(
                "journal_size {size} must be at least {size_min} bytes (8 clusters + 64 KiB) and at most 4 GiB"
            )));
        }

        let start = image.refcounts.lock().allocate_contiguous(
            &*image.storage,
            &*image.backend,
            &image.counters,
            size / cs,
        )?;
        // The journal's counts are durable before it is formatted and linked.
        image.persist_all()?;
        let offset = g.host_offset(start);
        // The region lies inside the file, so that every cluster the image
        // counts exists (QEMU's check treats counted clusters past the end
        // of the file as errors, and so does ours).
        let end = offset.0 + size;
        if storage.len().ctx(|| "reading the image length".into())? < end {
            storage
                .set_len(end)
                .ctx(|| "extending the image over the journal".into())?;
        }
        let protocol = if config.two_flush {
            CommitProtocol::TwoFlush
        } else {
            CommitProtocol::SingleFlush
        };
        JournalBackend::format(storage.clone(), offset, size, block_size, protocol)?;
        // The formatted region is durable before the header points to it.
        storage.flush().ctx(|| "flushing the new journal".into())?;
        {
            let mut h = image.header.lock();
            h.mem.set_journal(Some(JournalExtension {
                offset: offset.0,
                size,
                flags: if config.two_flush {
                    JournalExtension::FLAG_TWO_FLUSH_COMMIT
                } else {
                    0
                } | if config.log_data {
                    JournalExtension::FLAG_LOG_DATA
                } else {
                    0
                },
            }));
            h.mem.autoclear_features |= features::AUTOCLEAR_JOURNAL_VALID_MASK;
            name_journal_features(&mut h.mem);
            h.dirty = true;
        }
        image.close()
    }

    /// Opens read-write on flush ordering without the backing file, to
    /// change the image's own structure (journal on, off, re-created).
    fn open_for_metadata_change(storage: Arc<dyn Storage>) -> Result<Image> {
        let opts = OpenOptions {
            backing: BackingSource::Ignore,
            ..OpenOptions::read_write()
        };
        Self::open_with_backend(storage, &opts, Box::new(FlushOrdering::new()))
    }

    /// Removes the journal: replays and checkpoints it, unlinks it from
    /// the header, then frees its clusters (after the unlinking is durable,
    /// by the usual free rules).
    pub fn disable_journal(storage: Arc<dyn Storage>) -> Result<()> {
        let opts = OpenOptions {
            backing: BackingSource::Ignore,
            ..OpenOptions::read_write()
        };
        Self::open(storage.clone(), &opts)?.close()?;
        let image = Self::open_for_metadata_change(storage)?;
        let Some(ext) = image.header.lock().mem.journal() else {
            return image.close();
        };
        {
            let mut h = image.header.lock();
            h.mem.set_journal(None);
            h.mem.autoclear_features &= !features::AUTOCLEAR_JOURNAL_VALID_MASK;
            h.dirty = true;
        }
        {
            let g = image.geometry;
            let mut rc = image.refcounts.lock();
            for i in 0..ext.size / g.cluster_size() {
                let cluster = HostCluster(g.host_cluster(HostOffset(ext.offset)).0 + i);
                rc.free(&*image.storage, &*image.backend, cluster)?;
            }
        }
        image.close()
    }

    /// After a program that does not know the journal wrote the image: drop
    /// the stale journal, free exactly its clusters that are now leaked
    /// (those the other program did not reuse), and create a fresh one.
    fn recreate_journal(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        old: JournalExtension,
    ) -> Result<Image> {
        // The new journal's clusters come from the refcounts: refcounts
        // that are too low would hand out clusters in use (the header, the
        // tables) and the zero-filled journal would overwrite them. Decided
        // before anything is written, so that the refusal changes nothing;
        // the stale journal's own clusters are only leaks.
        let report =
            crate::check::check(&*storage, crate::check::RepairMode::None, &[]).map_err(|e| {
                Error::Journal(format!(
                    "checking the image before re-creating its journal: {e}"
                ))
            })?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "{} corruption(s) and {} check error(s) found before re-creating the journal",
                report.corruptions, report.check_errors
            )));
        }
        let image = Self::open_for_metadata_change(storage.clone())?;
        {
            let mut h = image.header.lock();
            h.mem.set_journal(None);
            h.dirty = true;
        }
        image.close()?;
        crate::check::check(&*storage, crate::check::RepairMode::Leaks, &[])
            .map_err(|e| Error::Journal(format!("freeing the stale journal's clusters: {e}")))?;
        let config = JournalConfig {
            size_bytes: old.size,
            two_flush: old.flags & JournalExtension::FLAG_TWO_FLUSH_COMMIT != 0,
            log_data: old.flags & JournalExtension::FLAG_LOG_DATA != 0,
        };
        Self::enable_journal(storage.clone(), &config)?;
        Self::open(storage, opts)
    }

    /// Reads and validates the header of the image on `storage`, without
    /// opening it. Nothing is written.
    pub fn read_header(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage.len().ctx(|| "reading the image length".into())?;
        Self::read_header_with(file_len, &mut |buf, offset| {
            storage
                .read_at(buf, offset)
                .ctx(|| "reading the header".into())
        })
    }

    /// Reads the header with `read` from a file of `file_len` bytes.
    fn read_header_with(
        file_len: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<Header> {
        let mut probe = vec![0u8; HEADER_PROBE_BYTES.min(file_len as usize)];
        read(&mut probe, 0)?;
        if probe.len() < 24 {
            return Ok(Header::decode(&probe)?);
        }
        let cluster_bits = u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]]);
        let want =
            if (Geometry::CLUSTER_BITS_MIN..=Geometry::CLUSTER_BITS_MAX).contains(&cluster_bits) {
                (1usize << cluster_bits).min(file_len as usize)
            } else {
                probe.len()
            };
        let mut bytes = vec![0u8; want];
        read(&mut bytes, 0)?;
        Ok(Header::decode(&bytes)?)
    }

    /// Opens an image on `storage` with the given backend.
    pub fn open_with_backend(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        backend: Box<dyn MetadataBackend>,
    ) -> Result<Image> {
        // A journal replayed in memory may hold tables past the end of the
        // file (the write that extended the file for them was lost, or they
        // were only ever in the journal): the image, as replay leaves it,
        // reaches that far.
        let file_len = storage
            .len()
            .ctx(|| "reading the image length".into())?
            .max(backend.held_end());
        // Through the backend: a journal replayed in memory may hold a newer
        // header than the one in place.
        let mut header = Self::read_header_with(file_len, &mut |buf, offset| {
            backend.read_metadata(&*storage, buf, HostOffset(offset))
        })?;
        if backend.kind() == BackendKind::Journal {
            // Every header this image journals says the journal may be dirty
            // (the in-place bit is the backend's to set and clear).
            header.incompatible_features |= features::INCOMPAT_JOURNAL_DIRTY_MASK;
        }
        match header.unsupported_features() {
            // Like QEMU, an image marked corrupt may still be read.
            Err(qj_spec::error::FormatError::MarkedCorrupt) if !opts.writable => {}
            other => other?,
        }
        if header.has_incompatible(features::INCOMPAT_JOURNAL_DIRTY_BIT)
            && backend.kind() != BackendKind::Journal
        {
            return Err(Error::Unsupported(
                "the image's qjournal is dirty (journal dirty bit); open it with the journal backend to replay it".into(),
            ));
        }
        header.validate_layout(file_len)?;
        let geometry = header.geometry();
        let cs = geometry.cluster_size();
        if opts.writable {
            refuse_writing(&header)?;
        }

        let l1_entries = header.l1_size as usize;
        let mut raw = vec![0u8; l1_entries * 8];
        backend.read_metadata(&*storage, &mut raw, HostOffset(header.l1_table_offset))?;
        let entries: Vec<u64> = (0..l1_entries).map(|i| read_table_entry(&raw, i)).collect();
        validate_l1_entries(&entries, geometry, header.l1_table_offset, file_len)?;

        let tables_max = (opts.cache_bytes_max / cs).max(4) as usize;
        let refcounts = RefcountState::open(
            &*storage,
            &*backend,
            geometry,
            HostOffset(header.refcount_table_offset),
            u64::from(header.refcount_table_clusters),
            geometry.clusters_for(file_len),
            tables_max,
        )?;
        if opts.writable && backend.kind() == BackendKind::Journal {
            // A single-flush commit can be durable while the write that
            // extended the file for its data is not; its data checksum still
            // matches when that data was all zeros (bytes past the end read
            // as zeros). Replay then leaves counted clusters past the end of
            // the file: extend the file over them, which is exactly their
            // verified content. (Found by the crash harness.)
            let end = refcounts.free_index().end() * cs;
            if end > file_len {
                storage
                    .set_len(end)
                    .ctx(|| "extending the image over replayed clusters".into())?;
                storage.flush().ctx(|| "flushing the image length".into())?;
            }
        }

        let backing = Self::open_backing(&header, opts)?;
        let image = Image {
            storage,
            geometry,
            writable: opts.writable,
            backend,
            counters: Arc::new(Counters::default()),
            virtual_size: AtomicU64::new(header.size),
            file_len_seen: AtomicU64::new(file_len),
            l1: RwLock::new(L1State {
                entries,
                offset: HostOffset(header.l1_table_offset),
                dirty_clusters: BTreeSet::new(),
                fresh: false,
            }),
            header: Mutex::new(HeaderState {
                mem: header.clone(),
                disk: header,
                dirty: false,
            }),
            l2_cache: TableCache::new("L2 tables", cs as usize, tables_max),
            refcounts: Mutex::new(refcounts),
            gate: RwLock::new(()),
            backing,
            new_data: Mutex::new(Vec::new()),
            poison: Mutex::new(None),
            finished: AtomicBool::new(false),
            submit_order: Mutex::new(()),
            fresh_tables: AtomicU64::new(0),
            entries_changed: AtomicU64::new(0),
            op_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        };
        if opts.writable {
            image.clear_autoclear_bits()?;
        }
        Ok(image)
    }

    /// A writer that does not maintain a feature must clear its autoclear
    /// bit before its first write (qcow2 spec), so that the feature's owner
    /// later knows its data may be stale: the bitmaps extension stays, and
    /// QEMU discards the bitmaps as inconsistent. Durable before any write.
    fn clear_autoclear_bits(&self) -> Result<()> {
        let mut h = self.header.lock();
        // The journal's "journal valid" bit is ours to keep while we
        // maintain the journal.
        let kept = if self.backend.kind() == BackendKind::Journal {
            features::AUTOCLEAR_JOURNAL_VALID_MASK
        } else {
            0
        };
        if h.mem.autoclear_features & !kept == 0 {
            return Ok(());
        }
        h.mem.autoclear_features &= kept;
        let bytes = h.mem.encode()?;
        self.storage
            .write_at(&bytes, 0)
            .ctx(|| "clearing autoclear feature bits".into())?;
        self.counters.metadata_write(bytes.len());
        self.counters.flush();
        self.storage.flush().ctx(|| "flushing the header".into())?;
        h.disk = h.mem.clone();
        Ok(())
    }

    fn open_backing(header: &Header, opts: &OpenOptions) -> Result<Option<Backing>> {
        let Some(name) = header.backing_file.clone() else {
            return Ok(None);
        };
        let named_format = header.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.clone()),
            _ => None,
        });
        let backing_err = |reason: String| Error::Backing {
            name: name.clone(),
            reason,
        };
        let (storage, format): (Arc<dyn Storage>, Option<BackingFormat>) = match &opts.backing {
            BackingSource::Ignore => return Ok(None),
            BackingSource::Given(s, f) => (s.clone(), Some(*f)),
            BackingSource::FromHeader => {
                let mut path = std::path::PathBuf::from(&name);
                if path.is_relative() {
                    if let Some(dir) = &opts.base_dir {
                        path = dir.join(path);
                    }
                }
                let file = FileStorage::open(&path, false)
                    .map_err(|e| backing_err(format!("cannot open {}: {e}", path.display())))?;
                let format = match named_format.as_deref() {
                    None => None,
                    Some(f) => Some(BackingFormat::parse(f).ok_or_else(|| {
                        backing_err(format!("unsupported backing format {f:?} (qcow2 or raw)"))
                    })?),
                };
                (Arc::new(file), format)
            }
        };
        let format = match format {
            Some(f) => f,
            None => {
                // No format named: probe the magic, as QEMU does.
                let mut magic = [0u8; 4];
                storage
                    .read_at(&mut magic, 0)
                    .ctx(|| "probing the backing file".into())?;
                if u32::from_be_bytes(magic) == qj_spec::qcow2::QCOW2_MAGIC {
                    BackingFormat::Qcow2
                } else {
                    BackingFormat::Raw
                }
            }
        };
        Ok(Some(match format {
            BackingFormat::Raw => {
                let size = storage
                    .len()
                    .ctx(|| "reading the backing file length".into())?;
                Backing::Raw { storage, size }
            }
            BackingFormat::Qcow2 => {
                let mut bopts = OpenOptions::read_only();
                bopts.cache_bytes_max = opts.cache_bytes_max;
                if let BackingSource::FromHeader = opts.backing {
                    let mut path = std::path::PathBuf::from(&name);
                    if path.is_relative() {
                        if let Some(dir) = &opts.base_dir {
                            path = dir.join(path);
                        }
                    }
                    bopts.base_dir = path.parent().map(Path::to_path_buf);
                }
                let image = Image::open(storage, &bopts).map_err(|e| backing_err(e.to_string()))?;
                Backing::Qcow2(Box::new(image))
            }
        }))
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

    /// A description of the image.
    pub fn info(&self) -> Result<ImageInfo> {
        let h = self.header.lock().mem.clone();
        let file_length = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        let extensions = h
            .extensions
            .iter()
            .map(|e| match e {
                HeaderExtension::BackingFormat(_) => "backing format".to_string(),
                HeaderExtension::FeatureNameTable(_) => "feature name table".to_string(),
                HeaderExtension::Bitmaps(_) => "bitmaps".to_string(),
                HeaderExtension::ExternalDataFile(_) => "external data file".to_string(),
                HeaderExtension::Journal(_) => "qjournal".to_string(),
                HeaderExtension::Unknown { kind, .. } => format!("unknown {kind:#010x}"),
            })
            .collect();
        Ok(ImageInfo {
            version: h.version,
            virtual_size: self.virtual_size(),
            cluster_size: self.geometry.cluster_size(),
            refcount_bits: self.geometry.refcount_bits(),
            file_length,
            backing_format: h.extensions.iter().find_map(|e| match e {
                HeaderExtension::BackingFormat(f) => Some(f.clone()),
                _ => None,
            }),
            backing_file: h.backing_file.clone(),
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            dirty: h.is_dirty(),
            corrupt: h.is_corrupt(),
            snapshots: h.nb_snapshots,
            l1_size: h.l1_size,
            l1_table_offset: h.l1_table_offset,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            extensions,
            backend: self.backend.kind(),
            journal: self.backend.journal_info(),
        })
    }

    // ---- guest I/O -------------------------------------------------------

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
    fn poisoned<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            let mut p = self.poison.lock();
            if p.is_none() {
                *p = Some(e.to_string());
            }
        }
        result
    }

    /// Splits `[offset, offset + len)` into per-cluster pieces:
    /// (guest cluster, offset in cluster, length, offset in the request).
    fn pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (GuestCluster, usize, usize, usize)> {
        let cs = self.geometry.cluster_size();
        let g = self.geometry;
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let cluster = g.guest_cluster(GuestOffset(pos));
            let in_cluster = g.offset_in_cluster(pos);
            let n = (cs - in_cluster).min(end - pos);
            let item = (
                cluster,
                in_cluster as usize,
                n as usize,
                (pos - offset) as usize,
            );
            pos += n;
            Some(item)
        })
    }

    /// Reads guest bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        for (cluster, in_cluster, n, at) in self.pieces(offset, buf.len() as u64) {
            self.read_piece(cluster, in_cluster, &mut buf[at..at + n])?;
        }
        self.maybe_evict()
    }

    fn l1_entry(&self, cluster: GuestCluster) -> Result<L1Entry> {
        let index = self.geometry.l1_index(cluster) as usize;
        let raw = self.l1.read().entries.get(index).copied().unwrap_or(0);
        let entry = L1Entry(raw);
        if let Some(o) = entry.l2_offset() {
            if !self.geometry.is_aligned(o.0) {
                return Err(Error::Corrupt(format!(
                    "L1 entry {index} points to misaligned L2 table offset {o}"
                )));
            }
        }
        Ok(entry)
    }

    fn load_l2(&self, offset: HostOffset) -> Result<SyncArc<CachedTable>> {
        let storage = &*self.storage;
        let backend = &*self.backend;
        self.l2_cache
            .get(offset, |buf| backend.read_metadata(storage, buf, offset))
    }

    fn l2_entry(&self, table: &[u8], cluster: GuestCluster) -> Result<L2Entry> {
        let index = self.geometry.l2_index(cluster) as usize;
        let raw = read_table_entry(table, index);
        let entry = L2Entry::decode(raw, self.geometry.cluster_bits);
        if let L2Entry::Normal { offset, .. }
        | L2Entry::Zero {
            preallocated: Some(offset),
            ..
        } = entry
        {
            if !self.geometry.is_aligned(offset.0) {
                return Err(Error::Corrupt(format!(
                    "L2 entry for guest cluster {} points to misaligned offset {offset}",
                    cluster.0
                )));
            }
            self.check_in_file(offset, cluster)?;
        }
        Ok(entry)
    }

    /// A data cluster must start inside the file. One past the end would
    /// read as zeros instead of the guest's data, and an in-place write to
    /// it would modify a corrupt image; the caller errors first. Like QEMU's
    /// check, the last cluster may be partly past the end (QEMU leaves the
    /// file short of a full cluster). Every cluster this image allocates is
    /// written before its entry is set, so the slow path (asking the device)
    /// runs only for entries the file does not cover.
    fn check_in_file(&self, offset: HostOffset, cluster: GuestCluster) -> Result<()> {
        if offset.0 < self.file_len_seen.load(Ordering::Acquire) {
            return Ok(());
        }
        let file_len = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        self.file_len_seen.fetch_max(file_len, Ordering::AcqRel);
        // Logged data (`backend/logged_data.rs`) reaches the file at
        // checkpoint: until then its cluster may lie past the end.
        if offset.0 >= file_len && !self.backend.holds_data(offset) {
            return Err(Error::Corrupt(format!(
                "L2 entry for guest cluster {} points to offset {offset}, past the end of the file ({file_len} bytes)",
                cluster.0
            )));
        }
        Ok(())
    }

    fn read_piece(&self, cluster: GuestCluster, in_cluster: usize, out: &mut [u8]) -> Result<()> {
        let guest = self.geometry.guest_offset(cluster).0 + in_cluster as u64;
        let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
            return self.read_unallocated(out, guest);
        };
        let table = self.load_l2(l2)?;
        // The table lock is held across the data read so that a concurrent
        // discard cannot free (and a writer reuse) the cluster under us.
        let t = table.data.read();
        match self.l2_entry(&t.bytes, cluster)? {
            L2Entry::Unallocated => {
                drop(t);
                self.read_unallocated(out, guest)
            }
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { offset, .. } => {
                let host = HostOffset(offset.0 + in_cluster as u64);
                self.backend.read_data(&*self.storage, out, host)
            }
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                let plain = self.read_compressed(host_offset, compressed_size_max)?;
                out.copy_from_slice(&plain[in_cluster..in_cluster + out.len()]);
                Ok(())
            }
        }
    }

    fn read_compressed(&self, host_offset: u64, size: u64) -> Result<Vec<u8>> {
        // Bounded by the format: at most two clusters of compressed bytes.
        let size = size.min(2 * self.geometry.cluster_size());
        let mut compressed = vec![0u8; size as usize];
        self.storage
            .read_at(&mut compressed, host_offset)
            .ctx(|| format!("reading compressed cluster at {host_offset:#x}"))?;
        inflate_cluster(
            &compressed,
            self.geometry.cluster_size() as usize,
            host_offset,
        )
    }

    fn read_unallocated(&self, out: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read(out, guest),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// Writes guest bytes at `offset`. Durable after the next [`Image::flush`].
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        for (cluster, in_cluster, n, at) in self.pieces(offset, buf.len() as u64) {
            let _gate = self.gate.read();
            self.op_gen.fetch_add(1, Ordering::SeqCst);
            let r = self.write_piece(cluster, in_cluster, &buf[at..at + n]);
            self.poisoned(r)?;
        }
        self.maybe_evict()
    }

    /// The L2 table mapping `cluster`, created (or copied, when shared with
    /// a snapshot) so that this image owns it. Caller holds the gate.
    fn owned_l2(&self, cluster: GuestCluster) -> Result<SyncArc<CachedTable>> {
        let entry = self.l1_entry(cluster)?;
        if let (Some(o), true) = (entry.l2_offset(), entry.is_copied()) {
            return self.load_l2(o);
        }
        let index = self.geometry.l1_index(cluster) as usize;
        let mut l1 = self.l1.write();
        let Some(&raw) = l1.entries.get(index) else {
            return Err(Error::Corrupt(format!(
                "guest cluster {} is past the L1 table ({} entries)",
                cluster.0,
                l1.entries.len()
            )));
        };
        let entry = L1Entry(raw);
        if let (Some(o), true) = (entry.l2_offset(), entry.is_copied()) {
            // Another writer linked it while we waited for the lock.
            return self.load_l2(o);
        }
        let cs = self.geometry.cluster_size() as usize;
        let bytes = match entry.l2_offset() {
            None => vec![0u8; cs],
            // Shared with a snapshot: copy it. The data clusters it maps keep
            // their counts (each is referenced by the old and the new table).
            Some(old) => self.load_l2(old)?.data.read().bytes.clone(),
        };
        let new = {
            let mut rc = self.refcounts.lock();
            let new = rc.allocate(&*self.storage, &*self.backend, &self.counters)?;
            if let Some(old) = entry.l2_offset() {
                rc.free_metadata(
                    &*self.storage,
                    &*self.backend,
                    self.geometry.host_cluster(old),
                )?;
            }
            new
        };
        let offset = self.geometry.host_offset(new);
        self.fresh_tables.fetch_add(1, Ordering::Relaxed);
        let table = self.l2_cache.insert_fresh(offset, bytes);
        l1.entries[index] = L1Entry::new(offset, true).0;
        if !l1.fresh {
            let c = index as u64 * 8 / self.geometry.cluster_size();
            l1.dirty_clusters.insert(c);
        }
        Ok(table)
    }

    fn write_piece(&self, cluster: GuestCluster, in_cluster: usize, data: &[u8]) -> Result<()> {
        let table = self.owned_l2(cluster)?;
        let index = self.geometry.l2_index(cluster) as usize;
        {
            // Fast path: an allocated cluster this image owns is overwritten
            // in place; no metadata changes.
            let t = table.data.read();
            if let L2Entry::Normal {
                offset,
                copied: true,
            } = self.l2_entry(&t.bytes, cluster)?
            {
                return self.write_data(data, offset.0 + in_cluster as u64);
            }
        }
        let mut t = table.data.write();
        let old = self.l2_entry(&t.bytes, cluster)?;
        if let L2Entry::Normal {
            offset,
            copied: true,
        } = old
        {
            return self.write_data(data, offset.0 + in_cluster as u64);
        }
        let cs = self.geometry.cluster_size() as usize;
        let new = self
            .refcounts
            .lock()
            .allocate(&*self.storage, &*self.backend, &self.counters)?;
        let host = self.geometry.host_offset(new);
        let whole = in_cluster == 0 && data.len() == cs;
        let old_reads_zero = match old {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        };
        let past_eof = host.0
            >= self
                .storage
                .len()
                .ctx(|| "reading the image length".into())?;
        // The bytes of the new cluster that this write puts on the disk:
        // what a journal's data checksum must cover (the rest of a cluster
        // past the end of the file is a hole no one else writes, and reads
        // as zeros however the crash falls).
        let delayed = match old {
            // Shared with a snapshot: the backend may carry the copy of
            // the untouched bytes (delayed copy-on-write) instead of us
            // making it now.
            L2Entry::Normal {
                offset: source,
                copied: false,
            } if !whole => {
                let end = (in_cluster + data.len()) as u64;
                let untouched: Vec<(u64, u64)> = [(0, in_cluster as u64), (end, cs as u64 - end)]
                    .into_iter()
                    .filter(|&(_, len)| len > 0)
                    .collect();
                self.backend.delay_copy(&DelayedCopy {
                    target: host.0,
                    source: source.0,
                    untouched,
                })
            }
            _ => false,
        };
        let written: (HostOffset, u64) = if delayed {
            // The untouched bytes come from the copy in the transaction
            // that links this cluster; only the guest's bytes are ours to
            // write (and to checksum).
            self.write_data(data, host.0 + in_cluster as u64)?;
            (HostOffset(host.0 + in_cluster as u64), data.len() as u64)
        } else if (whole || old_reads_zero)
            && past_eof
            && self.backend.log_fresh_data(host, in_cluster as u64, data)
        {
            // Logged data: the transaction that links the cluster carries
            // the bytes; the file reaches them at checkpoint.
            (HostOffset(host.0 + in_cluster as u64), data.len() as u64)
        } else if whole || (old_reads_zero && past_eof) {
            // A cluster past the end of the file reads as zeros already, so
            // zero padding around the data need not be written (QEMU skips
            // it too); the data write extends the file.
            self.write_data(data, host.0 + in_cluster as u64)?;
            (HostOffset(host.0 + in_cluster as u64), data.len() as u64)
        } else {
            // Copy-on-write: the new cluster gets the old content around the
            // written bytes (from backing, a shared cluster, a compressed
            // cluster, or zeros over a reused cluster's stale bytes).
            let mut full = vec![0u8; cs];
            self.old_content(cluster, old, &mut full)?;
            full[in_cluster..in_cluster + data.len()].copy_from_slice(data);
            self.write_data(&full, host.0)?;
            (host, cs as u64)
        };
        self.entries_changed.fetch_add(1, Ordering::Relaxed);
        t.set_entry(
            index,
            L2Entry::Normal {
                offset: host,
                copied: true,
            }
            .encode(self.geometry.cluster_bits),
        );
        self.new_data.lock().push(written);
        self.release_entry(old)
    }

    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        if self.backend.absorb_data_write(HostOffset(host), data) {
            return Ok(());
        }
        self.backend
            .before_data_write(HostOffset(host), data.len() as u64, &self.counters)?;
        self.storage
            .write_at(data, host)
            .ctx(|| format!("writing guest data at host {host:#x}"))?;
        self.counters.data_write(data.len());
        Ok(())
    }

    /// The guest-visible content of `cluster` under entry `old`.
    fn old_content(&self, cluster: GuestCluster, old: L2Entry, out: &mut [u8]) -> Result<()> {
        match old {
            L2Entry::Unallocated => {
                self.read_unallocated(out, self.geometry.guest_offset(cluster).0)
            }
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { offset, .. } => self
                .storage
                .read_at(out, offset.0)
                .ctx(|| format!("reading cluster {offset} to copy")),
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                out.copy_from_slice(&self.read_compressed(host_offset, compressed_size_max)?);
                Ok(())
            }
        }
    }

    /// Drops this image's reference to whatever `old` pointed to.
    fn release_entry(&self, old: L2Entry) -> Result<()> {
        let mut rc = self.refcounts.lock();
        match old {
            L2Entry::Unallocated
            | L2Entry::Zero {
                preallocated: None, ..
            } => Ok(()),
            L2Entry::Normal { offset, .. }
            | L2Entry::Zero {
                preallocated: Some(offset),
                ..
            } => rc.free(
                &*self.storage,
                &*self.backend,
                self.geometry.host_cluster(offset),
            ),
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                // A compressed cluster holds one reference on every host
                // cluster its bytes touch.
                let first = host_offset >> self.geometry.cluster_bits;
                let last =
                    (host_offset + compressed_size_max.max(1) - 1) >> self.geometry.cluster_bits;
                for c in first..=last {
                    rc.free(&*self.storage, &*self.backend, HostCluster(c))?;
                }
                Ok(())
            }
        }
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become
    /// zero-flagged entries and release their storage; partial clusters are
    /// written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        for (cluster, in_cluster, n, _) in self.pieces(offset, len) {
            let _gate = self.gate.read();
            self.op_gen.fetch_add(1, Ordering::SeqCst);
            let r = self.zero_piece(cluster, in_cluster, n, false);
            self.poisoned(r)?;
        }
        self.maybe_evict()
    }

    /// Tells the image the guest no longer needs `[offset, offset + len)`.
    /// Whole clusters are released and read as zeros afterwards; partial
    /// clusters are left alone (discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        for (cluster, in_cluster, n, _) in self.pieces(offset, len) {
            let _gate = self.gate.read();
            self.op_gen.fetch_add(1, Ordering::SeqCst);
            let r = self.zero_piece(cluster, in_cluster, n, true);
            self.poisoned(r)?;
        }
        self.maybe_evict()
    }

    fn zero_piece(
        &self,
        cluster: GuestCluster,
        in_cluster: usize,
        n: usize,
        discard: bool,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let guest_end = self.geometry.guest_offset(cluster).0 + cs as u64;
        // The last cluster may extend past the virtual size: covering up to
        // the end of the disk counts as covering the whole cluster.
        let whole = in_cluster == 0
            && (n == cs
                || guest_end > self.virtual_size() && {
                    self.geometry.guest_offset(cluster).0 + n as u64 == self.virtual_size()
                });
        if !whole {
            if discard {
                return Ok(());
            }
            return self.write_piece(cluster, in_cluster, &vec![0u8; n]);
        }
        let v3 = self.header.lock().mem.version >= 3;
        let new_entry = if !v3 {
            if self.backing.is_some() && !discard {
                // v2 has no zero flag: zeros over backing data must be stored.
                return self.write_piece(cluster, in_cluster, &vec![0u8; n]);
            }
            L2Entry::Unallocated
        } else if self.backing.is_none() && discard {
            L2Entry::Unallocated
        } else {
            L2Entry::Zero {
                preallocated: None,
                copied: false,
            }
        };
        if self.l1_entry(cluster)?.l2_offset().is_none()
            && (self.backing.is_none() || new_entry == L2Entry::Unallocated)
        {
            // Nothing mapped and nothing to hide: already reads as zeros.
            return Ok(());
        }
        let table = self.owned_l2(cluster)?;
        let mut t = table.data.write();
        let old = self.l2_entry(&t.bytes, cluster)?;
        if old == new_entry {
            return Ok(());
        }
        let index = self.geometry.l2_index(cluster) as usize;
        self.entries_changed.fetch_add(1, Ordering::Relaxed);
        t.set_entry(index, new_entry.encode(self.geometry.cluster_bits));
        self.release_entry(old)
    }

    /// Makes every write that completed before this call durable.
    ///
    /// Concurrent flushes share work: a flush whose operations were all
    /// covered by a persist that started after them returns at once, so N
    /// threads flushing together cost one persist (group commit), on both
    /// backends.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if let Some(why) = self.poison.lock().clone() {
            return Err(Error::Poisoned(why));
        }
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        let wanted = self.op_gen.load(Ordering::SeqCst);
        if self.flushed_gen.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let r = self.persist(Some(wanted));
        self.poisoned(r)
    }

    /// One persist: gathers the epoch under the exclusive gate (so it holds
    /// whole operations only), submits it, then waits for durability
    /// without the gate (so a journal can batch other threads' epochs into
    /// the same commit), and finally applies the epoch's frees. With
    /// `covering`, returns early if another persist already made every
    /// operation up to that generation durable.
    fn persist(&self, covering: Option<u64>) -> Result<()> {
        let gate = self.gate.write();
        if covering.is_some_and(|g| self.flushed_gen.load(Ordering::SeqCst) >= g) {
            return Ok(());
        }
        let started_gen = self.op_gen.load(Ordering::SeqCst);
        let (epoch, pins) = self.gather_epoch()?;
        let releases = self.refcounts.lock().take_releases();
        // Epochs reach the backend in the order they were gathered (a later
        // epoch's entries may depend on an earlier epoch's counts), but the
        // gate is released first: guest operations go on while this epoch
        // is written and flushed, and gather the next one.
        let order = self.submit_order.lock();
        let ticket = if self.backend.submits_under_gate() {
            let ticket = self.backend.submit(&*self.storage, epoch, &self.counters);
            drop(gate);
            ticket?
        } else {
            drop(gate);
            self.backend.submit(&*self.storage, epoch, &self.counters)?
        };
        drop(order);
        self.backend
            .wait_durable(&*self.storage, ticket, &self.counters)?;
        // Ordering: the tables of the epoch stay pinned in their caches
        // until the backend has their bytes. They are clean since
        // `gather_epoch`; evicted before now, a lookup (a reader, or a
        // writer once the gate is free) would reload the old bytes from disk
        // and the change would be lost (loom model
        // `table_being_written_back_is_not_lost`).
        drop(pins);
        self.refcounts.lock().after_durable(
            &*self.storage,
            &*self.backend,
            &self.counters,
            releases,
        )?;
        self.flushed_gen.fetch_max(started_gen, Ordering::SeqCst);
        Ok(())
    }

    /// Persists until nothing is pending: the first persist may apply
    /// deferred decrements that only a second one writes. Bounded: the
    /// second frees nothing, so a third finds nothing to do.
    fn persist_all(&self) -> Result<()> {
        for _ in 0..3 {
            self.persist(None)?;
            if !self.refcounts.lock().has_pending() {
                break;
            }
        }
        Ok(())
    }

    /// Gathers every metadata change into an epoch, with the pins that keep
    /// the tables taken from being evicted until the backend has them.
    fn gather_epoch(&self) -> Result<(Epoch, WritebackPins)> {
        self.fresh_tables.store(0, Ordering::Relaxed);
        self.entries_changed.store(0, Ordering::Relaxed);
        let mut epoch = Epoch::default();
        let mut pins = WritebackPins::default();
        let moved_refcount_table = self.refcounts.lock().take_epoch(
            &mut epoch.fresh_refcount,
            &mut epoch.refcount_links,
            &mut epoch.refcount_blocks,
            &mut epoch.freed_metadata,
            &mut pins,
        );
        pins.append(self.l2_cache.take_writebacks(|offset, fresh, bytes| {
            let w = MetadataWrite { offset, bytes };
            if fresh {
                epoch.fresh_tables.push(w);
            } else {
                epoch.tables.push(w);
            }
        }));
        let cs = self.geometry.cluster_size() as usize;
        let mut l1 = self.l1.write();
        let encode_l1 = |entries: &[u64], c: u64| {
            let mut bytes = vec![0u8; cs];
            let per = cs / 8;
            let start = c as usize * per;
            for (j, &e) in entries.iter().skip(start).take(per).enumerate() {
                write_table_entry(&mut bytes, j, e);
            }
            bytes
        };
        if l1.fresh {
            let clusters = self
                .geometry
                .clusters_for(l1.entries.len() as u64 * 8)
                .max(1);
            for c in 0..clusters {
                epoch.fresh_tables.push(MetadataWrite {
                    offset: HostOffset(l1.offset.0 + c * cs as u64),
                    bytes: encode_l1(&l1.entries, c),
                });
            }
            l1.fresh = false;
            l1.dirty_clusters.clear();
        }
        for c in std::mem::take(&mut l1.dirty_clusters) {
            epoch.tables.push(MetadataWrite {
                offset: HostOffset(l1.offset.0 + c * cs as u64),
                bytes: encode_l1(&l1.entries, c),
            });
        }
        drop(l1);
        let mut h = self.header.lock();
        if let Some((offset, clusters)) = moved_refcount_table {
            // The switch to the new refcount table is a header write of its
            // own, carrying only the refcount fields: the rest of the header
            // (a new L1 table, say) must wait for its own dependencies.
            let mut link = h.disk.clone();
            link.refcount_table_offset = offset.0;
            link.refcount_table_clusters = clusters as u32;
            h.mem.refcount_table_offset = offset.0;
            h.mem.refcount_table_clusters = clusters as u32;
            let old = h.disk.encode()?;
            epoch
                .refcount_links
                .push(header_write(&old, &link.encode()?));
            h.disk = link;
        }
        if h.dirty {
            let old = h.disk.encode()?;
            epoch.tables.push(header_write(&old, &h.mem.encode()?));
            h.disk = h.mem.clone();
            h.dirty = false;
        }
        drop(h);
        epoch.new_data = std::mem::take(&mut *self.new_data.lock());
        Ok((epoch, pins))
    }

    fn maybe_evict(&self) -> Result<()> {
        if let Some(max) = self.backend.epoch_bytes_max() {
            // Bound the epoch so its transaction fits the journal. Each
            // changed L2 entry dirties at most an L2 and a refcount sector
            // (budget 3 sectors with descriptor overhead); fresh tables
            // count whole. Overwrites in place change no entry and count
            // nothing (counting them forced needless persists, and flushes,
            // every ~2,700 overwrites).
            let fresh =
                self.fresh_tables.load(Ordering::Relaxed) + self.refcounts.lock().fresh_clusters;
            let entries = self.entries_changed.load(Ordering::Relaxed);
            let estimate = fresh * self.geometry.cluster_size() + entries * 1536;
            if estimate > max && self.writable {
                let r = self.persist(None);
                self.poisoned(r)?;
            }
        }
        if !self.l2_cache.over_capacity() && !self.refcounts.lock().blocks.over_capacity() {
            return Ok(());
        }
        let evict = || {
            // A table handed to a submit still in progress is clean in the
            // cache but not yet on disk: evicting it now would let a reload
            // read the old bytes. Holding the submit order lock means no
            // submit is in progress.
            let _order = self.submit_order.lock();
            let l2_ok = self.l2_cache.evict();
            let rc_ok = self.refcounts.lock().blocks.evict();
            l2_ok && rc_ok
        };
        if !evict() && self.writable {
            // Only dirty tables are left: write them back, then evict.
            let r = self.persist(None);
            self.poisoned(r)?;
            evict();
        }
        Ok(())
    }

    /// Changes the virtual size. Growing maps the new space as zeros (also
    /// over a larger backing file); shrinking releases the clusters past the
    /// new end. The change is durable after the next flush.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let new_size = new_size.next_multiple_of(512);
        let _gate = self.gate.write();
        self.op_gen.fetch_add(1, Ordering::SeqCst);
        let r = self.resize_locked(new_size);
        self.poisoned(r)?;
        drop(_gate);
        self.maybe_evict()
    }

    fn resize_locked(&self, new_size: u64) -> Result<()> {
        let old_size = self.virtual_size();
        let g = self.geometry;
        let needed = g.l1_entries_for(new_size);
        if needed * 8 > crate::create::L1_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} needs an L1 table over the 32 MiB limit"
            )));
        }
        if new_size < old_size {
            if self.header.lock().mem.nb_snapshots > 0 {
                return Err(Error::Unsupported(
                    "shrinking an image with internal snapshots".into(),
                ));
            }
            // Release every cluster past the new end (rounded up to a cluster:
            // the cluster holding the new end keeps its head).
            let first = g.clusters_for(new_size);
            let last = g.clusters_for(old_size);
            for c in first..last {
                let cluster = GuestCluster(c);
                let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
                    continue;
                };
                let table = self.load_l2(l2)?;
                let mut t = table.data.write();
                let old = self.l2_entry(&t.bytes, cluster)?;
                if old != L2Entry::Unallocated {
                    self.entries_changed.fetch_add(1, Ordering::Relaxed);
                    t.set_entry(g.l2_index(cluster) as usize, 0);
                    drop(t);
                    self.release_entry(old)?;
                }
            }
        } else if needed as usize > self.l1.read().entries.len() {
            self.grow_l1(needed)?;
        }
        self.virtual_size.store(new_size, Ordering::Release);
        {
            let mut h = self.header.lock();
            h.mem.size = new_size;
            h.dirty = true;
        }
        if new_size > old_size {
            self.zero_grown_range(old_size, new_size)?;
        }
        Ok(())
    }

    /// The L2 entry of `cluster`, or `None` when no L2 table maps it.
    fn entry_of(&self, cluster: GuestCluster) -> Result<Option<L2Entry>> {
        let Some(l2) = self.l1_entry(cluster)?.l2_offset() else {
            return Ok(None);
        };
        let table = self.load_l2(l2)?;
        let t = table.data.read();
        self.l2_entry(&t.bytes, cluster).map(Some)
    }

    /// Makes `[old_size, new_size)` read as zeros after a grow. Whatever
    /// the image maps there must go: stale bytes a shrink left in the last
    /// cluster, a larger backing file, and entries past the old end whose
    /// size change a crash lost (the L2 write reached the disk, the header
    /// did not; found by the crash harness).
    fn zero_grown_range(&self, old_size: u64, new_size: u64) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let backing_size = self.backing.as_ref().map_or(0, Backing::size);
        let reads_zero = |entry: Option<L2Entry>, guest: u64| match entry {
            None | Some(L2Entry::Unallocated) => guest >= backing_size,
            Some(L2Entry::Zero { .. }) => true,
            Some(_) => false,
        };
        // The rest of the cluster that held the old end.
        let tail_end = old_size.next_multiple_of(cs).min(new_size);
        if tail_end > old_size {
            for (cluster, in_cluster, n, _) in self.pieces(old_size, tail_end - old_size) {
                let guest = g.guest_offset(cluster).0 + in_cluster as u64;
                if !reads_zero(self.entry_of(cluster)?, guest) {
                    self.write_piece(cluster, in_cluster, &vec![0u8; n])?;
                }
            }
        }
        // Whole clusters past it. Bounded by the number of clusters in the
        // range; ranges without an L2 table (and no backing data) are
        // skipped a table at a time.
        let mut pos = tail_end;
        while pos < new_size {
            let cluster = g.guest_cluster(GuestOffset(pos));
            let entry = self.entry_of(cluster)?;
            if entry.is_none() && pos >= backing_size {
                pos = g
                    .guest_offset(GuestCluster((g.l1_index(cluster) + 1) * g.l2_entries()))
                    .0;
                continue;
            }
            if !reads_zero(entry, pos) {
                let n = cs.min(new_size - pos) as usize;
                self.zero_piece(cluster, 0, n, false)?;
            }
            pos += cs;
        }
        Ok(())
    }

    /// Moves the L1 table to fresh clusters with room for `needed` entries.
    /// The header switches to it in one write, after it is durable (it is
    /// `fresh`); the old table is freed by the usual rules.
    fn grow_l1(&self, needed: u64) -> Result<()> {
        let g = self.geometry;
        let mut l1 = self.l1.write();
        let old_entries = l1.entries.len() as u64;
        let new_entries = needed
            .max(old_entries + old_entries / 2)
            .min(crate::create::L1_BYTES_MAX / 8);
        let clusters = g.clusters_for(new_entries * 8).max(1);
        let old_clusters = g.clusters_for(old_entries * 8).max(1);
        let mut rc = self.refcounts.lock();
        let start =
            rc.allocate_contiguous(&*self.storage, &*self.backend, &self.counters, clusters)?;
        let old_start = g.host_cluster(l1.offset);
        for i in 0..old_clusters {
            rc.free_metadata(&*self.storage, &*self.backend, HostCluster(old_start.0 + i))?;
        }
        drop(rc);
        self.fresh_tables.fetch_add(clusters, Ordering::Relaxed);
        l1.entries.resize(new_entries as usize, 0);
        l1.offset = g.host_offset(start);
        l1.fresh = true;
        l1.dirty_clusters.clear();
        let mut h = self.header.lock();
        h.mem.l1_table_offset = l1.offset.0;
        h.mem.l1_size = new_entries as u32;
        h.dirty = true;
        Ok(())
    }

    /// Guest extents: what is stored here, zero, or left to the backing file.
    pub fn map(&self) -> Result<Vec<MapExtent>> {
        let g = self.geometry;
        let size = self.virtual_size();
        let mut out: Vec<MapExtent> = Vec::new();
        let clusters = g.clusters_for(size);
        let mut c = 0;
        while c < clusters {
            let cluster = GuestCluster(c);
            let start = g.guest_offset(cluster).0;
            let length = g.cluster_size().min(size - start);
            let entry = match self.l1_entry(cluster)?.l2_offset() {
                None => {
                    // A whole missing L2 table: skip its range at once.
                    let next = (g.l1_index(cluster) + 1) * g.l2_entries();
                    let end = (g.guest_offset(GuestCluster(next)).0).min(size);
                    push_extent(
                        &mut out,
                        MapExtent {
                            start,
                            length: end - start,
                            data: false,
                            zero: self.backing.is_none(),
                            compressed: false,
                            offset: None,
                        },
                    );
                    c = next;
                    continue;
                }
                Some(l2) => {
                    let table = self.load_l2(l2)?;
                    let t = table.data.read();
                    self.l2_entry(&t.bytes, cluster)?
                }
            };
            let ext = match entry {
                L2Entry::Unallocated => MapExtent {
                    start,
                    length,
                    data: false,
                    zero: self.backing.is_none(),
                    compressed: false,
                    offset: None,
                },
                L2Entry::Zero { .. } => MapExtent {
                    start,
                    length,
                    data: false,
                    zero: true,
                    compressed: false,
                    offset: None,
                },
                L2Entry::Normal { offset, .. } => MapExtent {
                    start,
                    length,
                    data: true,
                    zero: false,
                    compressed: false,
                    offset: Some(offset.0),
                },
                L2Entry::Compressed { .. } => MapExtent {
                    start,
                    length,
                    data: true,
                    zero: false,
                    compressed: true,
                    offset: None,
                },
            };
            push_extent(&mut out, ext);
            c += 1;
        }
        Ok(out)
    }

    /// Flushes and closes the image, leaving it clean: deferred refcount
    /// decrements are written too, so `check` finds no leak.
    pub fn close(self) -> Result<()> {
        self.finished.store(true, Ordering::Release);
        if !self.writable || self.poison.lock().is_some() {
            return Ok(());
        }
        self.persist_all()?;
        self.backend.shutdown(&*self.storage, &self.counters)
    }

    /// Drops the image without writing anything back, as a process killed
    /// at this instant would: what is on the device is what a crash after
    /// the last completed flush could leave.
    pub fn abandon(self) {
        self.finished.store(true, Ordering::Release);
    }
}

/// The header bits that refuse a read-write open (a read-only one may
/// still read the image, as QEMU's may): marked corrupt, or dirty (lazy
/// refcounts not yet repaired).
fn refuse_writing(header: &Header) -> Result<()> {
    if header.is_corrupt() {
        return Err(qj_spec::error::FormatError::MarkedCorrupt.into());
    }
    if header.is_dirty() {
        return Err(Error::Unsupported(
            "the image has the dirty bit set (lazy refcounts); run `qj check -r all` before writing".into(),
        ));
    }
    Ok(())
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.finished.load(Ordering::Acquire) || !self.writable {
            return;
        }
        // Best effort for callers that forgot `close`; errors are lost here.
        if self.poison.lock().is_none() {
            let _ = self.persist_all();
        }
    }
}

/// Puts the names of our feature bits into the header's feature name table,
/// so that a program refusing the image names them ("journal dirty"). QEMU
/// writes its own table whenever it rewrites the header and drops names it
/// does not know (`shared/notes/qemu-behaviour.md`), so a journal re-created
/// after QEMU wrote the image needs them back. Entries already there are
/// kept. Like at creation, the table is left out when it does not fit in
/// the header cluster: it is informational only.
fn name_journal_features(header: &mut Header) {
    let ours = qj_spec::qcow2::features::qjournal_feature_names();
    let at = header
        .extensions
        .iter()
        .position(|e| matches!(e, HeaderExtension::FeatureNameTable(_)));
    match at {
        Some(i) => {
            if let HeaderExtension::FeatureNameTable(names) = &mut header.extensions[i] {
                for name in ours {
                    if !names
                        .iter()
                        .any(|n| n.kind == name.kind && n.bit == name.bit)
                    {
                        names.push(name);
                    }
                }
            }
        }
        None => header
            .extensions
            .push(HeaderExtension::FeatureNameTable(ours)),
    }
    if header.encode().is_err() {
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::FeatureNameTable(_)));
    }
}

/// Every L2 table the L1 table names must be a cluster inside the file. A
/// misaligned table would be read across two clusters, and one past the end
/// would read as an empty table, so that writes would allocate over whatever
/// it was meant to map. Checked at open, before anything is written, so an
/// image that fails stays untouched.
fn validate_l1_entries(
    entries: &[u64],
    geometry: Geometry,
    l1_table_offset: u64,
    file_len: u64,
) -> Result<()> {
    for (index, &raw) in entries.iter().enumerate() {
        let Some(l2) = L1Entry(raw).l2_offset() else {
            continue;
        };
        let problem = if !geometry.is_aligned(l2.0) {
            "is not cluster aligned".to_string()
        } else if l2.0 >= file_len {
            format!("is past the end of the file ({file_len} bytes)")
        } else {
            continue;
        };
        // The L1 table was checked to lie inside the file, so this is in range.
        let entry_offset = l1_table_offset + index as u64 * 8;
        return Err(qj_spec::error::FormatError::field(
            "L1 table",
            "l2_table_offset",
            entry_offset,
            format!("entry {index} points to an L2 table at {l2} that {problem}"),
        )
        .into());
    }
    Ok(())
}

/// A header write covering only the sectors that changed: the fields a
/// persist changes all sit in the first sector, so the write is one sector
/// and a torn write cannot mix old and new header fields.
fn header_write(old: &[u8], new: &[u8]) -> MetadataWrite {
    const SECTOR: usize = 512;
    let len = old.len().max(new.len()).next_multiple_of(SECTOR);
    let byte = |b: &[u8], i: usize| b.get(i).copied().unwrap_or(0);
    let differs = |s: usize| (s..s + SECTOR).any(|i| byte(old, i) != byte(new, i));
    let first = (0..len).step_by(SECTOR).find(|&s| differs(s)).unwrap_or(0);
    let last = (0..len)
        .step_by(SECTOR)
        .rev()
        .find(|&s| differs(s))
        .unwrap_or(0)
        + SECTOR;
    let bytes = (first..last).map(|i| byte(new, i)).collect();
    MetadataWrite {
        offset: HostOffset(first as u64),
        bytes,
    }
}

fn push_extent(out: &mut Vec<MapExtent>, ext: MapExtent) {
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.offset, ext.offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.data == ext.data
            && last.zero == ext.zero
            && last.compressed == ext.compressed
            && contiguous
            && !ext.compressed
        {
            last.length += ext.length;
            return;
        }
    }
    out.push(ext);
}

/// An in-memory image, for tests and examples.
pub fn create_in_memory(opts: &CreateOptions) -> Result<Image> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_shared(storage.clone(), opts)?;
    Image::open(storage, &OpenOptions::read_write())
}
