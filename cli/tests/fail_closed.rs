//! Issue 12's reproducers through the `qj` binary: every case in which a
//! careless or hostile user could make qj destroy data that QEMU protects.
//! Each asserts the refusal (or the correct outcome) and that whatever the
//! command refused is byte-identical afterwards.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::{assert_one_line_error, ok, qemu_img, qemu_io, qj, text, tmp};

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// `qemu-io` holding `image` open read-write until killed: it reads
/// commands from a pipe that stays open. Returns once QEMU has the file
/// open, and so locked: it has answered a `length` command. (Probing with
/// a qj reader instead raced: a probe holding its shared lock at the
/// moment qemu-io opened made QEMU's open fail, and it never locked.)
fn qemu_holding(dir: &Path, image: &str) -> Child {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", image])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io must be installed");
    let stdin = child.stdin.as_mut().expect("piped stdin");
    stdin.write_all(b"length\n").unwrap();
    stdin.flush().unwrap();
    await_first_line(&mut child, "MiB", "qemu-io opening the image");
    child
}

/// Reads `child`'s first line of output and asserts it contains `expected`
/// (the child got that far: `what`). Bounded: the child prints it or exits
/// (end of output). The pipe is kept open afterwards: closing it would fail
/// the child's next output.
fn await_first_line(child: &mut Child, expected: &str, what: &str) {
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    out.read_line(&mut line).unwrap();
    assert!(line.contains(expected), "{what}: {line:?}");
    child.stdout = Some(out.into_inner());
}

