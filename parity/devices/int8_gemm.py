"""The INT8 GEMM of each device: int8 activations x int8 weights, int32 accumulation, fp32 rescale.

`int8_linear(xq, x_scale, wq, w_scale, out_dtype)` computes ``(xq @ wq^T) * x_scale[:, None] * w_scale``
with the best kernel the device offers, chosen by `kernel_for`:

- ``"npu_quant_matmul"``: Ascend, `torch_npu.npu_quant_matmul` (int8 x int8 with per-channel weight
  scale and per-token activation scale fused), the kernel vllm-ascend's W8A8_DYNAMIC linear calls;
- ``"int_mm"``: `torch._int_mm` (CPU: any shape; CUDA: needs M > 16 and K, N multiples of 8, PyTorch
  ``_int_mm`` docs), then the two scales applied in float64 and rounded once;
- ``"dequant"``: the int8 values converted to float64 and multiplied (any device but NPU, any shape).
"""

from __future__ import annotations

import torch

from parity.devices.core import _load_torch_npu

KERNELS = ("npu_quant_matmul", "int_mm", "dequant")
#: dtype of the rescale on the int_mm / dequant paths: the exact int32 sums times both fp32 scales in float64,
#: rounded once to the output dtype (so the result is the correctly rounded dequantized product).
_RESCALE = torch.float64


def kernel_for(device: torch.device, m: int, k: int, n: int) -> str:
    """Name of the INT8 GEMM used for an [m, k] x [k, n] product on `device` (see module docstring)."""
    if device.type == "npu" and _load_torch_npu() and hasattr(torch.ops, "npu"):
        return "npu_quant_matmul"
    if device.type == "cpu":
        return "int_mm"
    if device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        return "int_mm"
    return "dequant"


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
    if kernel == "int_mm":
        acc = torch._int_mm(xq, wq.t())
    elif kernel == "dequant":
        acc = xq.to(_RESCALE) @ wq.to(_RESCALE).t()  # integer-valued and exact in float64 (K * 127**2 < 2**53)
    else:
        raise ValueError(f"unknown INT8 GEMM kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    return rescale_sums(acc, x_scale, w_scale[None, :], out_dtype)


def rescale_sums(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype):
    """The exact integer sums acc [M, N] (int32, or integer-valued fp32 / float64) times the row scale
    x_scale [M] and the column scale w_scale (broadcast against acc: [1, N] or [M, N]), in float64 and
    rounded once to `out_dtype` -> [M, N]."""
    return (acc.to(_RESCALE) * x_scale.to(_RESCALE)[:, None] * w_scale.to(_RESCALE)).to(out_dtype)
