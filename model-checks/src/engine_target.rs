//! The engine as a crash target: one [`EngineTarget`] per backend (and per
//! injected ordering bug), so the harness explores our qcow2 images exactly
//! as it explores its own small targets.

use std::sync::Arc;

use parking_lot::Mutex;

use qj_engine::backend::journal::JournalMutation;
use qj_engine::backend::ordered::OrderingMutation;
use qj_engine::check::{check, RepairMode};
use qj_engine::{
    BackingFormat, BackingSource, CreateOptions, Image, JournalConfig, MemStorage, OpenOptions,
};
use qj_journal::Storage;

use crate::content_map::{ContentMap, ContentSource};
use crate::target::{
    CheckSummary, CrashTarget, GuestDisk, LeakExpectation, QemuExport, TargetError,
};

/// Which of the engine's backends a target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineBackend {
    /// Flush ordering.
    Ordered,
    /// The journal, single-flush commit.
    Journal,
    /// The journal, the draft's two-flush commit.
    JournalDraft,
}

/// Journal size of crash targets: small, so that short workloads wrap the
/// ring and checkpoint.
pub const CRASH_JOURNAL_BYTES: u64 = 96 << 10;

/// A built snapshot-base image: (virtual size, base content, image bytes).
type SnapshotBase = (u64, Vec<u8>, Vec<u8>);

/// The engine on one backend, optionally with a deliberate ordering bug.
#[derive(Debug, Clone)]
pub struct EngineTarget {
    backend: EngineBackend,
    ordering_mutation: OrderingMutation,
    journal_mutation: JournalMutation,
    cluster_size: u64,
    refcount_bits: u32,
    cache_bytes_max: u64,
    /// Put the base content in the image itself, shared with an internal
    /// snapshot, instead of in a backing file (see [`Self::with_snapshot_base`]).
    snapshot_base: bool,
    /// Carry small writes into fresh clusters in the journal transaction
    /// (`OpenOptions::log_fresh_data`, journal rule 7).
    log_fresh_data: bool,
    /// Deduplicate whole clusters (journal extension flag), with guest data
    /// stored so that one write's whole clusters are equal
    /// (`dedup_content.rs`).
    dedup: bool,
    /// Give the image a persistent dirty bitmap at creation and check it
    /// after every crash (`bitmap_check.rs`).
    bitmap: bool,
    /// The snapshot base image last built, by (virtual size, backing
    /// content): building it runs `qemu-img`, once per workload shape.
    base_cache: Arc<Mutex<Option<SnapshotBase>>>,
}

impl EngineTarget {
    /// A correct target on `backend` with small clusters (so that short
    /// workloads reach new L2 tables, refcount blocks and table growth).
    pub fn new(backend: EngineBackend) -> Self {
        Self {
            backend,
            ordering_mutation: OrderingMutation::None,
            journal_mutation: JournalMutation::None,
            cluster_size: 4096,
            refcount_bits: 16,
            // Small caches force write-back through eviction, not only flush.
            cache_bytes_max: 16 * 4096,
            snapshot_base: false,
            log_fresh_data: false,
            dedup: false,
            bitmap: false,
            base_cache: Arc::new(Mutex::new(None)),
        }
    }

    /// The same target where a workload's base content (what a backing file
    /// would hold, or zeros without one) is written into every cluster of
    /// the image and then shared with an internal snapshot made by
    /// `qemu-img snapshot -c`: every partial write is a copy-on-write of a
    /// shared cluster, which the journalled backend delays with copy
    /// descriptors.
    pub fn with_snapshot_base(mut self) -> Self {
        self.snapshot_base = true;
        self
    }

    /// The same target with an enabled persistent bitmap, checked after
    /// every crash.
    pub fn with_bitmap(mut self) -> Self {
        self.bitmap = true;
        self
    }

    /// The same target with logged data (journal rule 7).
    pub fn with_logged_data(mut self) -> Self {
        self.log_fresh_data = true;
        self
    }

    /// The same target with deduplication (`journal-dedup`).
    pub fn with_dedup(mut self) -> Self {
        self.dedup = true;
        self
    }

    /// The same target with a flush-ordering bug injected.
    pub fn with_ordering_mutation(mut self, mutation: OrderingMutation) -> Self {
        self.ordering_mutation = mutation;
        self
    }

