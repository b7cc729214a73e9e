"""Building a `V4ForCausalLM`: random initialisation (tests, benchmarks), dtype names, RoPE buffers.

`build_model` makes a seeded random model on any device; the checkpoint readers build on the meta device
and call `reset_rope` after filling the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from parity.config import CSA, SLIDING, ModelConfig
from parity.errors import RequestError
from parity.model.attention import Attention
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.layers import rope_inv_freq
from parity.model.memory import check_fits
from parity.model.parallel_layers import parallelize_


def _init_params(model: nn.Module, cfg: ModelConfig, generator: torch.Generator | None) -> None:
    """Random init for tests/benchmarks: normal(0, initializer_range) matrices, unit norms, small random
    biases/sinks/position biases, random distinct expert ids in every ``tid2eid`` row."""
    std = cfg.initializer_range
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("inv_freq") or name.endswith("inv_freq_main") or name.endswith("inv_freq_compress"):
                continue
            cpu = torch.empty(p.shape, dtype=torch.float32)
            if leaf == "tid2eid":
                E = cfg.n_routed_experts
                rows = torch.stack([torch.randperm(E, generator=generator)[: p.shape[1]] for _ in range(p.shape[0])])
                p.copy_(rows.to(p.dtype))
                continue
            if name.endswith("norm.weight"):
                cpu.normal_(1.0, 0.1, generator=generator)
            elif leaf in ("scale", "hc_scale"):
                cpu.normal_(1.0, 0.2, generator=generator)
            elif leaf in ("sinks", "base", "hc_base", "position_bias", "e_score_correction_bias"):
                cpu.normal_(0.0, 0.5, generator=generator)
            else:
                cpu.normal_(0.0, std, generator=generator)
            p.copy_(cpu.to(p.dtype))


#: Model dtype names (torch's and the short forms).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or a name ("float32", "bf16", ...).

    Raises:
        RequestError: unknown name (expected one of float32, bfloat16, float16 and short forms).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise RequestError(f"dtype is {dtype!r}: expected one of {sorted(DTYPES)} or a torch.dtype")


def build_model(
    cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32, seed: int | None = None, parallel=None
) -> V4ForCausalLM:
    """A randomly initialised model (tests, benchmarks).

    Args:
        cfg: the architecture.
        device: anything `parity.devices.resolve` accepts ("cpu", "cuda", "npu", "auto", ...).
        dtype: parameter dtype (mHC, norms, sinks, biases stay fp32).
        seed: seed for the (CPU) generator; None = nondeterministic.
        parallel: a `parity.distributed.context.ParallelContext` (None = one process): the full model is
            initialised (the same weights as one process with the same seed), then cut to this rank's
            part (`parity.model.parallel_layers.parallelize_`).
    Raises:
        DeviceError: unknown device, or the weights would not fit in its free memory
            (`parity.model.memory.check_fits`; ``PARITY_SKIP_MEMORY_CHECK=1`` skips that check).
    """
    from parity import devices

    dev = devices.resolve(device)
    dtype = resolve_dtype(dtype)
    check_fits(cfg, dev, dtype, quantized=False)  # DeviceError before allocating what cannot fit
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    model.to_empty(device=dev)
    reset_rope(model)
    _init_params(model, cfg, gen)
    model.to_dtype(dtype)
    if parallel is not None:
        parallelize_(model, parallel)
    return model.eval()


def reset_rope(model: V4ForCausalLM) -> None:
    """Recompute the non-persistent RoPE buffers (lost by meta-device construction)."""
    cfg = model.config
    m = model.model
    rd = cfg.qk_rope_head_dim
    main = rope_inv_freq(rd, cfg.rope_params(SLIDING)["theta"], None)
    c = cfg.rope_params(CSA)
    comp = rope_inv_freq(rd, c["theta"], c["scaling"])
    dev = model.device
    m.inv_freq_main = main.to(dev)
    m.inv_freq_compress = comp.to(dev)
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.inv_freq = (main if mod.layer_type == SLIDING else comp).to(dev)
