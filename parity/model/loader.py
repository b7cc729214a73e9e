"""Load transformers ``save_pretrained`` checkpoints of DeepseekV4ForCausalLM into `V4ForCausalLM`.

Two naming schemes are accepted, tensor by tensor (safetensors ``safe_open``; the model is built on the
meta device and each tensor is copied once into its final place, so the weights are never held twice):

1. the transformers state-dict names (``model.layers.0.self_attn.q_a_proj.weight``,
   ``model.layers.0.mlp.experts.gate_up_proj``, ``lm_head.weight``) = parity's own names;
2. the "original format" that transformers 5.23 ``save_pretrained`` writes by default
   (``save_original_format=True``: it reverses its ``conversion_mapping.py`` "deepseek_v4" renames):
   ``model.layers.0.attn.wq_a.weight``, ``...ffn.experts.3.w1.weight`` (one tensor per expert),
   ``head.weight`` ... and DeepSeek's own release names without the ``model.`` prefix (bf16 tensors
   only: the FP8/FP4 release layout is handled by ``parity.model.official``).

MTP tensors (``mtp.N.*`` / ``model.mtp.N.*``) are optional: a checkpoint without any drops the MTP
module (transformers never saves it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from parity.config import load_config
from parity.errors import CheckpointError

# Official/original segment names -> transformers names (transformers conversion_mapping "deepseek_v4",
# read as facts; the table below is parity's own).
_LEAF = {
    "wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv": "kv_proj", "wgate": "gate_proj", "wo_a": "o_a_proj",
    "wo_b": "o_b_proj", "q_norm": "q_a_norm", "attn_sink": "sinks", "ape": "position_bias",
}
_LAYER_LEAF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
}
_SHARED = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


def _translate_block(rest: str) -> str:
    """Rename inside one block (``layers.N.`` / ``mtp.N.`` already stripped)."""
    parts = rest.split(".")
    head = parts[0]
    if head in _LAYER_LEAF:
        return _LAYER_LEAF[head] + ("." + ".".join(parts[1:]) if len(parts) > 1 else "")
    if head == "attn":
        parts[0] = "self_attn"
        if len(parts) > 2 and parts[1] == "indexer":
            if parts[2] == "compressor":
                parts = ["self_attn", "compressor", "indexer"] + parts[3:]
            elif parts[2] == "weights_proj":
                parts = ["self_attn", "compressor", "indexer", "scorer"] + parts[2:]
            else:
                parts = ["self_attn", "compressor", "indexer"] + parts[2:]
        # attention-level 'norm' is kv_norm (official Attention.kv_norm / Compressor.norm)
        parts = [("kv_norm" if p == "norm" and i == len(parts) - 2 else _LEAF.get(p, p)) for i, p in enumerate(parts)]
        return ".".join(parts)
    if head == "ffn":
        parts[0] = "mlp"
        if len(parts) >= 3 and parts[1] == "shared_experts" and parts[2] in _SHARED:
            parts[2] = _SHARED[parts[2]]
        if len(parts) == 3 and parts[1] == "gate" and parts[2] == "bias":
            parts[2] = "e_score_correction_bias"
        return ".".join(parts)
    return rest


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name (transformers, transformers-original-format or official bf16) to
    parity's parameter name. Names already canonical come back unchanged."""
    if name in ("head.weight", "lm_head.weight"):
        return "lm_head.weight"
    n = name[len("model."):] if name.startswith("model.") else name
    if n == "embed.weight":
        return "model.embed_tokens.weight"
    if n in _LAYER_LEAF:  # top-level hc_head_fn ...
        return "model." + _LAYER_LEAF[n]
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.*)$", n)
    if m:
        return f"model.{m.group(1)}.{m.group(2)}.{_translate_block(m.group(3))}"
    return "model." + n


