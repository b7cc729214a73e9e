"""Bandwidth-bound linear layers for decode: the formulation of ``x @ W^T`` chosen per device and weight size.

A decode step multiplies a few rows by large weights (the LM head: vocabulary x hidden), so its time is the
time to stream the weight from memory. On the CPU, MKL's sgemm (what `F.linear` calls) reads a
129,280 x 256 fp32 head at 3-8 GB/s for 1-8 rows, oneDNN's inner-product primitive
(``torch.ops.mkldnn._linear_pointwise``) at 2-5x that, near the machine's read bandwidth
(benchmarks/lm_head_gemv.py, docs/benchmarks.md); for small weights MKL is faster (oneDNN's ~10 us
per-call overhead dominates). Both compute in full fp32 (no reduced-precision math mode: the
``torch.get_float32_matmul_precision() == "highest"`` default); results differ only in summation order.

Weights stored narrower than the activations (bf16 weights, fp32 activations: `parity.model.weight_storage`)
are widened in registers, never as a whole: large ones through a compiled reduction that loads bf16 and
accumulates in fp32 (`widening_linear`), small ones (cache-resident) by a transient upcast.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from parity.devices import native_kernels
from parity.devices.core import materialized
from parity.devices.widening import widened_blocks
from parity.errors import first_line

log = logging.getLogger("parity.model")

#: Under torch.compile, at most this many rows take the broadcast-reduce form (see `decode_linear`).
COMPILED_GEMV_MAX_ROWS = 16

#: Weights at least this large (bytes) take the oneDNN path on the CPU; smaller ones stay on MKL.
#: Crossover measured with benchmarks/lm_head_gemv.py (AMD EPYC, 2 cores): at 0.5 MiB both take
#: ~27 us for 8 rows; oneDNN's fixed cost (~10 us) loses below that, its streaming wins above.
ONEDNN_MIN_WEIGHT_BYTES = 4 << 20


#: Narrow (bf16) weights at least this large (bytes) take the compiled widening reduction in eager mode;
#: smaller ones are upcast whole (a cache-resident copy). Crossover measured with benchmarks/lm_head_gemv.py
#: (AMD EPYC, 1 thread): 1024 x 256 bf16 (0.5 MiB) ties at 28-31 us (1 row), 2048 x 256 (1 MiB): 33 vs 64 us.
WIDENING_KERNEL_MIN_WEIGHT_BYTES = 1 << 20

#: Row counts up to which the widening reduction is used (above: upcast in row blocks and GEMM).
WIDENING_KERNEL_MAX_ROWS = 16

#: Largest number of weight elements `widening_linear` upcasts at once on its GEMM path (16 Mi elements
#: = 64 MiB fp32, through `parity.devices.widening`'s reused buffer; large, as that path serves many-row
#: products; bounds memory, not a format constant).
WIDEN_CHUNK_ELEMS = 1 << 24


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


#: Row counts up to which a large weight takes parity's C++ op (`native_linear`); above, GEMMs reuse each
#: weight element over enough rows that the BLAS kernels win (a policy bound: the op's tiles were measured
#: at 1, 4 and 8 rows, docs/benchmarks.md "The float head on the C++ op").
NATIVE_MAX_ROWS = 16


def native_linear(flat: torch.Tensor, weight: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor | None:
    """``flat @ weight^T`` through `parity.devices.native_kernels.float_linear` (the weight streamed once,
    fp32 math; bf16 weights widened in registers) when it applies, else None.

    It applies on the CPU to fp32 ``flat`` [M, in] with M <= `NATIVE_MAX_ROWS`, a contiguous 2-D fp32 or bf16
    CPU weight [out, in] of at least `ONEDNN_MIN_WEIGHT_BYTES` (below, the weight is cache-resident and the
    BLAS call is as fast), fp32 matmul precision "highest" in eager mode (not checked while compiling: a
    compiled graph does not see a later precision switch), and the C++ ops built (`native_kernels.available`;
    `parity.devices.compiler` loads them before it traces a CPU graph). ``live`` (an int64 tensor of one
    value r): rows >= r are not computed and come out zero (`native_kernels.float_linear`). Returns fp32
    [M, out] or None.
    """
    if flat.dim() != 2 or not native_linear_applies(flat.shape[0], flat.dtype, flat.device, weight):
        return None
    return native_kernels.float_linear(flat, weight, live)


def native_linear_applies(rows: int, dtype: torch.dtype, device: torch.device, weight: torch.Tensor) -> bool:
    """Whether `native_linear` takes a product of ``rows`` activation rows of ``dtype`` on ``device`` with
    ``weight`` (the conditions listed there; the C++ ops are built on the first eager call)."""
    if not (
        device.type == "cpu"
        and dtype == torch.float32
        and 0 < rows <= NATIVE_MAX_ROWS
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.numel() * weight.element_size() >= ONEDNN_MIN_WEIGHT_BYTES
    ):
        return False
    if not torch.compiler.is_compiling() and torch.get_float32_matmul_precision() != "highest":
        return False
    return native_kernels.available()


def decode_linear(x: torch.Tensor, weight: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` for few rows against a large weight, in the fastest full-precision formulation.

    First choice, eager and compiled: parity's C++ op for few rows and a large weight on the CPU
    (`native_linear`: the 129,280 x 256 head at 4 rows, 1 thread, AMD Zen 3, 16.8 ms vs 20.3 ms inductor's
    reduction below and 42 ms oneDNN). Else eager: oneDNN's inner product for large fp32 weights on the CPU
    (see the module docstring), else ``F.linear``. Under torch.compile (the compiled decode step,
    `parity.model.decode_graph`) on the CPU, without the op: one row, or up to `COMPILED_GEMV_MAX_ROWS`
    rows of a weight >= `ONEDNN_MIN_WEIGHT_BYTES` (the LM head):
    ``sum(W[:, None, :] * x[None], -1)``, which inductor emits as one vectorised reduction streaming W once,
    row block by row block, with every x row reused from L1 (measured 1.3-1.4x oneDNN's read rate at 1 and 8
    rows, benchmarks/lm_head_gemv.py); otherwise ``F.linear`` (an ATen GEMM call in the graph: for the small,
    cache-resident projections of a step of 2-8 rows it took 6-8% off the step, docs/benchmarks.md).

    Args:
        x: [..., in] activations; weight: [out, in] (x's dtype, or narrower: see `widening_linear`).
        live: on the C++ op only, an int64 tensor of one value r: rows of ``flat = x.reshape(-1, in)`` from
            r on are not computed and come out zero (a padded batch's scratch rows); ignored elsewhere (all
            rows computed).
    Returns:
        [..., out] in x's dtype; equal to ``F.linear(x, weight)`` up to fp32 summation order.
    """
    if weight.dtype != x.dtype:
        return widening_linear(x, weight)
    flat = x.reshape(-1, x.shape[-1])
    out = native_linear(flat, weight, live)
    if out is not None:
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if torch.compiler.is_compiling():
        rows = flat.shape[0]
        small = weight.numel() * weight.element_size() < ONEDNN_MIN_WEIGHT_BYTES
        if x.device.type == "cpu" and weight.dim() == 2 and rows <= COMPILED_GEMV_MAX_ROWS and (rows == 1 or not small):
            out = (weight[:, None, :] * materialized(flat)[None, :, :]).sum(-1).t()
            return out.reshape(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight)
    if not _onednn_usable(x, weight):
        return F.linear(x, weight)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _widening_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, in] x [out, in] (narrower dtype) -> [M, out] in x's dtype: each weight element widened as loaded."""
    return (weight.to(x.dtype)[:, None, :] * materialized(x)[None, :, :]).sum(-1).t()


