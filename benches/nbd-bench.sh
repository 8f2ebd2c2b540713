#!/usr/bin/env bash
# The like-for-like benchmark: the same fio jobs, over the same protocol
# (NBD on a Unix socket), against `qj serve` (each backend) and `qemu-nbd`
# (default qcow2, lazy_refcounts=on, preallocation=metadata, raw sparse,
# raw preallocated). Every (job, target) cell gets a fresh image; cells
# are interleaved (repeat, then job, then target) so that machine noise
# spreads over all targets; each cell reports the median and the spread
# (min..max) of its repeats. Every cell runs in each cache mode (QEMU's
# names: `writeback`, the page cache; `none`, O_DIRECT, what production
# guests use): `qj serve --cache MODE` and `qemu-nbd --cache=MODE`.
#
# The server's fdatasync and fsync calls (fio's own, for local-raw) are
# counted with `perf stat` (tracepoints, no slowdown worth naming) when
# perf can count them: the `flushes_per_op` of each row (null without
# perf).
#
# The serve overhead: job `overwrite-sync-seq` is the in-process
# `qj bench --workload overwrite-sync` pattern (a 4 KiB write at the start
# of each of OPS clusters, filled first, each write flushed) driven by fio,
# and the `inproc-NAME` targets run that workload in process with
# `qj bench --target NAME` (same image size, backend and cache mode), so
# `-J overwrite-sync-seq -T qj-journal,inproc-journal` puts both in one
# interleaved table and prints the ratio (`vs_inproc`).
#
# The transport's own cost: target `local-raw` runs each fio job on the
# preallocated raw file itself (fio's psync engine, `--direct=1` in cache
# mode none, each write followed by fdatasync as qemu-nbd's flush does),
# with no NBD at all, so `vs_local` of the raw-prealloc row is how much of
# the device's rate qemu-nbd keeps: the serve overhead of QEMU's server,
# beside qj serve's `vs_inproc`.
#
# Group commit without allocation: `overwrite-sync-8jobs` is
# `randwrite-sync-8jobs` on clusters written first, so no write allocates
# (in the qcow2 image or in the file system) and the raw preallocated file
# is the like-for-like limit.
#
# Usage: benches/nbd-bench.sh [-r REPEATS] [-s SECONDS] [-o ROWS.json]
#                             [-T target,target] [-J job,job] [-c mode,mode]
#                             [-n OPS] [-d DIR] [-R RESULTS.jsonl]
#   targets: qj-ordered qj-journal qj-journal-logged qemu-default qemu-lazy
#            qemu-prealloc raw-sparse raw-prealloc local-raw, and
#            (overwrite-sync-seq only) inproc-ordered inproc-journal
#            inproc-journal-logged
#   jobs:    randwrite-sync randwrite-sync-8jobs seqwrite-64k-sync
#            randread overwrite-sync overwrite-sync-8jobs overwrite-sync-seq
#   -n:      operations of overwrite-sync-seq (default 3000)
#   -k:      check the arguments only (exit 2 with a message if bad)
#   -d:      the working directory (kept, with results.jsonl: a line a run)
#   -R:      run nothing: summarize the results.jsonl an earlier run left
#            in its -d DIR (-T, -J and -c: all of the file's by default)
#   Relative paths (-o, -d, -R) are the caller's.
# The defaults produce the whole table of RFC.md section 6.2. The -o rows
# have the keys of `qj bench --output json` rows (p50_us and p99_us are
# fio's per-request latency; bytes_written_per_op only in process)
# and this runner's own: via, cache, repeats, the spread, each repeat's
# rate (ops_per_s_by_repeat: repeat -> ops/s), flush latency, and
# vs_raw, vs_local and vs_inproc paired by repeat (`*_paired`,
# `*_paired_min`, `*_paired_max`, `*_paired_n`: the median, spread and
# count of each repeat's ratio to the base's run of that repeat).
# `qj bench --via nbd` runs this script (the binary carries a copy).
# Environment: QJ (the qj binary; default target/release/qj, built when
# missing).
# Needs: fio (with the nbd engine), qemu-img, qemu-nbd, python3.
set -euo pipefail
# Paths the caller gives are the caller's (the runner works from the checkout).
CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."

