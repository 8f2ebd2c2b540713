//! Helpers shared by the `qj` end-to-end tests: running `qj` and QEMU's
//! tools in a directory, asserting outcomes, reading big-endian fields.
//! A tool that is missing fails the test (the oracle is part of what is
//! tested).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `program` with `args` in `dir`.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

/// Runs the `qj` under test.
pub fn qj(dir: &Path, args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_qj"), args, dir)
}

/// Runs `qemu-img`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run("qemu-img", args, dir)
}

/// Runs `qemu-io`.
pub fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run("qemu-io", args, dir)
}

/// Bytes as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts the exit status and returns stdout.
#[track_caller]
pub fn expect_exit(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts the exit status, one `qj: ` line on stderr, and no panic.
#[track_caller]
pub fn assert_one_line_error(out: &Output, code: i32) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {stderr}");
    assert!(lines[0].starts_with("qj: "), "{stderr}");
}

/// The big-endian u64 at `at`.
pub fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Host offset bits of an L1 or L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A fresh temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
