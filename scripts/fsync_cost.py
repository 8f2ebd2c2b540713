#!/usr/bin/env python3
"""What one fdatasync costs on this machine's file system, by what the
writes before it did: overwrites of allocated blocks, or a write that
extends the file (RFC.md section 6.1). Run: python3 scripts/fsync_cost.py [DIR]
"""
import os
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "."
N = 500
REGION = 16 << 20


def report(name, lat):
    lat.sort()
    print(f"{name:28s} {len(lat) / sum(lat):7.0f} ops/s  p50 {lat[len(lat) // 2] * 1e6:6.0f} us")


path = os.path.join(DIR, "fsync_cost.tmp")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
try:
    os.pwrite(fd, b"\0" * REGION, 0)
    os.fsync(fd)
    for name, size in (("overwrite 4 KiB", 4096), ("overwrite 10 KiB", 10240)):
        lat = []
        for i in range(N):
            t = time.perf_counter()
            os.pwrite(fd, b"\1" * size, (i * size) % REGION)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        report(name, lat)
    end, lat = REGION, []
    for i in range(N):
        t = time.perf_counter()
        os.pwrite(fd, b"\1" * 4096, end)
        end += 65536
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    report("extend by 64 KiB, write 4 KiB", lat)
finally:
    os.close(fd)
    os.unlink(path)
