//! `qj crash`: power-loss exploration of the backends with the harness of
//! `qj_model_checks`, from the command line.
//!
//! An exploration runs jobs: one per (workload seed, backend, workload
//! preset, backing file or not). Each job runs the harness on one seeded
//! workload: every subset of the pending writes at a crash point is explored
//! when at most [`qj_model_checks::EXHAUSTIVE_UNITS_DEFAULT`] (10) sector
//! units are pending (1,024 states), seeded samples beyond, crash points
//! chosen at random to fill `--states`. Jobs run on `--jobs` threads; once a
//! target has a violation, its jobs not yet started are skipped (the first
//! violation is the one shrunk and reported).
//!
//! Every violation prints a one-line reproducer (`qj crash --backend ..
//! --seed .. --crash-at .. --state ..`); given `--crash-at`, `qj crash`
//! reruns exactly that crash path.
//!
//! Backends and mutations come from the harness's lists
//! ([`qj_model_checks::BACKENDS`], [`qj_model_checks::ENGINE_BACKENDS`],
//! [`qj_model_checks::all_mutations`]); nothing here names one.
//!
//! Exit status: 0 no violation, 1 a violation (or the harness failed),
//! 2 bad usage (unknown names, unparsable numbers, a crash point or state
//! beyond the trace).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qj_model_checks::config::WORKLOADS_MAX;
use qj_model_checks::workload::THREADS_MAX;
use qj_model_checks::{
    all_mutations, crash_target, explore, mutations, qemu_img_available, reproduce, CrashPath,
    CrashTarget, ExploreConfig, HarnessError, NameError, Progress, Report, Reproducer, Summary,
    TargetSummary, Violation, Workload, WorkloadConfig, BACKENDS, ENGINE_BACKENDS, WORKLOAD_NAMES,
};
use serde::Serialize;

use crate::error::{CliError, CliResult, EXIT_FAILED};
use crate::output::{to_json, OutputFormat};
use crate::size::parse_size;

/// The name that selects every engine backend (or every workload preset).
const ALL: &str = "all";
/// The workload presets explored by default: every one. Mutations differ
/// in which preset exposes them (the journal's revoke bugs need `grow`,
/// whose disk outgrows one L2 table so that the L1 table moves and its
/// cluster is reused), and the presets cost about the same per state.
const WORKLOAD_DEFAULT: &str = ALL;
/// Seeded workloads per (backend, preset, backing) by default.
const WORKLOADS_DEFAULT: u32 = 1;
/// Primary crash states per workload by default. The defaults give each
/// backend 5 presets x 2 backing variants x 3,000 = 30,000 primary states,
/// 80,000 to 130,000 with recovery and continuation states; the three
/// engine backends take about 35 s on 2 idle cores (release build,
/// qemu-img sampled). Seed 1 of `grow` without a backing file at 3,000
/// states is the configuration `qj_model_checks`' own test proves the
/// journal mutations on, so the default contains it.
const STATES_DEFAULT: u64 = 3000;
/// One checked image in this many is also checked by `qemu-img` (check
/// (f)) when it is installed: a check spawns two processes, so a dense
/// sample would dominate the run time.
const QEMU_EVERY_DEFAULT: u64 = 200;
/// Most exploration threads.
const JOBS_MAX: usize = 64;
/// Most jobs one invocation may plan (seeds x targets x presets x backing).
const JOB_COUNT_MAX: u64 = 10_000_000;

