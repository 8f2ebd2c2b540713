#!/bin/sh
# Regenerates the qcow2 test vectors with qemu-img/qemu-io (QEMU 10.0.2).
# Each *.hex file holds bytes of an image as hex, trailing zero bytes
# trimmed (tests pad them back to the cluster size). Timestamps in snapshot
# tables differ from run to run; the tests assert only stable fields.
set -eu
out=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

# hex FILE OFFSET LENGTH NAME: dump bytes, drop trailing zeros.
hex() {
    python3 - "$1" "$2" "$3" "$out/$4.hex" <<'PY'
import sys
f, off, ln, dst = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0), sys.argv[4]
b = open(f, 'rb').read()[off:off + ln].rstrip(b'\0')
open(dst, 'w').write('\n'.join(b[i:i+32].hex() for i in range(0, len(b), 32)) + '\n')
PY
}

qemu-img create -q -f qcow2 default.qcow2 64M
hex default.qcow2 0 65536 default_64k_header

qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1G
hex v2.qcow2 0 65536 v2_header

qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 rc1.qcow2 16M
hex rc1.qcow2 0 4096 rc1_4k_header

qemu-img create -q -f qcow2 -b default.qcow2 -F qcow2 backed.qcow2
hex backed.qcow2 0 65536 backing_header

qemu-img create -q -f qcow2 bitmaps.qcow2 64M
qemu-img bitmap --add bitmaps.qcow2 bm0
qemu-img bitmap --add -g 128k bitmaps.qcow2 second-bitmap
hex bitmaps.qcow2 0 65536 bitmaps_header
# The directory sits at the offset the extension names (checked by the test).
python3 - bitmaps.qcow2 "$out/bitmaps_directory.hex" <<'PY'
import sys, struct
b = open(sys.argv[1], 'rb').read()
hl = struct.unpack('>I', b[100:104])[0]
p = hl
while True:
    t, l = struct.unpack('>II', b[p:p+8])
    if t == 0x23852875:
        n, _, size, off = struct.unpack('>IIQQ', b[p+8:p+32])
        d = b[off:off+size]
        open(sys.argv[2], 'w').write('\n'.join(d[i:i+32].hex() for i in range(0, len(d), 32)) + '\n')
        break
    p += 8 + ((l + 7) & ~7)
PY

qemu-img create -q -f qcow2 snap.qcow2 64M
qemu-io -c 'write -P 0x11 0 128k' snap.qcow2 >/dev/null
qemu-img snapshot -c first snap.qcow2
qemu-io -c 'write -P 0x22 64k 64k' snap.qcow2 >/dev/null
qemu-img snapshot -c 'second snapshot' snap.qcow2
hex snap.qcow2 0 65536 snapshots_header
python3 - snap.qcow2 "$out/snapshot_table.hex" <<'PY'
import sys, struct
b = open(sys.argv[1], 'rb').read()
nb, off = struct.unpack('>IQ', b[60:72])
d = b[off:off+65536].rstrip(b'\0')
open(sys.argv[2], 'w').write('\n'.join(d[i:i+32].hex() for i in range(0, len(d), 32)) + '\n')
PY

# Refcount blocks of every width: 512-byte clusters, data written, then a
# snapshot so that shared clusters carry refcount 2 (where the width allows).
for bits in 1 2 4 8 16 32 64; do
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=$bits rb$bits.qcow2 1M
    qemu-io -c 'write -P 0x33 0 2k' rb$bits.qcow2 >/dev/null
    if [ $bits -gt 1 ]; then qemu-img snapshot -c s rb$bits.qcow2; fi
    python3 - rb$bits.qcow2 "$out/refblock_$bits.hex" <<'PY'
import sys, struct
b = open(sys.argv[1], 'rb').read()
rt = struct.unpack('>Q', b[48:56])[0]
rb = struct.unpack('>Q', b[rt:rt+8])[0]
d = b[rb:rb+512].rstrip(b'\0')
open(sys.argv[2], 'w').write('\n'.join(d[i:i+32].hex() for i in range(0, len(d), 32)) + '\n')
PY
    qemu-img check -q rb$bits.qcow2
done
