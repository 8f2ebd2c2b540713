//! Power-loss exploration of the engine itself: the flush-ordering backend
//! passes every check (leaking at most, never corrupting), and each
//! injected ordering bug is caught.

use std::sync::Arc;

use qj_engine::backend::ordered::OrderingMutation;
use qj_model_checks::{
    explore, reproduce, CheckKind, CrashPath, CrashTarget, EngineBackend, EngineTarget,
    ExploreConfig, Report, WorkloadConfig,
};

fn config(workload: &str, states: u64) -> ExploreConfig {
    let mut workload = WorkloadConfig::preset(workload).unwrap();
    workload.cluster_bytes = 4096;
    workload.size_bytes = 256 << 10;
    workload.size_max_bytes = 1 << 20;
    workload.ops_per_thread = 80;
    let mut config = ExploreConfig::new(workload);
    config.states_budget = states;
    config.continue_every = 16;
    config.recovery_crash_every = 8;
    config.shrink = false;
    config
}

fn run(target: EngineTarget, config: &ExploreConfig) -> Report {
    let target: Arc<dyn CrashTarget> = Arc::new(target);
    explore(target, config, None).unwrap()
}

#[test]
fn ordered_backend_survives_every_explored_crash() {
    for (workload, backing) in [
        ("mixed", false),
        ("alloc", false),
        ("discard", false),
        ("grow", false),
        ("mixed", true),
    ] {
        let mut config = config(workload, 1500);
        config.workload.backing = backing;
        let report = run(EngineTarget::new(EngineBackend::Ordered), &config);
        assert!(
            report.violations.is_empty(),
            "{workload} (backing {backing}): {}",
            report.violations[0]
        );
        assert!(
            report.summary.states_explored >= 1000,
            "{:?}",
            report.summary
        );
        // An ordered open writes nothing, so there is no recovery to crash in.
        assert_eq!(
            report.summary.recovery_crash_states, 0,
            "{:?}",
            report.summary
        );
        assert!(
            report.summary.leaked_clusters > 0,
            "flush ordering leaks on some crashes: {:?}",
            report.summary
        );
        assert!(
            report.summary.continuation_states > 0,
            "{:?}",
            report.summary
        );
    }
}

#[test]
fn ordered_backend_on_512_byte_clusters_with_wide_refcounts() {
    // Small clusters and 64-bit refcounts: a refcount block covers 64
    // clusters, so short runs grow the refcount table and L1 table.
    let mut config = config("grow", 1500);
    config.workload.cluster_bytes = 512;
    let report = run(
        EngineTarget::new(EngineBackend::Ordered).with_geometry(512, 64),
        &config,
    );
    assert!(report.violations.is_empty(), "{}", report.violations[0]);
}

#[test]
fn l2_written_before_refcount_flush_is_caught() {
    let target = EngineTarget::new(EngineBackend::Ordered)
        .with_ordering_mutation(OrderingMutation::SkipRefcountFlush);
    let report = run(target, &config("alloc", 3000));
    let v = report
        .violations
        .first()
        .expect("the skipped refcount flush must be caught");
    assert_eq!(v.kind, CheckKind::Corruption, "{v}");
    assert!(
        v.reproducer
            .to_string()
            .contains("--mutate l2-before-refcount-flush"),
        "{v}"
    );
}

#[test]
fn l2_durable_before_data_is_caught() {
    let mut config = config("alloc", 3000);
    config.workload.backing = true;
    let target = EngineTarget::new(EngineBackend::Ordered)
        .with_ordering_mutation(OrderingMutation::TablesBeforeData);
    let report = run(target, &config);
    // Entries reaching the disk before the flush that covers the data (and,
    // necessarily in this design, before the refcounts) show as garbage
    // content or as entries pointing at unreferenced clusters.
    let v = report
        .violations
        .first()
        .expect("L2 entries before data must be caught");
    assert!(
        matches!(
            v.kind,
            CheckKind::NotAllowed | CheckKind::FlushedDataLost | CheckKind::Corruption
        ),
        "{v}"
    );
    assert!(
        v.reproducer.to_string().contains("--mutate l2-before-data"),
        "{v}"
    );
}

#[test]
fn journalled_backends_survive_every_explored_crash_without_leaks() {
    for backend in [EngineBackend::Journal, EngineBackend::JournalDraft] {
        for (workload, backing) in [
            ("mixed", false),
            ("alloc", false),
            ("discard", false),
            ("grow", true),
        ] {
            let mut config = config(workload, 1200);
            config.workload.backing = backing;
            let report = run(EngineTarget::new(backend), &config);
            assert!(
                report.violations.is_empty(),
                "{backend:?} {workload} (backing {backing}): {}",
                report.violations[0]
            );
            let s = &report.summary;
            assert!(s.states_explored >= 1000, "{s:?}");
            assert_eq!(s.leaked_clusters, 0, "the journal leaks nothing: {s:?}");
            // Every crash image is also checked as the crash left it (replay
            // in memory), and found consistent.
            assert!(s.unrecovered_checks >= s.states_explored / 2, "{s:?}");
            // Opening a journalled image replays: crashes during recovery are explored.
            assert!(s.recovery_crash_states > 0, "{s:?}");
        }
    }
}

