//! The targets a workload runs on: our two backends, QEMU, and a raw file.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use qj_engine::{CacheMode, CreateOptions, Image, JournalConfig, OpenOptions};
use qj_journal::{DirectFileStorage, FileStorage, Storage};

/// Journal size of the journalled targets (the engine's default).
pub const JOURNAL_BYTES: u64 = 16 << 20;

/// Where a workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// Our journalled backend, single-flush commit.
    Journal,
    /// Our journalled backend, the draft's two-flush commit.
    JournalDraft,
    /// Our journalled backend, single-flush commit, with small writes into
    /// fresh clusters carried in the transaction (logged data).
    JournalLogged,
    /// Our flush-ordering backend.
    Ordered,
    /// QEMU's qcow2 through `qemu-img bench`.
    Qemu,
    /// QEMU's qcow2 with `lazy_refcounts=on`: one flush per allocating
    /// write (a dirty open repairs the refcounts).
    QemuLazy,
    /// QEMU's qcow2 with `preallocation=metadata`: nothing left to
    /// allocate, QEMU's ceiling.
    QemuPrealloc,
    /// A raw file: the physical limit.
    Raw,
    /// [`TargetKind::Journal`] with one enabled persistent dirty bitmap,
    /// clean when the measurement starts (opt-in: not in `ALL`).
    JournalBitmap,
    /// [`TargetKind::Ordered`] with one enabled persistent dirty bitmap,
    /// clean when the measurement starts (opt-in: not in `ALL`).
    OrderedBitmap,
    /// [`TargetKind::Journal`] with deduplication of whole-cluster writes,
    /// a hash match confirmed by comparing the bytes (opt-in).
    JournalDedup,
    /// [`TargetKind::JournalDedup`] trusting a SHA-256 match without
    /// comparing the bytes (opt-in): the price of the comparison.
    JournalDedupTrust,
}

impl TargetKind {
    /// Every target, in report order.
    pub const ALL: [TargetKind; 8] = [
        TargetKind::Journal,
        TargetKind::JournalDraft,
        TargetKind::JournalLogged,
        TargetKind::Ordered,
        TargetKind::Qemu,
        TargetKind::QemuLazy,
        TargetKind::QemuPrealloc,
        TargetKind::Raw,
    ];

    /// Targets run only when named: the cost of bitmap maintenance, and
    /// deduplication (also run by default with a dedup workload).
    pub const OPT_IN: [TargetKind; 4] = [
        TargetKind::JournalBitmap,
        TargetKind::OrderedBitmap,
        TargetKind::JournalDedup,
        TargetKind::JournalDedupTrust,
    ];

    /// The deduplicating targets.
    pub const DEDUP: [TargetKind; 2] = [TargetKind::JournalDedup, TargetKind::JournalDedupTrust];

    /// The targets a run compares when none are named: every default
    /// target, and the deduplicating ones if a workload repeats content.
    pub fn defaults_for(workloads: &[crate::Workload]) -> Vec<TargetKind> {
        let mut targets = Self::ALL.to_vec();
        if workloads.iter().any(|w| w.duplicate_percent().is_some()) {
            targets.extend(Self::DEDUP);
        }
        targets
    }

    /// The name used on the command line and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            TargetKind::Journal => "journal",
            TargetKind::JournalDraft => "journal-draft",
            TargetKind::JournalLogged => "journal-logged",
            TargetKind::Ordered => "ordered",
            TargetKind::Qemu => "qemu",
            TargetKind::QemuLazy => "qemu-lazy",
            TargetKind::QemuPrealloc => "qemu-prealloc",
            TargetKind::Raw => "raw",
            TargetKind::JournalBitmap => "journal-bitmap",
            TargetKind::OrderedBitmap => "ordered-bitmap",
            TargetKind::JournalDedup => "journal-dedup",
            TargetKind::JournalDedupTrust => "journal-dedup-trust",
        }
    }

    /// Parses a name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<TargetKind, String> {
        Self::ALL
            .iter()
            .chain(&Self::OPT_IN)
            .copied()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                let valid: Vec<_> = Self::ALL
                    .iter()
                    .chain(&Self::OPT_IN)
                    .map(|t| t.name())
                    .collect();
                format!("unknown target {name:?}; valid: {}", valid.join(", "))
            })
    }
}

