//! Crash-state exploration: the power-loss harness of qjournal.
//!
//! A kill test is not a power-loss test: the page cache survives a killed
//! process. This crate simulates the device itself ([`SimDevice`]: a
//! volatile write cache whose unflushed writes survive a power cut in any
//! subset, torn at 512-byte sectors), drives a target (a disk format under
//! test, behind [`CrashTarget`]) with random guest workloads, and after
//! every explored crash recovers the image and checks it against a guest
//! model ([`GuestModel`]):
//!
//! - (a) the target's own check finds no corruption, and no leak where the
//!   target allows none (leaks are counted); for targets that can, the
//!   check also runs read-only on the image as the crash left it, before
//!   recovery, and finds no corruption there either;
//! - (b) every guest sector holds a content it may hold;
//! - (c) nothing a completed flush made durable is lost;
//! - (d) crashing during recovery and recovering again gives the same
//!   guest content;
//! - (e) after recovery the workload goes on and later crashes keep (a)-(d);
//! - (f) on a sample, `qemu-img check` and `info` agree (qcow2 targets).
//!
//! A violation carries a one-line reproducer
//! (`qj crash --backend .. --seed .. --crash-at .. --state ..`) and, when
//! shrinking is on, the same violation on a short operation list.
//!
//! Entry points: [`explore`], [`reproduce`], [`run_to_crash_point`]; the
//! built-in [`targets`] prove the harness catches ordering bugs before any
//! qcow2 engine exists.

#![warn(missing_docs)]

pub mod bitmap_check;
pub mod campaign;
mod check_memo;
pub mod checks;
pub mod config;
pub mod content_map;
pub mod crash_states;
pub mod dedup_content;
pub mod engine_target;
pub mod error;
pub mod explore;
pub mod guest_model;
mod image_memo;
pub mod log_replay;
pub mod medium;
mod plan;
pub mod qemu;
pub mod rng;
pub mod runner;
pub mod sector_pattern;
mod shrink;
pub mod sim_device;
pub mod summary;
pub mod target;
pub mod targets;
pub mod violation;
pub mod workload;

pub use config::ExploreConfig;
pub use crash_states::{CrashUnits, StateSpace, EXHAUSTIVE_UNITS_DEFAULT};
pub use engine_target::{
    all_mutations, crash_target, exposing_seed, mutations, open_mutation, EngineBackend,
    EngineTarget, BACKENDS, ENGINE_BACKENDS,
};
pub use error::{HarnessError, NameError, ParseError};
pub use explore::{backing_device, explore, reproduce, run_to_crash_point, ProgressFn, Report};
pub use guest_model::{GuestModel, Observed};
pub use medium::{Medium, SECTOR_BYTES};
pub use qemu::{qemu_img_available, qemu_img_check, QemuVerdict};
pub use sim_device::{is_power_loss, CrashSnapshot, DeviceConfig, PowerLost, SimDevice};
pub use summary::{Progress, Summary, TargetSummary};
pub use target::{CheckSummary, CrashTarget, GuestDisk, LeakExpectation, QemuExport, TargetError};
pub use targets::{builtin_mutations, builtin_target, BUILTIN_BACKENDS};
pub use violation::{CheckKind, CrashPath, CrashStep, Reproducer, Violation};
pub use workload::{GuestOp, Workload, WorkloadConfig, WORKLOAD_NAMES};
