//! Shards: deterministic, disjoint slices of a campaign's jobs whose union
//! is the whole campaign.
//!
//! Shard `K` of `N` (0-based) runs the jobs whose index is `K` modulo `N`:
//! consecutive jobs differ in backing variant, preset and target, so every
//! shard gets a similar mix and similar run time. The assignment depends
//! only on the job index, never on timing, so shards can run anywhere, in
//! any order, and [`crate::campaign::merge_records`] joins them.
//!
//! Cluster schedulers start the shards; the index comes from the command
//! line (`--shard K/N`) or from the scheduler's environment:
//!
//! - Kubernetes indexed Job: `JOB_COMPLETION_INDEX` (0-based). Kubernetes
//!   does not export the completion count, so `N` must be given
//!   (`--shards N`, the Job's `completions`).
//! - Slurm job array: `SLURM_ARRAY_TASK_ID`, made 0-based by subtracting
//!   `SLURM_ARRAY_TASK_MIN`; `N` is `SLURM_ARRAY_TASK_COUNT` unless
//!   `--shards N` is given. Arrays with a step (`--array=0-9:2`) are
//!   refused: their task ids do not number the shards densely.

use std::fmt;
use std::str::FromStr;

use super::plan::JOB_COUNT_MAX;

/// How the environment names a shard, for error messages and `--help`.
pub const SHARDS_ENV_HELP: &str = "JOB_COMPLETION_INDEX (Kubernetes indexed Job, with --shards N) \
     or SLURM_ARRAY_TASK_ID (Slurm array, N from SLURM_ARRAY_TASK_COUNT or --shards N)";

const K8S_INDEX: &str = "JOB_COMPLETION_INDEX";
const SLURM_ID: &str = "SLURM_ARRAY_TASK_ID";
const SLURM_MIN: &str = "SLURM_ARRAY_TASK_MIN";
const SLURM_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
const SLURM_STEP: &str = "SLURM_ARRAY_TASK_STEP";

/// A bad shard specification; the message names the flag or variable and
/// what is valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShardError(pub String);

/// Shard `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard {
    index: u64,
    count: u64,
}

impl Shard {
    /// The whole campaign as one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`: `count` in `1..=`[`JOB_COUNT_MAX`],
    /// `index` below it.
    pub fn new(index: u64, count: u64) -> Result<Self, ShardError> {
        if count == 0 || count > JOB_COUNT_MAX {
            return Err(ShardError(format!(
                "shard count {count} is not in 1..={JOB_COUNT_MAX}"
            )));
        }
        if index >= count {
            return Err(ShardError(format!(
                "shard index {index} is not below the shard count {count} (indices are 0-based: 0..={})",
                count - 1
            )));
        }
        Ok(Self { index, count })
    }

    /// The 0-based index.
    #[must_use]
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The number of shards.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether job `job_index` belongs to this shard.
    #[must_use]
    pub fn owns(&self, job_index: u64) -> bool {
        job_index % self.count == self.index
    }

    /// This shard's job indices among `job_count` jobs, in order.
    pub fn jobs(&self, job_count: u64) -> impl Iterator<Item = u64> {
        (self.index..job_count).step_by(usize::try_from(self.count).unwrap_or(usize::MAX))
    }

    /// Checks that a campaign of `job_count` jobs gives this shard at
    /// least one job: more shards than jobs is a misconfigured array.
    pub fn check_against(&self, job_count: u64) -> Result<(), ShardError> {
        if self.count > job_count {
            return Err(ShardError(format!(
                "{} shards but the campaign has only {job_count} jobs: use at most {job_count} shards",
                self.count
            )));
        }
        Ok(())
    }

    /// The shard a cluster scheduler gave this process, read through
    /// `var` (the environment, or a test's table). `count_given` is
    /// `--shards N`. `Ok(None)`: no scheduler variable is set, and no
    /// count was given either.
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        count_given: Option<u64>,
    ) -> Result<Option<Self>, ShardError> {
        let number = |name: &str| -> Result<Option<u64>, ShardError> {
            match var(name) {
                None => Ok(None),
                Some(text) => text.trim().parse::<u64>().map(Some).map_err(|_| {
                    ShardError(format!(
                        "environment variable {name}={text:?} is not a whole number"
                    ))
                }),
            }
        };
        if let Some(index) = number(K8S_INDEX)? {
            let count = count_given.ok_or_else(|| {
                ShardError(format!(
                    "{K8S_INDEX}={index} names a shard but not the shard count: pass --shards N (the indexed Job's completions)"
                ))
            })?;
            return Self::new(index, count).map(Some).map_err(|e| {
                ShardError(format!("{K8S_INDEX}={index} with --shards {count}: {e}"))
            });
        }
        if let Some(id) = number(SLURM_ID)? {
            if let Some(step) = number(SLURM_STEP)?.filter(|&s| s != 1) {
                return Err(ShardError(format!(
                    "{SLURM_STEP}={step}: a Slurm array with a step does not number shards densely; use --array=0-{{N-1}} or --shard K/N"
                )));
            }
            let min = number(SLURM_MIN)?.unwrap_or(0);
            let index = id
                .checked_sub(min)
                .ok_or_else(|| ShardError(format!("{SLURM_ID}={id} is below {SLURM_MIN}={min}")))?;
            let count = match count_given {
                Some(count) => count,
                None => number(SLURM_COUNT)?.ok_or_else(|| {
                    ShardError(format!(
                        "{SLURM_ID}={id} names a shard but {SLURM_COUNT} is not set: pass --shards N"
                    ))
                })?,
            };
            return Self::new(index, count)
                .map(Some)
                .map_err(|e| ShardError(format!("{SLURM_ID}={id} (shard {index}): {e}")));
        }
        match count_given {
            None => Ok(None),
            Some(count) => Err(ShardError(format!(
                "--shards {count} needs a shard index: --shard K/{count}, or {SHARDS_ENV_HELP}"
            ))),
        }
    }
}

