"""Read and write msModelSlim W8A8 / W4A8 checkpoints of DeepSeek-V4 (layout: `parity.checkpoint.msmodelslim`).

`load_msmodelslim` builds the model on the meta device, swaps every ``W8A8_DYNAMIC`` linear for an
`Int8Linear` and every quantized routed-expert stack for an `Int8Experts` (int8 or packed int4), allocates
it once and copies each tensor into place; weights stay int8 / int4 in memory. `export_msmodelslim`
writes a float parity model in that layout (``parity export-tiny --format msmodelslim-w8a8|-w4a8``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from parity import devices
from parity.checkpoint import writer
from parity.checkpoint.layout import FP4, FP8, INDEX_FILE, PLAIN, canonical_name, official_layout, resolve_target
from parity.checkpoint.msmodelslim import (
    DESCRIPTION_FILE,
    FLOAT,
    FORMATS,
    W4A8_DYNAMIC,
    W8A8_DYNAMIC,
    read_description,
    split_name,
)
from parity.checkpoint.tensor_io import torch_dtype
from parity.config import load_config, load_preset
from parity.errors import CheckpointError
from parity.model.build import build_model, reset_rope
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.int8_quant import Int8Experts, Int8Linear, pack_int4_rows, quantize_weight_per_channel
from parity.model.memory import check_fits, estimate_weight_bytes

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_PARTS = {"w1": "gate_up", "w3": "gate_up", "w2": "down"}


def _list_tensors(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index}: unreadable index ({e}); expected a JSON object with 'weight_map'"
            ) from None
    out = {}
    for fp in sorted(path.glob("*.safetensors")):
        with safe_open(str(fp), "pt") as f:
            out.update({k: fp for k in f.keys()})
    if not out:
        raise CheckpointError(f"msModelSlim checkpoint {str(path)!r} has no *.safetensors file")
    return out


def _route(name: str, desc: dict[str, str]) -> tuple[str, str, str]:
    """(scheme, parity name of the weight / parameter, suffix) of checkpoint tensor `name`.

    Raises:
        CheckpointError: the description does not list the tensor.
    """
    mod, suffix = split_name(name)
    scheme = desc.get(name) or (desc.get(mod + ".weight") if suffix else None)
    if scheme is None:
        raise CheckpointError(
            f"tensor {name!r} is not listed in {DESCRIPTION_FILE}; expected a scheme for every tensor"
        )
    if scheme == FLOAT:
        return scheme, canonical_name(name), ""
    return scheme, canonical_name(mod + ".weight"), suffix


def load_msmodelslim(
    path: str | Path,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    kv_cache_dtype: str | None = None,
    indexer_dtype: str | None = None,
) -> V4ForCausalLM:
    """Load a msModelSlim W8A8_DYNAMIC / W4A8_DYNAMIC checkpoint directory into parity's model.

    Args:
        path: directory with config.json, ``quant_model_description.json`` and safetensors.
        device: anything `parity.devices.resolve` accepts. dtype: compute dtype of the float parameters.
        kv_cache_dtype / indexer_dtype: default numerics of the model (default "bf16" / "bf16").
    Returns:
        `V4ForCausalLM` (eval) with ``weight_format`` "w8a8" or "w4a8".
    Raises:
        CheckpointError: unsupported scheme (tensor and scheme named), W4A8 outside the routed experts,
            non-zero ``weight_offset`` (asymmetric weights), wrong shapes, missing or unknown tensors.
        DeviceError: unknown device or not enough free memory.
    """
    p = Path(path)
    desc = read_description(p)
    cfg = load_config(p)
    dev = devices.resolve(device)
    files = _list_tensors(p)
    routes = {n: _route(n, desc) for n in files}
    linears: set[str] = set()
    experts: dict[str, int] = {}
    for n, (scheme, target, _) in routes.items():
        if scheme == FLOAT:
            continue
        m = _EXPERT_RE.match(target)
        if m:
            bits = 8 if scheme == W8A8_DYNAMIC else 4
            if experts.setdefault(m.group(1), bits) != bits:
                raise CheckpointError(
                    f"tensor {n!r}: routed experts of {m.group(1)} mix W8A8 and W4A8; expected one scheme per layer"
                )
        elif scheme == W4A8_DYNAMIC:
            raise CheckpointError(f"tensor {n!r} uses {W4A8_DYNAMIC}: parity runs W4A8 for routed experts only")
        else:
            linears.add(target.removesuffix(".weight"))
    weight_bytes_fmt = "w4a8" if 4 in experts.values() else "w8a8"
    has_mtp = any(t.startswith("model.mtp.") for _, t, _ in routes.values())
    check_fits(cfg, dev, dtype, weights=weight_bytes_fmt, include_mtp=has_mtp, what=f"loading {p}")
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    if not has_mtp:
        model.model.mtp = torch.nn.ModuleList()
    model.to_dtype(dtype)
    present = {n for n, _ in model.named_modules()}
    meta = torch.device("meta")
    for name in sorted(linears):
        local = resolve_target(name, present)
        old = model.get_submodule(local) if local else None
        if not isinstance(old, torch.nn.Linear) or old.bias is not None:
            raise CheckpointError(f"quantized tensor {name}.weight: the model has no bias-free linear {name!r}")
        _set(model, local, Int8Linear(old.in_features, old.out_features, device=meta))
    for name, bits in sorted(experts.items()):
        old = model.get_submodule(name)
        e, two_i, h = old.gate_up_proj.shape
        _set(
            model,
            name,
            Int8Experts(e, h, two_i // 2, float(getattr(old, "limit", cfg.swiglu_limit)), bits, device=meta),
        )
    model.to_empty(device=dev)
    reset_rope(model)
    _fill(model, cfg, files, routes)
    model.config = cfg
    model.kv_cache_dtype = kv_cache_dtype or "bf16"
    model.indexer_dtype = indexer_dtype or "bf16"
    model._modes(None, None)
    model.weight_format = weight_bytes_fmt
    return model.eval()


def _set(model, path: str, new) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _fill(model: V4ForCausalLM, cfg, files: dict[str, Path], routes: dict) -> None:
    """Copy every checkpoint tensor into the allocated model; check shapes and that nothing is missing."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    need = {k for k in model.state_dict() if not k.endswith(".weight_offset")}
    done: set[str] = set()
    inter = cfg.moe_intermediate_size
    by_file: dict[Path, list[str]] = {}
    for n, fp in files.items():
        by_file.setdefault(fp, []).append(n)
    with torch.no_grad():
        for fp, names in by_file.items():
            with safe_open(str(fp), "pt", device="cpu") as f:
                for n in names:
                    scheme, target, suffix = routes[n]
                    t = f.get_tensor(n)
                    m = _EXPERT_RE.match(target)
                    if m:
                        base, e, w = m.group(1), int(m.group(2)), m.group(3)
                        mod = model.get_submodule(base)
                        key = _expert_slot(mod, e, w, suffix, inter)
                        if key is None:
                            continue
                        buf_name, dst = key
                        _copy(dst, t, n)
                        done.add(f"{base}.{buf_name}#{e}:{w}")
                        continue
                    if scheme == FLOAT or suffix == "weight":
                        dst_name = target
                    elif suffix == "weight_scale":
                        dst_name = target.removesuffix(".weight") + ".weight_scale"
                    elif suffix == "weight_offset":
                        if bool((t != 0).any()):
                            raise CheckpointError(
                                f"tensor {n!r} has non-zero offsets: asymmetric weights are not "
                                f"supported; expected symmetric {scheme} (offset 0)"
                            )
                        continue
                    else:  # scale_bias: derived by vllm-ascend's fused kernel, not needed here
                        continue
                    if dst_name not in tensors:
                        raise CheckpointError(f"tensor {n!r} ({scheme}) has no counterpart {dst_name!r} in the model")
                    _copy(tensors[dst_name], t, n)
                    done.add(dst_name)
    expert_need = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Experts):
            for e in range(mod.n_experts):
                for w in ("w1", "w3", "w2"):
                    expert_need |= {f"{name}.{_PARTS[w]}_weight#{e}:{w}", f"{name}.{_PARTS[w]}_scale#{e}:{w}"}
            need -= {f"{name}.{b}" for b in ("gate_up_weight", "gate_up_scale", "down_weight", "down_scale")}
        elif hasattr(mod, "gate_up_proj") and isinstance(getattr(mod, "gate_up_proj", None), torch.nn.Parameter):
            for e in range(mod.gate_up_proj.shape[0]):
                for w in ("w1", "w3", "w2"):
                    expert_need.add(f"{name}.{'down_proj' if w == 'w2' else 'gate_up_proj'}#{e}:{w}")
            need -= {f"{name}.gate_up_proj", f"{name}.down_proj"}
    missing = sorted((need | expert_need) - done)
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
        model.lm_head.weight = model.model.embed_tokens.weight
    if missing:
        raise CheckpointError(
            f"msModelSlim checkpoint lacks {len(missing)} tensors for its config.json: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
        )


