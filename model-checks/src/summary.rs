//! Progress reports during a run and the summary table at its end.

use std::fmt;
use std::time::Duration;

/// A snapshot of a running exploration, for progress bars.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Target (backend and mutation).
    pub target: String,
    /// Crash states checked so far.
    pub states_explored: u64,
    /// Primary crash states planned (an estimate: recovery and
    /// continuation states come on top, exhaustive points may hold fewer).
    pub states_planned: u64,
    /// Violations so far.
    pub violations: u64,
    /// Time since the start.
    pub elapsed: Duration,
}

/// The results of exploring one target.
#[derive(Clone, Debug, Default)]
pub struct TargetSummary {
    /// Target (backend, and mutation after a '+').
    pub target: String,
    /// Workloads run.
    pub workloads: u64,
    /// Crash points explored (all levels).
    pub crash_points: u64,
    /// Crash states checked (all levels, recovery crashes included).
    pub states_explored: u64,
    /// Of those, states made by crashing during recovery.
    pub recovery_crash_states: u64,
    /// Of those, states of continuation workloads.
    pub continuation_states: u64,
    /// Crash points whose states were all explored.
    pub exhaustive_points: u64,
    /// Violations found.
    pub violations: u64,
    /// Checked states whose image had leaks.
    pub states_with_leaks: u64,
    /// Leaked clusters summed over checked states.
    pub leaked_clusters: u64,
    /// Largest leak of one state.
    pub leaked_clusters_max: u64,
    /// Images also checked by `qemu-img`.
    pub qemu_checks: u64,
    /// Crash images also checked as the crash left them, before recovery
    /// (read-only).
    pub unrecovered_checks: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl TargetSummary {
    /// Crash states checked per second of wall time.
    #[must_use]
    pub fn states_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.states_explored as f64 / seconds
        } else {
            0.0
        }
    }

    /// Adds the counts of `other` (another job or shard of the same
    /// target): sums, except the largest leak, which is the larger one.
    pub fn absorb(&mut self, other: &TargetSummary) {
        self.workloads += other.workloads;
        self.crash_points += other.crash_points;
        self.states_explored += other.states_explored;
        self.recovery_crash_states += other.recovery_crash_states;
        self.continuation_states += other.continuation_states;
        self.exhaustive_points += other.exhaustive_points;
        self.violations += other.violations;
        self.states_with_leaks += other.states_with_leaks;
        self.leaked_clusters += other.leaked_clusters;
        self.leaked_clusters_max = self.leaked_clusters_max.max(other.leaked_clusters_max);
        self.qemu_checks += other.qemu_checks;
        self.unrecovered_checks += other.unrecovered_checks;
        self.elapsed += other.elapsed;
    }
}

/// The summary table of a run over one or more targets.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// One row per target.
    pub rows: Vec<TargetSummary>,
}

impl Summary {
    /// Violations over all targets.
    #[must_use]
    pub fn violations(&self) -> u64 {
        self.rows.iter().map(|r| r.violations).sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<36} {:>9} {:>7} {:>10} {:>8} {:>8} {:>10} {:>11} {:>9} {:>6} {:>10} {:>10}",
            "target",
            "workloads",
            "points",
            "states",
            "recov.",
            "contin.",
            "violations",
            "leaky st.",
            "leaks max",
            "qemu",
            "unrecov.",
            "states/s"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<36} {:>9} {:>7} {:>10} {:>8} {:>8} {:>10} {:>11} {:>9} {:>6} {:>10} {:>10.0}",
                r.target,
                r.workloads,
                r.crash_points,
                r.states_explored,
                r.recovery_crash_states,
                r.continuation_states,
                r.violations,
                r.states_with_leaks,
                r.leaked_clusters_max,
                r.qemu_checks,
                r.unrecovered_checks,
                r.states_per_second()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_target_and_rates() {
        let summary = Summary {
            rows: vec![TargetSummary {
                target: "raw".into(),
                states_explored: 5000,
                violations: 2,
                elapsed: Duration::from_secs(2),
                ..TargetSummary::default()
            }],
        };
        let text = summary.to_string();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().nth(1).unwrap().starts_with("raw "));
        assert!(text.contains("2500"), "{text}");
        assert_eq!(summary.violations(), 2);
    }
}
