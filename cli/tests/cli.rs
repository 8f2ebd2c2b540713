//! End-to-end tests of the `qj` binary, with QEMU's qemu-img and qemu-io as
//! the independent oracle. Tests that need them fail (not skip) when they
//! are missing: the oracle is part of what is being tested.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod support;

use support::{assert_one_line_error, be64, ok, qemu_img, qemu_io, qj, text, tmp, OFFSET_MASK};

#[test]
fn qj_images_pass_qemu_check_and_read_back_in_qemu_io() {
    let dir = tmp();
    let d = dir.path();
    for (cluster_size, refcount_bits) in [
        ("512", "1"),
        ("4k", "8"),
        ("64k", "16"),
        ("16k", "64"),
        ("2M", "2"),
    ] {
        let img = format!("img-{cluster_size}-{refcount_bits}.qcow2");
        let created = ok(qj(
            d,
            &[
                "create",
                "-o",
                &format!("cluster_size={cluster_size},refcount_bits={refcount_bits}"),
                &img,
                "8M",
            ],
        ));
        assert!(
            created.starts_with(&format!("Formatting '{img}', fmt=qcow2")),
            "{created}"
        );
        let io = ok(qj(
            d,
            &[
                "io",
                &img,
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0x5a 100k 8k",
                "-c",
                "flush",
                "-c",
                "write -P 0x11 1M 128k",
                "-c",
                "write -z 1M 64k",
                "-c",
                "write -P 0x22 4M 2M",
                "-c",
                "discard 4M 2M",
                "-c",
                "write -P 0x33 7M 1M",
            ],
        ));
        assert!(io.contains("wrote 65536/65536 bytes at offset 0\n"), "{io}");
        assert!(
            io.contains("discard 2097152/2097152 bytes at offset 4194304\n"),
            "{io}"
        );
        let check = qemu_img(d, &["check", &img]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{img}: qemu-img check: {}{}",
            text(&check.stdout),
            text(&check.stderr)
        );
        ok(qj(d, &["check", &img]));
        let verify = ok(qemu_io(
            d,
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "read -P 0x5a 100k 8k",
                "-c",
                "read -P 0 64k 36k",
                "-c",
                "read -P 0 1M 64k",
                "-c",
                "read -P 0x11 1088k 64k",
                "-c",
                "read -P 0 4M 2M",
                "-c",
                "read -P 0x33 7M 1M",
                &img,
            ],
        ));
        assert!(
            !verify.contains("Pattern verification failed"),
            "{img}: {verify}"
        );
    }
}

#[test]
fn qemu_images_read_back_through_qj_io() {
    let dir = tmp();
    let d = dir.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "q.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -c -P 0x77 128k 4k",
            "-c",
            "write -z 8k 4k",
            "-c",
            "write -P 0x5 3M 1M",
            "q.qcow2",
        ],
    ));
    let out = ok(qj(
        d,
        &[
            "io",
            "-r",
            "-f",
            "qcow2",
            "q.qcow2",
            "-c",
            "read -P 0xab 0 8k",
            "-c",
            "read -P 0 8k 4k",
            "-c",
            "read -P 0xab 12k 52k",
            "-c",
            "read -P 0x77 128k 4k",
            "-c",
            "read -P 0 256k 1M",
            "-c",
            "read -P 0x5 -s 4k -l 4k 3M 64k",
        ],
    ));
    assert!(
        out.contains("read 4096/4096 bytes at offset 131072\n"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // A wrong pattern: qemu-io's message, exit 1, later commands still run.
    let out = qj(
        d,
        &[
            "io",
            "-r",
            "q.qcow2",
            "-c",
            "read -P 0x1 0 4k",
            "-c",
            "read -P 0xab 0 4k",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("Pattern verification failed at offset 0, 4096 bytes\n"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("read 4096/4096 bytes at offset 0\n").count(),
        2,
        "{stdout}"
    );
    // The same run under qemu-io exits the same way.
    let q = qemu_io(
        d,
        &[
            "-r",
            "-c",
            "read -P 0x1 0 4k",
            "-c",
            "read -P 0xab 0 4k",
            "q.qcow2",
        ],
    );
    assert_eq!(q.status.code(), Some(1));
}

/// A two-layer chain with data in both layers, a zero cluster over backing
/// data, a compressed cluster, and a top larger than its backing file.
fn build_chain(d: &Path) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 5 0 192k",
            "-c",
            "write -P 9 512k 64k",
            "base.qcow2",
        ],
    ));
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "2M",
        ],
    ));
    ok(qemu_io(d, &["-c", "write -c -P 7 192k 64k", "top.qcow2"]));
    ok(qj(
        d,
        &[
            "io",
            "top.qcow2",
            "-c",
            "write -P 6 64k 64k",
            "-c",
            "write -z 128k 64k",
            "-c",
            "write -P 8 1536k 4k",
            "-c",
            "discard 512k 64k",
        ],
    ));
}

