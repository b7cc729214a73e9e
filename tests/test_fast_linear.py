"""`parity.model.fast_linear.decode_linear`: the same product as ``F.linear`` in every formulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import parity.model.fast_linear as fl


def test_large_weight_matches_f_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 256, generator=g) * 0.02  # 4 MiB: parity's C++ op when built, else oneDNN
    for rows in (1, 3, 8):
        x = torch.randn(rows, 256, generator=g)
        ref = (x.double() @ w.double().T).float()
        out = fl.decode_linear(x, w)
        assert out.shape == (rows, 4096) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    x3 = torch.randn(2, 3, 256, generator=g)
    torch.testing.assert_close(fl.decode_linear(x3, w), F.linear(x3, w), rtol=0, atol=1e-5)


def test_small_weight_is_f_linear_exactly():
    w = torch.randn(64, 32)
    x = torch.randn(5, 32)
    assert torch.equal(fl.decode_linear(x, w), F.linear(x, w))


def test_bf16_uses_f_linear():
    w = torch.randn(4096, 256).bfloat16()
    x = torch.randn(2, 256).bfloat16()
    assert torch.equal(fl.decode_linear(x, w), F.linear(x, w))


def test_compiled_reduction_matches():
    w = torch.randn(1000, 64) * 0.1
    x = torch.randn(3, 64)
    fn = torch.compile(fl.decode_linear, backend="aot_eager")  # traces the compiled-branch formulation
    torch.testing.assert_close(fn(x, w), F.linear(x, w), rtol=0, atol=1e-5)
