//! Delayed copy-on-write against copying first: 4 KiB writes, one into
//! each 64 KiB cluster of a disk whose every cluster is shared with an
//! internal snapshot (made by `qemu-img snapshot -c`), on a real file.
//!
//! Compared, interleaved round by round so machine drift hits all alike:
//! - `ordered`: flush ordering, which copies the cluster before the write;
//! - `journal-eager`: the journal with delayed copy-on-write switched off
//!   (`OpenOptions::delayed_cow = false`): copies first, like `ordered`;
//! - `journal`: the journal carrying the copy as a copy descriptor;
//! - `journal-draft`: the same with the draft's two-flush commit.
//!
//! Two flavours: `batch` (one flush at the end) and `sync` (a flush after
//! every write). Prints, as medians of the rounds: ops/s of the writes and
//! flushes (what the guest waits for), ops/s counting the clean close too
//! (the journal's checkpoint makes the delayed copies there), guest data
//! bytes written per op, and device flushes per op.
//!
//! Run: `cargo run --release -p qj-benches --example delayed_cow [DIR]`
//! (needs qemu-img).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use qj_engine::{CreateOptions, Image, JournalConfig, OpenOptions};

const CLUSTER_BYTES: u64 = 64 << 10;
const CLUSTERS: u64 = 512;
const WRITE_BYTES: usize = 4096;
const SYNC_WRITES: u64 = 256;
const ROUNDS: usize = 3;

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    journal: Option<bool>,
    delayed_cow: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "ordered",
        journal: None,
        delayed_cow: false,
    },
    Mode {
        name: "journal-eager",
        journal: Some(false),
        delayed_cow: false,
    },
    Mode {
        name: "journal",
        journal: Some(false),
        delayed_cow: true,
    },
    Mode {
        name: "journal-draft",
        journal: Some(true),
        delayed_cow: true,
    },
];

/// Builds the shared image for `mode` at `path`: every cluster written,
/// then snapshotted by QEMU.
fn prepare(mode: Mode, path: &Path) {
    let opts = CreateOptions {
        virtual_size: CLUSTERS * CLUSTER_BYTES,
        cluster_size: CLUSTER_BYTES,
        journal: mode.journal.map(|two_flush| JournalConfig {
            size_bytes: 16 << 20,
            two_flush,
            log_data: false,
            dedup: false,
        }),
        ..CreateOptions::default()
    };
    Image::create_path(path, &opts).expect("create");
    let image = Image::open_path(path, &OpenOptions::read_write()).expect("open");
    let fill = vec![0x5au8; (CLUSTERS * CLUSTER_BYTES) as usize];
    image.write(&fill, 0).expect("fill");
    image.close().expect("close");
    let status = Command::new("qemu-img")
        .args(["snapshot", "-c", "base"])
        .arg(path)
        .status()
        .expect("this benchmark needs qemu-img");
    assert!(status.success(), "qemu-img snapshot -c failed");
}

/// Runs one flavour; returns (ops/s, ops/s with close, data bytes/op,
/// flushes/op).
fn run(mode: Mode, path: &Path, synced: bool) -> (f64, f64, f64, f64) {
    prepare(mode, path);
    let opts = OpenOptions {
        delayed_cow: mode.delayed_cow,
        ..OpenOptions::read_write()
    };
    let image = Image::open_path(path, &opts).expect("open");
    let ops = if synced { SYNC_WRITES } else { CLUSTERS };
    let buf = vec![0xa5u8; WRITE_BYTES];
    let before = image.stats();
    let start = Instant::now();
    for i in 0..ops {
        // A different 4 KiB slot of each cluster, never the first, so
        // both sides of the write need copying.
        let slot = 1 + (i * 7) % (CLUSTER_BYTES / WRITE_BYTES as u64 - 2);
        image
            .write(&buf, i * CLUSTER_BYTES + slot * WRITE_BYTES as u64)
            .expect("write");
        if synced {
            image.flush().expect("flush");
        }
    }
    image.flush().expect("flush");
    let io_seconds = start.elapsed().as_secs_f64();
    let stats = image.stats().since(&before);
    image.close().expect("close");
    let seconds = start.elapsed().as_secs_f64();
    let n = ops as f64;
    (
        n / io_seconds,
        n / seconds,
        stats.data_bytes as f64 / n,
        stats.flushes as f64 / n,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir_arg = std::env::args().nth(1);
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = dir_arg.as_deref().map_or(temp.path(), Path::new);
    println!(
        "{:<8} {:<14} {:>10} {:>12} {:>10} {:>7}",
        "flavour", "mode", "ops/s", "+close op/s", "data B/op", "fl/op"
    );
    for synced in [false, true] {
        let mut results: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); MODES.len()];
        for _ in 0..ROUNDS {
            for (m, mode) in MODES.iter().enumerate() {
                let path = dir.join(format!("cow-{}.qcow2", mode.name));
                results[m].push(run(*mode, &path, synced));
                std::fs::remove_file(&path).expect("remove image");
            }
        }
        for (mode, runs) in MODES.iter().zip(results) {
            let ops = median(runs.iter().map(|r| r.0).collect());
            let with_close = median(runs.iter().map(|r| r.1).collect());
            println!(
                "{:<8} {:<14} {:>10.0} {:>12.0} {:>10.0} {:>7.2}",
                if synced { "sync" } else { "batch" },
                mode.name,
                ops,
                with_close,
                runs[0].2,
                runs[0].3
            );
        }
    }
}