REPEATS=3
SECONDS_PER_RUN=3
ROWS_OUT=""
DIR=""
TARGETS="qj-ordered,qj-journal,qj-journal-logged,qemu-default,qemu-lazy,qemu-prealloc,raw-sparse,raw-prealloc,local-raw,inproc-journal,inproc-journal-logged"
JOBS="randwrite-sync,randwrite-sync-8jobs,seqwrite-64k-sync,randread,overwrite-sync,overwrite-sync-8jobs,overwrite-sync-seq"
# Every name -T and -J take (the default jobs are all of them).
KNOWN_TARGETS="qj-ordered,qj-journal,qj-journal-logged,qemu-default,qemu-lazy,qemu-prealloc,raw-sparse,raw-prealloc,local-raw,inproc-ordered,inproc-journal,inproc-journal-logged"
KNOWN_JOBS="$JOBS"
CACHES="writeback,none"
IMAGE_SIZE=1G
# Region that the read and overwrite jobs fill first and then work on
# (overwrite-sync-8jobs: an eighth of it per job).
FILLED_MB=64
FILLED="${FILLED_MB}M"
# overwrite-sync-seq: operations, and the stride (the cluster size of
# every image here, and of `qj bench`'s).
SEQ_OPS=3000
STRIDE=65536

# The usage is the header comment: every line after the first up to the first
# line that is not a comment.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }
CHECK_ONLY=""
SUMMARIZE=""
# Which options were given: -R takes the lists from its file unless given,
# and refuses the options that only shape runs.
GIVEN=""
while getopts "r:s:o:T:J:c:n:d:R:kh" opt; do
    case "$opt" in
        r) REPEATS="$OPTARG"; GIVEN+=" -r" ;;
        s) SECONDS_PER_RUN="$OPTARG"; GIVEN+=" -s" ;;
        o) ROWS_OUT="$OPTARG" ;;
        T) TARGETS="$OPTARG"; GIVEN+=" -T" ;;
        J) JOBS="$OPTARG"; GIVEN+=" -J" ;;
        c) CACHES="$OPTARG"; GIVEN+=" -c" ;;
        n) SEQ_OPS="$OPTARG"; GIVEN+=" -n" ;;
        d) DIR="$OPTARG"; GIVEN+=" -d" ;;
        R) SUMMARIZE="$OPTARG" ;;
        k) CHECK_ONLY=1 ;;
        *) usage ;;
    esac
