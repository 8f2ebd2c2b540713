//! Deduplication against no deduplication: 64 KiB whole-cluster writes
//! into fresh guest clusters of a real file, where 0%, 50% or 90% of the
//! clusters repeat content written before (drawn from a small pool).
//!
//! Compared, interleaved round by round so machine drift hits all alike:
//! - `ordered`: flush ordering (QEMU's way);
//! - `journal`: the journal without dedup;
//! - `journal-dedup`: the journal with dedup, comparing bytes on a hit;
//! - `journal-dedup-trust`: the same trusting the SHA-256 (no compare).
//!
//! Two flavours: `batch` (one flush at the end) and `sync` (a flush after
//! every write). Prints, as medians of the rounds: ops/s of the writes and
//! flushes, guest data bytes written per op, the file size at the end
//! against the guest data written, and for dedup the hash and compare cost
//! per cluster.
//!
//! Run: `cargo run --release -p qj-benches --example dedup [DIR]`

use std::path::Path;
use std::time::Instant;

use qj_engine::{CreateOptions, Image, JournalConfig, OpenOptions};

const CLUSTER_BYTES: usize = 64 << 10;
const BATCH_WRITES: u64 = 1024;
const SYNC_WRITES: u64 = 256;
const ROUNDS: usize = 3;
/// Distinct contents the duplicates are drawn from.
const POOL: u64 = 16;

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    journal: bool,
    dedup: bool,
    trust_hash: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "ordered",
        journal: false,
        dedup: false,
        trust_hash: false,
    },
    Mode {
        name: "journal",
        journal: true,
        dedup: false,
        trust_hash: false,
    },
    Mode {
        name: "journal-dedup",
        journal: true,
        dedup: true,
        trust_hash: false,
    },
    Mode {
        name: "journal-dedup-trust",
        journal: true,
        dedup: true,
        trust_hash: true,
    },
];

/// The content of write `i` with `dup_percent` duplicates: a repeat of one
/// of `POOL` contents, or a unique one. Deterministic in `i`.
fn content(i: u64, dup_percent: u64, buf: &mut [u8]) {
    let roll = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57; // 0..127
    let id = if roll * 100 < dup_percent * 128 {
        i % POOL
    } else {
        POOL + i
    };
    let mut x = id.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

struct Sample {
    ops_per_s: f64,
    data_bytes_per_op: f64,
    file_over_data: f64,
    hash_ns: f64,
    compare_ns: f64,
}

fn run(dir: &Path, mode: Mode, dup_percent: u64, sync: bool) -> Sample {
    let path = dir.join(format!("dedup-{}.qcow2", mode.name));
    let writes = if sync { SYNC_WRITES } else { BATCH_WRITES };
    let opts = CreateOptions {
        virtual_size: writes * CLUSTER_BYTES as u64,
        cluster_size: CLUSTER_BYTES as u64,
        journal: mode.journal.then(|| JournalConfig {
            dedup: mode.dedup,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    };
    Image::create_path(&path, &opts).expect("create");
    let open = OpenOptions {
        dedup_trust_hash: mode.trust_hash,
        ..OpenOptions::read_write()
    };
    let image = Image::open_path(&path, &open).expect("open");
    let len_before = std::fs::metadata(&path).expect("stat").len();
    let mut buf = vec![0u8; CLUSTER_BYTES];
    let stats_before = image.stats();
    let started = Instant::now();
    for i in 0..writes {
        content(i, dup_percent, &mut buf);
        image.write(&buf, i * CLUSTER_BYTES as u64).expect("write");
        if sync {
            image.flush().expect("flush");
        }
    }
    image.flush().expect("flush");
    let elapsed = started.elapsed().as_secs_f64();
    let stats = image.stats();
    let cost = image.dedup_cost().unwrap_or_default();
    image.close().expect("close");
    let len_after = std::fs::metadata(&path).expect("stat").len();
    std::fs::remove_file(&path).expect("remove");
    let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    Sample {
        ops_per_s: writes as f64 / elapsed,
        data_bytes_per_op: per(stats.data_bytes - stats_before.data_bytes, writes),
        file_over_data: (len_after - len_before) as f64 / (writes * CLUSTER_BYTES as u64) as f64,
        hash_ns: per(cost.hash_ns, cost.hashed),
        compare_ns: per(cost.compare_ns, cost.compared),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, Into::into);
    println!(
        "{:<8} {:>4} {:<20} {:>9} {:>12} {:>10} {:>9} {:>10}",
        "flavour", "dup%", "target", "ops/s", "data B/op", "file/data", "hash ns", "cmp ns"
    );
    for sync in [false, true] {
        for dup_percent in [0, 50, 90] {
            let mut samples: Vec<Vec<Sample>> = MODES.iter().map(|_| Vec::new()).collect();
            for _ in 0..ROUNDS {
                for (m, mode) in MODES.iter().enumerate() {
                    samples[m].push(run(&dir, *mode, dup_percent, sync));
                }
            }
            for (m, mode) in MODES.iter().enumerate() {
                let s = &samples[m];
                let pick = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
                println!(
                    "{:<8} {:>4} {:<20} {:>9.0} {:>12.0} {:>10.2} {:>9.0} {:>10.0}",
                    if sync { "sync" } else { "batch" },
                    dup_percent,
                    mode.name,
                    pick(|s| s.ops_per_s),
                    pick(|s| s.data_bytes_per_op),
                    pick(|s| s.file_over_data),
                    pick(|s| s.hash_ns),
                    pick(|s| s.compare_ns),
                );
            }
        }
    }
}
