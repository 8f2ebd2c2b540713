//! The comparison workloads behind `qj bench` and the criterion benchmarks:
//! the same guest I/O on our journalled backend, our flush-ordering
//! backend, QEMU's qcow2 (through `qemu-img bench`) and a raw file (the
//! physical limit), interleaved in one run so that machine drift hits all
//! targets alike.

pub mod content;
pub mod latency;
pub mod plot;
pub mod qemu;
pub mod report;
pub mod run;
pub mod target;
pub mod workload;

pub use report::{render_table, BenchRow};
pub use run::{run_bench, BenchOptions, Progress};
pub use target::{DedupCounts, TargetKind};
pub use workload::Workload;

/// `benches/nbd-bench.sh`, the like-for-like benchmark: the same fio jobs
/// over NBD against `qj serve` and `qemu-nbd`. The binary carries it, so
/// `qj bench --via nbd` runs this exact script from any directory.
pub const NBD_BENCH_SCRIPT: &str = include_str!("../nbd-bench.sh");
