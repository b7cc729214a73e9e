"""The index of each row's largest value (greedy decoding's argmax over the vocabulary), fast on the CPU.

On the CPU, ``torch.argmax(x, -1)`` over several rows of a vocabulary-wide tensor takes a slow path: measured
here (torch 2.13, AMD EPYC Zen 3, [8, 129,280] fp32) 2.6 ms on one thread and 1.2 ms on two, against 0.14 ms
for one row and 0.11 ms for ``amax`` over all eight (benchmarks/decode_ops.py; docs/benchmarks.md "Greedy
argmax and the fused INT8 rescale"). A batch-8 decode step of the benchmark miniature is ~15-20 ms, so the argmax alone
was 7-13% of it. `row_argmax` reaches the same indices in two passes that stay on the vectorised reduction:
the maximum of each block of `BLOCK` values (``amax``), the first block holding the row's maximum
(``argmax`` over [rows, blocks], small), then the first maximum inside that block.

Where parity's C++ CPU ops are loaded (`parity.devices.native_kernels`, which the engine loads at start-up on
the CPU), fp32 rows take its one-pass ``row_argmax`` instead: the same indices, one sequential read per row
(measured on AMD EPYC Zen 4, 1 thread, [1, 129,280] logits just written by the LM head: see
``parity/devices/csrc/row_argmax.cpp``).
"""

from __future__ import annotations

import torch

#: Values per block of the first pass: 1,024 fp32 = 4 KiB, a few pages of the row (timed among 256-2,048
#: on the machine above: 0.17-0.20 ms for [8, 129,280], flat).
BLOCK = 1024


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of the first largest value of each row, as ``torch.argmax(x, dim=-1)`` gives it (ties:
    the first; NaN counts as the largest, the first NaN wins).

    Args:
        x: float tensor [rows, n] on any device: fp32 CPU rows take the C++ op where parity's ops are
            loaded (`native_kernels.loaded`); other CPU rows the two torch passes (n >= 2 * `BLOCK`) or
            ``torch.argmax`` (shorter rows, and every other device).

    Returns:
        LongTensor [rows] on x's device.

    Raises:
        ValueError: x is not 2-D, is complex, or has no columns (argmax of an empty row is undefined).
    """
    if x.dim() != 2:
        raise ValueError(f"row_argmax takes a [rows, n] tensor, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"row_argmax of a complex tensor ({x.dtype}) is undefined: complex values have no order")
    rows, n = x.shape
    if n == 0:
        raise ValueError(f"row_argmax of rows with no values (shape [{rows}, 0]) is undefined")
    if x.device.type != "cpu" or rows == 0:
        return x.argmax(dim=-1)
    if x.dtype == torch.float32 and not torch.compiler.is_compiling():
        from parity.devices import native_kernels

        if native_kernels.loaded():
            return native_kernels.row_argmax(x)
    if n < 2 * BLOCK:
        return x.argmax(dim=-1)
    whole = n // BLOCK
    block_max = x[:, : whole * BLOCK].reshape(rows, whole, BLOCK).amax(dim=-1)  # [rows, whole]
    if whole * BLOCK < n:  # the partial last block
        block_max = torch.cat([block_max, x[:, whole * BLOCK :].amax(dim=-1, keepdim=True)], dim=1)
    # amax propagates NaN, so the first block with a NaN wins as argmax's NaN does
    start = block_max.argmax(dim=-1) * BLOCK  # [rows]
    cols = (start[:, None] + torch.arange(BLOCK, device=x.device)).clamp_max_(n - 1)
    # past the end of a partial last block the last value repeats: never before its own first position
    return start + x.gather(1, cols).argmax(dim=-1)
