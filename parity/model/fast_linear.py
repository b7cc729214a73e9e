"""Bandwidth-bound linear layers for decode: the formulation of ``x @ W^T`` chosen per device and weight size.

A decode step multiplies a few rows by large weights (the LM head: vocabulary x hidden), so its time is the
time to stream the weight from memory. On the CPU, MKL's sgemm (what `F.linear` calls) reads a
129,280 x 256 fp32 head at 3-8 GB/s for 1-8 rows, oneDNN's inner-product primitive
(``torch.ops.mkldnn._linear_pointwise``) at 2-5x that, near the machine's read bandwidth
(benchmarks/lm_head_gemv.py, docs/benchmarks.md); for small weights MKL is faster (oneDNN's ~10 us
per-call overhead dominates). Both compute in full fp32 (no reduced-precision math mode: the
``torch.get_float32_matmul_precision() == "highest"`` default); results differ only in summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Under torch.compile, at most this many rows take the broadcast-reduce form (see `decode_linear`).
COMPILED_GEMV_MAX_ROWS = 16

#: Weights at least this large (bytes) take the oneDNN path on the CPU; smaller ones stay on MKL.
#: Crossover measured with benchmarks/lm_head_gemv.py (AMD EPYC, 2 cores): at 0.5 MiB both take
#: ~27 us for 8 rows; oneDNN's fixed cost (~10 us) loses below that, its streaming wins above.
ONEDNN_MIN_WEIGHT_BYTES = 4 << 20


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and torch.get_float32_matmul_precision() == "highest"
        and weight.numel() * weight.element_size() >= ONEDNN_MIN_WEIGHT_BYTES
    )


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` for few rows against a large weight, in the fastest full-precision formulation.

    Eager: oneDNN's inner product for large fp32 weights on the CPU (see the module docstring), else
    ``F.linear``. Under torch.compile (the compiled regions, `parity.model.compiled`), up to
    `COMPILED_GEMV_MAX_ROWS` rows on the CPU: ``sum(W[:, None, :] * x[None], -1)``, which inductor emits as one
    vectorised reduction streaming W once, row block by row block, with every x row reused from L1
    (measured 1.3-1.4x oneDNN's read rate at 1 and 8 rows, benchmarks/lm_head_gemv.py); more rows: ``F.linear``.

    Args:
        x: [..., in] activations; weight: [out, in] (same dtype as x).
    Returns:
        [..., out] in x's dtype; equal to ``F.linear(x, weight)`` up to fp32 summation order.
    """
    flat = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and weight.dim() == 2 and flat.shape[0] <= COMPILED_GEMV_MAX_ROWS:
            out = (weight[:, None, :] * flat[None, :, :]).sum(-1).t()
            return out.reshape(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight)
    if not _onednn_usable(x, weight):
        return F.linear(x, weight)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])