/// Arguments of `qj crash`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CrashArgs {
    /// Explore a recorded log instead of generated workloads.
    #[command(subcommand)]
    action: Option<CrashAction>,
    /// Backend to explore, or `all` for every engine backend.
    #[arg(long, value_name = "NAME|all")]
    backend: Option<String>,
    /// Inject this ordering bug (a name from --list-mutations); the run
    /// must find a violation. Without --backend, the backend that has the
    /// mutation is used.
    #[arg(long, value_name = "NAME")]
    mutate: Option<String>,
    /// Print every mutation name, one a line (`backend/name` where a name
    /// exists on several backends), and exit.
    #[arg(long, exclusive = true)]
    list_mutations: bool,
    /// Workload preset, or `all` for every preset (each a job per seed and
    /// backing variant).
    #[arg(long, value_name = "NAME|all", default_value = WORKLOAD_DEFAULT)]
    workload: String,
    /// First workload seed; workloads use SEED, SEED+1, ... Default 1, or
    /// with --mutate the seed known to expose that mutation.
    #[arg(long, value_name = "N", value_parser = parse_seed)]
    seed: Option<u64>,
    /// Seeded workloads per backend, preset and backing variant.
    #[arg(long, value_name = "N", conflicts_with_all = ["crash_at", "ops"],
          default_value_t = WORKLOADS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(WORKLOADS_MAX)))]
    workloads: u32,
    /// Budget of primary crash states per workload (recovery and
    /// continuation states come on top).
    #[arg(long, value_name = "N", conflicts_with = "crash_at",
          default_value_t = STATES_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    states: u64,
    /// An explicit operation list instead of generated workloads, e.g.
    /// 'w0+8,f,d4+2,g4096|w9+1'.
    #[arg(long, value_name = "LIST")]
    ops: Option<String>,
    /// Reproduce one crash path: crash points, outermost first (`rK`: a
    /// crash during recovery).
    #[arg(long, value_name = "K[/K..]")]
    crash_at: Option<String>,
    /// The crash state at each point of --crash-at (default: every state
    /// of each point).
    #[arg(long, value_name = "S[/S..]", requires = "crash_at")]
    state: Option<String>,
    /// Guest threads of each workload (more than 1 does not reproduce
    /// exactly).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(THREADS_MAX)))]
    threads: Option<u32>,
    /// Only images with a backing file (default: without and with, as
    /// separate jobs).
    #[arg(long)]
    backing: bool,
    /// Only images without a backing file.
    #[arg(long, conflicts_with = "backing")]
    no_backing: bool,
    /// The cluster granularity of generated workloads: request sizes and
    /// alignments are drawn around it. The images keep their backend's own
    /// cluster size (the harness does not yet let it be chosen by name).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cluster_size: Option<u64>,
    /// Check one recovered image in N with qemu-img too (0: never; default
    /// 200 when qemu-img is installed).
    #[arg(long, value_name = "N")]
    qemu_every: Option<u64>,
    /// Report violations as found, without shrinking them.
    #[arg(long)]
    no_shrink: bool,
    /// Shrink a violation reproduced with --crash-at too (exploring shrinks
    /// by default; a reproducer line is rerun as is, quickly, since the run
    /// that printed it also printed its shrunk form).
    #[arg(long, conflicts_with = "no_shrink", requires = "crash_at")]
    shrink: bool,
    /// Exploration threads (default: the machine's cores).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=JOBS_MAX as i64))]
    jobs: Option<u32>,
    /// Output format: the summary (and violations) as text or JSON.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

fn parse_seed(text: &str) -> Result<u64, String> {
    text.parse::<u64>().map_err(|_| {
        format!(
            "'{text}' is not a seed (valid: a whole number 0..={})",
            u64::MAX
        )
    })
}

/// One backend to explore, with its injected bug.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetChoice {
    backend: &'static str,
    mutation: Option<&'static str>,
}

impl TargetChoice {
    /// The label the harness gives this target in its summary.
    fn label(&self) -> String {
        match self.mutation {
            Some(m) => format!("{}+{m}", self.backend),
            None => self.backend.to_string(),
        }
    }
}

fn name_error(kind: &'static str, name: &str, valid: &[&str]) -> CliError {
    CliError::Usage(format!("crash: {}", NameError::new(kind, name, valid)))
}

fn backend_names_with_all() -> Vec<&'static str> {
    std::iter::once(ALL)
        .chain(BACKENDS.iter().copied())
        .collect()
}

/// The `--list-mutations` names: the bare name where it is unique across
/// backends, `backend/name` where it is not, so a script can loop over the
/// list and pass each line to `--mutate` unchanged.
fn mutation_names() -> Vec<String> {
    let all = all_mutations();
    all.iter()
        .map(|&(backend, mutation)| {
            let holders = all.iter().filter(|&&(_, m)| m == mutation).count();
            if holders == 1 {
                mutation.to_string()
            } else {
                format!("{backend}/{mutation}")
            }
        })
        .collect()
}

