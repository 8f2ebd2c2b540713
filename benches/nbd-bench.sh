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
# Usage: benches/nbd-bench.sh [-r REPEATS] [-s SECONDS] [-o ROWS.json]
#                             [-T target,target] [-J job,job] [-c mode,mode]
#                             [-d DIR]
#   targets: qj-ordered qj-journal qj-journal-logged qemu-default qemu-lazy
#            qemu-prealloc raw-sparse raw-prealloc
#   jobs:    randwrite-sync randwrite-sync-8jobs seqwrite-64k-sync
#            randread overwrite-sync
# Environment: QJ (the qj binary; default target/release/qj, built when
# missing).
# Needs: fio (with the nbd engine), qemu-img, qemu-nbd, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS=3
SECONDS_PER_RUN=3
ROWS_OUT=""
DIR=""
TARGETS="qj-ordered,qj-journal,qj-journal-logged,qemu-default,qemu-lazy,qemu-prealloc,raw-sparse,raw-prealloc"
JOBS="randwrite-sync,randwrite-sync-8jobs,seqwrite-64k-sync,randread,overwrite-sync"
CACHES="writeback,none"
IMAGE_SIZE=1G
# Region that the read and overwrite jobs fill first and then work on.
FILLED=64M

usage() { sed -n '2,24p' "$0" >&2; exit 2; }
while getopts "r:s:o:T:J:c:d:h" opt; do
    case "$opt" in
        r) REPEATS="$OPTARG" ;;
        s) SECONDS_PER_RUN="$OPTARG" ;;
        o) ROWS_OUT="$OPTARG" ;;
        T) TARGETS="$OPTARG" ;;
        J) JOBS="$OPTARG" ;;
        c) CACHES="$OPTARG" ;;
        d) DIR="$OPTARG" ;;
        *) usage ;;
    esac
done
[[ "$REPEATS" =~ ^[1-9][0-9]?$ ]] || { echo "nbd-bench: -r takes 1..99" >&2; exit 2; }
[[ "$SECONDS_PER_RUN" =~ ^[1-9][0-9]*$ ]] || { echo "nbd-bench: -s takes whole seconds" >&2; exit 2; }

for tool in fio qemu-img qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "nbd-bench: $tool is required" >&2; exit 1; }
done
QJ="${QJ:-target/release/qj}"
if [[ ! -x "$QJ" ]]; then
    echo "nbd-bench: building $QJ" >&2
    cargo build --release --locked -p qj-cli >&2
fi
QJ="$(realpath "$QJ")"

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
        raw-prealloc) qemu-img create -q -f raw -o preallocation=full "$img" "$IMAGE_SIZE" ;;
        *) echo "nbd-bench: unknown target $target" >&2; exit 2 ;;
    esac
}

start_server() {
    local target="$1" img="$2" cache="$3"
    rm -f "$SOCK"
    case "$target" in
        qj-*) "$QJ" serve -t -e 16 --cache "$cache" -k "$SOCK" "$img" >/dev/null & ;;
        qemu-*) qemu-nbd -t -e 16 --cache="$cache" -f qcow2 -k "$SOCK" "$img" & ;;
        raw-*) qemu-nbd -t -e 16 --cache="$cache" -f raw -k "$SOCK" "$img" & ;;
    esac
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
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# fio arguments of a job (after the common ones).
job_args() {
    case "$1" in
        randwrite-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --time_based --runtime=$SECONDS_PER_RUN" ;;
        randwrite-sync-8jobs) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --numjobs=8 --size=128M --offset_increment=128M --time_based --runtime=$SECONDS_PER_RUN" ;;
        seqwrite-64k-sync) echo "--rw=write --bs=64k --iodepth=1 --fsync=1 --time_based --runtime=$SECONDS_PER_RUN" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=1 --size=$FILLED --time_based --runtime=$SECONDS_PER_RUN" ;;
        overwrite-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --size=$FILLED --time_based --runtime=$SECONDS_PER_RUN" ;;
        *) echo "nbd-bench: unknown job $1" >&2; exit 2 ;;
    esac
}

needs_fill() { [[ "$1" == randread || "$1" == overwrite-sync ]]; }

run_fio() {
    local name="$1" out="$2"; shift 2
    # fio prints a line on stdout even with --output: keep it quiet.
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" \
        --group_reporting --output-format=json --output="$out" "$@" >/dev/null
}

