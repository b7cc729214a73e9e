"""parity's C++ fp32 product for decode (`native_kernels.float_linear`) and where `fast_linear` takes it."""

import re

import pytest
import torch

from parity.devices import native_kernels
from parity.model import fast_linear

pytestmark = pytest.mark.skipif(not native_kernels.available(), reason="C++ ops not buildable here")


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 rounding bound of each sum: K * eps * sum_k |x_k w_k| (with slack)."""
    K = x.shape[1]
    return 2 * K * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().t()) + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("K", [1, 7, 8, 9, 33, 64, 256])
def test_float_linear_equals_float64_sums_within_fp32_rounding(dtype, M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(37, K, generator=g).to(dtype)
    out = native_kernels.float_linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (M, 37)
    ref = x.double() @ w.double().t()
    assert ((out.double() - ref).abs() <= _bound(x, w)).all()


def test_float_linear_views_and_empty_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)[::2]  # non-contiguous rows
    w = torch.randn(64, 50, generator=g).t()  # transposed view [50, 64]
    ref = x.double() @ w.double().t()
    assert ((native_kernels.float_linear(x, w).double() - ref).abs() <= _bound(x, w)).all()
    assert native_kernels.float_linear(torch.zeros(0, 8), torch.zeros(5, 8)).shape == (0, 5)
    assert native_kernels.float_linear(torch.zeros(3, 8), torch.zeros(0, 8)).shape == (3, 0)
    assert torch.equal(native_kernels.float_linear(torch.zeros(2, 0), torch.zeros(4, 0)), torch.zeros(2, 4))


def test_float_linear_parallel_split_equals_one_thread():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 256, generator=g), torch.randn(4099, 256, generator=g)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_kernels.float_linear(x, w)
        torch.set_num_threads(2)
        two = native_kernels.float_linear(x, w)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)  # each sum is computed by one task in the same order


@pytest.mark.parametrize(
    ("x", "w", "message"),
    [
        (torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8), "x (the activations) must be torch.float32"),
        (torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.float16), "weight must be torch.float32 or torch.bfloat16"),
        (torch.zeros(8), torch.zeros(3, 8), "x must be [rows, K]"),
        (torch.zeros(2, 8), torch.zeros(2, 3, 8), "weight must be [N, K]"),
        (torch.zeros(2, 8), torch.zeros(3, 9), "K mismatch"),
    ],
)
def test_float_linear_bad_operands_name_what_is_wrong(x, w, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        native_kernels.float_linear(x, w)


def test_decode_linear_takes_the_op_for_a_large_weight_and_few_rows(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8192, 256, generator=g)  # 8 MiB: above the oneDNN / op threshold
    calls = []
    real = native_kernels.float_linear
    monkeypatch.setattr(
        native_kernels, "float_linear", lambda x, w, live=None: calls.append(x.shape) or real(x, w, live)
    )
    for rows in (1, 4, 16):
        x = torch.randn(rows, 256, generator=g)
        out = fast_linear.decode_linear(x, w)
        assert ((out.double() - x.double() @ w.double().t()).abs() <= _bound(x, w)).all()
    assert calls == [(1, 256), (4, 256), (16, 256)]
    calls.clear()
    fast_linear.decode_linear(torch.randn(17, 256, generator=g), w)  # above NATIVE_MAX_ROWS: BLAS
    fast_linear.decode_linear(torch.randn(2, 256, generator=g), torch.randn(64, 256, generator=g))  # small weight
    assert calls == []


def test_widening_linear_takes_the_op_for_a_large_bf16_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8192, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(4, 256, generator=g)
    ref = x.double() @ w.double().t()
    assert ((fast_linear.widening_linear(x, w).double() - ref).abs() <= _bound(x, w)).all()


def test_reduced_matmul_precision_keeps_the_eager_op_off(monkeypatch):
    w = torch.randn(8192, 256)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert fast_linear.native_linear(torch.randn(2, 256), w) is None
    finally:
        torch.set_float32_matmul_precision(saved)


def test_compiled_graph_calls_the_op_and_matches_eager():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8192, 256, generator=g)
    x = torch.randn(3, 256, generator=g)
    compiled = torch.compile(fast_linear.decode_linear, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), fast_linear.decode_linear(x, w), rtol=0, atol=0)


def test_a_row_gets_the_same_logits_at_every_batch_size():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 261, generator=g)  # K % 8 != 0: the scalar tail too
    x = torch.randn(9, 261, generator=g)
    alone = torch.cat([native_kernels.float_linear(x[i : i + 1], w) for i in range(9)])
    for M in range(2, 10):
        assert torch.equal(native_kernels.float_linear(x[:M], w), alone[:M])


def test_a_strided_large_weight_keeps_the_blas_path():
    w = torch.randn(256, 8192).t()  # [8192, 256] view, not contiguous
    assert fast_linear.native_linear(torch.randn(2, 256), w) is None


@pytest.mark.parametrize("live", [0, 1, 3, 5, 8, 12, -2])
def test_float_linear_live_rows_only(live):
    """Given ``live`` = r, rows below r equal the full product bit for bit (same summation order), the rest
    are zero; r is clamped to [0, M]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)
    w = torch.randn(300, 64, generator=g)
    full = native_kernels.float_linear(x, w)
    part = native_kernels.float_linear(x, w, torch.tensor([live]))
    r = min(max(live, 0), 8)
    assert part.shape == full.shape
    assert torch.equal(part[:r], full[:r]) and not part[r:].any()


def test_float_linear_live_must_be_one_int64():
    x, w = torch.zeros(2, 8), torch.zeros(5, 8)
    for bad in (torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(RuntimeError, match="live must be one int64 CPU value"):
            native_kernels.float_linear(x, w, bad)
    assert native_kernels.float_linear(x, w, torch.tensor(1)).shape == (2, 5)  # a 0-d value too


def test_compiled_graph_takes_live_rows_as_an_input():
    """A compiled function calling the op with live rows is traced once: other live values reuse the graph
    (no specialisation on the value), and give the eager results."""
    from torch._dynamo.testing import CompileCounter

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(8, 64, generator=g), torch.randn(300, 64, generator=g)
    counter = CompileCounter()
    fn = torch.compile(lambda x, w, live: native_kernels.float_linear(x, w, live) * 2, backend=counter, fullgraph=True)
    for live in (5, 6, 8, 1):
        got = fn(x, w, torch.tensor([live]))
        assert torch.equal(got, native_kernels.float_linear(x, w, torch.tensor([live])) * 2)
    assert counter.frame_count == 1