/// Finds the backend of `--mutate NAME` (or `backend/NAME`).
fn resolve_mutation(backend: Option<&str>, name: &str) -> CliResult<TargetChoice> {
    let all = all_mutations();
    let listed = mutation_names();
    let listed: Vec<&str> = listed.iter().map(String::as_str).collect();
    let (backend, mutation) = match name.split_once('/') {
        Some((b, m)) => match backend {
            Some(given) if given != b => {
                return Err(CliError::Usage(format!(
                    "crash: --mutate {name} names backend '{b}' but --backend is '{given}'"
                )))
            }
            _ => (Some(b), m),
        },
        None => (backend, name),
    };
    let found = match backend {
        Some(b) => {
            let Some(&backend) = BACKENDS.iter().find(|&&known| known == b) else {
                return Err(name_error("backend", b, &backend_names_with_all()));
            };
            let Some(&mutation) = mutations(backend).iter().find(|&&m| m == mutation) else {
                return Err(name_error("mutation", mutation, mutations(backend)));
            };
            TargetChoice {
                backend,
                mutation: Some(mutation),
            }
        }
        None => {
            let holders: Vec<&(&str, &str)> = all.iter().filter(|&&(_, m)| m == mutation).collect();
            match holders.as_slice() {
                [] => return Err(name_error("mutation", name, &listed)),
                [(backend, mutation)] => TargetChoice {
                    backend,
                    mutation: Some(mutation),
                },
                several => {
                    let choices: Vec<String> =
                        several.iter().map(|(b, m)| format!("{b}/{m}")).collect();
                    return Err(CliError::Usage(format!(
                        "crash: mutation '{mutation}' exists on several backends; name one of: {}",
                        choices.join(", ")
                    )));
                }
            }
        }
    };
    Ok(found)
}

/// The targets the arguments select.
fn resolve_targets(args: &CrashArgs) -> CliResult<Vec<TargetChoice>> {
    // `--backend all` with a mutation means "whichever backend has it".
    let backend = args.backend.as_deref().filter(|&b| b != ALL);
    if let Some(name) = &args.mutate {
        return Ok(vec![resolve_mutation(backend, name)?]);
    }
    match backend {
        None => Ok(ENGINE_BACKENDS
            .iter()
            .map(|&backend| TargetChoice {
                backend,
                mutation: None,
            })
            .collect()),
        Some(name) => match BACKENDS.iter().find(|&&b| b == name) {
            Some(&backend) => Ok(vec![TargetChoice {
                backend,
                mutation: None,
            }]),
            None => Err(name_error("backend", name, &backend_names_with_all())),
        },
    }
}

fn resolve_workloads(name: &str) -> CliResult<Vec<&'static str>> {
    if name == ALL {
        return Ok(WORKLOAD_NAMES.to_vec());
    }
    match WORKLOAD_NAMES.iter().find(|&&w| w == name) {
        Some(&w) => Ok(vec![w]),
        None => {
            let valid: Vec<&str> = WORKLOAD_NAMES
                .iter()
                .copied()
                .chain(std::iter::once(ALL))
                .collect();
            Err(name_error("workload", name, &valid))
        }
    }
}

/// Harness errors caused by the arguments are usage errors (exit 2); the
/// rest (I/O, a target that cannot create an image) are failures.
fn harness_error(error: HarnessError) -> CliError {
    match error {
        HarnessError::Name(_)
        | HarnessError::Parse(_)
        | HarnessError::Config(_)
        | HarnessError::Workload { .. }
        | HarnessError::CrashPointBeyondTrace { .. }
        | HarnessError::StateBeyondSpace { .. } => CliError::Usage(format!("crash: {error}")),
        HarnessError::Create { .. } | HarnessError::Io(_) => {
            CliError::failed("crash", error.to_string())
        }
    }
}

/// Everything a job needs besides its coordinates.
struct Plan {
    targets: Vec<TargetChoice>,
    workloads: Vec<&'static str>,
    /// Backing file variants (false: none).
    backings: Vec<bool>,
    seed_first: u64,
    seeds: u64,
    ops: Option<Workload>,
    threads: u32,
    cluster_bytes: Option<u64>,
    states_budget: u64,
    qemu_every: u64,
    shrink: bool,
}

/// One exploration job.
#[derive(Debug, Clone)]
struct Job {
    target: TargetChoice,
    workload: &'static str,
    backing: bool,
    seed: u64,
}

impl Plan {
    fn job_count(&self) -> CliResult<u64> {
        let count = [
            self.seeds,
            self.targets.len() as u64,
            self.workloads.len() as u64,
            self.backings.len() as u64,
        ]
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n))
        .filter(|&n| n <= JOB_COUNT_MAX);
        count.ok_or_else(|| {
            CliError::Usage(format!(
                "crash: more than {JOB_COUNT_MAX} jobs (workloads x backends x presets x backing variants); lower --workloads"
            ))
        })
    }

    /// Job `index`: the backing variant varies fastest, then the preset,
    /// then the backend, then the seed, so that every kind of image is
    /// explored early and a target's early stop (a violation) has seen them.
    fn job(&self, index: u64) -> Job {
        let backings = self.backings.len() as u64;
        let workloads = self.workloads.len() as u64;
        let targets = self.targets.len() as u64;
        assert!(backings > 0 && workloads > 0 && targets > 0);
        let backing = self.backings[(index % backings) as usize];
        let rest = index / backings;
        let workload = self.workloads[(rest % workloads) as usize];
        let rest = rest / workloads;
        let target = self.targets[(rest % targets) as usize].clone();
        let seed_index = rest / targets;
        assert!(seed_index < self.seeds);
        Job {
            target,
            workload,
            backing,
            seed: self.seed_first.wrapping_add(seed_index),
        }
    }

    fn config(&self, job: &Job) -> CliResult<ExploreConfig> {
        let mut workload = WorkloadConfig::preset(job.workload)
            .map_err(|e| CliError::Usage(format!("crash: {e}")))?;
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

    fn target(&self, job: &Job) -> CliResult<Arc<dyn CrashTarget>> {
        crash_target(job.target.backend, job.target.mutation)
            .map_err(|e| CliError::Usage(format!("crash: {e}")))
    }
}

