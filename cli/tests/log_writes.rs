//! dm-log-writes logs end to end: QEMU (`qemu-io` over `blklogwrites`) and
//! qj (`qj io --log-writes`, each backend) record a small guest workload,
//! and `qj crash replay` judges every log with the same checker. QEMU's
//! tools are the oracle and are required: the tests fail without them.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod support;

use support::{ok, qj, run, text};

/// The guest workload, as qemu-io and qj io commands: allocating writes,
/// a partial-cluster overwrite, a write into a second L2 range, a discard.
const WORKLOAD: &[&str] = &[
    "write -P 0xa1 0 4k",
    "write -P 0xb2 64k 8k",
    "flush",
    "write -P 0xc3 1M 64k",
    "write -P 0xd4 2k 4k",
    "flush",
    "discard 64k 64k",
    "write -P 0xe5 3M 4k",
    "flush",
];

fn with_commands<'a>(mut args: Vec<&'a str>, file: &'a str) -> Vec<&'a str> {
    for command in WORKLOAD {
        args.extend(["-c", command]);
    }
    args.push(file);
    args
}

/// Replays `log` over `base` and returns the JSON report and exit status.
fn replay(dir: &Path, log: &str, base: &str, extra: &[&str]) -> (Value, Option<i32>) {
    let mut args = vec!["crash", "replay", log, "--base", base, "--output", "json"];
    args.extend(extra);
    let out = qj(dir, &args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): exit {:?}, stderr: {}",
            out.status.code(),
            text(&out.stderr)
        )
    });
    (json, out.status.code())
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {report}"))
}

/// A qj image `name` created with `options`, a copy of it as the base, and
/// the log of the workload run on it (with `mutation` injected, if any).
fn qj_log(dir: &Path, options: &str, mutation: Option<&str>) {
    let mut create = vec!["create", "-f", "qcow2"];
    if !options.is_empty() {
        create.extend(["-o", options]);
    }
    create.extend(["img.qcow2", "4M"]);
    ok(qj(dir, &create));
    std::fs::copy(dir.join("img.qcow2"), dir.join("base.qcow2")).unwrap();
    let mut args = vec!["io", "--log-writes", "img.log"];
    if let Some(m) = mutation {
        args.extend(["--mutate", m]);
    }
    ok(qj(dir, &with_commands(args, "img.qcow2")));
}

#[test]
fn qemu_log_replays_with_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(run(
        "qemu-img",
        &["create", "-f", "qcow2", "img.qcow2", "4M"],
        d,
    ));
    std::fs::copy(d.join("img.qcow2"), d.join("base.qcow2")).unwrap();
    std::fs::write(d.join("img.log"), b"").unwrap();
    let opts = "driver=qcow2,file.driver=blklogwrites,file.file.driver=file,\
                file.file.filename=img.qcow2,file.log.driver=file,\
                file.log.filename=img.log,file.log-sector-size=512";
    ok(run(
        "qemu-io",
        &with_commands(vec!["-t", "writethrough", "--image-opts"], opts),
        d,
    ));
    let (report, code) = replay(d, "img.log", "base.qcow2", &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["writer"], "qemu");
    assert_eq!(report["view_reader"], "qemu-img convert");
    // Writethrough: QEMU flushes after every allocating step.
    assert!(count(&report, "flushes") >= 9, "{report}");
    assert!(
        count(&report, "states") > count(&report, "flushes"),
        "{report}"
    );
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert!(count(&report, "qemu_checked") > 0, "{report}");
}

#[test]
fn qj_flush_ordering_log_replays_with_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qj_log(d, "", None);
    let (report, code) = replay(d, "img.log", "base.qcow2", &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["writer"], "qj");
    assert_eq!(report["view_reader"], "qj engine");
    // One label per guest command.
    assert_eq!(count(&report, "marks"), WORKLOAD.len() as u64, "{report}");
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
}

#[test]
fn qj_journal_log_replays_with_no_corruption_and_no_leak() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qj_log(d, "journal=on,journal_size=1M", None);
    let log = std::fs::read(d.join("img.log")).unwrap();
    let decoded = qj_spec::log_writes::decode_log(&log).unwrap();
    let commits = decoded
        .entries
        .iter()
        .filter(|e| e.label.starts_with("txn ") && e.label.ends_with(" commit"))
        .count();
    assert!(commits >= 3, "a commit label per durable transaction");
    let (report, code) = replay(d, "img.log", "base.qcow2", &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert_eq!(count(&report, "leak_states"), 0, "{report}");
}

