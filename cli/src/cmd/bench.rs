//! `qj bench`: the same guest I/O on our backends, QEMU's qcow2 and a raw
//! file, interleaved in one run (the runner is `qj_benches::run_bench`).
//! With `--via nbd` the same comparison goes through one client instead:
//! fio over NBD against `qj serve` and `qemu-nbd` (the runner is
//! `benches/nbd-bench.sh`, which this binary carries).
//!
//! A target that cannot run here (qemu-img or strace missing, a backend
//! not built into this version) is not an error: the runner says why in
//! the row's note column. Bad arguments exit 2; a run that fails exits 1.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
/// Most repeats of one NBD cell (the runner's own limit).
const NBD_ROUNDS_MAX: u32 = 99;
/// Most operations of the NBD runner's overwrite-sync-seq (its own limit).
const NBD_OPS_MAX: u64 = 99_999;

/// How the operations reach the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Calls into the engine in this process (QEMU through `qemu-img
    /// bench`, the raw file through system calls).
    InProcess,
    /// fio over NBD on a Unix socket, against `qj serve` and `qemu-nbd`: one
    /// client for every target. Needs fio, qemu-nbd and python3.
    Nbd,
}

/// Arguments of `qj bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// How the operations reach the targets: in-process, or nbd (the same
    /// fio jobs over NBD against `qj serve` and `qemu-nbd`).
    #[arg(long, value_enum, default_value_t = Via::InProcess)]
    via: Via,
    /// Workloads to run (repeatable or comma separated; default all but the
    /// dedup ones: dedup-0, dedup-50, dedup-90 and their -sync forms). With
    /// `--via nbd`, fio jobs: randwrite-sync, randwrite-sync-8jobs,
    /// seqwrite-64k-sync, randread, overwrite-sync, overwrite-sync-8jobs,
    /// overwrite-sync-seq.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    workload: Vec<String>,
    /// Targets to compare (repeatable or comma separated; default all but
    /// the bitmap and dedup ones; a dedup workload adds journal-dedup and
    /// journal-dedup-trust). With `--via nbd`: qj-ordered, qj-journal,
    /// qj-journal-logged, qemu-default, qemu-lazy, qemu-prealloc,
    /// raw-sparse, raw-prealloc, local-raw (fio on the raw file itself, no
    /// NBD), and inproc-ordered, inproc-journal, inproc-journal-logged (the
    /// in-process rate of overwrite-sync-seq).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    target: Vec<String>,
    /// Thread counts of the threads-sync workload (comma separated).
    #[arg(long, value_name = "N,..", value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(1..=THREADS_MAX))]
    threads: Vec<u64>,
    /// Operations per round of the synced workloads (with `--via nbd`, of
    /// overwrite-sync-seq, 99999 at most).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ops: Option<u64>,
    /// Operations per round of the other workloads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    batch_ops: Option<u64>,
    /// Interleaved rounds (summed; with `--via nbd`, repeats of each cell,
    /// reported as median and spread, 99 at most).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ROUNDS_MAX)))]
    rounds: Option<u32>,
    /// Seconds of each fio run (`--via nbd` only; default 3).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=3600))]
    seconds: Option<u32>,
    /// Cluster size of every image (a power of two from 4k to 2M).
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size)]
    cluster_size: Option<u64>,
    /// Cache mode of every target, as QEMU names it: writeback (the
    /// default), writethrough, none (O_DIRECT, what production guests run
    /// with) or directsync. With `--via nbd`: writeback or none, repeatable
    /// or comma separated (default both).
    #[arg(short = 't', long = "cache", value_name = "MODE", value_delimiter = ',',
          value_parser = crate::cmd::serve::parse_cache)]
    cache: Vec<qj_engine::CacheMode>,
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

/// Parses names with `parse`, each error a usage error naming the option.
fn parse_names<T: PartialEq + Copy>(
    names: &[String],
    option: &str,
    parse: fn(&str) -> Result<T, String>,
) -> CliResult<Vec<T>> {
    let parsed = names
        .iter()
        .map(|name| {
            parse(name).map_err(|why| {
                CliError::Usage(format!(
                    "bench: invalid value '{name}' for '{option}': {why}"
                ))
            })
        })
        .collect::<CliResult<Vec<T>>>()?;
    Ok(without_repeats(&parsed))
}

