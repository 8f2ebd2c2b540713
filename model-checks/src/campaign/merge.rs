//! Merging the records of a campaign's shards into the record of the whole
//! campaign.
//!
//! Records merge only when they describe the same campaign (equal
//! [`CampaignIdentity`]), split the same way (equal shard count), cover
//! disjoint shards, and together cover every shard: a partial or doubled
//! total would silently misstate what was explored.

use std::collections::BTreeMap;
use std::time::Duration;

use super::record::{CampaignRecord, ShardSet};
use super::run::summarize;
use super::shard::Shard;
use crate::summary::TargetSummary;

/// Why records do not merge; each names the records (by the name given
/// with them, e.g. the file) and what differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// Nothing to merge.
    #[error("no summary to merge")]
    Empty,
    /// Two records describe different campaigns.
    #[error("{other} is not a shard of the same campaign as {first}: {field} is {other_value} there but {first_value} in {first}")]
    DifferentCampaign {
        /// The first record.
        first: String,
        /// The differing record.
        other: String,
        /// The field that differs.
        field: String,
        /// Its value in the first record.
        first_value: String,
        /// Its value in the other.
        other_value: String,
    },
    /// Two records split the campaign into different numbers of shards.
    #[error("{other} covers shards of {other_count} but {first} covers shards of {first_count}")]
    DifferentShardCount {
        /// The first record.
        first: String,
        /// Its shard count.
        first_count: u64,
        /// The differing record.
        other: String,
        /// Its shard count.
        other_count: u64,
    },
    /// A record's shard set is not valid on its own.
    #[error("{name}: {why}")]
    BadShards {
        /// The record.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A shard is covered twice.
    #[error("shard {index}/{count} appears in both {first} and {second}")]
    DuplicateShard {
        /// The shard index.
        index: u64,
        /// The shard count.
        count: u64,
        /// One record covering it.
        first: String,
        /// Another.
        second: String,
    },
    /// Shards no record covers.
    #[error("shards {missing} of {count} are missing (every shard 0..{count} is needed once)")]
    MissingShards {
        /// The missing indices, comma separated.
        missing: String,
        /// The shard count.
        count: u64,
    },
}

/// Most missing shard indices one error names.
const MISSING_NAMED_MAX: usize = 20;

/// Jobs of shard `index` of `count` in a campaign of `jobs` jobs.
fn shard_jobs(jobs: u64, index: u64, count: u64) -> u64 {
    Shard::new(index, count).map_or(0, |shard| shard.jobs(jobs).count() as u64)
}

fn identity_difference(
    first: &CampaignRecord,
    other: &CampaignRecord,
) -> Option<(String, String, String)> {
    let a = serde_json::to_value(&first.campaign).ok()?;
    let b = serde_json::to_value(&other.campaign).ok()?;
    let (a, b) = (a.as_object()?, b.as_object()?);
    a.iter().find_map(|(field, value)| {
        let theirs = b.get(field).cloned().unwrap_or(serde_json::Value::Null);
        (*value != theirs).then(|| (field.clone(), value.to_string(), theirs.to_string()))
    })
}

/// Checks one record's shard set against its campaign: indices valid,
/// ascending, and the jobs it reports equal to what those shards hold.
fn check_shards(name: &str, record: &CampaignRecord) -> Result<(), MergeError> {
    let bad = |why: String| MergeError::BadShards {
        name: name.to_string(),
        why,
    };
    let ShardSet { count, indices } = &record.shards;
    if *count == 0 || indices.is_empty() {
        return Err(bad("covers no shard".to_string()));
    }
    if let Some(index) = indices.iter().find(|&&i| i >= *count) {
        return Err(bad(format!(
            "shard index {index} is not below its count {count}"
        )));
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad(format!(
            "shard indices {indices:?} are not ascending and distinct"
        )));
    }
    let jobs: u64 = indices
        .iter()
        .map(|&i| shard_jobs(record.campaign.jobs, i, *count))
        .sum();
    let reported = record.jobs_run.saturating_add(record.jobs_skipped);
    if reported != jobs {
        return Err(bad(format!(
            "reports {reported} jobs run or skipped, but its shards hold {jobs} of the campaign's {}",
            record.campaign.jobs
        )));
    }
    Ok(())
}

/// Merges `records` (each with a name for messages, e.g. its file) into
/// the record of the whole campaign. Findings come in shard order.
pub fn merge_records(records: &[(String, CampaignRecord)]) -> Result<CampaignRecord, MergeError> {
    let (first_name, first) = records.first().ok_or(MergeError::Empty)?;
    let count = first.shards.count;
    // Which record covers each shard.
    let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
    for (position, (name, record)) in records.iter().enumerate() {
        if let Some((field, first_value, other_value)) = identity_difference(first, record) {
            return Err(MergeError::DifferentCampaign {
                first: first_name.clone(),
                other: name.clone(),
                field,
                first_value,
                other_value,
            });
        }
        if record.shards.count != count {
            return Err(MergeError::DifferentShardCount {
                first: first_name.clone(),
                first_count: count,
                other: name.clone(),
                other_count: record.shards.count,
            });
        }
        check_shards(name, record)?;
        for &index in &record.shards.indices {
            if let Some(&earlier) = owner.get(&index) {
                return Err(MergeError::DuplicateShard {
                    index,
                    count,
                    first: records[earlier].0.clone(),
                    second: name.clone(),
                });
            }
            owner.insert(index, position);
        }
    }
    if owner.len() as u64 != count {
        // Name the first few missing shards: the count may be large.
        let missing: Vec<String> = (0..count)
            .filter(|i| !owner.contains_key(i))
            .take(MISSING_NAMED_MAX)
            .map(|i| i.to_string())
            .collect();
        let more = count - owner.len() as u64 - missing.len() as u64;
        let mut missing = missing.join(", ");
        if more > 0 {
            missing.push_str(&format!(" and {more} more"));
        }
        return Err(MergeError::MissingShards { missing, count });
    }
    let mut ordered: Vec<&CampaignRecord> = records.iter().map(|(_, r)| r).collect();
    ordered.sort_by_key(|r| r.shards.indices[0]);
    let rows: Vec<TargetSummary> = ordered
        .iter()
        .flat_map(|r| r.targets.iter().map(|row| row.to_summary()))
        .collect();
    let summary = summarize(&first.campaign.targets, &rows);
    let elapsed_s = ordered.iter().map(|r| r.elapsed_s).fold(0.0, f64::max);
    Ok(CampaignRecord::from_parts(
        first.campaign.clone(),
        ShardSet {
            count,
            indices: (0..count).collect(),
        },
        ordered.iter().map(|r| r.jobs_run).sum(),
        ordered.iter().map(|r| r.jobs_skipped).sum(),
        &summary,
        ordered
            .iter()
            .flat_map(|r| r.findings.iter().cloned())
            .collect(),
        Duration::try_from_secs_f64(elapsed_s).unwrap_or_default(),
    ))
}