#[test]
fn a_qj_writer_and_a_qemu_writer_exclude_each_other_both_ways() {
    let d = tmp();
    let dir = d.path();
    ok(qj(dir, &["create", "-q", "img.qcow2", "16M"]));

    // QEMU holds it for writing: every qj user that writes or reads
    // consistently is refused, naming the lock; -U may still look.
    let mut qemu = qemu_holding(dir, "img.qcow2");
    let before = bytes(&dir.join("img.qcow2"));
    for args in [
        vec!["io", "img.qcow2", "-c", "write -P 0x33 0 64k"],
        vec!["io", "-r", "img.qcow2", "-c", "read 0 4k"],
        vec!["amend", "-o", "journal=on", "img.qcow2"],
        vec!["check", "-r", "all", "img.qcow2"],
        vec!["check", "img.qcow2"],
        vec!["create", "-q", "img.qcow2", "1M"],
    ] {
        let out = qj(dir, &args);
        assert_one_line_error(&out, 1);
        let err = text(&out.stderr);
        assert!(
            err.contains("\"write\" lock") && err.contains("in use by another process"),
            "{args:?}: {err}"
        );
    }
    ok(qj(dir, &["io", "-r", "-U", "img.qcow2", "-c", "read 0 4k"]));
    ok(qj(dir, &["info", "-U", "img.qcow2"]));
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert_eq!(
        before,
        bytes(&dir.join("img.qcow2")),
        "a refused command wrote"
    );

    // qj holds it for writing: QEMU refuses, readers and writers alike.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_qj"))
        .args([
            "io",
            "img.qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "sleep 3000",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it reports its write, qj has the image open and locked (probing
    // with QEMU writers instead raced with qj's own open).
    await_first_line(&mut holder, "wrote", "qj io writing the image");
    let out = qemu_io(
        dir,
        &["-f", "qcow2", "-c", "write -P 0x22 0 4k", "img.qcow2"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out.stderr)
    );
    // A reader that wants a consistent view is refused too (qemu-img info
    // does not read data and takes no such lock).
    let out = qemu_io(dir, &["-f", "qcow2", "-r", "-c", "read 0 4k", "img.qcow2"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        text(&out.stderr)
    );
    // A second qj writer is refused too.
    assert_one_line_error(&qj(dir, &["io", "img.qcow2", "-c", "write 64k 4k"]), 1);
    assert!(holder.wait().unwrap().success());
    ok(qemu_io(
        dir,
        &["-f", "qcow2", "-c", "read -P 0x11 0 64k", "img.qcow2"],
    ));
}

#[test]
fn two_qj_writers_never_interleave_their_clusters() {
    // The reproducer: two writers of disjoint clusters at once. One of
    // them is refused; whatever the other wrote reads back exactly.
    let d = tmp();
    let dir = d.path();
    ok(qj(dir, &["create", "-q", "img.qcow2", "128M"]));
    let spawn = |pattern: u8, first: u64| {
        let mut args = vec!["io".to_string(), "img.qcow2".to_string()];
        for i in 0..200u64 {
            args.push("-c".into());
            args.push(format!("write -P {pattern:#x} {} 64k", first + i * 131072));
        }
        Command::new(env!("CARGO_BIN_EXE_qj"))
            .args(&args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(0xaa, 0).wait_with_output().unwrap();
    // Started while the first may still hold the image; then once more
    // alone, so the run always covers the contended case's outcome.
    let b = spawn(0xbb, 65536).wait_with_output().unwrap();
    let c_first = spawn(0xaa, 0);
    let c_second = spawn(0xbb, 65536);
    let (c1, c2) = (
        c_first.wait_with_output().unwrap(),
        c_second.wait_with_output().unwrap(),
    );
    assert!(a.status.success() && b.status.success());
    for (out, pattern, first) in [(&c1, 0xaau8, 0u64), (&c2, 0xbb, 65536)] {
        if !out.status.success() {
            assert!(text(&out.stderr).contains("lock"), "{}", text(&out.stderr));
            continue;
        }
        for i in [0u64, 99, 199] {
            ok(qj(
                dir,
                &[
                    "io",
                    "-r",
                    "img.qcow2",
                    "-c",
                    &format!("read -P {pattern:#x} {} 64k", first + i * 131072),
                ],
            ));
        }
    }
    let out = qemu_img(dir, &["check", "img.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn create_never_destroys_what_it_replaces_or_needs() {
    let d = tmp();
    let dir = d.path();
    std::fs::write(dir.join("keep"), b"precious").unwrap();
    for args in [
        vec!["create", "keep", "8E"],
        vec!["create", "-o", "journal=on,cluster_size=2M", "keep", "64M"],
        vec![
            "create",
            "-o",
            "journal=on,journal_size=100k",
            "keep",
            "64M",
        ],
        vec!["create", "-o", "cluster_size=3k", "keep", "64M"],
    ] {
        assert_eq!(qj(dir, &args).status.code(), Some(1), "{args:?}");
        assert_eq!(
            bytes(&dir.join("keep")),
            b"precious",
            "{args:?} touched the file"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "a partial file was left: {leftovers:?}");
    }
    // An image that would be its own backing file, directly, through a
    // symlink, or through the backing's own chain.
    ok(qj(dir, &["create", "-q", "x.qcow2", "1M"]));
    ok(qj(dir, &["io", "x.qcow2", "-c", "write -P 0x5a 0 4k"]));
    std::os::unix::fs::symlink("x.qcow2", dir.join("link.qcow2")).unwrap();
    ok(qj(
        dir,
        &["create", "-q", "-b", "x.qcow2", "-F", "qcow2", "over.qcow2"],
    ));
    let x = bytes(&dir.join("x.qcow2"));
    for backing in ["x.qcow2", "link.qcow2", "over.qcow2"] {
        let out = qj(
            dir,
            &["create", "-q", "-b", backing, "-F", "qcow2", "x.qcow2"],
        );
        assert_one_line_error(&out, 1);
        assert!(
            text(&out.stderr).contains("infinite loop"),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(bytes(&dir.join("x.qcow2")), x, "backing {backing}");
    }
    ok(qemu_io(
        dir,
        &["-f", "qcow2", "-c", "read -P 0x5a 0 4k", "over.qcow2"],
    ));
}

#[test]
fn convert_never_writes_over_its_input_or_its_backing_chain() {
    let d = tmp();
    let dir = d.path();
    ok(qj(dir, &["create", "-q", "base.qcow2", "4M"]));
    ok(qj(dir, &["io", "base.qcow2", "-c", "write -P 0x42 0 1M"]));
    ok(qj(
        dir,
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
    std::os::unix::fs::symlink("top.qcow2", dir.join("sym")).unwrap();
    std::fs::hard_link(dir.join("base.qcow2"), dir.join("hard")).unwrap();
    let (top, base) = (
        bytes(&dir.join("top.qcow2")),
        bytes(&dir.join("base.qcow2")),
    );
    for out_name in ["top.qcow2", "sym", "base.qcow2", "hard"] {
        let out = qj(dir, &["convert", "-O", "raw", "top.qcow2", out_name]);
        assert_one_line_error(&out, 1);
        assert!(
            text(&out.stderr).contains("refusing to overwrite"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(bytes(&dir.join("top.qcow2")), top);
    assert_eq!(bytes(&dir.join("base.qcow2")), base);
    ok(qj(dir, &["convert", "-O", "raw", "top.qcow2", "out.raw"]));
    assert!(bytes(&dir.join("out.raw"))[..1 << 20]
        .iter()
        .all(|&b| b == 0x42));
}

#[test]
fn backing_loops_are_refused_by_name_and_reported_by_info_and_check() {
    let d = tmp();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M",
        ],
    ));
    ok(qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    ));
    // A chain deeper than the limit: 70 layers.
    ok(qj(dir, &["create", "-q", "l0.qcow2", "1M"]));
    for i in 1..70 {
        let below = format!("l{}.qcow2", i - 1);
        ok(qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                &below,
                "-F",
                "qcow2",
                &format!("l{i}.qcow2"),
                "1M",
            ],
        ));
    }
    for (image, why) in [
        ("a.qcow2", "infinite loop"),
        ("l69.qcow2", "deeper than 64"),
    ] {
        for args in [
            vec!["io", "-r", image, "-c", "read 0 4k"],
            vec!["io", image, "-c", "write 0 4k"],
            vec!["convert", "-O", "raw", image, "out.raw"],
            vec!["map", image],
            vec!["create", "-q", "-b", image, "-F", "qcow2", "new.qcow2"],
        ] {
            let out = qj(dir, &args);
            assert_one_line_error(&out, 1);
            assert!(
                text(&out.stderr).contains(why),
                "{args:?}: {}",
                text(&out.stderr)
            );
        }
        for args in [vec!["info", image], vec!["check", image]] {
            let out = qj(dir, &args);
            assert!(
                text(&out.stderr).contains(why),
                "{args:?}: {}",
                text(&out.stderr)
            );
            assert!(!text(&out.stderr).contains("panicked"));
        }
    }
    assert!(!dir.join("new.qcow2").exists());
}

#[test]
fn io_runs_every_command_when_its_reader_goes_away() {
    let d = tmp();
    let dir = d.path();
    ok(qj(dir, &["create", "-q", "img.qcow2", "1M"]));
    let mut child = Command::new(env!("CARGO_BIN_EXE_qj"))
        .args(["io", "img.qcow2"])
        .args((0..64).flat_map(|i| {
            [
                "-c".to_string(),
                format!("write -P {} {} 4k", i + 1, i * 4096),
            ]
        }))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader takes nothing and goes away, as `| head -0` would.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    ok(qj(
        dir,
        &["io", "-r", "img.qcow2", "-c", "read -P 64 252k 4k"],
    ));
}

#[test]
fn messages_name_what_is_wrong() {
    let d = tmp();
    let dir = d.path();
    ok(qj(dir, &["create", "-q", "img.qcow2", "1M"]));
    std::fs::write(
        dir.join("short.qcow2"),
        &bytes(&dir.join("img.qcow2"))[..50],
    )
    .unwrap();
    for args in [vec!["check", "short.qcow2"], vec!["info", "short.qcow2"]] {
        let out = qj(dir, &args);
        assert_one_line_error(&out, 1);
        assert!(
            text(&out.stderr).contains("truncated"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = qj(dir, &["create", "-o", "size=1M", "two.qcow2", "2M"]);
    assert_one_line_error(&out, 2);
    assert!(text(&out.stderr).contains("given twice"));
    assert!(!dir.join("two.qcow2").exists());
    // `-o help` needs no file, and states the real journal minimum.
    for cmd in ["create", "amend"] {
        let help = ok(qj(dir, &[cmd, "-o", "help"]));
        assert!(help.contains("at least 8 clusters + 64k"), "{help}");
    }
    // A refused journal size names the minimum for the image's clusters.
    let out = qj(
        dir,
        &[
            "create",
            "-o",
            "journal=on,journal_size=100k",
            "j.qcow2",
            "64M",
        ],
    );
    assert_one_line_error(&out, 1);
    assert!(
        text(&out.stderr).contains("589824"),
        "{}",
        text(&out.stderr)
    );
}
