"""The msModelSlim (Huawei Ascend model compression) checkpoint layout for DeepSeek-V4. Torch-free.

A msModelSlim directory holds safetensors shards (+ ``model.safetensors.index.json``), config.json and
``quant_model_description.json``: ``{"model_quant_type": "W8A8_DYNAMIC", "version": ..., "<tensor>":
"<scheme>", ...}`` naming the scheme of every tensor. Tensor names are DeepSeek's official ones
(``layers.0.attn.wq_a.weight``, ``layers.0.ffn.experts.3.w1.weight``; vllm-ascend's ``deepseek_v4``
prefix/substring mappings in ``quantization/modelslim_config.py``). Per quantized linear ``<m>``:

- ``W8A8_DYNAMIC``: ``<m>.weight`` int8 [out, in], ``<m>.weight_scale`` / ``<m>.weight_offset`` fp32
  [out, 1] (symmetric: offset 0); activations quantized per token at run time (vllm-ascend
  ``AscendW8A8DynamicLinearMethod`` / ``...FusedMoEMethod``).
- ``W4A8_DYNAMIC`` (routed experts): ``<m>.weight`` int8 [out / 2, in], two int4 per byte along the
  output dimension; ``weight_scale`` / ``weight_offset`` fp32 [out, 1]; optional ``scale_bias``
  (a correction term vllm-ascend's fused kernel precomputes; derived from the weights, not needed
  here) (vllm-ascend ``AscendW4A8DynamicFusedMoEMethod``, per-channel only: ``group_size`` 0).
- ``FLOAT``: the tensor in its float dtype.

Static ``W8A8`` (per-tensor ``input_scale`` / ``input_offset`` / ``deq_scale`` / ``quant_bias``) and
other schemes are refused with the tensor and scheme named.
"""

from __future__ import annotations

import json
from pathlib import Path

from parity.errors import CheckpointError

DESCRIPTION_FILE = "quant_model_description.json"
W8A8_DYNAMIC, W4A8_DYNAMIC, FLOAT = "W8A8_DYNAMIC", "W4A8_DYNAMIC", "FLOAT"
SUPPORTED_SCHEMES = (W8A8_DYNAMIC, W4A8_DYNAMIC, FLOAT)
#: Tensor suffixes of a quantized linear ``<m>.<suffix>``.
QUANT_SUFFIXES = ("weight", "weight_scale", "weight_offset", "scale_bias")
#: Description keys that are metadata, not tensors.
META_KEYS = ("model_quant_type", "version", "group_size", "optional", "kv_cache_type", "fa_quant_type")
#: `--format` name of export-tiny -> (dense scheme, routed-expert scheme).
FORMATS = {"msmodelslim-w8a8": (W8A8_DYNAMIC, W8A8_DYNAMIC), "msmodelslim-w4a8": (W8A8_DYNAMIC, W4A8_DYNAMIC)}


def is_msmodelslim_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory with a ``quant_model_description.json``."""
    return (Path(path) / DESCRIPTION_FILE).is_file()


def read_description(path: str | Path) -> dict[str, str]:
    """{tensor name: scheme} of a msModelSlim directory (metadata keys dropped).

    Raises:
        CheckpointError: unreadable JSON; a per-channel-only scheme with ``group_size`` > 0; a tensor with
            a scheme parity does not run (naming the tensor and the scheme).
    """
    f = Path(path) / DESCRIPTION_FILE
    try:
        d = json.loads(f.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{f}: unreadable msModelSlim description ({e}); expected a JSON object {{tensor name: scheme}}"
        ) from None
    if int(d.get("group_size", 0) or 0) > 0:
        raise CheckpointError(
            f"{f}: group_size {d['group_size']} (per-group quantization) is not supported; "
            f"expected per-channel weights (group_size 0)"
        )
    out = {}
    for k, v in d.items():
        if k in META_KEYS:
            continue
        if v not in SUPPORTED_SCHEMES:
            raise CheckpointError(
                f"{f}: tensor {k!r} uses scheme {v!r}, which parity does not support; expected "
                f"one of {', '.join(SUPPORTED_SCHEMES)}"
            )
        out[k] = v
    return out


def split_name(name: str) -> tuple[str, str]:
    """(module, suffix) of a quantized tensor name (``a.b.weight_scale`` -> (``a.b``, ``weight_scale``));
    suffix "" when the name does not end in one of `QUANT_SUFFIXES`."""
    mod, _, suffix = name.rpartition(".")
    return (mod, suffix) if suffix in QUANT_SUFFIXES else (name, "")
