#!/usr/bin/env bash
# The head-to-head crash comparison, one command: the same guest workloads
# run once through QEMU (qemu-io over its blklogwrites filter; writethrough,
# and writethrough with lazy_refcounts) and once through qj (every backend,
# `qj io --log-writes`), and every log is replayed by the same checker,
# `qj crash replay`. Prints a Markdown table: engine, workload, states,
# corruptions, leak states, largest leak, flushes per guest write.
#
# Usage: model-checks/scripts/compare-logs.sh   (QJ=path/to/qj to choose the
# binary; default: a release build, made first). Needs qemu-img, qemu-io, jq.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
if [[ -z "${QJ:-}" ]]; then
    (cd "$root" && cargo build --release --locked -p qj-cli >&2)
    QJ="$root/target/release/qj"
fi
for tool in qemu-img qemu-io jq; do
    command -v "$tool" >/dev/null || { echo "compare-logs: $tool is not installed" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Guest workloads, one qemu-io/qj io command a line. Each write is followed
# by a flush, as a guest that syncs every request (the writethrough case).
workload() {
    case "$1" in
    allocate) # 4 KiB writes, each allocating a fresh cluster
        for i in $(seq 0 11); do
            echo "write -P $((i + 1)) $((i * 64))k 4k"
            echo flush
        done ;;
    overwrite) # one allocation, then partial overwrites of it
        echo "write -P 1 0 64k"; echo flush
        for i in $(seq 0 9); do
            echo "write -P $((i + 2)) $((i * 6 + 1))k 4k"
            echo flush
        done ;;
    mixed) # allocations, a discard, reuse, a large write
        echo "write -P 1 0 64k"; echo flush
        echo "write -P 2 64k 64k"; echo flush
        echo "discard 0 64k"; echo flush
        echo "write -P 3 1M 128k"; echo flush
        echo "write -P 4 8k 4k"; echo flush
        echo "write -P 5 2M 4k"; echo flush ;;
    esac
}
WORKLOADS=(allocate overwrite mixed)

# engine-name  how-to-create  how-to-run
ENGINES=(qemu-writethrough qemu-lazy-refcounts qj-ordered qj-journal qj-journal-draft qj-journal-logged)

create() { # engine image
    case "$1" in
    qemu-writethrough) qemu-img create -q -f qcow2 "$2" 4M ;;
    qemu-lazy-refcounts) qemu-img create -q -f qcow2 -o lazy_refcounts=on "$2" 4M ;;
    qj-ordered) "$QJ" create -f qcow2 "$2" 4M >/dev/null ;;
    qj-journal) "$QJ" create -f qcow2 -o journal=on,journal_size=1M "$2" 4M >/dev/null ;;
    qj-journal-draft) "$QJ" create -f qcow2 -o journal=on,journal_size=1M,commit=draft "$2" 4M >/dev/null ;;
    qj-journal-logged) "$QJ" create -f qcow2 -o journal=on,journal_size=1M,log_data=on "$2" 4M >/dev/null ;;
    esac
}

record() { # engine image log commands-file
    local args=()
    while IFS= read -r line; do args+=(-c "$line"); done <"$4"
    case "$1" in
    qemu-*)
        : >"$3"
        qemu-io -t writethrough --image-opts \
            "driver=qcow2,file.driver=blklogwrites,file.file.driver=file,file.file.filename=$2,file.log.driver=file,file.log.filename=$3,file.log-sector-size=512" \
            "${args[@]}" >/dev/null ;;
    *) "$QJ" io --log-writes "$3" "${args[@]}" "$2" >/dev/null ;;
    esac
}

echo "| engine | workload | states | corruptions | leak states | largest leak | flushes per write |"
echo "|---|---|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
    workload "$w" >"$work/$w.cmds"
    writes=$(grep -cv '^flush$' "$work/$w.cmds")
    for e in "${ENGINES[@]}"; do
        dir="$work/$e-$w"; mkdir "$dir"
        create "$e" "$dir/img.qcow2"
        cp "$dir/img.qcow2" "$dir/base.qcow2"
        record "$e" "$dir/img.qcow2" "$dir/img.log" "$work/$w.cmds"
        status=0
        "$QJ" crash replay "$dir/img.log" --base "$dir/base.qcow2" --output json >"$dir/report.json" || status=$?
        if [[ $status -gt 1 ]]; then
            echo "compare-logs: replay of $e/$w failed (exit $status)" >&2; exit 1
        fi
        jq -r --arg e "$e" --arg w "$w" --argjson writes "$writes" \
            '"| \($e) | \($w) | \(.states) | \(.corruptions) | \(.leak_states) | \(.leaked_clusters_max) clusters (\(.leaked_bytes_max / 1024) KiB) | \((.flushes / $writes * 100 | round) / 100) |"' \
            "$dir/report.json"
        if [[ $status -eq 1 && -n "${VERBOSE:-}" ]]; then
            jq -r '.findings[] | "    state \(.state) [\(.check)]: \(.detail)"' "$dir/report.json" >&2
        fi
    done
done
