//! Crash points taken from one observed run are the states a real power
//! cut produces: re-running with the power cut armed gives the same
//! device state and the same model.

use std::sync::Arc;

use parking_lot::Mutex;
use qj_model_checks::runner::{close_disk, run_workload};
use qj_model_checks::sim_device::CrashSnapshotView;
use qj_model_checks::{
    builtin_target, explore, run_to_crash_point, CrashSnapshot, CrashUnits, DeviceConfig,
    ExploreConfig, GuestModel, HarnessError, Progress, SimDevice, WorkloadConfig,
};

fn config() -> ExploreConfig {
    let mut workload = WorkloadConfig::preset("mixed").unwrap();
    workload.size_bytes = 128 << 10;
    workload.size_max_bytes = 512 << 10;
    workload.ops_per_thread = 40;
    workload.backing = true;
    let mut config = ExploreConfig::new(workload);
    config.seed = 5;
    config.shrink = false;
    config
}

/// The crash state at `point` as the observer sees it in one full run.
fn observed_at(backend: &str, config: &ExploreConfig, point: u64) -> (CrashSnapshot, usize) {
    let target = builtin_target(backend, None).unwrap();
    let dev = Arc::new(SimDevice::new(DeviceConfig::default()));
    let backing = qj_model_checks::backing_device(config.workload.size_bytes);
    let disk = target
        .create(
            dev.clone(),
            Some(Arc::new(backing)),
            config.workload.size_bytes,
        )
        .unwrap();
    let model = Arc::new(Mutex::new(
        GuestModel::new(config.workload.size_bytes, config.workload.size_bytes, 1).unwrap(),
    ));
    let seen: Arc<Mutex<Option<(CrashSnapshot, usize)>>> = Arc::default();
    let (sink, observer_model) = (Arc::clone(&seen), Arc::clone(&model));
    dev.set_observer(Some(Box::new(move |view: &CrashSnapshotView<'_>| {
        if view.op_index == point {
            *sink.lock() = Some((view.to_owned(), observer_model.lock().in_flight()));
        }
    })));
    let workload = config.workload.generate(config.seed);
    run_workload(&*disk, &model, &workload).unwrap();
    close_disk(disk, &model).unwrap();
    dev.observe_now();
    dev.set_observer(None);
    let taken = seen.lock().take();
    taken.expect("point reached")
}

#[test]
fn armed_power_cut_and_observer_agree_on_every_sampled_point() {
    let config = config();
    for backend in ["raw", "log", "redo"] {
        let target = builtin_target(backend, None).unwrap();
        let (first, last) = match run_to_crash_point(target, &config, u64::MAX) {
            Err(HarnessError::CrashPointBeyondTrace { first, last, .. }) => (first, last),
            other => panic!("expected the valid range, got {other:?}"),
        };
        assert!(last > first + 10, "{backend}: {first}..={last}");
        for point in [
            first,
            first + 1,
            first + 7,
            (first + last) / 2,
            last - 1,
            last,
        ] {
            let target = builtin_target(backend, None).unwrap();
            let (armed, model) = match run_to_crash_point(target, &config, point) {
                Ok(found) => found,
                Err(e) => panic!("{backend} point {point}: {e}"),
            };
            let (observed, in_flight) = observed_at(backend, &config, point);
            assert_eq!(armed.op_index, point);
            assert_eq!(observed.op_index, point);
            assert!(
                armed.durable.same_content(&observed.durable),
                "{backend} {point}"
            );
            assert_eq!(
                armed.pending.len(),
                observed.pending.len(),
                "{backend} {point}"
            );
            let (a, o) = (CrashUnits::new(&armed), CrashUnits::new(&observed));
            assert_eq!(a.len(), o.len());
            let all = vec![true; a.len()];
            assert!(a.image(&all).unwrap().same_content(&o.image(&all).unwrap()));
            assert_eq!(
                model.in_flight(),
                in_flight,
                "{backend} {point}: same op in flight"
            );
        }
    }
}

#[test]
fn progress_reports_reach_the_final_count() {
    let calls: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = Arc::clone(&calls);
    let mut config = config();
    config.states_budget = 600;
    let report = explore(
        builtin_target("raw", None).unwrap(),
        &config,
        Some(Arc::new(move |p: &Progress| sink.lock().push(p.clone()))),
    )
    .unwrap();
    let calls = calls.lock();
    let last = calls.last().expect("at least the final report");
    assert_eq!(last.states_explored, report.summary.states_explored);
    assert!(last.states_planned > 0 && last.states_planned <= 600);
    assert_eq!(last.target, "raw");
}
