"""Quantized weight modules for the published DeepSeek-V4 layout: FP8 linears and FP4 routed experts.

The weights stay in their checkpoint format in memory (FP8 e4m3 + UE8M0 128x128 tile scales; packed
FP4 e2m1 + UE8M0 1x32 scales) and are dequantized on the fly, a block of rows at a time, inside
``forward``; the high-precision matrix never exists as a whole (an FP8 linear dequantizes at most
`DEQUANT_CHUNK_ELEMS` weights at once, the FP4 experts one used expert at a time).

- `QuantLinear` replaces a plain ``nn.Linear`` (same ``forward(x[..., in]) -> [..., out]``).
  Where `parity.devices.has_fp8` says the device has native FP8 matmuls, ``forward`` instead quantizes
  the activations per 1x128 block with power-of-two scales and accumulates FP8 GEMMs per 128-wide
  K block (`torch._scaled_mm`, row-wise scales) -- the scheme of DeepSeek's ``kernel.py`` ``fp8_gemm``
  (activation ``act_quant(x, 128, scale_fmt)`` x block-scaled weight).
- `quantize_linear_` turns a *subclass* of ``nn.Linear`` with its own ``forward`` (e.g. the grouped
  output projection ``o_a_proj``) into a quantized one by re-classing it: its ``weight`` becomes a
  property that dequantizes on access, so the subclass's own math is kept.
- `FP4Experts` replaces `parity.model.layers.Experts` with the same
  ``forward(hidden[T, H], expert_ids[T, k], weights[T, k]) -> [T, H] fp32`` and dequantizes only the
  experts that some token was routed to.

Codecs live in `parity.model.fp_formats`; layout facts (names, shapes, dtypes) in
`parity.checkpoint.layout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity.model import fp_formats as ff
from parity.model.layers import Experts

#: Largest number of weight elements an FP8 linear dequantizes at once on the fallback path
#: (16 Mi elements = 64 MiB in fp32); chosen to bound transient memory, not a format constant.
DEQUANT_CHUNK_ELEMS = 1 << 24


def _n_blocks(n: int, b: int) -> int:
    return -(-n // b)


class _FP8WeightMixin:
    """Shared storage + dequantization of an FP8 block-quantized ``[out, in]`` weight.

    Buffers: ``qweight`` float8_e4m3fn [out, in]; ``scale`` UE8M0 (float8_e8m0fnu)
    [ceil(out/128), ceil(in/128)] (release names ``<module>.weight`` / ``<module>.scale``); both uint8
    (the same bytes) where float8 tensors are forbidden (`fp_formats.float8_tensors`).
    """

    block: tuple[int, int]
    compute_dtype: torch.dtype

    def _init_fp8_storage(
        self,
        out_features: int,
        in_features: int,
        block: tuple[int, int],
        device: torch.device | str | None,
        compute_dtype: torch.dtype,
    ) -> None:
        self.block = (int(block[0]), int(block[1]))
        self.compute_dtype = compute_dtype
        self.native_fp8 = False
        self.register_buffer(
            "qweight", torch.empty(out_features, in_features, dtype=ff.fp8_storage_dtype(), device=device)
        )
        self.register_buffer(
            "scale",
            torch.empty(
                _n_blocks(out_features, self.block[0]),
                _n_blocks(in_features, self.block[1]),
                dtype=ff.scale_dtype(),
                device=device,
            ),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in ``compute_dtype`` (built on each access)."""
        return ff.dequantize_fp8_weight(self.qweight, self.scale, self.block, self.compute_dtype)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [r0, r1) of the weight, dequantized to `dtype`; r0 must be a multiple of block[0]."""
        br = self.block[0]
        s = self.scale[r0 // br : _n_blocks(r1, br)]
        return ff.dequantize_fp8_weight(self.qweight[r0:r1], s, self.block, dtype)

    def weight_nbytes(self) -> int:
        """Bytes held by the quantized weight and its scales."""
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()


class QuantLinear(_FP8WeightMixin, nn.Module):
    """A bias-free linear layer with an FP8 e4m3 weight and UE8M0 128x128 block scales.

    forward(x[..., in_features]) -> [..., out_features] in x's dtype. Fallback path: dequantize
    ``DEQUANT_CHUNK_ELEMS``-sized row blocks to x's dtype and ``F.linear`` (exact w.r.t. the
    dequantized weight). Native path (``native_fp8=True``, set by the loader where
    `parity.devices.has_fp8`): FP8 activations x FP8 weights, fp32 accumulation.

    Args:
        in_features, out_features: sizes (elements).
        block: scale tile (rows, cols); the release uses (128, 128) (config.json weight_block_size).
        device: where the buffers live. compute_dtype: dtype of `weight` (the property).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int] = ff.FP8_WEIGHT_BLOCK,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_fp8_storage(out_features, in_features, block, device, compute_dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, block: tuple[int, int] = ff.FP8_WEIGHT_BLOCK) -> QuantLinear:
        """Quantize a float weight [out, in] (tests, exporters)."""
        q, s = ff.quantize_fp8_weight(weight, block)
        m = cls(
            weight.shape[1],
            weight.shape[0],
            block,
            weight.device,
            weight.dtype if weight.is_floating_point() else torch.float32,
        )
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3, block={self.block}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_fp8 and x.device.type != "cpu":
            try:
                return _fp8_native_linear(x, self.qweight, self.scale, self.block)
            except (RuntimeError, NotImplementedError, ValueError):
                self.native_fp8 = False  # shape/dtype the kernel refuses: dequantize from now on
        n, k = self.out_features, self.in_features
        br = self.block[0]
        rows = max(br, (DEQUANT_CHUNK_ELEMS // max(k, 1)) // br * br)
        if rows >= n:
            return F.linear(x, ff.dequantize_fp8_weight(self.qweight, self.scale, self.block, x.dtype))
        outs = [F.linear(x, self.dequantize_rows(r0, min(r0 + rows, n), x.dtype)) for r0 in range(0, n, rows)]
        return torch.cat(outs, dim=-1)


def _fp8_native_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """x[..., K] @ dequant(qweight)[N, K]^T with FP8 GEMMs: activations quantized per 1 x block[1]
    with UE8M0 scales (DeepSeek kernel.py act_quant), one `torch._scaled_mm` per K block with row-wise
    scales (activation scale per row, weight scale per output column), accumulated in fp32.

    Raises:
        ValueError: in_features not a multiple of block[1] or out_features not a multiple of 16 (the
            kernel's alignment); RuntimeError from torch where the device refuses (caller falls back).
    """
    br, bc = block
    n, k = qweight.shape
    if k % bc or n % 16:
        raise ValueError("native FP8 path needs in_features % block == 0 and out_features % 16 == 0")
    shape = x.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    xq, xs = ff.quantize_fp8_lastdim(x2, bc)
    xs = ff.ue8m0_decode(xs)  # [M, K/bc]
    ws = ff.ue8m0_decode(scale).repeat_interleave(br, dim=0)[:n]  # [N, K/bc]
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for j in range(k // bc):
        a = xq[:, j * bc : (j + 1) * bc].contiguous()
        b = qweight[:, j * bc : (j + 1) * bc].contiguous().t()
        # row-wise scaled FP8 GEMM; bf16 output is what every FP8-capable cuBLAS path accepts
        out += torch._scaled_mm(
            a,
            b,
            scale_a=xs[:, j : j + 1].contiguous(),
            scale_b=ws[:, j].reshape(1, n).contiguous(),
            out_dtype=torch.bfloat16,
        ).float()
    return out.to(x.dtype).reshape(*shape[:-1], n)


_QUANT_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    """A subclass of `cls` (an nn.Linear subclass with its own forward) whose weight is FP8."""
    if cls not in _QUANT_CLASSES:
        _QUANT_CLASSES[cls] = type(f"FP8{cls.__name__}", (_FP8WeightMixin, cls), {"__module__": __name__})
    return _QUANT_CLASSES[cls]


def quantize_linear_(
    module: nn.Linear,
    block: tuple[int, int] = ff.FP8_WEIGHT_BLOCK,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An FP8 replacement for `module` with empty ``qweight``/``scale`` buffers on `device`.

    A plain ``nn.Linear`` becomes a new `QuantLinear`; a subclass with its own ``forward`` is re-classed
    in place (its float ``weight`` parameter is dropped and ``weight`` becomes a dequantizing property),
    so custom math such as a grouped projection keeps working. Returns the module to install.

    Raises:
        ValueError: the module has a bias (the release's linears have none).
    """
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"cannot quantize {type(module).__name__} with a bias: DeepSeek-V4 linears have none")
    out_f, in_f = module.out_features, module.in_features
    if type(module).forward is nn.Linear.forward:
        return QuantLinear(in_f, out_f, block, device, compute_dtype)
    module._parameters.pop("weight", None)
    module.__class__ = _quantized_class(type(module))
    module._init_fp8_storage(out_f, in_f, block, device, compute_dtype)
    return module


class FP4Experts(nn.Module):
    """Routed experts with packed FP4 e2m1 weights and UE8M0 1x32 scales (release layout, fused).

    Buffers (release per-expert ``w1``/``w3`` rows stacked like transformers' ``gate_up_proj``):
    ``gate_up_qweight`` uint8 [E, 2I, H/2], ``gate_up_scale`` UE8M0 [E, 2I, H/32],
    ``down_qweight`` uint8 [E, H, I/2], ``down_scale`` UE8M0 [E, H, I/32].

    forward(hidden[T, H], expert_ids[T, k] long, weights[T, k] fp32) -> [T, H] fp32, the same contract
    and math as `parity.model.layers.Experts` (SwiGLU with ``swiglu_limit`` clamp, routing weight
    applied before ``down_proj``); only experts some token uses are dequantized, one at a time, to
    hidden's dtype.

    Raises (constructor):
        ValueError: H or I not a multiple of the block size (32).
    """

    def __init__(
        self,
        n_experts: int,
        hidden: int,
        inter: int,
        limit: float,
        block: int = ff.FP4_WEIGHT_BLOCK,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
            if v % block:
                raise ValueError(f"FP4 experts need {name} ({v}) to be a multiple of the block size {block}")
        self.n_experts, self.hidden, self.inter, self.limit, self.block = n_experts, hidden, inter, limit, block
        self.compute_dtype = compute_dtype
        u8, sd = torch.uint8, ff.scale_dtype()
        self.register_buffer("gate_up_qweight", torch.empty(n_experts, 2 * inter, hidden // 2, dtype=u8, device=device))
        self.register_buffer(
            "gate_up_scale", torch.empty(n_experts, 2 * inter, hidden // block, dtype=sd, device=device)
        )
        self.register_buffer("down_qweight", torch.empty(n_experts, hidden, inter // 2, dtype=u8, device=device))
        self.register_buffer("down_scale", torch.empty(n_experts, hidden, inter // block, dtype=sd, device=device))

    @classmethod
    def from_float(cls, gate_up: torch.Tensor, down: torch.Tensor, limit: float) -> FP4Experts:
        """Quantize float stacks gate_up [E, 2I, H], down [E, H, I] (tests, exporters)."""
        e, two_i, h = gate_up.shape
        m = cls(e, h, two_i // 2, limit, device=gate_up.device)
        for (q, s), (bq, bs) in (
            (ff.quantize_fp4_weight(gate_up), (m.gate_up_qweight, m.gate_up_scale)),
            (ff.quantize_fp4_weight(down), (m.down_qweight, m.down_scale)),
        ):
            bq.copy_(q)
            bs.copy_(s)
        return m

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, fp4_e2m1, block=1x{self.block}"

    def expert_weights(self, e: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up [2I, H], down [H, I]) of expert `e` in `dtype` (default compute_dtype)."""
        dtype = dtype or self.compute_dtype
        gu = ff.dequantize_fp4_weight(self.gate_up_qweight[e], self.gate_up_scale[e], self.block, dtype)
        dn = ff.dequantize_fp4_weight(self.down_qweight[e], self.down_scale[e], self.block, dtype)
        return gu, dn

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """All experts' gate_up [E, 2I, H], dequantized (whole tensor: tests and export only)."""
        return ff.dequantize_fp4_weight(self.gate_up_qweight, self.gate_up_scale, self.block, self.compute_dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        """All experts' down [E, H, I], dequantized (whole tensor: tests and export only)."""
        return ff.dequantize_fp4_weight(self.down_qweight, self.down_scale, self.block, self.compute_dtype)

    def weight_nbytes(self) -> int:
        """Bytes held by the packed weights and scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # the token -> expert dispatch is shared with the plain experts module; only expert_weights differs
    forward = Experts.forward


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of all quantized weights (+ scales) held by `QuantLinear` / FP8 subclasses / `FP4Experts`."""
    return sum(m.weight_nbytes() for m in model.modules() if isinstance(m, (_FP8WeightMixin, FP4Experts)))
