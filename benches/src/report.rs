//! Rows, ratios, and the table `qj bench` prints.

use serde::Serialize;

use crate::latency::Latencies;
use crate::target::{DedupCounts, TargetKind};
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
    /// Bytes of one request.
    pub request_bytes: u64,
    /// Guest bytes the measured writes of one round wrote (the last round;
    /// every round writes the same); `None` for reads.
    pub guest_bytes_written: Option<u64>,
    /// The image file's length before and after the measured operations of
    /// the last round (every round starts from a fresh image).
    pub file_bytes: Option<(u64, u64)>,
    /// Deduplication's work and cost over every round.
    pub dedup: Option<DedupCounts>,
    /// Why something is missing.
    pub note: Option<String>,
}

impl Cell {
    /// An empty cell of images with `cluster_size`-byte clusters.
    pub fn new(workload: Workload, target: TargetKind, threads: usize, cluster_size: u64) -> Self {
        Self {
            workload,
            target,
            threads,
            request_bytes: workload.request_bytes(cluster_size),
            guest_bytes_written: None,
            file_bytes: None,
            dedup: None,
            ops: 0,
            elapsed: std::time::Duration::ZERO,
            counted_ops: 0,
            flushes: 0,
            bytes_written: 0,
            latencies: Latencies::default(),
            note: None,
        }
    }

