"""Achievable memory read bandwidth of this machine (a STREAM-like read-only probe).

Definition (used by benchmarks/vs_llamacpp.py for the decode bandwidth bound): the best of 10 read-only
passes over a buffer of 4x the last-level cache, split evenly over 1 or more threads. Two readers: a numpy
float64 sum (one slice per thread; numpy releases the GIL inside the reduction) and torch's float32 sum
(torch's intra-op threads); the buffer on 4 KiB pages (numpy's own allocation) or on 2 MiB transparent huge
pages (a private anonymous mapping advised ``MADV_HUGEPAGE``, as `parity.devices.huge_pages` places parity's
CPU weights; base pages where the kernel has no THP). The decode bound takes the fastest of the four
(`best_read_bandwidth`): a reader slower than memory (numpy's pairwise sum reached 26-30 GB/s on one AMD
EPYC Zen 4 core while torch's sum over huge pages read 34.6-34.8) or a page size the weights do not use
would make the bound a rate the weights beat. Reported in GB/s (1e9 bytes/s).

Usage:
    .venv/bin/python benchmarks/read_bandwidth.py [--threads 1,2] [--passes 10]
"""

from __future__ import annotations

import argparse
import glob
import mmap
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


def _huge_page_buffer(n: int) -> np.ndarray:
    """n float64 ones on 2 MiB pages (advised; the kernel decides), on base pages without MADV_HUGEPAGE."""
    page = 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.ones(n)
    nbytes = -(-n * 8 // page) * page
    mapping = mmap.mmap(-1, nbytes + page, flags=mmap.MAP_PRIVATE)
    raw = np.frombuffer(mapping, dtype=np.uint8)
    lead = (-raw.ctypes.data) % page
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, lead, nbytes)
    except OSError:
        pass  # no THP in this kernel: base pages
    buf = raw[lead : lead + n * 8].view(np.float64)
    buf[:] = 1.0
    return buf


def read_bandwidth(
    threads: int = 1,
    passes: int = 10,
    buffer_bytes: int | None = None,
    huge_pages: bool = False,
    reader: str = "numpy",
) -> float:
    """Best-of-``passes`` read bandwidth in bytes/s of a sum over ``buffer_bytes`` (default 4x the LLC) on
    ``threads`` threads, the buffer on 4 KiB pages or (``huge_pages``) 2 MiB pages; ``reader`` "numpy" (a
    float64 sum per thread's slice) or "torch" (one float32 ``torch.sum`` on torch's intra-op threads).

    Raises:
        ValueError: an unknown reader.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    n = (buffer_bytes or 4 * last_level_cache_bytes()) // 8
    buf = _huge_page_buffer(n) if huge_pages else np.ones(n)
    best = float("inf")
    if reader == "torch":
        import torch

        flat = torch.from_numpy(buf.view(np.float32))
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(passes + 1):  # the first pass faults the pages in
                t0 = time.perf_counter()
                flat.sum()
                best = min(best, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(saved)
        return buf.nbytes / best
    parts = np.array_split(buf, threads)
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


#: the probe's readers (`read_bandwidth`)
READERS = ("numpy", "torch")


def best_read_bandwidth(threads: int = 1, passes: int = 10) -> dict[str, float]:
    """Bytes/s of every probe, keyed "<reader> <pages>" (pages "4 KiB" / "2 MiB"), and "best", the fastest."""
    out = {
        f"{reader} {'2 MiB' if huge else '4 KiB'}": read_bandwidth(threads, passes, huge_pages=huge, reader=reader)
        for reader in READERS
        for huge in (False, True)
    }
    out["best"] = max(out.values())
    return out


def describe(probes: dict[str, float]) -> str:
    """One line of `best_read_bandwidth`'s figures in GB/s."""
    rest = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items() if k != "best")
    return f"{probes['best'] / 1e9:.1f} GB/s ({rest})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--passes", type=int, default=10)
    a = ap.parse_args()
    llc = last_level_cache_bytes()
    for t in (int(x) for x in a.threads.split(",")):
        probes = best_read_bandwidth(t, a.passes)
        print(f"read bandwidth, {t} thread(s), {4 * llc >> 20} MiB buffer: {describe(probes)}  [measured]")


if __name__ == "__main__":
    main()
