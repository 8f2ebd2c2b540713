//! Crash states from a dm-log-writes log of a qcow2 image file, whether qj
//! (`qj io --log-writes`) or QEMU (`blklogwrites`) wrote it, judged by one
//! checker: `qj crash replay`.
//!
//! The log is read with the spec's decoder and xfstests' rules
//! ([`reader`]), replayed in memory onto a copy of the base image (the
//! image as it was when logging began; nothing is ever written to it),
//! split into epochs at its flushes, and every state of [`states`] is
//! judged ([`judge`]): recovered, `qj check`ed, its guest disk compared
//! with the log's guest views ([`views`]), and on a sample checked by
//! `qemu-img`. A finding names its state by number, so
//! `qj crash replay LOG --base IMAGE --state N` reproduces it.

pub mod judge;
pub mod reader;
pub mod states;
pub mod views;

use std::sync::Arc;

use crate::medium::Medium;
use crate::violation::CheckKind;
use reader::{LogOp, ReplayLog};
use states::{enumerate, Epoch, EpochWrite, StateBudget, StateSpec};
use views::{read_view, GuestViews, ViewReader};

/// How a log is explored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Which states are made.
    pub budget: StateBudget,
    /// `qemu-img` checks every flush prefix and one other state in this
    /// many (0: never).
    pub qemu_every: u64,
    /// Only this state (a reproducer).
    pub only_state: Option<u64>,
    /// Findings kept in the report (all are counted).
    pub findings_max: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            budget: StateBudget {
                exhaustive_writes: crate::crash_states::EXHAUSTIVE_UNITS_DEFAULT,
                sampled_states: 64,
                torn_states_max: 8,
                seed: 1,
            },
            qemu_every: 16,
            only_state: None,
            findings_max: 20,
        }
    }
}

/// A state that failed a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The state's number (`--state N`).
    pub state: u64,
    /// Which check failed.
    pub kind: CheckKind,
    /// What the state keeps.
    pub state_description: String,
    /// What exactly failed.
    pub detail: String,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// "qj" when the log carries MARK entries, else "qemu".
    pub writer: &'static str,
    /// Who read the guest views.
    pub view_reader: &'static str,
    /// Entries in the log.
    pub entries: u64,
    /// Flushes in the log.
    pub flushes: u64,
    /// MARK entries in the log.
    pub marks: u64,
    /// Epochs (flushes + 1).
    pub epochs: u64,
    /// Guest views read.
    pub views: u64,
    /// States judged.
    pub states: u64,
    /// States with at least one finding.
    pub corrupt_states: u64,
    /// States `qj check` found leaks in.
    pub leak_states: u64,
    /// The largest leak of a state, in clusters.
    pub leaked_clusters_max: u64,
    /// The largest leak of a state, in bytes.
    pub leaked_bytes_max: u64,
    /// States `qemu-img` checked.
    pub qemu_checked: u64,
    /// The first findings (at most `findings_max`).
    pub findings: Vec<Finding>,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A guest view could not be read: the log's own states are not
    /// images the reader can open, so nothing can be judged.
    #[error("reading the guest view after log entry {entry:?} with {reader}: {reason}")]
    View {
        /// The entry after which the view was taken (`None`: the base).
        entry: Option<u64>,
        /// The reader.
        reader: &'static str,
        /// Why.
        reason: String,
    },
    /// `--state` beyond the states of the log.
    #[error("state {state} does not exist: the log has {states} states (0 to {})", states.saturating_sub(1))]
    NoSuchState {
        /// The state asked for.
        state: u64,
        /// States in the log.
        states: u64,
    },
    /// Applying the log to the base failed.
    #[error("replaying log entry {entry}: {source}")]
    Apply {
        /// The entry.
        entry: u64,
        /// Why.
        source: std::io::Error,
    },
}

/// The log split into epochs, with the guest views.
pub struct Prepared {
    /// Epochs in log order.
    pub epochs: Vec<Epoch>,
    /// Guest views.
    pub views: GuestViews,
    /// Who read them.
    pub reader: ViewReader,
    /// The states, numbered by position.
    pub states: Vec<StateSpec>,
}

