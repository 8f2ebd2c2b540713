//! Journal replay time against journal fill: how long `Image::open` takes
//! on an image whose journal holds committed but unsynced transactions (a
//! crash between commits and the next checkpoint), for both commit
//! protocols.
//!
//! Each image is prepared once (untimed): synced allocating 4 KiB writes,
//! one transaction each, until the ring is filled to the target, then the
//! image is abandoned as a killed process would leave it. Every timed open
//! gets its own copy, made durable before the timer starts (replay flushes,
//! and must not pay for writing back the copy), and the open is checked to
//! have replayed every transaction.
//!
//! The engine checkpoints as soon as a commit leaves the ring 50% full (the
//! journal's default threshold; `CreateOptions` does not expose it), so at
//! most half the ring can ever wait for replay. The fills are 25%, 50% and
//! 100% of that maximum: 12%, 25% and 49% of the ring. `fill-0pct` is a
//! clean image with an empty journal: the cost of open without replay.
//!
//! Ids: `replay/<backend>/fill-<ring percent>pct`; throughput is in
//! replayed transactions.
//!
//! Run: `cargo bench -p qj-benches --bench replay`.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{config, pattern_block, sync_file, Backend, Scratch, CLUSTER_BYTES};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qj_engine::{Image, JournalInfo, OpenOptions};

/// Ring fill (percent) the engine checkpoints at: the most that can wait.
const CHECKPOINT_THRESHOLD_PERCENT: u64 = 50;
/// Ring fills to replay, in percent: 0 (clean) and 25%, 50% and 100% of
/// the threshold, the last kept one point under it so no checkpoint runs.
const FILL_PERCENTS: [u64; 4] = [0, 12, 25, 49];
/// Guest clusters of the prepared images: far more than one transaction
/// per allocating write could need before the ring reaches the threshold.
const IMAGE_CLUSTERS: u64 = 1 << 16;
/// Bound on the commits a fill may take (a ring of 16 MiB at one 4 KiB
/// block per transaction takes about 2000 to reach 49%).
const FILL_COMMITS_MAX: u64 = IMAGE_CLUSTERS;

/// A dirty image to replay, and what its journal held.
struct Prepared {
    path: PathBuf,
    fill_percent: u64,
    transactions: u64,
}

fn journal_info(image: &Image) -> JournalInfo {
    image
        .info()
        .expect("image info")
        .journal
        .expect("a journalled image reports its journal")
}

/// An image of `backend` whose journal is `fill_percent` full of committed,
/// unsynced transactions, abandoned without a checkpoint.
fn prepare(scratch: &Scratch, backend: Backend, fill_percent: u64) -> Prepared {
    assert!(fill_percent < CHECKPOINT_THRESHOLD_PERCENT);
    let (path, image) = scratch.create(backend, IMAGE_CLUSTERS);
    if fill_percent == 0 {
        image.close().expect("closing the clean image");
        sync_file(&path);
        return Prepared {
            path,
            fill_percent,
            transactions: 0,
        };
    }
    let synced_seq_start = journal_info(&image).synced_seq;
    let block = pattern_block(6);
    let mut info = journal_info(&image);
    for cluster in 0..FILL_COMMITS_MAX {
        if info.used_percent >= fill_percent {
            break;
        }
        image
            .write(&block, cluster * CLUSTER_BYTES)
            .expect("allocating write");
        image.flush().expect("committing the write");
        info = journal_info(&image);
        assert_eq!(
            info.synced_seq, synced_seq_start,
            "a checkpoint ran at {}% fill, before the {fill_percent}% target",
            info.used_percent
        );
    }
    assert!(
        info.used_percent >= fill_percent,
        "{FILL_COMMITS_MAX} commits filled only {}%",
        info.used_percent
    );
    assert!(info.unsynced, "the transactions wait for replay");
    let transactions = info.committed_seq - info.synced_seq;
    image.abandon();
    sync_file(&path);
    Prepared {
        path,
        fill_percent,
        transactions,
    }
}

/// Copies `from` to `to`, leaving zero clusters as holes: the prepared
/// images are sparse, and a dense copy of every hole would dominate the
/// untimed setup.
fn sparse_copy(from: &Path, to: &Path) {
    let mut src = File::open(from).expect("opening the prepared image");
    let dst = File::create(to).expect("creating the copy");
    let len = src.metadata().expect("prepared image length").len();
    let mut chunk = vec![0u8; CLUSTER_BYTES as usize];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CLUSTER_BYTES) as usize;
        src.read_exact(&mut chunk[..n])
            .expect("reading the prepared image");
        if chunk[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&chunk[..n], offset)
                .expect("writing the copy");
        }
        offset += n as u64;
    }
    dst.set_len(len).expect("sizing the copy");
}

/// Times `iters` read-write opens, each of a fresh durable copy of
/// `prepared`.
fn replay_sample(scratch: &Scratch, prepared: &Prepared, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let copy = scratch.fresh_path("replay");
        sparse_copy(&prepared.path, &copy);
        sync_file(&copy);
        let started = Instant::now();
        let image = Image::open_path(&copy, &OpenOptions::read_write()).expect("replaying");
        total += started.elapsed();
        let info = journal_info(&image);
        assert_eq!(
            info.replayed_transactions, prepared.transactions,
            "the open replayed every committed transaction"
        );
        image.abandon();
        std::fs::remove_file(&copy).expect("removing the copy");
    }
    total
}

fn replay(c: &mut Criterion) {
    let scratch = Scratch::new();
    for backend in Backend::JOURNALLED {
        let prepared: Vec<Prepared> = FILL_PERCENTS
            .iter()
            .map(|&fill| prepare(&scratch, backend, fill))
            .collect();
        // A group per backend: the clean open comes first, before any
        // throughput is set (it replays nothing).
        let mut group = c.benchmark_group("replay");
        for p in &prepared {
            if p.transactions > 0 {
                group.throughput(Throughput::Elements(p.transactions));
            }
            eprintln!(
                "replay/{backend}/fill-{}pct: {} transactions to replay",
                p.fill_percent, p.transactions
            );
            let id = BenchmarkId::new(backend.name(), format!("fill-{}pct", p.fill_percent));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| replay_sample(&scratch, p, iters))
            });
        }
        group.finish();
        for p in prepared {
            std::fs::remove_file(&p.path).expect("removing a prepared image");
        }
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = replay
}
criterion_main!(benches);
