//! `qj crash replay LOG --base IMAGE`: the crash states of a dm-log-writes
//! log of a qcow2 image file, written by qj (`qj io --log-writes`) or by
//! QEMU (`blklogwrites`), judged by one checker
//! (`qj_model_checks::log_replay`). The base image is the image as it was
//! when the log began; it is read, never written.
//!
//! Exit status: 0 no state failed a check, 1 a state did (or the replay
//! failed), 2 bad usage or a malformed log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use qj_model_checks::log_replay::reader::{read_log, LogReadError, LOG_BYTES_MAX};
use qj_model_checks::log_replay::states::StateBudget;
use qj_model_checks::log_replay::{
    prepare, replay, state_image, ReplayConfig, ReplayError, ReplayReport,
};
use qj_model_checks::{qemu_img_available, EXHAUSTIVE_UNITS_DEFAULT};
use serde::Serialize;

use crate::error::{quoted, CliError, CliResult, EXIT_FAILED};
use crate::output::{to_json, OutputFormat};

/// Largest base image read (it is held in memory with the states).
const BASE_BYTES_MAX: u64 = LOG_BYTES_MAX;

/// Arguments of `qj crash replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The dm-log-writes log.
    log: PathBuf,
    /// The qcow2 image as it was when the log began (read only).
    #[arg(long, value_name = "IMAGE")]
    base: PathBuf,
    /// Up to this many writes between two flushes, every subset of them is
    /// a state; beyond, seeded samples.
    #[arg(long, value_name = "N", default_value_t = EXHAUSTIVE_UNITS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    exhaustive_writes: u32,
    /// Sampled states per flush interval beyond the exhaustive bound.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(2..=100_000))]
    samples: u64,
    /// Torn-write states per flush interval.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    torn: u64,
    /// Check every flush prefix and one other state in N with qemu-img
    /// (0: never).
    #[arg(long, value_name = "N", default_value_t = 16)]
    qemu_every: u64,
    /// Seeds the sampled and torn states.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Judge only this state (the number a finding names).
    #[arg(long, value_name = "N")]
    state: Option<u64>,
    /// Write the image of --state (before recovery) to this file.
    #[arg(long, value_name = "FILE", requires = "state")]
    write_image: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

#[derive(Serialize)]
struct JsonFinding {
    state: u64,
    check: String,
    state_description: String,
    detail: String,
    reproducer: String,
}

#[derive(Serialize)]
struct JsonReport {
    log: String,
    base: String,
    writer: &'static str,
    view_reader: &'static str,
    entries: u64,
    flushes: u64,
    marks: u64,
    epochs: u64,
    views: u64,
    states: u64,
    corruptions: u64,
    leak_states: u64,
    leaked_clusters_max: u64,
    leaked_bytes_max: u64,
    qemu_checked: u64,
    seconds: f64,
    findings: Vec<JsonFinding>,
}

fn reproducer(args: &ReplayArgs, state: u64) -> String {
    format!(
        "qj crash replay {} --base {} --seed {} --state {state}",
        args.log.display(),
        args.base.display(),
        args.seed
    )
}

fn read_base(path: &Path) -> CliResult<Vec<u8>> {
    let io = |source| CliError::Io {
        what: format!("crash replay: reading the base image {}", quoted(path)),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > BASE_BYTES_MAX {
        return Err(CliError::failed(
            format!("crash replay: {}", quoted(path)),
            format!("{len} bytes, more than the {BASE_BYTES_MAX} a replay holds in memory"),
        ));
    }
    std::fs::read(path).map_err(io)
}

fn print_human(args: &ReplayArgs, report: &ReplayReport, seconds: f64) {
    println!(
        "log {} (written by {}: {} entries, {} flushes, {} marks), base {}",
        quoted(&args.log),
        report.writer,
        report.entries,
        report.flushes,
        report.marks,
        quoted(&args.base)
    );
    println!(
        "states: {} in {} flush intervals; {} guest views read by {}; {} checked by qemu-img; {seconds:.1} s ({:.0} states/s)",
        report.states,
        report.epochs,
        report.views,
        report.view_reader,
        report.qemu_checked,
        report.states as f64 / seconds.max(1e-9)
    );
    println!("corruptions: {} states", report.corrupt_states);
    println!(
        "leaks: {} states, largest {} clusters ({} bytes)",
        report.leak_states, report.leaked_clusters_max, report.leaked_bytes_max
    );
    for finding in &report.findings {
        println!(
            "state {} [{}]: {}: {}",
            finding.state, finding.kind, finding.state_description, finding.detail
        );
        println!("  reproduce: {}", reproducer(args, finding.state));
    }
}

/// Runs `qj crash replay`.
pub fn run(args: ReplayArgs) -> CliResult<u8> {
    let base = read_base(&args.base)?;
    let log = read_log(&args.log, base.len() as u64).map_err(|e| match e {
        LogReadError::Format(format) => {
            CliError::Usage(format!("crash replay: {}: {format}", quoted(&args.log)))
        }
        other => CliError::failed("crash replay", other.to_string()),
    })?;
    let needs_qemu = args.qemu_every > 0 || !log.has_marks();
    if needs_qemu && !qemu_img_available() {
        return Err(CliError::failed(
            "crash replay",
            "qemu-img is not installed: it reads the guest views of QEMU's logs and checks a sample of states (--qemu-every 0 skips the sample)",
        ));
    }
    let config = ReplayConfig {
        budget: StateBudget {
            exhaustive_writes: args.exhaustive_writes,
            sampled_states: args.samples,
            torn_states_max: args.torn,
            seed: args.seed,
        },
        qemu_every: args.qemu_every,
        only_state: args.state,
        ..ReplayConfig::default()
    };
    let failed = |e: ReplayError| match e {
        ReplayError::NoSuchState { .. } => CliError::Usage(format!("crash replay: {e}")),
        other => CliError::failed("crash replay", other.to_string()),
    };
    let started = Instant::now();
    let prepared = prepare(&log, &base, &config.budget).map_err(failed)?;
    if let (Some(state), Some(path)) = (args.state, &args.write_image) {
        let image = state_image(&prepared, state).map_err(failed)?;
        std::fs::write(path, image).map_err(|source| CliError::Io {
            what: format!("crash replay: writing {}", quoted(path)),
            source,
        })?;
    }
    let report = replay(&log, &prepared, &config).map_err(failed)?;
    let seconds = started.elapsed().as_secs_f64();
    match args.output {
        OutputFormat::Human => print_human(&args, &report, seconds),
        OutputFormat::Json => {
            let json = JsonReport {
                log: args.log.display().to_string(),
                base: args.base.display().to_string(),
                writer: report.writer,
                view_reader: report.view_reader,
                entries: report.entries,
                flushes: report.flushes,
                marks: report.marks,
                epochs: report.epochs,
                views: report.views,
                states: report.states,
                corruptions: report.corrupt_states,
                leak_states: report.leak_states,
                leaked_clusters_max: report.leaked_clusters_max,
                leaked_bytes_max: report.leaked_bytes_max,
                qemu_checked: report.qemu_checked,
                seconds,
                findings: report
                    .findings
                    .iter()
                    .map(|f| JsonFinding {
                        state: f.state,
                        check: f.kind.to_string(),
                        state_description: f.state_description.clone(),
                        detail: f.detail.clone(),
                        reproducer: reproducer(&args, f.state),
                    })
                    .collect(),
            };
            println!("{}", to_json(&json)?);
        }
    }
    Ok(if report.corrupt_states > 0 {
        EXIT_FAILED
    } else {
        0
    })
}
