//! Violations: what check failed, where, and how to reproduce it.

use std::fmt;
use std::str::FromStr;

use crate::error::ParseError;
use crate::workload::Workload;

/// The check that failed (letters refer to the checks of the crash issue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// (a) the target's check found corruptions.
    Corruption,
    /// (a) leaks where the target allows none.
    Leak,
    /// (a) the target's check itself failed.
    CheckFailed,
    /// Opening (recovering) a crash image failed.
    RecoveryFailed,
    /// (b) a sector read content it was never allowed to hold, or the disk
    /// came back with a size it never had.
    NotAllowed,
    /// (c) a sector lost data that a completed flush had made durable.
    FlushedDataLost,
    /// (d) recovering after a crash during recovery gave other content.
    NotIdempotent,
    /// A workload operation failed without any crash.
    OpFailed,
    /// Without any crash, the disk read content the model does not allow.
    LiveContent,
    /// (f) `qemu-img` found a problem.
    Qemu,
}

impl CheckKind {
    /// The check's letter in the crash issue ("a" to "f"; "-" for failures
    /// outside the crash checks).
    #[must_use]
    pub fn letter(&self) -> &'static str {
        match self {
            CheckKind::Corruption | CheckKind::Leak | CheckKind::CheckFailed => "a",
            CheckKind::RecoveryFailed | CheckKind::NotAllowed => "b",
            CheckKind::FlushedDataLost => "c",
            CheckKind::NotIdempotent => "d",
            CheckKind::OpFailed | CheckKind::LiveContent => "-",
            CheckKind::Qemu => "f",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            CheckKind::Corruption => "corruption",
            CheckKind::Leak => "leak",
            CheckKind::CheckFailed => "check failed",
            CheckKind::RecoveryFailed => "recovery failed",
            CheckKind::NotAllowed => "content not allowed",
            CheckKind::FlushedDataLost => "flushed data lost",
            CheckKind::NotIdempotent => "recovery not idempotent",
            CheckKind::OpFailed => "operation failed",
            CheckKind::LiveContent => "wrong content without crash",
            CheckKind::Qemu => "qemu-img",
        };
        write!(f, "({}) {name}", self.letter())
    }
}

/// One crash of a crash path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrashStep {
    /// The crash interrupts the recovery of the previous step's image
    /// (otherwise: the workload, or the continuation after recovery).
    pub during_recovery: bool,
    /// The crash point in that run's device trace.
    pub point: u64,
    /// The crash state at that point (`None`: every state).
    pub state: Option<u64>,
}

/// A sequence of crashes: the first interrupts the workload; each later
/// one interrupts either the recovery of the previous image (`r` steps,
/// always last) or the continuation workload run after recovering it.
///
/// Text forms: `--crash-at 120/15/r3 --state 7/0/1`, or compactly
/// `120:7/15:0/r3:1`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CrashPath {
    /// The crashes, outermost first.
    pub steps: Vec<CrashStep>,
}

/// Most steps of a crash path.
pub const PATH_STEPS_MAX: usize = 16;

fn path_error(text: &str, position: usize, reason: &str) -> ParseError {
    ParseError {
        what: "crash path",
        text: text.to_string(),
        position,
        reason: format!(
            "{reason} (valid: points like 120/15/r3, states like 7/0/1, one per point)"
        ),
    }
}

impl CrashPath {
    /// A path with one more step.
    #[must_use]
    pub fn then(&self, step: CrashStep) -> CrashPath {
        let mut steps = self.steps.clone();
        steps.push(step);
        CrashPath { steps }
    }

    /// The `--crash-at` argument.
    #[must_use]
    pub fn crash_at_arg(&self) -> String {
        let parts: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{}{}", if s.during_recovery { "r" } else { "" }, s.point))
            .collect();
        parts.join("/")
    }

    /// The `--state` argument, or `None` if some step means every state.
    #[must_use]
    pub fn state_arg(&self) -> Option<String> {
        let parts: Option<Vec<String>> = self
            .steps
            .iter()
            .map(|s| s.state.map(|state| state.to_string()))
            .collect();
        parts.map(|p| p.join("/"))
    }

    /// Parses `--crash-at` and `--state` arguments. The state may be
    /// omitted (every state of the last point) but must otherwise name one
    /// state per point.
    pub fn parse(crash_at: &str, state: Option<&str>) -> Result<Self, ParseError> {
        let mut steps = Vec::new();
        let mut position = 0usize;
        for part in crash_at.split('/') {
            if steps.len() >= PATH_STEPS_MAX {
                return Err(path_error(crash_at, position, "too many steps"));
            }
            let (during_recovery, digits) = match part.strip_prefix('r') {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            let point = digits.parse::<u64>().map_err(|_| {
                path_error(
                    crash_at,
                    position,
                    &format!("{part:?} is not a crash point number"),
                )
            })?;
            if during_recovery && steps.is_empty() {
                return Err(path_error(
                    crash_at,
                    position,
                    "the first crash cannot be during recovery",
                ));
            }
            if steps.last().is_some_and(|s: &CrashStep| s.during_recovery) {
                return Err(path_error(
                    crash_at,
                    position,
                    "a recovery crash must be the last step",
                ));
            }
            steps.push(CrashStep {
                during_recovery,
                point,
                state: None,
            });
            position += part.len() + 1;
        }
        if let Some(state) = state {
            let states: Vec<&str> = state.split('/').collect();
            if states.len() != steps.len() {
                return Err(ParseError {
                    what: "crash states",
                    text: state.to_string(),
                    position: 0,
                    reason: format!("{} states for {} crash points", states.len(), steps.len()),
                });
            }
            let mut position = 0usize;
            for (step, text) in steps.iter_mut().zip(states) {
                step.state = Some(text.parse::<u64>().map_err(|_| ParseError {
                    what: "crash states",
                    text: state.to_string(),
                    position,
                    reason: format!("{text:?} is not a state number"),
                })?);
                position += text.len() + 1;
            }
        }
        Ok(Self { steps })
    }
}

impl fmt::Display for CrashPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            if step.during_recovery {
                f.write_str("r")?;
            }
            write!(f, "{}", step.point)?;
            match step.state {
                Some(state) => write!(f, ":{state}")?,
                None => f.write_str(":*")?,
            }
        }
        Ok(())
    }
}

