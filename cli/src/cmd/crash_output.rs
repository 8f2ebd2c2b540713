//! Printing a `qj crash` summary (a run, a shard or merged shards): the
//! findings with their reproducer lines and the table, or one JSON
//! document that `qj crash merge` reads back.

use qj_model_checks::campaign::{CampaignRecord, FindingRecord};

use crate::error::CliResult;
use crate::output::{to_json, OutputFormat};

/// A finding as printed: what failed, where, and the one-line reproducer
/// (and the shrunk one).
fn finding_text(finding: &FindingRecord) -> String {
    let mut text = format!(
        "violation {} at {}: {}\n  reproduce ({} ops): {}",
        finding.check, finding.at, finding.detail, finding.ops, finding.reproduce
    );
    if let Some(shrunk) = &finding.shrunk {
        text.push_str(&format!(
            "\n  shrunk to {} ops: {}\n  reproduce shrunk: {}",
            shrunk.ops, shrunk.detail, shrunk.reproduce
        ));
    }
    text
}

/// Prints `record` in `format`. The human form ends with the line
/// `crash: N states explored, M violations`; a record of part of a
/// sharded run says which shards before the table.
pub fn print_record(format: OutputFormat, record: &CampaignRecord) -> CliResult<()> {
    match format {
        OutputFormat::Json => println!("{}", to_json(record)?),
        OutputFormat::Human => {
            for finding in &record.findings {
                println!("{}", finding_text(finding));
            }
            let shards = &record.shards;
            if shards.count > 1 {
                let covered: Vec<String> = shards.indices.iter().map(u64::to_string).collect();
                println!(
                    "crash: shards {} of {} ({} of {} jobs run, {} skipped)",
                    covered.join(","),
                    shards.count,
                    record.jobs_run,
                    record.campaign.jobs,
                    record.jobs_skipped
                );
            }
            print!("{}", record.summary());
            println!(
                "crash: {} states explored, {} violations",
                record.states_explored, record.violations
            );
        }
    }
    Ok(())
}
