"""`NoFloat8Mode`: a `TorchDispatchMode` that raises when any op touches a float8 tensor.

Used by tests (and available to users) to check that a path runs on a device without FP8 support
(Ascend 910B/910C): every op's inputs, outputs and ``dtype=`` argument are inspected, so factory ops
(``torch.empty(..., dtype=torch.float8_e4m3fn)``), casts (``.to(float8)``) and reinterpretations
(``.view(float8)``) are all caught.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from parity.errors import DeviceError

#: Every float8 dtype this torch build has (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz, e8m0fnu).
FLOAT8_DTYPES = frozenset(
    getattr(torch, n) for n in dir(torch) if n.startswith("float8_") and isinstance(getattr(torch, n), torch.dtype)
)


class Float8TensorError(DeviceError):
    """An op created or consumed a float8 tensor under `NoFloat8Mode`."""


def _float8_in(tree) -> torch.dtype | None:
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dtype in FLOAT8_DTYPES:
            return leaf.dtype
        if isinstance(leaf, torch.dtype) and leaf in FLOAT8_DTYPES:
            return leaf
    return None


class NoFloat8Mode(TorchDispatchMode):
    """Context manager: any aten op with a float8 input, output or dtype argument raises.

    Raises (inside the ``with`` block):
        Float8TensorError: naming the op and the float8 dtype.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dt = _float8_in((args, kwargs))
        if dt is not None:
            raise Float8TensorError(f"op {func} was given a {dt} tensor or dtype on a device without FP8")
        out = func(*args, **kwargs)
        dt = _float8_in(out)
        if dt is not None:
            raise Float8TensorError(f"op {func} produced a {dt} tensor on a device without FP8")
        return out