/// Flags a reproducer line needs beyond what the harness writes: settings
/// that are not the defaults and change which states exist.
fn reproducer_extra(plan: &Plan, qemu_every_given: bool) -> String {
    let mut extra = String::new();
    if let Some(bytes) = plan.cluster_bytes {
        extra.push_str(&format!(" --cluster-size {bytes}"));
    }
    // Which images qemu-img checks depends on the rate.
    if qemu_every_given {
        extra.push_str(&format!(" --qemu-every {}", plan.qemu_every));
    }
    extra
}

fn reproducer_line(reproducer: &Reproducer, extra: &str) -> String {
    format!("{reproducer}{extra}")
}

/// A violation as printed: what failed, where, and the one-line reproducer
/// (and the shrunk one).
fn violation_text(violation: &Violation, extra: &str) -> String {
    let mut text = format!(
        "violation {} at {}: {}\n  reproduce ({} ops): {}",
        violation.kind,
        violation.reproducer.path,
        violation.detail,
        violation.ops_len,
        reproducer_line(&violation.reproducer, extra)
    );
    if let Some(shrunk) = &violation.shrunk {
        text.push_str(&format!(
            "\n  shrunk to {} ops: {}\n  reproduce shrunk: {}",
            shrunk.ops_len,
            shrunk.detail,
            reproducer_line(&shrunk.reproducer, extra)
        ));
    }
    text
}

/// Where one job stands, for the progress bar.
#[derive(Clone, Copy, Default)]
struct JobProgress {
    states_explored: u64,
    /// Planned primary states until the job ends, then what it explored.
    states_expected: u64,
    violations: u64,
}

/// Progress of all jobs, for one bar.
struct ProgressBoard {
    bar: ProgressBar,
    /// By job index.
    jobs: Mutex<Vec<JobProgress>>,
}