#[test]
fn flush_ordering_mutations_are_caught_through_the_log() {
    let mutations = qj_model_checks::mutations("ordered");
    assert!(!mutations.is_empty());
    // `qj io` takes no snapshots: snapshot-table-first is proven by `qj
    // crash` (model-checks/tests/snapshot_crash.rs).
    for mutation in mutations.iter().filter(|&&m| m != "snapshot-table-first") {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qj_log(d, "", Some(mutation));
        let (report, code) = replay(d, "img.log", "base.qcow2", &["--qemu-every", "0"]);
        assert_eq!(code, Some(1), "{mutation} not caught: {report}");
        assert!(count(&report, "corruptions") > 0, "{mutation}: {report}");
        // The reproducer names one state, and rerunning it finds it again.
        let finding = &report["findings"][0];
        let state = finding["state"].as_u64().unwrap().to_string();
        let (again, code) = replay(
            d,
            "img.log",
            "base.qcow2",
            &[
                "--qemu-every",
                "0",
                "--state",
                &state,
                "--write-image",
                "crash.qcow2",
            ],
        );
        assert_eq!(code, Some(1), "{mutation}: {again}");
        assert_eq!(count(&again, "states"), 1);
        assert_eq!(again["findings"][0]["detail"], finding["detail"]);
        assert!(d.join("crash.qcow2").exists());
    }
}