def _expert_slot(mod, e: int, w: str, suffix: str, inter: int):
    """(buffer name, destination view) for expert `e`'s `w` tensor with `suffix`; None for scale_bias /
    weight_offset (checked elsewhere) ; FLOAT experts fill ``gate_up_proj`` / ``down_proj`` rows.

    Raises:
        CheckpointError: a non-zero weight_offset.
    """
    if isinstance(mod, Int8Experts):
        if suffix in ("scale_bias", "weight_offset"):
            return None
        part = _PARTS[w]
        if suffix == "weight":
            buf = getattr(mod, f"{part}_weight")[e]
            rows = inter // 2 if mod.bits == 4 else inter
        else:
            buf = getattr(mod, f"{part}_scale")[e]
            rows = inter
        if part == "gate_up":
            buf = buf[:rows] if w == "w1" else buf[rows:]
        return f"{part}_{'weight' if suffix == 'weight' else 'scale'}", buf
    name = "down_proj" if w == "w2" else "gate_up_proj"
    dst = getattr(mod, name)[e]
    if w != "w2":
        dst = dst[:inter] if w == "w1" else dst[inter:]
    return name, dst


def _copy(dst: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if dst.numel() != t.numel() or (t.dim() == dst.dim() and tuple(t.shape) != tuple(dst.shape)):
        raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}: expected {list(dst.shape)}")
    dst.copy_(t.reshape(dst.shape).to(dst.dtype))


