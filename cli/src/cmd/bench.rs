//! `qj bench`: the same guest I/O on our backends, QEMU's qcow2 and a raw
//! file, interleaved in one run (the runner is `qj_benches::run_bench`).
//!
//! A target that cannot run here (qemu-img or strace missing, a backend
//! not built into this version) is not an error: the runner says why in
//! the row's note column. Bad arguments exit 2; a run that fails exits 1.

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qj_benches::{render_table, run_bench, BenchOptions, Progress, TargetKind, Workload};
use qj_spec::units::Geometry;

use crate::error::{CliError, CliResult};
use crate::output::{to_json, OutputFormat};
use crate::size::parse_size;

/// Smallest cluster size a benchmark image may have: every workload moves
/// 4 KiB requests, one request per cluster.
const CLUSTER_BYTES_MIN: u64 = 4096;
/// Most threads of one `threads-sync` row.
const THREADS_MAX: u64 = 1024;
/// Most interleaved rounds.
const ROUNDS_MAX: u32 = 1000;

/// Arguments of `qj bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run (repeatable or comma separated; default all but the
    /// dedup ones: dedup-0, dedup-50, dedup-90 and their -sync forms).
    #[arg(long, value_name = "NAME", value_delimiter = ',', value_parser = Workload::parse)]
    workload: Vec<Workload>,
    /// Targets to compare (repeatable or comma separated; default all but
    /// the bitmap and dedup ones; a dedup workload adds journal-dedup and
    /// journal-dedup-trust).
    #[arg(long, value_name = "NAME", value_delimiter = ',', value_parser = TargetKind::parse)]
    target: Vec<TargetKind>,
    /// Thread counts of the threads-sync workload (comma separated).
    #[arg(long, value_name = "N,..", value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(1..=THREADS_MAX))]
    threads: Vec<u64>,
    /// Operations per round of the synced workloads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ops: Option<u64>,
    /// Operations per round of the other workloads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    batch_ops: Option<u64>,
    /// Interleaved rounds (summed).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ROUNDS_MAX)))]
    rounds: Option<u32>,
    /// Cluster size of every image (a power of two from 4k to 2M).
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size)]
    cluster_size: Option<u64>,
    /// Cache mode of every target, as QEMU names it: writeback, writethrough,
    /// none (O_DIRECT, what production guests run with) or directsync.
    #[arg(short = 't', long = "cache", value_name = "MODE", default_value = "writeback",
          value_parser = crate::cmd::serve::parse_cache)]
    cache: qj_engine::CacheMode,
    /// Directory for the images (default: a temporary directory, removed
    /// afterwards).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Output format: a table, or the rows as a JSON array.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

fn parse_cluster_size(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    let max = 1u64 << Geometry::CLUSTER_BITS_MAX;
    if bytes.is_power_of_two() && (CLUSTER_BYTES_MIN..=max).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "cluster size {bytes} is not a power of two from {CLUSTER_BYTES_MIN} to {max}"
        ))
    }
}

/// `list` without repeats, first occurrence first (a repeat would be
/// measured twice into one row).
fn without_repeats<T: PartialEq + Copy>(list: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(list.len());
    for &item in list {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

fn options(args: &BenchArgs, dir: PathBuf) -> CliResult<BenchOptions> {
    let defaults = BenchOptions::default();
    let threads = if args.threads.is_empty() {
        defaults.threads
    } else {
        without_repeats(&args.threads)
            .into_iter()
            .map(|n| {
                usize::try_from(n)
                    .map_err(|_| CliError::Usage(format!("bench: --threads {n} is too large")))
            })
            .collect::<CliResult<Vec<usize>>>()?
    };
    let workloads = if args.workload.is_empty() {
        defaults.workloads
    } else {
        without_repeats(&args.workload)
    };
    Ok(BenchOptions {
        dir,
        targets: if args.target.is_empty() {
            TargetKind::defaults_for(&workloads)
        } else {
            without_repeats(&args.target)
        },
        workloads,
        threads,
        sync_ops: args.ops.unwrap_or(defaults.sync_ops),
        batch_ops: args.batch_ops.unwrap_or(defaults.batch_ops),
        rounds: args.rounds.unwrap_or(defaults.rounds),
        cluster_size: args.cluster_size.unwrap_or(defaults.cluster_size),
        cache: args.cache,
    })
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} cells {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Runs `qj bench`.
pub fn run(args: BenchArgs) -> CliResult<u8> {
    // Dropping the temporary directory removes it and anything the runner
    // left in it, on success and on error alike.
    let (dir, _temporary) = match &args.dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("qj-bench-")
                .tempdir()
                .map_err(crate::error::io("bench: creating a temporary directory"))?;
            (temporary.path().to_path_buf(), Some(temporary))
        }
    };
    let opts = options(&args, dir)?;
    let bar = progress_bar();
    let report = |p: &Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.label.clone());
    };
    let rows = run_bench(&opts, &report);
    bar.finish_and_clear();
    let rows = rows.map_err(|why| CliError::failed("bench", why))?;
    match args.output {
        OutputFormat::Json => println!("{}", to_json(&rows)?),
        OutputFormat::Human => print!("{}", render_table(&rows)),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sizes_must_be_powers_of_two_in_range() {
        assert_eq!(parse_cluster_size("64k"), Ok(65536));
        assert_eq!(parse_cluster_size("2M"), Ok(2 << 20));
        for bad in ["512", "48k", "4M", "x"] {
            assert!(parse_cluster_size(bad).is_err(), "{bad}");
        }
    }

    /// The options `qj bench ARGS` would run.
    fn options_of(args: &[&str]) -> BenchOptions {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("bench").chain(args.iter().copied()),
        )
        .expect("valid arguments");
        options(&cli.bench, PathBuf::from("/nonexistent")).expect("valid options")
    }

    #[test]
    fn the_default_run_leaves_dedup_out_and_a_dedup_workload_brings_its_targets() {
        let plain = options_of(&[]);
        assert_eq!(plain.workloads, Workload::ALL);
        assert!(plain
            .workloads
            .iter()
            .all(|w| w.duplicate_percent().is_none()));
        assert_eq!(plain.targets, TargetKind::ALL);
        let dedup = options_of(&["--workload", "alloc-sync-4k,dedup-90-sync"]);
        let mut expected = TargetKind::ALL.to_vec();
        expected.extend(TargetKind::DEDUP);
        assert_eq!(dedup.targets, expected);
        // Named targets are exactly what runs.
        let named = options_of(&["--workload", "dedup-50", "--target", "journal,ordered"]);
        assert_eq!(named.targets, [TargetKind::Journal, TargetKind::Ordered]);
    }

    #[test]
    fn repeats_are_measured_once() {
        assert_eq!(without_repeats(&[1, 2, 1, 4, 2]), vec![1, 2, 4]);
    }
}
