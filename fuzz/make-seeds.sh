#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/<target>/: small images made
# by qemu-img with many options and by our own `qj` (journals clean, dirty,
# with logged data and with the two-flush protocol), and the journal
# structures cut out of them for the decoder targets. Clusters are 512
# bytes (4 KiB where an option needs it) so that every seed stays small:
# the qcow2 seeds are under 64 KiB, the journal images just above (a
# journal is at least 64 KiB plus 8 clusters).
#
# Needs qemu-img and qemu-io (QEMU 10) and builds `qj` from this repository.
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir=$PWD
repo=$(cd .. && pwd)

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "make-seeds: $tool is required" >&2; exit 1; }
done
(cd "$repo" && cargo build --locked -q -p qj-cli --bin qj)
qj="$repo/target/debug/qj"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
corpus="$fuzz_dir/corpus"
rm -rf "$corpus"
mkdir -p "$corpus"/{image,qcow2_header,qcow2_tables,qcow2_snapshots_bitmaps,journal_header,journal_block,journal_descriptors,journal_transaction,log_writes,nbd_server}

img() { qemu-img create -q -f qcow2 "$@"; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }

cd "$work"
# qemu-img images, each with some guest data so that L2 tables and
# refcounted data clusters exist.
img -o cluster_size=512 c512.qcow2 256k
io -c 'write -P 0x11 0 1500' -c 'write -P 0x22 40k 700' -c 'write -P 0x33 200k 512' c512.qcow2
img -o cluster_size=512,refcount_bits=1 rc1.qcow2 128k
io -c 'write -P 0x44 1k 2k' rc1.qcow2
img -o cluster_size=1024,refcount_bits=64 rc64.qcow2 256k
io -c 'write -P 0x55 3k 5k' rc64.qcow2
img -o cluster_size=4096,refcount_bits=8 c4k.qcow2 1M
io -c 'write -P 0x66 0 4k' -c 'write -P 0x67 512k 8k' c4k.qcow2
img -o cluster_size=512,compat=0.10 v2.qcow2 128k
io -c 'write -P 0x77 0 2k' v2.qcow2
qemu-img create -q -f raw base.raw 128k
img -o cluster_size=512 -b base.raw -F raw backing.qcow2 128k
io -c 'write -P 0x88 4k 1k' backing.qcow2
img -o cluster_size=512,lazy_refcounts=on lazy.qcow2 128k
# abort leaves the dirty bit set: the open must repair refcounts.
io -c 'write -P 0x99 0 3k' -c abort lazy.qcow2 2>/dev/null || true
img -o cluster_size=512 snap.qcow2 128k
io -c 'write -P 0xaa 0 2k' snap.qcow2
qemu-img snapshot -c first snap.qcow2
io -c 'write -P 0xab 1k 2k' snap.qcow2
img -o cluster_size=4096 bitmap.qcow2 256k
qemu-img bitmap --add bitmap.qcow2 dirty0
io -c 'write -P 0xbb 0 8k' bitmap.qcow2
qemu-img bitmap --add -g 65536 bitmap.qcow2 dirty1
python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * 64)' > data.raw
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 data.raw compressed.qcow2

# Our own images: plain, and journals clean and dirty (abort after flushed
# writes leaves committed transactions to replay).
"$qj" create -q -o cluster_size=512 ours.qcow2 256k
"$qj" io -c 'write -P 0x12 0 3k' -c 'write -P 0x13 100k 1k' ours.qcow2 >/dev/null
journal_opts=cluster_size=512,journal=on,journal_size=69632
"$qj" create -q -o "$journal_opts" journal-clean.qcow2 256k
"$qj" io -c 'write -P 0x21 0 3k' journal-clean.qcow2 >/dev/null
"$qj" create -q -o "$journal_opts" journal-dirty.qcow2 256k
"$qj" io -c 'write -P 0x31 0 3k' -c 'write -P 0x32 100k 1k' -c flush \
    -c 'write -P 0x33 200k 512' -c flush -c abort journal-dirty.qcow2 >/dev/null