def _list_tensors(path: Path) -> dict[str, Path]:
    """checkpoint tensor name -> file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e}); expected a JSON object with 'weight_map'") from None
        files = {}
        for k, f in wm.items():
            fp = path / f
            if not fp.is_file():
                raise CheckpointError(f"{index}: shard {f!r} (holding {k!r}) does not exist")
            files[k] = fp
        return files
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no *.safetensors file and no "
                              f"model.safetensors.index.json")
    from safetensors import safe_open
    out = {}
    for fp in singles:
        try:
            with safe_open(str(fp), "pt") as f:
                for k in f.keys():
                    out[k] = fp
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{fp}: not a readable safetensors file ({e})") from None
    return out


def _fmt(names: list[str], limit: int = 5) -> str:
    s = ", ".join(sorted(names)[:limit])
    return s + (", ..." if len(names) > limit else "")


def from_pretrained(path, device="cpu", dtype: torch.dtype = torch.float32, kv_cache_dtype: str | None = None,
                    indexer_dtype: str | None = None):
    """Load a checkpoint directory (config.json + safetensors, single file or sharded).

    Args:
        path: directory written by transformers' ``DeepseekV4ForCausalLM.save_pretrained``.
        device: anything `parity.devices.resolve` accepts.
        dtype: compute dtype of the parameters, a torch.dtype or a name ("bfloat16", "float32"); mHC,
            norms, sinks, biases and the LM head stay fp32.
        kv_cache_dtype / indexer_dtype: default numerics of the returned model (issue 8); transformers-
            format checkpoints default to the pure math ("bf16" / "bf16").
    Returns:
        `V4ForCausalLM` in eval mode.
    Raises:
        ConfigError: config.json missing or invalid (from `parity.config`).
        CheckpointError: no safetensors, unreadable files, missing or unexpected tensors (first names and
            counts listed), wrong shapes (expected vs got); published-layout shards without their
            model.safetensors.index.json (the lost index named as the cause).
        DeviceError: unknown device, or the weights would not fit in its free memory
            (`parity.model.memory.check_fits`, checked before anything is allocated).
    """
    from safetensors import safe_open

    from parity import devices
    from parity.model.deepseek_v4 import V4ForCausalLM, _reset_rope, resolve_dtype

    dtype = resolve_dtype(dtype)

    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    from parity.model.official import is_official_checkpoint, load_official, missing_index_cause
    if is_official_checkpoint(p):  # the published FP8/FP4 layout (parity.model.official)
        return load_official(p, device, dtype, kv_cache_dtype=kv_cache_dtype, indexer_dtype=indexer_dtype)
    cause = missing_index_cause(p)  # published-layout shards whose index was lost
    if cause:
        raise CheckpointError(cause)
    cfg = load_config(p)
    files = _list_tensors(p)
    dev = devices.resolve(device)
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    expected = dict(model.state_dict())

    def stacked(k: str) -> bool:
        return k.endswith(".mlp.experts.gate_up_proj") or k.endswith(".mlp.experts.down_proj")

    # Required "slots": every tensor, and for stacked experts every per-expert part.
    slots: dict[str, str] = {}
    for k, t in expected.items():
        if not stacked(k):
            slots[k] = k
        else:
            for e in range(t.shape[0]):
                for w in (("w2",) if k.endswith("down_proj") else ("w1", "w3")):
                    slots[f"{k}#{e}:{w}"] = k
    plan: dict[str, tuple] = {}  # checkpoint name -> (param, selector)
    unexpected = []
    covered: set[str] = set()
    for name in files:
        cname = canonical_name(name)
        m = _EXPERT_RE.match(cname)
        if m:
            base, e, w = m.group(1), int(m.group(2)), m.group(3)
            param = base + (".down_proj" if w == "w2" else ".gate_up_proj")
            sid = f"{param}#{e}:{w}"
            if sid in slots:
                plan[name] = (param, (e, w))
                covered.add(sid)
                continue
            unexpected.append(name)
        elif cname in expected:
            plan[name] = (cname, None)
            covered.update(s for s, k in slots.items() if k == cname)
        else:
            unexpected.append(name)
    missing = [s for s in slots if s not in covered]
    mtp_missing = [s for s in missing if s.startswith("model.mtp.")]
    n_mtp_slots = sum(1 for s in slots if s.startswith("model.mtp."))
    drop_mtp = n_mtp_slots > 0 and len(mtp_missing) == n_mtp_slots
    if drop_mtp:
        missing = [s for s in missing if not s.startswith("model.mtp.")]
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing or unexpected:
        msg = []
        if missing:
            names = [s.split("#")[0] + (f" (expert {s.split('#')[1]})" if "#" in s else "") for s in missing]
            msg.append(f"{len(missing)} missing tensors: {_fmt(names)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected tensors: {_fmt(unexpected)}")
        raise CheckpointError(f"checkpoint {str(p)!r} does not match its config.json: " + "; ".join(msg))
    from parity.model.memory import check_fits
    check_fits(cfg, dev, dtype, quantized=False, include_mtp=not drop_mtp, what=f"loading {p}")
    if drop_mtp:
        model.model.mtp = torch.nn.ModuleList()
    model.to_empty(device=dev)
    _reset_rope(model)
    model.to_dtype(dtype)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    I = cfg.moe_intermediate_size
    with torch.no_grad():
        for fp, names in by_file.items():
            with safe_open(str(fp), "pt", device="cpu") as f:
                for name in names:
                    param, sel = plan[name]
                    if param.startswith("model.mtp.") and drop_mtp:
                        continue
                    dst = params[param]
                    shp = tuple(f.get_slice(name).get_shape())
                    if sel is None:
                        want = tuple(dst.shape)
                    else:
                        e, w = sel
                        want = (I, cfg.hidden_size) if w in ("w1", "w3") else (cfg.hidden_size, I)
                    if shp != want:
                        raise CheckpointError(f"tensor {name!r} has shape {list(shp)}: expected {list(want)} "
                                              f"(for {param})")
                    t = f.get_tensor(name)
                    if sel is None:
                        dst.copy_(t.to(dst.dtype))
                    else:
                        e, w = sel
                        if w == "w1":
                            dst[e, :I].copy_(t.to(dst.dtype))
                        elif w == "w3":
                            dst[e, I:].copy_(t.to(dst.dtype))
                        else:
                            dst[e].copy_(t.to(dst.dtype))
    if cfg.tie_word_embeddings and not any(v[0] == "lm_head.weight" for v in plan.values()):
        model.lm_head.weight = model.model.embed_tokens.weight
    if kv_cache_dtype:
        model.kv_cache_dtype = kv_cache_dtype
    if indexer_dtype:
        model.indexer_dtype = indexer_dtype
    model._modes(None, None)
    return model.eval()
