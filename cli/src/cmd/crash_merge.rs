//! `qj crash merge`: joins the `--output json` summaries of a sharded
//! `qj crash` run into the summary of the whole run.
//!
//! The summaries must be of the same run (same settings and harness
//! version), split into the same number of shards, each shard present
//! exactly once. Exit status: 0 merged without violation, 1 merged with a
//! violation (or a file could not be read), 2 summaries that do not merge.

use std::path::PathBuf;

use qj_model_checks::campaign::{merge_records, CampaignRecord};

use crate::cmd::crash_output::print_record;
use crate::error::{quoted, CliError, CliResult, EXIT_FAILED};
use crate::output::OutputFormat;

/// Most summaries one merge reads: a bound on what it holds in memory.
const SUMMARIES_MAX: usize = 100_000;

/// Arguments of `qj crash merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The shards' summaries (`qj crash --shard K/N --output json`).
    #[arg(value_name = "SUMMARY.json", required = true)]
    summaries: Vec<PathBuf>,
    /// Output format of the merged summary.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

fn read_record(path: &PathBuf) -> CliResult<(String, CampaignRecord)> {
    let name = quoted(path);
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        what: format!("crash merge: reading {name}"),
        source,
    })?;
    let record: CampaignRecord = serde_json::from_str(&text).map_err(|e| {
        CliError::Usage(format!(
            "crash merge: {name} is not a `qj crash --output json` summary: {e}"
        ))
    })?;
    Ok((name, record))
}

/// Runs `qj crash merge`.
pub fn run(args: MergeArgs) -> CliResult<u8> {
    if args.summaries.len() > SUMMARIES_MAX {
        return Err(CliError::Usage(format!(
            "crash merge: {} summaries; at most {SUMMARIES_MAX}",
            args.summaries.len()
        )));
    }
    let records = args
        .summaries
        .iter()
        .map(read_record)
        .collect::<CliResult<Vec<_>>>()?;
    let merged =
        merge_records(&records).map_err(|e| CliError::Usage(format!("crash merge: {e}")))?;
    print_record(args.output, &merged)?;
    Ok(if merged.violations > 0 {
        EXIT_FAILED
    } else {
        0
    })
}