    /// The same target with a journalled-backend bug injected.
    pub fn with_journal_mutation(mut self, mutation: JournalMutation) -> Self {
        self.journal_mutation = mutation;
        self
    }

    fn is_journal(&self) -> bool {
        self.backend != EngineBackend::Ordered
    }

    /// Changes the image geometry.
    pub fn with_geometry(mut self, cluster_size: u64, refcount_bits: u32) -> Self {
        self.cluster_size = cluster_size;
        self.refcount_bits = refcount_bits;
        self
    }

    /// The image a snapshot-base workload starts from: the base content in
    /// clusters shared with snapshot `base` (QEMU made it, so its rules
    /// hold), and the journal if the backend has one.
    fn snapshot_base_image(
        &self,
        backing: Option<&dyn Storage>,
        virtual_size_bytes: u64,
    ) -> Result<Vec<u8>, TargetError> {
        let mut content = match backing {
            Some(backing) => device_bytes(backing)?,
            None => Vec::new(),
        };
        // Bounded by the workload's disk size.
        content.resize(virtual_size_bytes as usize, 0);
        if let Some((size, cached_content, image)) = &*self.base_cache.lock() {
            if *size == virtual_size_bytes && *cached_content == content {
                return Ok(image.clone());
            }
        }
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let opts = CreateOptions {
            virtual_size: virtual_size_bytes,
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            ..CreateOptions::default()
        };
        Image::create_shared(storage.clone(), &opts).map_err(engine_err)?;
        let image = Image::open(storage.clone(), &self.open_options(None)).map_err(engine_err)?;
        image.write(&content, 0).map_err(engine_err)?;
        image.close().map_err(engine_err)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("base.qcow2");
        std::fs::write(&path, device_bytes(&*storage)?)?;
        crate::qemu::qemu_img_snapshot(&path, "base")
            .map_err(|e| TargetError::Other(Box::new(e)))?;
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(std::fs::read(&path)?));
        if self.is_journal() {
            let config = JournalConfig {
                size_bytes: CRASH_JOURNAL_BYTES,
                two_flush: self.backend == EngineBackend::JournalDraft,
                log_data: false,
                dedup: false,
            };
            Image::enable_journal(storage.clone(), &config).map_err(engine_err)?;
        }
        let image = device_bytes(&*storage)?;
        *self.base_cache.lock() = Some((virtual_size_bytes, content, image.clone()));
        Ok(image)
    }

    fn open_options(&self, backing: Option<Arc<dyn Storage>>) -> OpenOptions {
        let mut o = OpenOptions::read_write();
        o.cache_bytes_max = self.cache_bytes_max;
        o.ordering_mutation = self.ordering_mutation;
        o.journal_mutation = self.journal_mutation;
        o.log_fresh_data = self.log_fresh_data;
        o.backing = match backing {
            Some(b) => BackingSource::Given(b, BackingFormat::Raw),
            None => BackingSource::Ignore,
        };
        o
    }
}

pub(crate) fn engine_err(e: qj_engine::Error) -> TargetError {
    match e {
        qj_engine::Error::Io { source, .. } => TargetError::Io(source),
        other => TargetError::Other(Box::new(other)),
    }
}

impl CrashTarget for EngineTarget {
    fn name(&self) -> String {
        let name = match self.backend {
            EngineBackend::Ordered => "ordered",
            EngineBackend::Journal => "journal",
            EngineBackend::JournalDraft => "journal-draft",
        };
        if self.snapshot_base {
            format!("{name}-cow")
        } else if self.log_fresh_data {
            format!("{name}-logged")
        } else if self.dedup {
            format!("{name}-dedup")
        } else if self.bitmap {
            format!("{name}-bitmap")
        } else {
            name.into()
        }
    }

