//! `qj snapshot` end to end, against `qemu-img snapshot`, `qemu-img
//! info`, `qemu-io` and `qemu-img check`, on both backends; and its bad
//! input: one `qj:` line, exit 1 for a failed operation, 2 for bad usage,
//! nothing written.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{assert_one_line_error, be64, ok, qemu_img, qemu_io, qj, text, tmp};

/// `qemu-img check` finds no corruption; leaks only the journal's
/// clusters (QEMU does not know the extension), none without one.
fn assert_qemu_check(d: &Path, name: &str, journal: bool) {
    let out = qemu_img(d, &["check", "--output=json", name]);
    let want = if journal { 3 } else { 0 };
    assert_eq!(out.status.code(), Some(want), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.get("corruptions").is_none(), "{json}");
    ok(qj(d, &["check", name]));
}

/// Names in `snapshot -l` output, in order.
fn listed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn round_trip(journal: bool) {
    let dir = tmp();
    let d = dir.path();
    let img = "s.qcow2";
    let mut create = vec!["create", "-q"];
    if journal {
        create.extend(["-o", "journal=on"]);
    }
    create.extend([img, "4M"]);
    ok(qj(d, &create));
    ok(qj(d, &["io", "-c", "write -P 0x11 0 128k", img]));
    ok(qj(d, &["snapshot", "-c", "one", img]));
    ok(qj(d, &["io", "-c", "write -P 0x22 64k 128k", img]));
    assert_qemu_check(d, img, journal);

    // Both tools list it, with the same fields.
    let ours = ok(qj(d, &["snapshot", "-l", img]));
    let theirs = ok(qemu_img(d, &["snapshot", "-l", img]));
    assert_eq!(listed(&ours), ["one"], "{ours}");
    assert_eq!(listed(&theirs), ["one"], "{theirs}");
    assert_eq!(ours.lines().nth(1), theirs.lines().nth(1), "header row");
    let ours_row: Vec<&str> = ours.lines().nth(2).unwrap().split_whitespace().collect();
    let theirs_row: Vec<&str> = theirs.lines().nth(2).unwrap().split_whitespace().collect();
    // ID, TAG, VM_SIZE, DATE, VM_CLOCK, ICOUNT (QEMU prints local time,
    // the same as UTC on our machines).
    assert_eq!(ours_row, theirs_row, "{ours}\n{theirs}");
    let info: Value = serde_json::from_str(&ok(qj(d, &["info", "--output", "json", img]))).unwrap();
    let qemu_info: Value =
        serde_json::from_str(&ok(qemu_img(d, &["info", "--output=json", img]))).unwrap();
    assert_eq!(info["snapshots"], qemu_info["snapshots"], "{info}");
    let human = ok(qj(d, &["info", img]));
    assert!(human.contains("Snapshot list:"), "{human}");

    // QEMU reads the snapshot back; our apply restores it.
    ok(qemu_io(d, &["-r", "-c", "read -P 0x22 64k 128k", img]));
    ok(qemu_img(
        d,
        &[
            "convert",
            "-l",
            "snapshot.name=one",
            "-O",
            "raw",
            img,
            "one.raw",
        ],
    ));
    let raw = std::fs::read(d.join("one.raw")).unwrap();
    assert!(raw[..128 << 10].iter().all(|&b| b == 0x11));
    assert!(raw[128 << 10..].iter().all(|&b| b == 0));
    ok(qj(d, &["snapshot", "-a", "one", img]));
    assert_qemu_check(d, img, journal);
    ok(qemu_io(
        d,
        &[
            "-r",
            "-c",
            "read -P 0x11 0 128k",
            "-c",
            "read -P 0 128k 64k",
            img,
        ],
    ));

    // QEMU makes one and deletes ours; we apply and delete QEMU's.
    ok(qemu_img(d, &["snapshot", "-c", "two", img]));
    ok(qemu_img(d, &["snapshot", "-d", "one", img]));
    ok(qj(d, &["io", "-c", "write -P 0x33 0 64k", img]));
    ok(qj(d, &["snapshot", "-a", "two", img]));
    ok(qemu_io(d, &["-r", "-c", "read -P 0x11 0 128k", img]));
    ok(qj(d, &["snapshot", "-d", "two", img]));
    assert_qemu_check(d, img, journal);
    assert!(listed(&ok(qemu_img(d, &["snapshot", "-l", img]))).is_empty());
}

#[test]
fn snapshots_round_trip_with_qemu_img_on_flush_ordering() {
    round_trip(false);
}

#[test]
fn snapshots_round_trip_with_qemu_img_on_the_journal() {
    round_trip(true);
}

#[test]
fn bad_snapshot_commands_fail_with_one_line_and_write_nothing() {
    let dir = tmp();
    let d = dir.path();
    let img = "b.qcow2";
    ok(qj(d, &["create", "-q", img, "1M"]));
    ok(qj(d, &["io", "-c", "write -P 1 0 4k", img]));
    ok(qj(d, &["snapshot", "-c", "a", img]));
    let before = std::fs::read(d.join(img)).unwrap();
    for (args, code) in [
        (vec!["snapshot", "-a", "nope", img], 1),
        (vec!["snapshot", "-d", "nope", img], 1),
        (vec!["snapshot", "-c", "a", img], 1),
        (vec!["snapshot", "-U", "-c", "x", img], 2),
        (vec!["snapshot", "-f", "raw", "-l", img], 2),
    ] {
        let out = qj(d, &args);
        assert_one_line_error(&out, code);
        assert_eq!(
            std::fs::read(d.join(img)).unwrap(),
            before,
            "{args:?} wrote to the image"
        );
    }
    let out = qj(d, &["snapshot", "-a", "nope", img]);
    assert!(text(&out.stderr).contains("snapshot \"nope\" not found"));
    // No operation, or two: clap's usage error.
    assert_eq!(qj(d, &["snapshot", img]).status.code(), Some(2));
    assert_eq!(
        qj(d, &["snapshot", "-l", "-d", "a", img]).status.code(),
        Some(2)
    );

    // A snapshot whose L1 table lies past the end of the file: info and
    // check report it, writes are refused naming the field, nothing
    // changes.
    let snapshots_offset = be64(&before, 64);
    let mut damaged = before.clone();
    damaged[snapshots_offset as usize..snapshots_offset as usize + 8]
        .copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(d.join(img), &damaged).unwrap();
    let info = qj(d, &["info", img]);
    assert_eq!(info.status.code(), Some(1));
    assert!(
        text(&info.stdout).contains("snapshot table:")
            && text(&info.stderr).contains("l1_table_offset"),
        "{}{}",
        text(&info.stdout),
        text(&info.stderr)
    );
    assert_ne!(qj(d, &["check", img]).status.code(), Some(0));
    for args in [
        vec!["snapshot", "-c", "b", img],
        vec!["snapshot", "-l", img],
    ] {
        let out = qj(d, &args);
        assert_one_line_error(&out, 1);
        assert!(text(&out.stderr).contains("l1_table_offset"), "{args:?}");
    }
    assert_eq!(std::fs::read(d.join(img)).unwrap(), damaged);
}
