//! The harness has teeth: correct targets pass, each injected ordering bug
//! is caught by the check it breaks, and findings reproduce.

use std::sync::Arc;

use qj_model_checks::{
    builtin_target, explore, reproduce, CheckKind, CrashPath, ExploreConfig, HarnessError, Report,
    WorkloadConfig,
};

fn config(workload: &str) -> ExploreConfig {
    let mut workload = WorkloadConfig::preset(workload).unwrap();
    workload.size_bytes = 256 << 10;
    workload.size_max_bytes = 1 << 20;
    workload.ops_per_thread = 60;
    let mut config = ExploreConfig::new(workload);
    config.states_budget = 1500;
    config.continue_every = 16;
    config.shrink = false;
    config
}

fn run(backend: &str, mutation: Option<&str>, config: &ExploreConfig) -> Report {
    explore(builtin_target(backend, mutation).unwrap(), config, None).unwrap()
}

fn assert_clean(report: &Report, states_min: u64) {
    assert!(
        report.violations.is_empty(),
        "unexpected violation: {}",
        report.violations[0]
    );
    assert!(
        report.summary.states_explored >= states_min,
        "{:?}",
        report.summary
    );
}

#[test]
fn raw_target_is_clean_across_workloads_backing_and_threads() {
    for workload in ["mixed", "discard", "grow"] {
        let mut config = config(workload);
        config.states_budget = 700;
        let report = run("raw", None, &config);
        assert_clean(&report, 700);
        assert!(report.summary.exhaustive_points > 0, "{:?}", report.summary);
        assert!(
            report.summary.continuation_states > 0,
            "{:?}",
            report.summary
        );
    }
    let mut with_backing = config("mixed");
    with_backing.states_budget = 700;
    with_backing.workload.backing = true;
    assert_clean(&run("raw", None, &with_backing), 700);
    let mut threaded = config("mixed");
    threaded.states_budget = 700;
    threaded.workload.threads = 3;
    threaded.workload.ops_per_thread = 30;
    assert_clean(&run("raw", None, &threaded), 700);
}

#[test]
fn skipped_flush_is_caught_as_lost_flushed_data_and_reproduces() {
    let mut config = config("mixed");
    config.shrink = true;
    config.shrink_attempts_max = 25;
    config.shrink_states_budget = 200;
    let target = builtin_target("raw", Some("skip-flush")).unwrap();
    let report = explore(Arc::clone(&target), &config, None).unwrap();
    let violation = report
        .violations
        .first()
        .expect("skip-flush must be caught");
    assert_eq!(violation.kind, CheckKind::FlushedDataLost, "{violation}");
    let line = violation.reproducer.to_string();
    assert!(
        line.starts_with("qj crash --backend raw --mutate skip-flush"),
        "{line}"
    );
    assert!(
        line.contains(" --crash-at ") && line.contains(" --state "),
        "{line}"
    );

    // The reproducer's crash path finds the same violation again.
    let again = reproduce(Arc::clone(&target), &config, &violation.reproducer.path).unwrap();
    assert_eq!(
        again.violations.first().map(|v| v.kind),
        Some(CheckKind::FlushedDataLost)
    );
    assert_eq!(
        again.summary.states_explored,
        violation.reproducer.path.steps.len() as u64,
        "exactly the named state at each level"
    );

    // Shrinking found a much shorter list that still loses flushed data.
    let shrunk = violation.shrunk.as_ref().expect("shrunk");
    assert!(
        shrunk.ops_len <= 4,
        "shrunk to {} ops: {shrunk}",
        shrunk.ops_len
    );
    assert_eq!(shrunk.kind, CheckKind::FlushedDataLost);
    let ops = shrunk.reproducer.ops.clone().expect("explicit ops");
    let mut replay = config.clone();
    replay.ops = Some(ops);
    let rerun = reproduce(target, &replay, &shrunk.reproducer.path).unwrap();
    assert_eq!(
        rerun.violations.first().map(|v| v.kind),
        Some(CheckKind::FlushedDataLost)
    );
}

#[test]
fn log_target_is_clean_and_its_pointer_before_data_bug_is_caught() {
    assert_clean(&run("log", None, &config("mixed")), 1500);
    let mut with_backing = config("overwrite");
    with_backing.workload.backing = true;
    assert_clean(&run("log", None, &with_backing), 1500);

    let mut primary_only = config("mixed");
    primary_only.continue_every = 0;
    let report = run("log", Some("header-before-data"), &primary_only);
    let violation = report
        .violations
        .first()
        .expect("header-before-data must be caught");
    assert!(
        matches!(
            violation.kind,
            CheckKind::RecoveryFailed
                | CheckKind::NotAllowed
                | CheckKind::FlushedDataLost
                | CheckKind::Corruption
        ),
        "{violation}"
    );
    assert_eq!(
        violation.reproducer.path.steps.len(),
        1,
        "found at the first crash"
    );
}