/// The workload seed of the `grow` preset that exposes every journal
/// mutation within the budget. Seed 1 does not: it never frees, revokes
/// and reuses a metadata cluster that an unsynced transaction wrote (the
/// revoke mutations need that); and since a checkpoint writes each
/// range's last version only, fewer of its crash states show a lost
/// in-place write (checkpoint before flush) or a reused cluster holding
/// another write's bytes (no data checksums), and 3,000 states miss them
/// (20,000 find both). Seed 2 shows all of these within the budget:
/// without data checksums, say, a guest sector reads write #14's bytes
/// where only zeros or write #17 may be.
const EXPOSING_SEED: u64 = 2;

/// States explored for `logged-zeros-over-kept` (`discard` with a backing
/// file, seed 1, catches it within them): a kept cluster must be joined
/// again by writes on either side of bytes it holds, and the transaction
/// checkpointed, before a state can show it.
const BUDGET_ZEROS_OVER_KEPT: u64 = 3000;

#[test]
fn journal_mutations_are_caught() {
    let listed = qj_model_checks::mutations("journal");
    for required in [
        "no-data-checksums",
        "no-revokes",
        "no-dirty-bit",
        "replay-skips-tx-checksum",
        "replay-ignores-revokes",
        "checkpoint-before-flush",
    ] {
        assert!(listed.contains(&required), "{required} is not registered");
    }
    // Snapshot operations exist only in the `snapshot` preset: that
    // mutation is proven in tests/snapshot_crash.rs.
    for mutation in listed.iter().filter(|&&m| m != "snapshot-steps-split") {
        let target = qj_model_checks::crash_target("journal", Some(mutation)).unwrap();
        assert_eq!(target.mutation().as_deref(), Some(*mutation));
        // The preset's own sizes: the disk grows past one L2 table's reach,
        // so the L1 table moves and its cluster is freed and reused.
        let mut config = ExploreConfig::new(WorkloadConfig::preset("grow").unwrap());
        config.seed = EXPOSING_SEED;
        config.states_budget = 3000;
        config.shrink = false;
        let report = explore(target, &config, None).unwrap();
        let v = report
            .violations
            .first()
            .unwrap_or_else(|| panic!("mutation {mutation} not caught: {:?}", report.summary));
        let reproducer = v.reproducer.to_string();
        assert!(reproducer.contains(&format!("--mutate {mutation} ")), "{v}");
        assert!(
            reproducer.contains(&format!("--seed {} ", config.seed)),
            "{v}"
        );
    }
}

/// A leak a long exploration found (journal backend, `grow`): at the crash
/// the grow's transaction (new L1 table, revoke of the old one) was
/// committed but its guest data was not on the disk, so replay dropped
/// it, yet honoured its revoke and skipped the earlier transaction's write
/// of the old L1 table: two clusters leaked with the mapping lost. Every
/// state of that crash point must now recover clean.
#[test]
fn a_grow_dropped_at_replay_keeps_the_earlier_mapping() {
    let mut config = ExploreConfig::new(WorkloadConfig::preset("grow").unwrap());
    config.seed = 6;
    config.ops = Some("w1625+1,f,w1632+30,g5712".parse().unwrap());
    config.shrink = false;
    config.qemu_every = 0;
    for backing in [false, true] {
        config.workload.backing = backing;
        let path = CrashPath::parse("28", None).unwrap();
        let target: Arc<dyn CrashTarget> = Arc::new(EngineTarget::new(EngineBackend::Journal));
        let report = reproduce(target, &config, &path).unwrap();
        assert!(
            report.violations.is_empty(),
            "backing {backing}: {}",
            report.violations[0]
        );
        assert!(report.summary.states_explored >= 2, "{:?}", report.summary);
    }
}

