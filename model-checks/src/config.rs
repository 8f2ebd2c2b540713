//! What an exploration does and how far it goes.

use crate::crash_states::{EXHAUSTIVE_UNITS_DEFAULT, EXHAUSTIVE_UNITS_LIMIT};
use crate::error::HarnessError;
use crate::sim_device::DeviceConfig;
use crate::workload::{Workload, WorkloadConfig};

/// Most workload seeds one exploration may run.
pub const WORKLOADS_MAX: u32 = 1_000_000;

/// The knobs of an exploration. Every random choice derives from `seed`.
#[derive(Clone, Debug)]
pub struct ExploreConfig {
    /// The first workload seed; workloads use `seed`, `seed + 1`, ...
    pub seed: u64,
    /// How many workloads (seeds) to run.
    pub workloads: u32,
    /// How workloads are generated.
    pub workload: WorkloadConfig,
    /// An explicit operation list instead of generated ones (reproducers
    /// of shrunk violations); then a single workload runs.
    pub ops: Option<Workload>,
    /// Primary crash states per workload: crash points are chosen at random
    /// (seeded) until their states fill this budget. States of recovery
    /// crashes and continuations come on top.
    pub states_budget: u64,
    /// Up to this many pending units, every subset is explored (default
    /// 10: 1,024 states); beyond, states are sampled.
    pub exhaustive_units_max: u32,
    /// States sampled at a crash point beyond the exhaustive bound.
    pub sampled_states_per_point: u64,
    /// One checked image in this many also crashes during its recovery
    /// and checks that recovering again gives the same guest content
    /// (check (d)); 0 disables.
    pub recovery_crash_every: u64,
    /// One checked image in this many goes on with a continuation workload
    /// that is itself crashed and checked (check (e)); 0 disables.
    pub continue_every: u64,
    /// Nesting of continuations (1: crash, recover, continue, crash again).
    pub continue_depth: u32,
    /// Operations of a continuation workload.
    pub continue_ops: u32,
    /// Crash states of one continuation.
    pub continue_states_budget: u64,
    /// One checked image in this many is also checked with `qemu-img`
    /// (check (f)) when the target exports qcow2; 0 disables.
    pub qemu_every: u64,
    /// Stop after this many violations.
    pub violations_max: u32,
    /// Shrink the first violation to a short operation list.
    pub shrink: bool,
    /// Most candidate runs while shrinking.
    pub shrink_attempts_max: u32,
    /// Primary crash states per candidate run while shrinking.
    pub shrink_states_budget: u64,
    /// The simulated devices' limits.
    pub device: DeviceConfig,
}

impl ExploreConfig {
    /// Defaults for `workload`: one workload of seed 1, 4,000 states.
    #[must_use]
    pub fn new(workload: WorkloadConfig) -> Self {
        Self {
            seed: 1,
            workloads: 1,
            workload,
            ops: None,
            states_budget: 4000,
            exhaustive_units_max: EXHAUSTIVE_UNITS_DEFAULT,
            sampled_states_per_point: 16,
            recovery_crash_every: 4,
            continue_every: 64,
            continue_depth: 1,
            continue_ops: 24,
            continue_states_budget: 64,
            qemu_every: 0,
            violations_max: 1,
            shrink: true,
            shrink_attempts_max: 150,
            shrink_states_budget: 1500,
            device: DeviceConfig::default(),
        }
    }

    /// Checks every field; the error names the bad one.
    pub fn validate(&self) -> Result<(), HarnessError> {
        let bad = |message: String| Err(HarnessError::Config(message));
        self.workload.validate().map_err(HarnessError::Config)?;
        if self.workloads == 0 || self.workloads > WORKLOADS_MAX {
            return bad(format!(
                "workloads {} is not in 1..={WORKLOADS_MAX}",
                self.workloads
            ));
        }
        if self.exhaustive_units_max < 10 || self.exhaustive_units_max > EXHAUSTIVE_UNITS_LIMIT {
            return bad(format!(
                "exhaustive_units_max {} is not in 10..={EXHAUSTIVE_UNITS_LIMIT}",
                self.exhaustive_units_max
            ));
        }
        if self.sampled_states_per_point < 2 {
            return bad(
                "sampled_states_per_point must be at least 2 (nothing kept, everything kept)"
                    .to_string(),
            );
        }
        if self.violations_max == 0 {
            return bad("violations_max must be at least 1".to_string());
        }
        if let Some(ops) = &self.ops {
            if ops.threads.is_empty() {
                return bad("the operation list has no thread".to_string());
            }
        }
        Ok(())
    }
}
