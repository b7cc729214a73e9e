"""How the weight matrices are stored apart from the compute dtype: bf16 weights under fp32 activations.

Decode on the CPU is bound by reading weights, so the matrices are held at the width the checkpoint gives
them while activations and accumulation stay fp32: FP8 e4m3 and FP4 e2m1 values times a power-of-two
UE8M0 scale are exactly representable in bf16 (8 exponent bits like fp32, >= 3 mantissa bits), so a
bf16 copy of the published weights equals their fp32 dequantization bit for bit and halves the bytes
read per token; a bf16 float checkpoint keeps its bf16 tensors. The embedding (rows gathered, not
streamed), norms, mHC and sinks keep the compute dtype.

`store_weights_` casts the matrices of a model (before or after allocation) and re-classes its plain
``nn.Linear`` modules to `parity.model.fast_linear.WideningLinear` and its routed experts to
`WideningExperts`; the router widens its weight itself (``Router.forward``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parity.errors import first_line
from parity.model.fast_linear import WideningLinear
from parity.model.layers import Experts, Router, swiglu

log = logging.getLogger("parity.model")

#: Weight storage dtypes narrower than the compute dtype that the widening paths accept.
STORAGE_DTYPES = (torch.bfloat16, torch.float16)


#: `WideningExperts`: at most this many token-expert pairs take the fused per-pair kernel (decode steps);
#: more pairs (prefill) run expert by expert (`Experts.forward`), where each expert's weight is upcast
#: once and reused by all its tokens.
WIDENING_EXPERT_MAX_PAIRS = 64


def _routed_pairs(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    limit: float,
) -> torch.Tensor:
    """Routed-expert output [T, H] with each (token, expert) pair's weights gathered and widened as loaded."""
    gu = (gate_up[expert_ids].to(hidden.dtype) * hidden[:, None, None, :]).sum(-1)  # [T, k, 2I]
    inter = gu.shape[-1] // 2
    h = swiglu(gu[..., :inter], gu[..., inter:], limit) * weights[..., None]  # [T, k, I]
    return (down[expert_ids].to(hidden.dtype) * h[:, :, None, :]).sum(-1).sum(1)  # [T, H]


_compiled_pairs = None  # torch.compile(_routed_pairs), built on first use; False = unavailable


class WideningExperts(Experts):
    """Routed experts (`parity.model.layers.Experts`) whose stacks are stored narrower than the hidden
    states (bf16 weights, fp32 activations); same forward contract and math (SwiGLU with clamp, routing
    weight before ``down_proj``, fp32 result).

    Decode steps (<= `WIDENING_EXPERT_MAX_PAIRS` token-expert pairs, CPU): one compiled kernel
    (`_routed_pairs`: inductor gathers each pair's expert rows and converts them in registers), instead
    of an upcast and two GEMMs per used expert; results equal up to fp32 summation order. Larger batches:
    `Experts.forward`. Built by re-classing an `Experts` (`store_weights_`).
    """

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        global _compiled_pairs
        narrow = self.gate_up_proj.element_size() < hidden.element_size()
        if narrow and expert_ids.numel() <= WIDENING_EXPERT_MAX_PAIRS and hidden.device.type == "cpu":
            if torch.compiler.is_compiling():
                return _routed_pairs(hidden, expert_ids, weights.float(), self.gate_up_proj, self.down_proj, self.limit)
            if _compiled_pairs is not False:
                if _compiled_pairs is None:
                    _compiled_pairs = torch.compile(_routed_pairs, dynamic=True)
                try:
                    return _compiled_pairs(
                        hidden, expert_ids, weights.float(), self.gate_up_proj, self.down_proj, self.limit
                    )
                except Exception as e:  # no C++ toolchain for inductor, or a backend error
                    log.warning("compiled routed-expert kernel unavailable (%s); per-expert upcasts", first_line(e))
                    _compiled_pairs = False
        return super().forward(hidden, expert_ids, weights)


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