impl TargetKind {
    /// The `qemu-img create -o` options of a QEMU target; `None` for ours.
    pub fn qemu_create_options(&self) -> Option<&'static str> {
        match self {
            TargetKind::Qemu => Some(""),
            TargetKind::QemuLazy => Some("lazy_refcounts=on"),
            TargetKind::QemuPrealloc => Some("preallocation=metadata"),
            _ => None,
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A disk a workload drives in-process (everything but QEMU).
pub trait BenchDisk: Send + Sync {
    /// Writes `buf` at guest offset `offset`.
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into `buf` from guest offset `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Device flushes and bytes written to the device so far.
    fn device_counts(&self) -> (u64, u64);
    /// Called after the preparation, before the measured operations:
    /// a disk with a dirty bitmap clears it (as right after a backup), so
    /// that measured writes pay for setting new bits.
    fn before_measure(&self) -> io::Result<()> {
        Ok(())
    }
    /// What deduplication has done and cost so far; `None` for a disk
    /// that does not deduplicate.
    fn dedup_counts(&self) -> Option<DedupCounts> {
        None
    }
}

/// Deduplication's work and cost, counted from an image's open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupCounts {
    /// Whole-cluster writes hashed.
    pub hashed: u64,
    /// Nanoseconds spent hashing them.
    pub hash_ns: u64,
    /// Hash matches confirmed by comparing the bytes.
    pub compared: u64,
    /// Nanoseconds spent reading and comparing them.
    pub compare_ns: u64,
    /// Writes mapped to a cluster already stored (nothing written).
    pub hits: u64,
}

impl DedupCounts {
    /// The counts from `earlier` to `self`.
    #[must_use]
    pub fn since(&self, earlier: &DedupCounts) -> DedupCounts {
        DedupCounts {
            hashed: self.hashed - earlier.hashed,
            hash_ns: self.hash_ns - earlier.hash_ns,
            compared: self.compared - earlier.compared,
            compare_ns: self.compare_ns - earlier.compare_ns,
            hits: self.hits - earlier.hits,
        }
    }

    /// The sum of two runs' counts.
    #[must_use]
    pub fn plus(&self, other: &DedupCounts) -> DedupCounts {
        DedupCounts {
            hashed: self.hashed + other.hashed,
            hash_ns: self.hash_ns + other.hash_ns,
            compared: self.compared + other.compared,
            compare_ns: self.compare_ns + other.compare_ns,
            hits: self.hits + other.hits,
        }
    }
}

fn io_err(e: qj_engine::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// One of our images.
pub struct EngineDisk {
    image: Image,
    /// The name of the enabled bitmap the image carries, if any.
    bitmap: Option<&'static str>,
}

impl EngineDisk {
    /// Creates a fresh image of `virtual_size` bytes at `path` for `kind`.
    pub fn create(
        kind: TargetKind,
        path: &Path,
        virtual_size: u64,
        cluster_size: u64,
        cache: CacheMode,
    ) -> io::Result<Self> {
        let journal = |two_flush| {
            Some(JournalConfig {
                size_bytes: JOURNAL_BYTES,
                two_flush,
                log_data: false,
                dedup: TargetKind::DEDUP.contains(&kind),
            })
        };
        let journal = match kind {
            TargetKind::Ordered | TargetKind::OrderedBitmap => None,
            TargetKind::Journal
            | TargetKind::JournalBitmap
            | TargetKind::JournalDedup
            | TargetKind::JournalDedupTrust => journal(false),
            TargetKind::JournalDraft | TargetKind::JournalLogged => {
                journal(kind == TargetKind::JournalDraft)
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("target {other} is not an engine target"),
                ))
            }
        };
        let opts = CreateOptions {
            virtual_size,
            cluster_size,
            journal,
            ..CreateOptions::default()
        };
        Image::create_path(path, &opts).map_err(io_err)?;
        let opts = OpenOptions {
            log_fresh_data: kind == TargetKind::JournalLogged,
            dedup_trust_hash: kind == TargetKind::JournalDedupTrust,
            cache,
            // As `qj serve` opens images: the serve-overhead comparison
            // runs the same engine on both sides.
            background_checkpoint: true,
            ..OpenOptions::read_write()
        };
        let image = Image::open_path(path, &opts).map_err(io_err)?;
        let bitmap = matches!(kind, TargetKind::JournalBitmap | TargetKind::OrderedBitmap)
            .then_some("bench");
        if let Some(name) = bitmap {
            // QEMU's default granularity: the cluster size.
            image
                .bitmap_add(name, cluster_size, false)
                .map_err(io_err)?;
            image.flush().map_err(io_err)?;
        }
        Ok(Self { image, bitmap })
    }

    /// Closes the image cleanly.
    pub fn close(self) -> io::Result<()> {
        self.image.close().map_err(io_err)
    }
}

impl BenchDisk for EngineDisk {
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image.write(buf, offset).map_err(io_err)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read(buf, offset).map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.image.flush().map_err(io_err)
    }
    fn device_counts(&self) -> (u64, u64) {
        let s = self.image.stats();
        (s.flushes, s.bytes_written())
    }
    fn before_measure(&self) -> io::Result<()> {
        if let Some(name) = self.bitmap {
            self.image.bitmap_clear(name).map_err(io_err)?;
            self.image.flush().map_err(io_err)?;
        }
        Ok(())
    }
    fn dedup_counts(&self) -> Option<DedupCounts> {
        let cost = self.image.dedup_cost()?;
        let stats = self.image.dedup_stats()?;
        Some(DedupCounts {
            hashed: cost.hashed,
            hash_ns: cost.hash_ns,
            compared: cost.compared,
            compare_ns: cost.compare_ns,
            hits: stats.hits,
        })
    }
}

/// A raw file: guest offset = file offset, flush = fdatasync; with
/// O_DIRECT for the cache modes that bypass the host page cache.
pub struct RawDisk {
    file: Box<dyn Storage>,
    writethrough: bool,
    flushes: AtomicU64,
    bytes: AtomicU64,
}

impl RawDisk {
    /// Creates an empty (sparse) raw file of `virtual_size` bytes.
    pub fn create(path: &Path, virtual_size: u64, cache: CacheMode) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(virtual_size)?;
        let file: Box<dyn Storage> = if cache.direct() {
            drop(file);
            Box::new(DirectFileStorage::open(path, true)?)
        } else {
            Box::new(FileStorage::from_file(file, true)?)
        };
        Ok(Self {
            file,
            writethrough: cache.writethrough(),
            flushes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }
}

impl BenchDisk for RawDisk {
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)?;
        self.bytes.fetch_add(buf.len() as u64, Relaxed);
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Relaxed);
        self.file.flush()
    }
    fn device_counts(&self) -> (u64, u64) {
        (self.flushes.load(Relaxed), self.bytes.load(Relaxed))
    }
}