#[test]
fn convert_equals_qemu_img_convert() {
    let dir = tmp();
    let d = dir.path();
    build_chain(d);
    ok(qj(
        d,
        &["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", "qj.raw"],
    ));
    ok(qemu_img(
        d,
        &["convert", "-O", "raw", "top.qcow2", "qemu.raw"],
    ));
    let status = Command::new("cmp")
        .args(["qj.raw", "qemu.raw"])
        .current_dir(d)
        .status()
        .expect("cmp");
    assert!(status.success(), "qj convert differs from qemu-img convert");
    let raw = std::fs::read(d.join("qj.raw")).unwrap();
    assert_eq!(raw.len(), 2 << 20);
    assert!(raw[..64 << 10].iter().all(|&b| b == 5));
    assert!(raw[128 << 10..192 << 10].iter().all(|&b| b == 0));
    assert!(raw[192 << 10..256 << 10].iter().all(|&b| b == 7));
}

#[test]
fn map_matches_qemu_img_map() {
    let dir = tmp();
    let d = dir.path();
    build_chain(d);
    let ours: Value =
        serde_json::from_str(&ok(qj(d, &["map", "--output", "json", "top.qcow2"]))).unwrap();
    let theirs: Value =
        serde_json::from_str(&ok(qemu_img(d, &["map", "--output=json", "top.qcow2"]))).unwrap();
    assert_eq!(ours, theirs);
    assert!(ours.as_array().unwrap().len() >= 6, "{ours}");

    // The human table refuses compressed clusters like qemu-img; without
    // them, it is the same table.
    let out = qj(d, &["map", "top.qcow2"]);
    assert_one_line_error(&out, 1);
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "plain.qcow2",
        ],
    ));
    ok(qj(
        d,
        &[
            "io",
            "plain.qcow2",
            "-c",
            "write -P 1 64k 128k",
            "-c",
            "write -z 0 64k",
        ],
    ));
    assert_eq!(
        ok(qj(d, &["map", "plain.qcow2"])),
        ok(qemu_img(d, &["map", "plain.qcow2"]))
    );

    // Three layers, the middle one shorter than the others.
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "plain.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
            "768k",
        ],
    ));
    ok(qemu_io(
        d,
        &[
            "-c",
            "write -P 3 640k 64k",
            "-c",
            "write -z 64k 64k",
            "mid.qcow2",
        ],
    ));
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "third.qcow2",
            "3M",
        ],
    ));
    ok(qj(
        d,
        &[
            "io",
            "third.qcow2",
            "-c",
            "write -P 4 2M 64k",
            "-c",
            "discard 640k 64k",
        ],
    ));
    for output in ["--output=json", "--output=human"] {
        assert_eq!(
            ok(qj(d, &["map", output, "third.qcow2"])),
            ok(qemu_img(d, &["map", output, "third.qcow2"])),
            "{output}"
        );
    }
}

struct Layout {
    l2_offset: u64,
    data_cluster: u64,
    refcount_entry_offset: u64,
}