    fn mutation(&self) -> Option<String> {
        let journal = match self.journal_mutation {
            JournalMutation::None => None,
            JournalMutation::SkipDataChecksums => Some("no-data-checksums"),
            JournalMutation::SkipRevokes => Some("no-revokes"),
            JournalMutation::SkipDirtyBit => Some("no-dirty-bit"),
            JournalMutation::SkipCopyBeforeWrite => Some("no-copy-before-write"),
            JournalMutation::WriteLoggedInPlace => Some("logged-write-in-place"),
            JournalMutation::LoggedZerosOverKept => Some("logged-zeros-over-kept"),
            JournalMutation::DedupSkipIncrement => Some("dedup-no-increment"),
            JournalMutation::DedupSkipDeletion => Some("dedup-no-deletion"),
            JournalMutation::SnapshotStepsSplit => Some("snapshot-steps-split"),
            JournalMutation::BitmapOutsideTransaction => Some("bitmap-outside-transaction"),
            JournalMutation::Journal(qj_journal::Mutation::None) => None,
            JournalMutation::Journal(qj_journal::Mutation::ReplaySkipsTxChecksum) => {
                Some("replay-skips-tx-checksum")
            }
            JournalMutation::Journal(qj_journal::Mutation::ReplayIgnoresRevokes) => {
                Some("replay-ignores-revokes")
            }
            JournalMutation::Journal(qj_journal::Mutation::CheckpointBeforeFlush) => {
                Some("checkpoint-before-flush")
            }
        };
        let ordering = match self.ordering_mutation {
            OrderingMutation::None => None,
            OrderingMutation::SkipRefcountFlush => Some("l2-before-refcount-flush"),
            OrderingMutation::TablesBeforeData => Some("l2-before-data"),
            OrderingMutation::SnapshotTableFirst => Some("snapshot-table-first"),
        };
        journal.or(ordering).map(String::from)
    }

    fn create(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        virtual_size_bytes: u64,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        if self.snapshot_base {
            let image = self.snapshot_base_image(backing.as_deref(), virtual_size_bytes)?;
            dev.write_at(&image, 0)?;
            dev.flush()?;
            return self.open(dev, None);
        }
        let opts = CreateOptions {
            virtual_size: virtual_size_bytes,
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            backing_file: backing.as_ref().map(|_| "backing.raw".to_string()),
            backing_format: backing.as_ref().map(|_| BackingFormat::Raw),
            journal: self.is_journal().then(|| JournalConfig {
                size_bytes: CRASH_JOURNAL_BYTES,
                two_flush: self.backend == EngineBackend::JournalDraft,
                log_data: false,
                dedup: self.dedup,
            }),
        };
        Image::create_shared(dev.clone(), &opts).map_err(engine_err)?;
        if self.bitmap {
            crate::bitmap_check::add_crash_bitmap(
                dev.clone(),
                &self.open_options(backing.clone()),
                self.cluster_size,
            )?;
        }
        self.open(dev, backing)
    }

    fn open(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        if self.is_journal() {
            check_dirty_bit(&*dev)?;
        }
        // A snapshot-base image has no backing file: its base is inside.
        let backing = backing.filter(|_| !self.snapshot_base);
        let image = Image::open(dev, &self.open_options(backing)).map_err(engine_err)?;
        // The dedup index replay rebuilt must agree with the metadata: open
        // drops (and counts) every entry that names a free cluster,
        // metadata, or other content. Each one would be a write
        // deduplicated against the wrong data (with a trusted hash), so
        // recovery that meets one has failed. Entries of the persisted
        // index that a checkpoint left older than the log are counted
        // apart (`persisted_stale_at_open`): spec §3.6 expects them after
        // a crash, and open rehashes them.
        let stale_entries = image.dedup_stats().map_or(0, |s| s.dropped_at_open);
        if stale_entries > 0 {
            return Err(TargetError::Invalid(format!(
                "recovery dropped {stale_entries} stale dedup index entries"
            )));
        }
        Ok(Box::new(EngineDisk {
            image: Some(image),
            dedup_sectors_per_cluster: self
                .dedup
                .then_some(self.cluster_size / crate::medium::SECTOR_BYTES),
        }))
    }

