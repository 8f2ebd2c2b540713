//! Running a shard of a campaign on a pool of threads.
//!
//! Jobs are handed out in index order from a shared counter; once a target
//! has a violation, its jobs not yet started are skipped (the first
//! violation is the one shrunk and reported), and a harness error stops
//! the pool. The reports come back in job order whatever the threads'
//! timing, so a run's summary is the same for any thread count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::plan::{Campaign, Job};
use super::shard::Shard;
use crate::error::HarnessError;
use crate::explore::{explore, ProgressFn, Report};
use crate::summary::{Progress, Summary, TargetSummary};

/// Most exploration threads of one run.
pub const JOBS_MAX: usize = 64;

/// Where one job stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Crash states checked so far.
    pub states_explored: u64,
    /// Planned primary states while the job runs; what it explored once it
    /// ended; 0 for a skipped job.
    pub states_expected: u64,
    /// Violations so far.
    pub violations: u64,
}

/// Receives progress of a running campaign (a progress bar).
pub trait CampaignProgress: Send + Sync {
    /// Called once before any job, with the number of job slots of this
    /// shard and the state budget each job starts out expecting.
    fn started(&self, job_slots: usize, states_budget: u64);
    /// Job slot `slot` (its position among this shard's jobs) moved.
    fn update(&self, slot: usize, job: JobProgress);
}

/// What a shard's run gave.
#[derive(Clone, Debug)]
pub struct CampaignResult {
    /// The shard that ran.
    pub shard: Shard,
    /// Jobs of this shard.
    pub jobs_planned: u64,
    /// Of those, jobs skipped because their target already had a
    /// violation.
    pub jobs_skipped: u64,
    /// Each job that ran, with its report, in job order.
    pub reports: Vec<(Job, Report)>,
    /// One row per target (see [`summarize`]).
    pub summary: Summary,
}

/// What one job gave.
enum JobOutcome {
    Done(Box<Report>),
    /// Its target already had a violation when its turn came.
    Skipped,
}

/// Runs the jobs of `shard` on `threads` threads (clamped to
/// `1..=`[`JOBS_MAX`] and to the number of jobs). The first harness error
/// in job order is returned; violations are findings in the reports.
pub fn run_campaign(
    campaign: &Campaign,
    shard: Shard,
    threads: usize,
    progress: Option<Arc<dyn CampaignProgress>>,
) -> Result<CampaignResult, HarnessError> {
    campaign.validate()?;
    let job_count = campaign.job_count()?;
    shard
        .check_against(job_count)
        .map_err(|e| HarnessError::Config(e.to_string()))?;
    let indices: Vec<u64> = shard.jobs(job_count).collect();
    let slots = indices.len();
    if let Some(progress) = &progress {
        progress.started(slots, campaign.states_budget);
    }
    let threads = threads.clamp(1, JOBS_MAX).min(slots.max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<JobOutcome, HarnessError>>>> =
        Mutex::new((0..slots).map(|_| None).collect());
    // Labels of targets with a violation: their later jobs are skipped.
    let caught: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let worker = || loop {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let slot = next.fetch_add(1, Ordering::Relaxed);
        let Some(&index) = indices.get(slot) else {
            return;
        };
        let outcome = match campaign.job(index) {
            None => Err(HarnessError::Config(format!(
                "job {index} is beyond the campaign"
            ))),
            Some(job) => {
                let label = job.target.label();
                let outcome = if caught.lock().contains(&label) {
                    if let Some(progress) = &progress {
                        progress.update(slot, JobProgress::default());
                    }
                    Ok(JobOutcome::Skipped)
                } else {
                    run_job(campaign, &job, slot, progress.as_ref())
                };
                if let Ok(JobOutcome::Done(report)) = &outcome {
                    if !report.violations.is_empty() {
                        caught.lock().push(label);
                    }
                }
                outcome
            }
        };
        if outcome.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        if let Some(entry) = results.lock().get_mut(slot) {
            *entry = Some(outcome);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(worker);
        }
    });
    let mut reports = Vec::with_capacity(slots);
    let mut jobs_skipped = 0u64;
    for (slot, entry) in results.into_inner().into_iter().enumerate() {
        match entry {
            Some(Ok(JobOutcome::Done(report))) => {
                if let Some(job) = campaign.job(indices[slot]) {
                    reports.push((job, *report));
                }
            }
            // The first failure in job order is the one reported.
            Some(Err(error)) => return Err(error),
            Some(Ok(JobOutcome::Skipped)) => jobs_skipped += 1,
            // Never started after a failure: the failure is returned above.
            None => {}
        }
    }
    let labels: Vec<String> = campaign.targets.iter().map(|t| t.label()).collect();
    let summary = summarize(&labels, reports.iter().map(|(_, r)| &r.summary));
    Ok(CampaignResult {
        shard,
        jobs_planned: slots as u64,
        jobs_skipped,
        reports,
        summary,
    })
}