/// Where a qj image with 64 KiB clusters and 16-bit refcounts keeps the
/// mapping of guest cluster 0 and the refcount of its data cluster.
fn layout(path: &Path) -> Layout {
    let bytes = std::fs::read(path).unwrap();
    let l1 = be64(&bytes, 40);
    let refcount_table = be64(&bytes, 48);
    let l2_offset = be64(&bytes, l1) & OFFSET_MASK;
    let data = be64(&bytes, l2_offset) & OFFSET_MASK;
    assert!(
        l2_offset != 0 && data != 0,
        "guest cluster 0 is not allocated"
    );
    let block = be64(&bytes, refcount_table) & OFFSET_MASK;
    let data_cluster = data >> 16;
    Layout {
        l2_offset,
        data_cluster,
        refcount_entry_offset: block + data_cluster * 2,
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn written_image(d: &Path, name: &str) -> PathBuf {
    ok(qj(d, &["create", "-q", name, "1M"]));
    ok(qj(
        d,
        &[
            "io",
            name,
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 64k 64k",
        ],
    ));
    d.join(name)
}

#[test]
fn check_exit_codes_and_messages_match_qemu_img() {
    let dir = tmp();
    let d = dir.path();

    let clean = written_image(d, "clean.qcow2");
    let ours = qj(d, &["check", "clean.qcow2"]);
    assert_eq!(ours.status.code(), Some(0));
    assert!(text(&ours.stdout).starts_with("No errors were found on the image.\n"));
    assert_eq!(
        qemu_img(d, &["check", "clean.qcow2"]).status.code(),
        Some(0)
    );
    let json: Value =
        serde_json::from_str(&ok(qj(d, &["check", "--output", "json", "clean.qcow2"]))).unwrap();
    let qemu_json: Value =
        serde_json::from_str(&ok(qemu_img(d, &["check", "--output=json", "clean.qcow2"]))).unwrap();
    assert_eq!(json, qemu_json);
    drop(clean);

    // Leak: guest cluster 0's L2 entry cleared, its data cluster still counted.
    let leak = written_image(d, "leak.qcow2");
    let l = layout(&leak);
    patch(&leak, l.l2_offset, &[0; 8]);
    let ours = qj(d, &["check", "leak.qcow2"]);
    let theirs = qemu_img(d, &["check", "leak.qcow2"]);
    assert_eq!(ours.status.code(), Some(3));
    assert_eq!(theirs.status.code(), Some(3));
    let expected = format!("Leaked cluster {} refcount=1 reference=0", l.data_cluster);
    assert!(
        text(&ours.stderr).contains(&expected),
        "{}",
        text(&ours.stderr)
    );
    assert!(text(&theirs.stderr).contains(&expected));
    assert!(text(&ours.stdout).contains("\n1 leaked clusters were found on the image.\n"));
    let json: Value = serde_json::from_str(&text(
        &qj(d, &["check", "--output", "json", "leak.qcow2"]).stdout,
    ))
    .unwrap();
    let qemu_json: Value = serde_json::from_str(&text(
        &qemu_img(d, &["check", "--output=json", "leak.qcow2"]).stdout,
    ))
    .unwrap();
    assert_eq!(json, qemu_json);
    assert_eq!(json["leaks"], 1);
    assert_eq!(json["check-errors"], 0);
    // -r leaks repairs it; qemu-img then agrees.
    let repaired = qj(d, &["check", "-r", "leaks", "leak.qcow2"]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}",
        text(&repaired.stdout)
    );
    assert!(text(&repaired.stdout).contains("    1 leaked clusters\n"));
    assert_eq!(qemu_img(d, &["check", "leak.qcow2"]).status.code(), Some(0));

    // Corruption: the data cluster's refcount set to zero.
    let bad = written_image(d, "bad.qcow2");
    let l = layout(&bad);
    patch(&bad, l.refcount_entry_offset, &[0, 0]);
    let ours = qj(d, &["check", "bad.qcow2"]);
    let theirs = qemu_img(d, &["check", "bad.qcow2"]);
    assert_eq!(ours.status.code(), Some(2));
    assert_eq!(theirs.status.code(), Some(2));
    let expected = format!("ERROR cluster {} refcount=0 reference=1", l.data_cluster);
    assert!(
        text(&ours.stderr).contains(&expected),
        "{}",
        text(&ours.stderr)
    );
    assert!(text(&theirs.stderr).contains(&expected));
    let json: Value = serde_json::from_str(&text(
        &qj(d, &["check", "--output", "json", "bad.qcow2"]).stdout,
    ))
    .unwrap();
    let qemu_json: Value = serde_json::from_str(&text(
        &qemu_img(d, &["check", "--output=json", "bad.qcow2"]).stdout,
    ))
    .unwrap();
    assert_eq!(json, qemu_json);
    // The zero refcount, and the COPIED flag that no longer matches it.
    assert_eq!(json["corruptions"], 2);
    let fixed = qj(d, &["check", "-r", "all", "bad.qcow2"]);
    assert_eq!(fixed.status.code(), Some(0), "{}", text(&fixed.stdout));
    assert_eq!(qemu_img(d, &["check", "bad.qcow2"]).status.code(), Some(0));
    ok(qemu_io(
        d,
        &[
            "-r",
            "-c",
            "read -P 1 0 64k",
            "-c",
            "read -P 2 64k 64k",
            "bad.qcow2",
        ],
    ));
}

#[test]
fn info_json_uses_qemu_keys_and_values() {
    let dir = tmp();
    let d = dir.path();
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-o",
            "cluster_size=4k,refcount_bits=8",
            "base.qcow2",
            "3M",
        ],
    ));
    // No SIZE: the backing file's virtual size.
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ));
    let top = d.join("top.qcow2");
    let top = top.to_str().unwrap();
    let ours: Value = serde_json::from_str(&ok(qj(d, &["info", "--output", "json", top]))).unwrap();
    let theirs: Value =
        serde_json::from_str(&ok(qemu_img(d, &["info", "--output=json", top]))).unwrap();
    for key in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
        "format-specific",
    ] {
        assert_eq!(ours[key], theirs[key], "key {key}");
    }
    assert_eq!(ours["virtual-size"], 3 << 20);
    assert_eq!(ours["format-specific"]["type"], "qcow2");
    assert_eq!(ours["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(ours["qj"]["backend"], "flush-ordering");
    let base: Value =
        serde_json::from_str(&ok(qj(d, &["info", "--output=json", "base.qcow2"]))).unwrap();
    assert_eq!(base["cluster-size"], 4096);
    assert_eq!(base["format-specific"]["data"]["refcount-bits"], 8);
    assert!(base.get("backing-filename").is_none());

    // The human text is qemu-img's, up to where qemu-img goes on with its
    // child node and we with our own details.
    for image in ["base.qcow2", "top.qcow2"] {
        let ours = ok(qj(d, &["info", image]));
        let theirs = ok(qemu_img(d, &["info", image]));
        assert_eq!(
            ours.split("qj details:").next(),
            theirs.split("Child node").next(),
            "{image}"
        );
    }
    let human = ok(qj(d, &["info", "top.qcow2"]));
    assert!(
        human.contains("virtual size: 3 MiB (3145728 bytes)\n"),
        "{human}"
    );
    assert!(human.contains("backing file: base.qcow2\n"), "{human}");
    assert!(human.contains("    refcount bits: 16\n"), "{human}");
}

#[test]
fn info_describes_an_image_the_engine_refuses() {
    let dir = tmp();
    let d = dir.path();
    ok(qj(d, &["create", "-q", "odd.qcow2", "1M"]));
    // Incompatible feature bit 20: unknown to everyone.
    patch(&d.join("odd.qcow2"), 77, &[0x10]);
    let out = qj(d, &["info", "odd.qcow2"]);
    assert_one_line_error(&out, 1);
    assert!(
        text(&out.stderr).contains("bit 20"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("virtual size: 1 MiB (1048576 bytes)"));
    let out = qj(d, &["info", "--output", "json", "odd.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(json["qj"]["incompatible-features"], 1 << 20);
    assert!(json["qj"]["open-error"]
        .as_str()
        .unwrap()
        .contains("bit 20"));
    // Check and io refuse it, like qemu-img.
    assert_one_line_error(&qj(d, &["check", "odd.qcow2"]), 1);
    assert_eq!(qemu_img(d, &["check", "odd.qcow2"]).status.code(), Some(1));
    assert_one_line_error(&qj(d, &["io", "-r", "odd.qcow2", "-c", "read 0 4k"]), 1);
}

#[test]
fn abort_leaves_only_what_was_flushed() {
    let dir = tmp();
    let d = dir.path();
    ok(qj(d, &["create", "-q", "a.qcow2", "4M"]));
    let out = ok(qj(
        d,
        &[
            "io",
            "a.qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "flush",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "abort",
            "-c",
            "write -P 3 2M 64k",
        ],
    ));
    assert!(
        out.contains("wrote 65536/65536 bytes at offset 1048576\n"),
        "{out}"
    );
    assert!(
        !out.contains("at offset 2097152"),
        "commands after abort ran: {out}"
    );
    // The flushed write survives; the unflushed allocation's metadata never
    // reached the disk, so the image is consistent (at most leaks).
    let check = qemu_img(d, &["check", "a.qcow2"]);
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{}",
        text(&check.stdout)
    );
    ok(qemu_io(
        d,
        &[
            "-r",
            "-c",
            "read -P 1 0 64k",
            "-c",
            "read -P 0 1M 64k",
            "a.qcow2",
        ],
    ));
}

#[test]
fn bad_arguments_give_one_line_and_the_right_status() {
    let dir = tmp();
    let d = dir.path();
    std::fs::write(d.join("junk.qcow2"), vec![0x5a; 8192]).unwrap();
    ok(qj(d, &["create", "-q", "good.qcow2", "1M"]));
    let cases: &[(&[&str], i32)] = &[
        (&["frobnicate"], 2),
        (&["create", "x.qcow2", "12Q"], 2),
        (&["create", "-o", "foo=bar", "x.qcow2", "1M"], 2),
        (&["create", "-o", "commit=draft", "x.qcow2", "1M"], 2),
        (&["create", "-o", "cluster_size=1000", "x.qcow2", "1M"], 1),
        (&["create", "x.qcow2"], 2),
        (&["create", "-b", "good.qcow2", "y.qcow2"], 2),
        (
            &["create", "-b", "missing.qcow2", "-F", "qcow2", "y.qcow2"],
            1,
        ),
        (&["info", "missing.qcow2"], 1),
        (&["info", "junk.qcow2"], 1),
        (&["check", "missing.qcow2"], 1),
        (&["check", "junk.qcow2"], 1),
        (&["check", "-r", "bogus", "good.qcow2"], 2),
        (&["map", "missing.qcow2"], 1),
        (&["map", "junk.qcow2"], 1),
        (&["io", "missing.qcow2", "-c", "read 0 4k"], 1),
        (&["io", "junk.qcow2", "-c", "read 0 4k"], 1),
        (&["io", "good.qcow2"], 2),
        (&["io", "good.qcow2", "-c", "frob 1 2"], 1),
        (&["io", "good.qcow2", "-c", "read 0 12Q"], 1),
        (&["io", "good.qcow2", "-c", "read 0 2M"], 1),
        (&["io", "-r", "good.qcow2", "-c", "write 0 4k"], 1),
        (&["convert", "-O", "vmdk", "good.qcow2", "out"], 2),
        (&["convert", "-O", "raw", "missing.qcow2", "out"], 1),
        (&["convert", "-O", "raw", "junk.qcow2", "out"], 1),
    ];
    for (args, code) in cases {
        let out = qj(d, args);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "qj {args:?}: {}",
            text(&out.stderr)
        );
        assert_one_line_error(&out, *code);
    }
    // Nothing was created by the failed creates.
    assert!(!d.join("x.qcow2").exists());
    assert!(!d.join("y.qcow2").exists());
    let listed = qj(d, &["io", "good.qcow2", "-c", "frob 1 2"]);
    assert!(
        text(&listed.stderr).contains("read, write"),
        "the error lists the commands"
    );
    let keys = qj(d, &["create", "-o", "foo=bar", "x.qcow2", "1M"]);
    assert!(
        text(&keys.stderr).contains("cluster_size"),
        "the error lists the keys"
    );
}

#[test]
fn demo_runs_clean() {
    let dir = tmp();
    let out = ok(qj(dir.path(), &["demo"]));
    assert!(out.contains("every byte as written"), "{out}");
    assert!(
        out.contains("qj check: 0 corruptions, 0 leaks, 0 check errors"),
        "{out}"
    );
    assert!(out.contains("qemu-img check: exit 0"), "{out}");
    assert!(out.contains("result: consistent"), "{out}");
}