    /// Records the guest bytes and file lengths of one round of `ops`
    /// operations.
    pub fn record_round(&mut self, ops: u64, file_bytes: Option<(u64, u64)>) {
        self.guest_bytes_written =
            (self.workload != Workload::Read).then_some(ops * self.request_bytes);
        self.file_bytes = file_bytes;
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
    /// ops_per_s relative to our journalled backend (single-flush, no
    /// dedup) in the same run.
    #[serde(default)]
    pub vs_journal: Option<f64>,
    /// Guest bytes the measured writes of one round wrote.
    #[serde(default)]
    pub guest_bytes_written: Option<u64>,
    /// The image file's length before the measured operations of one round
    /// (QEMU's and ours; a raw file has none: its length is the disk size).
    #[serde(default)]
    pub file_bytes_start: Option<u64>,
    /// The image file's length after them and a clean close.
    #[serde(default)]
    pub file_bytes_end: Option<u64>,
    /// How much the file grew per guest byte written: below 1 when
    /// deduplication stored less than the guest wrote.
    #[serde(default)]
    pub file_growth_per_guest_byte: Option<f64>,
    /// Writes deduplicated (nothing stored) per operation.
    #[serde(default)]
    pub dedup_hits_per_op: Option<f64>,
    /// Mean time to SHA-256 one whole-cluster write, in microseconds.
    #[serde(default)]
    pub hash_per_cluster_us: Option<f64>,
    /// Mean time to confirm a hash match by reading and comparing the
    /// cluster, in microseconds (`None` when the target trusts the hash).
    #[serde(default)]
    pub compare_per_match_us: Option<f64>,
    /// Why a value is missing.
    pub note: Option<String>,
    /// How the operations reached the target: `in-process` for these rows
    /// (`nbd` for the rows of `qj bench --via nbd`, which have these keys
    /// and more).
    #[serde(default = "in_process")]
    pub via: String,
}

fn in_process() -> String {
    "in-process".into()
}

/// `part / whole`, when `whole` is not zero.
fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
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
                mb_per_s: ops_per_s.map(|r| r * c.request_bytes as f64 / 1e6),
                p50_us: c.latencies.percentile_us(50.0),
                p99_us: c.latencies.percentile_us(99.0),
                flushes_per_op: (c.counted_ops > 0)
                    .then(|| c.flushes as f64 / c.counted_ops as f64),
                bytes_written_per_op: (c.counted_ops > 0)
                    .then(|| c.bytes_written as f64 / c.counted_ops as f64),
                vs_raw: None,
                vs_qemu: None,
                vs_ordered: None,
                vs_journal: None,
                guest_bytes_written: c.guest_bytes_written,
                file_bytes_start: c.file_bytes.map(|(start, _)| start),
                file_bytes_end: c.file_bytes.map(|(_, end)| end),
                file_growth_per_guest_byte: c
                    .file_bytes
                    .zip(c.guest_bytes_written)
                    .and_then(|((start, end), guest)| ratio(end.saturating_sub(start), guest)),
                dedup_hits_per_op: c.dedup.and_then(|d| ratio(d.hits, c.ops)),
                hash_per_cluster_us: c
                    .dedup
                    .and_then(|d| ratio(d.hash_ns, d.hashed))
                    .map(|ns| ns / 1e3),
                compare_per_match_us: c
                    .dedup
                    .and_then(|d| ratio(d.compare_ns, d.compared))
                    .map(|ns| ns / 1e3),
                note: c.note.clone(),
                via: in_process(),
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
        r.vs_journal = ratio(find(&snapshot, &r.workload, r.threads, "journal"));
    }
    rows
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// The human table. The dedup columns (hits per op, hash and compare
/// time) appear only when a row has them.
pub fn render_table(rows: &[BenchRow]) -> String {
    let dedup = rows.iter().any(|r| r.hash_per_cluster_us.is_some());
    let mut out = format!(
        "{:<19} {:<19} {:>3} {:>10} {:>8} {:>9} {:>9} {:>7} {:>10} {:>6} {:>6} {:>6} {:>6} {:>6}",
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
        "/jrn",
        "grow",
    );
    if dedup {
        out.push_str(&format!(" {:>7} {:>7} {:>7}", "hits", "hash us", "cmp us"));
    }
    out.push_str("  note\n");
    for r in rows {
        out.push_str(&format!(
            "{:<19} {:<19} {:>3} {:>10} {:>8} {:>9} {:>9} {:>7} {:>10} {:>6} {:>6} {:>6} {:>6} {:>6}",
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
            f(r.vs_journal, 2),
            f(r.file_growth_per_guest_byte, 2),
        ));
        if dedup {
            out.push_str(&format!(
                " {:>7} {:>7} {:>7}",
                f(r.dedup_hits_per_op, 2),
                f(r.hash_per_cluster_us, 1),
                f(r.compare_per_match_us, 1),
            ));
        }
        out.push_str(&format!("  {}\n", r.note.as_deref().unwrap_or("")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cell(target: TargetKind, ops: u64, dedup: Option<DedupCounts>) -> Cell {
        let mut c = Cell::new(Workload::Dedup90, target, 1, 65536);
        c.ops = ops;
        c.counted_ops = ops;
        c.elapsed = Duration::from_secs(1);
        c.record_round(ops, Some((1 << 20, (1 << 20) + ops * 6554)));
        c.dedup = dedup;
        c
    }

    #[test]
    fn rows_carry_growth_dedup_cost_and_the_journal_ratio() {
        let counts = DedupCounts {
            hashed: 100,
            hash_ns: 4_000_000,
            compared: 90,
            compare_ns: 900_000,
            hits: 90,
        };
        let rows = build_rows(vec![
            cell(TargetKind::Journal, 50, None),
            cell(TargetKind::JournalDedup, 100, Some(counts)),
        ]);
        let (plain, dedup) = (&rows[0], &rows[1]);
        assert_eq!(dedup.guest_bytes_written, Some(100 * 65536));
        assert_eq!(dedup.file_bytes_start, Some(1 << 20));
        assert_eq!(dedup.file_bytes_end, Some((1 << 20) + 655_400));
        let growth = dedup.file_growth_per_guest_byte.unwrap();
        assert!((growth - 6554.0 / 65536.0).abs() < 1e-12, "{growth}");
        assert_eq!(dedup.dedup_hits_per_op, Some(0.9));
        assert_eq!(dedup.hash_per_cluster_us, Some(40.0));
        assert_eq!(dedup.compare_per_match_us, Some(10.0));
        assert_eq!(dedup.vs_journal, Some(2.0));
        assert_eq!(dedup.mb_per_s, Some(100.0 * 65536.0 / 1e6));
        assert_eq!(plain.vs_journal, Some(1.0));
        assert_eq!(plain.hash_per_cluster_us, None);
        // Nothing compared (a trusting target): no compare time, not zero.
        let trusting = DedupCounts {
            compared: 0,
            compare_ns: 0,
            ..counts
        };
        let rows = build_rows(vec![cell(
            TargetKind::JournalDedupTrust,
            10,
            Some(trusting),
        )]);
        assert_eq!(rows[0].compare_per_match_us, None);
    }

    #[test]
    fn the_table_shows_dedup_columns_only_with_dedup_rows() {
        let counts = DedupCounts {
            hashed: 10,
            hash_ns: 370_000,
            ..DedupCounts::default()
        };
        let with = render_table(&build_rows(vec![
            cell(TargetKind::Journal, 10, None),
            cell(TargetKind::JournalDedup, 10, Some(counts)),
        ]));
        let header = with.lines().next().unwrap();
        assert!(
            header.contains("hash us") && header.contains("grow"),
            "{with}"
        );
        let dedup_line = with.lines().find(|l| l.contains("journal-dedup")).unwrap();
        assert!(dedup_line.contains(" 37.0 "), "{with}");
        let without = render_table(&build_rows(vec![cell(TargetKind::Journal, 10, None)]));
        assert!(!without.contains("hash us"), "{without}");
        // Every row (none has a note) fills the header's columns exactly.
        for table in [&with, &without] {
            let header = table.lines().next().unwrap();
            for row in table.lines().skip(1) {
                assert_eq!(row.len(), header.len() - "note".len(), "{table}");
            }
        }
    }
}
