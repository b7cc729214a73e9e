"""QuantLinear (FP8 + 128x128 UE8M0) and FP4Experts (packed e2m1 + 1x32 UE8M0) against float math."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parity.model import fp_formats as ff
from parity.model import quant
from parity.model.quant import FP4Experts, QuantLinear, quantize_linear_


def test_quant_linear_matches_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g) * 0.05
    ql = QuantLinear.from_float(w)
    assert ql.qweight.dtype == torch.float8_e4m3fn and ql.scale.shape == (2, 3)
    x = torch.randn(3, 5, 300, generator=g)
    ref = F.linear(x, ff.dequantize_fp8_weight(ql.qweight, ql.scale))
    torch.testing.assert_close(ql(x), ref, rtol=0, atol=1e-6)
    assert torch.equal(ql.weight, ff.dequantize_fp8_weight(ql.qweight, ql.scale))
    assert ql.weight_nbytes() == 200 * 300 + 6


def test_quant_linear_chunked_path(monkeypatch):
    monkeypatch.setattr(quant, "DEQUANT_CHUNK_ELEMS", 128 * 300)  # force 128-row chunks
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 300, generator=g)
    ql = QuantLinear.from_float(w)
    x = torch.randn(4, 300, generator=g)
    torch.testing.assert_close(ql(x), F.linear(x, ql.weight), rtol=1e-6, atol=1e-5)


class _Grouped(nn.Linear):
    """A grouped projection like o_a_proj: its own forward reads self.weight."""

    def __init__(self, in_per_group, out, groups):
        super().__init__(in_per_group, out, bias=False)
        self.groups = groups

    def forward(self, x):  # x [T, G, in_per_group] -> [T, G, out/G]
        w = self.weight.view(self.groups, -1, x.shape[-1])
        return torch.einsum("tgd,grd->tgr", x, w)


def test_quantize_linear_reclasses_custom_forward():
    g = torch.Generator().manual_seed(3)
    m = _Grouped(64, 32, 2)
    with torch.no_grad():
        m.weight.copy_(torch.randn(32, 64, generator=g))
    q, s = ff.quantize_fp8_weight(m.weight.detach())
    qm = quantize_linear_(m)
    assert qm is m and isinstance(qm, _Grouped) and "weight" not in dict(qm.named_parameters())
    qm.qweight.copy_(q)
    qm.scale.copy_(s)
    x = torch.randn(5, 2, 64, generator=g)
    deq = ff.dequantize_fp8_weight(q, s)
    ref = torch.einsum("tgd,grd->tgr", x, deq.view(2, -1, 64))
    torch.testing.assert_close(qm(x), ref)
    plain = quantize_linear_(nn.Linear(64, 16, bias=False))
    assert isinstance(plain, QuantLinear)
    with pytest.raises(ValueError, match="bias"):
        quantize_linear_(nn.Linear(4, 4, bias=True))


def _experts_ref(gate_up, down, limit, hidden, ids, w):
    from parity.model.layers import swiglu

    out = torch.zeros_like(hidden)
    inter = down.shape[-1]
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j].item()
            gu = gate_up[e] @ hidden[t]
            h = swiglu(gu[:inter], gu[inter:], limit) * w[t, j]
            out[t] += down[e] @ h
    return out


def test_fp4_experts_match_float_math_and_touch_only_used_experts(monkeypatch):
    g = torch.Generator().manual_seed(4)
    e, h, i = 6, 64, 32
    gate_up = torch.randn(e, 2 * i, h, generator=g) * 0.1
    down = torch.randn(e, h, i, generator=g) * 0.1
    m = FP4Experts.from_float(gate_up, down, limit=10.0)
    assert m.gate_up_qweight.shape == (e, 2 * i, h // 2) and m.gate_up_scale.shape == (e, 2 * i, h // 32)
    assert m.down_qweight.shape == (e, h, i // 2) and m.down_scale.shape == (e, h, i // 32)
    hidden = torch.randn(7, h, generator=g)
    ids = torch.tensor([[0, 2], [2, 5], [0, 5], [2, 0], [5, 2], [0, 2], [2, 5]])
    w = torch.rand(7, 2, generator=g)
    ref = _experts_ref(m.gate_up_proj, m.down_proj, 10.0, hidden, ids, w)
    used = []
    orig = m.expert_weights
    monkeypatch.setattr(m, "expert_weights", lambda k, dtype=None: (used.append(k), orig(k, dtype))[1])
    torch.testing.assert_close(m(hidden, ids, w), ref, rtol=1e-5, atol=1e-5)
    assert sorted(used) == [0, 2, 5]
    # dequantized weights are close to the originals (FP4: 1 mantissa bit)
    assert (m.gate_up_proj - gate_up).abs().max() <= gate_up.abs().max() / 4


def test_fp4_experts_match_model_experts_module():
    layers = pytest.importorskip("parity.model.layers")
    g = torch.Generator().manual_seed(5)
    e, h, i = 4, 64, 32
    m = FP4Experts.from_float(torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g), 10.0)
    ref_mod = layers.Experts(e, h, i, 10.0)
    with torch.no_grad():
        ref_mod.gate_up_proj.copy_(m.gate_up_proj)
        ref_mod.down_proj.copy_(m.down_proj)
    hidden = torch.randn(9, h, generator=g)
    ids = torch.randint(0, e, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g)
    torch.testing.assert_close(m(hidden, ids, w), ref_mod(hidden, ids, w), rtol=0, atol=1e-6)


def test_fp4_experts_reject_bad_sizes():
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        FP4Experts(2, 64, 40, 10.0)


def test_native_fp8_path_math(monkeypatch):
    """The FP8-GEMM path (used where parity.devices.has_fp8) checked on CPU with a reference
    `_scaled_mm`: activations quantized per 1x128 with UE8M0 scales, weight scales per output column."""

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and b.stride(0) == 1  # b column-major
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(272, 384, generator=g) * 0.05
    ql = QuantLinear.from_float(w)
    x = torch.randn(2, 3, 384, generator=g)
    got = quant._fp8_native_linear(x, ql.qweight, ql.scale, ql.block)
    ref = F.linear(x, ql.weight)
    assert got.shape == ref.shape
    # e4m3 activations: ~2**-4 relative error per element, averaging out over the 384-term dot products
    assert ((got - ref).norm() / ref.norm()).item() < 0.03
    xq = ff.dequantize_fp8_lastdim(*ff.quantize_fp8_lastdim(x, 128))  # exact w.r.t. quantized activations
    exact = F.linear(xq, ql.weight)  # same up to the bf16 rounding of each K block's partial product
    assert ((got - exact).abs() <= 2**-8 * 3 * exact.abs().max()).all()
    with pytest.raises(ValueError, match="in_features % block"):
        quant._fp8_native_linear(torch.randn(2, 200), *ff.quantize_fp8_weight(torch.randn(32, 200)), (128, 128))