    fn check(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        if self.is_journal() {
            // The journal's committed state is the image: check what replay
            // makes of it, on a copy (check must not write to `dev`).
            let copy: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(device_bytes(&*dev)?));
            let image = Image::open(copy.clone(), &self.open_options(None)).map_err(engine_err)?;
            // The dedup index replay rebuilt must agree with the metadata:
            // open drops (and counts) every entry that names a free
            // cluster, metadata, or other content. Each one would be a
            // write deduplicated against the wrong data (with a trusted
            // hash), so it counts as a corruption here.
            let stale_entries = image.dedup_stats().map_or(0, |s| s.dropped_at_open);
            image.close().map_err(engine_err)?;
            if self.bitmap {
                crate::bitmap_check::check_crash_bitmap(copy.clone(), true)?;
            }
            let mut summary = check_device(&*copy)?;
            summary.corruptions += stale_entries;
            return Ok(summary);
        }
        if self.bitmap {
            crate::bitmap_check::check_crash_bitmap(dev.clone(), false)?;
        }
        check_ordered(&*dev)
    }

    fn check_after_close(&self) -> bool {
        // `check` of a journal image reopens and closes a copy (a second
        // replay); the recovered disk closed by the harness is that image.
        self.is_journal()
    }

    fn check_closed(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        if self.bitmap {
            crate::bitmap_check::check_crash_bitmap(dev.clone(), self.is_journal())?;
        }
        check_device(&*dev)
    }

    fn check_unrecovered(
        &self,
        dev: Arc<dyn Storage>,
    ) -> Result<Option<CheckSummary>, TargetError> {
        // Read-only: `check` replays a dirty journal in memory before it
        // judges the header against the file (spec 3.2).
        if self.is_journal() {
            check_device(&*dev).map(Some)
        } else {
            check_ordered(&*dev).map(Some)
        }
    }

    fn leaks_allowed(&self) -> bool {
        self.backend == EngineBackend::Ordered
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    fn qemu_export(&self, dev: Arc<dyn Storage>) -> Result<Option<QemuExport>, TargetError> {
        let image = device_bytes(&*dev)?;
        if !self.is_journal() {
            // Flush ordering leaves nothing QEMU cannot read: export as is.
            return Ok(Some(QemuExport {
                image,
                leaks: LeakExpectation::Any,
            }));
        }
        // QEMU refuses a dirty journal: replay and clean-close a copy first.
        // QEMU then counts exactly the journal's clusters as leaks.
        let copy: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(image));
        Image::open(copy.clone(), &self.open_options(None))
            .and_then(Image::close)
            .map_err(engine_err)?;
        // A dedup image also has its persisted index, written at that close.
        let index_clusters = Image::read_header(&*copy)
            .map_err(engine_err)?
            .dedup_index()
            .and_then(Result::ok)
            .map_or(0, |index| u64::from(index.clusters));
        let clusters = CRASH_JOURNAL_BYTES.div_ceil(self.cluster_size) + index_clusters;
        Ok(Some(QemuExport {
            image: device_bytes(&*copy)?,
            leaks: LeakExpectation::Exactly(clusters),
        }))
    }
}

/// Rule 1 of the journalled backend, checked on a crash image before
/// recovery: a journal with anything to replay is flagged dirty in the
/// header, or a program that does not know the journal would read metadata
/// without the committed updates. Reads only.
pub(crate) fn check_dirty_bit(dev: &dyn Storage) -> Result<(), TargetError> {
    let header = Image::read_header(dev).map_err(engine_err)?;
    let Some(ext) = header.journal() else {
        return Ok(());
    };
    if header.has_incompatible(60) {
        // Flagged dirty: the rule holds whatever the journal holds, and
        // reading the whole journal to find out would be wasted.
        return Ok(());
    }
    let dump = match qj_journal::dump(dev, ext.offset, ext.size) {
        Ok(dump) => dump,
        // Not this check's business: recovery reports a damaged journal.
        Err(_) => return Ok(()),
    };
    if dump.dirty {
        return Err(TargetError::Corrupt {
            what: format!(
                "the journal holds {} transactions to replay but the header's journal-dirty bit is clear",
                dump.transactions.len()
            ),
            offset: 72,
        });
    }
    Ok(())
}

fn device_bytes(dev: &dyn Storage) -> Result<Vec<u8>, TargetError> {
    let mut bytes = vec![0u8; dev.len()? as usize];
    dev.read_at(&mut bytes, 0)?;
    Ok(bytes)
}

