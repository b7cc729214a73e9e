"""Weight-format conversion at load (``--quantization``): the published FP8/FP4 model -> W8A8 / W4A8 / bf16.

For chips without FP8 (Ascend 910B/910C): each FP8 block-scaled linear (`parity.model.quant.QuantLinear`)
is dequantized and re-quantized to int8 per output channel (`parity.model.int8_quant.Int8Linear`); the
FP4 routed experts (`FP4Experts`) to int8 (``w8a8``) or int4 (``w4a8``) per output channel
(`Int8Experts`), one expert at a time, so at most one expert's float weights exist at once. ``bf16``
loads the dequantized model instead (`official_reader.load_official(quantized=False)`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parity.errors import ConfigError
from parity.model import quant
from parity.model.int8_quant import Int8Experts, Int8Linear, int8_nbytes, quantize_weight_per_channel

log = logging.getLogger("parity.checkpoint")

#: `--quantization` names (vLLM's flag): how published FP8/FP4 weights are held after loading.
#: fp8 / fp4: as published (FP8 e4m3 linears, FP4 e2m1 experts); w8a8: int8 linears and experts;
#: w4a8: int8 linears, int4 experts; bf16: dequantized to the compute dtype.
QUANTIZATIONS = ("fp8", "fp4", "w8a8", "w4a8", "bf16")


def check_quantization(name: str | None) -> str | None:
    """`name` lower-cased if it is one of `QUANTIZATIONS` (None / "auto" -> None).

    Raises:
        ConfigError: unknown name.
    """
    if name is None or str(name).lower() == "auto":
        return None
    n = str(name).lower()
    if n not in QUANTIZATIONS:
        raise ConfigError(f"--quantization {name!r}: expected auto or one of {', '.join(QUANTIZATIONS)}")
    return n


def quantize_lm_head(model: nn.Module) -> Int8Linear:
    """Replace ``model.lm_head`` (a float linear, [vocab, H]) in place by an `Int8Linear`: int8 per output
    channel, per-token int8 activations, fp32 logits, as llama.cpp's Q8_0 quantizes its output tensor
    (msModelSlim's W8A8 keeps the head float, hence opt-in). A tied embedding keeps its float weight.

    Returns:
        the new head.
    Raises:
        ConfigError: the head is not a float linear (already quantized, or sharded).
    """
    head = model.lm_head
    w = getattr(head, "weight", None)
    if isinstance(head, Int8Linear) or not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ConfigError(f"--quantize-lm-head: the LM head is {type(head).__name__}, not a float linear")
    with torch.no_grad():
        new = Int8Linear.from_float(w.detach().float())
    before = w.numel() * w.element_size()
    model.lm_head = new
    log.info(
        "quantized the LM head to int8 per output channel: %.1f MiB (was %.1f MiB)",
        new.weight_nbytes() / 2**20,
        before / 2**20,
    )
    return new


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def convert_published(model: nn.Module, quantization: str) -> dict:
    """Convert a quantized published-layout model in place to ``w8a8`` / ``w4a8`` (other names: no-op).

    Returns:
        {"linears": n converted, "experts": n expert stacks converted, "bytes_before", "bytes_after"}
        (bytes of the quantized weights and their scales).
    """
    before = quant.quantized_nbytes(model) + int8_nbytes(model)
    stats = {"linears": 0, "experts": 0, "bytes_before": before, "bytes_after": before}
    if quantization not in ("w8a8", "w4a8"):
        return stats
    bits = 8 if quantization == "w8a8" else 4
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, quant.QuantLinear):
                new = Int8Linear(mod.in_features, mod.out_features, device=mod.qweight.device)
                w = mod.dequantize_rows(0, mod.out_features, torch.float32)
                q, s = quantize_weight_per_channel(w, 8)
                new.weight.copy_(q)
                new.weight_scale.copy_(s)
                _set(model, name, new)
                stats["linears"] += 1
            elif isinstance(mod, quant.FP4Experts):
                new = Int8Experts(
                    mod.n_experts, mod.hidden, mod.inter, mod.limit, bits, device=mod.gate_up_qweight.device
                )
                for e in range(mod.n_experts):
                    gu, dn = mod.expert_weights(e, torch.float32)
                    one = Int8Experts.from_float(gu[None], dn[None], mod.limit, bits)
                    for b in ("gate_up_weight", "gate_up_scale", "down_weight", "down_scale"):
                        getattr(new, b)[e].copy_(getattr(one, b)[0])
                _set(model, name, new)
                stats["experts"] += 1
    stats["bytes_after"] = quant.quantized_nbytes(model) + int8_nbytes(model)
    log.info(
        "converted %d FP8 linears to W8A8 (int8 per output channel) and %d FP4 expert stacks to int%d: "
        "quantized weights %.1f MiB (were %.1f MiB)",
        stats["linears"],
        stats["experts"],
        bits,
        stats["bytes_after"] / 2**20,
        before / 2**20,
    )
    return stats
