//! `qj crash --shard K/N` and `qj crash merge`, run as a user runs them:
//! the shards of a run merge to the unsharded run's totals, the shard
//! index can come from a scheduler's environment, and bad shard arguments
//! or summaries that are not shards of one run are refused with one clear
//! line.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::{expect_exit, text};

/// The scheduler variables `qj crash` reads: removed from every run here
/// unless a test sets them, so that the tests mean the same inside a
/// Kubernetes Job or a Slurm array.
const SCHEDULER_VARS: [&str; 5] = [
    "JOB_COMPLETION_INDEX",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
];

fn qj_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qj"));
    command.args(args);
    for var in SCHEDULER_VARS {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run qj: {e}"))
}

fn qj(args: &[&str]) -> Output {
    qj_with_env(args, &[])
}

/// Asserts exit 2 with one `qj: ` line on stderr containing every string
/// of `wanted`.
#[track_caller]
fn expect_usage_error(out: &Output, wanted: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("qj: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for want in wanted {
        assert!(stderr.contains(want), "{want} missing from: {stderr}");
    }
}

/// A small clean run: the raw backend, two presets, both backing
/// variants, two seeds (8 jobs).
const RUN: [&str; 13] = [
    "crash",
    "--backend",
    "raw",
    "--workload",
    "all",
    "--workloads",
    "2",
    "--states",
    "30",
    "--qemu-every",
    "0",
    "--output",
    "json",
];

fn run_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    RUN.iter().copied().chain(extra.iter().copied()).collect()
}

fn json(out: &Output, code: i32) -> Value {
    serde_json::from_str(&expect_exit(out, code)).expect("one JSON document")
}

fn save(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

/// The counts of each target row, without times.
fn counts(summary: &Value) -> Vec<Value> {
    summary["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|row| {
            let mut row = row.clone();
            let object = row.as_object_mut().unwrap();
            object.remove("elapsed_s");
            object.remove("states_per_s");
            row
        })
        .collect()
}