impl ProgressBoard {
    fn new(job_count: usize, states_budget: u64, visible: bool) -> Self {
        let expected = states_budget.saturating_mul(job_count as u64);
        let bar = if visible {
            let bar = ProgressBar::with_draw_target(Some(expected), ProgressDrawTarget::stderr());
            // Short enough for an 80-column terminal: a wrapped bar redraws
            // as a scrolling mess.
            bar.set_style(
                ProgressStyle::with_template(
                    "[{elapsed_precise}] [{bar:20}] {pos}/{len} states, eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let job = JobProgress {
            states_expected: states_budget,
            ..JobProgress::default()
        };
        Self {
            bar,
            jobs: Mutex::new(vec![job; job_count]),
        }
    }

    fn update(&self, index: usize, job: JobProgress) {
        let total = {
            let mut jobs = lock(&self.jobs);
            if let Some(slot) = jobs.get_mut(index) {
                *slot = job;
            }
            jobs.iter()
                .fold(JobProgress::default(), |sum, j| JobProgress {
                    states_explored: sum.states_explored.saturating_add(j.states_explored),
                    states_expected: sum
                        .states_expected
                        .saturating_add(j.states_expected.max(j.states_explored)),
                    violations: sum.violations.saturating_add(j.violations),
                })
        };
        self.bar.set_length(total.states_expected);
        self.bar.set_position(total.states_explored);
        if total.violations > 0 {
            self.bar
                .set_message(format!("{} violations", total.violations));
        }
    }

    /// A skipped job expects nothing more.
    fn skip(&self, index: usize) {
        self.update(index, JobProgress::default());
    }

    /// A finished job expects nothing more than it explored.
    fn finish(&self, index: usize, summary: &TargetSummary) {
        self.update(
            index,
            JobProgress {
                states_explored: summary.states_explored,
                states_expected: summary.states_explored,
                violations: summary.violations,
            },
        );
    }
}

/// What one job gave.
enum JobOutcome {
    Done(Box<Report>),
    /// Its target already had a violation when its turn came.
    Skipped,
}

/// Locks a mutex whose holder cannot leave it inconsistent (every critical
/// section here is a single store or read), so a poisoned lock is usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs every job of `plan` on `threads` threads; the reports come back in
/// job order whatever the threads' timing.
fn run_jobs(
    plan: &Plan,
    job_count: usize,
    threads: usize,
    board: &Arc<ProgressBoard>,
) -> CliResult<Vec<(Job, Report)>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let mut slots: Vec<Option<CliResult<JobOutcome>>> = Vec::with_capacity(job_count);
    slots.resize_with(job_count, || None);
    let results = Mutex::new(slots);
    // Labels of targets with a violation: their later jobs are skipped.
    let caught: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let worker = || loop {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let index = next.fetch_add(1, Ordering::Relaxed);
        if index >= job_count {
            return;
        }
        let job = plan.job(index as u64);
        let label = job.target.label();
        let outcome = if lock(&caught).contains(&label) {
            board.skip(index);
            Ok(JobOutcome::Skipped)
        } else {
            run_job(plan, &job, index, board)
        };
        match &outcome {
            Ok(JobOutcome::Done(report)) if !report.violations.is_empty() => {
                lock(&caught).push(label);
            }
            Ok(_) => {}
            Err(_) => failed.store(true, Ordering::Relaxed),
        }
        if let Some(slot) = lock(&results).get_mut(index) {
            *slot = Some(outcome);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(worker);
        }
    });
    let mut done = Vec::with_capacity(job_count);
    let slots = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    for (index, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(Ok(JobOutcome::Done(report))) => done.push((plan.job(index as u64), *report)),
            // The first failure in job order is the one reported.
            Some(Err(error)) => return Err(error),
            // Skipped jobs, and jobs never started after a failure.
            Some(Ok(JobOutcome::Skipped)) | None => {}
        }
    }
    Ok(done)
}

fn run_job(
    plan: &Plan,
    job: &Job,
    index: usize,
    board: &Arc<ProgressBoard>,
) -> CliResult<JobOutcome> {
    let config = plan.config(job)?;
    let target = plan.target(job)?;
    let callback_board = Arc::clone(board);
    let progress: Arc<qj_model_checks::ProgressFn> = Arc::new(move |p: &Progress| {
        callback_board.update(
            index,
            JobProgress {
                states_explored: p.states_explored,
                states_expected: p.states_planned,
                violations: p.violations,
            },
        );
    });
    let report = explore(target, &config, Some(progress)).map_err(harness_error)?;
    board.finish(index, &report.summary);
    Ok(JobOutcome::Done(Box::new(report)))
}

/// Sums the rows of one target.
fn merge_into(into: &mut TargetSummary, row: &TargetSummary) {
    into.workloads += row.workloads;
    into.crash_points += row.crash_points;
    into.states_explored += row.states_explored;
    into.recovery_crash_states += row.recovery_crash_states;
    into.continuation_states += row.continuation_states;
    into.exhaustive_points += row.exhaustive_points;
    into.violations += row.violations;
    into.states_with_leaks += row.states_with_leaks;
    into.leaked_clusters += row.leaked_clusters;
    into.leaked_clusters_max = into.leaked_clusters_max.max(row.leaked_clusters_max);
    into.qemu_checks += row.qemu_checks;
    into.unrecovered_checks += row.unrecovered_checks;
    into.elapsed += row.elapsed;
}

/// One row per target, in the order of `targets` (a target whose jobs
/// were all skipped keeps an empty row), then rows under labels no target
/// predicted, so that nothing explored goes unreported. A row's time is
/// the sum of its jobs' times, so its states/s is the rate of one
/// exploration thread.
fn summarize(targets: &[TargetChoice], reports: &[(Job, Report)]) -> Summary {
    let mut rows: BTreeMap<String, TargetSummary> = BTreeMap::new();
    for (_, report) in reports {
        let row = rows
            .entry(report.summary.target.clone())
            .or_insert_with(|| TargetSummary {
                target: report.summary.target.clone(),
                ..TargetSummary::default()
            });
        merge_into(row, &report.summary);
    }
    let mut ordered: Vec<TargetSummary> = targets
        .iter()
        .map(|t| {
            rows.remove(&t.label()).unwrap_or_else(|| TargetSummary {
                target: t.label(),
                ..TargetSummary::default()
            })
        })
        .collect();
    ordered.extend(rows.into_values());
    Summary { rows: ordered }
}