fn options(args: &BenchArgs, dir: PathBuf) -> CliResult<BenchOptions> {
    let defaults = BenchOptions::default();
    let cache = match args.cache.as_slice() {
        [] => qj_engine::CacheMode::Writeback,
        [one] => *one,
        _ => {
            return Err(CliError::Usage(
                "bench: one --cache mode in process (several only with --via nbd)".into(),
            ))
        }
    };
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
        parse_names(&args.workload, "--workload <NAME>", Workload::parse)?
    };
    Ok(BenchOptions {
        dir,
        targets: if args.target.is_empty() {
            TargetKind::defaults_for(&workloads)
        } else {
            parse_names(&args.target, "--target <NAME>", TargetKind::parse)?
        },
        workloads,
        threads,
        sync_ops: args.ops.unwrap_or(defaults.sync_ops),
        batch_ops: args.batch_ops.unwrap_or(defaults.batch_ops),
        rounds: args.rounds.unwrap_or(defaults.rounds),
        cluster_size: args.cluster_size.unwrap_or(defaults.cluster_size),
        cache,
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
    if args.via == Via::Nbd {
        return run_via_nbd(&args);
    }
    if args.seconds.is_some() {
        return Err(CliError::Usage(
            "bench: --seconds applies with --via nbd only (in process, --ops sets the length)"
                .into(),
        ));
    }
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

/// The runner's arguments for `qj bench --via nbd ARGS`, its rows written
/// to `rows`. Options that only mean something in process are refused
/// rather than ignored.
fn nbd_runner_args(args: &BenchArgs, rows: &Path) -> CliResult<Vec<OsString>> {
    let in_process_only = [
        ("--threads", !args.threads.is_empty()),
        ("--batch-ops", args.batch_ops.is_some()),
        ("--cluster-size", args.cluster_size.is_some()),
    ];
    if let Some((option, _)) = in_process_only.iter().find(|(_, given)| *given) {
        return Err(CliError::Usage(format!(
            "bench: {option} applies in process only, not with --via nbd \
             (fio's jobs fix their own threads, and every image has 64 KiB clusters)"
        )));
    }
    let mut runner: Vec<OsString> = vec!["-o".into(), rows.into()];
    if let Some(rounds) = args.rounds {
        if rounds > NBD_ROUNDS_MAX {
            return Err(CliError::Usage(format!(
                "bench: --rounds {rounds} is over {NBD_ROUNDS_MAX}, the most repeats of an NBD cell"
            )));
        }
        runner.extend(["-r".into(), rounds.to_string().into()]);
    }
    if let Some(seconds) = args.seconds {
        runner.extend(["-s".into(), seconds.to_string().into()]);
    }
    if let Some(ops) = args.ops {
        if ops > NBD_OPS_MAX {
            return Err(CliError::Usage(format!(
                "bench: --ops {ops} is over {NBD_OPS_MAX}, the most with --via nbd"
            )));
        }
        runner.extend(["-n".into(), ops.to_string().into()]);
    }
    if let Some(empty) = [("--workload", &args.workload), ("--target", &args.target)]
        .iter()
        .find(|(_, names)| names.iter().any(String::is_empty))
    {
        return Err(CliError::Usage(format!(
            "bench: an empty name in {}",
            empty.0
        )));
    }
    let list = |names: &[String]| {
        without_repeats(&names.iter().map(String::as_str).collect::<Vec<_>>()).join(",")
    };
    if !args.workload.is_empty() {
        runner.extend(["-J".into(), list(&args.workload).into()]);
    }
    if !args.target.is_empty() {
        runner.extend(["-T".into(), list(&args.target).into()]);
    }
    if !args.cache.is_empty() {
        let modes = without_repeats(&args.cache);
        if modes.iter().any(|mode| mode.writethrough()) {
            return Err(CliError::Usage(
                "bench: with --via nbd, --cache takes writeback and none \
                 (the modes the NBD runner compares)"
                    .into(),
            ));
        }
        let names: Vec<&str> = modes.iter().map(|mode| mode.name()).collect();
        runner.extend(["-c".into(), names.join(",").into()]);
    }
    if let Some(dir) = &args.dir {
        // The runner changes directory; a relative path would move with it.
        let dir = std::path::absolute(dir)
            .map_err(crate::error::io("bench: resolving the --dir path"))?;
        // The socket's path goes into fio's NBD URI as it is.
        let uri_safe = dir.to_str().is_some_and(|path| {
            path.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b))
        });
        if !uri_safe {
            return Err(CliError::Usage(format!(
                "bench: with --via nbd, --dir {} must be a path of letters, digits and / . _ - + \
                 (the NBD socket in it goes into fio's URI)",
                dir.display()
            )));
        }
        runner.extend(["-d".into(), dir.into()]);
    }
    Ok(runner)
}