fn check_device(dev: &dyn Storage) -> Result<CheckSummary, TargetError> {
    let report = check(dev, RepairMode::None, &[]).map_err(|e| TargetError::Other(Box::new(e)))?;
    Ok(CheckSummary {
        corruptions: report.corruptions,
        leaks: report.leaks,
    })
}

/// Flush ordering's check: leaks are allowed, and so are the COPIED flag
/// errors that `check -r leaks` repairs. A snapshot operation changes
/// refcounts and COPIED flags in different clusters, so whichever goes
/// first, a crash between them shows a flag that disagrees with a count
/// (QEMU's own order leaves a raised count under a set flag; its check
/// calls that a corruption and `-r leaks` repairs it). Whatever the leak
/// repair leaves is a corruption. Works on a copy: `dev` is not written.
fn check_ordered(dev: &dyn Storage) -> Result<CheckSummary, TargetError> {
    let found = check_device(dev)?;
    if found.corruptions == 0 {
        return Ok(found);
    }
    let copy = MemStorage::from_bytes(device_bytes(dev)?);
    check(&copy, RepairMode::Leaks, &[]).map_err(|e| TargetError::Other(Box::new(e)))?;
    let left = check_device(&copy)?;
    Ok(CheckSummary {
        corruptions: left.corruptions,
        leaks: found.leaks,
    })
}

/// An open engine image as the harness drives it.
struct EngineDisk {
    image: Option<Image>,
    /// On the dedup target: guest data is stored per position in its
    /// cluster (`dedup_content.rs`), clusters of this many sectors.
    dedup_sectors_per_cluster: Option<u64>,
}

impl EngineDisk {
    fn image(&self) -> &Image {
        self.image.as_ref().expect("image is open until close")
    }
}

impl Drop for EngineDisk {
    fn drop(&mut self) {
        // Dropped without close: the harness cut the power. Nothing may be
        // written back, as after a real crash.
        if let Some(image) = self.image.take() {
            image.abandon();
        }
    }
}

impl GuestDisk for EngineDisk {
    fn size_bytes(&self) -> u64 {
        self.image().virtual_size()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
        self.image().read(buf, offset).map_err(engine_err)?;
        if let Some(per_cluster) = self.dedup_sectors_per_cluster {
            crate::dedup_content::load(buf, offset, per_cluster);
        }
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        match self.dedup_sectors_per_cluster {
            Some(per_cluster) => {
                let mut stored = buf.to_vec();
                crate::dedup_content::store(&mut stored, offset, per_cluster);
                self.image().write(&stored, offset).map_err(engine_err)
            }
            None => self.image().write(buf, offset).map_err(engine_err),
        }
    }
    fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.image()
            .write_zeroes(offset, len_bytes)
            .map_err(engine_err)
    }
    fn discard(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.image().discard(offset, len_bytes).map_err(engine_err)
    }
    fn flush(&self) -> Result<(), TargetError> {
        self.image().flush().map_err(engine_err)
    }
    fn resize(&self, new_size_bytes: u64) -> Result<(), TargetError> {
        self.image().resize(new_size_bytes).map_err(engine_err)
    }
    fn close(mut self: Box<Self>) -> Result<(), TargetError> {
        let image = self.image.take().expect("image is open until close");
        image.close().map_err(engine_err)
    }
    fn content_map(&self) -> Result<Option<ContentMap>, TargetError> {
        let image = self.image();
        // Delayed copies and logged data are read from memory: the map
        // would not say where those bytes come from.
        if !image.reads_as_mapped() {
            return Ok(None);
        }
        let cluster_bytes = image.geometry().cluster_size();
        let size_bytes = image.virtual_size();
        let clusters = size_bytes.div_ceil(cluster_bytes);
        let mut sources = Vec::with_capacity(usize::try_from(clusters).unwrap_or(0));
        for extent in image.map().map_err(engine_err)? {
            let source = |cluster_in_extent: u64| match extent.offset {
                _ if extent.compressed => ContentSource::Opaque,
                Some(offset) if extent.data => {
                    ContentSource::Host(offset + cluster_in_extent * cluster_bytes)
                }
                _ if extent.zero => ContentSource::Zero,
                _ if !extent.data => ContentSource::Backing,
                _ => ContentSource::Opaque,
            };
            // Extents start on cluster boundaries; bounded by the size.
            let count = extent.length.div_ceil(cluster_bytes);
            sources.extend((0..count).map(source));
        }
        if sources.len() as u64 != clusters {
            return Err(TargetError::Invalid(format!(
                "the map covers {} clusters of a {size_bytes}-byte disk of {clusters} clusters",
                sources.len()
            )));
        }
        Ok(Some(ContentMap {
            cluster_bytes,
            sources,
        }))
    }
    fn snapshot_create(&self, id: u64) -> Result<(), TargetError> {
        self.image()
            .snapshot_create(&snapshot_name(id))
            .map(|_| ())
            .map_err(engine_err)
    }
    fn snapshot_apply(&self, id: u64) -> Result<(), TargetError> {
        self.image()
            .snapshot_apply(&snapshot_name(id))
            .map_err(engine_err)
    }
    fn snapshot_delete(&self, id: u64) -> Result<(), TargetError> {
        self.image()
            .snapshot_delete(&snapshot_name(id))
            .map_err(engine_err)
    }
}