"$qj" create -q -o "$journal_opts,log_data=on" journal-logged.qcow2 256k
"$qj" io -c 'write -P 0x41 0 700' -c flush -c 'write -P 0x42 60k 512' -c flush -c abort journal-logged.qcow2 >/dev/null
"$qj" create -q -o "$journal_opts,commit=draft" journal-draft.qcow2 256k
"$qj" io -c 'write -P 0x51 1k 2k' -c flush -c abort journal-draft.qcow2 >/dev/null

for f in *.qcow2; do
    cp "$f" "$corpus/image/${f%.qcow2}"
done

# The decoder targets get the structures cut out of those images.
python3 - "$corpus" "$qj" <<'PY'
import os, re, struct, subprocess, sys

corpus, qj = sys.argv[1], sys.argv[2]

def put(target, name, data):
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)

def header(image):
    h = image[:112]
    cluster_bits = struct.unpack(">I", h[20:24])[0]
    return {
        "cluster_bits": cluster_bits,
        "l1_size": struct.unpack(">I", h[36:40])[0],
        "l1": struct.unpack(">Q", h[40:48])[0],
        "reftable": struct.unpack(">Q", h[48:56])[0],
        "nb_snapshots": struct.unpack(">I", h[60:64])[0],
        "snapshots": struct.unpack(">Q", h[64:72])[0],
        "refcount_order": struct.unpack(">I", h[96:100])[0] if struct.unpack(">I", h[4:8])[0] == 3 else 4,
    }

def extensions(image, start):
    at = start
    while at + 8 <= len(image):
        kind, length = struct.unpack(">II", image[at:at + 8])
        if kind == 0:
            return
        yield kind, image[at + 8:at + 8 + length]
        at += 8 + (length + 7) // 8 * 8

