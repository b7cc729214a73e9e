"""Compiled regions of the V4 forward: the per-token sub-blocks with many small ops and no cache access.

A decode step of a small batch is bound by per-op dispatch, not arithmetic: the mHC pre step alone
(RMS, mixes, sigmoid, softmax and 2 x ``hc_sinkhorn_iters`` normalisation rounds) is ~90 aten ops per
sub-block, ~2,000 per step of a 6-layer model. These regions are pure functions of their inputs and
the module's parameters, so each becomes one compiled function (a few fused kernels), shared by every
instance (parameters are graph inputs) and symbolic in the token count (one graph serves every batch,
plus one for a single token). The head (hc collapse, final norm, LM head GEMV: `fast_linear.decode_linear`)
is one more region. The attention cache updates and the expert dispatch stay eager.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.layers import HyperConnection, HyperHead, RMSNorm

#: (class, method name) of each compiled region.
REGIONS = ((HyperConnection, "pre"), (RMSNorm, "forward"), (HyperHead, "forward"))


def compile_regions(model: nn.Module, compile_fn) -> int:
    """Route every instance of the `REGIONS` classes in ``model`` to one compiled function per region.

    Args:
        model: a `V4ForCausalLM` (any module tree holding these blocks).
        compile_fn: ``fn -> compiled fn`` (`parity.devices.compiler`).
    Returns:
        the number of module instances routed.
    """
    compiled = {(cls, name): compile_fn(getattr(cls, name)) for cls, name in REGIONS}
    n = 0
    for mod in model.modules():
        for (cls, name), fn in compiled.items():
            if type(mod) is cls:
                setattr(mod, name, partial(fn, mod))  # instance attribute: shadows the eager method
                n += 1
    if isinstance(model, V4ForCausalLM):  # final collapse, norm and LM head as one region
        model._head = partial(compile_fn(V4ForCausalLM._head), model)
        n += 1
    model.compiled_regions = True
    return n


def remove_compiled_regions(model: nn.Module) -> None:
    """Back to the eager methods (undoes `compile_regions`)."""
    for mod in model.modules():
        for cls, name in REGIONS:
            if type(mod) is cls:
                mod.__dict__.pop(name, None)
    model.__dict__.pop("_head", None)
    model.compiled_regions = False


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_regions` routed ``model``."""
    return bool(getattr(model, "compiled_regions", False))


@torch.no_grad()
def warm_up(model: nn.Module) -> float:
    """Compile every region for both shapes it will see (several tokens and one) by running a two-token
    prefill, a one-token decode step and a two-sequence decode step on throwaway cache states.

    Returns:
        wall seconds spent (compilation, or loading it from the inductor cache).
    """
    t0 = time.perf_counter()
    states = [model.new_state(), model.new_state()]
    try:
        model.forward_incremental([[1, 2], [3]], states)
        model.forward_incremental([[4]], states[:1])
        model.forward_incremental([[5], [6]], states)
    finally:
        for st in states:
            st.free()
    return time.perf_counter() - t0