/// A valid qj log to damage, and the base it belongs to.
fn damaged(d: &Path, at: usize, bytes: &[u8]) -> Output {
    let mut log = std::fs::read(d.join("img.log")).unwrap();
    log[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(d.join("bad.log"), &log).unwrap();
    qj(d, &["crash", "replay", "bad.log", "--base", "base.qcow2"])
}

#[test]
fn bad_logs_are_refused_with_the_entry_and_offset_and_the_base_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qj_log(d, "", None);
    let base_before = std::fs::read(d.join("base.qcow2")).unwrap();
    let log = std::fs::read(d.join("img.log")).unwrap();
    let decoded = qj_spec::log_writes::decode_log(&log).unwrap();
    let write = decoded
        .entries
        .iter()
        .find(|e| e.header.nr_sectors > 0)
        .unwrap();
    let flush = decoded
        .entries
        .iter()
        .find(|e| e.kind == qj_spec::log_writes::EntryKind::Flush)
        .unwrap();
    let at = |e: &qj_spec::log_writes::DecodedEntry| e.log_offset as usize;
    let entry_named = |e: &qj_spec::log_writes::DecodedEntry| {
        format!("entry {} at byte {}", e.index, e.log_offset)
    };
    let far_sector = (base_before.len() as u64 + (64 << 20)) / 512;
    let cases: Vec<(usize, Vec<u8>, String, &str)> = vec![
        (
            0,
            vec![0xff],
            "super block: field `magic` at byte 0".into(),
            "magic",
        ),
        (8, vec![2], "field `version` at byte 8".into(), "version 2"),
        (at(flush) + 100, vec![1], entry_named(flush), "padding"),
        (at(flush) + 16, vec![16 | 1], entry_named(flush), "METADATA"),
        (
            at(write),
            far_sector.to_le_bytes().to_vec(),
            entry_named(write),
            "past the end of the base image",
        ),
    ];
    for (offset, bytes, where_, why) in cases {
        let out = damaged(d, offset, &bytes);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{why}: {stderr}");
        assert!(
            stderr.contains(&where_),
            "{why}: {stderr} should name {where_}"
        );
        assert!(stderr.contains(why), "{stderr} should say {why}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Truncated: the log ends inside the last counted entry's data.
    let last_write = decoded
        .entries
        .iter()
        .rev()
        .find(|e| e.header.nr_sectors > 0)
        .unwrap();
    std::fs::write(d.join("short.log"), &log[..last_write.data.start + 100]).unwrap();
    let out = qj(d, &["crash", "replay", "short.log", "--base", "base.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&entry_named(last_write)), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
    // A state the log does not have is a usage error naming the range.
    let out = qj(
        d,
        &[
            "crash",
            "replay",
            "img.log",
            "--base",
            "base.qcow2",
            "--state",
            "100000",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("state 100000 does not exist"), "{stderr}");
    assert_eq!(std::fs::read(d.join("base.qcow2")).unwrap(), base_before);
}

/// Writes that fill a journal ring past a few commits between flushes, a
/// discard, and writes into new L2 ranges: enough for the journal
/// mutations below to leave a crash state that shows them.
fn journal_workload() -> Vec<String> {
    let mut commands = Vec::new();
    for i in 0..12u64 {
        commands.push(format!("write -P {} {}k 4k", i + 1, i * 64));
        if i % 3 == 2 {
            commands.push("flush".into());
        }
    }
    for command in [
        "discard 0 64k",
        "write -P 9 2M 8k",
        "flush",
        "write -P 10 3M 64k",
        "flush",
    ] {
        commands.push(command.into());
    }
    commands
}

#[test]
fn journal_mutations_that_show_in_a_log_are_caught_through_it() {
    // The others need states this short log does not reach (ring wrap-around
    // and cluster reuse; `qj crash` catches them with its own workloads).
    for mutation in [
        "no-data-checksums",
        "no-dirty-bit",
        "checkpoint-before-flush",
    ] {
        assert!(qj_model_checks::mutations("journal").contains(&mutation));
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let create = ["create", "-f", "qcow2", "-o", "journal=on,journal_size=1M"];
        ok(qj(d, &[&create[..], &["img.qcow2", "4M"]].concat()));
        std::fs::copy(d.join("img.qcow2"), d.join("base.qcow2")).unwrap();
        let commands = journal_workload();
        let mut args = vec!["io", "--log-writes", "img.log", "--mutate", mutation];
        for command in &commands {
            args.extend(["-c", command]);
        }
        args.push("img.qcow2");
        ok(qj(d, &args));
        let (report, code) = replay(d, "img.log", "base.qcow2", &["--qemu-every", "0"]);
        assert_eq!(code, Some(1), "{mutation} not caught: {report}");
        assert!(count(&report, "corruptions") > 0, "{mutation}: {report}");
    }
}

#[test]
fn qemu_lazy_refcounts_states_are_recovered_as_qemu_opens_them() {
    // With lazy_refcounts QEMU leaves refcounts behind the tables while the
    // dirty bit is set; its next open repairs them. The checker does the
    // same repair first, so those states are leaks, not corruptions.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "img.qcow2",
            "4M",
        ],
        d,
    ));
    std::fs::copy(d.join("img.qcow2"), d.join("base.qcow2")).unwrap();
    std::fs::write(d.join("img.log"), b"").unwrap();
    let opts = "driver=qcow2,file.driver=blklogwrites,file.file.driver=file,\
                file.file.filename=img.qcow2,file.log.driver=file,\
                file.log.filename=img.log,file.log-sector-size=512";
    let mut args = vec!["-t", "writethrough", "--image-opts", opts];
    let commands: Vec<String> = (0..6)
        .map(|i| format!("write -P {} {}k 4k", i + 1, i * 64))
        .collect();
    for command in &commands {
        args.extend(["-c", command]);
    }
    ok(run("qemu-io", &args, d));
    let (report, code) = replay(d, "img.log", "base.qcow2", &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert!(count(&report, "leak_states") > 0, "{report}");
}

#[test]
fn a_log_written_while_serving_over_nbd_replays_clean() {
    // The same workload through the front door: qemu-io over NBD against
    // `qj serve --log-writes`, on the journal; one checker judges the log.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-o",
            "journal=on,journal_size=1M",
            "img.qcow2",
            "4M",
        ],
    ));
    std::fs::copy(d.join("img.qcow2"), d.join("base.qcow2")).unwrap();
    let sock = d.join("nbd.sock");
    let sock_arg = sock.to_str().unwrap().to_string();
    let mut server = Command::new(env!("CARGO_BIN_EXE_qj"))
        .args([
            "serve",
            "-k",
            &sock_arg,
            "--log-writes",
            "img.log",
            "img.qcow2",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Bounded wait for the socket.
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={sock_arg}");
    let mut args = vec!["-f", "raw"];
    for command in WORKLOAD {
        args.extend(["-c", command]);
    }
    args.push(&uri);
    let out = Command::new("qemu-io")
        .args(&args)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Without -t the server ends after its last client, closing cleanly.
    assert!(server.wait().unwrap().success());
    let (report, code) = replay(d, "img.log", "base.qcow2", &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert_eq!(count(&report, "leak_states"), 0, "{report}");
}
