//! Discarding clusters and writing them again, on every backend.
//!
//! Both start from an image whose clusters hold data written long ago
//! (closed cleanly and reopened, so no journal transaction is pending):
//! - `discard_reuse/discard/<backend>`: one discard call per cluster, then
//!   one flush; times the refcount drops and L2 clears and their
//!   persistence.
//! - `discard_reuse/reuse/<backend>`: the clusters were discarded and the
//!   discard made durable (untimed); then one 4 KiB write into each
//!   discarded guest cluster, then one flush. The freed host clusters are
//!   inside the file, so each write copies a whole zeroed cluster (the
//!   stale bytes must not show) where a write past the end of the file
//!   would write only its block.
//!
//! Each benchmark prints how far the file grew during the rewrites: zero
//! growth means every freed host cluster was reused.
//!
//! Run: `cargo bench -p qj-benches --bench discard_reuse`.

mod common;

use std::time::{Duration, Instant};

use common::{config, discard_image, pattern_block, Backend, Scratch, Tally, CLUSTER_BYTES};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Times discarding `iters` written clusters one by one, plus one flush.
fn discard_sample(scratch: &Scratch, backend: Backend, iters: u64, tally: &mut Tally) -> Duration {
    let clusters = iters.max(1);
    let (path, image) = scratch.prefilled(backend, clusters);
    let before = image.stats();
    let started = Instant::now();
    for cluster in 0..iters {
        image
            .discard(cluster * CLUSTER_BYTES, CLUSTER_BYTES)
            .expect("discarding a cluster");
    }
    image.flush().expect("flushing the discards");
    let elapsed = started.elapsed();
    tally.add(iters, &image.stats().since(&before));
    discard_image(&path, image);
    elapsed
}

/// Host clusters the file grew by during the rewrites, and clusters
/// rewritten, over every sample.
#[derive(Default)]
struct Growth {
    grown_clusters: u64,
    rewritten_clusters: u64,
}

/// Times writing again `iters` clusters whose discard is durable, plus one
/// flush.
fn reuse_sample(
    scratch: &Scratch,
    backend: Backend,
    iters: u64,
    tally: &mut Tally,
    growth: &mut Growth,
) -> Duration {
    let clusters = iters.max(1);
    let (path, image) = scratch.prefilled(backend, clusters);
    image
        .discard(0, clusters * CLUSTER_BYTES)
        .expect("discarding every cluster");
    // A freed cluster is reusable only once its unreferencing is durable
    // (reused earlier, a crash could leave it referenced twice). The first
    // flush makes the cleared L2 entries durable; flush ordering applies
    // the refcount decrements only then, and they become durable, and the
    // clusters reusable, with the second. The journal needs just the first.
    image.flush().expect("flushing the discard");
    image.flush().expect("flushing the deferred frees");
    let len_before = image.storage().len().expect("image length");
    let block = pattern_block(5);
    let before = image.stats();
    let started = Instant::now();
    for cluster in 0..iters {
        image
            .write(&block, cluster * CLUSTER_BYTES)
            .expect("rewriting a discarded cluster");
    }
    image.flush().expect("flushing the rewrites");
    let elapsed = started.elapsed();
    tally.add(iters, &image.stats().since(&before));
    let len_after = image.storage().len().expect("image length");
    growth.grown_clusters += len_after.saturating_sub(len_before).div_ceil(CLUSTER_BYTES);
    growth.rewritten_clusters += iters;
    discard_image(&path, image);
    elapsed
}

fn discard_reuse(c: &mut Criterion) {
    let scratch = Scratch::new();
    let mut group = c.benchmark_group("discard_reuse");
    group.throughput(Throughput::Elements(1));
    for backend in Backend::ALL {
        let mut tally = Tally::default();
        group.bench_function(BenchmarkId::new("discard", backend), |b| {
            b.iter_custom(|iters| discard_sample(&scratch, backend, iters, &mut tally))
        });
        tally.print(&format!("discard_reuse/discard/{backend}"));
    }
    for backend in Backend::ALL {
        let mut tally = Tally::default();
        let mut growth = Growth::default();
        group.bench_function(BenchmarkId::new("reuse", backend), |b| {
            b.iter_custom(|iters| reuse_sample(&scratch, backend, iters, &mut tally, &mut growth))
        });
        tally.print(&format!("discard_reuse/reuse/{backend}"));
        if growth.rewritten_clusters > 0 {
            eprintln!(
                "file growth discard_reuse/reuse/{backend}: {} clusters for {} rewritten",
                growth.grown_clusters, growth.rewritten_clusters
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = discard_reuse
}
criterion_main!(benches);
