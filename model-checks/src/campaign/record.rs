//! The JSON summary of a campaign run: what was planned (so that shards of
//! one campaign can be recognised and merged), which shards it covers, the
//! per-target counts and the findings with their reproducer lines.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::plan::Campaign;
use super::run::CampaignResult;
use crate::summary::{Summary, TargetSummary};
use crate::violation::Violation;

/// Everything that decides which jobs a campaign runs and what they
/// explore. Shards merge only when their identities are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignIdentity {
    /// Version of the harness that ran (a different harness may explore
    /// different states for the same settings).
    pub harness_version: String,
    /// Target labels, in row order.
    pub targets: Vec<String>,
    /// Workload presets.
    pub workloads: Vec<String>,
    /// Backing file variants.
    pub backings: Vec<bool>,
    /// First workload seed.
    pub seed_first: u64,
    /// Seeds per (target, preset, backing).
    pub seeds: u64,
    /// The explicit operation list, if any.
    pub ops: Option<String>,
    /// Guest threads per workload.
    pub threads: u32,
    /// Cluster granularity of generated workloads, if not the preset's.
    pub cluster_bytes: Option<u64>,
    /// Primary crash states per job.
    pub states_budget: u64,
    /// The `qemu-img` sampling rate (0: never).
    pub qemu_every: u64,
    /// Whether first violations are shrunk.
    pub shrink: bool,
    /// Jobs of the whole campaign (all shards).
    pub jobs: u64,
}

impl CampaignIdentity {
    /// The identity of `campaign`; `jobs` is its job count.
    #[must_use]
    pub fn new(campaign: &Campaign, jobs: u64) -> Self {
        Self {
            harness_version: env!("CARGO_PKG_VERSION").to_string(),
            targets: campaign.targets.iter().map(|t| t.label()).collect(),
            workloads: campaign.workloads.iter().map(|w| w.to_string()).collect(),
            backings: campaign.backings.clone(),
            seed_first: campaign.seed_first,
            seeds: campaign.seeds,
            ops: campaign.ops.as_ref().map(ToString::to_string),
            threads: campaign.threads,
            cluster_bytes: campaign.cluster_bytes,
            states_budget: campaign.states_budget,
            qemu_every: campaign.qemu_every,
            shrink: campaign.shrink,
            jobs,
        }
    }
}

/// The shards a record covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSet {
    /// Shards of the campaign.
    pub count: u64,
    /// The shard indices covered, ascending.
    pub indices: Vec<u64>,
}

impl ShardSet {
    /// Whether every shard of the campaign is covered.
    #[must_use]
    pub fn complete(&self) -> bool {
        self.indices.len() as u64 == self.count
    }
}

/// One target's counts (the fields of [`TargetSummary`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)] // Each field is the TargetSummary field of the same name.
pub struct RowRecord {
    pub target: String,
    pub workloads: u64,
    pub crash_points: u64,
    pub exhaustive_points: u64,
    pub states_explored: u64,
    pub recovery_crash_states: u64,
    pub continuation_states: u64,
    pub violations: u64,
    pub states_with_leaks: u64,
    pub leaked_clusters: u64,
    pub leaked_clusters_max: u64,
    pub qemu_checks: u64,
    pub unrecovered_checks: u64,
    /// Exploration time summed over the target's jobs.
    pub elapsed_s: f64,
    /// States per second of one exploration thread.
    pub states_per_s: f64,
}

impl RowRecord {
    /// The record of `row`.
    #[must_use]
    pub fn new(row: &TargetSummary) -> Self {
        Self {
            target: row.target.clone(),
            workloads: row.workloads,
            crash_points: row.crash_points,
            exhaustive_points: row.exhaustive_points,
            states_explored: row.states_explored,
            recovery_crash_states: row.recovery_crash_states,
            continuation_states: row.continuation_states,
            violations: row.violations,
            states_with_leaks: row.states_with_leaks,
            leaked_clusters: row.leaked_clusters,
            leaked_clusters_max: row.leaked_clusters_max,
            qemu_checks: row.qemu_checks,
            unrecovered_checks: row.unrecovered_checks,
            elapsed_s: row.elapsed.as_secs_f64(),
            states_per_s: row.states_per_second(),
        }
    }

