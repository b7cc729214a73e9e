"""Achievable memory read bandwidth of this machine (a STREAM-like read-only probe).

Definition (used by benchmarks/vs_llamacpp.py for the decode bandwidth bound): the best of 10 read-only
passes over a buffer of 4x the last-level cache, split evenly over 1 or more threads. Two readers: a numpy
float64 sum (one slice per thread; numpy releases the GIL inside the reduction) and torch's float32 sum
(torch's intra-op threads); the buffer on 4 KiB pages or on 2 MiB transparent huge pages (private anonymous
mappings advised ``MADV_NOHUGEPAGE`` / ``MADV_HUGEPAGE``, the latter as `parity.devices.huge_pages` places
parity's CPU weights; no 2 MiB probes where the kernel has no THP). The decode bound takes the fastest
(`best_read_bandwidth`): a reader slower than memory or a page size the weights do not use would make the
bound a rate the weights beat (measured on AMD EPYC Zen 4, 1 thread: 25.7-28.3 GB/s on 4 KiB pages vs
33.7-36.0 on 2 MiB pages, numpy and torch alike; docs/benchmarks.md). Reported in GB/s (1e9 bytes/s).

Usage:
    .venv/bin/python benchmarks/read_bandwidth.py [--threads 1,2] [--passes 10]
"""

from __future__ import annotations

import argparse
import glob
import mmap
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parity.devices.huge_pages import advised_mapping, thp_mode  # noqa: E402


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


def _page_buffer(n: int, huge: bool) -> np.ndarray:
    """n float64 ones in a mapping advised onto 2 MiB pages (``huge``) or kept on 4 KiB pages
    (`parity.devices.huge_pages.advised_mapping`; numpy's own allocations of 4 MiB and more are advised huge
    pages on Linux, so they would not be); numpy's buffer where the kernel refuses the advice."""
    try:
        mapping, lead = advised_mapping(n * 8, huge)
    except (OSError, ValueError, AttributeError):  # no madvise / THP here: base pages either way
        return np.ones(n)
    buf = np.frombuffer(mapping, dtype=np.uint8)[lead : lead + n * 8].view(np.float64)
    buf[:] = 1.0
    return buf


def thp_available() -> bool:
    """Whether the kernel can give a buffer 2 MiB pages (THP "always" or "madvise" and madvise present)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


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
    buf = _page_buffer(n, huge_pages)
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
    """Bytes/s of every probe, keyed "<reader> <pages>" (pages "4 KiB" / "2 MiB"; no 2 MiB probes where the
    kernel has no transparent huge pages), and "best", the fastest."""
    sizes = (False, True) if thp_available() else (False,)
    out = {
        f"{reader} {'2 MiB' if huge else '4 KiB'}": read_bandwidth(threads, passes, huge_pages=huge, reader=reader)
        for reader in READERS
        for huge in sizes
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