/// `--output json`: the summary rows and the violations.
#[derive(Serialize)]
struct JsonRun {
    states_explored: u64,
    violations: u64,
    elapsed_s: f64,
    targets: Vec<JsonTarget>,
    findings: Vec<JsonViolation>,
}

#[derive(Serialize)]
struct JsonTarget {
    target: String,
    workloads: u64,
    crash_points: u64,
    exhaustive_points: u64,
    states_explored: u64,
    recovery_crash_states: u64,
    continuation_states: u64,
    violations: u64,
    states_with_leaks: u64,
    leaked_clusters: u64,
    leaked_clusters_max: u64,
    qemu_checks: u64,
    unrecovered_checks: u64,
    states_per_s: f64,
}

#[derive(Serialize)]
struct JsonViolation {
    check: String,
    detail: String,
    ops: usize,
    reproduce: String,
    shrunk: Option<Box<JsonViolation>>,
}

impl JsonViolation {
    fn new(v: &Violation, extra: &str) -> Self {
        Self {
            check: v.kind.to_string(),
            detail: v.detail.clone(),
            ops: v.ops_len,
            reproduce: reproducer_line(&v.reproducer, extra),
            shrunk: v.shrunk.as_ref().map(|s| Box::new(Self::new(s, extra))),
        }
    }
}

impl JsonTarget {
    fn new(row: &TargetSummary) -> Self {
        Self {
            target: row.target.clone(),
            workloads: row.workloads,
            crash_points: row.crash_points,
            exhaustive_points: row.exhaustive_points,
            states_explored: row.states_explored,
            recovery_crash_states: row.recovery_crash_states,
            continuation_states: row.continuation_states,
            violations: row.violations,
            states_with_leaks: row.states_with_leaks,
            leaked_clusters: row.leaked_clusters,
            leaked_clusters_max: row.leaked_clusters_max,
            qemu_checks: row.qemu_checks,
            unrecovered_checks: row.unrecovered_checks,
            states_per_s: row.states_per_second(),
        }
    }
}

fn print_results(
    format: OutputFormat,
    summary: &Summary,
    violations: &[&Violation],
    extra: &str,
    elapsed: Duration,
) -> CliResult<()> {
    let states: u64 = summary.rows.iter().map(|r| r.states_explored).sum();
    match format {
        OutputFormat::Json => {
            let run = JsonRun {
                states_explored: states,
                violations: summary.violations(),
                elapsed_s: elapsed.as_secs_f64(),
                targets: summary.rows.iter().map(JsonTarget::new).collect(),
                findings: violations
                    .iter()
                    .map(|v| JsonViolation::new(v, extra))
                    .collect(),
            };
            println!("{}", to_json(&run)?);
        }
        OutputFormat::Human => {
            for violation in violations {
                println!("{}", violation_text(violation, extra));
            }
            print!("{summary}");
            println!(
                "crash: {states} states explored, {} violations",
                summary.violations()
            );
        }
    }
    Ok(())
}

/// What `qj crash` does besides exploring generated workloads.
#[derive(Debug, clap::Subcommand)]
pub enum CrashAction {
    /// Explore the crash states of a dm-log-writes log of a qcow2 image
    /// (from `qj io --log-writes` or QEMU's blklogwrites) and check each.
    Replay(crate::cmd::crash_replay::ReplayArgs),
}

