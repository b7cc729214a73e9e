"""INT8-activation quantized modules (msModelSlim W8A8_DYNAMIC / W4A8_DYNAMIC): weights stay int8 / int4.

Scheme (msModelSlim ``W8A8_DYNAMIC``, as vllm-ascend's ``AscendW8A8DynamicLinearMethod`` runs it):
weights symmetric int8 per output channel (``weight`` int8 [out, in], ``weight_scale`` [out, 1],
``weight_offset`` [out, 1] = 0); activations quantized at run time per token (row) to int8 with
scale ``amax / 127``; the product accumulates in int32 and is rescaled by both scales
(`parity.devices.int8_gemm.int8_linear`). ``W4A8_DYNAMIC`` routed experts: the same with int4 weights
(values -8..7, per-channel scale), packed two per byte along the output dimension (byte r of a
[out/2, in] tensor holds rows 2r in its low and 2r+1 in its high nibble, two's complement).

- `Int8Linear` replaces ``nn.Linear`` (``forward(x[..., in]) -> [..., out]``) and provides
  ``grouped_forward`` for the grouped output projection ``o_a_proj`` (each group's input rows are
  quantized per token on their own).
- `Int8Experts` replaces `parity.model.layers.Experts` (same forward contract); ``bits`` = 8 or 4.
"""

from __future__ import annotations

import torch
from torch import nn

from parity.devices import native_kernels
from parity.devices.core import materialized
from parity.devices.int8_gemm import (
    INT8_MAX,
    exact_int8_sums,
    gathered_int8_kernel,
    int8_linear,
    int8_words,
    rescale_sums,
)
from parity.model.layers import swiglu

INT4_MIN, INT4_MAX = -8, 7
#: amax floor of the per-token activation scale, so an all-zero row gets a finite scale and quantizes to
#: zeros (a numerical guard, not a format constant).
ACT_AMAX_FLOOR = 1e-12


