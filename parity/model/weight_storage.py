"""How the weight matrices are stored apart from the compute dtype: bf16 weights under fp32 activations.

Decode on the CPU is bound by reading weights, so the matrices are held at the width the checkpoint gives
them while activations and accumulation stay fp32: FP8 e4m3 and FP4 e2m1 values times a power-of-two
UE8M0 scale are exactly representable in bf16 (8 exponent bits like fp32, >= 3 mantissa bits), so a
bf16 copy of the published weights equals their fp32 dequantization bit for bit and halves the bytes
read per token; a bf16 float checkpoint keeps its bf16 tensors. The embedding (rows gathered, not
streamed), norms, mHC and sinks keep the compute dtype.

`store_weights_` casts the matrices of a model (before or after allocation) and re-classes its plain
``nn.Linear`` modules to `parity.model.fast_linear.WideningLinear` and its routed experts to
`parity.model.fast_linear.WideningExperts`; the router widens its weight itself (``Router.forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from parity.model.fast_linear import WideningExperts, WideningLinear
from parity.model.layers import Experts, Router

#: Weight storage dtypes narrower than the compute dtype that the widening paths accept.
STORAGE_DTYPES = (torch.bfloat16, torch.float16)


def _storable(model: nn.Module):
    """(qualified name, module) of every module whose weights `store_weights_` narrows."""
    for name, mod in model.named_modules():
        if (type(mod) is nn.Linear and mod.bias is None) or type(mod) in (Experts, Router):
            yield name, mod


def stored_matrix_names(model: nn.Module) -> set[str]:
    """Parameter names (``model.named_parameters`` form) that `store_weights_` would narrow."""
    return {f"{m}.{p}" if m else p for m, mod in _storable(model) for p, t in mod._parameters.items() if t is not None}


def store_weights_(model: nn.Module, dtype: torch.dtype = torch.bfloat16, names: set[str] | None = None) -> int:
    """Hold every linear weight, routed-expert stack and router weight of `model` in `dtype`, in place.

    Covers bias-free plain ``nn.Linear`` modules (attention, compressor, indexer, shared expert, MTP
    projections, LM head; re-classed to `WideningLinear`), `Experts` (``gate_up_proj`` / ``down_proj``;
    re-classed to `WideningExperts`) and `Router` weights. Subclasses of ``nn.Linear`` with their own
    forward (tensor-parallel heads) and quantized modules are left as they are. Works on meta tensors
    (before ``to_empty``) too.

    Args:
        model: a `parity.model.deepseek_v4.V4ForCausalLM` (any module tree).
        dtype: one of `STORAGE_DTYPES`.
        names: narrow only these parameters (`stored_matrix_names` form); None = all of them.
    Returns:
        Number of tensors stored in `dtype`.
    Raises:
        ValueError: `dtype` is not one of `STORAGE_DTYPES`.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"weight storage dtype {dtype}: expected one of {STORAGE_DTYPES}")
    n = 0
    with torch.no_grad():
        for mname, mod in list(_storable(model)):
            if type(mod) is nn.Linear:
                mod.__class__ = WideningLinear
            elif type(mod) is Experts:
                mod.__class__ = WideningExperts
            for pname, p in mod._parameters.items():
                if names is not None and (f"{mname}.{pname}" if mname else pname) not in names:
                    continue
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    n += 1
    return n


def weight_bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """{dtype name: bytes} over all parameters and buffers of `model` (shared tensors counted once)."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def describe_storage(model: nn.Module) -> str:
    """One line for start-up logs: the weight bytes per stored dtype, e.g. "bfloat16 78.4 MiB, float32 ..."."""
    by = sorted(weight_bytes_by_dtype(model).items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by)
