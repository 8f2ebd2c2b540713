//! The command line's error type: every failure becomes one line on stderr,
//! `qj: <what>: <why>`, and an exit status (2 for bad usage, 1 otherwise).

use std::path::Path;

/// Exit status for a command that could not do its job.
pub const EXIT_FAILED: u8 = 1;
/// Exit status for bad arguments (clap uses the same).
pub const EXIT_USAGE: u8 = 2;

/// Everything a subcommand can fail with. `Display` is the part after
/// `qj: `, always on one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or options.
    #[error("{0}")]
    Usage(String),
    /// The engine refused or failed.
    #[error("{what}: {source}")]
    Engine {
        /// What the command was doing.
        what: String,
        /// The engine's error.
        #[source]
        source: qj_engine::Error,
    },
    /// A file operation outside the engine failed.
    #[error("{what}: {source}")]
    Io {
        /// What the command was doing.
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The checker could not run.
    #[error("{what}: {source}")]
    Check {
        /// What the command was doing.
        what: String,
        /// The checker's error.
        #[source]
        source: qj_engine::check::CheckError,
    },
    /// A command-level failure with its reason.
    #[error("{what}: {why}")]
    Failed {
        /// What the command was doing.
        what: String,
        /// Why it failed.
        why: String,
    },
}

impl CliError {
    /// The process exit status for this error.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    }

    /// The line printed on stderr: one line even when a wrapped message
    /// carries newlines.
    #[must_use]
    pub fn line(&self) -> String {
        one_line(&format!("qj: {self}"))
    }

    /// A failure with a reason.
    pub fn failed(what: impl Into<String>, why: impl Into<String>) -> Self {
        CliError::Failed {
            what: what.into(),
            why: why.into(),
        }
    }
}

/// Joins lines with "; " so that an error never spans lines.
#[must_use]
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result with [`CliError`].
pub type CliResult<T> = Result<T, CliError>;

/// Wraps an engine error with what the command was doing.
pub fn engine(what: impl Into<String>) -> impl FnOnce(qj_engine::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Engine { what, source }
}

/// Wraps an I/O error with what the command was doing.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Io { what, source }
}

/// `'path'` as QEMU quotes file names in messages.
#[must_use]
pub fn quoted(path: &Path) -> String {
    format!("'{}'", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_on_one_line() {
        let e = CliError::failed("opening 'x'", "first\nsecond\n");
        assert_eq!(e.line(), "qj: opening 'x': first; second");
        assert_eq!(e.exit_code(), EXIT_FAILED);
        assert_eq!(CliError::Usage("bad".into()).exit_code(), EXIT_USAGE);
    }
}