IFS=, read -r -a target_list <<< "$TARGETS"
IFS=, read -r -a job_list <<< "$JOBS"
IFS=, read -r -a cache_list <<< "$CACHES"
for j in "${job_list[@]}"; do job_args "$j" >/dev/null; done
for c in "${cache_list[@]}"; do
    [[ "$c" == writeback || "$c" == none ]] || { echo "nbd-bench: -c takes writeback and none" >&2; exit 2; }
done
cells=$(( REPEATS * ${#job_list[@]} * ${#target_list[@]} * ${#cache_list[@]} ))
n=0
for rep in $(seq 1 "$REPEATS"); do
    for job in "${job_list[@]}"; do
        for cache in "${cache_list[@]}"; do
        for target in "${target_list[@]}"; do
            n=$((n + 1))
            echo "nbd-bench: [$n/$cells] repeat $rep, $job on $target, cache=$cache" >&2
            img="$DIR/img-$target"
            make_image "$target" "$img"
            start_server "$target" "$img" "$cache"
            if needs_fill "$job"; then
                run_fio fill "$DIR/fill.json" --rw=write --bs=1M --size="$FILLED" --end_fsync=1
            fi
            # shellcheck disable=SC2046 # job_args is a word list on purpose
            run_fio "$job" "$DIR/run.json" $(job_args "$job")
            stop_server
            python3 - "$DIR/run.json" "$job" "$target" "$rep" "$cache" >> "$RESULTS" <<'EOF'
import json, sys
path, job, target, rep, cache = sys.argv[1:6]
report = json.load(open(path))
j = report["jobs"][0]
side = "read" if j["read"]["total_ios"] > 0 and j["write"]["total_ios"] == 0 else "write"
s = j[side]
print(json.dumps({
    "job": job, "target": target, "cache": cache, "repeat": int(rep),
    "ops": s["total_ios"], "ops_per_s": s["iops"], "mb_per_s": s["bw_bytes"] / 1e6,
    "lat_p50_us": s["clat_ns"]["percentile"].get("50.000000", 0) / 1000 if "percentile" in s["clat_ns"] else None,
    "error": j["error"],
}))
EOF
        done
        done
    done
done

python3 - "$RESULTS" "$ROWS_OUT" "$TARGETS" "$JOBS" "$CACHES" <<'EOF'
import json, statistics, sys
results_path, rows_out, targets, jobs, caches = sys.argv[1:6]
targets, jobs, caches = targets.split(","), jobs.split(","), caches.split(",")
runs = [json.loads(l) for l in open(results_path) if l.strip()]
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
        row = {
            "via": "nbd", "workload": job, "target": t, "cache": cache,
            "threads": 8 if job.endswith("8jobs") else 1,
            "repeats": len(c), "ops": int(statistics.median(x["ops"] for x in c)),
            "ops_per_s": round(med, 1), "ops_per_s_min": round(min(ops), 1),
            "ops_per_s_max": round(max(ops), 1),
            "mb_per_s": round(statistics.median(x["mb_per_s"] for x in c), 2),
            "vs_qemu": round(med / medians["qemu-default"], 2) if medians.get("qemu-default") else None,
            "vs_raw": round(med / medians["raw-prealloc"], 2) if medians.get("raw-prealloc") else None,
            "note": "fio reported errors" if any(x["error"] for x in c) else None,
        }
        rows.append(row)
print(f"{'workload':<22}{'cache':<10}{'target':<19}{'ops/s':>10}{'min..max':>20}{'MB/s':>9}{'vs qemu':>9}{'vs raw':>8}")
for r in rows:
    spread = f"{r['ops_per_s_min']:.0f}..{r['ops_per_s_max']:.0f}"
    vq = f"{r['vs_qemu']:.2f}" if r["vs_qemu"] is not None else "-"
    vr = f"{r['vs_raw']:.2f}" if r["vs_raw"] is not None else "-"
    print(f"{r['workload']:<22}{r['cache']:<10}{r['target']:<19}{r['ops_per_s']:>10.0f}{spread:>20}{r['mb_per_s']:>9.1f}{vq:>9}{vr:>8}")
if rows_out:
    with open(rows_out, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
EOF
