//! What the criterion benchmarks share: the three engine targets, images on
//! real files in a temporary directory, access orders, and a tally of the
//! device work each benchmark caused.
//!
//! Every bench file compiles this module on its own and uses only part of
//! it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use criterion::Criterion;
use qj_engine::{CreateOptions, Image, JournalConfig, OpenOptions, Stats};

/// Cluster size of every image: the qcow2 default, as in `qj bench`.
pub const CLUSTER_BYTES: u64 = 64 << 10;
/// Size of one guest I/O: one 4 KiB block at the start of a cluster, as in
/// `qj bench`, so that each allocating write allocates exactly one cluster.
pub const IO_BYTES: usize = 4096;
/// Journal size of the journalled targets (the engine's default).
pub const JOURNAL_BYTES: u64 = qj_benches::target::JOURNAL_BYTES;
/// Seed of every random order: runs are reproducible.
pub const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The engine targets every benchmark compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Journalled backend, single-flush commit.
    Journal,
    /// Journalled backend, the draft's two-flush commit.
    JournalDraft,
    /// Flush-ordering backend.
    Ordered,
}

impl Backend {
    /// Every backend, in report order.
    pub const ALL: [Backend; 3] = [Backend::Journal, Backend::JournalDraft, Backend::Ordered];
    /// The two commit protocols of the journalled backend.
    pub const JOURNALLED: [Backend; 2] = [Backend::Journal, Backend::JournalDraft];

    /// The name in benchmark ids (the same as `qj bench --target`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Journal => "journal",
            Backend::JournalDraft => "journal-draft",
            Backend::Ordered => "ordered",
        }
    }

    /// Creation options for an image of `virtual_size_bytes` on this backend.
    pub fn create_options(self, virtual_size_bytes: u64) -> CreateOptions {
        let journal = |two_flush| {
            Some(JournalConfig {
                size_bytes: JOURNAL_BYTES,
                two_flush,
                log_data: false,
                dedup: false,
            })
        };
        CreateOptions {
            virtual_size: virtual_size_bytes,
            cluster_size: CLUSTER_BYTES,
            journal: match self {
                Backend::Journal => journal(false),
                Backend::JournalDraft => journal(true),
                Backend::Ordered => None,
            },
            ..CreateOptions::default()
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A temporary directory on the real disk (not tmpfs: flush costs are the
/// point), removed with everything in it when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
    next_file: AtomicU64,
}

impl Scratch {
    /// A fresh directory under the system temporary directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("qj-criterion-")
                .tempdir()
                .expect("creating the scratch directory"),
            next_file: AtomicU64::new(0),
        }
    }

    /// A path no other call returned.
    pub fn fresh_path(&self, label: &str) -> PathBuf {
        let n = self.next_file.fetch_add(1, Relaxed);
        self.dir.path().join(format!("{label}-{n}.qcow2"))
    }

    /// Creates an image of `clusters` clusters for `backend` and opens it
    /// read-write.
    pub fn create(&self, backend: Backend, clusters: u64) -> (PathBuf, Image) {
        assert!(clusters > 0, "an image needs at least one cluster");
        let path = self.fresh_path(backend.name());
        let virtual_size_bytes = clusters
            .checked_mul(CLUSTER_BYTES)
            .expect("virtual size fits u64");
        Image::create_path(&path, &backend.create_options(virtual_size_bytes))
            .expect("creating the image");
        let image = Image::open_path(&path, &OpenOptions::read_write()).expect("opening the image");
        (path, image)
    }

    /// An image whose first `clusters` clusters hold one written block
    /// each, closed cleanly and opened again: metadata in place, journal
    /// checkpointed and empty, nothing guarded. The state a guest finds
    /// data written long ago in.
    pub fn prefilled(&self, backend: Backend, clusters: u64) -> (PathBuf, Image) {
        let (path, image) = self.create(backend, clusters);
        let block = pattern_block(1);
        for c in 0..clusters {
            image
                .write(&block, c * CLUSTER_BYTES)
                .expect("prefilling a cluster");
        }
        image.close().expect("closing the prefilled image");
        let image = Image::open_path(&path, &OpenOptions::read_write()).expect("reopening");
        (path, image)
    }
}

/// Drops an image without writing anything back and deletes its file, so
/// that dirty pages of a finished sample are dropped instead of being
/// written back during the next one.
pub fn discard_image(path: &Path, image: Image) {
    image.abandon();
    std::fs::remove_file(path).expect("removing a finished image");
}

/// Makes a file's page-cache contents durable, so that a timed flush later
/// does not also pay for writing back an untimed copy or setup.
pub fn sync_file(path: &Path) {
    File::open(path)
        .and_then(|f| f.sync_all())
        .expect("syncing a prepared file");
}

/// A block of guest data whose bytes depend on `seed`.
pub fn pattern_block(seed: u8) -> Vec<u8> {
    (0..IO_BYTES)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

/// Guest cluster indices `0..count` in sequential or in a reproducible
/// random order (a Fisher-Yates shuffle driven by xorshift64*).
pub fn cluster_order(count: u64, random: bool) -> Vec<u64> {
    let mut order: Vec<u64> = (0..count).collect();
    if random {
        let mut state = SEED;
        let mut next = || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for i in (1..order.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// The name of an access order in benchmark ids.
pub fn order_name(random: bool) -> &'static str {
    if random {
        "rand"
    } else {
        "seq"
    }
}

/// Criterion settings for a 2-core machine shared with others: 10
/// samples, a short warm-up and measurement.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

/// The device work one benchmark caused over all its samples (warm-up
/// included), printed once per benchmark so that the numbers can be read
/// as flushes and bytes per operation.
#[derive(Debug, Default)]
pub struct Tally {
    ops: u64,
    flushes: u64,
    journal_bytes: u64,
    metadata_bytes: u64,
    data_bytes: u64,
}

impl Tally {
    /// Adds `ops` guest operations that caused the device work `delta`.
    pub fn add(&mut self, ops: u64, delta: &Stats) {
        self.ops += ops;
        self.flushes += delta.flushes;
        self.journal_bytes += delta.journal_bytes;
        self.metadata_bytes += delta.metadata_bytes;
        self.data_bytes += delta.data_bytes;
    }

    /// Prints the averages per operation to stderr, under `id`.
    pub fn print(&self, id: &str) {
        // A benchmark filtered out on the command line never ran.
        if self.ops == 0 {
            return;
        }
        let per_op = |v: u64| v as f64 / self.ops as f64;
        eprintln!(
            "device work {id}: {} ops, {} flushes; per op: {:.3} flushes, {:.0} B journal, \
             {:.0} B metadata in place, {:.0} B data",
            self.ops,
            self.flushes,
            per_op(self.flushes),
            per_op(self.journal_bytes),
            per_op(self.metadata_bytes),
            per_op(self.data_bytes),
        );
    }
}