/// Explores `backend` (a registered engine target) on each (workload,
/// backing) pair and asserts every crash recovers clean without a leak;
/// then asserts `mutation` is caught on `exposing` (preset, backing) with
/// the default 3,000 states.
fn survives_and_catches(
    backend: &str,
    workloads: &[(&str, bool)],
    mutation: &str,
    exposing: (&str, bool),
) {
    for &(workload, backing) in workloads {
        let mut config = config(workload, 800);
        config.workload.backing = backing;
        let target = qj_model_checks::crash_target(backend, None).unwrap();
        let report = explore(target, &config, None).unwrap();
        assert!(
            report.violations.is_empty(),
            "{backend} {workload} (backing {backing}): {}",
            report.violations[0]
        );
        let s = &report.summary;
        assert!(s.states_explored >= 600, "{s:?}");
        assert_eq!(s.leaked_clusters, 0, "{s:?}");
        assert!(s.recovery_crash_states > 0, "{s:?}");
    }
    catches(backend, mutation, exposing, 3000);
}

/// `mutation` on `backend` is caught by `exposing` (workload, backing
/// file) within `states_budget` states.
fn catches(backend: &str, mutation: &str, exposing: (&str, bool), states_budget: u64) {
    let target = qj_model_checks::crash_target(backend, Some(mutation)).unwrap();
    let mut config = ExploreConfig::new(WorkloadConfig::preset(exposing.0).unwrap());
    config.workload.backing = exposing.1;
    config.states_budget = states_budget;
    config.shrink = false;
    let report = explore(target, &config, None).unwrap();
    assert!(
        !report.violations.is_empty(),
        "{mutation} not caught: {:?}",
        report.summary
    );
}

/// Delayed copy-on-write under power loss: every cluster starts shared
/// with an internal snapshot (QEMU makes it), so every partial write
/// journals a copy; the images recover clean, and with the write-before-
/// copy rule broken the harness sees a copy undo a flushed write.
#[test]
fn delayed_copy_on_write_survives_every_explored_crash() {
    survives_and_catches(
        "journal-cow",
        &[("mixed", false), ("overwrite", true), ("grow", true)],
        "no-copy-before-write",
        ("alloc", false),
    );
}

/// Logged data (journal rule 7): small writes into fresh clusters travel in
/// the transaction and reach the file at checkpoint. Every explored crash
/// recovers clean, with no leak; writing into a logged cluster in place
/// once its bytes are in a submitted transaction is caught, and so is a
/// kept cluster joined again whose transaction carries zeros over the
/// bytes the file holds.
#[test]
fn logged_data_survives_every_explored_crash() {
    survives_and_catches(
        "journal-logged",
        &[("mixed", false), ("alloc", true), ("grow", false)],
        "logged-write-in-place",
        ("mixed", true),
    );
    catches(
        "journal-logged",
        "logged-zeros-over-kept",
        ("discard", true),
        BUDGET_ZEROS_OVER_KEPT,
    );
}

/// Deduplication (spec §3.6): every explored crash recovers clean, with no
/// leak and an index that agrees with the metadata (a recovery that drops
/// a stale entry fails the state); a link committed without its refcount
/// increase, and a free committed without its deletion, are each caught.
#[test]
fn dedup_survives_every_explored_crash_and_catches_its_mutations() {
    survives_and_catches(
        "journal-dedup",
        &[("mixed", false), ("overwrite", true), ("grow", false)],
        "dedup-no-increment",
        ("mixed", false),
    );
    let target = qj_model_checks::crash_target("journal-dedup", Some("dedup-no-deletion")).unwrap();
    let mut config = ExploreConfig::new(WorkloadConfig::preset("mixed").unwrap());
    config.states_budget = 3000;
    config.shrink = false;
    let report = explore(target, &config, None).unwrap();
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.to_string().contains("stale dedup index entries")),
        "dedup-no-deletion not caught by the index check: {:?}",
        report.summary
    );
}

/// Persistent dirty bitmaps (spec 11.6): on the journal, after every
/// explored crash the recovered image's data lies in set bits of a bitmap
/// that is never `in_use`; committing the bits one transaction late is
/// caught by that check.
#[test]
fn journal_bitmap_is_exact_after_every_explored_crash() {
    survives_and_catches(
        "journal-bitmap",
        &[("mixed", false), ("overwrite", true), ("grow", false)],
        "bitmap-outside-transaction",
        ("mixed", false),
    );
}

/// Flush ordering keeps QEMU's promise: after every explored crash the
/// bitmap is `in_use` (or, with nothing written since a clean close,
/// covers the data); leaks are allowed, corruption is not.
#[test]
fn ordered_bitmap_is_in_use_or_covering_after_every_explored_crash() {
    for (workload, backing) in [("mixed", false), ("grow", true)] {
        let mut config = config(workload, 800);
        config.workload.backing = backing;
        let target = qj_model_checks::crash_target("ordered-bitmap", None).unwrap();
        let report = explore(target, &config, None).unwrap();
        assert!(
            report.violations.is_empty(),
            "ordered-bitmap {workload} (backing {backing}): {}",
            report.violations[0]
        );
        assert!(
            report.summary.states_explored >= 600,
            "{:?}",
            report.summary
        );
    }
}
