"""Narrow weights (int8, bf16) widened to the compute dtype one cache-sized block of rows at a time.

A GEMM on a weight stored narrower than its math (the int8 weights of `parity.devices.int8_gemm`'s
``"fp32_gemm"`` kernel, the bf16-stored weights of `parity.model.fast_linear` on its GEMM path) widens the
weight block by block and multiplies each block while it is in cache. The blocks go through one scratch
buffer per thread, device and dtype, reused from call to call: a fresh tensor per block is, for blocks above
glibc's mmap threshold, a fresh mapping whose pages fault in on every write (measured on AMD EPYC Zen 3,
1 thread, the 129,280 x 256 int8 LM head at 1 row: 7.4 ms through the reused buffer, 60-65 ms through fresh
2-4 MiB blocks, 12 ms through fresh 1 MiB ones, whose cost moved with the process's allocation history;
docs/benchmarks.md "Low-precision weights on the CPU").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

#: Most weight elements widened at once: 1 Mi elements (4 MiB of fp32), cache-sized (4,096 rows of a
#: 256-wide weight). Measured best at 1 and 8 rows on AMD EPYC Zen 3 (the int8 head: 7.4 / 16.6 ms at
#: 1 / 8 rows against 7.3 / 19.5 at 2 Mi elements and 9.2 / 18.2 at 256 Ki; docs/benchmarks.md); not a
#: format constant.
WIDEN_BLOCK_ELEMS = 1 << 20

_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements of ``dtype`` on ``device``, from this thread's scratch buffer (grown
    when too small, otherwise reused; it keeps its largest size for the thread's life: 4 MiB for
    `WIDEN_BLOCK_ELEMS` fp32 blocks, up to 64 MiB where `parity.model.fast_linear` widens larger blocks). Its
    contents are garbage and are overwritten by the next call on this thread for the same dtype and device,
    so a caller must be done with it before calling again."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    key = (dtype, torch.device(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def widened_blocks(
    weight: torch.Tensor, dtype: torch.dtype, block_elems: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """The rows of ``weight`` [N, K] (any layout, any dtype) in blocks of at most ``block_elems`` elements
    (default `WIDEN_BLOCK_ELEMS`; at least one row), each widened (converted) to ``dtype``: yields (first row
    n0, block [r, K] contiguous in ``dtype``). Each block lives in this thread's scratch buffer (`scratch`)
    and is overwritten by the next one: use it before advancing the iterator and do not keep it."""
    n, k = weight.shape
    rows = max(1, (block_elems or WIDEN_BLOCK_ELEMS) // max(k, 1))
    buf = scratch(min(rows, n) * k, dtype, weight.device)
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        block = buf[: r * k].view(r, k)
        block.copy_(weight[n0 : n0 + r])
        yield n0, block
