//! `qj create -o journal=on,dedup=on`, `qj amend -o dedup=on|off`, and
//! `qj info` showing the persisted index, end to end, with QEMU reading and
//! writing the deduplicated image.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{assert_one_line_error, ok, qemu_img, qemu_io, qj, text, tmp};

fn info_json(dir: &Path, file: &str) -> Value {
    let out = ok(qj(dir, &["info", "--output", "json", file]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn dedup_lifecycle_against_qemu() {
    let dir = tmp();
    let d = dir.path();
    let created = ok(qj(
        d,
        &[
            "create",
            "-o",
            "journal=on,journal_size=1M,dedup=on",
            "d.qcow2",
            "4M",
        ],
    ));
    assert!(created.contains("dedup=on"), "{created}");
    // Four clusters of 0xab in one write, two of 0xcd: two stored.
    ok(qj(
        d,
        &[
            "io",
            "-c",
            "write -P 0xab 0 256k",
            "-c",
            "write -P 0xcd 1M 128k",
            "d.qcow2",
        ],
    ));
    let info = info_json(d, "d.qcow2");
    let journal = &info["qj"]["journal"];
    assert_eq!(journal["dedup"], true, "{info}");
    assert_eq!(journal["dedup-index"]["entries"], 2, "{info}");
    assert_eq!(journal["dedup-index"]["clusters-saved"], 4, "{info}");
    let human = ok(qj(d, &["info", "d.qcow2"]));
    assert!(
        human.contains("dedup index: 2 entries, 4 clusters saved"),
        "{human}"
    );

    // QEMU reads every mapping exactly, and writes into a shared cluster
    // by copying it.
    ok(qemu_io(
        d,
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 256k",
            "-c",
            "read -P 0xcd 1M 128k",
            "-c",
            "write -P 0xee 64k 4k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xee 64k 4k",
            "-c",
            "read -P 0xab 68k 188k",
            "d.qcow2",
        ],
    ));
    let check = qemu_img(d, &["check", "-f", "qcow2", "--output=json", "d.qcow2"]);
    let verdict: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert!(
        verdict.get("corruptions").is_none(),
        "{}",
        text(&check.stderr)
    );

    // QEMU cleared "journal valid": our next read-write open re-creates
    // the journal and drops the index; qj check -r leaks then leaves
    // nothing for QEMU to complain about but our own clusters.
    ok(qj(d, &["io", "-c", "write -P 0xab 2M 64k", "d.qcow2"]));
    ok(qj(d, &["check", "d.qcow2"]));
    ok(qemu_io(
        d,
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xee 64k 4k",
            "-c",
            "read -P 0xab 2M 64k",
            "d.qcow2",
        ],
    ));
}

#[test]
fn dedup_needs_a_journal_and_amend_switches_it() {
    let dir = tmp();
    let d = dir.path();
    let out = qj(d, &["create", "-o", "dedup=on", "x.qcow2", "4M"]);
    assert_one_line_error(&out, 2);
    assert!(text(&out.stderr).contains("'dedup' needs journal=on"));
    assert!(!d.join("x.qcow2").exists());

    ok(qj(d, &["create", "plain.qcow2", "4M"]));
    let out = qj(d, &["amend", "-o", "dedup=on", "plain.qcow2"]);
    assert_one_line_error(&out, 1);
    assert!(
        text(&out.stderr).contains("dedup needs a journal"),
        "{}",
        text(&out.stderr)
    );

    ok(qj(
        d,
        &[
            "create",
            "-o",
            "journal=on,journal_size=1M",
            "j.qcow2",
            "4M",
        ],
    ));
    ok(qj(d, &["amend", "-o", "dedup=on", "j.qcow2"]));
    assert_eq!(info_json(d, "j.qcow2")["qj"]["journal"]["dedup"], true);
    ok(qj(d, &["io", "-c", "write -P 0x11 0 128k", "j.qcow2"]));
    assert_eq!(
        info_json(d, "j.qcow2")["qj"]["journal"]["dedup-index"]["entries"],
        1
    );
    ok(qj(d, &["amend", "-o", "dedup=off", "j.qcow2"]));
    let info = info_json(d, "j.qcow2");
    assert_eq!(info["qj"]["journal"]["dedup"], false, "{info}");
    assert!(info["qj"]["journal"].get("dedup-index").is_none(), "{info}");
    // The index's clusters were freed with it: nothing leaks.
    ok(qj(d, &["check", "j.qcow2"]));
    ok(qemu_io(
        d,
        &["-f", "qcow2", "-r", "-c", "read -P 0x11 0 128k", "j.qcow2"],
    ));
}
