"""The LM head's layout for decode, chosen by measurement on the machine at hand, per batch bucket.

A decode step's LM head multiplies a few rows by the vocabulary x hidden weight (129,280 x 256 fp32 =
132 MB in the miniature), so its time is the time to stream that weight, and which formulation streams it
fastest depends on the CPU, not on the model:

- "rows": the weight as stored, [vocab, hidden], through the compiled head graph of `parity.model.decode_graph`
  (inductor's broadcast-reduce, every x row reused from L1);
- "columns": a [hidden, vocab] contiguous copy and ``x @ W^T`` through the BLAS GEMM (MKL on x86).

Measured (docs/benchmarks.md, "Decode on the CPU"; 1 thread, fp32, medians): on a 2-core AMD EPYC with
AVX-512 the reduction read the head at 32-34 GB/s for one row against 9-12 ms for the GEMM on the copy; on
a 2-core AMD EPYC Zen 2 (AVX2 only) the reduction took 10.9 ms for one row and the GEMM on the copy 6.9 ms,
while at 4 rows the reduction won again (17.5 vs 23.4 ms). So `DecodeGraph.warm_up` times both, interleaved,
for each bucket once it is compiled (`choose`) and the bucket's steps take the faster; the copy is kept only
while some bucket uses it. A bucket whose float head runs on parity's C++ op inside the step
(`DecodeGraph._head_in_step`) is not timed: it reads the stored layout (unmeasured against the copy on
Zen 2-like CPUs, where the copy won at one row over inductor's reduction).

Only fp32 heads under fp32 activations on the CPU have the choice (`has_choice`): a bf16-stored or int8 head
has no BLAS kernel taking fp32 activations (a copy would double its bytes in fp32), and accelerators run
their own GEMMs. Both formulations compute in full fp32; results differ in summation order only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: The copy's formulation must be at least this much faster (its median time <= this fraction of the
#: reduction's) to be taken: a margin against timing noise, not a measured constant.
COLUMNS_MARGIN = 0.95

#: Interleaved timed calls per formulation (after one untimed call each); the medians are compared.
TIMED_CALLS = 7

#: Heads larger than this (bytes) are not copied: the copy doubles the head's memory, and the engine's cache
#: pool was sized before it (4 GiB holds an fp32 129,280 x 7,168 head, V4-Pro's; a policy bound).
MAX_COPY_BYTES = 4 << 30


def has_choice(weight: torch.Tensor) -> bool:
    """Whether the head ``weight`` [vocab, hidden] may take the "columns" layout: fp32 (the CPU's activation
    dtype, so the copy's GEMM takes them as they are), 2-D, on the CPU, at most `MAX_COPY_BYTES`."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.dtype == torch.float32
        and weight.numel() * weight.element_size() <= MAX_COPY_BYTES
    )


def columns_copy(weight: torch.Tensor) -> torch.Tensor:
    """The [hidden, vocab] contiguous copy of ``weight`` [vocab, hidden] (a new tensor: weight's bytes again)."""
    return weight.detach().t().contiguous()


def columns_logits(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """The head through the copy: x [B, hidden] fp32 @ weight_t [hidden, vocab] -> fp32 logits [B, vocab]."""
    return torch.mm(x, weight_t)


def _median_s(ts: list[float]) -> float:
    ts = sorted(ts)
    return ts[len(ts) // 2]


def choose(
    rows_fn: Callable[[torch.Tensor], torch.Tensor], weight_t: torch.Tensor, batch: int
) -> tuple[bool, float, float]:
    """Time the head of ``batch`` rows both ways, interleaved (A B A B ...), on the current torch threads.

    Args:
        rows_fn: x [batch, hidden] -> logits [batch, vocab] in the stored layout (the compiled head graph).
        weight_t: the [hidden, vocab] copy (`columns_copy`).
        batch: the rows of the bucket.
    Returns:
        (columns wins, rows median s, columns median s): columns wins when its median is at most
        `COLUMNS_MARGIN` of the rows formulation's.
    """
    x = torch.randn(batch, weight_t.shape[0], dtype=weight_t.dtype, device=weight_t.device)
    rows_fn(x)
    columns_logits(x, weight_t)
    t_rows, t_cols = [], []
    for _ in range(TIMED_CALLS):
        t0 = time.perf_counter()
        rows_fn(x)
        t1 = time.perf_counter()
        columns_logits(x, weight_t)
        t2 = time.perf_counter()
        t_rows.append(t1 - t0)
        t_cols.append(t2 - t1)
    r, c = _median_s(t_rows), _median_s(t_cols)
    return c <= COLUMNS_MARGIN * r, r, c
