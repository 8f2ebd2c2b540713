#!/usr/bin/env python3
"""The I/O pattern of a synced allocating 4 KiB write on both backends, with
and without growing the file ahead in zero-filled steps (RFC.md section
6.1): does pre-growing make the flushes cheap enough to pay for the zeros?
Run: [STEP=bytes] python3 scripts/file_growth.py [DIR]
"""
import os
import statistics
import sys

import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "."
N = 600
CLUSTER = 65536
STEP = int(os.environ.get("STEP", str(2 << 20)))


def run(journal, grow):
    path = os.path.join(DIR, "file_growth.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.pwrite(fd, b"\0" * (CLUSTER * 8), 0)  # header, tables, journal ring
        os.fsync(fd)
        data, sector, log = b"\xab" * 4096, b"\1" * 512, b"\2" * 2560
        end = file_len = CLUSTER * 8
        t = time.perf_counter()
        for i in range(N):
            offset, end = end, end + CLUSTER
            if grow and end > file_len:
                os.pwrite(fd, b"\0" * STEP, file_len)
                file_len += STEP
            os.pwrite(fd, data, offset)
            if journal:  # data and transaction, one flush
                os.pwrite(fd, log, CLUSTER * 2 + (i * 2560) % (CLUSTER * 4))
                os.fdatasync(fd)
            else:  # data and refcount, flush, L2 entry, flush
                os.pwrite(fd, sector, CLUSTER)
                os.fdatasync(fd)
                os.pwrite(fd, sector, 2 * CLUSTER)
                os.fdatasync(fd)
        return N / (time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)


rates = {}
for _ in range(3):
    for name, journal, grow in (
        ("ordered", 0, 0),
        ("journal", 1, 0),
        ("ordered, grown ahead", 0, 1),
        ("journal, grown ahead", 1, 1),
    ):
        rates.setdefault(name, []).append(run(journal, grow))
for name, r in rates.items():
    print(f"{name:22s} median {statistics.median(r):6.0f} ops/s  runs {[round(x) for x in r]}")
