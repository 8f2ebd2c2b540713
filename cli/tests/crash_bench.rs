//! End-to-end tests of `qj crash` and `qj bench`: the binary is run as a
//! user runs it, and what it prints is parsed back.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use qj_model_checks::{all_mutations, BACKENDS, ENGINE_BACKENDS, WORKLOAD_NAMES};
use serde_json::Value;
use support::{expect_exit, text};

fn qj(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qj"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qj: {e}"))
}

/// Asserts a usage error: exit 2, one `qj: ` line on stderr naming every
/// string of `valid`. Returns the line.
#[track_caller]
fn expect_usage_error(args: &[&str], valid: &[&str]) -> String {
    let out = qj(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got: {stderr}");
    assert!(lines[0].starts_with("qj: "), "{stderr}");
    for name in valid {
        assert!(
            lines[0].contains(name),
            "{args:?}: {name} missing from: {stderr}"
        );
    }
    lines[0].to_string()
}

/// Splits a reproducer line the way a POSIX shell would: words separated
/// by spaces, single quotes grouping (the operation list is quoted).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line}");
    if in_word {
        words.push(word);
    }
    words
}

/// The reproducer lines a run printed (unshrunk first, then shrunk).
fn reproducer_lines(stdout: &str) -> Vec<String> {
    violations_with_reproducers(stdout)
        .into_iter()
        .map(|(_, reproducer)| reproducer)
        .collect()
}

/// What a reproducer line must make a run report again: a violation line
/// with this prefix and this suffix.
struct Expected {
    /// `violation (K) WHAT at `.
    prefix: String,
    /// `: DETAIL`.
    suffix: String,
}

impl Expected {
    fn matches(&self, stdout: &str) -> bool {
        stdout.lines().map(str::trim_start).any(|line| {
            line.starts_with(&self.prefix)
                && line.ends_with(&self.suffix)
                && line.len() > self.prefix.len() + self.suffix.len()
        })
    }
}

/// Each reproducer line a run printed, with the violation it must report
/// again. A violation is printed as
/// `violation (K) WHAT at PATH: DETAIL`, then `  reproduce (N ops): LINE`,
/// and when shrinking worked `  shrunk to M ops: DETAIL2` and
/// `  reproduce shrunk: LINE2`. LINE must report the same violation line;
/// LINE2 a violation of the same kind with DETAIL2 (its crash path is
/// the shrunk workload's own).
fn violations_with_reproducers(stdout: &str) -> Vec<(Expected, String)> {
    let lines: Vec<&str> = stdout.lines().map(str::trim_start).collect();
    let mut pairs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(violation) = line.strip_prefix("violation ") else {
            continue;
        };
        let (head, detail) = violation
            .split_once(": ")
            .unwrap_or_else(|| panic!("violation line without detail: {line}"));
        let (kind, _path) = head
            .rsplit_once(" at ")
            .unwrap_or_else(|| panic!("violation line without a path: {line}"));
        let prefix = format!("violation {kind} at ");
        let command = |line: Option<&&str>, label: &str| {
            line.and_then(|l| l.strip_prefix(label)).map(|rest| {
                let at = rest
                    .find("qj crash --backend")
                    .unwrap_or_else(|| panic!("{label} without a command: {rest}"));
                rest[at..].to_string()
            })
        };
        let reproducer = command(lines.get(i + 1), "reproduce (")
            .unwrap_or_else(|| panic!("violation without a reproducer line: {stdout}"));
        pairs.push((
            Expected {
                prefix: prefix.clone(),
                suffix: format!(": {detail}"),
            },
            reproducer,
        ));
        if let Some(shrunk) = lines.get(i + 2).and_then(|l| l.strip_prefix("shrunk to ")) {
            let (_, detail) = shrunk
                .split_once(": ")
                .unwrap_or_else(|| panic!("shrunk line without detail: {shrunk}"));
            let reproducer = command(lines.get(i + 3), "reproduce shrunk: ")
                .unwrap_or_else(|| panic!("shrunk without a reproducer line: {stdout}"));
            pairs.push((
                Expected {
                    prefix,
                    suffix: format!(": {detail}"),
                },
                reproducer,
            ));
        }
    }
    pairs
}

/// Runs a reproducer line (its argv, minus the program name).
fn run_line(line: &str) -> Output {
    let words = shell_words(line);
    assert_eq!(words.first().map(String::as_str), Some("qj"), "{line}");
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    qj(&args)
}

