//! The plan of a campaign and its jobs.

use std::sync::Arc;

use crate::config::ExploreConfig;
use crate::engine_target::crash_target;
use crate::error::HarnessError;
use crate::target::CrashTarget;
use crate::workload::{Workload, WorkloadConfig};

/// Most jobs one campaign may plan (seeds x targets x presets x backing).
pub const JOB_COUNT_MAX: u64 = 10_000_000;

/// One backend to explore, with its injected bug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignTarget {
    /// Backend name (one of [`crate::BACKENDS`]).
    pub backend: &'static str,
    /// Mutation of that backend, if any.
    pub mutation: Option<&'static str>,
}

impl CampaignTarget {
    /// The label the harness gives this target in its summary rows.
    #[must_use]
    pub fn label(&self) -> String {
        match self.mutation {
            Some(m) => format!("{}+{m}", self.backend),
            None => self.backend.to_string(),
        }
    }
}

/// Everything a job needs besides its coordinates.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Targets, in summary-row order.
    pub targets: Vec<CampaignTarget>,
    /// Workload presets (names of [`crate::WORKLOAD_NAMES`]).
    pub workloads: Vec<&'static str>,
    /// Backing file variants (false: none).
    pub backings: Vec<bool>,
    /// The first workload seed; seeds wrap at `u64::MAX`.
    pub seed_first: u64,
    /// Seeds per (target, preset, backing).
    pub seeds: u64,
    /// An explicit operation list instead of generated workloads.
    pub ops: Option<Workload>,
    /// Guest threads of each workload.
    pub threads: u32,
    /// Cluster granularity of generated workloads, if not the preset's.
    pub cluster_bytes: Option<u64>,
    /// Primary crash states per job.
    pub states_budget: u64,
    /// One checked image in this many also goes to `qemu-img` (0: never).
    pub qemu_every: u64,
    /// Shrink each target's first violation.
    pub shrink: bool,
}

/// One exploration job: one seeded workload of one preset on one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The target.
    pub target: CampaignTarget,
    /// The workload preset.
    pub workload: &'static str,
    /// With a backing file.
    pub backing: bool,
    /// The workload seed.
    pub seed: u64,
}

impl Campaign {
    /// The number of jobs, or a configuration error when it exceeds
    /// [`JOB_COUNT_MAX`] or a dimension is empty.
    pub fn job_count(&self) -> Result<u64, HarnessError> {
        let dimensions = [
            self.seeds,
            self.targets.len() as u64,
            self.workloads.len() as u64,
            self.backings.len() as u64,
        ];
        if dimensions.contains(&0) {
            return Err(HarnessError::Config(
                "a campaign needs at least one seed, target, workload preset and backing variant"
                    .to_string(),
            ));
        }
        dimensions
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
            .filter(|&n| n <= JOB_COUNT_MAX)
            .ok_or_else(|| {
                HarnessError::Config(format!(
                    "more than {JOB_COUNT_MAX} jobs (workloads x backends x presets x backing variants); lower --workloads"
                ))
            })
    }

    /// Job `index` (below [`Campaign::job_count`]): the backing variant
    /// varies fastest, then the preset, then the target, then the seed.
    /// `None` past the last job.
    #[must_use]
    pub fn job(&self, index: u64) -> Option<Job> {
        let backings = self.backings.len() as u64;
        let workloads = self.workloads.len() as u64;
        let targets = self.targets.len() as u64;
        if backings == 0 || workloads == 0 || targets == 0 {
            return None;
        }
        let backing = self.backings[(index % backings) as usize];
        let rest = index / backings;
        let workload = self.workloads[(rest % workloads) as usize];
        let rest = rest / workloads;
        let target = self.targets[(rest % targets) as usize].clone();
        let seed_index = rest / targets;
        (seed_index < self.seeds).then(|| Job {
            target,
            workload,
            backing,
            seed: self.seed_first.wrapping_add(seed_index),
        })
    }

    /// The exploration settings of `job`.
    pub fn config(&self, job: &Job) -> Result<ExploreConfig, HarnessError> {
        let mut workload = WorkloadConfig::preset(job.workload)?;
        workload.threads = self.threads;
        workload.backing = job.backing;
        if let Some(cluster_bytes) = self.cluster_bytes {
            workload.cluster_bytes = cluster_bytes;
        }
        let mut config = ExploreConfig::new(workload);
        config.seed = job.seed;
        config.workloads = 1;
        config.ops = self.ops.clone();
        config.states_budget = self.states_budget;
        config.qemu_every = self.qemu_every;
        config.shrink = self.shrink;
        Ok(config)
    }