for name in sorted(os.listdir(os.path.join(corpus, "image"))):
    image = open(os.path.join(corpus, "image", name), "rb").read()
    h = header(image)
    cs = 1 << h["cluster_bits"]
    put("qcow2_header", name, image[:cs])
    selector = bytes([(h["cluster_bits"] - 9) | (h["refcount_order"] << 4)])
    l1 = image[h["l1"]:h["l1"] + 8 * h["l1_size"]]
    put("qcow2_tables", name + "-l1", selector + l1)
    l2s = [e & 0x00FFFFFFFFFFFE00 for e in struct.unpack(">%dQ" % (len(l1) // 8), l1)]
    for i, l2 in enumerate(x for x in l2s if x):
        put("qcow2_tables", "%s-l2-%d" % (name, i), selector + image[l2:l2 + cs])
    reftable = image[h["reftable"]:h["reftable"] + cs]
    block = struct.unpack(">Q", reftable[:8])[0] & ~0x1FF
    put("qcow2_tables", name + "-refcount", selector + image[block:block + cs])
    if h["nb_snapshots"]:
        table = image[h["snapshots"]:h["snapshots"] + cs]
        put("qcow2_snapshots_bitmaps", name + "-snapshots", bytes([h["nb_snapshots"] << 1]) + table)
    version = struct.unpack(">I", image[4:8])[0]
    header_length = struct.unpack(">I", image[100:104])[0] if version == 3 else 72
    for kind, data in extensions(image, header_length):
        if kind == 0x23852875:
            nb, _, size, offset = struct.unpack(">IIQQ", data[:24])
            put("qcow2_snapshots_bitmaps", name + "-bitmaps", bytes([(nb << 1) | 1]) + image[offset:offset + size])
        if kind == 0x716A726E:
            offset, size = struct.unpack(">QQ", data[:16])
            put("journal_header", name, image[offset:offset + 1024])
            dump = subprocess.run([qj, "journal", "dump", os.path.join(corpus, "image", name)],
                                  capture_output=True, text=True).stdout
            for m in re.finditer(r"transaction (\d+) at block \d+ \(offset (0x[0-9a-f]+)\): (\d+) descriptor \+ (\d+) data", dump):
                seq, at, d, n = int(m[1]), int(m[2], 16), int(m[3]), int(m[4])
                blocks = image[at:at + (d + n + 1) * 512]
                put("journal_transaction", "%s-%d" % (name, seq), b"\x00" + blocks)
                put("journal_block", "%s-%d-first" % (name, seq), blocks[:512])
                put("journal_block", "%s-%d-commit" % (name, seq), blocks[-512:])
                used = struct.unpack(">I", blocks[20:24])[0]
                put("journal_descriptors", "%s-%d" % (name, seq), blocks[48:48 + used])
PY
# dm-log-writes logs, one by qj and one by QEMU's blklogwrites, each after
# two bytes giving the base image's length in 512-byte sectors.
"$qj" create -o cluster_size=4k "$work/lw.qcow2" 256k >/dev/null
"$qj" io --log-writes "$work/lw-qj.log" "$work/lw.qcow2" -c 'write -P 0xa1 0 4k' -c flush \
    -c 'write -z 8k 4k' -c 'discard 0 4k' >/dev/null
img -o cluster_size=4k "$work/lw-qemu.qcow2" 256k
touch "$work/lw-qemu.log"
qemu-io -t writethrough --image-opts "driver=qcow2,file.driver=blklogwrites,file.file.driver=file,file.file.filename=$work/lw-qemu.qcow2,file.log.driver=file,file.log.filename=$work/lw-qemu.log,file.log-sector-size=512" \
    -c 'write -P 0xa1 0 4k' -c 'write -P 0xb2 8k 4k' >/dev/null
# NBD sessions: a mode byte (see fuzz_targets/nbd_server.rs), then 12-byte
# requests, or a scripted handshake.
python3 - "$corpus" "$work" <<'PY'
import struct, sys
corpus, work = sys.argv[1:]
for name, base in (("qj-ordered.log", 16384), ("qemu-writethrough.log", None)):
    src = work + ("/lw-qj.log" if name.startswith("qj") else "/lw-qemu.log")
    if base is None:
        import os
        base = os.path.getsize(work + "/lw-qemu.qcow2")
    open(corpus + "/log_writes/" + name, "wb").write(struct.pack("<H", base // 512) + open(src, "rb").read())
def req(cmd, flags, off, length, seed=0):
    return bytes([cmd, flags, 0]) + struct.pack("<II", off, length) + bytes([seed & 0xfe])
session = (req(1, 0, 0, 8, 0x10) + req(0, 0, 0, 8) + req(6, 0, 4, 4) + req(0, 0, 0, 16) + req(4, 0, 8, 8)
           + req(3, 0, 0, 0) + req(1, 1, 100, 3, 0x20) + req(0, 0, 96, 8) + req(7, 0, 0, 8) + req(2, 0, 0, 0))
for mode in (0, 1, 2, 8, 9, 16, 17):
    open(corpus + "/nbd_server/session-mode%d" % mode, "wb").write(bytes([mode]) + session)
def opt(o, data):
    return struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data
handshake = (struct.pack(">I", 3) + opt(8, b"") + opt(10, struct.pack(">III", 0, 1, 15) + b"base:allocation")
             + opt(7, struct.pack(">IH", 0, 0)))
read = struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096)
open(corpus + "/nbd_server/handshake-go-read", "wb").write(bytes([4]) + handshake + read)
listing = struct.pack(">I", 3) + opt(3, b"") + opt(6, struct.pack(">IHH", 0, 1, 3)) + opt(2, b"")
open(corpus + "/nbd_server/handshake-list", "wb").write(bytes([4]) + listing)
PY
echo "make-seeds: $(find "$corpus" -type f | wc -l) seeds, $(du -sh "$corpus" | cut -f1)"
