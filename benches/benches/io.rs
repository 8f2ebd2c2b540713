//! Guest I/O on every backend: allocating writes, overwrites and reads of
//! 4 KiB blocks at cluster starts, each in sequential and random cluster
//! order, on images in real files.
//!
//! - `alloc/{seq,rand}/<backend>`: each write lands in a cluster never
//!   written before, on a fresh image per sample; the sample ends with one
//!   flush, timed too, so the per-write time includes its share of the
//!   metadata the flush persists (criterion's slope spreads the flush's
//!   fixed cost out of the estimate; what grows with the writes stays).
//! - `overwrite/{seq,rand}/<backend>`: writes into clusters already
//!   allocated (no metadata change), cycling through 4096 clusters with a
//!   timed flush after each pass and at the end of the sample, so that
//!   every write pays for its writeback.
//! - `read/{seq,rand}/<backend>`: reads of allocated clusters. The image
//!   is small enough to sit in the page cache, so this measures the
//!   engine's lookup path, not the disk.
//!
//! Run: `cargo bench -p qj-benches --bench io`.

mod common;

use std::time::{Duration, Instant};

use common::{
    cluster_order, config, discard_image, order_name, pattern_block, Backend, Scratch, Tally,
    CLUSTER_BYTES, IO_BYTES,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qj_engine::Image;

/// Clusters the overwrite and read images hold: 256 MiB of guest space
/// with 16 MiB of data, cycled through by every sample.
const PREFILLED_CLUSTERS: u64 = 4096;

/// Times `iters` allocating writes in `random` or sequential order on a
/// fresh image, plus the flush that persists them.
fn alloc_sample(
    scratch: &Scratch,
    backend: Backend,
    random: bool,
    iters: u64,
    tally: &mut Tally,
) -> Duration {
    let (path, image) = scratch.create(backend, iters.max(1));
    let order = cluster_order(iters, random);
    let block = pattern_block(2);
    let before = image.stats();
    let started = Instant::now();
    for &cluster in &order {
        image
            .write(&block, cluster * CLUSTER_BYTES)
            .expect("allocating write");
    }
    image.flush().expect("flushing the allocations");
    let elapsed = started.elapsed();
    tally.add(iters, &image.stats().since(&before));
    discard_image(&path, image);
    elapsed
}

/// Times `iters` writes into allocated clusters, cycling through `order`,
/// with a flush after every pass over it and at the end.
///
/// Each pass writes every cluster once and the flush makes it durable, so
/// that every write finds its page clean and pays for its writeback: had
/// the writes of a long sample kept rewriting pages still dirty, they would
/// be memory copies, and the time per write would depend on the sample's
/// length (criterion picks longer samples for faster targets, which would
/// then look faster still).
fn overwrite_sample(image: &Image, order: &[u64], iters: u64, tally: &mut Tally) -> Duration {
    let block = pattern_block(3);
    let before = image.stats();
    let started = Instant::now();
    for (done, &cluster) in order.iter().cycle().take(iters as usize).enumerate() {
        if done > 0 && done % order.len() == 0 {
            image.flush().expect("flushing a pass of overwrites");
        }
        image
            .write(&block, cluster * CLUSTER_BYTES)
            .expect("overwriting a cluster");
    }
    image.flush().expect("flushing the overwrites");
    let elapsed = started.elapsed();
    tally.add(iters, &image.stats().since(&before));
    elapsed
}

/// Times `iters` reads of allocated clusters, cycling through `order`.
fn read_sample(image: &Image, order: &[u64], iters: u64) -> Duration {
    let mut buf = vec![0u8; IO_BYTES];
    let started = Instant::now();
    for &cluster in order.iter().cycle().take(iters as usize) {
        image
            .read(&mut buf, cluster * CLUSTER_BYTES)
            .expect("reading a cluster");
        std::hint::black_box(&buf);
    }
    started.elapsed()
}

fn alloc(c: &mut Criterion) {
    let scratch = Scratch::new();
    let mut group = c.benchmark_group("alloc");
    group.throughput(Throughput::Bytes(IO_BYTES as u64));
    for random in [false, true] {
        for backend in Backend::ALL {
            let mut tally = Tally::default();
            group.bench_function(BenchmarkId::new(order_name(random), backend), |b| {
                b.iter_custom(|iters| alloc_sample(&scratch, backend, random, iters, &mut tally))
            });
            tally.print(&format!("alloc/{}/{backend}", order_name(random)));
        }
    }
    group.finish();
}

fn overwrite_and_read(c: &mut Criterion) {
    let scratch = Scratch::new();
    let images: Vec<_> = Backend::ALL
        .iter()
        .map(|&backend| (backend, scratch.prefilled(backend, PREFILLED_CLUSTERS)))
        .collect();

    let mut group = c.benchmark_group("overwrite");
    group.throughput(Throughput::Bytes(IO_BYTES as u64));
    for random in [false, true] {
        let order = cluster_order(PREFILLED_CLUSTERS, random);
        for (backend, (_, image)) in &images {
            let mut tally = Tally::default();
            group.bench_function(BenchmarkId::new(order_name(random), backend), |b| {
                b.iter_custom(|iters| overwrite_sample(image, &order, iters, &mut tally))
            });
            tally.print(&format!("overwrite/{}/{backend}", order_name(random)));
        }
    }
    group.finish();

    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(IO_BYTES as u64));
    for random in [false, true] {
        let order = cluster_order(PREFILLED_CLUSTERS, random);
        for (backend, (_, image)) in &images {
            group.bench_function(BenchmarkId::new(order_name(random), backend), |b| {
                b.iter_custom(|iters| read_sample(image, &order, iters))
            });
        }
    }
    group.finish();

    for (_, (path, image)) in images {
        discard_image(&path, image);
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = alloc, overwrite_and_read
}
criterion_main!(benches);
