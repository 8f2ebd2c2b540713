//! The exploration driver: run a workload once, and at chosen crash points
//! build crash images, recover them, and check (a) to (f).
//!
//! A level is one run on one simulated device: the primary level creates
//! the image and runs the workload; a continuation level recovers a crash
//! image and runs a continuation workload. Each level is first run dry to
//! learn its trace (how many crash points, how many pending units at each),
//! then crash points are chosen to fit a budget, then it is run again with
//! an observer on the device that explores each chosen point in place,
//! with the guest model exactly as it stood when the power would have been
//! cut (see [`crate::sim_device`] for when the observer runs). The
//! targets must therefore be deterministic for single-threaded workloads;
//! multi-threaded runs are explored the same way but do not reproduce
//! exactly.
//!
//! Every crash image goes through [`Inner::explore_image`]: recovery and
//! checks (a), (b), (c), (f); on a seeded sample a crash during its
//! recovery (d); on another sample a continuation (e), whose crash images
//! go through the same function one level deeper.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qj_journal::{MemStorage, Storage};

use crate::check_memo::CheckMemo;
use crate::checks::{compare_recoveries, observe, observe_changed, Reference};
use crate::config::ExploreConfig;
use crate::crash_states::{CrashUnits, StateSpace};
use crate::error::HarnessError;
use crate::guest_model::{GuestModel, Observed};
use crate::image_memo::ImageMemo;
use crate::medium::{Medium, SECTOR_BYTES};
use crate::plan::{choose_points, Plan, PointPlan};
use crate::qemu::qemu_img_check;
use crate::rng::{mix, Rng};
use crate::runner::{close_disk, run_workload, RunFailure};
use crate::sector_pattern::{fill_write, BACKING_ID};
use crate::shrink::shrink;
use crate::sim_device::{CrashSnapshot, SimDevice, TraceEntry};
use crate::summary::{Progress, TargetSummary};
use crate::target::{CheckSummary, CrashTarget, GuestDisk, TargetError};
use crate::violation::{CheckKind, CrashPath, CrashStep, Reproducer, Violation};
use crate::workload::{Workload, WorkloadConfig};

/// The progress callback: called after crash points of the workload level,
/// at most every 100 ms, and once at the end.
pub type ProgressFn = dyn Fn(&Progress) + Send + Sync;

/// Shortest interval between two progress calls.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What an exploration found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Counts for the summary table.
    pub summary: TargetSummary,
    /// Violations, in the order found (the first one shrunk if enabled).
    pub violations: Vec<Violation>,
}

/// The backing device the harness gives images with a backing file: every
/// sector holds the backing pattern, so reads through to it are recognised.
#[must_use]
pub fn backing_device(len_bytes: u64) -> MemStorage {
    let mut bytes = vec![0u8; usize::try_from(len_bytes).unwrap_or(0)];
    let whole = bytes.len() / SECTOR_BYTES as usize * SECTOR_BYTES as usize;
    fill_write(&mut bytes[..whole], BACKING_ID, 0);
    MemStorage::from_bytes(bytes)
}

/// Where a level starts.
#[derive(Clone)]
enum Start {
    /// Create a new image.
    Create { size_bytes: u64 },
    /// Recover a crash image.
    Recover { image: Medium },
}

/// One run on one device (see the module documentation).
#[derive(Clone)]
struct Level {
    /// Seeds this level's random choices.
    seed: u64,
    /// The crash path that led to this level's start.
    prefix: CrashPath,
    /// 0 for the workload, 1 for a continuation, ...
    depth: u32,
    start: Start,
    workload: Workload,
    /// The model before the workload.
    model: GuestModel,
}

/// What a run of a level saw.
struct Outcome {
    /// The first crash point (after create or recovery).
    first: u64,
    /// The last crash point (after close).
    last: u64,
    trace: Vec<TraceEntry>,
}

/// What recovering a crash image that passed checks (a), (b), (c) left:
/// what the later checks of it need, and all a byte-identical image of
/// the same crash point would give (see [`crate::image_memo`]).
#[derive(Clone)]
struct Recovered {
    /// The guest content after recovery.
    observed: Arc<Observed>,
    /// Device operations recovery took.
    recovery_ops: u64,
    /// The device as recovery left it (for check (f)).
    image: Medium,
    /// Leaked clusters check (a) counted.
    leaks: u64,
    /// Whether the target checked the image before recovery.
    unrecovered_checked: bool,
}

