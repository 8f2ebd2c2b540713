//! Campaigns: many explorations planned as jobs, run on a pool of threads,
//! split into shards for separate machines, and merged into one summary.
//!
//! A campaign is the cross product of workload seeds, targets (backend and
//! mutation), workload presets and backing variants; each element is a job
//! that runs [`crate::explore`] on one seeded workload. Jobs are numbered
//! so that the backing variant varies fastest, then the preset, then the
//! target, then the seed: every kind of image is explored early, and a
//! target's early stop (its first violation) has seen them all.
//!
//! - [`Campaign`]: the plan and its jobs ([`Job`]).
//! - [`Shard`]: which jobs one machine runs (`K/N`, or from a Kubernetes
//!   indexed Job or a Slurm array's environment). The distribution itself
//!   is the cluster scheduler's business: each shard is an independent
//!   process, and [`merge_records`] joins their summaries afterwards.
//! - [`run_campaign`]: runs a shard's jobs on N threads with progress
//!   reports.
//! - [`CampaignRecord`]: the JSON summary of a run (or of merged shards).

mod merge;
mod plan;
mod record;
mod run;
mod shard;

pub use merge::{merge_records, MergeError};
pub use plan::{Campaign, CampaignTarget, Job, JOB_COUNT_MAX};
pub use record::{CampaignIdentity, CampaignRecord, FindingRecord, RowRecord, ShardSet};
pub use run::{run_campaign, CampaignProgress, CampaignResult, JobProgress, JOBS_MAX};
pub use shard::{Shard, ShardError, SHARDS_ENV_HELP};