/// Runs `qj crash`.
pub fn run(args: CrashArgs) -> CliResult<u8> {
    if let Some(CrashAction::Replay(replay)) = args.action {
        return crate::cmd::crash_replay::run(replay);
    }
    if args.list_mutations {
        for name in mutation_names() {
            println!("{name}");
        }
        return Ok(0);
    }
    let targets = resolve_targets(&args)?;
    let workloads = resolve_workloads(&args.workload)?;
    let ops = match &args.ops {
        Some(text) => Some(
            text.parse::<Workload>()
                .map_err(|e| CliError::Usage(format!("crash: {e}")))?,
        ),
        None => None,
    };
    if ops.is_some() && workloads.len() > 1 {
        return Err(CliError::Usage(
            "crash: --ops runs one operation list: name one --workload (it labels reproducer lines)"
                .into(),
        ));
    }
    let threads = match (&ops, args.threads) {
        (Some(ops), Some(given)) if ops.threads.len() != given as usize => {
            return Err(CliError::Usage(format!(
                "crash: --threads {given} but the --ops list has {} threads ('|' separates threads)",
                ops.threads.len()
            )))
        }
        (Some(ops), _) => u32::try_from(ops.threads.len()).unwrap_or(u32::MAX),
        (None, given) => given.unwrap_or(1),
    };
    let path = match &args.crash_at {
        Some(points) => Some(
            CrashPath::parse(points, args.state.as_deref())
                .map_err(|e| CliError::Usage(format!("crash: {e}")))?,
        ),
        None => None,
    };
    let qemu_installed = qemu_img_available();
    let qemu_every = match args.qemu_every {
        Some(0) => 0,
        Some(n) if !qemu_installed => {
            return Err(CliError::Usage(format!(
                "crash: --qemu-every {n} needs qemu-img, which is not installed \
                 (use --qemu-every 0)"
            )))
        }
        Some(n) => n,
        None if !qemu_installed => 0,
        // The same default for exploring and reproducing: whether an image
        // is in the sample depends on the rate, and a reproduced violation
        // found by qemu-img must be sampled again.
        None => QEMU_EVERY_DEFAULT,
    };
    let backings = match (args.backing, args.no_backing, path.is_some()) {
        (true, _, _) => vec![true],
        // A reproducer line names --backing when it needs it.
        (false, _, true) | (false, true, _) => vec![false],
        (false, false, false) => vec![false, true],
    };
    let plan = Plan {
        targets,
        workloads,
        backings,
        seed_first: args.seed.unwrap_or_else(|| {
            args.mutate.as_deref().map_or(1, |m| {
                qj_model_checks::exposing_seed(m.rsplit('/').next().unwrap_or(m))
            })
        }),
        seeds: if ops.is_some() {
            1
        } else {
            u64::from(args.workloads)
        },
        ops,
        threads,
        cluster_bytes: args.cluster_size,
        states_budget: args.states,
        qemu_every,
        shrink: if path.is_some() {
            args.shrink
        } else {
            !args.no_shrink
        },
    };
    // Every job shares these settings: a bad one is reported once, before
    // any work, rather than by every job.
    plan.config(&plan.job(0))?
        .validate()
        .map_err(harness_error)?;
    let extra = reproducer_extra(&plan, args.qemu_every.is_some());
    let started = Instant::now();
    let reports = match &path {
        Some(path) => vec![reproduce_one(&plan, path)?],
        None => {
            let job_count = usize::try_from(plan.job_count()?)
                .map_err(|_| CliError::Usage("crash: too many jobs for this machine".into()))?;
            let threads = args
                .jobs
                .map(|n| n as usize)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                })
                .clamp(1, JOBS_MAX)
                .min(job_count);
            let board = Arc::new(ProgressBoard::new(
                job_count,
                plan.states_budget,
                std::io::stderr().is_terminal(),
            ));
            let reports = run_jobs(&plan, job_count, threads, &board);
            board.bar.finish_and_clear();
            reports?
        }
    };
    let summary = summarize(&plan.targets, &reports);
    let violations: Vec<&Violation> = reports
        .iter()
        .flat_map(|(_, report)| report.violations.iter())
        .collect();
    print_results(
        args.output,
        &summary,
        &violations,
        &extra,
        started.elapsed(),
    )?;
    Ok(if summary.violations() > 0 {
        EXIT_FAILED
    } else {
        0
    })
}