done
[[ "$REPEATS" =~ ^[1-9][0-9]?$ ]] || { echo "nbd-bench: -r takes 1..99" >&2; exit 2; }
[[ "$SECONDS_PER_RUN" =~ ^[1-9][0-9]*$ ]] || { echo "nbd-bench: -s takes whole seconds" >&2; exit 2; }
[[ "$SEQ_OPS" =~ ^[1-9][0-9]{0,4}$ ]] || { echo "nbd-bench: -n takes 1..99999" >&2; exit 2; }
# The names, checked before anything else is looked at or made, so that
# -k answers for the arguments alone.
IFS=, read -r -a target_list <<< "$TARGETS"
IFS=, read -r -a job_list <<< "$JOBS"
IFS=, read -r -a cache_list <<< "$CACHES"
for list in target_list job_list cache_list; do
    declare -n names="$list"
    (( ${#names[@]} > 0 )) || { echo "nbd-bench: -T, -J and -c each take at least one name" >&2; exit 2; }
    for name in "${names[@]}"; do
        [[ -n "$name" ]] || { echo "nbd-bench: an empty name in -T, -J or -c" >&2; exit 2; }
    done
    unset -n names
done
# known KIND NAME LIST: exits 2 unless NAME is one of the comma-separated LIST.
known() {
    [[ ",$3," == *",$2,"* ]] || { echo "nbd-bench: unknown $1 $2; valid: ${3//,/, }" >&2; exit 2; }
}
for j in "${job_list[@]}"; do known job "$j" "$KNOWN_JOBS"; done
for t in "${target_list[@]}"; do known target "$t" "$KNOWN_TARGETS"; done
for c in "${cache_list[@]}"; do
    [[ "$c" == writeback || "$c" == none ]] || { echo "nbd-bench: -c takes writeback and none" >&2; exit 2; }
done
# from_caller PATH: PATH, relative to the caller's directory.
from_caller() { if [[ -z "$1" || "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$CALLER_DIR" "$1"; fi; }
ROWS_OUT="$(from_caller "$ROWS_OUT")"
DIR="$(from_caller "$DIR")"
if [[ -n "$SUMMARIZE" ]]; then
    SUMMARIZE="$(from_caller "$SUMMARIZE")"
    for option in -r -s -n -d; do
        [[ "$GIVEN" != *" $option"* ]] ||
            { echo "nbd-bench: -R summarizes runs already made: $option does not apply" >&2; exit 2; }
    done
    [[ -f "$SUMMARIZE" && -r "$SUMMARIZE" ]] ||
        { echo "nbd-bench: -R $SUMMARIZE: not a readable file" >&2; exit 2; }
    # Lists not given are the file's own (every job, target and cache in it).
    [[ "$GIVEN" == *" -T"* ]] || TARGETS=""
    [[ "$GIVEN" == *" -J"* ]] || JOBS=""
    [[ "$GIVEN" == *" -c"* ]] || CACHES=""
fi
[[ -z "$CHECK_ONLY" ]] || exit 0

# summarize: the table, and the -o rows, from $RESULTS (one JSON line a run).
summarize() {
python3 - "$RESULTS" "$ROWS_OUT" "$TARGETS" "$JOBS" "$CACHES" <<'EOF'
import json, statistics, sys
results_path, rows_out, targets, jobs, caches = sys.argv[1:6]
def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
runs, seen = [], set()
for line_number, line in enumerate(open(results_path), 1):
    if not line.strip():
        continue
    where = f"nbd-bench: {results_path} line {line_number}"
    try:
        run = json.loads(line)
    except ValueError as e:
        sys.exit(f"{where}: not JSON: {e}")
    if not isinstance(run, dict):
        sys.exit(f"{where}: not a run (a JSON object)")
    missing = [k for k in ("job", "target", "cache", "repeat", "ops", "ops_per_s", "mb_per_s", "error")
               if k not in run]
    if missing:
        sys.exit(f"{where}: a run without {', '.join(missing)}")
    if not all(isinstance(run[k], str) for k in ("job", "target", "cache")):
        sys.exit(f"{where}: job, target and cache must be strings")
    bad = [k for k in ("ops", "ops_per_s", "mb_per_s") if not number(run[k])]
    if bad:
        sys.exit(f"{where}: {', '.join(bad)}: not a number of 0 or more")
    if not (isinstance(run["repeat"], int) and not isinstance(run["repeat"], bool)):
        sys.exit(f"{where}: repeat: not a whole number")
    key = (run["job"], run["cache"], run["target"], run["repeat"])
    if key in seen:
        # Two runs of one repeat could not be paired with the base's.
        sys.exit(f"{where}: a second run of {run['job']} on {run['target']}, "
                 f"cache={run['cache']}, repeat {run['repeat']}")
    seen.add(key)
    runs.append(run)
def listed(given, key):
    # The given list, or the file's names in the order they first appear.
    return given.split(",") if given else list(dict.fromkeys(r[key] for r in runs))
targets, jobs, caches = listed(targets, "target"), listed(jobs, "job"), listed(caches, "cache")
cells = {}
for r in runs:
    cells.setdefault((r["job"], r["cache"], r["target"]), []).append(r)
rows = []
for job in jobs:
  for cache in caches:
    medians = {t: statistics.median(x["ops_per_s"] for x in cells.get((job, cache, t), []))
               for t in targets if cells.get((job, cache, t))}
    for t in targets:
        c = cells.get((job, cache, t))
        if not c:
            continue
        ops = [x["ops_per_s"] for x in c]
        med = statistics.median(ops)
        def vs(base):
            return round(med / medians[base], 2) if medians.get(base) else None
        def median_of(key, digits=1):
            values = [x[key] for x in c if x.get(key) is not None]
            return round(statistics.median(values), digits) if values else None
        def growth(runs):
            each = [max(0, x["file_bytes_end"] - x["file_bytes_start"]) / x["guest_bytes"]
                    for x in runs if x.get("file_bytes_start") is not None
                    and x.get("file_bytes_end") is not None and x.get("guest_bytes")]
            return round(statistics.median(each), 3) if each else None
        guest = median_of("guest_bytes", 0)
        start, end = median_of("file_bytes_start", 0), median_of("file_bytes_end", 0)
        # The keys of `qj bench --output json` rows (the same shape, so one
        # reader takes both), then this runner's own.
        row = {
            "workload": job, "target": t,
            "threads": 8 if job.endswith("8jobs") else 1,
            "ops": int(statistics.median(x["ops"] for x in c)),
            "ops_per_s": round(med, 1),
            "mb_per_s": round(statistics.median(x["mb_per_s"] for x in c), 2),
            "p50_us": median_of("lat_p50_us"), "p99_us": median_of("lat_p99_us"),
            "flushes_per_op": None,
            # Counted in process only (the server's writes are not).
            "bytes_written_per_op": median_of("bytes_per_op"),
            "vs_raw": vs("raw-prealloc"), "vs_qemu": vs("qemu-default"),
            # Of the same job on the raw file without NBD (local-raw).
            "vs_local": vs("local-raw"),
            "vs_ordered": vs("qj-ordered"), "vs_journal": vs("qj-journal"),
            "guest_bytes_written": int(guest) if guest is not None else None,
            "file_bytes_start": int(start) if start is not None else None,
            "file_bytes_end": int(end) if end is not None else None,
            "file_growth_per_guest_byte": growth(c),
            "dedup_hits_per_op": None, "hash_per_cluster_us": None, "compare_per_match_us": None,
            "note": "fio reported errors" if any(x["error"] for x in c) else None,
            "via": "nbd", "cache": cache, "repeats": len(c),
            "ops_per_s_min": round(min(ops), 1), "ops_per_s_max": round(max(ops), 1),
            "ops_per_s_by_repeat": {str(x["repeat"]): round(x["ops_per_s"], 1)
                                    for x in sorted(c, key=lambda x: x["repeat"])},
            "flush_p50_us": median_of("flush_p50_us"), "flush_p99_us": median_of("flush_p99_us"),
        }
        flushes = [x["flushes"] / x["ops"] for x in c if x.get("flushes") is not None and x["ops"]]
        row["flushes_per_op"] = round(statistics.median(flushes), 3) if flushes else None
        if t.startswith("inproc-"):
            row["via"] = "in-process"
        elif t.startswith("local-"):
            row["via"] = "local"
        inproc_target = "inproc-" + t[len("qj-"):] if t.startswith("qj-") else None
        row["vs_inproc"] = vs(inproc_target)
        # The same ratios paired by repeat: each repeat's rate over the base's
        # in that repeat (cells are interleaved, so a pair ran minutes
        # apart at most), then the median and spread of those. On a machine
        # whose rates drift between repeats (the raw file here has spread
        # 2x within one table), the ratio of two medians can pair a fast
        # repeat with a slow one; the paired ratio cannot.
        for key, base in (("vs_raw", "raw-prealloc"), ("vs_local", "local-raw"),
                          ("vs_inproc", inproc_target)):
            base_rate = {x["repeat"]: x["ops_per_s"] for x in cells.get((job, cache, base), [])}
            each = [x["ops_per_s"] / base_rate[x["repeat"]] for x in c if base_rate.get(x["repeat"])]
            row[key + "_paired"] = round(statistics.median(each), 2) if each else None
            row[key + "_paired_min"] = round(min(each), 2) if each else None
            row[key + "_paired_max"] = round(max(each), 2) if each else None
            row[key + "_paired_n"] = len(each)
        rows.append(row)
if not rows:
    sys.exit(f"nbd-bench: no run in {results_path} is of the jobs, targets and caches asked for")
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
print(f"{'workload':<22}{'cache':<10}{'target':<22}{'ops/s':>10}{'min..max':>20}{'MB/s':>9}{'flush/op':>9}{'vs qemu':>9}{'vs raw':>8}{'vs inproc':>10}")
for r in rows:
    spread = f"{r['ops_per_s_min']:.0f}..{r['ops_per_s_max']:.0f}"
    print(f"{r['workload']:<22}{r['cache']:<10}{r['target']:<22}{r['ops_per_s']:>10.0f}{spread:>20}{r['mb_per_s']:>9.1f}"
          f"{fmt(r['flushes_per_op'], '.3f'):>9}{fmt(r['vs_qemu'], '.2f'):>9}{fmt(r['vs_raw'], '.2f'):>8}{fmt(r['vs_inproc'], '.2f'):>10}")
def paired(r, key):
    return (f"{r[key + '_paired']:.2f} ({r[key + '_paired_min']:.2f}..{r[key + '_paired_max']:.2f})"
            if r[key + "_paired"] is not None else "-")
for r in rows:
    if r["target"].startswith("qj-") and r["vs_raw_paired"] is not None:
        print(f"vs raw paired by repeat, {r['target']} {r['workload']} cache={r['cache']}: "
              f"median {paired(r, 'vs_raw')} over {r['vs_raw_paired_n']} repeats")
    if r["vs_inproc"] is not None:
        print(f"serve overhead, {r['target']} {r['workload']} cache={r['cache']}: {r['ops_per_s']:.0f} ops/s over NBD "
              f"= {r['vs_inproc']:.2f} of in process, paired by repeat {paired(r, 'vs_inproc')} "
              f"(target: 0.87 or more, at most 15% slower)")
    if r["target"] == "raw-prealloc" and r["vs_local"] is not None:
        print(f"qemu-nbd's own overhead, {r['workload']} cache={r['cache']}: {r['ops_per_s']:.0f} ops/s over NBD "
              f"= {r['vs_local']:.2f} of fio on the file")
if rows_out:
    with open(rows_out, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
EOF
}
if [[ -n "$SUMMARIZE" ]]; then
    # Only the summary: of the runs an earlier run left in its -d DIR.
    command -v python3 >/dev/null || { echo "nbd-bench: python3 is required" >&2; exit 1; }
    RESULTS="$SUMMARIZE"
    summarize
    exit 0
fi

for tool in fio qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "nbd-bench: $tool is required" >&2; exit 1; }
done
if [[ -n "${QJ:-}" && ! -x "$QJ" ]]; then
    echo "nbd-bench: QJ=$QJ is not an executable" >&2
    exit 1
fi
QJ="${QJ:-target/release/qj}"
if [[ ! -x "$QJ" ]]; then
    echo "nbd-bench: building $QJ" >&2
    cargo build --release --locked -p qj-cli >&2
fi
QJ="$(realpath "$QJ")"
# Counting the server's flushes needs perf and the syscall tracepoints.
PERF=""
if command -v perf >/dev/null &&
    perf stat -e syscalls:sys_enter_fdatasync -o /dev/null true 2>/dev/null; then
    PERF=perf
else
    echo "nbd-bench: perf cannot count system calls here: flushes_per_op will be null" >&2
fi

if [[ -z "$DIR" ]]; then
    DIR="$(mktemp -d)"
    trap 'stop_server; rm -rf "$DIR"' EXIT
else
    mkdir -p "$DIR"
    trap 'stop_server' EXIT
fi
RESULTS="$DIR/results.jsonl"
: > "$RESULTS"
SOCK="$DIR/nbd.sock"
SERVER_PID=""

# Creates a fresh image for a target; prints the format it is served as.
make_image() {
    local target="$1" img="$2"
    rm -f "$img"
    case "$target" in
        qj-ordered) "$QJ" create "$img" "$IMAGE_SIZE" >/dev/null ;;
        qj-journal) "$QJ" create -o journal=on "$img" "$IMAGE_SIZE" >/dev/null ;;
        qj-journal-logged) "$QJ" create -o journal=on,log_data=on "$img" "$IMAGE_SIZE" >/dev/null ;;
        qemu-default) qemu-img create -q -f qcow2 "$img" "$IMAGE_SIZE" ;;
        qemu-lazy) qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" "$IMAGE_SIZE" ;;
        qemu-prealloc) qemu-img create -q -f qcow2 -o preallocation=metadata "$img" "$IMAGE_SIZE" ;;
        raw-sparse) qemu-img create -q -f raw "$img" "$IMAGE_SIZE" ;;
        # Blocks really written: the only kind an fdatasync finds cheap.
        raw-prealloc | local-raw) qemu-img create -q -f raw -o preallocation=full "$img" "$IMAGE_SIZE" ;;
        *) echo "nbd-bench: unknown target $target" >&2; exit 2 ;;
    esac
}