/// `crash: N states explored, M violations` is the last line.
fn closing_counts(stdout: &str) -> (u64, u64) {
    let last = stdout.lines().last().unwrap_or_default();
    let rest = last
        .strip_prefix("crash: ")
        .unwrap_or_else(|| panic!("last line is not the closing line: {stdout}"));
    let numbers: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 2, "{last}");
    assert!(
        rest.contains(" states explored, ") && rest.ends_with(" violations"),
        "{last}"
    );
    (numbers[0], numbers[1])
}

#[test]
fn list_mutations_prints_every_mutation_one_a_line() {
    let stdout = expect_exit(&qj(&["crash", "--list-mutations"]), 0);
    let lines: Vec<&str> = stdout.lines().collect();
    let all = all_mutations();
    assert!(!all.is_empty());
    assert_eq!(lines.len(), all.len(), "{stdout}");
    for (backend, mutation) in all {
        let unique = all_mutations()
            .iter()
            .filter(|(_, m)| *m == mutation)
            .count()
            == 1;
        let want = if unique {
            mutation.to_string()
        } else {
            format!("{backend}/{mutation}")
        };
        assert!(lines.contains(&want.as_str()), "{want} missing: {stdout}");
    }
}

/// Every mutation is caught by a default `qj crash --mutate NAME` (no
/// budget flags: the default budget), exits 1, prints reproducer lines
/// (unshrunk and shrunk), and each reproducer line exits 1 again.
#[test]
fn every_mutation_is_caught_with_the_default_budget_and_reproduces() {
    let listed = expect_exit(&qj(&["crash", "--list-mutations"]), 0);
    // Every mutation is tried before failing, so that one run names all
    // that escape.
    let mut uncaught = Vec::new();
    for name in listed.lines() {
        // One exploration thread: the budget is what is explored, and a
        // second thread would only shrink a second violation.
        let out = qj(&["crash", "--mutate", name, "--jobs", "1"]);
        let stdout = text(&out.stdout);
        if out.status.code() != Some(1) {
            uncaught.push(format!(
                "{name} (exit {:?}): {}",
                out.status.code(),
                stdout.lines().last().unwrap_or_default()
            ));
            continue;
        }
        let (states, violations) = closing_counts(&stdout);
        assert!(states > 0 && violations >= 1, "{name}: {stdout}");
        let pairs = violations_with_reproducers(&stdout);
        assert!(!pairs.is_empty(), "{name}: no reproducer line: {stdout}");
        let mutation = name.rsplit('/').next().unwrap_or(name);
        for (expected, line) in &pairs {
            assert!(line.starts_with("qj crash --backend "), "{line}");
            assert!(line.contains(&format!(" --mutate {mutation} ")), "{line}");
            assert!(line.contains(" --crash-at "), "{line}");
            let again = run_line(line);
            let again_stdout = expect_exit(&again, 1);
            let (states, violations) = closing_counts(&again_stdout);
            // The line reproduces its own violation. It may find more: a
            // mutation that also breaks the path without a crash is
            // reported there too (no-revokes does).
            assert!(states >= 1 && violations >= 1, "{line}: {again_stdout}");
            assert!(
                expected.matches(&again_stdout),
                "{line} does not reproduce `{}...{}`: {again_stdout}",
                expected.prefix,
                expected.suffix
            );
        }
    }
    assert!(
        uncaught.is_empty(),
        "not caught with the default budget: {uncaught:#?}"
    );
}

#[test]
fn a_clean_run_exits_0_with_a_summary_row_per_engine_backend() {
    let out = qj(&[
        "crash",
        "--workload",
        "mixed",
        "--states",
        "100",
        "--workloads",
        "1",
    ]);
    let stdout = expect_exit(&out, 0);
    let (states, violations) = closing_counts(&stdout);
    assert_eq!(violations, 0, "{stdout}");
    assert!(states >= 100 * ENGINE_BACKENDS.len() as u64, "{stdout}");
    assert!(
        stdout.lines().next().unwrap().starts_with("target "),
        "{stdout}"
    );
    for backend in ENGINE_BACKENDS {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{backend} "))),
            "{backend} row missing: {stdout}"
        );
    }
    assert!(!stdout.contains("violation "), "{stdout}");
}