# ------------------------------------------------------------------------------------------ writer
def msmodelslim_tensors(cfg, state: dict, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in file order, description) of a float parity state dict in msModelSlim format `fmt`
    (`parity.checkpoint.msmodelslim.FORMATS`): every FP8 linear of the published layout as W8A8_DYNAMIC,
    routed experts W8A8_DYNAMIC or W4A8_DYNAMIC, the rest FLOAT in the release's dtypes. MTP blocks the
    state lacks are left out.

    Raises:
        CheckpointError: unknown format.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown msModelSlim format {fmt!r}: expected one of {', '.join(FORMATS)}")
    dense, expert = FORMATS[fmt]
    present = set(state)
    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {"model_quant_type": expert if expert == W4A8_DYNAMIC else dense, "version": "1.0.0"}
    for name, spec in official_layout(cfg).items():
        if spec.role == PLAIN:
            local = resolve_target(spec.target, present)
            if local is None:
                continue
            out[name] = state[local].detach().cpu().to(torch_dtype(spec.dtype)).contiguous()
            desc[name] = FLOAT
        elif spec.role == FP8:
            local = resolve_target(spec.target + ".weight", present)
            if local is None:
                continue
            q, s = quantize_weight_per_channel(state[local].detach().cpu().float(), 8)
            _emit(out, desc, name.removesuffix(".weight"), q, s, dense)
        elif spec.role == FP4:
            gu_name = resolve_target(spec.target + ".gate_up_proj", present)
            dn_name = resolve_target(spec.target + ".down_proj", present)
            if gu_name is None or dn_name is None:
                continue
            e, part = spec.expert
            inter = state[gu_name].shape[1] // 2
            w = {"w1": state[gu_name][e, :inter], "w3": state[gu_name][e, inter:], "w2": state[dn_name][e]}[part]
            bits = 4 if expert == W4A8_DYNAMIC else 8
            q, s = quantize_weight_per_channel(w.detach().cpu().float(), bits)
            _emit(out, desc, name.removesuffix(".weight"), pack_int4_rows(q) if bits == 4 else q, s, expert)
    return out, desc


def _emit(out: dict, desc: dict, mod: str, q: torch.Tensor, s: torch.Tensor, scheme: str) -> None:
    out[f"{mod}.weight"] = q.contiguous()
    out[f"{mod}.weight_scale"] = s[:, None].contiguous()
    out[f"{mod}.weight_offset"] = torch.zeros_like(s)[:, None].contiguous()
    for suffix in ("weight", "weight_scale", "weight_offset"):
        desc[f"{mod}.{suffix}"] = scheme


def export_msmodelslim(
    model, out_dir: str | Path, fmt: str, shard_bytes: int | None = None, tokenizer: bool = True
) -> Path:
    """Write a float parity model (``model.config``) as a msModelSlim checkpoint in format `fmt`:
    shards + index + config.json (no ``quantization_config``) + ``quant_model_description.json``.

    Raises:
        CheckpointError: unknown format; the directory cannot be written (`writer.write_checkpoint`).
    """
    cfg = model.config.replace(quantization_config=None, expert_dtype=None)
    tensors, desc = msmodelslim_tensors(cfg, model.state_dict(), fmt)
    d = writer.write_checkpoint(cfg, tensors, out_dir, shard_bytes or writer.DEFAULT_SHARD_BYTES, tokenizer)
    (d / DESCRIPTION_FILE).write_text(json.dumps(desc, indent=2) + "\n")
    return d


def export_tiny_msmodelslim(out_dir: str | Path, fmt: str, seed: int = 0, preset: str = "tiny") -> Path:
    """`parity export-tiny --format msmodelslim-w8a8|msmodelslim-w4a8`: the seeded random `preset` model in
    msModelSlim format `fmt`. Same seed, same bytes.

    Raises:
        ConfigError: unknown preset. CheckpointError: unknown format; see `export_msmodelslim`.
        DeviceError: the float model and its quantized copy would not fit in free RAM.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown msModelSlim format {fmt!r}: expected one of {', '.join(FORMATS)}")
    cfg = load_preset(preset)
    check_fits(
        cfg,
        "cpu",
        torch.float32,
        what=f"exporting preset {preset!r}",
        extra_bytes=estimate_weight_bytes(cfg, torch.bfloat16, weights=fmt.rpartition("-")[2]),
    )
    with torch.no_grad():
        model = build_model(cfg, device="cpu", dtype=torch.float32, seed=int(seed))
    return export_msmodelslim(model, out_dir, fmt)