# The server of a target, as the array SERVER_COMMAND.
server_command() {
    local target="$1" img="$2" cache="$3"
    case "$target" in
        qj-*) SERVER_COMMAND=("$QJ" serve -t -e 16 --cache "$cache" -k "$SOCK" "$img") ;;
        qemu-*) SERVER_COMMAND=(qemu-nbd -t -e 16 --cache="$cache" -f qcow2 -k "$SOCK" "$img") ;;
        raw-*) SERVER_COMMAND=(qemu-nbd -t -e 16 --cache="$cache" -f raw -k "$SOCK" "$img") ;;
    esac
}

# Starts the server; under perf, SERVER_PID is perf's and the server is its
# only child.
start_server() {
    local target="$1" img="$2" cache="$3"
    rm -f "$SOCK" "$DIR/perf.txt"
    # fio opens the file itself (run_fio).
    [[ "$target" != local-* ]] || return 0
    server_command "$target" "$img" "$cache"
    if [[ -n "$PERF" ]]; then
        perf stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync \
            -o "$DIR/perf.txt" -- "${SERVER_COMMAND[@]}" >/dev/null &
    else
        "${SERVER_COMMAND[@]}" >/dev/null &
    fi
    SERVER_PID=$!
    local i
    for i in $(seq 1 500); do
        [[ -S "$SOCK" ]] && return 0
        sleep 0.01
    done
    echo "nbd-bench: $target did not start listening" >&2
    exit 1
}

stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        # Under perf, the server gets the signal and perf writes its counts
        # when the server has ended.
        if [[ -n "$PERF" ]]; then
            pkill -TERM -P "$SERVER_PID" 2>/dev/null || true
        else
            kill -TERM "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# Flushes the server made since it started (empty without perf).
server_flushes() {
    [[ -n "$PERF" && -s "$DIR/perf.txt" ]] || return 0
    awk -F, '/syscalls:sys_enter_f(data)?sync/ { n += $1 } END { print n + 0 }' "$DIR/perf.txt"
}

# The image file's length, as the in-process rows report it: for qcow2
# targets only (a raw file's length is the disk size).
file_bytes() {
    [[ "$1" == raw-* || "$1" == local-* ]] || stat -c %s "$2"
}

# fio arguments of a job (after the common ones).
job_args() {
    case "$1" in
        randwrite-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --time_based --runtime=$SECONDS_PER_RUN" ;;
        randwrite-sync-8jobs) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --numjobs=8 --size=128M --offset_increment=128M --time_based --runtime=$SECONDS_PER_RUN" ;;
        seqwrite-64k-sync) echo "--rw=write --bs=64k --iodepth=1 --fsync=1 --time_based --runtime=$SECONDS_PER_RUN" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=1 --size=$FILLED --time_based --runtime=$SECONDS_PER_RUN" ;;
        overwrite-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --size=$FILLED --time_based --runtime=$SECONDS_PER_RUN" ;;
        overwrite-sync-8jobs) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --numjobs=8 --size=$((FILLED_MB / 8))M --offset_increment=$((FILLED_MB / 8))M --time_based --runtime=$SECONDS_PER_RUN" ;;
        # qj bench's overwrite-sync: 4 KiB at the start of each cluster.
        overwrite-sync-seq) echo "--rw=write:$((STRIDE - 4096)) --bs=4k --iodepth=1 --fsync=1 --size=$((SEQ_OPS * STRIDE))" ;;
        *) echo "nbd-bench: unknown job $1" >&2; exit 2 ;;
    esac
}

