//! The cost of the sync shim on a contended read path: 4 threads reading
//! the same cached clusters.
//!
//! `qj_engine::sync` re-exports parking_lot's locks and std's `Arc` and
//! atomics in normal builds (loom's only under `--cfg loom`), so the shim
//! should cost nothing. Shown two ways:
//! - at compile time: the `SAME_TYPES` assertions below compile only if the
//!   shim's types *are* parking_lot's and std's;
//! - measured: the cache-lookup lock path (map mutex, entry `Arc`, table
//!   read lock, copy) run once with the shim's types and once with
//!   parking_lot used directly, side by side, and the engine's real read
//!   path (`Image::read`, which takes the same locks plus the L1 lock) for
//!   scale.
//!
//! Run: `cargo bench -p qj-benches --bench contended_read`.

use std::collections::HashMap;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use qj_engine::{create_in_memory, CreateOptions, Image};

/// Compiles only if each shim type is the very type it stands for in
/// normal builds: a function from one to the other is then the identity.
#[allow(dead_code)]
const SAME_TYPES: () = {
    let _: fn(qj_engine::sync::Mutex<u64>) -> parking_lot::Mutex<u64> = |m| m;
    let _: fn(qj_engine::sync::RwLock<u64>) -> parking_lot::RwLock<u64> = |l| l;
    let _: fn(qj_engine::sync::Arc<u64>) -> std::sync::Arc<u64> = |a| a;
    let _: fn(qj_engine::sync::AtomicU64) -> std::sync::atomic::AtomicU64 = |a| a;
    let _: fn(qj_engine::sync::AtomicBool) -> std::sync::atomic::AtomicBool = |a| a;
};

const THREADS: usize = 4;
/// The clusters every thread reads, round robin: all cached.
const HOT_CLUSTERS: u64 = 8;
const CLUSTER_BYTES: u64 = 64 << 10;
const READ_BYTES: usize = 4096;
/// Alternating rounds of the two lock paths.
const ROUNDS: u32 = 2;

/// Runs `read(thread, i)` `iters` times on each of 4 threads started
/// together; returns the wall time (what a contended reader waits).
fn contended(iters: u64, read: &(impl Fn(usize, u64) + Sync)) -> Duration {
    let start_line = Barrier::new(THREADS + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let start_line = &start_line;
                scope.spawn(move || {
                    start_line.wait();
                    let started = Instant::now();
                    for i in 0..iters {
                        read(t, i);
                    }
                    started.elapsed()
                })
            })
            .collect();
        start_line.wait();
        workers
            .into_iter()
            .map(|w| w.join().expect("a reader panicked"))
            .max()
            .expect("at least one reader")
    })
}

/// The cache lookup a guest read does, written once over the lock types:
/// lock the map, clone the entry's `Arc`, unlock; read-lock the table; copy.
macro_rules! lookup_path {
    ($name:ident, $mutex:ty, $arc:ty, $new_mutex:expr, $new_rwlock:expr, $new_arc:expr) => {
        struct $name {
            map: $mutex,
        }

        impl $name {
            fn new() -> Self {
                let tables: HashMap<u64, $arc> = (0..HOT_CLUSTERS)
                    .map(|c| {
                        (
                            c,
                            $new_arc($new_rwlock(vec![c as u8; CLUSTER_BYTES as usize])),
                        )
                    })
                    .collect();
                Self {
                    map: $new_mutex(tables),
                }
            }

            fn read(&self, cluster: u64, out: &mut [u8]) {
                let table = self.map.lock().get(&cluster).expect("cached").clone();
                let bytes = table.read();
                out.copy_from_slice(&bytes[..out.len()]);
            }
        }
    };
}

lookup_path!(
    ShimPath,
    qj_engine::sync::Mutex<HashMap<u64, qj_engine::sync::Arc<qj_engine::sync::RwLock<Vec<u8>>>>>,
    qj_engine::sync::Arc<qj_engine::sync::RwLock<Vec<u8>>>,
    qj_engine::sync::Mutex::new,
    qj_engine::sync::RwLock::new,
    qj_engine::sync::Arc::new
);

lookup_path!(
    ParkingLotPath,
    parking_lot::Mutex<HashMap<u64, std::sync::Arc<parking_lot::RwLock<Vec<u8>>>>>,
    std::sync::Arc<parking_lot::RwLock<Vec<u8>>>,
    parking_lot::Mutex::new,
    parking_lot::RwLock::new,
    std::sync::Arc::new
);

/// An image whose first `HOT_CLUSTERS` clusters are written and cached.
fn hot_image() -> Image {
    let image = create_in_memory(&CreateOptions {
        virtual_size: 64 << 20,
        cluster_size: CLUSTER_BYTES,
        ..CreateOptions::default()
    })
    .expect("creating the image");
    for c in 0..HOT_CLUSTERS {
        image
            .write(
                &vec![c as u8 + 1; CLUSTER_BYTES as usize],
                c * CLUSTER_BYTES,
            )
            .expect("writing a hot cluster");
    }
    image.flush().expect("flushing");
    image
}

fn contended_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("contended_read_4_threads");

    // Identical types make identical code, so any gap between the two is
    // noise (4 threads on a shared machine); they are measured in
    // alternating rounds so that drift shows as such, not as a difference.
    let shim = ShimPath::new();
    let direct = ParkingLotPath::new();
    for round in 1..=ROUNDS {
        group.bench_function(format!("lookup path, shim types, round {round}"), |b| {
            b.iter_custom(|iters| {
                contended(iters, &|t, i| {
                    let mut out = [0u8; READ_BYTES];
                    shim.read((t as u64 + i) % HOT_CLUSTERS, &mut out);
                    std::hint::black_box(&out);
                })
            })
        });
        group.bench_function(
            format!("lookup path, parking_lot directly, round {round}"),
            |b| {
                b.iter_custom(|iters| {
                    contended(iters, &|t, i| {
                        let mut out = [0u8; READ_BYTES];
                        direct.read((t as u64 + i) % HOT_CLUSTERS, &mut out);
                        std::hint::black_box(&out);
                    })
                })
            },
        );
    }

    let image = hot_image();
    group.bench_function("Image::read (engine, through the shim)", |b| {
        b.iter_custom(|iters| {
            contended(iters, &|t, i| {
                let mut out = [0u8; READ_BYTES];
                let cluster = (t as u64 + i) % HOT_CLUSTERS;
                image
                    .read(&mut out, cluster * CLUSTER_BYTES)
                    .expect("reading a hot cluster");
                std::hint::black_box(&out);
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = contended_read
}
criterion_main!(benches);
