//! Check time against image size: the engine's `check` (the semantics of
//! `qemu-img check`, read-only) on images with 1k, 4k and 16k allocated
//! clusters, on both backends (a journalled image also has its journal
//! region counted).
//!
//! Each image holds one 4 KiB block at the start of every allocated
//! cluster and is closed cleanly, so it checks clean (asserted: a check
//! that finds problems would time the wrong path). The check reads
//! metadata only (header, L1, L2 tables, refcount table and blocks), which
//! the page cache holds after the first sample: this measures the
//! checker's work, not the disk.
//!
//! Ids: `check/<backend>/<clusters>`; throughput is in allocated clusters.
//!
//! Run: `cargo bench -p qj-benches --bench check`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{config, Backend, Scratch};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qj_engine::check::{check, RepairMode};
use qj_engine::FileStorage;

/// Allocated data clusters of the checked images.
const CLUSTER_COUNTS: [u64; 3] = [1 << 10, 4 << 10, 16 << 10];

/// Times `iters` read-only checks of the image at `path`, which holds
/// `clusters` data clusters.
fn check_sample(path: &Path, clusters: u64, iters: u64) -> Duration {
    let storage = FileStorage::open(path, false).expect("opening the image read-only");
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let started = Instant::now();
        let report = check(&storage, RepairMode::None, &[]).expect("checking");
        total += started.elapsed();
        assert_eq!(
            (report.corruptions, report.leaks, report.check_errors),
            (0, 0, 0),
            "the image checks clean: {:?}",
            report.messages
        );
        // Guest-visible clusters, as `qemu-img check` counts them.
        assert_eq!(report.allocated_clusters, clusters, "allocated clusters");
    }
    total
}

fn check_time(c: &mut Criterion) {
    let scratch = Scratch::new();
    let mut group = c.benchmark_group("check");
    for backend in [Backend::Journal, Backend::Ordered] {
        for clusters in CLUSTER_COUNTS {
            let (path, image) = scratch.prefilled(backend, clusters);
            image.close().expect("closing the image");
            group.throughput(Throughput::Elements(clusters));
            group.bench_function(BenchmarkId::new(backend.name(), clusters), |b| {
                b.iter_custom(|iters| check_sample(&path, clusters, iters))
            });
            std::fs::remove_file(&path).expect("removing the image");
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = check_time
}
criterion_main!(benches);
