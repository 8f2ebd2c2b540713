//! Shrinking a violation to a short operation list (delta debugging).
//!
//! A candidate list "still violates" when a budgeted exploration of it
//! (same target, same configuration, same seed for crash-state sampling)
//! finds a violation of the same check. Crash points move when operations
//! are removed, so the shrunk violation comes with its own crash path and
//! reproducer (which names the operation list with `--ops`).
//!
//! First the shortest failing prefix among 1/16, 1/8, 1/4, 1/2 of the list
//! is kept, then chunks are removed, halving the chunk size when no chunk
//! can go. Candidates the model rejects (a write past a grow that was
//! removed) simply do not violate. Runs are bounded by
//! `shrink_attempts_max`.

use std::sync::Arc;

use crate::config::ExploreConfig;
use crate::explore::explore;
use crate::target::CrashTarget;
use crate::violation::{CheckKind, Violation};
use crate::workload::{GuestOp, Workload};

struct Shrinker<'a> {
    target: &'a Arc<dyn CrashTarget>,
    config: ExploreConfig,
    kind: CheckKind,
    attempts_left: u32,
}

impl Shrinker<'_> {
    fn violates(&mut self, ops: &[GuestOp]) -> Option<Violation> {
        if self.attempts_left == 0 || ops.is_empty() {
            return None;
        }
        self.attempts_left -= 1;
        let mut config = self.config.clone();
        config.ops = Some(Workload::single(ops.to_vec()));
        let report = explore(Arc::clone(self.target), &config, None).ok()?;
        report.violations.into_iter().find(|v| v.kind == self.kind)
    }
}

/// Shrinks a single-threaded `workload` whose exploration violated check
/// `kind`; the violation found on the shortest list, if any.
pub(crate) fn shrink(
    target: &Arc<dyn CrashTarget>,
    config: &ExploreConfig,
    kind: CheckKind,
    workload: &Workload,
) -> Option<Violation> {
    let [ops] = workload.threads.as_slice() else {
        return None;
    };
    let mut candidate_config = config.clone();
    candidate_config.workloads = 1;
    candidate_config.shrink = false;
    candidate_config.violations_max = 1;
    candidate_config.states_budget = config.shrink_states_budget;
    let mut shrinker = Shrinker {
        target,
        config: candidate_config,
        kind,
        attempts_left: config.shrink_attempts_max,
    };
    let mut best: Vec<GuestOp> = ops.clone();
    let mut found: Option<Violation> = None;
    for divisor in [16usize, 8, 4, 2] {
        let len = best.len() / divisor;
        if len == 0 {
            continue;
        }
        if let Some(v) = shrinker.violates(&best[..len]) {
            best.truncate(len);
            found = Some(v);
            break;
        }
    }
    let mut chunk = (best.len() / 2).max(1);
    // Each pass either removes operations (the list shrinks) or halves the
    // chunk; the attempt budget bounds the whole loop as well.
    loop {
        let mut removed = false;
        let mut start = 0usize;
        while start < best.len() && shrinker.attempts_left > 0 {
            let end = (start + chunk).min(best.len());
            let candidate: Vec<GuestOp> =
                best[..start].iter().chain(&best[end..]).copied().collect();
            match shrinker.violates(&candidate) {
                Some(v) => {
                    best = candidate;
                    found = Some(v);
                    removed = true;
                }
                None => start = end,
            }
        }
        if shrinker.attempts_left == 0 || (!removed && chunk == 1) {
            break;
        }
        if !removed {
            chunk = (chunk / 2).max(1);
        }
    }
    found
}