    /// The row as a [`TargetSummary`] (for tables and merging).
    #[must_use]
    pub fn to_summary(&self) -> TargetSummary {
        TargetSummary {
            target: self.target.clone(),
            workloads: self.workloads,
            crash_points: self.crash_points,
            states_explored: self.states_explored,
            recovery_crash_states: self.recovery_crash_states,
            continuation_states: self.continuation_states,
            exhaustive_points: self.exhaustive_points,
            violations: self.violations,
            states_with_leaks: self.states_with_leaks,
            leaked_clusters: self.leaked_clusters,
            leaked_clusters_max: self.leaked_clusters_max,
            qemu_checks: self.qemu_checks,
            unrecovered_checks: self.unrecovered_checks,
            elapsed: Duration::try_from_secs_f64(self.elapsed_s).unwrap_or_default(),
        }
    }
}

/// A violation as reported: what failed, where, and how to rerun it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingRecord {
    /// The check that failed.
    pub check: String,
    /// The crash path (`K:S/...`).
    pub at: String,
    /// What exactly.
    pub detail: String,
    /// Operations of the workload that found it.
    pub ops: usize,
    /// The one-line reproducer.
    pub reproduce: String,
    /// The same violation on a shorter operation list.
    pub shrunk: Option<Box<FindingRecord>>,
}

impl FindingRecord {
    /// The record of `violation`; `extra` is appended to reproducer lines
    /// (see [`Campaign::reproducer_extra`]).
    #[must_use]
    pub fn new(violation: &Violation, extra: &str) -> Self {
        Self {
            check: violation.kind.to_string(),
            at: violation.reproducer.path.to_string(),
            detail: violation.detail.clone(),
            ops: violation.ops_len,
            reproduce: format!("{}{extra}", violation.reproducer),
            shrunk: violation
                .shrunk
                .as_ref()
                .map(|s| Box::new(Self::new(s, extra))),
        }
    }
}

/// The summary of a run (or of merged shards), as `--output json` prints
/// it and `qj crash merge` reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CampaignRecord {
    /// What was planned.
    pub campaign: CampaignIdentity,
    /// Which shards this record covers.
    pub shards: ShardSet,
    /// Jobs that ran.
    pub jobs_run: u64,
    /// Jobs skipped because their target already had a violation (in the
    /// same shard).
    pub jobs_skipped: u64,
    /// Crash states over all targets.
    pub states_explored: u64,
    /// Violations over all targets.
    pub violations: u64,
    /// Wall time; for merged shards, the longest shard's (shards run side
    /// by side).
    pub elapsed_s: f64,
    /// One row per target.
    pub targets: Vec<RowRecord>,
    /// Violations, in job order (shard order after a merge).
    pub findings: Vec<FindingRecord>,
}

impl CampaignRecord {
    /// The record of a shard's run of `campaign`.
    #[must_use]
    pub fn new(
        campaign: &Campaign,
        jobs: u64,
        result: &CampaignResult,
        extra: &str,
        elapsed: Duration,
    ) -> Self {
        let findings = result
            .reports
            .iter()
            .flat_map(|(_, report)| report.violations.iter())
            .map(|v| FindingRecord::new(v, extra))
            .collect();
        Self::from_parts(
            CampaignIdentity::new(campaign, jobs),
            ShardSet {
                count: result.shard.count(),
                indices: vec![result.shard.index()],
            },
            result.reports.len() as u64,
            result.jobs_skipped,
            &result.summary,
            findings,
            elapsed,
        )
    }

    /// A record from its parts; the totals are computed from `summary`.
    #[must_use]
    pub fn from_parts(
        campaign: CampaignIdentity,
        shards: ShardSet,
        jobs_run: u64,
        jobs_skipped: u64,
        summary: &Summary,
        findings: Vec<FindingRecord>,
        elapsed: Duration,
    ) -> Self {
        Self {
            campaign,
            shards,
            jobs_run,
            jobs_skipped,
            states_explored: summary.rows.iter().map(|r| r.states_explored).sum(),
            violations: summary.violations(),
            elapsed_s: elapsed.as_secs_f64(),
            targets: summary.rows.iter().map(RowRecord::new).collect(),
            findings,
        }
    }

    /// The rows as a summary table.
    #[must_use]
    pub fn summary(&self) -> Summary {
        Summary {
            rows: self.targets.iter().map(RowRecord::to_summary).collect(),
        }
    }
}