#[test]
fn json_output_carries_the_summary_per_target() {
    let out = qj(&[
        "crash",
        "--backend",
        "raw",
        "--workload",
        "all",
        "--states",
        "60",
        "--workloads",
        "2",
        "--output",
        "json",
    ]);
    let stdout = expect_exit(&out, 0);
    let json: Value = serde_json::from_str(&stdout).expect("one JSON document");
    let targets = json["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 1, "{stdout}");
    let raw = &targets[0];
    assert_eq!(raw["target"], "raw");
    // Every preset, with and without a backing file, for two seeds.
    assert_eq!(
        raw["workloads"].as_u64(),
        Some(WORKLOAD_NAMES.len() as u64 * 2 * 2)
    );
    let states = raw["states_explored"].as_u64().unwrap();
    assert!(states >= 60 * 20, "{stdout}");
    assert_eq!(json["states_explored"].as_u64(), Some(states));
    assert_eq!(json["violations"].as_u64(), Some(0));
    assert!(json["findings"].as_array().unwrap().is_empty());
    for key in [
        "crash_points",
        "states_with_leaks",
        "leaked_clusters_max",
        "states_per_s",
    ] {
        assert!(raw.get(key).is_some(), "{key} missing: {stdout}");
    }
}

#[test]
fn a_violation_in_json_names_its_reproducer() {
    let out = qj(&[
        "crash",
        "--mutate",
        "skip-flush",
        "--no-shrink",
        "--output",
        "json",
    ]);
    let stdout = expect_exit(&out, 1);
    let json: Value = serde_json::from_str(&stdout).expect("one JSON document");
    let finding = &json["findings"][0];
    let line = finding["reproduce"].as_str().expect("reproducer");
    assert!(
        line.starts_with("qj crash --backend raw --mutate skip-flush "),
        "{line}"
    );
    assert!(finding["shrunk"].is_null(), "--no-shrink: {stdout}");
    assert!(json["violations"].as_u64().unwrap() >= 1);

    // A reproducer line reruns as is; with --shrink it is shrunk as well.
    let plain = expect_exit(&run_line(line), 1);
    assert!(!plain.contains("reproduce shrunk: "), "{plain}");
    let shrunk = expect_exit(&run_line(&format!("{line} --shrink")), 1);
    let lines = reproducer_lines(&shrunk);
    assert_eq!(lines.len(), 2, "{shrunk}");
    assert!(lines[1].contains(" --ops '"), "{shrunk}");
    expect_exit(&run_line(&lines[1]), 1);

    // Settings that change which states exist travel with the line.
    let out = qj(&[
        "crash",
        "--mutate",
        "skip-flush",
        "--no-shrink",
        "--cluster-size",
        "8k",
        "--qemu-every",
        "0",
    ]);
    let stdout = expect_exit(&out, 1);
    let line = reproducer_lines(&stdout).remove(0);
    assert!(
        line.ends_with(" --cluster-size 8192 --qemu-every 0"),
        "{line}"
    );
    expect_exit(&run_line(&line), 1);
}

#[test]
fn bad_names_numbers_and_crash_points_are_usage_errors_listing_what_is_valid() {
    let mut backends: Vec<&str> = BACKENDS.to_vec();
    backends.push("all");
    expect_usage_error(&["crash", "--backend", "qcow3"], &backends);
    let mutation_names: Vec<&str> = all_mutations().iter().map(|(_, m)| *m).collect();
    expect_usage_error(&["crash", "--mutate", "no-such-bug"], &mutation_names);
    // A mutation of another backend: the backend's own list.
    let (backend, _) = all_mutations()[0];
    let foreign = all_mutations()
        .into_iter()
        .find(|(b, _)| *b != backend)
        .map(|(_, m)| m)
        .expect("mutations on two backends");
    let own: Vec<&str> = qj_model_checks::mutations(backend).to_vec();
    expect_usage_error(&["crash", "--backend", backend, "--mutate", foreign], &own);
    let mut workloads: Vec<&str> = WORKLOAD_NAMES.to_vec();
    workloads.push("all");
    expect_usage_error(&["crash", "--workload", "busy"], &workloads);
    expect_usage_error(
        &["crash", "--seed", "12abc"],
        &["seed", "12abc", "whole number"],
    );
    expect_usage_error(&["crash", "--seed=-1"], &["seed", "whole number"]);
    let line = expect_usage_error(
        &[
            "crash",
            "--backend",
            "raw",
            "--workload",
            "mixed",
            "--crash-at",
            "100000",
            "--state",
            "0",
        ],
        &["100000", "valid crash points are"],
    );
    assert!(line.contains("beyond the trace"), "{line}");
    expect_usage_error(
        &[
            "crash",
            "--backend",
            "raw",
            "--workload",
            "mixed",
            "--crash-at",
            "3",
            "--state",
            "99999999",
        ],
        &["99999999", "valid states are 0.."],
    );
    // A crash path belongs to one backend and one workload preset.
    expect_usage_error(
        &["crash", "--backend", "raw", "--crash-at", "3"],
        &["--workload"],
    );
    expect_usage_error(
        &["crash", "--backend", "raw", "--crash-at", "x7"],
        &["x7", "valid"],
    );
    expect_usage_error(
        &["crash", "--backend", "raw", "--ops", "w1+1,q"],
        &["operation list", "valid"],
    );
    expect_usage_error(&["crash", "--threads", "0"], &["--threads"]);
    expect_usage_error(&["crash", "--cluster-size", "12Q"], &["12Q"]);
    expect_usage_error(&["crash", "--cluster-size", "3000"], &["cluster_bytes"]);
}

/// Asserts that every row has every key of a `qj bench --output json` row
/// (null where not measured).
fn assert_row_keys(rows: &[Value]) {
    for key in [
        "via",
        "workload",
        "target",
        "threads",
        "ops",
        "ops_per_s",
        "mb_per_s",
        "p50_us",
        "p99_us",
        "flushes_per_op",
        "bytes_written_per_op",
        "vs_journal",
        "guest_bytes_written",
        "file_bytes_start",
        "file_bytes_end",
        "file_growth_per_guest_byte",
        "dedup_hits_per_op",
        "hash_per_cluster_us",
        "compare_per_match_us",
        "vs_raw",
        "vs_qemu",
        "vs_ordered",
        "note",
    ] {
        for row in rows {
            assert!(row.get(key).is_some(), "{key} missing: {row}");
        }
    }
}

fn bench_json(args: &[&str]) -> Vec<Value> {
    let stdout = expect_exit(&qj(args), 0);
    let json: Value = serde_json::from_str(&stdout).expect("a JSON array");
    json.as_array().expect("a JSON array").clone()
}

#[test]
fn bench_json_rows_carry_the_required_keys() {
    let rows = bench_json(&[
        "bench",
        "--workload",
        "alloc-sync-4k",
        "--target",
        "ordered,raw",
        "--ops",
        "20",
        "--rounds",
        "1",
        "--output",
        "json",
    ]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_row_keys(&rows);
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["ordered", "raw"]);
    for row in &rows {
        assert_eq!(row["via"], "in-process");
        assert_eq!(row["workload"], "alloc-sync-4k");
        assert_eq!(row["threads"], 1);
        assert_eq!(row["ops"], 20, "{row}");
        assert!(row["ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
        // Every synced write flushes at least once.
        assert!(row["flushes_per_op"].as_f64().unwrap() >= 1.0, "{row}");
        assert!(
            row["bytes_written_per_op"].as_f64().unwrap() >= 4096.0,
            "{row}"
        );
        assert_eq!(row["guest_bytes_written"], 20 * 4096, "{row}");
        // Neither deduplicates.
        assert!(row["dedup_hits_per_op"].is_null(), "{row}");
        assert!(row["hash_per_cluster_us"].is_null(), "{row}");
    }
    // Each 4 KiB write allocates a whole 64 KiB cluster of the image; a raw
    // file's length is its disk size, so it has no growth to report.
    let growth = rows[0]["file_growth_per_guest_byte"].as_f64().unwrap();
    assert!(growth >= 16.0, "{}", rows[0]);
    assert!(rows[1]["file_bytes_end"].is_null(), "{}", rows[1]);
}

/// `qj bench --via nbd`: fio over NBD against `qj serve` and `qemu-nbd`, from
/// the copy of `benches/nbd-bench.sh` the binary carries, run from another
/// directory than the checkout. Its rows have the in-process rows' keys.
#[test]
fn bench_via_nbd_drives_qj_serve_and_qemu_nbd_with_fio() {
    let rows = nbd_bench_rows(
        "randwrite-sync",
        &["qj-journal", "qemu-default"],
        "writeback",
    );
    for (row, parsed) in &rows {
        assert_eq!(parsed.via, "nbd", "{row}");
        assert_eq!(parsed.workload, "randwrite-sync");
        assert_eq!(row["cache"], "writeback", "{row}");
        assert_eq!(row["repeats"], 1, "{row}");
        assert!(parsed.ops > 0, "{row}");
        assert!(parsed.ops_per_s.unwrap() > 0.0, "{row}");
        assert!(parsed.p50_us.unwrap() > 0.0, "{row}");
        assert!(row["flush_p50_us"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(parsed.guest_bytes_written, Some(parsed.ops * 4096), "{row}");
        // Every 4 KiB write was flushed; counted when perf can count.
        if let Some(flushes) = parsed.flushes_per_op {
            assert!(flushes >= 1.0, "{row}");
        }
        let (start, end) = (
            parsed.file_bytes_start.unwrap(),
            parsed.file_bytes_end.unwrap(),
        );
        assert!(end > start, "fresh clusters grew the image: {row}");
        assert!(parsed.note.is_none(), "{row}");
    }
    assert_eq!(rows[1].0["vs_qemu"], 1.0);
    assert_eq!(rows[0].0["vs_journal"], 1.0);
}

/// Runs one `qj bench --via nbd` job (1 round of 1 s) on `targets` in
/// `cache` mode; checks that the rows come in target order with every key
/// of an in-process row, and parses each (one reader takes both kinds).
fn nbd_bench_rows(
    workload: &str,
    targets: &[&str],
    cache: &str,
) -> Vec<(Value, qj_benches::BenchRow)> {
    let target_list = targets.join(",");
    // On the project's disk: /tmp may be tmpfs, which has no O_DIRECT
    // (cache mode none).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let rows = bench_json(&[
        "bench",
        "--via",
        "nbd",
        "--workload",
        workload,
        "--target",
        &target_list,
        "--cache",
        cache,
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--dir",
        dir_arg,
        "--output",
        "json",
    ]);
    let got: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(got, targets);
    assert_row_keys(&rows);
    rows.into_iter()
        .map(|row| {
            let parsed = serde_json::from_value(row.clone()).expect("the shape of a qj bench row");
            (row, parsed)
        })
        .collect()
}

/// `local-raw` runs the same fio job on the raw file with no NBD (the
/// transport's own cost), and `overwrite-sync-8jobs` works on clusters
/// written first, so the qcow2 image does not grow.
#[test]
fn bench_via_nbd_local_raw_and_overwrite_8jobs_on_filled_clusters() {
    let rows = nbd_bench_rows("overwrite-sync-8jobs", &["qj-journal", "local-raw"], "none");
    for (row, parsed) in &rows {
        assert_eq!(parsed.workload, "overwrite-sync-8jobs");
        assert_eq!(parsed.threads, 8, "{row}");
        assert_eq!(row["cache"], "none", "{row}");
        assert!(parsed.ops > 0, "{row}");
        assert_eq!(parsed.guest_bytes_written, Some(parsed.ops * 4096), "{row}");
        assert!(row["vs_local"].as_f64().unwrap() > 0.0, "{row}");
        assert!(parsed.note.is_none(), "{row}");
    }
    let (journal, local) = (&rows[0].0, &rows[1].0);
    assert_eq!(journal["via"], "nbd");
    // Every write lands on a cluster the fill allocated.
    assert_eq!(
        journal["file_bytes_end"], journal["file_bytes_start"],
        "an overwrite grew the image: {journal}"
    );
    assert_eq!(local["via"], "local");
    assert_eq!(local["vs_local"], 1.0);
    // A raw file's length is its disk size: not reported, as for raw-*.
    assert!(local["file_bytes_start"].is_null(), "{local}");
    // fio on the file syncs after each write itself (counted when perf can).
    if let Some(flushes) = local["flushes_per_op"].as_f64() {
        assert!(flushes >= 1.0, "{local}");
    }
}

/// The runner's summary pairs each repeat with the base's run of the same
/// job, cache and repeat (`-R` summarizes runs without running anything):
/// on rates that drift between repeats, the paired ratios differ from the
/// ratio of the medians, a repeat without a base run is left out of the
/// pairs, and each row lists its rates by repeat.
#[test]
fn nbd_bench_summary_pairs_ratios_by_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    // (job, cache, target, repeat, ops/s); each base written in another
    // repeat order than the target it is the base of.
    let runs = [
        ("randwrite-sync-8jobs", "none", "qj-journal", 2, 9600.0),
        ("randwrite-sync-8jobs", "none", "qj-journal", 1, 3600.0),
        ("randwrite-sync-8jobs", "none", "qj-journal", 3, 2400.0),
        // No raw run of repeat 4: paired with local-raw only.
        ("randwrite-sync-8jobs", "none", "qj-journal", 4, 4400.0),
        ("randwrite-sync-8jobs", "none", "raw-prealloc", 3, 2000.0),
        ("randwrite-sync-8jobs", "none", "raw-prealloc", 1, 4000.0),
        ("randwrite-sync-8jobs", "none", "raw-prealloc", 2, 8000.0),
        ("randwrite-sync-8jobs", "none", "local-raw", 4, 10000.0),
        ("randwrite-sync-8jobs", "none", "local-raw", 3, 6000.0),
        ("randwrite-sync-8jobs", "none", "local-raw", 2, 12000.0),
        ("randwrite-sync-8jobs", "none", "local-raw", 1, 10000.0),
        // The other cache: a pairing that ignores the cache mixes these in.
        ("randwrite-sync-8jobs", "writeback", "qj-journal", 1, 2000.0),
        ("randwrite-sync-8jobs", "writeback", "qj-journal", 2, 2000.0),
        ("randwrite-sync-8jobs", "writeback", "qj-journal", 3, 2000.0),
        (
            "randwrite-sync-8jobs",
            "writeback",
            "raw-prealloc",
            1,
            1000.0,
        ),
        (
            "randwrite-sync-8jobs",
            "writeback",
            "raw-prealloc",
            2,
            1000.0,
        ),
        (
            "randwrite-sync-8jobs",
            "writeback",
            "raw-prealloc",
            3,
            1000.0,
        ),
        ("overwrite-sync-seq", "none", "qj-journal", 1, 5000.0),
        ("overwrite-sync-seq", "none", "qj-journal", 2, 6000.0),
        ("overwrite-sync-seq", "none", "qj-journal", 3, 7200.0),
        ("overwrite-sync-seq", "none", "inproc-journal", 3, 8000.0),
        ("overwrite-sync-seq", "none", "inproc-journal", 1, 10000.0),
        ("overwrite-sync-seq", "none", "inproc-journal", 2, 6000.0),
    ];
    let lines: Vec<String> = runs
        .iter()
        .map(|(job, cache, target, repeat, rate)| {
            serde_json::json!({
                "job": job, "target": target, "cache": cache, "repeat": repeat,
                "ops": 1000, "ops_per_s": rate, "mb_per_s": rate * 4096.0 / 1e6,
                "error": 0,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&results, lines.join("\n") + "\n").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/nbd-bench.sh");
    // Runs the summary from `dir` (relative paths are the caller's).
    let summarize = |args: &[&str]| {
        Command::new("bash")
            .arg(script)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let rows_of = |path: &str| -> Vec<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(path)).unwrap()).unwrap()
    };
    let stdout = expect_exit(
        &summarize(&[
            "-T",
            "qj-journal,raw-prealloc,local-raw,inproc-journal",
            "-J",
            "randwrite-sync-8jobs,overwrite-sync-seq",
            "-c",
            "none,writeback",
            "-R",
            "results.jsonl",
            "-o",
            "rows.json",
        ]),
        0,
    );
    let rows = rows_of("rows.json");
    assert_row_keys(&rows);
    let row = |job: &str, cache: &str, target: &str| {
        rows.iter()
            .find(|r| r["workload"] == job && r["cache"] == cache && r["target"] == target)
            .unwrap_or_else(|| panic!("no row for {job} {cache} on {target}: {rows:?}"))
            .clone()
    };
    let journal = row("randwrite-sync-8jobs", "none", "qj-journal");
    assert_eq!(
        journal["ops_per_s_by_repeat"],
        serde_json::json!({"1": 3600.0, "2": 9600.0, "3": 2400.0, "4": 4400.0})
    );
    // Medians 4000 and 4000; repeats 1-3 against raw: 0.9, 1.2, 1.2.
    assert_eq!(journal["vs_raw"], 1.0, "{journal}");
    assert_eq!(journal["vs_raw_paired"], 1.2, "{journal}");
    assert_eq!(journal["vs_raw_paired_min"], 0.9, "{journal}");
    assert_eq!(journal["vs_raw_paired_max"], 1.2, "{journal}");
    assert_eq!(journal["vs_raw_paired_n"], 3, "{journal}");
    assert_eq!(journal["repeats"], 4, "{journal}");
    // Against local-raw, all four: 0.36, 0.8, 0.4, 0.44.
    assert_eq!(journal["vs_local_paired"], 0.42, "{journal}");
    assert_eq!(journal["vs_local_paired_min"], 0.36, "{journal}");
    assert_eq!(journal["vs_local_paired_max"], 0.8, "{journal}");
    assert_eq!(journal["vs_local_paired_n"], 4, "{journal}");
    let writeback = row("randwrite-sync-8jobs", "writeback", "qj-journal");
    assert_eq!(writeback["vs_raw_paired"], 2.0, "{writeback}");
    assert_eq!(writeback["vs_raw_paired_max"], 2.0, "{writeback}");
    // Medians 6000 and 8000; each repeat: 0.5, 1.0, 0.9.
    let served = row("overwrite-sync-seq", "none", "qj-journal");
    assert_eq!(served["vs_inproc"], 0.75, "{served}");
    assert_eq!(served["vs_inproc_paired"], 0.9, "{served}");
    assert_eq!(served["vs_inproc_paired_min"], 0.5, "{served}");
    assert_eq!(served["vs_inproc_paired_max"], 1.0, "{served}");
    for line in [
        "qj-journal randwrite-sync-8jobs cache=none: median 1.20 (0.90..1.20) over 3 repeats",
        "paired by repeat 0.90 (0.50..1.00)",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    // Without lists, the file's own: the same rows.
    expect_exit(&summarize(&["-R", "results.jsonl", "-o", "all.json"]), 0);
    let all = rows_of("all.json");
    assert_eq!(all.len(), rows.len(), "{all:?}");
    for r in &all {
        let workload = r["workload"].as_str().unwrap();
        let cache = r["cache"].as_str().unwrap();
        assert_eq!(*r, row(workload, cache, r["target"].as_str().unwrap()));
    }
    // Bad input: a message naming the file and line, no rows.
    let refused = |args: &[&str], code: i32, message: &str| {
        let out = summarize(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    };
    let first = &lines[0];
    for (name, content, message) in [
        (
            "without.jsonl",
            "{\"job\": \"randwrite-sync\"}\n".to_string(),
            "without.jsonl line 1: a run without target",
        ),
        (
            "twice.jsonl",
            format!("{first}\n{first}\n"),
            "twice.jsonl line 2: a second run of randwrite-sync-8jobs on qj-journal",
        ),
        (
            "null.jsonl",
            first.replace("\"ops_per_s\":9600.0", "\"ops_per_s\":null") + "\n",
            "null.jsonl line 1: ops_per_s: not a number",
        ),
    ] {
        std::fs::write(dir.path().join(name), content).unwrap();
        refused(&["-R", name, "-o", "bad.json"], 1, message);
    }
    assert!(!dir.path().join("bad.json").exists());
    refused(&["-R", "missing.jsonl"], 2, "not a readable file");
    refused(&["-R", "missing.jsonl", "-k"], 2, "not a readable file");
    refused(&["-R", "results.jsonl", "-r", "2"], 2, "-r does not apply");
    refused(&["-R", "results.jsonl", "-T", "qj-ordered"], 1, "no run in");
}

/// `(end - start) / guest` of a row, checked against its keys.
fn file_growth(row: &Value) -> f64 {
    let start = row["file_bytes_start"].as_u64().unwrap();
    let end = row["file_bytes_end"].as_u64().unwrap();
    let guest = row["guest_bytes_written"].as_u64().unwrap();
    let growth = end.saturating_sub(start) as f64 / guest as f64;
    let reported = row["file_growth_per_guest_byte"].as_f64().unwrap();
    assert!((growth - reported).abs() < 1e-9, "{row}");
    growth
}

#[test]
fn bench_dedup_workloads_store_each_content_once_on_journal_dedup() {
    let rows = bench_json(&[
        "bench",
        "--workload",
        "dedup-0,dedup-50,dedup-90,dedup-90-sync",
        "--target",
        "journal-dedup,journal-dedup-trust,journal,ordered",
        "--ops",
        "40",
        "--batch-ops",
        "100",
        "--rounds",
        "1",
        "--output",
        "json",
    ]);
    assert_eq!(rows.len(), 16, "{rows:?}");
    for row in &rows {
        let workload = row["workload"].as_str().unwrap();
        let target = row["target"].as_str().unwrap();
        let ops: u64 = if workload.ends_with("-sync") { 40 } else { 100 };
        assert_eq!(row["ops"], ops, "{row}");
        assert!(row["note"].is_null(), "{row}");
        assert_eq!(row["guest_bytes_written"], ops * 65536, "{row}");
        let percent: u64 = workload
            .trim_start_matches("dedup-")
            .trim_end_matches("-sync")
            .parse()
            .unwrap();
        let growth = file_growth(row);
        let bytes_per_op = row["bytes_written_per_op"].as_f64().unwrap();
        if target.starts_with("journal-dedup") {
            // Every repeat is found: exactly the workload's share of writes
            // maps an existing cluster and stores nothing.
            let hits = row["dedup_hits_per_op"].as_f64().unwrap();
            assert!((hits - percent as f64 / 100.0).abs() < 1e-9, "{row}");
            assert!(row["hash_per_cluster_us"].as_f64().unwrap() > 0.0, "{row}");
            let compared = &row["compare_per_match_us"];
            match (target, percent) {
                ("journal-dedup-trust", _) | (_, 0) => assert!(compared.is_null(), "{row}"),
                _ => assert!(compared.as_f64().unwrap() > 0.0, "{row}"),
            }
            // The file grows by the new contents (plus metadata), and the
            // device sees about as little.
            let stored = (100 - percent) as f64 / 100.0;
            assert!(growth >= stored, "{row}");
            assert!(growth < stored + 0.15, "{row}");
            assert!(bytes_per_op < 65536.0 * (stored + 0.15), "{row}");
            assert!(row["vs_journal"].as_f64().unwrap() > 0.0, "{row}");
        } else {
            assert!(row["dedup_hits_per_op"].is_null(), "{row}");
            // Every write is stored.
            assert!(growth >= 1.0, "{row}");
            assert!(bytes_per_op >= 65536.0, "{row}");
        }
    }
    // 90% repeats: the deduplicated file grows by well under a fifth of
    // what the guest wrote.
    for row in rows.iter().filter(|r| r["workload"] == "dedup-90") {
        if row["target"] == "journal-dedup" {
            assert!(file_growth(row) < 0.2, "{row}");
        }
    }
}

#[test]
fn bench_a_dedup_workload_adds_the_dedup_targets_to_the_defaults() {
    let rows = bench_json(&[
        "bench",
        "--workload",
        "dedup-50",
        "--batch-ops",
        "64",
        "--rounds",
        "1",
        "--output",
        "json",
    ]);
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(
        targets,
        [
            "journal",
            "journal-draft",
            "journal-logged",
            "ordered",
            "qemu",
            "qemu-lazy",
            "qemu-prealloc",
            "raw",
            "journal-dedup",
            "journal-dedup-trust",
        ],
        "{rows:?}"
    );
    for row in &rows {
        // QEMU's tools are part of the test environment: every row ran.
        // (Its rate may be missing: `qemu-img bench` prints whole
        // milliseconds, and 64 writes into the page cache can take less.)
        assert_eq!(row["ops"], 64, "{row}");
    }
}

#[test]
fn bench_repeated_flags_thread_counts_and_an_own_directory() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let rows = bench_json(&[
        "bench",
        "--workload",
        "threads-sync",
        "--target",
        "raw",
        "--target",
        "raw",
        "--threads",
        "1,2",
        "--ops",
        "8",
        "--rounds",
        "1",
        "--dir",
        images.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let threads: Vec<u64> = rows
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 2], "{rows:?}");
    // The directory is the user's: it stays, the images do not.
    assert!(images.is_dir());
    assert_eq!(std::fs::read_dir(&images).unwrap().count(), 0);
    // The table form has a header and a row per cell.
    let stdout = expect_exit(
        &qj(&[
            "bench",
            "--workload",
            "read",
            "--target",
            "raw",
            "--batch-ops",
            "16",
            "--rounds",
            "1",
        ]),
        0,
    );
    assert!(stdout.starts_with("workload "), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("read ")), "{stdout}");
    assert!(Path::new(&images).exists());
}

#[test]
fn bench_bad_names_zero_threads_and_bad_sizes_are_usage_errors() {
    expect_usage_error(
        &["bench", "--workload", "alloc,read"],
        &["alloc-sync-4k", "threads-sync", "dedup-0-sync", "dedup-90"],
    );
    expect_usage_error(
        &["bench", "--target", "qcow2"],
        &[
            "journal",
            "journal-draft",
            "journal-logged",
            "ordered",
            "qemu",
            "raw",
            "journal-dedup",
            "journal-dedup-trust",
        ],
    );
    expect_usage_error(&["bench", "--threads", "1,0"], &["--threads"]);
    expect_usage_error(&["bench", "--seconds", "2"], &["--seconds", "--via nbd"]);
    expect_usage_error(&["bench", "--cache", "none,writeback"], &["one --cache"]);
    // With --via nbd: the runner's own names, and no in-process options.
    let nbd_cases: [(&[&str], &[&str]); 9] = [
        (
            &["--target", "qcow2"],
            &[
                "unknown target qcow2",
                "qj-journal",
                "raw-prealloc",
                "inproc-journal",
            ],
        ),
        (
            &["--workload", "alloc-sync-4k"],
            &[
                "unknown job alloc-sync-4k",
                "randwrite-sync-8jobs",
                "overwrite-sync-seq",
            ],
        ),
        (&["--target", ""], &["empty name in --target"]),
        (&["--ops", "100000"], &["--ops 100000"]),
        (&["--dir", "/tmp/a b"], &["--dir", "URI"]),
        (&["--threads", "4"], &["--threads"]),
        (&["--cluster-size", "4k"], &["--cluster-size"]),
        (&["--cache", "directsync"], &["writeback and none"]),
        (&["--rounds", "100"], &["--rounds 100"]),
    ];
    for (args, expected) in nbd_cases {
        let mut all = vec!["bench", "--via", "nbd"];
        all.extend_from_slice(args);
        expect_usage_error(&all, expected);
    }
    expect_usage_error(&["bench", "--cluster-size", "12Q"], &["12Q"]);
    expect_usage_error(&["bench", "--cluster-size", "48k"], &["power of two"]);
    expect_usage_error(&["bench", "--ops", "many"], &["--ops"]);
}