def quantize_act_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization per row: x [M, K] -> (q int8 [M, K], scale fp32 [M]),
    ``scale = max(amax, floor) / 127``, ``q = round_half_even(x / scale)`` (msModelSlim W8A8_DYNAMIC;
    torch_npu ``npu_dynamic_quant``)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(ACT_AMAX_FLOOR) / INT8_MAX
    q = torch.round(xf / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    # stored once in a compiled step: the GEMVs that read it would otherwise requantize it per output row
    return materialized(q), scale


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """x rounded through `quantize_act_per_token` and back (fp32): the activation a W8A8 GEMM sees."""
    q, s = quantize_act_per_token(x)
    return q.float() * s[..., None]


def quantize_weight_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: w [..., out, in] -> (q int8 [..., out, in], scale fp32
    [..., out]); int8: ``scale = amax / 127``, values in [-127, 127]; int4: ``scale = amax / 7``, values
    in [-8, 7]. An all-zero row gets scale 1.

    Raises:
        ValueError: bits not 4 or 8.
    """
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits}")
    qmax = INT8_MAX if bits == 8 else INT4_MAX
    qmin = -INT8_MAX if bits == 8 else INT4_MIN
    wf = w.float()
    amax = wf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(wf / scale[..., None]).clamp(qmin, qmax).to(torch.int8)
    return q, scale


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int4 values (int8 in [-8, 7]) [..., out, in], out even -> packed int8 [..., out/2, in]
    (row 2r in the low nibble, 2r+1 in the high nibble).

    Raises:
        ValueError: odd number of rows.
    """
    if q.shape[-2] % 2:
        raise ValueError(f"int4 packing along the output dimension needs an even row count, got {q.shape[-2]}")
    u = q.to(torch.int32) & 0xF
    lo, hi = u[..., 0::2, :], u[..., 1::2, :]
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4_rows(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: packed int8 [..., out/2, in] -> int8 values [..., out, in]."""
    b = p.view(torch.uint8).to(torch.int32)
    lo, hi = b & 0xF, b >> 4
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack((lo, hi), dim=-2).flatten(-3, -2).to(torch.int8)


def exact_int8_rows(wq: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Per row n: the int8 matrix wq[n] [N, M, K] times the int8 vector xq[n] [N, K] -> [N, M], the exact
    integer dot products (`parity.devices.int8_gemm.exact_int8_sums`; integer values in fp32, float64 or
    int32); wq may also be its int32 words [N, M, K/4] (`parity.devices.int8_gemm.int8_words`)."""
    return exact_int8_sums(wq, xq[:, None, :])


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] x int8 wq [N, K] (per-row scale [N]) with per-token int8 activations -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_act_per_token(x2)
    return int8_linear(xq, xs, wq, w_scale, x.dtype).reshape(*shape[:-1], wq.shape[0])


class Int8Linear(nn.Module):
    """A bias-free W8A8 linear: int8 weight per output channel, dynamic per-token int8 activations.

    Buffers (msModelSlim names): ``weight`` int8 [out, in]; ``weight_scale`` fp32 [out];
    ``weight_offset`` fp32 [out] (zero: symmetric). forward(x[..., in]) -> [..., out] in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_offset", torch.zeros(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Linear:
        """Quantize a float weight [out, in] per output channel (conversion, tests, exporters)."""
        m = cls(w.shape[1], w.shape[0], device=w.device)
        q, s = quantize_weight_per_channel(w, 8)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        m.weight_offset.zero_()
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 per-channel / per-token"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as ``weight * weight_scale`` in `dtype`."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.weight, self.weight_scale)

    def grouped_forward(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped projection: o [T, G, in_g] -> [T, G, r], group g using weight rows [g*r, (g+1)*r)."""
        g = o.shape[1]
        r = self.out_features // g
        return torch.stack(
            [
                w8a8_linear(o[:, i], self.weight[i * r : (i + 1) * r], self.weight_scale[i * r : (i + 1) * r])
                for i in range(g)
            ],
            dim=1,
        )

    def weight_nbytes(self) -> int:
        """Bytes held by the int8 weight and its scales/offsets."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Experts(nn.Module):
    """Routed experts with int8 (``bits=8``, W8A8_DYNAMIC) or packed int4 (``bits=4``, W4A8_DYNAMIC)
    per-channel weights and dynamic per-token int8 activations.

    Buffers: ``gate_up_weight`` int8 [E, 2I, H] (int4: [E, I, H] packed), ``gate_up_scale`` fp32 [E, 2I],
    ``down_weight`` int8 [E, H, I] (int4: [E, H/2, I]), ``down_scale`` fp32 [E, H]; ``gate_up`` rows are
    the experts' ``w1`` (gate, rows [:I]) then ``w3`` (up, rows [I:]).

    forward(hidden[T, H], expert_ids[T, k], weights[T, k]) -> [T, H] fp32, the contract and math of
    `parity.model.layers.Experts` (SwiGLU with clamp ``limit``, routing weight applied before
    ``down``) with both GEMMs of each used expert in W8A8; int4 experts are unpacked one at a time.
    """

    def __init__(self, n_experts: int, hidden: int, inter: int, limit: float, bits: int = 8, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"expert weight bits must be 4 or 8, got {bits}")
        self.n_experts, self.hidden, self.inter, self.limit, self.bits = n_experts, hidden, inter, limit, bits
        div = 2 if bits == 4 else 1
        i8, f32 = torch.int8, torch.float32
        self.register_buffer(
            "gate_up_weight", torch.empty(n_experts, 2 * inter // div, hidden, dtype=i8, device=device)
        )
        self.register_buffer("gate_up_scale", torch.empty(n_experts, 2 * inter, dtype=f32, device=device))
        self.register_buffer("down_weight", torch.empty(n_experts, hidden // div, inter, dtype=i8, device=device))
        self.register_buffer("down_scale", torch.empty(n_experts, hidden, dtype=f32, device=device))

    @classmethod
    def from_float(cls, gate_up: torch.Tensor, down: torch.Tensor, limit: float, bits: int = 8) -> Int8Experts:
        """Quantize float stacks gate_up [E, 2I, H], down [E, H, I] per output channel."""
        e, two_i, h = gate_up.shape
        m = cls(e, h, two_i // 2, limit, bits, device=gate_up.device)
        m.load_float(gate_up, down)
        return m

    def load_float(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantize float stacks into this module's buffers (the expert count and sizes must match)."""
        inter = self.inter
        for name, w in (("gate_up", gate_up), ("down", down)):
            if self.bits == 4 and name == "gate_up":  # pack w1 and w3 separately, as their files hold them
                q1, s1 = quantize_weight_per_channel(w[:, :inter], 4)
                q3, s3 = quantize_weight_per_channel(w[:, inter:], 4)
                q, s = torch.cat([pack_int4_rows(q1), pack_int4_rows(q3)], 1), torch.cat([s1, s3], 1)
            else:
                q, s = quantize_weight_per_channel(w, self.bits)
                if self.bits == 4:
                    q = pack_int4_rows(q)
            getattr(self, f"{name}_weight").copy_(q)
            getattr(self, f"{name}_scale").copy_(s)

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, "
            f"w{self.bits}a8 per-channel / per-token"
        )

    def expert_int8(self, e) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 values of expert `e` (an int: gate_up [2I, H], down [H, I]; a LongTensor[N] of expert ids:
        the gathered [N, 2I, H], [N, H, I]); int4 experts unpacked."""
        gu, dn = self.gate_up_weight[e], self.down_weight[e]
        if self.bits == 4:
            half = self.inter // 2
            gu = torch.cat([unpack_int4_rows(gu[..., :half, :]), unpack_int4_rows(gu[..., half:, :])], -2)
            dn = unpack_int4_rows(dn)
        return gu, dn

    def expert_weights(self, e: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (gate_up [2I, H], down [H, I]) of expert `e` in `dtype`."""
        gu, dn = self.expert_int8(e)
        return (
            (gu.float() * self.gate_up_scale[e][:, None]).to(dtype),
            (dn.float() * self.down_scale[e][:, None]).to(dtype),
        )

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.n_experts).tolist()
        tok_sorted = order // expert_ids.shape[1]
        w_sorted = weights.reshape(-1).index_select(0, order)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        inter, start = self.inter, 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            tok = tok_sorted[start : start + c]
            gu_q, dn_q = self.expert_int8(e)
            gu = w8a8_linear(hidden[tok], gu_q, self.gate_up_scale[e])
            h = swiglu(gu[:, :inter], gu[:, inter:], self.limit) * w_sorted[start : start + c, None]
            out.index_add_(0, tok, w8a8_linear(h.to(hidden.dtype), dn_q, self.down_scale[e]).float())
            start += c
        return out

    def gathered_forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` for few tokens without host syncs (the compiled decode step): each (token, picked
        expert) pair multiplies the int8 values of its expert with exact integer sums (as ``torch._int_mm``'s:
        on a CPU with the C++ ops each expert read in place, `parity.devices.native_kernels.int8_gathered_gemv`;
        else the gathered values, `exact_int8_rows`), then the same per-token / per-channel float64 rescale; only
        the sum over a token's k experts runs in another order. hidden [T, H], expert_ids [T, k], weights
        [T, k] -> [T, H] fp32."""
        T, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        native = self.bits == 8 and gathered_int8_kernel(hidden.device) == "native"
        if native:  # each row's expert read in place by the C++ op: nothing gathered
            gu_q, dn_q = self.gate_up_weight, self.down_weight
        elif self.bits == 8:  # gathered as int32 words: read 4 bytes at a time in the graph's reductions
            gu_q, dn_q = int8_words(self.gate_up_weight)[flat], int8_words(self.down_weight)[flat]
        else:
            gu_q, dn_q = self.expert_int8(flat)  # [T*k, 2I, H], [T*k, H, I]

        def sums(w, xq):  # [T*k, N]: exact integer sums of each pair's row with its expert's matrix
            return native_kernels.int8_gathered_gemv(xq, w, flat) if native else exact_int8_rows(w, xq)

        fused = native and hidden.dtype == self.gate_up_scale.dtype == self.down_scale.dtype == torch.float32

        def linear(w, xq, xs, w_scale):  # [T*k, N] in hidden's dtype: the sums rescaled in float64
            if fused:  # the C++ op rescales as it stores (bit-identical to rescale_sums to fp32)
                return native_kernels.int8_gathered_linear(xq, xs, w, w_scale, flat)
            return rescale_sums(sums(w, xq), xs, w_scale[flat], hidden.dtype)

        xq, xs = quantize_act_per_token(hidden)  # per token, so each pair's row quantizes as in `forward`
        xq = xq[:, None, :].expand(T, k, -1).reshape(T * k, -1)
        xs = xs[:, None].expand(T, k).reshape(-1)
        gu = linear(gu_q, xq, xs, self.gate_up_scale)
        inter = self.inter
        h = (swiglu(gu[:, :inter], gu[:, inter:], self.limit) * weights.reshape(-1)[:, None]).to(hidden.dtype)
        hq, hs = quantize_act_per_token(h)
        y = linear(dn_q, hq, hs, self.down_scale).float()
        return y.view(T, k, -1).sum(1)

    def weight_nbytes(self) -> int:
        """Bytes held by the int8 / packed int4 weights and their scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def int8_nbytes(model: nn.Module) -> int:
    """Bytes of all `Int8Linear` / `Int8Experts` weights and scales in `model`."""
    return sum(m.weight_nbytes() for m in model.modules() if isinstance(m, (Int8Linear, Int8Experts)))


__all__ = [
    "Int8Linear",
    "Int8Experts",
    "quantize_act_per_token",
    "fake_quant_act",
    "quantize_weight_per_channel",
    "pack_int4_rows",
    "unpack_int4_rows",
    "w8a8_linear",
    "exact_int8_rows",
    "int8_nbytes",
]
