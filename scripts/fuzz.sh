#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (cargo fuzz; the fuzz/ crate).
#
#   scripts/fuzz.sh ci            every target for a short fixed time (50 s
#                                 of fuzzing in all), fails on any finding
#   scripts/fuzz.sh long SECONDS  a campaign of SECONDS in all: the whole-image
#                                 target gets 40% (it is ~20x slower per input),
#                                 the other targets share the rest
#   scripts/fuzz.sh run TARGET SECONDS   one target
#
# Prints, per target, the executions and libFuzzer's final coverage (cov:
# edges reached, ft: features). One core: -workers=1 -jobs=1, because the
# machine is shared. Past findings, once fixed, go to fuzz/regressions/TARGET/
# and run at the start of every run. Inputs that crash land in fuzz/artifacts/TARGET/; the
# corpus grown by a run stays in fuzz/target/corpus/TARGET/ (the seeds in
# fuzz/corpus/ are only read). Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`); the instrumentation flags are
# unstable, which RUSTC_BOOTSTRAP=1 allows on the stable compiler.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is required: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

TARGETS=(qcow2_header qcow2_tables qcow2_snapshots_bitmaps journal_header journal_block
    journal_descriptors journal_transaction log_writes nbd_server image)
# Seconds of the CI run per target: 10 targets x 5 s = 50 s, under a minute.
CI_SECONDS_PER_TARGET=5

max_len() {
    case "$1" in
        # Journal images are 64 KiB of journal plus the qcow2 metadata.
        image) echo 81920 ;;
        journal_transaction) echo 16385 ;;
        # The seed logs (qj's and QEMU's) are 22 and 41 KiB.
        log_writes) echo 65536 ;;
        # A handshake and 64 requests of 12 bytes.
        nbd_server) echo 4096 ;;
        *) echo 8192 ;;
    esac
}

build() {
    # -O: optimized; -a: debug assertions and overflow checks on, so that
    # the invariants the code asserts are checked too.
    cargo fuzz build -O -a >/dev/null
}

binary() {
    local host
    host=$(rustc -vV | sed -n 's/^host: //p')
    echo "target/$host/release/$1"
}

# run TARGET SECONDS: fuzz one target; prints one summary line and returns
# nonzero on a finding.
run() {
    local target=$1 seconds=$2
    local work="target/corpus/$target" artifacts="artifacts/$target"
    local log="target/logs/$target"
    mkdir -p "$work" "$artifacts" "$log"
    rm -f "$log"/fuzz-*.log
    local status=0
    # Past findings (fuzz/regressions/TARGET/, kept out of the regenerated
    # seeds) run first as part of the corpus, so every run retries them.
    local regressions=()
    if [ -d "regressions/$target" ]; then
        regressions=("../../../regressions/$target")
    fi
    # -jobs=1 runs the fuzzer in one child process whose output goes to
    # fuzz-0.log in the current directory.
    (cd "$log" && "../../../$(binary "$target")" "../../../$work" "../../../corpus/$target" \
        "${regressions[@]}" \
        -workers=1 -jobs=1 -max_total_time="$seconds" -max_len="$(max_len "$target")" \
        -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="../../../$artifacts/" >/dev/null 2>&1) || status=$?
    local out="$log/fuzz-0.log"
    local done_line execs cov ft
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$out" | tail -1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    cov=$(echo "$done_line" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$done_line" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    local findings
    findings=$(find "$artifacts" -type f -newer "$log" 2>/dev/null | wc -l)
    printf '%-26s %6ss %12s execs  cov %6s  ft %7s  findings %s\n' \
        "$target" "$seconds" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$findings"
    if [ "$status" -ne 0 ] || [ -z "$done_line" ] || [ "$findings" -ne 0 ]; then
        echo "fuzz: $target failed (status $status); the end of its log, $out:" >&2
        grep -A3 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$out" | grep -v '^ *#[0-9]' | head -20 >&2
        grep -E 'Test unit written to' "$out" >&2 || true
        return 1
    fi
}

# The log directory's mtime marks the start of a run, for counting new
# artifacts: touch it before each run.
run_all() {
    local failed=0 target seconds
    for target in "${TARGETS[@]}"; do
        seconds=$("$1" "$target")
        mkdir -p "target/logs/$target" && touch "target/logs/$target"
        run "$target" "$seconds" || failed=1
    done
    return $failed
}

ci_seconds() { echo "$CI_SECONDS_PER_TARGET"; }

LONG_SECONDS=0
long_seconds() {
    if [ "$1" = image ]; then
        echo $((LONG_SECONDS * 40 / 100))
    else
        echo $((LONG_SECONDS * 60 / 100 / (${#TARGETS[@]} - 1)))
    fi
}

case "${1:-}" in
    ci)
        build
        run_all ci_seconds
        ;;
    long)
        LONG_SECONDS=${2:?usage: scripts/fuzz.sh long SECONDS}
        build
        run_all long_seconds
        ;;
    run)
        build
        mkdir -p "target/logs/${2:?usage: scripts/fuzz.sh run TARGET SECONDS}" && touch "target/logs/$2"
        run "$2" "${3:?usage: scripts/fuzz.sh run TARGET SECONDS}"
        ;;
    *)
        sed -n '2,17p' "$0" >&2
        exit 2
        ;;
esac