fn merge(files: &[&Path], extra: &[&str]) -> Output {
    let mut args: Vec<&str> = vec!["crash", "merge"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    args.extend(extra);
    qj(&args)
}

#[test]
fn shards_merge_to_the_totals_of_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = json(&qj(&run_args(&[])), 0);
    let jobs = whole["campaign"]["jobs"].as_u64().unwrap();
    assert!(jobs >= 8, "{whole}");
    assert_eq!(whole["jobs_run"].as_u64(), Some(jobs));
    // Shard 0 from the flag, shard 1 from a Kubernetes indexed Job, shard
    // 2 from a Slurm array numbered from 1.
    let zero = json(&qj(&run_args(&["--shard", "0/3"])), 0);
    let one = json(
        &qj_with_env(
            &run_args(&["--shards", "3"]),
            &[("JOB_COMPLETION_INDEX", "1")],
        ),
        0,
    );
    let two = json(
        &qj_with_env(
            &run_args(&[]),
            &[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
        ),
        0,
    );
    for (shard, summary) in [(0, &zero), (1, &one), (2, &two)] {
        assert_eq!(summary["shards"]["count"], 3, "{summary}");
        assert_eq!(summary["shards"]["indices"][0], shard, "{summary}");
    }
    let runs: u64 = [&zero, &one, &two]
        .iter()
        .map(|s| s["jobs_run"].as_u64().unwrap())
        .sum();
    assert_eq!(runs, jobs);
    let files = [
        save(dir.path(), "two.json", &two),
        save(dir.path(), "zero.json", &zero),
        save(dir.path(), "one.json", &one),
    ];
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let merged = json(&merge(&paths, &["--output", "json"]), 0);
    assert_eq!(counts(&merged), counts(&whole));
    assert_eq!(merged["states_explored"], whole["states_explored"]);
    assert_eq!(merged["violations"], 0);
    assert_eq!(merged["campaign"], whole["campaign"]);
    // The human form ends with the closing line of an unsharded run.
    let human = expect_exit(&merge(&paths, &[]), 0);
    let want = format!(
        "crash: {} states explored, 0 violations",
        whole["states_explored"]
    );
    assert_eq!(human.lines().last(), Some(want.as_str()), "{human}");
    // A shard's own table says which part of the run it is.
    let human = expect_exit(
        &qj(&[
            "crash",
            "--backend",
            "raw",
            "--workload",
            "mixed",
            "--states",
            "10",
            "--shard",
            "1/2",
        ]),
        0,
    );
    assert!(
        human.contains("crash: shards 1 of 2 (1 of 2 jobs run, 0 skipped)"),
        "{human}"
    );
}

#[test]
fn bad_shard_arguments_are_usage_errors() {
    let base = ["crash", "--backend", "raw", "--workload", "mixed"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        qj_with_env(&args, env)
    };
    expect_usage_error(&run(&["--shard", "2/2"], &[]), &["2/2", "K/N"]);
    expect_usage_error(&run(&["--shard", "1"], &[]), &["K/N"]);
    expect_usage_error(&run(&["--shard", "a/4"], &[]), &["a/4", "K/N"]);
    expect_usage_error(&run(&["--shard", "0/0"], &[]), &["0/0"]);
    // Two jobs (the backing variants): three shards cannot all have one.
    expect_usage_error(
        &run(&["--shard", "0/3"], &[]),
        &["only 2 jobs", "at most 2 shards"],
    );
    expect_usage_error(&run(&["--shards", "2"], &[]), &["--shard K/2"]);
    expect_usage_error(
        &run(&[], &[("JOB_COMPLETION_INDEX", "1")]),
        &["JOB_COMPLETION_INDEX=1", "--shards N"],
    );
    expect_usage_error(
        &run(&["--shards", "2"], &[("JOB_COMPLETION_INDEX", "5")]),
        &["JOB_COMPLETION_INDEX=5", "not below the shard count 2"],
    );
    expect_usage_error(
        &run(&[], &[("SLURM_ARRAY_TASK_ID", "x")]),
        &["SLURM_ARRAY_TASK_ID", "not a whole number"],
    );
    let conflict = run(&["--shard", "0/2", "--crash-at", "3"], &[]);
    assert_eq!(
        conflict.status.code(),
        Some(2),
        "{}",
        text(&conflict.stderr)
    );
}

#[test]
fn summaries_that_are_not_shards_of_one_run_do_not_merge() {
    let dir = tempfile::tempdir().unwrap();
    let small = |extra: &[&str]| {
        let mut args = vec![
            "crash",
            "--backend",
            "raw",
            "--workload",
            "mixed",
            "--states",
            "10",
            "--qemu-every",
            "0",
            "--output",
            "json",
        ];
        args.extend(extra);
        json(&qj(&args), 0)
    };
    let zero = save(dir.path(), "zero.json", &small(&["--shard", "0/2"]));
    let one = save(dir.path(), "one.json", &small(&["--shard", "1/2"]));
    let other = save(
        dir.path(),
        "other.json",
        &small(&["--shard", "1/2", "--seed", "9"]),
    );
    expect_exit(&merge(&[&zero, &one], &[]), 0);
    expect_usage_error(&merge(&[&zero], &[]), &["shards 1 of 2 are missing"]);
    expect_usage_error(
        &merge(&[&zero, &one, &zero], &[]),
        &["shard 0/2 appears in both", "zero.json"],
    );
    expect_usage_error(
        &merge(&[&zero, &other], &[]),
        &[
            "other.json",
            "not a shard of the same campaign",
            "seed_first",
        ],
    );
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"states_explored\": 3}").unwrap();
    expect_usage_error(
        &merge(&[&zero, &garbage], &[]),
        &["garbage.json", "is not a `qj crash --output json` summary"],
    );
    let absent = dir.path().join("absent.json");
    let out = merge(&[&zero, &absent], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("absent.json"));
    let out = qj(&["crash", "merge"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
