//! End-to-end tests of the journal commands of `qj` (`create -o journal=..`,
//! `amend`, `info`'s journal block, `journal dump`, `io -c abort` on a
//! journalled image), with qemu-img and qemu-io as the independent oracle.
//! They fail (not skip) when the QEMU tools are missing.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

mod support;

use support::{ok, qemu_img, qemu_io, qj, text};

/// Asserts the exit status, one `qj: ` line on stderr, no panic, and
/// returns that line.
#[track_caller]
fn one_line_error(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {stderr}");
    assert!(lines[0].starts_with("qj: "), "{stderr}");
    lines[0].to_string()
}

/// `qj info --output json FILE`, parsed.
#[track_caller]
fn info_json(dir: &Path, file: &str) -> Value {
    let out = ok(qj(dir, &["info", "--output", "json", file]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn journalled_image_lifecycle_against_qemu() {
    let dir = tmp();
    let d = dir.path();
    let created = ok(qj(
        d,
        &[
            "create",
            "-o",
            "journal=on,journal_size=1M",
            "j.qcow2",
            "4M",
        ],
    ));
    assert!(created.contains("journal=on"), "{created}");

    // A fresh journalled image: the journal is described, clean.
    ok(qj(
        d,
        &["io", "-c", "write -P 0xab 0 128k", "-c", "flush", "j.qcow2"],
    ));
    let info = info_json(d, "j.qcow2");
    assert_eq!(info["qj"]["backend"], "journal", "{info}");
    let journal = &info["qj"]["journal"];
    assert_eq!(journal["size"], 1 << 20, "{info}");
    assert_eq!(journal["commit-protocol"], "single-flush", "{info}");
    assert_eq!(journal["dirty-bit"], false, "{info}");
    assert_eq!(journal["valid"], true, "{info}");
    assert!(journal["committed-seq"].as_u64().is_some(), "{info}");
    assert!(journal["used-percent"].as_u64().is_some(), "{info}");
    // QEMU's keys are untouched by ours.
    assert_eq!(info["virtual-size"], 4 << 20, "{info}");
    assert_eq!(info["format"], "qcow2", "{info}");
    let journal_offset = journal["offset"].as_u64().unwrap();

    // Killed after a flush: the committed transactions are only in the
    // journal, so the image is dirty and QEMU must refuse it by name.
    ok(qj(
        d,
        &[
            "io",
            "-c",
            "write -P 0xcd 128k 64k",
            "-c",
            "flush",
            "-c",
            "abort",
            "j.qcow2",
        ],
    ));
    let refused = qemu_img(d, &["info", "j.qcow2"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("journal dirty"),
        "{}",
        text(&refused.stderr)
    );

    // Looking changes nothing: info and a read-only io replay in memory.
    let before = std::fs::read(d.join("j.qcow2")).unwrap();
    let info = info_json(d, "j.qcow2");
    let journal = &info["qj"]["journal"];
    assert_eq!(journal["dirty-bit"], true, "{info}");
    assert_eq!(journal["replayed-in-memory"], true, "{info}");
    assert!(
        journal["replayed-transactions"].as_u64().unwrap() >= 1,
        "{info}"
    );
    let human = ok(qj(d, &["info", "j.qcow2"]));
    assert!(human.contains("dirty bit: true"), "{human}");
    assert!(human.contains("replayed in memory"), "{human}");
    ok(qj(
        d,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0xab 0 128k",
            "-c",
            "read -P 0xcd 128k 64k",
            "j.qcow2",
        ],
    ));
    // A wrong pattern fails: the read really verifies.
    let wrong = qj(d, &["io", "-r", "-c", "read -P 0xab 128k 64k", "j.qcow2"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), before);

    // The dump of the dirty journal, as text and as JSON.
    let dump = ok(qj(d, &["journal", "dump", "j.qcow2"]));
    assert!(
        dump.contains(&format!("journal at {journal_offset:#x}")),
        "{dump}"
    );
    assert!(dump.contains("to replay (dirty)"), "{dump}");
    assert!(dump.contains("\ntransaction "), "{dump}");
    let dump_json: Value = serde_json::from_str(&ok(qj(
        d,
        &["journal", "dump", "--output", "json", "j.qcow2"],
    )))
    .unwrap();
    assert_eq!(dump_json["base_offset"], journal_offset, "{dump_json}");
    assert_eq!(dump_json["size_bytes"], 1 << 20, "{dump_json}");

    // A read-write open replays in place; our checker then finds it clean.
    ok(qj(d, &["io", "-c", "read -P 0xcd 128k 64k", "j.qcow2"]));
    let check = qj(d, &["check", "j.qcow2"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    assert_eq!(info_json(d, "j.qcow2")["qj"]["journal"]["dirty-bit"], false);

    // Removing the journal gives QEMU an image with no leaks and the data.
    ok(qj(d, &["amend", "-o", "journal=off", "j.qcow2"]));
    let info = info_json(d, "j.qcow2");
    assert!(info["qj"].get("journal").is_none(), "{info}");
    assert_eq!(info["qj"]["backend"], "flush-ordering", "{info}");
    let check = qemu_img(d, &["check", "--output=json", "j.qcow2"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    let check: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert!(check.get("leaks").is_none(), "{check}");
    assert!(check.get("corruptions").is_none(), "{check}");
    ok(qemu_io(
        d,
        &[
            "-c",
            "read -P 0xab 0 128k",
            "-c",
            "read -P 0xcd 128k 64k",
            "j.qcow2",
        ],
    ));

    // And back on, with the draft's commit; twice is refused.
    ok(qj(
        d,
        &["amend", "-o", "journal=on,commit=draft", "j.qcow2"],
    ));
    let info = info_json(d, "j.qcow2");
    assert_eq!(
        info["qj"]["journal"]["commit-protocol"], "two-flush",
        "{info}"
    );
    assert_eq!(info["qj"]["journal"]["size"], 16 << 20, "{info}");
    let again = qj(d, &["amend", "-o", "journal=on", "j.qcow2"]);
    let line = one_line_error(&again, 1);
    assert!(line.contains("already has a journal"), "{line}");
    ok(qj(
        d,
        &[
            "io",
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "read -P 0xab 0 128k",
            "j.qcow2",
        ],
    ));
    ok(qj(d, &["io", "-r", "-c", "read -P 0x11 1M 64k", "j.qcow2"]));
}

#[test]
fn draft_commit_is_shown_as_two_flush() {
    let dir = tmp();
    let d = dir.path();
    ok(qj(
        d,
        &[
            "create",
            "-q",
            "-o",
            "journal=on,commit=draft,journal_size=1M",
            "c.qcow2",
            "1M",
        ],
    ));
    let human = ok(qj(d, &["info", "c.qcow2"]));
    assert!(human.contains("commit protocol: two-flush"), "{human}");
    assert!(human.contains("journal: 1 MiB (1048576 bytes)"), "{human}");
    ok(qj(
        d,
        &["io", "-c", "write -P 7 0 4k", "-c", "flush", "c.qcow2"],
    ));
    ok(qj(d, &["io", "-r", "-c", "read -P 7 0 4k", "c.qcow2"]));
    // Without journal=on the image has no journal at all.
    ok(qj(
        d,
        &["create", "-q", "-o", "journal=off", "p.qcow2", "1M"],
    ));
    let info = info_json(d, "p.qcow2");
    assert!(info["qj"].get("journal").is_none(), "{info}");
    let check = qemu_img(d, &["check", "p.qcow2"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
}

#[test]
fn bad_journal_options_and_files_give_one_line() {
    let dir = tmp();
    let d = dir.path();
    let line = one_line_error(
        &qj(d, &["create", "-o", "commit=draft", "x.qcow2", "1M"]),
        2,
    );
    assert!(line.contains("needs journal=on"), "{line}");
    let line = one_line_error(
        &qj(d, &["create", "-o", "journal_size=1M", "x.qcow2", "1M"]),
        2,
    );
    assert!(
        line.contains("journal_size") && line.contains("journal=on"),
        "{line}"
    );
    assert!(
        !d.join("x.qcow2").exists(),
        "bad options must create nothing"
    );
    let line = one_line_error(
        &qj(d, &["create", "-o", "journal=maybe", "x.qcow2", "1M"]),
        2,
    );
    assert!(
        line.contains("'maybe'") && line.contains("on, off"),
        "{line}"
    );
    let line = one_line_error(
        &qj(
            d,
            &["create", "-o", "journal=on,commit=fast", "x.qcow2", "1M"],
        ),
        2,
    );
    assert!(line.contains("single-flush, draft"), "{line}");
    let line = one_line_error(
        &qj(
            d,
            &[
                "create",
                "-o",
                "journal=on,journal_size=1k",
                "x.qcow2",
                "1M",
            ],
        ),
        2,
    );
    assert!(line.contains("journal_size"), "{line}");

    ok(qj(d, &["create", "-q", "plain.qcow2", "1M"]));
    let before = std::fs::read(d.join("plain.qcow2")).unwrap();
    let line = one_line_error(
        &qj(d, &["amend", "-o", "cluster_size=4k", "plain.qcow2"]),
        2,
    );
    assert!(
        line.contains("'cluster_size'") && line.contains("journal, journal_size, commit"),
        "{line}"
    );
    let line = one_line_error(&qj(d, &["amend", "-o", "commit=draft", "plain.qcow2"]), 2);
    assert!(line.contains("needs journal=on"), "{line}");
    let line = one_line_error(&qj(d, &["amend", "plain.qcow2"]), 2);
    assert!(line.contains("-o"), "{line}");
    assert_eq!(std::fs::read(d.join("plain.qcow2")).unwrap(), before);
    let line = one_line_error(&qj(d, &["amend", "-o", "journal=on", "missing.qcow2"]), 1);
    assert!(line.contains("missing.qcow2"), "{line}");

    // A qcow2 image without a journal, garbage, and an empty file.
    let line = one_line_error(&qj(d, &["journal", "dump", "plain.qcow2"]), 1);
    assert!(line.contains("no qjournal header extension"), "{line}");
    std::fs::write(d.join("junk.bin"), [0x5au8; 4096]).unwrap();
    let line = one_line_error(&qj(d, &["journal", "dump", "junk.bin"]), 1);
    assert!(line.contains("bad magic"), "{line}");
    std::fs::write(d.join("empty.bin"), []).unwrap();
    let line = one_line_error(&qj(d, &["journal", "dump", "empty.bin"]), 1);
    assert!(line.contains("empty"), "{line}");
    let line = one_line_error(&qj(d, &["journal", "dump", "none.bin"]), 1);
    assert!(line.contains("none.bin"), "{line}");
}

#[test]
fn a_bare_journal_region_is_dumped_from_offset_zero() {
    use qj_journal::{FileStorage, Journal, JournalOptions, Transaction};
    let dir = tmp();
    let d = dir.path();
    let region_bytes = 64 * 1024;
    {
        let storage = FileStorage::create(&d.join("region.bin")).unwrap();
        let journal =
            Journal::create(storage, 0, region_bytes, 512, JournalOptions::new(1 << 20)).unwrap();
        let mut tx = Transaction::new();
        tx.write(0x20000, &[0x5a; 512]).unwrap();
        assert_eq!(journal.commit(tx).unwrap(), 1);
        // Dropped without a checkpoint: the transaction stays to replay.
    }
    // The file is the region: as long as the journal, even where the
    // journal has not written yet.
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("region.bin"))
        .unwrap()
        .set_len(region_bytes)
        .unwrap();
    let dump = ok(qj(d, &["journal", "dump", "region.bin"]));
    assert!(
        dump.starts_with(&format!(
            "journal at 0x0: {region_bytes} bytes, 512-byte blocks"
        )),
        "{dump}"
    );
    assert!(
        dump.contains("1 transaction(s) to replay (dirty)"),
        "{dump}"
    );
    assert!(dump.contains("0x20000+0x200"), "{dump}");
    let json: Value = serde_json::from_str(&ok(qj(
        d,
        &["journal", "dump", "--output", "json", "region.bin"],
    )))
    .unwrap();
    assert_eq!(json["base_offset"], 0, "{json}");
    assert_eq!(json["size_bytes"], region_bytes, "{json}");
    let transactions = json["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 1, "{json}");
    assert_eq!(transactions[0]["seq"], 1, "{json}");
    assert_eq!(
        transactions[0]["descriptors"][0]["chunks"][0]["target"], 0x20000,
        "{json}"
    );
}

/// Three synced writes left in a dirty journal by `-c abort`, as a power
/// cut after the last flush would leave them.
fn dirty_journal_of_three_commits(d: &Path, file: &str) {
    ok(qj(
        d,
        &["create", "-o", "journal=on,cluster_size=4k", file, "16M"],
    ));
    ok(qj(
        d,
        &[
            "io",
            file,
            "-c",
            "write -P 0x11 0 8k",
            "-c",
            "flush",
            "-c",
            "write -P 0x22 64k 8k",
            "-c",
            "flush",
            "-c",
            "write -P 0x33 128k 8k",
            "-c",
            "flush",
            "-c",
            "abort",
        ],
    ));
}

#[test]
fn a_dirty_journal_is_checked_as_replayed_without_writing() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "dirty.qcow2");
    let before = std::fs::read(d.join("dirty.qcow2")).unwrap();
    let out = qj(d, &["check", "--output", "json", "dirty.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("3 committed transaction(s) replayed in memory"),
        "{stderr}"
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The six data clusters exist only in the journal's transactions: the
    // tables in place map none of them.
    assert_eq!(json["allocated-clusters"], 6, "{json}");
    assert_eq!(
        std::fs::read(d.join("dirty.qcow2")).unwrap(),
        before,
        "a check wrote to the image"
    );
}

#[test]
fn a_journal_damaged_in_the_middle_is_refused_and_reported_by_check() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "torn.qcow2");
    // Flip a byte in a data block of the second of the three transactions:
    // the third proves the second was committed.
    let dump: Value = serde_json::from_str(&ok(qj(
        d,
        &["journal", "dump", "--output", "json", "torn.qcow2"],
    )))
    .unwrap();
    let transactions = dump["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 3, "{dump}");
    let second = &transactions[1];
    assert_eq!(second["seq"], 2);
    let at = second["device_offset"].as_u64().unwrap()
        + second["descriptor_blocks"].as_u64().unwrap() * 512
        + 10;
    let mut bytes = std::fs::read(d.join("torn.qcow2")).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(d.join("torn.qcow2"), &bytes).unwrap();

    // Open, read-write or read-only: refused, naming the transaction and
    // the way on, with nothing written.
    for args in [
        &["io", "torn.qcow2", "-c", "read -P 0x11 0 8k"][..],
        &["io", "-r", "torn.qcow2", "-c", "read -P 0x11 0 8k"][..],
    ] {
        let line = one_line_error(&qj(d, args), 1);
        assert!(line.contains("transaction 2"), "{line}");
        assert!(line.contains("qj check"), "{line}");
        assert_eq!(
            std::fs::read(d.join("torn.qcow2")).unwrap(),
            bytes,
            "{args:?}"
        );
    }

    // `qj check` names it as a corruption (exit 2), still writing nothing;
    // a repair short of `-r all` (which salvages) is refused.
    let out = qj(d, &["check", "torn.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ERROR journal at ") && stderr.contains("transaction 2"),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).contains("1 errors were found"),
        "{}",
        text(&out.stdout)
    );
    let line = one_line_error(&qj(d, &["check", "-r", "leaks", "torn.qcow2"]), 1);
    assert!(line.contains("cannot be replayed"), "{line}");
    assert_eq!(std::fs::read(d.join("torn.qcow2")).unwrap(), bytes);

    // QEMU refuses it by our bit's name.
    let out = qemu_img(d, &["check", "torn.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("journal dirty"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn logged_data_is_a_property_of_the_image_and_survives_a_crash() {
    let dir = tmp();
    let d = dir.path();
    let created = ok(qj(
        d,
        &[
            "create",
            "-o",
            "journal=on,journal_size=1M,log_data=on",
            "l.qcow2",
            "4M",
        ],
    ));
    assert!(created.contains("log_data=on"), "{created}");
    let info = info_json(d, "l.qcow2");
    assert_eq!(info["qj"]["journal"]["log-data"], true, "{info}");
    assert!(ok(qj(d, &["info", "l.qcow2"])).contains("logged data: on"));
    let length_before = std::fs::metadata(d.join("l.qcow2")).unwrap().len();

    // Synced 4 KiB writes into fresh clusters, then a crash: the bytes
    // exist only in the journal (the file did not grow), and replay puts
    // them in place.
    ok(qj(
        d,
        &[
            "io",
            "-c",
            "write -P 0x5a 0 4k",
            "-c",
            "flush",
            "-c",
            "write -P 0x6b 64k 4k",
            "-c",
            "flush",
            "-c",
            "abort",
            "l.qcow2",
        ],
    ));
    assert_eq!(
        std::fs::metadata(d.join("l.qcow2")).unwrap().len(),
        length_before,
        "logged data reaches the file only at checkpoint"
    );
    assert!(!qemu_img(d, &["info", "l.qcow2"]).status.success());
    ok(qj(
        d,
        &[
            "io",
            "-c",
            "read -P 0x5a 0 4k",
            "-c",
            "read -P 0x6b 64k 4k",
            "-c",
            "read -P 0 4k 60k",
            "l.qcow2",
        ],
    ));
    let out = qemu_io(
        d,
        &[
            "-r",
            "-c",
            "read -P 0x5a 0 4k",
            "-c",
            "read -P 0x6b 64k 4k",
            "l.qcow2",
        ],
    );
    assert!(
        out.status.success() && !text(&out.stdout).contains("verification failed"),
        "{}",
        text(&out.stdout)
    );
    // A plain journal says off.
    ok(qj(
        d,
        &[
            "create",
            "-o",
            "journal=on,journal_size=1M",
            "p.qcow2",
            "4M",
        ],
    ));
    assert_eq!(info_json(d, "p.qcow2")["qj"]["journal"]["log-data"], false);
    // log_data needs journal=on, and takes on or off only.
    for (list, want) in [
        ("log_data=on", "needs journal=on"),
        ("journal=on,log_data=yes", "on, off"),
    ] {
        let line = one_line_error(&qj(d, &["create", "-o", list, "x.qcow2", "4M"]), 2);
        assert!(line.contains(want), "{list}: {line}");
    }
    assert!(!d.join("x.qcow2").exists());
}

/// `qj journal dump --output json FILE`, parsed.
#[track_caller]
fn dump_json(dir: &Path, file: &str) -> Value {
    serde_json::from_str(&ok(qj(dir, &["journal", "dump", "--output", "json", file]))).unwrap()
}

/// Device offset of the header slot in charge of the journal of `file`.
fn active_slot_offset(dir: &Path, file: &str) -> usize {
    let dump = dump_json(dir, file);
    let base = dump["base_offset"].as_u64().unwrap();
    let slot = dump["header"]["slot"].as_u64().unwrap();
    (base + slot * 512) as usize
}

/// Reads the three writes of `dirty_journal_of_three_commits` back.
fn reads_of_three_commits(file: &str, read_only: bool) -> Vec<&str> {
    let mut args = vec!["io"];
    if read_only {
        args.push("-r");
    }
    args.extend([
        file,
        "-c",
        "read -P 0x11 0 8k",
        "-c",
        "read -P 0x22 64k 8k",
        "-c",
        "read -P 0x33 128k 8k",
    ]);
    args
}

#[test]
fn one_flipped_byte_in_the_active_header_slot_loses_no_flushed_write() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "j.qcow2");
    let at = active_slot_offset(d, "j.qcow2") + 20;
    let mut bytes = std::fs::read(d.join("j.qcow2")).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(d.join("j.qcow2"), &bytes).unwrap();

    // The other slot describes the same journal: check replays all three.
    let out = qj(d, &["check", "j.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("3 committed transaction(s) replayed in memory"),
        "{stderr}"
    );
    ok(qj(d, &reads_of_three_commits("j.qcow2", true)));
    assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), bytes);
    // A read-write open replays them for good.
    ok(qj(d, &reads_of_three_commits("j.qcow2", false)));
    ok(qj(d, &["check", "j.qcow2"]));
    ok(qj(d, &reads_of_three_commits("j.qcow2", true)));
}

#[test]
fn a_newer_header_slot_with_an_unknown_feature_is_refused_not_skipped() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "j.qcow2");
    let at = active_slot_offset(d, "j.qcow2");
    let mut bytes = std::fs::read(d.join("j.qcow2")).unwrap();
    // A future writer's incompatible journal feature, sealed correctly.
    bytes[at + 55] |= 1;
    let crc = qj_spec::journal::checksum::crc32c(&bytes[at..at + 508]);
    bytes[at + 508..at + 512].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(d.join("j.qcow2"), &bytes).unwrap();
    for args in [
        &reads_of_three_commits("j.qcow2", false)[..],
        &reads_of_three_commits("j.qcow2", true)[..],
    ] {
        let line = one_line_error(&qj(d, args), 1);
        assert!(line.contains("incompatible_features"), "{line}");
        assert!(line.contains("not used in its place"), "{line}");
        assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), bytes, "{args:?}");
    }
    let out = qj(d, &["check", "j.qcow2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), bytes);
}

#[test]
fn a_damaged_last_transaction_is_reported_never_called_clean() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "j.qcow2");
    // A data block of the third (last) transaction: its first block still
    // has the magic, the checksum and the sequence number.
    let dump = dump_json(d, "j.qcow2");
    let third = &dump["transactions"][2];
    assert_eq!(third["seq"], 3, "{dump}");
    let at = third["device_offset"].as_u64().unwrap()
        + third["descriptor_blocks"].as_u64().unwrap() * 512
        + 10;
    let mut bytes = std::fs::read(d.join("j.qcow2")).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(d.join("j.qcow2"), &bytes).unwrap();

    let out = qj(d, &["check", "j.qcow2"]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WARNING") && stderr.contains("sequence number 3"),
        "{stderr}"
    );
    assert!(stderr.contains("acknowledged"), "{stderr}");
    assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), bytes);

    let out = qj(d, &reads_of_three_commits("j.qcow2", true));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("qj: warning:") && stderr.contains("sequence number 3"),
        "{stderr}"
    );
    // The first two are there; the third's write is gone, and was said to be.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    ok(qj(
        d,
        &[
            "io",
            "-r",
            "j.qcow2",
            "-c",
            "read -P 0x11 0 8k",
            "-c",
            "read -P 0x22 64k 8k",
        ],
    ));
}

