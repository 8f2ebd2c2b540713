//! Options for creating and opening images.

use std::path::PathBuf;
use std::sync::Arc;

use qj_journal::Storage;

use crate::lock::LockMode;
use crate::mutation::{JournalMutation, OrderingMutation};

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A qcow2 image (opened read-only).
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl BackingFormat {
    /// The name written in the backing-format header extension.
    pub fn name(&self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }

    /// Parses a format name (`qcow2` or `raw`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "qcow2" => Some(BackingFormat::Qcow2),
            "raw" => Some(BackingFormat::Raw),
            _ => None,
        }
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual disk size in bytes (rounded up to 512).
    pub virtual_size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Backing file name, stored in the header as given.
    pub backing_file: Option<String>,
    /// Format of the backing file.
    pub backing_format: Option<BackingFormat>,
    /// A metadata journal (the journalled backend), or none (flush ordering).
    pub journal: Option<JournalConfig>,
}

/// The journal an image is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// Size of the journal in bytes (rounded up to whole clusters).
    pub size_bytes: u64,
    /// Commit with the draft's two-flush protocol instead of single-flush.
    pub two_flush: bool,
    /// Carry small writes into fresh clusters in the transaction (logged
    /// data): recorded in the journal extension, so every read-write open
    /// of the image does it (`OpenOptions::log_fresh_data` turns it on for
    /// one open of any journalled image).
    pub log_data: bool,
    /// Deduplicate whole-cluster writes (`engine/src/dedup/`): recorded in
    /// the journal extension (flag bit 2). Only a journalled image can
    /// have it: nothing else keeps the index and L2 together.
    pub dedup: bool,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            size_bytes: 16 << 20,
            two_flush: false,
            log_data: false,
            dedup: false,
        }
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            virtual_size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            journal: None,
        }
    }
}

/// Where an image's backing file comes from.
#[derive(Debug, Clone, Default)]
pub enum BackingSource {
    /// Resolve the name in the header relative to `base_dir` (or the
    /// current directory) and open it read-only.
    #[default]
    FromHeader,
    /// Use this device, with this format, whatever the header names.
    Given(Arc<dyn Storage>, BackingFormat),
    /// Ignore the backing file: unallocated clusters read as zeros. For
    /// tools that inspect metadata only.
    Ignore,
}

/// How guest writes reach the disk, as QEMU names its cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the host page cache; durable at the next flush.
    #[default]
    Writeback,
    /// Through the host page cache; every write, write zeroes, discard and
    /// resize is durable before it returns.
    Writethrough,
    /// `O_DIRECT` (bypassing the host page cache); durable at the next
    /// flush. What production guests run with.
    None,
    /// `O_DIRECT`, and every write durable before it returns.
    Directsync,
}

impl CacheMode {
    /// Parses QEMU's name of a mode.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "writeback" => Some(Self::Writeback),
            "writethrough" => Some(Self::Writethrough),
            "none" => Some(Self::None),
            "directsync" => Some(Self::Directsync),
            _ => None,
        }
    }

    /// QEMU's name of the mode (what [`Self::parse`] takes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::Writethrough => "writethrough",
            Self::None => "none",
            Self::Directsync => "directsync",
        }
    }

    /// Whether the image file is opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, Self::None | Self::Directsync)
    }

    /// Whether every guest write is durable before it returns.
    pub fn writethrough(self) -> bool {
        matches!(self, Self::Writethrough | Self::Directsync)
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Memory bound for each metadata cache (L2 tables, refcount blocks).
    pub cache_bytes_max: u64,
    /// Where the backing file comes from.
    pub backing: BackingSource,
    /// Directory that relative backing file names are resolved against.
    pub base_dir: Option<PathBuf>,
    /// A deliberate ordering bug, for the crash harness only.
    pub ordering_mutation: OrderingMutation,
    /// A deliberate bug in the journalled backend, for the crash harness only.
    pub journal_mutation: JournalMutation,
    /// On a journalled image, let a partial write into a cluster shared
    /// with a snapshot journal a copy of the untouched bytes instead of
    /// copying them before it returns (delayed copy-on-write). No effect
    /// with flush ordering, which always copies first.
    pub delayed_cow: bool,
    /// On a journalled image, let a write into a fresh cluster past the end
    /// of the file travel in the journal transaction instead of being
    /// written in place first (logged data, `backend/logged_data.rs`): a
    /// synced allocating write then flushes overwrites of the journal ring
    /// only, and the file grows at checkpoint. Off by default: the data is
    /// written twice. No effect with flush ordering. An image whose journal
    /// was created with `JournalConfig::log_data` logs whatever this says.
    pub log_fresh_data: bool,
    /// How [`Image::open_path`](crate::Image::open_path) locks the file and
    /// its backing files (`lock.rs`): as QEMU does, or not at all for a
    /// read-only look at an image in use (`-U`).
    pub lock: LockMode,
    /// Record every write, flush and length change reaching the image file
    /// in a dm-log-writes log at this path (`log_writes.rs`; created or
    /// truncated). Used by `Image::open_path`; for `Image::open`, wrap the
    /// storage in a `LogWritesStorage` yourself.
    pub log_writes: Option<PathBuf>,
    /// The cache mode (`Image::open_path` opens the file with `O_DIRECT`
    /// for `none` and `directsync`; writethrough modes make every guest
    /// write durable before it returns).
    pub cache: CacheMode,
    /// On an image with dedup: map a whole-cluster write to an indexed
    /// cluster whose SHA-256 matches without comparing the bytes (saves a
    /// cluster read per hit; a collision would then map the wrong data).
    pub dedup_trust_hash: bool,
    /// On an image with dedup: memory the index may hold; clusters written
    /// once it is full are not indexed.
    pub dedup_memory_bytes_max: u64,
    /// On a journalled image opened for writing, make checkpoints on a
    /// thread of the image's own instead of in the flush whose commit
    /// found the ring past its threshold (`backend/checkpointer.rs`): no
    /// guest flush then waits for in-place writes. Off by default: the
    /// crash harness and the models want every write issued by the threads
    /// they drive. `qj serve` and `qj bench` turn it on.
    pub background_checkpoint: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            writable: true,
            cache_bytes_max: 32 << 20,
            backing: BackingSource::FromHeader,
            base_dir: None,
            ordering_mutation: OrderingMutation::None,
            journal_mutation: JournalMutation::None,
            delayed_cow: true,
            log_fresh_data: false,
            lock: LockMode::Qemu,
            log_writes: None,
            cache: CacheMode::Writeback,
            dedup_trust_hash: false,
            dedup_memory_bytes_max: 64 << 20,
            background_checkpoint: false,
        }
    }
}

impl OpenOptions {
    /// Read-write with defaults.
    pub fn read_write() -> Self {
        Self::default()
    }

    /// Read-only with defaults.
    pub fn read_only() -> Self {
        Self {
            writable: false,
            ..Self::default()
        }
    }
}
