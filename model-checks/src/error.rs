//! Errors of the harness itself (as opposed to violations it finds).

use crate::guest_model::ModelError;

/// A name that is not one of the valid ones (backend, mutation, workload).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown {kind} {name:?}; valid {kind}s: {valid}")]
pub struct NameError {
    /// What kind of name ("backend", "mutation", "workload").
    pub kind: &'static str,
    /// The name given.
    pub name: String,
    /// The valid names, comma separated.
    pub valid: String,
}

impl NameError {
    /// An error for `name` not in `valid`.
    #[must_use]
    pub fn new(kind: &'static str, name: &str, valid: &[&str]) -> Self {
        Self {
            kind,
            name: name.to_string(),
            valid: valid.join(", "),
        }
    }
}

/// Text that is not a valid operation list, crash path or number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {text:?} at character {position}: {reason}")]
pub struct ParseError {
    /// What was being parsed ("operation list", "crash point", ...).
    pub what: &'static str,
    /// The text given.
    pub text: String,
    /// Character offset of the problem.
    pub position: usize,
    /// What is wrong and what is valid.
    pub reason: String,
}

/// Why the harness could not run an exploration (not a violation: a
/// violation is a finding, these are misuse or environment problems).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A bad configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A name that is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Unparsable text.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A workload operation the model rejects (from a user-given list).
    #[error("operation {index} ({op}) is invalid: {source}")]
    Workload {
        /// Index of the operation in its thread.
        index: usize,
        /// The operation, in the operation-list syntax.
        op: String,
        /// Why.
        source: ModelError,
    },
    /// A crash point past the end of the trace.
    #[error(
        "crash point {requested} is beyond the trace: valid crash points are {first}..={last}"
    )]
    CrashPointBeyondTrace {
        /// The point requested.
        requested: u64,
        /// First valid point (right after the image was created).
        first: u64,
        /// Last valid point.
        last: u64,
    },
    /// A state index outside its crash point's state space.
    #[error("crash state {requested} does not exist at crash point {point}: valid states are 0..{count}")]
    StateBeyondSpace {
        /// The state requested.
        requested: u64,
        /// The crash point.
        point: u64,
        /// Number of states at that point.
        count: u64,
    },
    /// The target could not create the initial image.
    #[error("target {target} could not create an image: {message}")]
    Create {
        /// Target name.
        target: String,
        /// The target's error.
        message: String,
    },
    /// An I/O error of the harness's own (temporary files, simulated media).
    #[error("harness I/O error: {0}")]
    Io(#[from] std::io::Error),
}
