"""The INT8 GEMM of each device: int8 activations x int8 weights, int32 accumulation, fp32 rescale.

`int8_linear(xq, x_scale, wq, w_scale, out_dtype)` computes ``(xq @ wq^T) * x_scale[:, None] * w_scale``
with the best kernel the device offers, chosen by `kernel_for`:

- ``"npu_quant_matmul"``: Ascend, `torch_npu.npu_quant_matmul` (int8 x int8 with per-channel weight
  scale and per-token activation scale fused), the kernel vllm-ascend's W8A8_DYNAMIC linear calls;
- ``"native"`` (CPU): the C++ ops of `parity.devices.native_kernels` (int8 widened to int16, pairwise products
  into int32 lanes: AVX2 ``vpmaddwd``, or 32-lane AVX512-VNNI ``vpdpwssd`` where K % 32 == 0 in
  AVX-512 builds), built on first use where a compiler is present; also what the
  compiled step's gathered routed experts call (`gathered_int8_kernel`);
- ``"int_mm"``: `torch._int_mm` (CPU: any shape; CUDA: needs M > 16 and K, N multiples of 8, PyTorch
  ``_int_mm`` docs), then the two scales applied in float64 and rounded once;
- ``"fp32_gemm"`` (CPU): the int8 values widened to fp32 (exact) and multiplied by the fp32 GEMM over runs
  of at most `EXACT_FP32_RUN` along K, whose integer partial sums fp32 holds exactly in any summation order
  (`exact_int8_gemm`), the weight widened in cache-sized blocks through a reused buffer
  (`parity.devices.widening`). torch's CPU ``_int_mm`` is fast only where oneDNN has VNNI int8 instructions:
  on an AVX2 CPU without them (AMD Zen 3) it ran at 3.5-4.2 GOP/s, 30x below the fp32 GEMM (docs/benchmarks.md,
  "Low-precision weights on the CPU"), so on the CPU `kernel_for` picks among them and
  ``"native"`` by timing them once per row regime (`cpu_gemm_kernel`);
- ``"reduction"``: the exact integer sums as one broadcast-reduce over the weight read as int32 words
  (`exact_int8_sums`): what the compiled step's gathered experts use without the C++ ops;
  as a kernel for whole products it lost to the widened fp32 GEMM at every measured shape (the 129,280 x 256
  head on AMD Zen 3, 1 thread: 16 vs 8 ms at 1 row, 321 vs 17 ms at 8 rows), so `kernel_for` never picks it.
- ``"dequant"``: the int8 values converted to float64 and multiplied (any device but NPU, any shape).

Under torch.compile the ``"fp32_gemm"`` kernel is one opaque op (``torch.ops.parity.exact_int8_gemm``), as the
``"native"`` ones are: traced into the graph, inductor's own int8 -> fp32 conversion is ~5x slower than ATen's
on AVX2 (partial vector loads through a memcpy), so the graph calls the eager chunked GEMM instead.

Every kernel gives the same exact integer sums, so all of them agree after the rescale.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import torch

from parity.devices import native_kernels, widening
from parity.devices.core import _load_torch_npu, materialized

log = logging.getLogger("parity.devices")

KERNELS = ("npu_quant_matmul", "native", "int_mm", "fp32_gemm", "reduction", "dequant")
#: Largest magnitude of a symmetric int8 value (quantized activations and weights: |q| <= 127).
INT8_MAX = 127
#: Largest |product| of two int8 values, -128 included (a weight read from a file is not range-checked).
_MAX_PRODUCT = 128 * 128
#: Longest run of int8 x int8 products an fp32 sum holds exactly: every partial sum is an integer of
#: magnitude <= K * 128**2 <= 2**24 (fp32's 24-bit significand) for K <= 1024, the run length used.
EXACT_FP32_RUN = 1024
#: Most activation rows of a decode-sized product: `cpu_gemm_kernel` picks a kernel for products of at most
#: this many rows and one for larger ones (decode buckets go up to 16 sequences; not a model constant).
DECODE_ROWS = 16
#: The products `cpu_gemm_kernel` times the CPU kernels on, [M, K] x [K, N] per row regime: a decode step's
#: projection at batch 8 and a prefill chunk's (probe shapes, not model constants).
PROBE_SHAPES = {"decode": (8, 256, 1024), "prefill": (64, 256, 512)}
#: dtype of the rescale on the int_mm / dequant paths: the exact int32 sums times both fp32 scales in float64,
#: rounded once to the output dtype (so the result is the correctly rounded dequantized product).
_RESCALE = torch.float64

_cpu_choice: dict[str, str] = {}  # `cpu_gemm_kernel`'s timed pick per row regime, once per process
_cpu_choice_lock = threading.Lock()


def _regime(m: int) -> str:
    return "decode" if m <= DECODE_ROWS else "prefill"


def cpu_gemm_kernel(m: int = DECODE_ROWS) -> str:
    """``"native"``, ``"int_mm"`` or ``"fp32_gemm"``: the fastest on this CPU at the current thread count for
    products of m rows, timed once per process on `PROBE_SHAPES` (both regimes at the first call; the kernels
    interleaved, best of 5 calls each, ~5-50 ms in all; all give identical results, so the choice never
    changes a value) and logged. ``"native"`` competes where `parity.devices.native_kernels` builds (the first
    call on a machine may build it). Called outside compiled regions (a compiled step reads the picks:
    `parity.model.decode_graph` times them before compiling)."""
    with _cpu_choice_lock:
        if not _cpu_choice:
            native = native_kernels.load()
            for regime, shape in PROBE_SHAPES.items():
                _cpu_choice[regime] = _time_cpu_kernels(regime, shape, native)
    return _cpu_choice[_regime(m)]


def _time_cpu_kernels(regime: str, shape: tuple[int, int, int], native: bool) -> str:
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-INT8_MAX, INT8_MAX + 1, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-INT8_MAX, INT8_MAX + 1, (n, k), generator=g, dtype=torch.int8)
    kernels = {"int_mm": lambda: torch._int_mm(xq, wq.t()), "fp32_gemm": lambda: exact_int8_gemm(xq, wq)}
    if native:
        kernels["native"] = lambda: native_kernels.int8_gemm(xq, wq)
    best = {name: float("inf") for name in kernels}
    for fn in kernels.values():
        fn()
    for _ in range(5):  # A B A B: a burst of other work slows all
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    choice = min(best, key=best.get)
    timings = ", ".join(f"{name} {t * 1e3:.3f} ms" for name, t in best.items())
    log.info("INT8 GEMM on the CPU, %s [%d, %d] x [%d, %d]: %s -> %s", regime, m, k, k, n, timings, choice)
    return choice


def gathered_int8_kernel(device: torch.device) -> str:
    """Kernel of the compiled step's gathered int8 routed experts on `device`: ``"native"``
    (`parity.devices.native_kernels.int8_gathered_gemv`, each row's expert read in place) on a CPU where the
    C++ ops load, else ``"reduction"`` (the gathered weights read as int32 words, `exact_int8_sums`)."""
    return "native" if device.type == "cpu" and native_kernels.available() else "reduction"


def kernel_for(device: torch.device, m: int, k: int, n: int) -> str:
    """Name of the INT8 GEMM used for an [m, k] x [k, n] product on `device` (see module docstring)."""
    if device.type == "npu" and _load_torch_npu() and hasattr(torch.ops, "npu"):
        return "npu_quant_matmul"
    if device.type == "cpu":
        if torch.compiler.is_compiling():
            # no timing while tracing: the pick timed before compiling (`parity.model.decode_graph` makes it);
            # the precision was checked when the eager pick was made
            return _cpu_choice.get(_regime(m), "int_mm")
        choice = cpu_gemm_kernel(m)
        if choice == "fp32_gemm" and not _full_precision_fp32_gemm():
            return "int_mm"  # a reduced-precision fp32 GEMM (bf16 / TF32 math) would round the integer sums
        return choice
    if device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        return "int_mm"
    return "dequant"


def _full_precision_fp32_gemm() -> bool:
    """Whether fp32 matmuls run in full fp32 (torch's global setting; a per-backend setting in torch's newer
    precision API makes the global query raise: then not assumed)."""
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        return False


def exact_int8_gemm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 xq [M, K] x int8 wq [N, K] (|values| <= 127, -128 weights included) -> the exact integer sums
    [M, N] (fp32 for K <= `EXACT_FP32_RUN`, else float64) through the fp32 GEMM (the ``"fp32_gemm"``
    kernel): each run of at most `EXACT_FP32_RUN` columns is one GEMM whose partial sums are integers below
    2**24 (exact in fp32 in any order, as BLAS blocks them), the runs added in float64; the weight is widened
    at most `parity.devices.widening.WIDEN_BLOCK_ELEMS` elements at a time, through a reused buffer."""
    M, K = xq.shape
    N = wq.shape[0]
    sums_dtype = _sums_dtype(K)
    runs = [(0, K)]
    if sums_dtype == torch.float64:  # runs of EXACT_FP32_RUN, each exact in fp32, added in float64
        runs = [(r, min(r + EXACT_FP32_RUN, K)) for r in range(0, K, EXACT_FP32_RUN)]
    xf = xq.float()
    if len(runs) == 1 and N * K <= widening.WIDEN_BLOCK_ELEMS:  # one block: no output slices (a decode projection)
        w = widening.scratch(N * K, torch.float32, wq.device).view(N, K)
        w.copy_(wq)
        return xf @ w.t()
    out = torch.empty((M, N), dtype=sums_dtype, device=xq.device)
    for i, (a, b) in enumerate(runs):
        xr = xf[:, a:b]
        for n0, block in widening.widened_blocks(wq[:, a:b], torch.float32):
            part = xr @ block.t()
            if i == 0:
                out[:, n0 : n0 + block.shape[0]] = part
            else:
                out[:, n0 : n0 + block.shape[0]] += part  # exact: integers far below 2**53 in float64
    return out


def _sums_dtype(k: int) -> torch.dtype:
    """dtype of `exact_int8_gemm`'s sums over K = k: fp32 while one run holds them exactly, else float64."""
    return torch.float32 if k * _MAX_PRODUCT <= 2**24 else torch.float64


@torch.library.custom_op("parity::exact_int8_gemm", mutates_args=())
def _exact_int8_gemm_op(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """`exact_int8_gemm` as one op of a compiled graph (``torch.ops.parity.exact_int8_gemm``): xq int8 [M, K],
    wq int8 [N, K] -> [M, N] (fp32, or float64 for K > `EXACT_FP32_RUN`). Opaque to inductor, so the weight is
    widened by ATen's conversion in cache-sized chunks, not by inductor's generated loads."""
    return exact_int8_gemm(xq, wq)


@_exact_int8_gemm_op.register_fake
def _(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=_sums_dtype(xq.shape[1]))


def int8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    kernel: str | None = None,
) -> torch.Tensor:
    """Quantized linear: int8 xq [M, K] (per-row scale x_scale fp32 [M]) x int8 wq [N, K] (per-row
    scale w_scale fp32 [N]) -> [M, N] in `out_dtype`.

    Args:
        kernel: force one of `KERNELS` (tests); None = `kernel_for`.
    Raises:
        ValueError: unknown kernel name.
    """
    m, k = xq.shape
    n = wq.shape[0]
    kernel = kernel or kernel_for(xq.device, m, k, n)
    if kernel == "npu_quant_matmul":
        import torch_npu

        return torch_npu.npu_quant_matmul(xq, wq.t(), w_scale, pertoken_scale=x_scale, output_dtype=out_dtype)
    if kernel == "native":
        if out_dtype == torch.float32 and x_scale.dtype == w_scale.dtype == torch.float32:
            return native_kernels.int8_linear(xq, x_scale, wq, w_scale)  # the same rescale, done as stored
        acc = native_kernels.int8_gemm(xq, wq)
    elif kernel == "int_mm":
        acc = torch._int_mm(xq, wq.t())
    elif kernel == "fp32_gemm":
        # the op while tracing (opaque to inductor); eager, the function itself (no dispatcher round trip)
        acc = torch.ops.parity.exact_int8_gemm(xq, wq) if torch.compiler.is_compiling() else exact_int8_gemm(xq, wq)
    elif kernel == "reduction":
        acc = exact_int8_sums(int8_words(wq)[:, None, :], xq[None, :, :]).t()
    elif kernel == "dequant":
        acc = xq.to(_RESCALE) @ wq.to(_RESCALE).t()  # integer-valued and exact in float64 (K * 127**2 < 2**53)
    else:
        raise ValueError(f"unknown INT8 GEMM kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    return rescale_sums(acc, x_scale, w_scale[None, :], out_dtype)


def exact_int8_sums(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum(w * x, -1)`` of int8 values (|value| <= 127) as exact integers, like ``torch._int_mm``'s int32
    sums: w the weight, int8 [..., K] or its int32 words [..., K/4] (`int8_words`), x int8 [..., K]
    broadcast against it. Products and sums in fp32 over runs of at most `EXACT_FP32_RUN` (K <= 1040, or K a
    multiple of it with the run sums added in float64: exact), else in int32 (exact for K < 133,000; ~6x
    slower in inductor's CPU reductions, measured at [16, 512, 256]).

    Words are read 4 bytes at a time and each byte sign-extended by shifts: inductor's CPU code loads int8 in
    partial vectors of the fp32 lane count, which on AVX2 go through a memcpy per load (the 129,280 x 256
    head at 1 row: 50 ms as int8, 17 ms as words; docs/benchmarks.md, "Low-precision weights on the CPU").
    Returns fp32, float64 or int32 (integer values either way)."""
    if w.dtype == torch.int32:
        K = 4 * w.shape[-1]
        if K * _MAX_PRODUCT > 2**24 and K % EXACT_FP32_RUN:
            w = w.view(torch.int8)  # the int32 sums below
        else:
            # byte j of each (little-endian) word is element 4i + j: x split by j ([..., 4, K/4]) and stored
            # once, so each of the 4 products loads whole vectors of x (not 4-strided bytes, one at a time)
            xf = materialized(x.float().unflatten(-1, (K // 4, 4)).transpose(-1, -2).contiguous())
            prod = sum(((w << (24 - 8 * j)) >> 24).float() * xf[..., j, :] for j in range(4))  # [..., K/4]
            if K * _MAX_PRODUCT <= 2**24:
                return prod.sum(-1)
            return prod.unflatten(-1, (K // EXACT_FP32_RUN, EXACT_FP32_RUN // 4)).sum(-1).double().sum(-1)
    K = w.shape[-1]
    if K * _MAX_PRODUCT <= 2**24:
        return (w.float() * x.float()).sum(-1)
    if K % EXACT_FP32_RUN == 0:
        prod = w.float() * x.float()
        return prod.unflatten(-1, (K // EXACT_FP32_RUN, EXACT_FP32_RUN)).sum(-1).double().sum(-1)
    return (w.to(torch.int32) * x.to(torch.int32)).sum(-1, dtype=torch.int32)


def int8_words(w: torch.Tensor) -> torch.Tensor:
    """int8 w [..., K] viewed as int32 words [..., K/4] (4 elements each, the form `exact_int8_sums` reads
    fastest) where K % 4 == 0, w is contiguous and 4-byte aligned on a little-endian machine; else w itself.
    Inside a compiled region the alignment is not checked (reading the storage offset would break the graph):
    there w must be a stored weight or a slice of whole rows of one (a view at another offset fails to trace)."""
    ok = w.dtype == torch.int8 and w.shape[-1] % 4 == 0 and w.is_contiguous() and sys.byteorder == "little"
    if ok and (torch.compiler.is_compiling() or w.storage_offset() % 4 == 0):
        return w.view(torch.int32)
    return w


def rescale_sums(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype):
    """The exact integer sums acc [M, N] (int32, or integer-valued fp32 / float64) times the row scale
    x_scale [M] and the column scale w_scale (broadcast against acc: [1, N] or [M, N]), in float64 and
    rounded once to `out_dtype` -> [M, N]."""
    return (acc.to(_RESCALE) * x_scale.to(_RESCALE)[:, None] * w_scale.to(_RESCALE)).to(out_dtype)