impl FromStr for CrashPath {
    type Err = ParseError;

    /// Parses the compact form `120:7/15:0/r3:1`.
    fn from_str(text: &str) -> Result<Self, ParseError> {
        let mut points = Vec::new();
        let mut states = Vec::new();
        for part in text.split('/') {
            let (point, state) = part
                .split_once(':')
                .ok_or_else(|| path_error(text, 0, &format!("{part:?} lacks ':<state>'")))?;
            points.push(point);
            states.push(state);
        }
        Self::parse(&points.join("/"), Some(&states.join("/")))
    }
}

/// How to rerun a violation: everything the reproducer line names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reproducer {
    /// Backend name.
    pub backend: String,
    /// Mutation name.
    pub mutation: Option<String>,
    /// Workload preset.
    pub workload: String,
    /// Whether a backing file was used.
    pub backing: bool,
    /// Workload threads.
    pub threads: u32,
    /// Workload seed.
    pub seed: u64,
    /// Explicit operations (shrunk runs).
    pub ops: Option<Workload>,
    /// The crash path.
    pub path: CrashPath,
}

impl fmt::Display for Reproducer {
    /// `qj crash --backend B [--mutate M] --workload W [--backing]
    /// [--threads N] --seed S [--ops 'LIST'] --crash-at K --state S`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qj crash --backend {}", self.backend)?;
        if let Some(m) = &self.mutation {
            write!(f, " --mutate {m}")?;
        }
        write!(f, " --workload {}", self.workload)?;
        if self.backing {
            f.write_str(" --backing")?;
        }
        if self.threads > 1 {
            write!(f, " --threads {}", self.threads)?;
        }
        write!(f, " --seed {}", self.seed)?;
        if let Some(ops) = &self.ops {
            write!(f, " --ops '{ops}'")?;
        }
        if !self.path.steps.is_empty() {
            write!(f, " --crash-at {}", self.path.crash_at_arg())?;
            if let Some(state) = self.path.state_arg() {
                write!(f, " --state {state}")?;
            }
        }
        Ok(())
    }
}

/// A failed check.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Which check.
    pub kind: CheckKind,
    /// What exactly (sector, content, allowed set, error).
    pub detail: String,
    /// How to rerun it.
    pub reproducer: Reproducer,
    /// Operations of the workload that found it.
    pub ops_len: usize,
    /// The same violation on a shorter operation list, if shrinking found one.
    pub shrunk: Option<Box<Violation>>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "violation {} at {}: {}",
            self.kind, self.reproducer.path, self.detail
        )?;
        write!(f, "  reproduce ({} ops): {}", self.ops_len, self.reproducer)?;
        if let Some(shrunk) = &self.shrunk {
            write!(
                f,
                "\n  shrunk to {} ops: {}\n  reproduce shrunk: {}",
                shrunk.ops_len, shrunk.detail, shrunk.reproducer
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_reject_nonsense() {
        let path = CrashPath::parse("120/15/r3", Some("7/0/1")).unwrap();
        assert_eq!(path.crash_at_arg(), "120/15/r3");
        assert_eq!(path.state_arg().as_deref(), Some("7/0/1"));
        assert_eq!(path.to_string(), "120:7/15:0/r3:1");
        assert_eq!(path.to_string().parse::<CrashPath>().unwrap(), path);
        let all = CrashPath::parse("9", None).unwrap();
        assert_eq!(all.steps[0].state, None);
        assert_eq!(all.state_arg(), None);
        for (at, state) in [
            ("x", None),
            ("r1", None),
            ("1/r2/3", None),
            ("1/2", Some("1")),
            ("1", Some("z")),
        ] {
            let err = CrashPath::parse(at, state).unwrap_err();
            assert!(!err.reason.is_empty(), "{at}");
        }
    }

    #[test]
    fn reproducer_line_names_everything() {
        let r = Reproducer {
            backend: "journal".into(),
            mutation: Some("no-flush".into()),
            workload: "mixed".into(),
            backing: true,
            threads: 1,
            seed: 42,
            ops: Some("w0+1,f".parse().unwrap()),
            path: CrashPath::parse("5", Some("3")).unwrap(),
        };
        assert_eq!(
            r.to_string(),
            "qj crash --backend journal --mutate no-flush --workload mixed --backing --seed 42 --ops 'w0+1,f' --crash-at 5 --state 3"
        );
    }
}
