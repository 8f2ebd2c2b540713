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
//! violation is the one shrunk and reported). Planning, scheduling and
//! merging are the library's ([`qj_model_checks::campaign`]); this module
//! parses the arguments, draws the progress bar and prints.
//!
//! `--shard K/N` runs one deterministic slice of the jobs (the index can
//! also come from a Kubernetes indexed Job or a Slurm array, see
//! [`qj_model_checks::campaign::Shard`]); `qj crash merge` joins the
//! shards' `--output json` summaries into the summary of the whole run.
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

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qj_model_checks::campaign::{
    run_campaign, Campaign, CampaignProgress, CampaignRecord, CampaignTarget, JobProgress, Shard,
    ShardSet, JOBS_MAX,
};
use qj_model_checks::config::WORKLOADS_MAX;
use qj_model_checks::workload::THREADS_MAX;
use qj_model_checks::{
    all_mutations, mutations, qemu_img_available, reproduce, CrashPath, HarnessError, NameError,
    Workload, BACKENDS, ENGINE_BACKENDS, WORKLOAD_NAMES,
};

use crate::cmd::crash_output::print_record;
use crate::error::{CliError, CliResult, EXIT_FAILED};
use crate::output::OutputFormat;
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
    /// Run only shard K of N (0-based) of the jobs: shards are disjoint
    /// and together are the whole run; `qj crash merge` joins their JSON
    /// summaries. Without it, the index comes from JOB_COMPLETION_INDEX
    /// (Kubernetes indexed Job) or SLURM_ARRAY_TASK_ID (Slurm array) when
    /// set.
    #[arg(long, value_name = "K/N", conflicts_with_all = ["crash_at", "shards"],
          value_parser = parse_shard)]
    shard: Option<Shard>,
    /// The shard count when the index comes from the environment: the
    /// indexed Job's completions (Slurm's SLURM_ARRAY_TASK_COUNT is used
    /// when this is absent).
    #[arg(long, value_name = "N", conflicts_with = "crash_at",
          value_parser = clap::value_parser!(u64).range(1..))]
    shards: Option<u64>,
    /// Exploration threads (default: the machine's cores).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=JOBS_MAX as i64))]
    jobs: Option<u32>,
    /// Output format: the summary (and violations) as text or JSON.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
}

fn parse_shard(text: &str) -> Result<Shard, String> {
    text.parse::<Shard>().map_err(|e| e.to_string())
}

