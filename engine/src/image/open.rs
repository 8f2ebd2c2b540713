//! Creating and opening an image: the header, the L1 table and the
//! refcount structures are read and validated before anything is written.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use qj_journal::{DirectFileStorage, FileStorage, Storage};
use qj_spec::qcow2::{features, read_table_entry, Header, JournalExtension, L1Entry};
use qj_spec::units::{Geometry, HostOffset};

use super::backing::ChainWalk;
use super::new_data::NewDataLog;
use super::{HeaderState, Image, L1State};
use crate::backend::journal::JournalBackend;
use crate::backend::journal_usable;
use crate::backend::ordered::FlushOrdering;
use crate::backend::{BackendKind, MetadataBackend};
use crate::cache::TableCache;
use crate::error::{Error, IoContext, Result};
use crate::lock::ImageLock;
use crate::metadata_map::MetadataMap;
use crate::options::{BackingSource, CreateOptions, OpenOptions};
use crate::refcount::{RefcountState, SharedMetadataMap};
use crate::stats::Counters;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, RwLock};

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
    ///
    /// Nothing already stored is lost on failure: the options are checked
    /// first, an existing file is locked as a writer would lock it (so an
    /// image in use is refused), and the new image is built in a temporary
    /// file beside it that replaces the old one only once complete and
    /// durable. A failure leaves the old file byte for byte, and no partial
    /// file. A symlink is followed: its target is replaced.
    pub fn create_path(path: &Path, opts: &CreateOptions) -> Result<()> {
        crate::create::validate(opts)?;
        let ctx = |what: &str| format!("{what} {}", path.display());
        let target = match std::fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
            Err(e) => return Err(e).ctx(|| ctx("resolving")),
        };
        let _lock = if target.exists() {
            ImageLock::acquire(&target, true, crate::LockMode::Qemu)?
        } else {
            None
        };
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dir.join(format!(".{name}.qj-create-{}", std::process::id()));
        let built = (|| {
            let storage =
                FileStorage::create(&temp).ctx(|| format!("creating {}", temp.display()))?;
            Self::create_shared(Arc::new(storage), opts)?;
            if let Ok(meta) = std::fs::metadata(&target) {
                std::fs::set_permissions(&temp, meta.permissions())
                    .ctx(|| ctx("keeping the permissions of"))?;
            }
            std::fs::rename(&temp, &target).ctx(|| ctx("replacing"))?;
            // The rename is durable with the directory.
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("flushing the directory {}", dir.display()))
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        built
    }

    /// Opens the image file at `path`.
    /// The file is locked as QEMU locks it (`opts.lock`) before anything
    /// is read or written, and stays locked until the image is dropped.
    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let opened = || format!("opening {}", path.display());
        let open_storage = || -> Result<Arc<dyn Storage>> {
            Ok(if opts.cache.direct() {
                Arc::new(DirectFileStorage::open(path, opts.writable).ctx(|| {
                    format!(
                        "{} with O_DIRECT (cache=none needs a file system that has it)",
                        opened()
                    )
                })?)
            } else {
                Arc::new(FileStorage::open(path, opts.writable).ctx(opened)?)
            })
        };
        // Opened before the lock, so that a missing file or a file system
        // without O_DIRECT is named as such.
        let mut storage = open_storage()?;
        let mut chain = ChainWalk::default();
        chain.enter(path, &path.display().to_string())?;
        let lock = ImageLock::acquire(path, opts.writable, opts.lock)?;
        if opts.writable {
            // Ordering: a writable handle keeps the file's length from its
            // open (`journal/src/file_length.rs`): it decides whether a new
            // cluster's padding reads as zeros without being written, and
            // where an O_DIRECT handle reserves space (allocated, or
            // written zeros where the file system cannot allocate). Read
            // before the lock, the length may predate the last holder's
            // final writes: padding would be skipped over their bytes, and
            // such zeros would land on them. Open again now that no one
            // else writes.
            drop(storage);
            storage = open_storage()?;
        }
        if let Some(log) = &opts.log_writes {
            storage = Arc::new(
                crate::log_writes::LogWritesStorage::create(storage, log)
                    .ctx(|| format!("creating the write log {}", log.display()))?,
            );
        }
        let mut opts = opts.clone();
        if opts.base_dir.is_none() {
            opts.base_dir = path.parent().map(Path::to_path_buf);
        }
        let mut image = Self::open_in_chain(storage, &opts, &mut chain)?;
        image.lock = lock;
        Ok(image)
    }

    /// Opens an image on `storage`: with the journalled backend when the
    /// header locates a valid qjournal (replaying it first), else with the
    /// flush-ordering backend.
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        Self::open_in_chain(storage, opts, &mut ChainWalk::default())
    }

    /// [`Image::open`] as one layer of a backing chain being opened.
    pub(super) fn open_in_chain(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &mut ChainWalk,
    ) -> Result<Image> {
        let header = Self::read_header(&*storage)?;
        if let Some(why) = journal_usable::missing_dirty_journal(&header) {
            return Err(Error::Journal(format!(
                "{why}; {}",
                journal_usable::SALVAGE_ADVICE
            )));
        }
        // The corrupt bit is written in place only (`guard.rs`): a journal
        // replayed now would bring back a header without it, so a writable
        // open is refused here, before replay writes anything.
        if opts.writable {
            refuse_writing(&header)?;
        }
        let ordered = || Arc::new(FlushOrdering::with_mutation(opts.ordering_mutation));
        let Some(ext) = header.journal() else {
            return Self::open_with_backend_in(storage, opts, ordered(), chain);
        };
        if opts.writable {
            // A writable open of a journal image writes before it is done
            // (the replay in place, a re-created journal), so it first opens
            // the image read-only, with the journal replayed in memory:
            // whatever would refuse the image refuses it before any byte
            // changes (found by the whole-image fuzz target). Images
            // without a journal write nothing before their checks pass.
            let probe_opts = OpenOptions {
                writable: false,
                backing: BackingSource::Ignore,
                log_writes: None,
                ..opts.clone()
            };
            let probe =
                Self::open_in_chain(storage.clone(), &probe_opts, &mut ChainWalk::default())?;
            let replayed = probe.header.lock().mem.clone();
            // What only a writable open checks (the metadata map, refcount
            // blocks apart from every other structure) is checked on the
            // replayed metadata too.
            let entries = probe.l1.read().entries.clone();
            let file_len = probe.file_len_seen.load(crate::sync::Ordering::Acquire);
            open_metadata(
                &*probe.storage,
                &*probe.backend,
                &replayed,
                &entries,
                file_len,
                true,
                4,
            )?;
            probe.close()?;
            refuse_writing(&replayed)?;
        }
        if !header.has_autoclear(features::AUTOCLEAR_JOURNAL_VALID_BIT) {
            // A program that does not know the journal opened the image
            // read-write since (QEMU clears unknown autoclear bits), which
            // it could do only while the journal was clean: the metadata in
            // place is authoritative and the journal's clusters may have
            // been freed and reused. Reading needs nothing from the journal;
            // writing gets a fresh one.
            if !opts.writable {
                return Self::open_with_backend_in(storage, opts, ordered(), chain);
            }
            return Self::recreate_journal(storage, opts, ext);
        }
        let file_len = storage.len().ctx(|| "reading the image length".into())?;
        journal_usable::extension_inside_file(&ext, file_len).map_err(|why| {
            Error::Journal(format!(
                "{why}: the file was truncated or the extension is damaged; {}",
                journal_usable::SALVAGE_ADVICE
            ))
        })?;
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
            ext.flags & JournalExtension::FLAG_DEDUP != 0,
        )?;
        Self::open_with_backend_in(storage, opts, Arc::new(backend), chain)
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
        Self::open_with_backend_in(storage, opts, Arc::from(backend), &mut ChainWalk::default())
    }

    /// [`Image::open_with_backend`] as one layer of a backing chain.
    fn open_with_backend_in(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        backend: Arc<dyn MetadataBackend>,
        chain: &mut ChainWalk,
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
            // The corrupt bit lives in place only (`guard.rs`).
            if Self::read_header(&*storage)?.is_corrupt() {
                header.incompatible_features |= features::INCOMPAT_CORRUPT_MASK;
            }
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
        let (metadata, refcounts, bitmaps) = open_metadata(
            &*storage,
            &*backend,
            &header,
            &entries,
            file_len,
            opts.writable,
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

        let backing = Self::open_backing(&header, opts, chain)?;
        let dedup_on = header
            .journal()
            .is_some_and(|j| j.flags & JournalExtension::FLAG_DEDUP != 0)
            && backend.kind() == BackendKind::Journal
            && opts.writable;
        let dedup_events = backend.take_replayed_dedup();
        let mut image = Image {
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
            metadata,
            gate: RwLock::new(()),
            backing,
            new_data: Mutex::new(NewDataLog::default()),
            new_data_held: AtomicUsize::new(0),
            fresh_metadata: Mutex::new(Vec::new()),
            ordering_mutation: opts.ordering_mutation,
            journal_mutation: opts.journal_mutation,
            bitmaps: Mutex::new(bitmaps.with_mutation(opts.journal_mutation)),
            poison: Mutex::new(None),
            finished: AtomicBool::new(false),
            gather_order: Mutex::new(()),
            submit_order: Mutex::new(()),
            fresh_tables: AtomicU64::new(0),
            entries_changed: AtomicU64::new(0),
            op_gen: AtomicU64::new(0),
            done_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            submitted_gen: AtomicU64::new(0),
            lock: None,
            writethrough: opts.cache.writethrough(),
            dedup: None,
        };
        if dedup_on {
            image.dedup = Some(image.dedup_start(
                dedup_events,
                opts.dedup_memory_bytes_max,
                opts.dedup_trust_hash,
                opts.journal_mutation,
            )?);
        }
        if opts.writable {
            image.start_bitmaps()?;
        }
        if opts.writable && opts.background_checkpoint {
            Arc::clone(&image.backend).start_background_checkpoints(Arc::clone(&image.counters))?;
        }
        Ok(image)
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

/// The header bits that refuse a read-write open (a read-only one may still
/// read the image, as QEMU's may): marked corrupt, or dirty (lazy refcounts
/// not yet repaired). The corrupt bit is written in place only
/// (`guard.rs`): a journal replayed now would bring back a header without
/// it, so the header in place is asked before any replay, and the replayed
/// one after.
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

/// The guard's map, the refcount side and the persistent bitmaps of an
/// image being opened. A writable image must have metadata that does not
/// overlap (the map is built, and every bitmap cluster and refcount block
/// is added to it), and bad bitmaps refuse it before anything is written; a
/// read-only one needs no guard, and stays readable however its tables
/// overlap, as in QEMU, with the reason its bitmaps cannot be read
/// reported, not fatal.
fn open_metadata(
    storage: &dyn Storage,
    backend: &dyn MetadataBackend,
    header: &Header,
    l1_entries: &[u64],
    file_len: u64,
    writable: bool,
    tables_max: usize,
) -> Result<(
    SharedMetadataMap,
    RefcountState,
    super::bitmaps::BitmapState,
)> {
    let (metadata, bitmaps) = if writable {
        let mut map = super::guard::load_metadata_map(storage, backend, header, l1_entries)?;
        let bitmaps = super::bitmaps::load(storage, backend, header, file_len, Some(&mut map))?;
        (map, bitmaps)
    } else {
        let bitmaps = super::bitmaps::load(storage, backend, header, file_len, None)
            .unwrap_or_else(|e| super::bitmaps::BitmapState::unreadable(e.to_string()));
        (MetadataMap::new(), bitmaps)
    };
    let metadata: SharedMetadataMap = Arc::new(parking_lot::RwLock::new(metadata));
    let geometry = header.geometry();
    let refcounts = RefcountState::open(
        storage,
        backend,
        geometry,
        HostOffset(header.refcount_table_offset),
        u64::from(header.refcount_table_clusters),
        geometry.clusters_for(file_len),
        tables_max,
        metadata.clone(),
    )?;
    Ok((metadata, refcounts, bitmaps))
}