/// The name of the workload's snapshot `id`: never a number, so that it
/// cannot be taken for a snapshot id (a `journal-cow` base image holds
/// QEMU's snapshot with id 1).
fn snapshot_name(id: u64) -> String {
    format!("s{id}")
}

/// Every backend `qj crash` knows: the engine's first, then the built-in
/// proof targets.
pub const BACKENDS: &[&str] = &[
    "ordered",
    "journal",
    "journal-draft",
    "journal-cow",
    "journal-logged",
    "journal-dedup",
    "ordered-bitmap",
    "journal-bitmap",
    "raw",
    "log",
    "redo",
];

/// The engine backends `qj crash --backend all` explores.
/// `journal-cow` is the journal on images whose every cluster starts
/// shared with an internal snapshot (delayed copy-on-write);
/// `journal-logged` carries small writes into fresh clusters in the
/// transaction (logged data); `ordered-bitmap` and `journal-bitmap` carry
/// an enabled persistent bitmap that is checked after every crash.
/// `journal-dedup` deduplicates whole clusters, the index kept in step by
/// the journal's dedup descriptors; after every crash the recovered index
/// must agree with the metadata.
pub const ENGINE_BACKENDS: &[&str] = &[
    "ordered",
    "journal",
    "journal-draft",
    "journal-cow",
    "journal-logged",
    "journal-dedup",
    "ordered-bitmap",
    "journal-bitmap",
];

/// The mutations (deliberate ordering bugs) of `backend`.
#[must_use]
pub fn mutations(backend: &str) -> &'static [&'static str] {
    match backend {
        "ordered" => &[
            "l2-before-refcount-flush",
            "l2-before-data",
            "snapshot-table-first",
        ],
        "journal" => &[
            "no-data-checksums",
            "no-revokes",
            "no-dirty-bit",
            "replay-skips-tx-checksum",
            "replay-ignores-revokes",
            "checkpoint-before-flush",
            "snapshot-steps-split",
        ],
        "journal-draft" => &[],
        "journal-cow" => &["no-copy-before-write"],
        "journal-logged" => &["logged-write-in-place", "logged-zeros-over-kept"],
        "journal-dedup" => &["dedup-no-increment", "dedup-no-deletion"],
        "ordered-bitmap" => &[],
        "journal-bitmap" => &["bitmap-outside-transaction"],
        other => crate::targets::builtin_mutations(other),
    }
}

/// Every (backend, mutation) pair, for `qj crash --list-mutations` and CI.
#[must_use]
pub fn all_mutations() -> Vec<(&'static str, &'static str)> {
    BACKENDS
        .iter()
        .flat_map(|&b| mutations(b).iter().map(move |&m| (b, m)))
        .collect()
}

