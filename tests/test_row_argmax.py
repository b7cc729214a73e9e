"""The fast row argmax gives torch.argmax's indices: ties, NaN, infinities, partial last block, views -- on
both its paths (parity's one-pass C++ op where the ops are loaded, the two torch passes otherwise)."""

import pytest
import torch

from parity.devices import native_kernels
from parity.devices.row_argmax import BLOCK, row_argmax


@pytest.fixture(autouse=True, params=["torch", "native"])
def path(request, monkeypatch):
    """Each test on both paths: "native" loads the C++ ops (skipped where they cannot be built), "torch"
    reports them as not loaded."""
    if request.param == "native":
        if not native_kernels.available():
            pytest.skip("C++ ops not buildable here")
    else:
        monkeypatch.setattr(native_kernels, "loaded", lambda: False)
    return request.param


@pytest.mark.parametrize("n", [3 * BLOCK, 3 * BLOCK + 7, 2 * BLOCK + 1, 129_280, BLOCK - 1])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_equals_torch_argmax_on_random_rows(n, rows):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + rows))
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


def test_ties_take_the_first_maximum_across_and_inside_blocks():
    n = 4 * BLOCK + 5
    x = torch.zeros(4, n)
    x[0, [7, BLOCK + 3, 3 * BLOCK]] = 5.0  # across blocks
    x[1, [BLOCK + 3, BLOCK + 9]] = 5.0  # inside one block
    x[2, [n - 1, n - 3]] = 5.0  # inside the partial last block
    x[3] = float("-inf")  # every value the same: index 0
    assert row_argmax(x).tolist() == x.argmax(dim=-1).tolist() == [7, BLOCK + 3, n - 3, 0]


def test_last_value_of_a_partial_block_is_found():
    n = 3 * BLOCK + 2
    x = torch.zeros(2, n)
    x[0, n - 1] = 1.0
    x[1, n - 2] = 1.0
    assert row_argmax(x).tolist() == [n - 1, n - 2]


def test_nan_counts_as_largest_and_the_first_nan_wins():
    n = 3 * BLOCK
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    x[0, [2 * BLOCK + 1, BLOCK + 4]] = float("nan")
    x[1, 5] = float("inf")
    x[1, BLOCK] = float("nan")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert row_argmax(x)[:2].tolist() == [BLOCK + 4, BLOCK]


def test_views_and_low_precision_rows():
    x = torch.randn(6, 4 * BLOCK + 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(row_argmax(x[::2]), x[::2].argmax(dim=-1))
    assert torch.equal(row_argmax(x[:, 1:]), x[:, 1:].argmax(dim=-1))
    b = x.to(torch.bfloat16)
    assert torch.equal(row_argmax(b), b.argmax(dim=-1))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[rows, n\].*\(4,\)"):
        row_argmax(torch.zeros(4))
    with pytest.raises(ValueError, match=r"no values.*\[2, 0\]"):
        row_argmax(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="complex"):
        row_argmax(torch.zeros(2, 3 * BLOCK, dtype=torch.complex64))
    assert row_argmax(torch.zeros(0, 3 * BLOCK)).shape == (0,)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 33, 1000])
def test_short_rows_and_lane_remainders(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=g)
    x[1] = 2.0  # all equal: index 0
    x[2, n - 1] = 9.0  # the maximum in the last (remainder) position
    if n > 1:
        x[3, n // 2] = float("nan")
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


def test_ties_inside_the_lanes_take_the_first_index(path):
    x = torch.zeros(3, 4 * BLOCK)
    x[0, [3, 11, 19]] = 1.0  # one lane (3 mod 8), later rounds
    x[1, [13, 6]] = 1.0  # two lanes: the smaller index wins
    x[2] = -0.0
    x[2, 40] = 0.0  # -0.0 == 0.0: index 0
    assert row_argmax(x).tolist() == x.argmax(dim=-1).tolist() == [3, 6, 0]


def test_native_op_names_bad_input():
    if not native_kernels.available():
        pytest.skip("C++ ops not buildable here")
    with pytest.raises(RuntimeError, match=r"row_argmax.*torch\.float32, got torch\.float64"):
        native_kernels.row_argmax(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"row_argmax.*\[rows, n\]"):
        native_kernels.row_argmax(torch.zeros(4))
    with pytest.raises(RuntimeError, match="no values"):
        native_kernels.row_argmax(torch.zeros(2, 0))


def test_nan_in_the_first_lanes_wins():
    for pos in range(8):
        x = torch.randn(2, 40, generator=torch.Generator().manual_seed(pos))
        x[0, pos] = float("nan")
        x[0, 30] = float("nan")
        x[1, pos] = float("inf")
        assert row_argmax(x).tolist() == x.argmax(dim=-1).tolist() == [pos, pos]