    /// A fresh target for `job`.
    pub fn target(&self, job: &Job) -> Result<Arc<dyn CrashTarget>, HarnessError> {
        Ok(crash_target(job.target.backend, job.target.mutation)?)
    }

    /// Checks the settings every job shares, so that a bad one is reported
    /// once, before any work, rather than by every job.
    pub fn validate(&self) -> Result<(), HarnessError> {
        self.job_count()?;
        let first = self
            .job(0)
            .ok_or_else(|| HarnessError::Config("the campaign has no job".to_string()))?;
        self.config(&first)?.validate()
    }

    /// Flags a reproducer line needs beyond what the harness writes:
    /// settings that are not the defaults and change which states exist.
    /// `qemu_every_given`: the rate was chosen explicitly (which images
    /// `qemu-img` checks depends on it).
    #[must_use]
    pub fn reproducer_extra(&self, qemu_every_given: bool) -> String {
        let mut extra = String::new();
        if let Some(bytes) = self.cluster_bytes {
            extra.push_str(&format!(" --cluster-size {bytes}"));
        }
        if qemu_every_given {
            extra.push_str(&format!(" --qemu-every {}", self.qemu_every));
        }
        extra
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{ENGINE_BACKENDS, WORKLOAD_NAMES};

    pub(crate) fn campaign(seeds: u64, backings: Vec<bool>) -> Campaign {
        Campaign {
            targets: ENGINE_BACKENDS
                .iter()
                .map(|&backend| CampaignTarget {
                    backend,
                    mutation: None,
                })
                .collect(),
            workloads: WORKLOAD_NAMES.to_vec(),
            backings,
            seed_first: u64::MAX - 1,
            seeds,
            ops: None,
            threads: 1,
            cluster_bytes: None,
            states_budget: 10,
            qemu_every: 0,
            shrink: false,
        }
    }

    #[test]
    fn jobs_cover_every_combination_once_with_backing_varying_fastest() {
        let plan = campaign(3, vec![false, true]);
        let count = plan.job_count().unwrap();
        let expected = 3 * ENGINE_BACKENDS.len() * WORKLOAD_NAMES.len() * 2;
        assert_eq!(count, expected as u64);
        let jobs: Vec<Job> = (0..count).map(|i| plan.job(i).unwrap()).collect();
        assert_eq!(plan.job(count), None);
        let distinct: BTreeSet<(u64, &str, &str, bool)> = jobs
            .iter()
            .map(|j| (j.seed, j.target.backend, j.workload, j.backing))
            .collect();
        assert_eq!(distinct.len(), expected);
        assert_eq!((jobs[0].backing, jobs[1].backing), (false, true));
        assert_eq!(jobs[0].workload, jobs[1].workload);
        assert_eq!(jobs[2].workload, WORKLOAD_NAMES[1]);
        // Seeds wrap instead of overflowing.
        let seeds: BTreeSet<u64> = jobs.iter().map(|j| j.seed).collect();
        assert_eq!(
            seeds.into_iter().collect::<Vec<_>>(),
            vec![0, u64::MAX - 1, u64::MAX]
        );
    }

    #[test]
    fn too_many_or_no_jobs_is_a_configuration_error_not_an_overflow() {
        let mut plan = campaign(u64::MAX, vec![false, true]);
        assert!(matches!(plan.job_count(), Err(HarnessError::Config(_))));
        plan.seeds = JOB_COUNT_MAX;
        assert!(matches!(plan.job_count(), Err(HarnessError::Config(_))));
        plan.seeds = 1;
        plan.backings.clear();
        assert!(matches!(plan.job_count(), Err(HarnessError::Config(_))));
        assert_eq!(plan.job(0), None);
    }

    #[test]
    fn extra_reproducer_flags_name_the_settings_that_change_states() {
        let mut plan = campaign(1, vec![false]);
        assert_eq!(plan.reproducer_extra(false), "");
        plan.cluster_bytes = Some(8192);
        plan.qemu_every = 0;
        assert_eq!(
            plan.reproducer_extra(true),
            " --cluster-size 8192 --qemu-every 0"
        );
    }
}
