//! Campaigns through the library API: a sharded run merges to exactly the
//! unsharded run, and summaries that are not shards of one run refuse to
//! merge with an error naming what differs.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qj_model_checks::campaign::{
    merge_records, run_campaign, Campaign, CampaignProgress, CampaignRecord, CampaignTarget,
    JobProgress, MergeError, Shard,
};

/// A small clean campaign: 2 targets x 2 presets x 2 backing variants x 2
/// seeds = 16 jobs of 40 primary states.
fn campaign() -> Campaign {
    Campaign {
        targets: vec![
            CampaignTarget {
                backend: "raw",
                mutation: None,
            },
            CampaignTarget {
                backend: "ordered",
                mutation: None,
            },
        ],
        workloads: vec!["mixed", "discard"],
        backings: vec![false, true],
        seed_first: 5,
        seeds: 2,
        ops: None,
        threads: 1,
        cluster_bytes: None,
        states_budget: 40,
        qemu_every: 0,
        shrink: false,
    }
}

fn record(campaign: &Campaign, shard: Shard, threads: usize) -> CampaignRecord {
    let jobs = campaign.job_count().unwrap();
    let result = run_campaign(campaign, shard, threads, None).unwrap();
    CampaignRecord::new(campaign, jobs, &result, "", Duration::from_secs(1))
}

/// The counts of a record, without its times.
fn counts(record: &CampaignRecord) -> Vec<(String, [u64; 12])> {
    record
        .targets
        .iter()
        .map(|r| {
            (
                r.target.clone(),
                [
                    r.workloads,
                    r.crash_points,
                    r.exhaustive_points,
                    r.states_explored,
                    r.recovery_crash_states,
                    r.continuation_states,
                    r.violations,
                    r.states_with_leaks,
                    r.leaked_clusters,
                    r.leaked_clusters_max,
                    r.qemu_checks,
                    r.unrecovered_checks,
                ],
            )
        })
        .collect()
}

fn named(records: Vec<CampaignRecord>) -> Vec<(String, CampaignRecord)> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| (format!("shard-file-{i}"), r))
        .collect()
}

#[test]
fn shards_merge_to_the_totals_of_one_unsharded_run() {
    let campaign = campaign();
    let whole = record(&campaign, Shard::WHOLE, 2);
    assert_eq!(whole.jobs_run, 16);
    assert_eq!(whole.violations, 0, "{:?}", whole.findings);
    assert!(
        whole.states_explored >= 16 * 30,
        "{}",
        whole.states_explored
    );
    // Three shards of 16 jobs (6, 5, 5), given out of order.
    let shards: Vec<CampaignRecord> = [2, 0, 1]
        .iter()
        .map(|&k| record(&campaign, Shard::new(k, 3).unwrap(), 1))
        .collect();
    let jobs: Vec<u64> = shards.iter().map(|r| r.jobs_run).collect();
    assert_eq!(jobs, [5, 6, 5]);
    let merged = merge_records(&named(shards)).unwrap();
    assert_eq!(counts(&merged), counts(&whole));
    assert_eq!(merged.states_explored, whole.states_explored);
    assert_eq!(merged.jobs_run, whole.jobs_run);
    assert_eq!(merged.shards.indices, [0, 1, 2]);
    assert_eq!(merged.campaign, whole.campaign);
    // The longest shard's time, not the sum: shards run side by side.
    assert_eq!(merged.elapsed_s, 1.0);
    // A record survives its JSON form and still merges.
    let text = serde_json::to_string(&merged).unwrap();
    let back: CampaignRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(back, merged);
}

#[test]
fn a_campaign_reports_the_same_for_any_thread_count() {
    let mut campaign = campaign();
    campaign.seeds = 1;
    campaign.workloads = vec!["mixed"];
    let one = record(&campaign, Shard::WHOLE, 1);
    let four = record(&campaign, Shard::WHOLE, 4);
    assert_eq!(counts(&one), counts(&four));
}

/// Records every update, to check what a progress bar is told.
#[derive(Default)]
struct Recorder {
    slots: Mutex<Option<(usize, u64)>>,
    last: Mutex<Vec<JobProgress>>,
}

impl CampaignProgress for Recorder {
    fn started(&self, job_slots: usize, states_budget: u64) {
        *self.slots.lock() = Some((job_slots, states_budget));
        *self.last.lock() = vec![JobProgress::default(); job_slots];
    }

    fn update(&self, slot: usize, job: JobProgress) {
        self.last.lock()[slot] = job;
    }
}

#[test]
fn progress_names_each_job_slot_and_ends_with_what_it_explored() {
    let mut campaign = campaign();
    campaign.seeds = 1;
    let recorder = Arc::new(Recorder::default());
    let progress: Arc<dyn CampaignProgress> = recorder.clone();
    let shard = Shard::new(1, 2).unwrap();
    let result = run_campaign(&campaign, shard, 2, Some(progress)).unwrap();
    assert_eq!(*recorder.slots.lock(), Some((4, 40)));
    let last = recorder.last.lock();
    for (slot, (_, report)) in result.reports.iter().enumerate() {
        assert_eq!(last[slot].states_explored, report.summary.states_explored);
        assert_eq!(last[slot].states_expected, report.summary.states_explored);
    }
}

#[test]
fn summaries_of_different_runs_or_shardings_do_not_merge() {
    let campaign = campaign();
    let shard = |k, n| record(&campaign, Shard::new(k, n).unwrap(), 1);
    let (a, b) = (shard(0, 2), shard(1, 2));

    // Missing shard.
    let error = merge_records(&named(vec![a.clone()])).unwrap_err();
    assert!(matches!(error, MergeError::MissingShards { .. }), "{error}");
    assert!(
        error.to_string().contains("shards 1 of 2 are missing"),
        "{error}"
    );

    // Duplicate shard.
    let error = merge_records(&named(vec![a.clone(), b.clone(), a.clone()])).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("shard 0/2 appears in both shard-file-0 and shard-file-2"),
        "{text}"
    );

    // Another run's shard: the differing setting is named with both values.
    let mut other = campaign.clone();
    other.states_budget = 41;
    let foreign = record(&other, Shard::new(1, 2).unwrap(), 1);
    let text = merge_records(&named(vec![a.clone(), foreign]))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("not a shard of the same campaign")
            && text.contains("states_budget is 41 there but 40"),
        "{text}"
    );

    // The same run split another way.
    let third = shard(1, 3);
    let text = merge_records(&named(vec![a.clone(), third]))
        .unwrap_err()
        .to_string();
    assert!(text.contains("covers shards of 3 but"), "{text}");

    // A record whose job counts do not fit its shard (edited or truncated).
    let mut edited = b.clone();
    edited.jobs_run -= 1;
    let text = merge_records(&named(vec![a.clone(), edited]))
        .unwrap_err()
        .to_string();
    assert!(text.contains("shard-file-1: reports 7 jobs"), "{text}");

    assert!(matches!(merge_records(&[]), Err(MergeError::Empty)));
    assert!(merge_records(&named(vec![b, a])).is_ok());
}

#[test]
fn more_shards_than_jobs_is_refused_before_any_work() {
    let mut campaign = campaign();
    campaign.seeds = 1;
    let error = run_campaign(&campaign, Shard::new(3, 9).unwrap(), 1, None).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("only 8 jobs: use at most 8 shards"),
        "{error}"
    );
}