/// Runs `qj bench --via nbd`: the carried copy of `benches/nbd-bench.sh`,
/// with this binary as the `qj` it serves with. Its progress goes to
/// stderr; its table, or with `--output json` its rows, to stdout.
fn run_via_nbd(args: &BenchArgs) -> CliResult<u8> {
    let scratch = tempfile::Builder::new()
        .prefix("qj-bench-nbd-")
        .tempdir()
        .map_err(crate::error::io("bench: creating a temporary directory"))?;
    // The runner finds its working directory from its own path
    // (`dirname $0/..`): a directory of its own inside the scratch one.
    let script = scratch.path().join("benches").join("nbd-bench.sh");
    let rows_path = scratch.path().join("rows.json");
    let runner_args = nbd_runner_args(args, &rows_path)?;
    std::fs::create_dir(scratch.path().join("benches"))
        .and_then(|()| std::fs::write(&script, qj_benches::NBD_BENCH_SCRIPT))
        .map_err(crate::error::io("bench: writing the NBD runner"))?;
    let qj = std::env::current_exe().map_err(crate::error::io("bench: finding this binary"))?;
    // First the runner's own check of its arguments (`-k`), its message
    // kept for a one-line error; then the run, its progress shown live.
    let checked = std::process::Command::new("bash")
        .arg(&script)
        .arg("-k")
        .args(&runner_args)
        .env("QJ", &qj)
        .output()
        .map_err(crate::error::io("bench: running bash for the NBD runner"))?;
    let said = String::from_utf8_lossy(&checked.stderr);
    let said = said.trim().trim_start_matches("nbd-bench: ");
    match checked.status.code() {
        Some(0) => {}
        Some(2) => return Err(CliError::Usage(format!("bench --via nbd: {said}"))),
        _ => return Err(CliError::failed("bench --via nbd", said.to_string())),
    }
    let mut command = std::process::Command::new("bash");
    command.arg(&script).args(&runner_args).env("QJ", &qj);
    if args.output == OutputFormat::Json {
        // The table would mix with the JSON: it goes to stderr.
        command.stdout(std::process::Stdio::from(std::io::stderr()));
    }
    // Ctrl-C reaches the runner too (one process group): it stops its
    // server and removes its run directory. This process only notes the
    // signal, so that it lives on to remove the scratch directory.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = signal_hook::flag::register(
        signal_hook::consts::SIGINT,
        std::sync::Arc::clone(&interrupted),
    )
    .map_err(crate::error::io(
        "bench: handling Ctrl-C during the NBD runner",
    ))?;
    let status = command.status();
    signal_hook::low_level::unregister(handler);
    let status = status.map_err(crate::error::io("bench: running bash for the NBD runner"))?;
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(CliError::failed("bench --via nbd", "interrupted"));
    }
    if !status.success() {
        return Err(CliError::failed(
            "bench --via nbd",
            format!("the runner failed ({status}); its message is above"),
        ));
    }
    if args.output == OutputFormat::Json {
        let rows = std::fs::read_to_string(&rows_path)
            .map_err(crate::error::io("bench: reading the NBD rows"))?;
        print!("{rows}");
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