/// Replays `log` onto `base`, reading guest views at the base, at every
/// flush, at every MARK (logs qj wrote: read by qj's engine) and at the
/// end (QEMU's logs: read by `qemu-img convert`), and lists the states.
pub fn prepare(
    log: &ReplayLog,
    base: &[u8],
    budget: &StateBudget,
) -> Result<Prepared, ReplayError> {
    let reader = if log.has_marks() {
        ViewReader::Engine
    } else {
        ViewReader::QemuImg
    };
    let mut views = GuestViews::new();
    let mut device = Medium::from_bytes(base);
    let mut view_at = |device: &Medium, entry: Option<u64>| {
        read_view(reader, &device.to_bytes())
            .map(|view| views.push(&view))
            .map_err(|reason| ReplayError::View {
                entry,
                reader: reader.name(),
                reason,
            })
    };
    let mut last_view = view_at(&device, None)?;
    let mut epochs = vec![Epoch {
        flush_entry: None,
        flushed_view: last_view,
        prefix: device.clone(),
        writes: Vec::new(),
    }];
    // Whether the device changed since the last view.
    let mut since_view = false;
    for logged in &log.ops {
        let apply = |source| ReplayError::Apply {
            entry: logged.entry,
            source,
        };
        let (offset, data) = match &logged.op {
            LogOp::Write { offset, data } => (*offset, data.clone()),
            LogOp::Discard { offset, len } => {
                let len = usize::try_from(*len).map_err(|e| apply(std::io::Error::other(e)))?;
                (*offset, Arc::from(vec![0u8; len]))
            }
            LogOp::Mark(_) => {
                if since_view && reader == ViewReader::Engine {
                    last_view = view_at(&device, Some(logged.entry))?;
                    since_view = false;
                }
                continue;
            }
            LogOp::Flush => {
                if since_view {
                    last_view = view_at(&device, Some(logged.entry))?;
                    since_view = false;
                }
                epochs.push(Epoch {
                    flush_entry: Some(logged.entry),
                    flushed_view: last_view,
                    prefix: device.clone(),
                    writes: Vec::new(),
                });
                continue;
            }
        };
        device.write(&data, offset).map_err(apply)?;
        since_view = true;
        epochs
            .last_mut()
            .expect("there is always an epoch")
            .writes
            .push(EpochWrite {
                entry: logged.entry,
                offset,
                data,
            });
    }
    if since_view {
        view_at(&device, log.ops.last().map(|o| o.entry))?;
    }
    let states = enumerate(&epochs, budget);
    Ok(Prepared {
        epochs,
        views,
        reader,
        states,
    })
}

/// The image of state `state`, for a reproducer to inspect.
pub fn state_image(prepared: &Prepared, state: u64) -> Result<Vec<u8>, ReplayError> {
    let spec = state_spec(prepared, state)?;
    let medium = spec
        .image(&prepared.epochs)
        .map_err(|source| ReplayError::Apply {
            entry: u64::MAX,
            source,
        })?;
    Ok(medium.to_bytes())
}

fn state_spec(prepared: &Prepared, state: u64) -> Result<&StateSpec, ReplayError> {
    usize::try_from(state)
        .ok()
        .and_then(|i| prepared.states.get(i))
        .ok_or(ReplayError::NoSuchState {
            state,
            states: prepared.states.len() as u64,
        })
}

/// Judges the states of `prepared` (all, or `config.only_state`).
pub fn replay(
    log: &ReplayLog,
    prepared: &Prepared,
    config: &ReplayConfig,
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport {
        writer: if log.has_marks() { "qj" } else { "qemu" },
        view_reader: prepared.reader.name(),
        entries: log.entries,
        flushes: log.flushes(),
        marks: log
            .ops
            .iter()
            .filter(|o| matches!(o.op, LogOp::Mark(_)))
            .count() as u64,
        epochs: prepared.epochs.len() as u64,
        views: u64::from(prepared.views.len()),
        ..ReplayReport::default()
    };
    let numbers: Vec<u64> = match config.only_state {
        Some(state) => {
            state_spec(prepared, state)?;
            vec![state]
        }
        None => (0..prepared.states.len() as u64).collect(),
    };
    for &number in &numbers {
        let spec = &prepared.states[number as usize];
        let image = spec
            .image(&prepared.epochs)
            .map_err(|source| ReplayError::Apply {
                entry: u64::MAX,
                source,
            })?;
        let qemu = config.qemu_every > 0
            && (spec.kind == states::StateKind::FlushPrefix
                || number % config.qemu_every == 0
                || config.only_state.is_some());
        let flushed = prepared.epochs[spec.epoch].flushed_view;
        let verdict = judge::judge_state(image.to_bytes(), &prepared.views, flushed, qemu);
        report.states += 1;
        report.qemu_checked += u64::from(verdict.qemu_checked);
        if verdict.leaked_clusters > 0 {
            report.leak_states += 1;
            if verdict.leaked_clusters > report.leaked_clusters_max {
                report.leaked_clusters_max = verdict.leaked_clusters;
                report.leaked_bytes_max = verdict.leaked_clusters * verdict.cluster_bytes;
            }
        }
        if !verdict.findings.is_empty() {
            report.corrupt_states += 1;
        }
        for (kind, detail) in verdict.findings {
            if report.findings.len() < config.findings_max {
                report.findings.push(Finding {
                    state: number,
                    kind,
                    state_description: spec.describe(&prepared.epochs),
                    detail,
                });
            }
        }
    }
    Ok(report)
}
