//! Synced allocating writes: each 4 KiB write goes to a new cluster and is
//! followed by a flush, as a guest with a write-through cache (or one that
//! fsyncs every write) issues them. This is where the backends differ most:
//! the single-flush journal should cost about one device flush per write,
//! the draft's two-flush commit two, and flush ordering more (refcount
//! update, flush, L2 update, flush).
//!
//! - `alloc_sync/<backend>`: one thread; `alloc_sync/raw` is a raw file
//!   (write + fdatasync), the physical limit on this disk.
//! - `threads_sync/<threads>/<backend>`: 1 and 4 threads, each writing its
//!   own new clusters and flushing after every write; the time is the wall
//!   time of one round (every thread one write + flush), the throughput
//!   counts every thread's write. Concurrent flushes share persists (group
//!   commit), so the flushes per write should fall with more threads.
//!
//! The per-benchmark flush counts are printed to stderr.
//!
//! Run: `cargo bench -p qj-benches --bench sync_write`.

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{
    config, discard_image, pattern_block, Backend, Scratch, Tally, CLUSTER_BYTES, IO_BYTES,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qj_benches::target::{BenchDisk, RawDisk};

/// Thread counts of `threads_sync`.
const THREAD_COUNTS: [u64; 2] = [1, 4];

/// Times `iters` synced allocating writes on a fresh image.
fn alloc_sync_sample(
    scratch: &Scratch,
    backend: Backend,
    iters: u64,
    tally: &mut Tally,
) -> Duration {
    let (path, image) = scratch.create(backend, iters.max(1));
    let block = pattern_block(4);
    let before = image.stats();
    let started = Instant::now();
    for cluster in 0..iters {
        image
            .write(&block, cluster * CLUSTER_BYTES)
            .expect("allocating write");
        image.flush().expect("flushing the write");
    }
    let elapsed = started.elapsed();
    tally.add(iters, &image.stats().since(&before));
    discard_image(&path, image);
    elapsed
}

/// Times `iters` writes + fdatasync on a fresh raw file, one 4 KiB block
/// per cluster-sized stride as on the images (the file grows with each).
fn raw_sync_sample(scratch: &Scratch, iters: u64) -> Duration {
    let path = scratch.fresh_path("raw");
    let disk = RawDisk::create(
        &path,
        iters.max(1) * CLUSTER_BYTES,
        qj_engine::CacheMode::Writeback,
    )
    .expect("creating the raw file");
    let block = pattern_block(4);
    let started = Instant::now();
    for cluster in 0..iters {
        disk.write(&block, cluster * CLUSTER_BYTES)
            .expect("raw write");
        disk.flush().expect("raw fdatasync");
    }
    let elapsed = started.elapsed();
    drop(disk);
    std::fs::remove_file(&path).expect("removing the raw file");
    elapsed
}

/// Times `iters` rounds of `threads` threads each doing one synced
/// allocating write to a cluster of its own, started together.
fn threads_sync_sample(
    scratch: &Scratch,
    backend: Backend,
    threads: u64,
    iters: u64,
    tally: &mut Tally,
) -> Duration {
    let (path, image) = scratch.create(backend, (iters * threads).max(1));
    let start_line = Barrier::new(threads as usize + 1);
    let before = image.stats();
    let started = std::thread::scope(|scope| {
        for t in 0..threads {
            let (image, start_line) = (&image, &start_line);
            scope.spawn(move || {
                let block = pattern_block(t as u8);
                start_line.wait();
                for i in 0..iters {
                    // Interleaved, so that the threads share L2 tables
                    // and refcount blocks as concurrent guests do.
                    let cluster = i * threads + t;
                    image
                        .write(&block, cluster * CLUSTER_BYTES)
                        .expect("allocating write");
                    image.flush().expect("flushing the write");
                }
            });
        }
        start_line.wait();
        // Leaving the scope joins every writer: the time is taken after.
        Instant::now()
    });
    let elapsed = started.elapsed();
    tally.add(iters * threads, &image.stats().since(&before));
    discard_image(&path, image);
    elapsed
}

fn alloc_sync(c: &mut Criterion) {
    let scratch = Scratch::new();
    let mut group = c.benchmark_group("alloc_sync");
    group.throughput(Throughput::Bytes(IO_BYTES as u64));
    for backend in Backend::ALL {
        let mut tally = Tally::default();
        group.bench_function(backend.name(), |b| {
            b.iter_custom(|iters| alloc_sync_sample(&scratch, backend, iters, &mut tally))
        });
        tally.print(&format!("alloc_sync/{backend}"));
    }
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| raw_sync_sample(&scratch, iters))
    });
    group.finish();
}

fn threads_sync(c: &mut Criterion) {
    let scratch = Scratch::new();
    let mut group = c.benchmark_group("threads_sync");
    for threads in THREAD_COUNTS {
        group.throughput(Throughput::Elements(threads));
        for backend in Backend::ALL {
            let mut tally = Tally::default();
            group.bench_function(BenchmarkId::new(threads.to_string(), backend), |b| {
                b.iter_custom(|iters| {
                    threads_sync_sample(&scratch, backend, threads, iters, &mut tally)
                })
            });
            tally.print(&format!("threads_sync/{threads}/{backend}"));
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = alloc_sync, threads_sync
}
criterion_main!(benches);