impl fmt::Display for Shard {
    /// `K/N`, the form `--shard` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    /// Parses `K/N` (0-based `K` below `N`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ShardError(format!(
                "--shard {text:?}: {why} (valid: K/N with 0 <= K < N, e.g. 0/4)"
            ))
        };
        let (index, count) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let index: u64 = index.parse().map_err(|_| bad("K is not a whole number"))?;
        let count: u64 = count.parse().map_err(|_| bad("N is not a whole number"))?;
        Self::new(index, count).map_err(|e| bad(&e.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn shards_are_disjoint_and_cover_every_job() {
        for count in 1..=7u64 {
            let mut seen = vec![0u32; 23];
            for index in 0..count {
                let shard = Shard::new(index, count).unwrap();
                for job in shard.jobs(23) {
                    assert!(shard.owns(job));
                    seen[job as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{count}: {seen:?}");
        }
    }

    #[test]
    fn parsing_accepts_k_of_n_and_names_what_is_wrong() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard::new(2, 4).unwrap());
        assert_eq!("0/1".parse::<Shard>().unwrap(), Shard::WHOLE);
        assert_eq!(Shard::new(2, 4).unwrap().to_string(), "2/4");
        for (text, want) in [
            ("4/4", "not below the shard count 4"),
            ("1/0", "not in 1..="),
            ("3", "no '/'"),
            ("x/4", "K is not a whole number"),
            ("1/-4", "N is not a whole number"),
            ("-1/4", "K is not a whole number"),
        ] {
            let error = text.parse::<Shard>().unwrap_err().to_string();
            assert!(error.contains(want), "{text}: {error}");
            assert!(error.contains("K/N"), "{text}: {error}");
        }
    }

    #[test]
    fn more_shards_than_jobs_is_refused() {
        let shard = Shard::new(0, 9).unwrap();
        assert!(shard.check_against(9).is_ok());
        let error = shard.check_against(8).unwrap_err().to_string();
        assert!(error.contains("at most 8 shards"), "{error}");
    }

    #[test]
    fn kubernetes_index_needs_the_count_from_the_flag() {
        let vars = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            Shard::from_env(&vars, Some(5)).unwrap(),
            Some(Shard::new(3, 5).unwrap())
        );
        let error = Shard::from_env(&vars, None).unwrap_err().to_string();
        assert!(error.contains("--shards N"), "{error}");
        let error = Shard::from_env(&vars, Some(3)).unwrap_err().to_string();
        assert!(error.contains("JOB_COMPLETION_INDEX=3"), "{error}");
        let error = Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "two")]), Some(3))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a whole number"), "{error}");
    }

    #[test]
    fn slurm_ids_are_made_zero_based_and_counted_by_the_array() {
        let vars = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            Shard::from_env(&vars, None).unwrap(),
            Some(Shard::new(1, 3).unwrap())
        );
        assert_eq!(
            Shard::from_env(&vars, Some(2)).unwrap(),
            Some(Shard::new(1, 2).unwrap())
        );
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        let error = Shard::from_env(stepped, None).unwrap_err().to_string();
        assert!(error.contains("SLURM_ARRAY_TASK_STEP=2"), "{error}");
        let uncounted = env(&[("SLURM_ARRAY_TASK_ID", "0")]);
        let error = Shard::from_env(uncounted, None).unwrap_err().to_string();
        assert!(error.contains("SLURM_ARRAY_TASK_COUNT"), "{error}");
    }

    #[test]
    fn no_scheduler_means_no_shard_unless_a_count_was_given() {
        assert_eq!(Shard::from_env(env(&[]), None).unwrap(), None);
        let error = Shard::from_env(env(&[]), Some(4)).unwrap_err().to_string();
        assert!(error.contains("--shard K/4"), "{error}");
    }
}
