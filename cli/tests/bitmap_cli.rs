//! End-to-end tests of `qj bitmap` and the bitmaps in `qj info`, with
//! qemu-img as the oracle (fails, not skips, without QEMU's tools).

use std::path::Path;

use serde_json::Value;

mod support;

use support::{ok, qemu_img, qj, text};

#[track_caller]
fn qemu_info(dir: &Path, file: &str) -> Value {
    let out = ok(qemu_img(dir, &["info", "--output=json", file]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[track_caller]
fn qj_info(dir: &Path, file: &str) -> Value {
    let out = ok(qj(dir, &["info", "--output", "json", file]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn bitmap_operations_round_trip_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(qj(d, &["create", "-f", "qcow2", "i.qcow2", "64M"]));
    ok(qj(d, &["bitmap", "--add", "i.qcow2", "a"]));
    ok(qj(
        d,
        &["bitmap", "--add", "-g", "1M", "--disable", "i.qcow2", "b"],
    ));
    ok(qj(d, &["io", "-c", "write 1M 4k", "i.qcow2"]));
    ok(qemu_img(d, &["check", "i.qcow2"]));
    let q = qemu_info(d, "i.qcow2");
    let listed = &q["format-specific"]["data"]["bitmaps"];
    assert_eq!(listed[0]["name"], "a", "{q}");
    assert_eq!(listed[0]["granularity"], 65536);
    assert_eq!(listed[0]["flags"], serde_json::json!(["auto"]));
    assert_eq!(listed[1]["name"], "b");
    assert_eq!(listed[1]["flags"], serde_json::json!([]));
    let ours = qj_info(d, "i.qcow2");
    let ours = &ours["format-specific"]["data"]["bitmaps"];
    assert_eq!(ours[0]["dirty-bytes"], 65536, "{ours}");
    assert_eq!(ours[1]["dirty-bytes"], 0, "{ours}");

    ok(qj(
        d,
        &["bitmap", "--merge", "a", "--enable", "i.qcow2", "b"],
    ));
    ok(qj(d, &["bitmap", "--clear", "i.qcow2", "a"]));
    let ours = qj_info(d, "i.qcow2");
    let ours = &ours["format-specific"]["data"]["bitmaps"];
    assert_eq!(ours[0]["dirty-bytes"], 0, "{ours}");
    assert_eq!(ours[1]["dirty-bytes"], 1 << 20, "{ours}");
    assert_eq!(ours[1]["flags"], serde_json::json!(["auto"]));
    ok(qemu_img(d, &["check", "i.qcow2"]));

    // QEMU removes one of ours, we remove the other.
    ok(qemu_img(d, &["bitmap", "--remove", "i.qcow2", "a"]));
    ok(qj(d, &["bitmap", "--remove", "i.qcow2", "b"]));
    ok(qemu_img(d, &["check", "i.qcow2"]));
    assert!(qemu_info(d, "i.qcow2")["format-specific"]["data"]["bitmaps"].is_null());
}

#[test]
fn bad_bitmap_requests_fail_with_one_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(qj(d, &["create", "-f", "qcow2", "i.qcow2", "64M"]));
    ok(qj(d, &["bitmap", "--add", "i.qcow2", "a"]));
    let before = std::fs::read(d.join("i.qcow2")).unwrap();
    for (args, wanted) in [
        (vec!["bitmap", "--add", "i.qcow2", "a"], "already exists"),
        (
            vec!["bitmap", "--add", "-g", "3000", "i.qcow2", "c"],
            "power of two",
        ),
        (
            vec!["bitmap", "--add", "-g", "256", "i.qcow2", "c"],
            "512 bytes",
        ),
        (
            vec!["bitmap", "--remove", "i.qcow2", "nope"],
            "no bitmap named",
        ),
        (
            vec!["bitmap", "--merge", "nope", "i.qcow2", "a"],
            "no bitmap named",
        ),
        (vec!["bitmap", "i.qcow2", "a"], "at least one"),
        (
            vec!["bitmap", "--enable", "--disable", "i.qcow2", "a"],
            "contradict",
        ),
    ] {
        let out = qj(d, &args);
        let stderr = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    // Failed requests open and close the image at most: the bitmap is
    // stored as it was, and no in_use flag is left behind.
    ok(qemu_img(d, &["check", "i.qcow2"]));
    let q = qemu_info(d, "i.qcow2");
    assert_eq!(
        q["format-specific"]["data"]["bitmaps"][0]["flags"],
        serde_json::json!(["auto"])
    );
    assert_eq!(
        std::fs::read(d.join("i.qcow2")).unwrap().len(),
        before.len()
    );
}