_compiled_reduction = None  # torch.compile(_widening_reduction), built on first use; False = unavailable


def _widening_kernel():
    global _compiled_reduction
    if _compiled_reduction is None:
        _compiled_reduction = torch.compile(_widening_reduction, dynamic=True)
    return _compiled_reduction


def widening_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` with a weight stored narrower than x (bf16 weight, fp32 x), computed in x's dtype.

    Every product and sum is in x's dtype (fp32 on the CPU): the weight's bf16 values are exact in fp32,
    so the result equals ``F.linear(x, weight.float())`` up to summation order, and the weight is read
    at its stored width (2 bytes per element for bf16). Formulations: parity's C++ op where it applies
    (`native_linear`); else under torch.compile, or eager on
    the CPU for <= `WIDENING_KERNEL_MAX_ROWS` rows and a weight >= `WIDENING_KERNEL_MIN_WEIGHT_BYTES`,
    the broadcast-reduce ``sum(W.float()[:, None, :] * x[None], -1)`` (inductor: one loop that converts
    each loaded element in registers); otherwise a transient upcast of `WIDEN_CHUNK_ELEMS`-sized row
    blocks and ``F.linear``. A weight wider than x is first rounded to x's dtype (``F.linear`` semantics).

    Args:
        x: [..., in] activations; weight: [out, in].
    Returns:
        [..., out] in x's dtype.
    """
    global _compiled_reduction
    big = weight.numel() * weight.element_size() >= WIDENING_KERNEL_MIN_WEIGHT_BYTES
    compiling = torch.compiler.is_compiling()
    if not (big or compiling) or weight.element_size() > x.element_size():
        return F.linear(x, weight.to(x.dtype))  # small (cache-resident) or wider weight: one upcast
    flat = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    out = native_linear(flat, weight)
    if out is not None:
        return out.reshape(*x.shape[:-1], n)
    if flat.shape[0] <= WIDENING_KERNEL_MAX_ROWS and weight.dim() == 2:
        if compiling:
            return _widening_reduction(flat, weight).reshape(*x.shape[:-1], n)
        if x.device.type == "cpu" and _compiled_reduction is not False:
            try:
                return _widening_kernel()(flat, weight).reshape(*x.shape[:-1], n)
            except Exception as e:  # no C++ toolchain for inductor, or a backend error: upcast from now on
                log.warning("compiled widening GEMV unavailable (%s); upcasting weights per call", first_line(e))
                _compiled_reduction = False
    if weight.numel() <= WIDEN_CHUNK_ELEMS or weight.dim() != 2:
        return F.linear(x, weight.to(x.dtype))
    return torch.cat([F.linear(x, block) for _, block in widened_blocks(weight, x.dtype, WIDEN_CHUNK_ELEMS)], dim=-1)


class WideningLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose weight is stored narrower than its input: bf16 weight, fp32 input.

    forward(x[..., in]) -> [..., out] in x's dtype via `widening_linear` (fp32 math, weight read at 2
    bytes per element). State-dict names and shapes are those of ``nn.Linear``; built by re-classing one
    (`parity.model.weight_storage.store_weights_`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return widening_linear(x, self.weight)