#[test]
fn a_bug_after_reopen_is_caught_only_by_continuing_after_recovery() {
    let mut no_continuation = config("mixed");
    no_continuation.continue_every = 0;
    let report = run(
        "log",
        Some("header-before-data-after-reopen"),
        &no_continuation,
    );
    assert!(
        report.violations.is_empty(),
        "the bug only exists after a reopen"
    );

    let mut continuing = config("mixed");
    continuing.continue_every = 2;
    continuing.continue_states_budget = 200;
    let report = run("log", Some("header-before-data-after-reopen"), &continuing);
    let violation = report.violations.first().expect("(e) must catch it");
    assert_eq!(violation.reproducer.path.steps.len(), 2, "{violation}");
    let again = reproduce(
        builtin_target("log", Some("header-before-data-after-reopen")).unwrap(),
        &continuing,
        &violation.reproducer.path,
    )
    .unwrap();
    assert_eq!(
        again.violations.first().map(|v| v.kind),
        Some(violation.kind)
    );
}

#[test]
fn redo_target_is_clean_and_its_non_idempotent_replay_is_caught_by_d() {
    let mut config = config("mixed");
    config.recovery_crash_every = 1;
    let clean = run("redo", None, &config);
    assert_clean(&clean, 1500);
    assert!(
        clean.summary.recovery_crash_states > 50,
        "{:?}",
        clean.summary
    );

    let report = run("redo", Some("xor-delta"), &config);
    let violation = report.violations.first().expect("xor-delta must be caught");
    assert_eq!(violation.kind, CheckKind::NotIdempotent, "{violation}");
    let last = violation.reproducer.path.steps.last().unwrap();
    assert!(last.during_recovery);
    assert!(
        violation.reproducer.to_string().contains("/r"),
        "{}",
        violation.reproducer
    );

    let mut no_recovery_crash = config.clone();
    no_recovery_crash.recovery_crash_every = 0;
    let report = run("redo", Some("xor-delta"), &no_recovery_crash);
    assert!(
        report.violations.is_empty(),
        "each single recovery leaves allowed content"
    );
}

#[test]
fn explorations_are_deterministic() {
    let mut config = config("mixed");
    config.states_budget = 500;
    let a = run("log", None, &config);
    let b = run("log", None, &config);
    assert_eq!(a.summary.states_explored, b.summary.states_explored);
    assert_eq!(a.summary.crash_points, b.summary.crash_points);
    assert_eq!(a.summary.continuation_states, b.summary.continuation_states);
    let mut other = config.clone();
    other.seed = 99;
    let c = run("log", None, &other);
    assert_ne!(
        (a.summary.crash_points, a.summary.states_explored),
        (c.summary.crash_points, c.summary.states_explored)
    );
}

#[test]
fn bad_input_is_a_clear_error_listing_what_is_valid() {
    let err = builtin_target("qcow3", None).err().unwrap().to_string();
    assert!(err.contains("raw, log, redo"), "{err}");
    let err = builtin_target("raw", Some("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("skip-flush"), "{err}");
    let err = WorkloadConfig::preset("busy").unwrap_err().to_string();
    assert!(
        err.contains("mixed, alloc, overwrite, discard, grow"),
        "{err}"
    );

    let config = config("mixed");
    let target = builtin_target("raw", None).unwrap();
    let beyond = CrashPath::parse("100000", Some("0")).unwrap();
    match reproduce(Arc::clone(&target), &config, &beyond) {
        Err(
            e @ HarnessError::CrashPointBeyondTrace {
                requested: 100000, ..
            },
        ) => {
            assert!(e.to_string().contains("valid crash points are 2..="), "{e}");
        }
        other => panic!("expected a crash point error, got {other:?}"),
    }
    let too_big_state = CrashPath::parse("2", Some("5000")).unwrap();
    match reproduce(Arc::clone(&target), &config, &too_big_state) {
        Err(e @ HarnessError::StateBeyondSpace { .. }) => {
            assert!(e.to_string().contains("valid states are 0.."), "{e}");
        }
        other => panic!("expected a state error, got {other:?}"),
    }
    let mut bad_ops = config.clone();
    bad_ops.ops = Some("w1000000+1".parse().unwrap());
    assert!(matches!(
        explore(Arc::clone(&target), &bad_ops, None),
        Err(HarnessError::Workload { .. })
    ));
    let mut bad_bound = config.clone();
    bad_bound.exhaustive_units_max = 4;
    let err = explore(target, &bad_bound, None).err().unwrap().to_string();
    assert!(err.contains("exhaustive_units_max"), "{err}");
}