#[test]
fn a_journal_damaged_in_the_middle_is_salvaged_by_check_repair_all() {
    let dir = tmp();
    let d = dir.path();
    dirty_journal_of_three_commits(d, "j.qcow2");
    let dump = dump_json(d, "j.qcow2");
    let second = &dump["transactions"][1];
    let at = second["device_offset"].as_u64().unwrap()
        + second["descriptor_blocks"].as_u64().unwrap() * 512
        + 10;
    let mut bytes = std::fs::read(d.join("j.qcow2")).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(d.join("j.qcow2"), &bytes).unwrap();

    // `-r leaks` cannot salvage: refused, pointing at `-r all`, file intact.
    let line = one_line_error(&qj(d, &["check", "-r", "leaks", "j.qcow2"]), 1);
    assert!(line.contains("qj check -r all"), "{line}");
    assert_eq!(std::fs::read(d.join("j.qcow2")).unwrap(), bytes);

    let out = qj(d, &["check", "-r", "all", "j.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("replayed transactions 1 to 1")
            && stderr.contains("lost transaction 2 and every transaction after it")
            && stderr.contains("transaction 3 proves"),
        "{stderr}"
    );
    // Both checkers call the result clean; the valid prefix is there.
    let out = qj(d, &["check", "j.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = qemu_img(d, &["check", "j.qcow2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    ok(qemu_io(d, &["-r", "-c", "read -P 0x11 0 8k", "j.qcow2"]));
    ok(qj(d, &["io", "j.qcow2", "-c", "read -P 0x11 0 8k"]));
    // The journal is gone; it can be given a new one.
    ok(qj(d, &["amend", "-o", "journal=on", "j.qcow2"]));
    ok(qj(
        d,
        &[
            "io",
            "j.qcow2",
            "-c",
            "write -P 0x44 64k 8k",
            "-c",
            "read -P 0x11 0 8k",
        ],
    ));
}

/// Byte offset of the qjournal extension's payload in an image's header.
fn journal_extension_payload(bytes: &[u8]) -> usize {
    let ext = bytes[..4096]
        .windows(4)
        .position(|w| w == [0x71, 0x6a, 0x72, 0x6e])
        .expect("a qjrn header extension");
    ext + 8
}

#[test]
fn journal_messages_say_what_happened_and_what_to_do() {
    let dir = tmp();
    let d = dir.path();

    // A dirty journal that replays: a repair says how to replay first.
    dirty_journal_of_three_commits(d, "dirty.qcow2");
    let before = std::fs::read(d.join("dirty.qcow2")).unwrap();
    for mode in ["leaks", "all"] {
        let line = one_line_error(&qj(d, &["check", "-r", mode, "dirty.qcow2"]), 1);
        assert!(line.contains("journal is dirty"), "{line}");
        assert!(line.contains("qj io -c flush"), "{line}");
        assert_eq!(std::fs::read(d.join("dirty.qcow2")).unwrap(), before);
    }

    // The extension's offset past the end of the file is named.
    let mut bytes = before.clone();
    let payload = journal_extension_payload(&bytes);
    bytes[payload..payload + 8].copy_from_slice(&0x4000_0000u64.to_be_bytes());
    std::fs::write(d.join("far.qcow2"), &bytes).unwrap();
    let line = one_line_error(&qj(d, &["io", "-r", "far.qcow2", "-c", "length"]), 1);
    assert!(
        line.contains("offset 0x40000000 is past the end of the file"),
        "{line}"
    );
    assert_eq!(std::fs::read(d.join("far.qcow2")).unwrap(), bytes);

    // Dirty, but the extension is gone (an unknown extension type now).
    let mut bytes = before.clone();
    let payload = journal_extension_payload(&bytes);
    bytes[payload - 5] ^= 1;
    std::fs::write(d.join("noext.qcow2"), &bytes).unwrap();
    let line = one_line_error(&qj(d, &["io", "noext.qcow2", "-c", "length"]), 1);
    assert!(line.contains("no qjournal extension"), "{line}");
    assert!(line.contains("qj check -r all"), "{line}");
    assert_eq!(std::fs::read(d.join("noext.qcow2")).unwrap(), bytes);
    let out = qj(d, &["check", "noext.qcow2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // Dirty, but "journal valid" (autoclear bit 60, byte 88) cleared.
    let mut bytes = before;
    bytes[88] &= !0x10;
    std::fs::write(d.join("invalid.qcow2"), &bytes).unwrap();
    for args in [
        &["io", "invalid.qcow2", "-c", "length"][..],
        &["io", "-r", "invalid.qcow2", "-c", "length"][..],
    ] {
        let line = one_line_error(&qj(d, args), 1);
        assert!(line.contains("\"journal valid\""), "{line}");
        assert!(line.contains("qj check -r all"), "{line}");
        assert_eq!(std::fs::read(d.join("invalid.qcow2")).unwrap(), bytes);
    }
    let out = qj(d, &["check", "-r", "all", "invalid.qcow2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Salvage"), "{stderr}");
    let out = qemu_img(d, &["check", "invalid.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}