/// What the states of one crash point share: all are judged against the
/// same model, so what one state's checks found serves the others where
/// their bytes agree.
struct PointCache {
    /// The first state fully read (see [`observe_changed`]).
    reference: Option<Reference>,
    /// Whole recoveries, by crash image content.
    images: ImageMemo<Recovered>,
    /// Checks of the crash images before recovery, by the bytes they read.
    unrecovered_checks: CheckMemo<Option<CheckSummary>>,
    /// Check (a) of the recovered images, by the bytes it read.
    recovered_checks: CheckMemo<CheckSummary>,
}

impl PointCache {
    /// An empty cache for the crash images built from `durable`.
    fn new(durable: Medium) -> Self {
        Self {
            reference: None,
            images: ImageMemo::new(durable),
            unrecovered_checks: CheckMemo::new(),
            recovered_checks: CheckMemo::new(),
        }
    }
}

/// The workload being explored, for reproducer lines.
#[derive(Clone, Default)]
struct Current {
    seed: u64,
    explicit_ops: Option<Workload>,
    ops_len: usize,
}

pub(crate) struct Inner {
    target: Arc<dyn CrashTarget>,
    config: ExploreConfig,
    backing: Option<Arc<dyn Storage>>,
    backing_bytes: u64,
    stats: Mutex<TargetSummary>,
    violations: Mutex<Vec<Violation>>,
    error: Mutex<Option<HarnessError>>,
    stop: AtomicBool,
    planned: AtomicU64,
    progress: Option<Arc<ProgressFn>>,
    start: Instant,
    last_progress: Mutex<Instant>,
    current: Mutex<Current>,
}

fn path_seed(base: u64, path: &CrashPath) -> u64 {
    path.steps.iter().fold(base, |acc, step| {
        let point = step.point.wrapping_mul(2) | u64::from(step.during_recovery);
        mix(mix(acc, point), step.state.unwrap_or(u64::MAX))
    })
}

fn target_label(target: &dyn CrashTarget) -> String {
    match target.mutation() {
        Some(m) => format!("{}+{m}", target.name()),
        None => target.name(),
    }
}

