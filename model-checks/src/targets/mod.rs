//! Small targets that need no qcow2, to prove the harness finds what it
//! must and nothing else: `raw` (correct by construction), `log` (pointer
//! and data ordering), `redo` (recovery idempotence), each with mutations
//! the harness must catch.

pub mod log;
pub mod raw;
pub mod redo;

use std::sync::Arc;

use crate::error::NameError;
use crate::target::CrashTarget;

pub use log::{LogMutation, LogTarget};
pub use raw::RawTarget;
pub use redo::RedoTarget;

/// The built-in backends.
pub const BUILTIN_BACKENDS: &[&str] = &["raw", "log", "redo"];

/// The mutations of a built-in backend (empty for unknown names).
#[must_use]
pub fn builtin_mutations(backend: &str) -> &'static [&'static str] {
    match backend {
        "raw" => &["skip-flush"],
        "log" => &["header-before-data", "header-before-data-after-reopen"],
        "redo" => &["xor-delta"],
        _ => &[],
    }
}

/// The built-in target `backend`, with the mutation `mutation` if given.
pub fn builtin_target(
    backend: &str,
    mutation: Option<&str>,
) -> Result<Arc<dyn CrashTarget>, NameError> {
    let bad_mutation = |name: &str| NameError::new("mutation", name, builtin_mutations(backend));
    let target: Arc<dyn CrashTarget> = match (backend, mutation) {
        ("raw", None) => Arc::new(RawTarget { skip_flush: false }),
        ("raw", Some("skip-flush")) => Arc::new(RawTarget { skip_flush: true }),
        ("log", None) => Arc::new(LogTarget::default()),
        ("log", Some("header-before-data")) => Arc::new(LogTarget {
            mutation: LogMutation::HeaderBeforeData,
        }),
        ("log", Some("header-before-data-after-reopen")) => Arc::new(LogTarget {
            mutation: LogMutation::HeaderBeforeDataAfterReopen,
        }),
        ("redo", None) => Arc::new(RedoTarget { xor_delta: false }),
        ("redo", Some("xor-delta")) => Arc::new(RedoTarget { xor_delta: true }),
        ("raw" | "log" | "redo", Some(other)) => return Err(bad_mutation(other)),
        (other, _) => return Err(NameError::new("backend", other, BUILTIN_BACKENDS)),
    };
    Ok(target)
}
