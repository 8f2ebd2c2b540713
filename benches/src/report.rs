//! Rows, ratios, and the table `qj bench` prints.

use serde::Serialize;

use crate::latency::Latencies;
use crate::target::TargetKind;
use crate::workload::Workload;

/// The accumulated measurements of one (workload, threads, target).
#[derive(Debug)]
pub struct Cell {
    /// The workload.
    pub workload: Workload,
    /// The target.
    pub target: TargetKind,
    /// Threads (or QEMU queue depth).
    pub threads: usize,
    /// Operations timed.
    pub ops: u64,
    /// Time for them.
    pub elapsed: std::time::Duration,
    /// Operations over which flushes and bytes were counted.
    pub counted_ops: u64,
    /// Device flushes counted.
    pub flushes: u64,
    /// Bytes written to the device.
    pub bytes_written: u64,
    /// Per-operation latencies.
    pub latencies: Latencies,
    /// Why something is missing.
    pub note: Option<String>,
}

impl Cell {
    /// An empty cell.
    pub fn new(workload: Workload, target: TargetKind, threads: usize) -> Self {
        Self {
            workload,
            target,
            threads,
            ops: 0,
            elapsed: std::time::Duration::ZERO,
            counted_ops: 0,
            flushes: 0,
            bytes_written: 0,
            latencies: Latencies::default(),
            note: None,
        }
    }
}

/// One row of the report (and one object of `--output json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BenchRow {
    /// Workload name.
    pub workload: String,
    /// `journal`, `journal-draft`, `journal-logged`, `ordered`, `qemu` or
    /// `raw`.
    pub target: String,
    /// Threads (QEMU: queue depth).
    pub threads: usize,
    /// Operations timed.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_s: Option<f64>,
    /// Megabytes (10^6) of guest data per second.
    pub mb_per_s: Option<f64>,
    /// Median latency in microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile latency in microseconds.
    pub p99_us: Option<f64>,
    /// Device flushes per operation.
    pub flushes_per_op: Option<f64>,
    /// Bytes written to the device per operation (write amplification).
    pub bytes_written_per_op: Option<f64>,
    /// ops_per_s relative to the raw file in the same run.
    pub vs_raw: Option<f64>,
    /// ops_per_s relative to QEMU in the same run.
    pub vs_qemu: Option<f64>,
    /// ops_per_s relative to our flush-ordering backend in the same run.
    pub vs_ordered: Option<f64>,
    /// Why a value is missing.
    pub note: Option<String>,
}

fn op_bytes(w: Workload, cluster_size: u64) -> u64 {
    if w == Workload::AllocSyncCluster {
        cluster_size
    } else {
        4096
    }
}

/// Turns cells into rows with ratios between targets of the same workload
/// and thread count.
pub fn build_rows(cells: Vec<Cell>) -> Vec<BenchRow> {
    let mut rows: Vec<BenchRow> = cells
        .iter()
        .map(|c| {
            let secs = c.elapsed.as_secs_f64();
            let ops_per_s = (c.ops > 0 && secs > 0.0).then(|| c.ops as f64 / secs);
            BenchRow {
                workload: c.workload.name().into(),
                target: c.target.name().into(),
                threads: c.threads,
                ops: c.ops,
                ops_per_s,
                mb_per_s: ops_per_s.map(|r| r * op_bytes(c.workload, 65536) as f64 / 1e6),
                p50_us: c.latencies.percentile_us(50.0),
                p99_us: c.latencies.percentile_us(99.0),
                flushes_per_op: (c.counted_ops > 0)
                    .then(|| c.flushes as f64 / c.counted_ops as f64),
                bytes_written_per_op: (c.counted_ops > 0)
                    .then(|| c.bytes_written as f64 / c.counted_ops as f64),
                vs_raw: None,
                vs_qemu: None,
                vs_ordered: None,
                note: c.note.clone(),
            }
        })
        .collect();
    let find = |rows: &[BenchRow], w: &str, t: usize, target: &str| {
        rows.iter()
            .find(|r| r.workload == w && r.threads == t && r.target == target)
            .and_then(|r| r.ops_per_s)
    };
    let snapshot = rows.clone();
    for r in &mut rows {
        let ratio = |base: Option<f64>| r.ops_per_s.zip(base).map(|(a, b)| a / b);
        r.vs_raw = ratio(find(&snapshot, &r.workload, r.threads, "raw"));
        r.vs_qemu = ratio(find(&snapshot, &r.workload, r.threads, "qemu"));
        r.vs_ordered = ratio(find(&snapshot, &r.workload, r.threads, "ordered"));
    }
    rows
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// The human table.
pub fn render_table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<19} {:<14} {:>3} {:>10} {:>8} {:>9} {:>9} {:>7} {:>10} {:>6} {:>6} {:>6}  {}\n",
        "workload",
        "target",
        "thr",
        "ops/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "fl/op",
        "B/op",
        "/raw",
        "/qemu",
        "/ord",
        "note"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<19} {:<14} {:>3} {:>10} {:>8} {:>9} {:>9} {:>7} {:>10} {:>6} {:>6} {:>6}  {}\n",
            r.workload,
            r.target,
            r.threads,
            f(r.ops_per_s, 0),
            f(r.mb_per_s, 1),
            f(r.p50_us, 1),
            f(r.p99_us, 1),
            f(r.flushes_per_op, 2),
            f(r.bytes_written_per_op, 0),
            f(r.vs_raw, 2),
            f(r.vs_qemu, 2),
            f(r.vs_ordered, 2),
            r.note.as_deref().unwrap_or("")
        ));
    }
    out
}