needs_fill() { [[ "$1" == randread || "$1" == overwrite-sync* ]]; }

# The fill of a job that works on written clusters.
fill_args() {
    case "$1" in
        overwrite-sync-seq) echo "--rw=write:$((STRIDE - 4096)) --bs=4k --size=$((SEQ_OPS * STRIDE)) --end_fsync=1" ;;
        *) echo "--rw=write --bs=1M --size=$FILLED --end_fsync=1" ;;
    esac
}

# Runs `qj bench` in process on the overwrite-sync-seq workload; writes a
# result line like the fio cells'.
run_inproc() {
    local target="$1" cache="$2" rep="$3"
    "$QJ" bench --workload overwrite-sync --target "${target#inproc-}" --ops "$SEQ_OPS" \
        --rounds 1 --cache "$cache" --dir "$DIR" --output json > "$DIR/inproc.json"
    python3 - "$DIR/inproc.json" "$target" "$rep" "$cache" >> "$RESULTS" <<'EOF'
import json, sys
path, target, rep, cache = sys.argv[1:5]
r = json.load(open(path))[0]
print(json.dumps({
    "job": "overwrite-sync-seq", "target": target, "cache": cache, "repeat": int(rep),
    "ops": r["ops"], "ops_per_s": r["ops_per_s"], "mb_per_s": r["mb_per_s"],
    "lat_p50_us": r["p50_us"], "lat_p99_us": r["p99_us"],
    "flush_p50_us": None, "flush_p99_us": None,
    "guest_bytes": r["guest_bytes_written"], "bytes_per_op": r["bytes_written_per_op"],
    "file_bytes_start": r["file_bytes_start"], "file_bytes_end": r["file_bytes_end"],
    "flushes": r["flushes_per_op"] * r["ops"]
        if r["flushes_per_op"] is not None else None,
    "error": 0 if r["ops_per_s"] else 1,
}))
EOF
}