/// `--crash-at`: reruns one crash path of one target and workload.
fn reproduce_one(plan: &Plan, path: &CrashPath) -> CliResult<(Job, Report)> {
    let one = |what: &str, count: usize| {
        if count == 1 {
            Ok(())
        } else {
            Err(CliError::Usage(format!(
                "crash: --crash-at reproduces one path: name one {what}"
            )))
        }
    };
    one("--backend", plan.targets.len())?;
    one("--workload", plan.workloads.len())?;
    let job = plan.job(0);
    let config = plan.config(&job)?;
    let report = reproduce(plan.target(&job)?, &config, path).map_err(harness_error)?;
    Ok((job, report))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn plan(seeds: u64, backings: Vec<bool>) -> Plan {
        Plan {
            targets: resolve_targets_for(None, None),
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

    fn resolve_targets_for(backend: Option<&str>, mutate: Option<&str>) -> Vec<TargetChoice> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: CrashArgs,
        }
        let mut argv = vec!["crash".to_string()];
        if let Some(b) = backend {
            argv.extend(["--backend".to_string(), b.to_string()]);
        }
        if let Some(m) = mutate {
            argv.extend(["--mutate".to_string(), m.to_string()]);
        }
        resolve_targets(&Wrapper::parse_from(argv).args).unwrap()
    }

    #[test]
    fn jobs_cover_every_combination_once_with_backing_varying_fastest() {
        let plan = plan(3, vec![false, true]);
        let count = plan.job_count().unwrap();
        let expected = 3 * ENGINE_BACKENDS.len() * WORKLOAD_NAMES.len() * 2;
        assert_eq!(count, expected as u64);
        let jobs: Vec<Job> = (0..count).map(|i| plan.job(i)).collect();
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
    fn too_many_jobs_is_a_usage_error_not_an_overflow() {
        let mut plan = plan(u64::MAX, vec![false, true]);
        assert!(matches!(plan.job_count(), Err(CliError::Usage(_))));
        plan.seeds = JOB_COUNT_MAX;
        assert!(matches!(plan.job_count(), Err(CliError::Usage(_))));
    }

    #[test]
    fn every_listed_mutation_resolves_to_its_backend() {
        let listed = mutation_names();
        let all = all_mutations();
        assert_eq!(listed.len(), all.len());
        for (name, &(backend, mutation)) in listed.iter().zip(&all) {
            let want = vec![TargetChoice {
                backend,
                mutation: Some(mutation),
            }];
            assert_eq!(resolve_targets_for(None, Some(name)), want, "{name}");
            assert_eq!(resolve_targets_for(Some(ALL), Some(name)), want, "{name}");
            assert_eq!(
                resolve_targets_for(Some(backend), Some(mutation)),
                want,
                "{name}"
            );
            let qualified = format!("{backend}/{mutation}");
            assert_eq!(resolve_targets_for(None, Some(&qualified)), want);
        }
        let foreign = BACKENDS
            .iter()
            .find(|&&b| !mutations(b).contains(&all[0].1))
            .expect("a backend without the first mutation");
        let error = resolve_mutation(Some(foreign), all[0].1).unwrap_err();
        assert!(matches!(error, CliError::Usage(_)), "{error}");
        let error = resolve_mutation(Some(foreign), &format!("{}/{}", all[0].0, all[0].1));
        assert!(
            error.unwrap_err().to_string().contains("--backend"),
            "a qualified name and another --backend disagree"
        );
    }

    #[test]
    fn default_backend_is_every_engine_backend() {
        let targets = resolve_targets_for(None, None);
        let names: Vec<&str> = targets.iter().map(|t| t.backend).collect();
        assert_eq!(names, ENGINE_BACKENDS);
        assert_eq!(resolve_targets_for(Some(ALL), None), targets);
    }

    #[test]
    fn argument_problems_exit_2_and_harness_failures_exit_1() {
        let beyond = HarnessError::CrashPointBeyondTrace {
            requested: 9,
            first: 2,
            last: 5,
        };
        assert_eq!(harness_error(beyond).exit_code(), crate::error::EXIT_USAGE);
        let io = HarnessError::Io(std::io::Error::other("disk on fire"));
        assert_eq!(harness_error(io).exit_code(), EXIT_FAILED);
    }

    #[test]
    fn rows_merge_per_target_in_target_order() {
        let targets = resolve_targets_for(None, None);
        let job = |backend: &'static str| Job {
            target: TargetChoice {
                backend,
                mutation: None,
            },
            workload: WORKLOAD_NAMES[0],
            backing: false,
            seed: 1,
        };
        let report = |backend: &str, states: u64, leaks_max: u64| Report {
            summary: TargetSummary {
                target: backend.to_string(),
                workloads: 1,
                states_explored: states,
                leaked_clusters_max: leaks_max,
                elapsed: Duration::from_secs(1),
                ..TargetSummary::default()
            },
            violations: Vec::new(),
        };
        let last = *ENGINE_BACKENDS.last().unwrap();
        let reports = vec![
            (job(last), report(last, 10, 3)),
            (job(last), report(last, 5, 7)),
        ];
        let summary = summarize(&targets, &reports);
        assert_eq!(summary.rows.len(), targets.len());
        let row = summary.rows.last().unwrap();
        assert_eq!(row.target, last);
        assert_eq!(
            (row.workloads, row.states_explored, row.leaked_clusters_max),
            (2, 15, 7)
        );
        assert_eq!(row.elapsed, Duration::from_secs(2));
        // A target whose jobs all were skipped keeps an empty row.
        if targets.len() > 1 {
            assert_eq!(summary.rows[0].states_explored, 0);
        }
        // A label no target predicted is still reported, last.
        let mut with_stray = reports.clone();
        with_stray.push((job(last), report("stray", 4, 0)));
        let summary = summarize(&targets, &with_stray);
        assert_eq!(summary.rows.len(), targets.len() + 1);
        assert_eq!(summary.rows.last().unwrap().target, "stray");
        assert_eq!(summary.rows.last().unwrap().states_explored, 4);
    }
}
