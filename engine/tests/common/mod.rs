//! Helpers shared by the engine's integration tests: running QEMU's tools as
//! the independent oracle, a guest-disk model, and a small deterministic RNG.
//!
//! Tests that need `qemu-img`/`qemu-io` fail (never skip) when the tools are
//! missing: interop is a requirement, not an optional extra.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qj_engine::check::{check, RepairMode};
use qj_engine::{FileStorage, Image, Storage};

/// Most `read -P` commands handed to one `qemu-io` process: bounds the
/// command line, and a verification of a whole disk needs only a few runs.
const QEMU_IO_COMMANDS_PER_RUN_MAX: usize = 256;

/// Runs `tool` with `args`; panics with a clear message when the tool is not
/// installed (the interop tests must fail, not skip, without QEMU).
pub fn run(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run {tool} ({e}): the interop tests need QEMU's tools (qemu-img, qemu-io) on PATH"
        ),
    }
}

fn describe(tool: &str, args: &[&str], out: &Output) -> String {
    format!(
        "{tool} {}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `qemu-img` and requires exit 0; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run("qemu-img", args);
    assert!(out.status.success(), "{}", describe("qemu-img", args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-io` with the given commands on a qcow2 image and requires exit
/// 0 and no failed verification.
pub fn qemu_io(image: &Path, read_only: bool, commands: &[String]) {
    for chunk in commands.chunks(QEMU_IO_COMMANDS_PER_RUN_MAX) {
        let mut args: Vec<&str> = vec!["-f", "qcow2"];
        if read_only {
            args.push("-r");
        }
        for c in chunk {
            args.push("-c");
            args.push(c);
        }
        let path = path_str(image);
        args.push(path);
        let out = run("qemu-io", &args);
        // A failed command does not always set the exit code (aio_read -P
        // does not): look for the failure messages too.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("failed"),
            "{}",
            describe("qemu-io", &args, &out)
        );
    }
}

/// `path` as UTF-8 (test paths always are).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// What `qemu-img convert -O raw` shows as the guest disk of `image`
/// (optionally of internal snapshot `snapshot`).
pub fn convert_raw(image: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = image.with_extension(format!("converted-{}.raw", snapshot.unwrap_or("active")));
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let selector;
    if let Some(name) = snapshot {
        selector = format!("snapshot.name={name}");
        args.push("-l");
        args.push(&selector);
    }
    args.push(path_str(image));
    args.push(path_str(&out));
    qemu_img(&args);
    let bytes = std::fs::read(&out).expect("reading qemu-img convert output");
    std::fs::remove_file(&out).expect("removing qemu-img convert output");
    bytes
}

/// `qemu-img check` must exit 0 (no corruption, no leak); also requires
/// `qemu-img info` to show neither the corrupt nor the dirty bit, which check
/// does not report.
pub fn assert_check_clean(image: &Path) {
    let args = ["check", "-f", "qcow2", "--output=json", path_str(image)];
    let out = run("qemu-img", &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check is not clean:\n{}",
        describe("qemu-img", &args, &out)
    );
    let info = info_json(image);
    let data = &info["format-specific"]["data"];
    assert_ne!(data["corrupt"], serde_json::Value::Bool(true), "{info}");
    assert_ne!(info["dirty-flag"], serde_json::Value::Bool(true), "{info}");
}

/// What `qemu-img check --output=json` said.
#[derive(Debug)]
pub struct CheckOutcome {
    /// Exit code: 0 clean, 2 corruptions, 3 leaks only.
    pub exit: Option<i32>,
    /// The JSON summary.
    pub json: serde_json::Value,
    /// The per-problem lines.
    pub stderr: String,
}

impl CheckOutcome {
    /// Host clusters reported as `Leaked cluster N refcount=.. reference=0`.
    pub fn leaked_clusters(&self) -> std::collections::BTreeSet<u64> {
        self.stderr
            .split("Leaked cluster ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

/// Runs `qemu-img check --output=json` whatever its verdict.
pub fn qemu_check_json(image: &Path) -> CheckOutcome {
    let args = ["check", "-f", "qcow2", "--output=json", path_str(image)];
    let out = run("qemu-img", &args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}):\n{}",
            describe("qemu-img", &args, &out)
        )
    });
    CheckOutcome {
        exit: out.status.code(),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `qemu-img info --output=json` of a qcow2 image.
pub fn info_json(image: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "-f",
        "qcow2",
        "--output=json",
        "--force-share",
        path_str(image),
    ]);
    serde_json::from_str(&out).expect("qemu-img info prints JSON")
}

/// Has QEMU verify, with `qemu-io -r -c 'read -P ..'`, that every byte of the
/// guest disk holds what `model` says: the model is cut into runs of one
/// byte value (tests write constant fills, so runs are few).
pub fn assert_qemu_io_sees(image: &Path, model: &[u8]) {
    let commands: Vec<String> = runs(model)
        .into_iter()
        .map(|(offset, len, byte)| format!("read -P {byte:#04x} {offset} {len}"))
        .collect();
    qemu_io(image, true, &commands);
}

/// Maximal runs of equal bytes: (offset, length, value).
pub fn runs(bytes: &[u8]) -> Vec<(usize, usize, u8)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let value = bytes[start];
        let len = bytes[start..]
            .iter()
            .position(|&b| b != value)
            .unwrap_or(bytes.len() - start);
        out.push((start, len, value));
        start += len;
    }
    out
}

/// Panics with the first differing offset (not a multi-megabyte dump).
pub fn assert_same_disk(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: disk sizes differ ({} vs {} expected)",
        actual.len(),
        expected.len()
    );
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (at + 16).min(actual.len());
        panic!(
            "{what}: first difference at byte {at:#x}: got {:02x?}, expected {:02x?}",
            &actual[at..end],
            &expected[at..end]
        );
    }
}

/// Reads the whole guest disk through our engine.
pub fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read(&mut buf, 0).expect("reading the whole disk");
    buf
}

/// The whole file, for before/after comparisons of images that must not change.
pub fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh temporary directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

/// `dir/name`.
pub fn in_dir(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// xorshift64*: deterministic, so a failure reproduces from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator; seed 0 is replaced (xorshift must not start at 0).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }
}

/// `len` bytes whose every 512-byte sector holds `seed` plus its index:
/// a misplaced sector reads back as a different value.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

/// `len` guest bytes at `offset`.
pub fn read(image: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read(&mut buf, offset).unwrap();
    buf
}

/// Every byte of a device.
pub fn storage_bytes(storage: &dyn qj_engine::Storage) -> Vec<u8> {
    let mut bytes = vec![0u8; storage.len().unwrap() as usize];
    storage.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// A new journal image (4 KiB clusters, a 1 MiB journal) of
/// `virtual_size` bytes on an in-memory device, opened read-write.
pub fn journal_image_in_memory(
    virtual_size: u64,
) -> (std::sync::Arc<dyn qj_engine::Storage>, Image) {
    let storage: std::sync::Arc<dyn qj_engine::Storage> =
        std::sync::Arc::new(qj_engine::MemStorage::new());
    let opts = qj_engine::CreateOptions {
        virtual_size,
        cluster_size: 4096,
        journal: Some(qj_engine::JournalConfig {
            size_bytes: 1 << 20,
            two_flush: false,
            log_data: false,
            dedup: false,
        }),
        ..qj_engine::CreateOptions::default()
    };
    Image::create_shared(storage.clone(), &opts).unwrap();
    let image = Image::open(storage.clone(), &qj_engine::OpenOptions::read_write()).unwrap();
    (storage, image)
}

/// Our check finds no corruption, no leak and no error on the image on
/// `storage` (refcounts, mappings and COPIED flags agree).
pub fn assert_engine_check_clean(storage: &dyn Storage) {
    let report = check(storage, RepairMode::None, &[]).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "check: {:?}",
        report.messages
    );
}

/// Our check finds nothing at all on the image at `path`; QEMU's finds no
/// corruption, and no leak but the journal's clusters (QEMU does not know
/// the header extension that references them), or nothing at all on an
/// image without a journal.
pub fn assert_checks_clean(path: &Path, when: &str) {
    let storage = FileStorage::open(path, false).expect("open file");
    let ours = check(&storage, RepairMode::None, &[]).expect("check");
    let header = Image::read_header(&storage).expect("header");
    drop(storage);
    assert_eq!(
        ours.exit_code(),
        0,
        "{when}: our check: {:?}",
        ours.messages
    );
    let Some(journal) = header.journal() else {
        return assert_check_clean(path);
    };
    let cs = header.geometry().cluster_size();
    let outcome = qemu_check_json(path);
    assert_eq!(outcome.exit, Some(3), "{when}: {outcome:?}");
    let journal_clusters: std::collections::BTreeSet<u64> =
        (journal.offset / cs..(journal.offset + journal.size) / cs).collect();
    assert_eq!(
        outcome.leaked_clusters(),
        journal_clusters,
        "{when}: {outcome:?}"
    );
}
