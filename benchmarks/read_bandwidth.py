"""Achievable memory read bandwidth of this machine (a STREAM-like read-only probe).

Definition (used by benchmarks/vs_llamacpp.py for the decode bandwidth bound): the best of 10 read-only
passes (a numpy sum) over a float64 buffer of 4x the last-level cache, split evenly over 1 or more threads
(numpy releases the GIL inside the reduction). Reported in GB/s (1e9 bytes/s).

Usage:
    .venv/bin/python benchmarks/read_bandwidth.py [--threads 1,2] [--passes 10]
"""

from __future__ import annotations

import argparse
import glob
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache in bytes (Linux sysfs ``cpu0/cache/index*/size``); ``default`` if unknown."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            txt = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        num = txt[:-1] if txt[-1:] in "KMG" else txt
        if num.isdigit():
            best = max(best, int(num) * mult)
    return best or default


def read_bandwidth(threads: int = 1, passes: int = 10, buffer_bytes: int | None = None) -> float:
    """Best-of-``passes`` read bandwidth in bytes/s of a sum over ``buffer_bytes`` (default 4x the LLC)
    split over ``threads`` threads."""
    n = (buffer_bytes or 4 * last_level_cache_bytes()) // 8
    buf = np.ones(n)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):  # the first pass faults the pages in
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--passes", type=int, default=10)
    a = ap.parse_args()
    llc = last_level_cache_bytes()
    for t in (int(x) for x in a.threads.split(",")):
        print(
            f"read bandwidth, {t} thread(s), {4 * llc >> 20} MiB buffer: "
            f"{read_bandwidth(t, a.passes) / 1e9:.1f} GB/s  [measured]"
        )


if __name__ == "__main__":
    main()
