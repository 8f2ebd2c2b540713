//! Check (f): QEMU's own opinion of a crash image.
//!
//! The image is written to a temporary file and given to
//! `qemu-img check --output=json` and `qemu-img info --output=json`,
//! opened with `backing: null` so that a backing file named in the header
//! need not exist (the check is about the image's own metadata).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::target::LeakExpectation;

/// What `qemu-img` said about an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QemuVerdict {
    /// `qemu-img check` exit code (0 clean, 2 corruptions, 3 leaks only).
    pub check_exit: i32,
    /// `corruptions` (0 when omitted).
    pub corruptions: u64,
    /// The corruptions left after `qemu-img check -r leaks` (run only when
    /// there were any).
    pub corruptions_after_leak_repair: u64,
    /// `leaks` (0 when omitted).
    pub leaks: u64,
    /// `check-errors`.
    pub check_errors: u64,
    /// `format-specific.data.corrupt` of `qemu-img info`.
    pub corrupt_flag: bool,
    /// `dirty-flag` of `qemu-img info`.
    pub dirty_flag: bool,
}

impl QemuVerdict {
    /// What is wrong with this verdict, given the leaks the target expects;
    /// empty when QEMU is satisfied.
    #[must_use]
    pub fn problems(&self, leaks: LeakExpectation) -> Vec<String> {
        let mut problems = Vec::new();
        let corruptions = match leaks {
            LeakExpectation::Any => self.corruptions_after_leak_repair,
            LeakExpectation::Exactly(_) => self.corruptions,
        };
        if corruptions > 0 {
            problems.push(format!("qemu-img check: {corruptions} corruptions"));
        }
        if self.check_errors > 0 {
            problems.push(format!(
                "qemu-img check: {} check errors",
                self.check_errors
            ));
        }
        if self.corrupt_flag {
            problems.push("qemu-img info: corrupt flag set".to_string());
        }
        if let LeakExpectation::Exactly(want) = leaks {
            if self.leaks != want {
                problems.push(format!(
                    "qemu-img check: {} leaks, expected {want}",
                    self.leaks
                ));
            }
        }
        problems
    }
}

/// Why `qemu-img` could not judge an image.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// Writing the temporary image or starting `qemu-img` failed.
    #[error("running qemu-img: {0}")]
    Io(#[from] std::io::Error),
    /// `qemu-img snapshot` failed.
    #[error("qemu-img snapshot -c exited with {exit}: {stderr}")]
    Snapshot {
        /// Exit code.
        exit: i32,
        /// Its standard error.
        stderr: String,
    },
    /// `qemu-img convert` failed.
    #[error("qemu-img convert exited with {exit}: {stderr}")]
    Convert {
        /// Exit code.
        exit: i32,
        /// Its standard error.
        stderr: String,
    },
    /// `qemu-img` gave no usable JSON (it could not open the image).
    #[error("qemu-img {command} exited with {exit} and no JSON: {stderr}")]
    NoJson {
        /// "check" or "info".
        command: &'static str,
        /// Exit code.
        exit: i32,
        /// Its standard error.
        stderr: String,
    },
}

/// Whether `qemu-img` can be run.
#[must_use]
pub fn qemu_img_available() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn image_spec(path: &Path) -> String {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": path.to_string_lossy() },
        "backing": null,
    });
    format!("json:{spec}")
}

fn run_json(command: &'static str, args: &[&str]) -> Result<(i32, Value), QemuError> {
    let output = Command::new("qemu-img").arg(command).args(args).output()?;
    let exit = output.status.code().unwrap_or(-1);
    match serde_json::from_slice::<Value>(&output.stdout) {
        Ok(value) if value.is_object() => Ok((exit, value)),
        _ => Err(QemuError::NoJson {
            command,
            exit,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}

fn count(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs `qemu-img check` and `qemu-img info` on the qcow2 `image` bytes.
pub fn qemu_img_check(image: &[u8]) -> Result<QemuVerdict, QemuError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("crash.qcow2");
    std::fs::write(&path, image)?;
    let spec = image_spec(&path);
    let (check_exit, check) = run_json("check", &["--output=json", &spec])?;
    let (_, info) = run_json("info", &["--output=json", &spec])?;
    let corruptions = count(&check, "corruptions");
    // A repair that fails (QEMU gives up on an image whose refcounts need a
    // rebuild: "Check failed", no JSON) repaired nothing: the corruptions
    // stand.
    let corruptions_after_leak_repair = if corruptions == 0 {
        0
    } else if run_json("check", &["-r", "leaks", "--output=json", &spec]).is_err() {
        corruptions
    } else {
        run_json("check", &["--output=json", &spec])
            .map_or(corruptions, |(_, again)| count(&again, "corruptions"))
    };
    let corrupt_flag = info
        .pointer("/format-specific/data/corrupt")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(QemuVerdict {
        check_exit,
        corruptions,
        corruptions_after_leak_repair,
        leaks: count(&check, "leaks"),
        check_errors: count(&check, "check-errors"),
        corrupt_flag,
        dirty_flag: info
            .get("dirty-flag")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The guest disk of the qcow2 `image` bytes as raw bytes, by
/// `qemu-img convert -O raw` (backing file ignored: unallocated reads zero).
pub fn qemu_img_convert_raw(image: &[u8]) -> Result<Vec<u8>, QemuError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("image.qcow2");
    let raw = dir.path().join("guest.raw");
    std::fs::write(&path, image)?;
    let output = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &image_spec(&path)])
        .arg(&raw)
        .output()?;
    if !output.status.success() {
        return Err(QemuError::Convert {
            exit: output.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(std::fs::read(&raw)?)
}

/// Makes internal snapshot `name` of the qcow2 image at `path` with
/// `qemu-img snapshot -c` (QEMU's rules for shared clusters, not ours).
pub fn qemu_img_snapshot(path: &Path, name: &str) -> Result<(), QemuError> {
    let output = Command::new("qemu-img")
        .args(["snapshot", "-c", name])
        .arg(path)
        .output()?;
    if output.status.success() {
        return Ok(());
    }
    Err(QemuError::Snapshot {
        exit: output.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}