impl Inner {
    fn new(
        target: Arc<dyn CrashTarget>,
        config: &ExploreConfig,
        progress: Option<Arc<ProgressFn>>,
    ) -> Self {
        let backing_bytes = config.workload.backing_bytes();
        let backing: Option<Arc<dyn Storage>> = (backing_bytes > 0)
            .then(|| Arc::new(backing_device(backing_bytes)) as Arc<dyn Storage>);
        let stats = TargetSummary {
            target: target_label(&*target),
            ..TargetSummary::default()
        };
        let now = Instant::now();
        Self {
            target,
            config: config.clone(),
            backing,
            backing_bytes,
            stats: Mutex::new(stats),
            violations: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            stop: AtomicBool::new(false),
            planned: AtomicU64::new(0),
            progress,
            start: now,
            last_progress: Mutex::new(now),
            current: Mutex::new(Current::default()),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn fail(&self, error: HarnessError) {
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(error);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    fn violation(&self, kind: CheckKind, detail: String, path: CrashPath) {
        let current = self.current.lock().clone();
        let workload = &self.config.workload;
        let violation = Violation {
            kind,
            detail,
            reproducer: Reproducer {
                backend: self.target.name(),
                mutation: self.target.mutation(),
                workload: workload.name.clone(),
                backing: workload.backing,
                threads: workload.threads,
                seed: current.seed,
                ops: current.explicit_ops,
                path,
            },
            ops_len: current.ops_len,
            shrunk: None,
        };
        let mut violations = self.violations.lock();
        violations.push(violation);
        self.stats.lock().violations += 1;
        if violations.len() >= self.config.violations_max as usize {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn count_state(&self, depth: u32, during_recovery: bool) {
        let mut stats = self.stats.lock();
        stats.states_explored += 1;
        if during_recovery {
            stats.recovery_crash_states += 1;
        }
        if depth > 0 {
            stats.continuation_states += 1;
        }
    }

    fn report_progress(&self, force: bool) {
        let Some(progress) = &self.progress else {
            return;
        };
        {
            let mut last = self.last_progress.lock();
            if !force && last.elapsed() < PROGRESS_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let snapshot = {
            let stats = self.stats.lock();
            Progress {
                target: stats.target.clone(),
                states_explored: stats.states_explored,
                states_planned: self.planned.load(Ordering::Relaxed),
                violations: stats.violations,
                elapsed: self.start.elapsed(),
            }
        };
        progress(&snapshot);
    }

    fn new_device(&self, medium: Medium) -> Arc<SimDevice> {
        Arc::new(SimDevice::from_medium(medium, self.config.device.clone()))
    }

    /// Runs a level; with `points`, explores them in place. `quiet` (the
    /// dry run) records no violation.
    fn execute(
        self: &Arc<Self>,
        level: &Level,
        points: BTreeMap<u64, PointPlan>,
        quiet: bool,
    ) -> Result<Option<Outcome>, HarnessError> {
        let dev = match &level.start {
            Start::Create { .. } => self.new_device(Medium::new()),
            Start::Recover { image } => self.new_device(image.clone()),
        };
        let storage: Arc<dyn Storage> = dev.clone();
        let opened = match &level.start {
            Start::Create { size_bytes } => self
                .target
                .create(storage, self.backing.clone(), *size_bytes)
                .map_err(|e| HarnessError::Create {
                    target: self.target.name(),
                    message: e.to_string(),
                })?,
            Start::Recover { .. } => match self.target.open(storage, self.backing.clone()) {
                Ok(disk) => disk,
                Err(error) => {
                    if !quiet {
                        self.violation(
                            CheckKind::RecoveryFailed,
                            format!("reopening for the continuation failed: {error}"),
                            level.prefix.clone(),
                        );
                    }
                    return Ok(None);
                }
            },
        };
        let first = dev.ops_done();
        let model = Arc::new(Mutex::new(level.model.clone()));
        if !points.is_empty() {
            let inner = Arc::clone(self);
            let observer_model = Arc::clone(&model);
            let observer_level = level.clone();
            dev.set_observer(Some(Box::new(move |view| {
                if inner.stopped() {
                    return;
                }
                let Some(plan) = points.get(&view.op_index) else {
                    return;
                };
                let snapshot = view.to_owned();
                let model = observer_model.lock();
                if let Err(error) = inner.explore_point(&snapshot, &model, &observer_level, plan) {
                    inner.fail(error);
                }
                drop(model);
                if observer_level.depth == 0 {
                    inner.report_progress(false);
                }
            })));
        }
        let run_problem = self.run_and_close(opened, &model, &level.workload)?;
        // The last point has no operation after it to announce it.
        dev.observe_now();
        dev.set_observer(None);
        if let (Some((kind, detail)), false) = (run_problem, quiet) {
            let path = level.prefix.then(CrashStep {
                during_recovery: false,
                point: first,
                state: Some(0),
            });
            self.violation(kind, detail, path);
        }
        Ok(Some(Outcome {
            first,
            last: dev.ops_done(),
            trace: dev.trace(),
        }))
    }

    /// Runs the workload, checks the live content, closes. A problem found
    /// without any crash is returned as a violation to record.
    fn run_and_close(
        &self,
        disk: Box<dyn GuestDisk>,
        model: &Mutex<GuestModel>,
        workload: &Workload,
    ) -> Result<Option<(CheckKind, String)>, HarnessError> {
        match run_workload(&*disk, model, workload) {
            Ok(()) => {}
            Err(RunFailure::Model {
                index, op, source, ..
            }) => {
                return Err(HarnessError::Workload {
                    index,
                    op: op.to_string(),
                    source,
                });
            }
            Err(failure @ RunFailure::Disk { .. }) => {
                return Ok(Some((CheckKind::OpFailed, failure.to_string())));
            }
        }
        if let Err(problem) = observe(&*disk, &model.lock()) {
            return Ok(Some((CheckKind::LiveContent, problem.detail)));
        }
        if let Err(failure) = close_disk(disk, model) {
            return Ok(Some((CheckKind::OpFailed, failure.to_string())));
        }
        Ok(None)
    }

    /// The dry run and the choice of points of a budget-driven level.
    fn plan_level(
        self: &Arc<Self>,
        level: &Level,
        budget: u64,
    ) -> Result<(BTreeMap<u64, PointPlan>, u64), HarnessError> {
        let Some(outcome) = self.execute(level, BTreeMap::new(), true)? else {
            return Ok((BTreeMap::new(), 0));
        };
        Ok(choose_points(
            &outcome.trace,
            outcome.first,
            budget,
            mix(level.seed, 0x706c_616e),
            self.config.exhaustive_units_max,
            self.config.sampled_states_per_point,
        ))
    }

    /// Plans (or follows `plan`'s path) and explores one level.
    fn run_level(
        self: &Arc<Self>,
        level: &Level,
        plan: &Plan,
        budget: u64,
    ) -> Result<(), HarnessError> {
        match plan {
            Plan::Budget => {
                let (points, _) = self.plan_level(level, budget)?;
                if !points.is_empty() {
                    self.execute(level, points, false)?;
                }
                Ok(())
            }
            Plan::Path(steps) => {
                let Some(step) = steps.first() else {
                    return Ok(());
                };
                if step.during_recovery {
                    return Err(HarnessError::Config(format!(
                        "crash step r{} must follow a crash image, not start a run",
                        step.point
                    )));
                }
                let mut points = BTreeMap::new();
                points.insert(
                    step.point,
                    PointPlan {
                        state: step.state,
                        next: Plan::Path(steps[1..].to_vec()),
                    },
                );
                let crash_points_before = self.stats.lock().crash_points;
                let Some(outcome) = self.execute(level, points, false)? else {
                    return Ok(());
                };
                let reached = self.stats.lock().crash_points > crash_points_before;
                if !reached && !self.stopped() {
                    return Err(HarnessError::CrashPointBeyondTrace {
                        requested: step.point,
                        first: outcome.first,
                        last: outcome.last,
                    });
                }
                Ok(())
            }
        }
    }

    fn explore_point(
        self: &Arc<Self>,
        snapshot: &CrashSnapshot,
        model: &GuestModel,
        level: &Level,
        plan: &PointPlan,
    ) -> Result<(), HarnessError> {
        let units = CrashUnits::new(snapshot);
        let space = units.space(
            self.config.exhaustive_units_max,
            self.config.sampled_states_per_point,
        );
        {
            let mut stats = self.stats.lock();
            stats.crash_points += 1;
            if matches!(space, StateSpace::Exhaustive { .. }) {
                stats.exhaustive_points += 1;
            }
        }
        let count = space.state_count();
        let states = match plan.state {
            None => 0..count,
            Some(state) if state < count => state..state + 1,
            Some(state) => {
                return Err(HarnessError::StateBeyondSpace {
                    requested: state,
                    point: snapshot.op_index,
                    count,
                })
            }
        };
        let point_seed = mix(level.seed, snapshot.op_index);
        // Every state of this point is judged against the same model.
        let mut cache = PointCache::new(snapshot.durable.clone());
        for state in states {
            if self.stopped() {
                break;
            }
            let Some(selection) = units.selection(space, state, point_seed) else {
                break;
            };
            let image = units.image(&selection)?;
            let path = level.prefix.then(CrashStep {
                during_recovery: false,
                point: snapshot.op_index,
                state: Some(state),
            });
            self.explore_image(&image, model, &path, level, &plan.next, &mut cache)?;
        }
        Ok(())
    }

    /// Recovers `image` and runs (a), (b), (c). `None` when a violation
    /// was recorded (the image is not explored further).
    fn recover_and_check(
        &self,
        image: &Medium,
        model: &GuestModel,
        path: &CrashPath,
        cache: &mut PointCache,
    ) -> Result<Option<Recovered>, HarnessError> {
        let Some(unrecovered_checked) = self.check_unrecovered(image, path, cache) else {
            return Ok(None);
        };
        let dev = self.new_device(image.clone());
        let disk = match self.target.open(dev.clone(), self.backing.clone()) {
            Ok(disk) => disk,
            Err(error) => {
                self.violation(
                    CheckKind::RecoveryFailed,
                    format!("open failed: {error}"),
                    path.clone(),
                );
                return Ok(None);
            }
        };
        let recovery_ops = dev.ops_done();
        let recovered = dev.latest();
        let (observed, leaks) = if self.target.check_after_close() {
            // (b), (c) on the recovered disk, then (a) on the image its
            // clean close leaves; a failed check is reported before bad
            // content, as when the check runs first.
            let observed = observe_changed(&*disk, model, &dev.latest(), &mut cache.reference);
            if let Err(error) = disk.close() {
                self.violation(
                    CheckKind::RecoveryFailed,
                    format!("closing the recovered image failed: {error}"),
                    path.clone(),
                );
                return Ok(None);
            }
            let closed = cache
                .recovered_checks
                .run(&dev.latest(), |closed| self.target.check_closed(closed));
            let Some(leaks) = self.judge_check(closed, path) else {
                return Ok(None);
            };
            (observed, leaks)
        } else {
            // (a) on a copy, so a check that writes cannot disturb the rest.
            let checked = cache
                .recovered_checks
                .run(&recovered, |check_dev| self.target.check(check_dev));
            let Some(leaks) = self.judge_check(checked, path) else {
                return Ok(None);
            };
            let observed = observe_changed(&*disk, model, &dev.latest(), &mut cache.reference);
            drop(disk);
            (observed, leaks)
        };
        let observed = match observed {
            Ok(observed) => observed,
            Err(problem) => {
                self.violation(problem.kind, problem.detail, path.clone());
                return Ok(None);
            }
        };
        Ok(Some(Recovered {
            observed: Arc::new(observed),
            recovery_ops,
            image: recovered,
            leaks,
            unrecovered_checked,
        }))
    }

    /// Counts a state whose image is byte-identical to one of the same
    /// crash point that passed: as recovering and checking it would.
    fn count_known(&self, known: &Recovered) {
        if known.unrecovered_checked {
            self.stats.lock().unrecovered_checks += 1;
        }
        self.count_leaks(known.leaks);
    }

    /// (f) on a sample of the recovered images (chosen by crash path).
    fn sample_qemu(&self, recovered: &Recovered, path: &CrashPath) -> Result<(), HarnessError> {
        let every = self.config.qemu_every;
        if every > 0 && mix(path_seed(self.config.seed, path), 0x7165).is_multiple_of(every) {
            self.qemu_check(recovered.image.clone(), path)?;
        }
        Ok(())
    }

    fn count_leaks(&self, leaks: u64) {
        if leaks > 0 {
            let mut stats = self.stats.lock();
            stats.states_with_leaks += 1;
            stats.leaked_clusters += leaks;
            stats.leaked_clusters_max = stats.leaked_clusters_max.max(leaks);
        }
    }

    /// Records what check (a) of a recovered image found: leaks counted,
    /// corruption (and leaks where none are allowed) a violation. Returns
    /// the leaks when the image passed, `None` when it did not.
    fn judge_check(
        &self,
        result: Result<CheckSummary, TargetError>,
        path: &CrashPath,
    ) -> Option<u64> {
        let summary = match result {
            Ok(summary) => summary,
            Err(error) => {
                self.violation(
                    CheckKind::CheckFailed,
                    format!("check failed: {error}"),
                    path.clone(),
                );
                return None;
            }
        };
        self.count_leaks(summary.leaks);
        if summary.corruptions > 0 {
            self.violation(
                CheckKind::Corruption,
                format!(
                    "check found {} corruptions ({} leaks)",
                    summary.corruptions, summary.leaks
                ),
                path.clone(),
            );
            return None;
        }
        if summary.leaks > 0 && !self.target.leaks_allowed() {
            self.violation(
                CheckKind::Leak,
                format!(
                    "check found {} leaked clusters; this backend may leak none",
                    summary.leaks
                ),
                path.clone(),
            );
            return None;
        }
        Some(summary.leaks)
    }

    /// Checks `image` as the crash left it, read-only, before recovery:
    /// a crashed image must make sense to the checker without being opened
    /// read-write first (a `qj check` run right after the power cut). Only
    /// failures and corruptions count here; leaks are judged after
    /// recovery, which may free what the crash left allocated. Returns
    /// whether the target checked the image (`Some(false)`: it has no such
    /// check) when it passed, `None` when it did not (a violation was
    /// recorded).
    fn check_unrecovered(
        &self,
        image: &Medium,
        path: &CrashPath,
        cache: &mut PointCache,
    ) -> Option<bool> {
        let summary = match cache
            .unrecovered_checks
            .run(image, |dev| self.target.check_unrecovered(dev))
        {
            Ok(None) => return Some(false),
            Ok(Some(summary)) => summary,
            Err(error) => {
                self.violation(
                    CheckKind::CheckFailed,
                    format!("check of the unrecovered image failed: {error}"),
                    path.clone(),
                );
                return None;
            }
        };
        self.stats.lock().unrecovered_checks += 1;
        if summary.corruptions > 0 {
            self.violation(
                CheckKind::Corruption,
                format!(
                    "check of the unrecovered image found {} corruptions ({} leaks)",
                    summary.corruptions, summary.leaks
                ),
                path.clone(),
            );
            return None;
        }
        Some(true)
    }

    fn qemu_check(&self, recovered: Medium, path: &CrashPath) -> Result<(), HarnessError> {
        let export = match self.target.qemu_export(self.new_device(recovered)) {
            Ok(Some(export)) => export,
            Ok(None) => return Ok(()),
            Err(error) => {
                self.violation(
                    CheckKind::Qemu,
                    format!("exporting for qemu-img failed: {error}"),
                    path.clone(),
                );
                return Ok(());
            }
        };
        self.stats.lock().qemu_checks += 1;
        match qemu_img_check(&export.image) {
            Ok(verdict) => {
                let problems = verdict.problems(export.leaks);
                if !problems.is_empty() {
                    self.violation(CheckKind::Qemu, problems.join("; "), path.clone());
                }
            }
            Err(error) => self.violation(CheckKind::Qemu, error.to_string(), path.clone()),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn explore_image(
        self: &Arc<Self>,
        image: &Medium,
        model: &GuestModel,
        path: &CrashPath,
        level: &Level,
        next: &Plan,
        cache: &mut PointCache,
    ) -> Result<(), HarnessError> {
        self.count_state(level.depth, false);
        // An image identical to one of this point that passed would pass
        // the same way: recovery and checks depend on its bytes alone.
        let fingerprint = cache.images.fingerprint(image);
        let recovered = match cache.images.get(fingerprint, image) {
            Some(known) => {
                self.count_known(known);
                known.clone()
            }
            None => {
                let Some(recovered) = self.recover_and_check(image, model, path, cache)? else {
                    return Ok(());
                };
                cache
                    .images
                    .insert(fingerprint, image.clone(), recovered.clone());
                recovered
            }
        };
        self.sample_qemu(&recovered, path)?;
        let Recovered {
            observed,
            recovery_ops,
            ..
        } = recovered;
        let image_seed = path_seed(level.seed, path);
        // (d) crash during recovery.
        let recovery_crash = match next {
            Plan::Path(steps) => steps
                .first()
                .filter(|s| s.during_recovery)
                .map(|s| (s.point, s.state, true)),
            Plan::Budget => {
                let every = self.config.recovery_crash_every;
                (recovery_ops > 0 && every > 0 && mix(image_seed, 0x64).is_multiple_of(every)).then(
                    || {
                        (
                            Rng::new(mix(image_seed, 0x6431)).below(recovery_ops),
                            None,
                            false,
                        )
                    },
                )
            }
        };
        if let Some((point, state, exact)) = recovery_crash {
            self.crash_recovery(
                image, model, path, level, &observed, point, state, exact, image_seed, cache,
            )?;
        }
        // (e) continuation.
        let continuation = match next {
            Plan::Path(steps) => steps
                .first()
                .filter(|s| !s.during_recovery)
                .map(|_| next.clone()),
            Plan::Budget => {
                let every = self.config.continue_every;
                (level.depth < self.config.continue_depth
                    && every > 0
                    && mix(image_seed, 0x65).is_multiple_of(every))
                .then_some(Plan::Budget)
            }
        };
        if let Some(plan) = continuation {
            self.continue_after(image, model, path, level, &observed, &plan, image_seed)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn crash_recovery(
        self: &Arc<Self>,
        image: &Medium,
        model: &GuestModel,
        path: &CrashPath,
        level: &Level,
        first_recovery: &Observed,
        point: u64,
        state: Option<u64>,
        exact: bool,
        image_seed: u64,
        cache: &mut PointCache,
    ) -> Result<(), HarnessError> {
        let dev = self.new_device(image.clone());
        dev.crash_after(point)?;
        // The power cut makes this open fail (or it finished first, which
        // an exact path then reports as a point beyond the trace).
        let interrupted = self.target.open(dev.clone(), self.backing.clone());
        let reached = dev.ops_done();
        drop(interrupted);
        if reached < point {
            return Err(HarnessError::CrashPointBeyondTrace {
                requested: point,
                first: 0,
                last: reached,
            });
        }
        let snapshot = dev.snapshot();
        let units = CrashUnits::new(&snapshot);
        let space = units.space(
            self.config.exhaustive_units_max,
            self.config.sampled_states_per_point,
        );
        let count = space.state_count();
        let seed = mix(image_seed, point);
        let states = match (state, exact) {
            (Some(s), _) if s >= count => {
                return Err(HarnessError::StateBeyondSpace {
                    requested: s,
                    point,
                    count,
                })
            }
            (Some(s), _) => s..s + 1,
            (None, true) => 0..count,
            (None, false) => {
                let s = Rng::new(mix(seed, 0x73)).below(count);
                s..s + 1
            }
        };
        // The states of a crash during recovery are judged against the
        // model of the crash point being recovered: `cache` is that
        // point's.
        for s in states {
            if self.stopped() {
                break;
            }
            let Some(selection) = units.selection(space, s, seed) else {
                break;
            };
            let second_image = units.image(&selection)?;
            let second_path = path.then(CrashStep {
                during_recovery: true,
                point,
                state: Some(s),
            });
            self.count_state(level.depth, true);
            if let Some(second) =
                self.recover_and_check(&second_image, model, &second_path, cache)?
            {
                self.sample_qemu(&second, &second_path)?;
                if let Err(problem) = compare_recoveries(first_recovery, &second.observed) {
                    self.violation(problem.kind, problem.detail, second_path);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn continue_after(
        self: &Arc<Self>,
        image: &Medium,
        model: &GuestModel,
        path: &CrashPath,
        level: &Level,
        observed: &Observed,
        plan: &Plan,
        image_seed: u64,
    ) -> Result<(), HarnessError> {
        if observed.size_bytes < SECTOR_BYTES {
            return Ok(());
        }
        let continuation_model =
            GuestModel::from_observed(observed, self.backing_bytes, model.next_write_id())
                .map_err(|e| HarnessError::Config(e.to_string()))?;
        let mut workload_config: WorkloadConfig = self.config.workload.clone();
        workload_config.size_bytes = observed.size_bytes;
        workload_config.size_max_bytes = workload_config.size_max_bytes.max(observed.size_bytes);
        workload_config.ops_per_thread = self.config.continue_ops;
        workload_config.threads = 1;
        let next_level = Level {
            seed: mix(image_seed, 0x636f),
            prefix: path.clone(),
            depth: level.depth + 1,
            start: Start::Recover {
                image: image.clone(),
            },
            // The recovered image may hold snapshots the new model does
            // not know: the continuation writes and flushes only.
            workload: workload_config
                .generate(mix(image_seed, 0x6377))
                .without_snapshots(),
            model: continuation_model,
        };
        self.run_level(&next_level, plan, self.config.continue_states_budget)
    }

    fn take_report(&self) -> Result<Report, HarnessError> {
        if let Some(error) = self.error.lock().take() {
            return Err(error);
        }
        let mut summary = self.stats.lock().clone();
        summary.elapsed = self.start.elapsed();
        Ok(Report {
            summary,
            violations: std::mem::take(&mut *self.violations.lock()),
        })
    }
}

fn primary_level(
    config: &ExploreConfig,
    seed: u64,
    workload: Workload,
) -> Result<Level, HarnessError> {
    let model = GuestModel::new(
        config.workload.size_bytes,
        config.workload.backing_bytes(),
        1,
    )
    .map_err(|e| HarnessError::Config(e.to_string()))?;
    Ok(Level {
        seed: mix(seed, 0x7072),
        prefix: CrashPath::default(),
        depth: 0,
        start: Start::Create {
            size_bytes: config.workload.size_bytes,
        },
        workload,
        model,
    })
}

/// The workloads `config` names, as `target` can run them (snapshot
/// operations become flushes on a target without snapshots).
fn workloads_of(target: &dyn CrashTarget, config: &ExploreConfig) -> Vec<(u64, Workload, bool)> {
    let runnable = |w: Workload| {
        if target.supports_snapshots() {
            w
        } else {
            w.without_snapshots()
        }
    };
    match &config.ops {
        Some(ops) => vec![(config.seed, runnable(ops.clone()), true)],
        None => (0..u64::from(config.workloads))
            .map(|i| {
                let seed = config.seed.wrapping_add(i);
                (seed, runnable(config.workload.generate(seed)), false)
            })
            .collect(),
    }
}

fn set_current(inner: &Inner, seed: u64, workload: &Workload, explicit: bool) {
    *inner.current.lock() = Current {
        seed,
        explicit_ops: explicit.then(|| workload.clone()),
        ops_len: workload.len(),
    };
}

/// Explores `target` as `config` says: every workload seed, crash points
/// within the budget, all checks. Violations are findings (in the report);
/// an `Err` means the exploration itself could not run.
pub fn explore(
    target: Arc<dyn CrashTarget>,
    config: &ExploreConfig,
    progress: Option<Arc<ProgressFn>>,
) -> Result<Report, HarnessError> {
    config.validate()?;
    let inner = Arc::new(Inner::new(Arc::clone(&target), config, progress));
    let workloads = workloads_of(&*target, config);
    // Plan every workload first so the progress total is known.
    let mut plans = Vec::with_capacity(workloads.len());
    for (seed, workload, explicit) in workloads {
        let level = primary_level(config, seed, workload)?;
        set_current(&inner, seed, &level.workload, explicit);
        let (points, planned) = inner.plan_level(&level, config.states_budget)?;
        inner.planned.fetch_add(planned, Ordering::Relaxed);
        plans.push((seed, level, points, explicit));
    }
    for (seed, level, points, explicit) in plans {
        if inner.stopped() {
            break;
        }
        set_current(&inner, seed, &level.workload, explicit);
        inner.stats.lock().workloads += 1;
        inner.execute(&level, points, false)?;
    }
    inner.report_progress(true);
    let mut report = inner.take_report()?;
    shrink_first(&target, config, &mut report);
    Ok(report)
}

/// Reruns exactly one crash path of workload `config.seed` (or of
/// `config.ops`): the reproducer of a violation. A step without a state
/// explores every state of its point.
pub fn reproduce(
    target: Arc<dyn CrashTarget>,
    config: &ExploreConfig,
    path: &CrashPath,
) -> Result<Report, HarnessError> {
    config.validate()?;
    if path.steps.is_empty() {
        return Err(HarnessError::Config("the crash path is empty".to_string()));
    }
    let inner = Arc::new(Inner::new(Arc::clone(&target), config, None));
    let (seed, workload, explicit) = workloads_of(&*target, config).swap_remove(0);
    let level = primary_level(config, seed, workload)?;
    set_current(&inner, seed, &level.workload, explicit);
    inner.stats.lock().workloads += 1;
    inner.run_level(&level, &Plan::Path(path.steps.clone()), u64::MAX)?;
    let mut report = inner.take_report()?;
    shrink_first(&target, config, &mut report);
    Ok(report)
}

fn shrink_first(target: &Arc<dyn CrashTarget>, config: &ExploreConfig, report: &mut Report) {
    if !config.shrink || config.workload.threads > 1 {
        return;
    }
    let Some(first) = report.violations.first_mut() else {
        return;
    };
    let workload = match &first.reproducer.ops {
        Some(ops) => ops.clone(),
        None => config.workload.generate(first.reproducer.seed),
    };
    let mut shrink_config = config.clone();
    shrink_config.seed = first.reproducer.seed;
    if let Some(shrunk) = shrink(target, &shrink_config, first.kind, &workload) {
        if shrunk.ops_len < first.ops_len {
            first.shrunk = Some(Box::new(shrunk));
        }
    }
}

/// Runs workload `config.seed` (or `config.ops`) with a power cut armed
/// after device operation `point`, the way a real crash stops a process,
/// and returns the crash state and the model at that moment. Exploration
/// gets the same states from one observed run; this is the slow, direct
/// path (and the proof that both agree).
pub fn run_to_crash_point(
    target: Arc<dyn CrashTarget>,
    config: &ExploreConfig,
    point: u64,
) -> Result<(CrashSnapshot, GuestModel), HarnessError> {
    config.validate()?;
    let inner = Arc::new(Inner::new(Arc::clone(&target), config, None));
    let (seed, workload, _) = workloads_of(&*target, config).swap_remove(0);
    let level = primary_level(config, seed, workload)?;
    let Some(dry) = inner.execute(&level, BTreeMap::new(), true)? else {
        return Err(HarnessError::Config(
            "the dry run did not complete".to_string(),
        ));
    };
    if point < dry.first || point > dry.last {
        return Err(HarnessError::CrashPointBeyondTrace {
            requested: point,
            first: dry.first,
            last: dry.last,
        });
    }
    let dev = inner.new_device(Medium::new());
    dev.crash_after(point)?;
    let disk = target
        .create(
            dev.clone(),
            inner.backing.clone(),
            config.workload.size_bytes,
        )
        .map_err(|e| HarnessError::Create {
            target: target.name(),
            message: e.to_string(),
        })?;
    let model = Mutex::new(level.model.clone());
    // The run stops at the first operation the power cut fails; that
    // failure is the crash, not a finding.
    if run_workload(&*disk, &model, &level.workload).is_ok() {
        let _ = close_disk(disk, &model);
    }
    Ok((dev.snapshot(), model.into_inner()))
}