/// The `OpenOptions` fields that inject the engine mutation `name` (one of
/// [`all_mutations`] on an engine backend), for any program that opens an
/// image itself (`qj io --mutate`, which records crash logs); `None` for
/// names that are not engine mutations.
#[must_use]
pub fn open_mutation(name: &str) -> Option<(OrderingMutation, JournalMutation)> {
    let ordering = |m| Some((m, JournalMutation::None));
    let journal = |m| Some((OrderingMutation::None, m));
    match name {
        "l2-before-refcount-flush" => ordering(OrderingMutation::SkipRefcountFlush),
        "l2-before-data" => ordering(OrderingMutation::TablesBeforeData),
        "snapshot-table-first" => ordering(OrderingMutation::SnapshotTableFirst),
        "snapshot-steps-split" => journal(JournalMutation::SnapshotStepsSplit),
        "no-data-checksums" => journal(JournalMutation::SkipDataChecksums),
        "no-revokes" => journal(JournalMutation::SkipRevokes),
        "no-dirty-bit" => journal(JournalMutation::SkipDirtyBit),
        "replay-skips-tx-checksum" => journal(JournalMutation::Journal(
            qj_journal::Mutation::ReplaySkipsTxChecksum,
        )),
        "replay-ignores-revokes" => journal(JournalMutation::Journal(
            qj_journal::Mutation::ReplayIgnoresRevokes,
        )),
        "checkpoint-before-flush" => journal(JournalMutation::Journal(
            qj_journal::Mutation::CheckpointBeforeFlush,
        )),
        "no-copy-before-write" => journal(JournalMutation::SkipCopyBeforeWrite),
        "logged-write-in-place" => journal(JournalMutation::WriteLoggedInPlace),
        "logged-zeros-over-kept" => journal(JournalMutation::LoggedZerosOverKept),
        "dedup-no-increment" => journal(JournalMutation::DedupSkipIncrement),
        "dedup-no-deletion" => journal(JournalMutation::DedupSkipDeletion),
        "bitmap-outside-transaction" => journal(JournalMutation::BitmapOutsideTransaction),
        _ => None,
    }
}

/// The target named `backend`, with `mutation` injected if given.
pub fn crash_target(
    backend: &str,
    mutation: Option<&str>,
) -> Result<Arc<dyn CrashTarget>, crate::error::NameError> {
    let base = match backend {
        "ordered" => EngineTarget::new(EngineBackend::Ordered),
        "journal" => EngineTarget::new(EngineBackend::Journal),
        "journal-draft" => EngineTarget::new(EngineBackend::JournalDraft),
        "journal-cow" => EngineTarget::new(EngineBackend::Journal).with_snapshot_base(),
        "journal-logged" => EngineTarget::new(EngineBackend::Journal).with_logged_data(),
        "journal-dedup" => EngineTarget::new(EngineBackend::Journal).with_dedup(),
        "ordered-bitmap" => EngineTarget::new(EngineBackend::Ordered).with_bitmap(),
        "journal-bitmap" => EngineTarget::new(EngineBackend::Journal).with_bitmap(),
        other if crate::targets::BUILTIN_BACKENDS.contains(&other) => {
            return crate::targets::builtin_target(other, mutation)
        }
        other => return Err(crate::error::NameError::new("backend", other, BACKENDS)),
    };
    let target = match mutation {
        None => base,
        Some(name) => match open_mutation(name).filter(|_| mutations(backend).contains(&name)) {
            Some((ordering, journal)) => base
                .with_ordering_mutation(ordering)
                .with_journal_mutation(journal),
            None => {
                return Err(crate::error::NameError::new(
                    "mutation",
                    name,
                    mutations(backend),
                ))
            }
        },
    };
    Ok(Arc::new(target))
}

/// The first workload seed known to expose `mutation` under the default
/// budget (`model-checks/MUTATIONS.md`): the revoke bugs only show when a
/// metadata cluster that an unsynced transaction wrote is freed and reused,
/// which seed 1 of no preset does. With the journal's mirrored header
/// slots, seed 1 exposes replay-skips-tx-checksum only in a workload whose
/// shrinking takes minutes; seed 2 exposes it at once (measured: 3 s
/// against 132 s, release build). Seed 1 exposes snapshot-steps-split only
/// through an apply whose shrinking takes minutes; seed 3 through a create
/// left half done, shrunk to two operations at once (262 s against 11 s).
#[must_use]
pub fn exposing_seed(mutation: &str) -> u64 {
    match mutation {
        "no-revokes" | "replay-ignores-revokes" | "replay-skips-tx-checksum" => 2,
        "snapshot-steps-split" => 3,
        _ => 1,
    }
}