fn parse_seed(text: &str) -> Result<u64, String> {
    text.parse::<u64>().map_err(|_| {
        format!(
            "'{text}' is not a seed (valid: a whole number 0..={})",
            u64::MAX
        )
    })
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
fn resolve_mutation(backend: Option<&str>, name: &str) -> CliResult<CampaignTarget> {
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
            CampaignTarget {
                backend,
                mutation: Some(mutation),
            }
        }
        None => {
            let holders: Vec<&(&str, &str)> = all.iter().filter(|&&(_, m)| m == mutation).collect();
            match holders.as_slice() {
                [] => return Err(name_error("mutation", name, &listed)),
                [(backend, mutation)] => CampaignTarget {
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
fn resolve_targets(args: &CrashArgs) -> CliResult<Vec<CampaignTarget>> {
    // `--backend all` with a mutation means "whichever backend has it".
    let backend = args.backend.as_deref().filter(|&b| b != ALL);
    if let Some(name) = &args.mutate {
        return Ok(vec![resolve_mutation(backend, name)?]);
    }
    match backend {
        None => Ok(ENGINE_BACKENDS
            .iter()
            .map(|&backend| CampaignTarget {
                backend,
                mutation: None,
            })
            .collect()),
        Some(name) => match BACKENDS.iter().find(|&&b| b == name) {
            Some(&backend) => Ok(vec![CampaignTarget {
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

/// Progress of all jobs of a run, for one bar.
struct ProgressBoard {
    bar: ProgressBar,
    /// By job slot.
    jobs: Mutex<Vec<JobProgress>>,
}

/// Locks a mutex whose holder cannot leave it inconsistent (every critical
/// section here is a single store or read), so a poisoned lock is usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ProgressBoard {
    fn new(visible: bool) -> Self {
        let bar = if visible {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
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
        Self {
            bar,
            jobs: Mutex::new(Vec::new()),
        }
    }
}

impl CampaignProgress for ProgressBoard {
    fn started(&self, job_slots: usize, states_budget: u64) {
        let job = JobProgress {
            states_expected: states_budget,
            ..JobProgress::default()
        };
        *lock(&self.jobs) = vec![job; job_slots];
        self.bar
            .set_length(states_budget.saturating_mul(job_slots as u64));
    }

    fn update(&self, slot: usize, job: JobProgress) {
        let total = {
            let mut jobs = lock(&self.jobs);
            if let Some(entry) = jobs.get_mut(slot) {
                *entry = job;
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
}

/// What `qj crash` does besides exploring generated workloads.
#[derive(Debug, clap::Subcommand)]
pub enum CrashAction {
    /// Explore the crash states of a dm-log-writes log of a qcow2 image
    /// (from `qj io --log-writes` or QEMU's blklogwrites) and check each.
    Replay(crate::cmd::crash_replay::ReplayArgs),
    /// Merge the `--output json` summaries of a run's shards (`--shard K/N`)
    /// into the summary of the whole run.
    Merge(crate::cmd::crash_merge::MergeArgs),
}

/// The shard to run: `--shard`, else the scheduler's environment, else
/// the whole run. A reproducer (`--crash-at`) is never sharded.
fn resolve_shard(args: &CrashArgs) -> CliResult<Shard> {
    if let Some(shard) = args.shard {
        return Ok(shard);
    }
    if args.crash_at.is_some() {
        return Ok(Shard::WHOLE);
    }
    Shard::from_env(|name| std::env::var(name).ok(), args.shards)
        .map(|shard| shard.unwrap_or(Shard::WHOLE))
        .map_err(|e| CliError::Usage(format!("crash: {e}")))
}

/// Runs `qj crash`.
pub fn run(args: CrashArgs) -> CliResult<u8> {
    match args.action {
        Some(CrashAction::Replay(replay)) => return crate::cmd::crash_replay::run(replay),
        Some(CrashAction::Merge(merge)) => return crate::cmd::crash_merge::run(merge),
        None => {}
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
    let campaign = Campaign {
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
    campaign.validate().map_err(harness_error)?;
    let shard = resolve_shard(&args)?;
    let extra = campaign.reproducer_extra(args.qemu_every.is_some());
    let started = Instant::now();
    let record = match &path {
        Some(path) => reproduce_one(&campaign, path, &extra, started)?,
        None => {
            let jobs = campaign.job_count().map_err(harness_error)?;
            let threads = args.jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                |n| n as usize,
            );
            let board = Arc::new(ProgressBoard::new(std::io::stderr().is_terminal()));
            let progress: Arc<dyn CampaignProgress> = board.clone();
            let result = run_campaign(&campaign, shard, threads.min(JOBS_MAX), Some(progress));
            board.bar.finish_and_clear();
            let result = result.map_err(harness_error)?;
            CampaignRecord::new(&campaign, jobs, &result, &extra, started.elapsed())
        }
    };
    print_record(args.output, &record)?;
    Ok(if record.violations > 0 {
        EXIT_FAILED
    } else {
        0
    })
}

/// `--crash-at`: reruns one crash path of one target and workload.
fn reproduce_one(
    campaign: &Campaign,
    path: &CrashPath,
    extra: &str,
    started: Instant,
) -> CliResult<CampaignRecord> {
    let one = |what: &str, count: usize| {
        if count == 1 {
            Ok(())
        } else {
            Err(CliError::Usage(format!(
                "crash: --crash-at reproduces one path: name one {what}"
            )))
        }
    };
    one("--backend", campaign.targets.len())?;
    one("--workload", campaign.workloads.len())?;
    let job = campaign
        .job(0)
        .ok_or_else(|| CliError::Usage("crash: the run has no job".into()))?;
    let config = campaign.config(&job).map_err(harness_error)?;
    let target = campaign.target(&job).map_err(harness_error)?;
    let report = reproduce(target, &config, path).map_err(harness_error)?;
    let summary = qj_model_checks::Summary {
        rows: vec![report.summary.clone()],
    };
    let jobs = campaign.job_count().map_err(harness_error)?;
    Ok(CampaignRecord::from_parts(
        qj_model_checks::campaign::CampaignIdentity::new(campaign, jobs),
        ShardSet {
            count: 1,
            indices: vec![0],
        },
        1,
        0,
        &summary,
        report
            .violations
            .iter()
            .map(|v| qj_model_checks::campaign::FindingRecord::new(v, extra))
            .collect(),
        started.elapsed(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_targets_for(backend: Option<&str>, mutate: Option<&str>) -> Vec<CampaignTarget> {
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
    fn every_listed_mutation_resolves_to_its_backend() {
        let listed = mutation_names();
        let all = all_mutations();
        assert_eq!(listed.len(), all.len());
        for (name, &(backend, mutation)) in listed.iter().zip(&all) {
            let want = vec![CampaignTarget {
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
}