# run_fio TARGET IMAGE CACHE NAME OUT ARGS...: one fio run against the
# target's server, or (local-raw) on its image file, fio counting its own
# flushes there.
run_fio() {
    local target="$1" img="$2" cache="$3" name="$4" out="$5"; shift 5
    local common=(--name="$name" --group_reporting --output-format=json --output="$out")
    if [[ "$target" != local-* ]]; then
        # fio prints a line on stdout even with --output: keep it quiet.
        fio "${common[@]}" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" "$@" >/dev/null
        return
    fi
    # Over NBD `fsync=1` is the NBD flush, which qemu-nbd serves with
    # fdatasync; on a file fio's fsync=1 would be fsync(2), which also
    # commits the file's times on every write.
    local args=("${@/#--fsync=1/--fdatasync=1}")
    local direct=0
    [[ "$cache" == none ]] && direct=1
    local run=(fio "${common[@]}" --ioengine=psync --direct="$direct" --filename="$img" "${args[@]}")
    rm -f "$DIR/perf.txt"
    if [[ -n "$PERF" ]]; then
        perf stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync \
            -o "$DIR/perf.txt" -- "${run[@]}" >/dev/null
    else
        "${run[@]}" >/dev/null
    fi
}

# In-process targets run only the job that mirrors their workload.
applies() { [[ "$2" != inproc-* || "$1" == overwrite-sync-seq ]]; }
cells=0
for job in "${job_list[@]}"; do
    for target in "${target_list[@]}"; do
        if applies "$job" "$target"; then
            cells=$((cells + REPEATS * ${#cache_list[@]}))
        fi
    done
done
n=0
for rep in $(seq 1 "$REPEATS"); do
    for job in "${job_list[@]}"; do
        for cache in "${cache_list[@]}"; do
        for target in "${target_list[@]}"; do
            applies "$job" "$target" || continue
            n=$((n + 1))
            echo "nbd-bench: [$n/$cells] repeat $rep, $job on $target, cache=$cache" >&2
            if [[ "$target" == inproc-* ]]; then
                run_inproc "$target" "$cache" "$rep"
                continue
            fi
            img="$DIR/img-$target"
            make_image "$target" "$img"
            start_server "$target" "$img" "$cache"
            if needs_fill "$job"; then
                # shellcheck disable=SC2046 # a word list on purpose
                run_fio "$target" "$img" "$cache" fill "$DIR/fill.json" $(fill_args "$job")
                # The fill's flushes are not the job's.
                stop_server
                start_server "$target" "$img" "$cache"
            fi
            # shellcheck disable=SC2046 # job_args is a word list on purpose
            start_bytes="$(file_bytes "$target" "$img")"
            run_fio "$target" "$img" "$cache" "$job" "$DIR/run.json" $(job_args "$job")
            stop_server
            python3 - "$DIR/run.json" "$job" "$target" "$rep" "$cache" "$(server_flushes)" \
                "$start_bytes" "$(file_bytes "$target" "$img")" >> "$RESULTS" <<'EOF'
import json, sys
path, job, target, rep, cache, flushes, start, end = sys.argv[1:9]
report = json.load(open(path))
j = report["jobs"][0]
def pct(lat, key):
    p = lat.get("percentile", {})
    return p[key] / 1000 if key in p else None
side = "read" if j["read"]["total_ios"] > 0 and j["write"]["total_ios"] == 0 else "write"
s = j[side]
print(json.dumps({
    "job": job, "target": target, "cache": cache, "repeat": int(rep),
    "ops": s["total_ios"], "ops_per_s": s["iops"], "mb_per_s": s["bw_bytes"] / 1e6,
    "lat_p50_us": pct(s["clat_ns"], "50.000000"), "lat_p99_us": pct(s["clat_ns"], "99.000000"),
    "flush_p50_us": pct(j["sync"]["lat_ns"], "50.000000") if j.get("sync", {}).get("total_ios") else None,
    "flush_p99_us": pct(j["sync"]["lat_ns"], "99.000000") if j.get("sync", {}).get("total_ios") else None,
    "guest_bytes": s["io_bytes"] if side == "write" else None,
    "file_bytes_start": int(start) if start else None, "file_bytes_end": int(end) if end else None,
    "flushes": int(flushes) if flushes else None,
    "error": j["error"],
}))
EOF
        done
        done
    done
done

summarize