fn run_job(
    campaign: &Campaign,
    job: &Job,
    slot: usize,
    progress: Option<&Arc<dyn CampaignProgress>>,
) -> Result<JobOutcome, HarnessError> {
    let config = campaign.config(job)?;
    let target = campaign.target(job)?;
    let callback: Option<Arc<ProgressFn>> = progress.map(|progress| {
        let progress = Arc::clone(progress);
        Arc::new(move |p: &Progress| {
            progress.update(
                slot,
                JobProgress {
                    states_explored: p.states_explored,
                    states_expected: p.states_planned,
                    violations: p.violations,
                },
            );
        }) as Arc<ProgressFn>
    });
    let report = explore(target, &config, callback)?;
    if let Some(progress) = progress {
        progress.update(
            slot,
            JobProgress {
                states_explored: report.summary.states_explored,
                states_expected: report.summary.states_explored,
                violations: report.summary.violations,
            },
        );
    }
    Ok(JobOutcome::Done(Box::new(report)))
}

/// One row per label of `targets`, in that order (a target whose jobs all
/// were skipped keeps an empty row), then rows under labels no target
/// predicted, so that nothing explored goes unreported. A row's time is
/// the sum of its jobs' times, so its states/s is the rate of one
/// exploration thread.
pub(crate) fn summarize<'a>(
    targets: &[String],
    rows: impl IntoIterator<Item = &'a TargetSummary>,
) -> Summary {
    let mut by_label: BTreeMap<String, TargetSummary> = BTreeMap::new();
    for row in rows {
        by_label
            .entry(row.target.clone())
            .or_insert_with(|| TargetSummary {
                target: row.target.clone(),
                ..TargetSummary::default()
            })
            .absorb(row);
    }
    let mut ordered: Vec<TargetSummary> = targets
        .iter()
        .map(|label| {
            by_label.remove(label).unwrap_or_else(|| TargetSummary {
                target: label.clone(),
                ..TargetSummary::default()
            })
        })
        .collect();
    ordered.extend(by_label.into_values());
    Summary { rows: ordered }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rows_merge_per_target_in_target_order() {
        let targets: Vec<String> = ["ordered", "journal"].map(String::from).to_vec();
        let row = |label: &str, states: u64, leaks_max: u64| TargetSummary {
            target: label.to_string(),
            workloads: 1,
            states_explored: states,
            leaked_clusters_max: leaks_max,
            elapsed: Duration::from_secs(1),
            ..TargetSummary::default()
        };
        let rows = [
            row("journal", 10, 3),
            row("journal", 5, 7),
            row("stray", 4, 0),
        ];
        let summary = summarize(&targets, &rows);
        assert_eq!(summary.rows.len(), 3);
        // A target whose jobs all were skipped keeps an empty row.
        assert_eq!(summary.rows[0].target, "ordered");
        assert_eq!(summary.rows[0].states_explored, 0);
        let journal = &summary.rows[1];
        assert_eq!(
            (
                journal.workloads,
                journal.states_explored,
                journal.leaked_clusters_max
            ),
            (2, 15, 7)
        );
        assert_eq!(journal.elapsed, Duration::from_secs(2));
        // A label no target predicted is still reported, last.
        assert_eq!(summary.rows[2].target, "stray");
        assert_eq!(summary.rows[2].states_explored, 4);
    }
}
