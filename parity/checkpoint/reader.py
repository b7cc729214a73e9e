"""`from_pretrained`: load a checkpoint directory into parity's `V4ForCausalLM`.

Published FP8/FP4 layout (DeepSeek's names with ``<module>.scale`` block scales, recognised through
``model.safetensors.index.json``): `parity.checkpoint.official_reader.load_official`. Otherwise float
safetensors (single file or sharded) in any naming `parity.checkpoint.layout.canonical_name` maps:

1. transformers' state-dict names (``model.layers.0.self_attn.q_a_proj.weight``,
   ``model.layers.0.mlp.experts.gate_up_proj``, ``lm_head.weight``) = parity's own names;
2. the original format transformers 5.23 ``save_pretrained`` writes by default (``save_original_format=True``:
   its ``conversion_mapping.py`` "deepseek_v4" renames reversed): ``model.layers.0.attn.wq_a.weight``,
   ``...ffn.experts.3.w1.weight`` (one tensor per expert), ``head.weight``;
3. DeepSeek's release names without the ``model.`` prefix, bf16 tensors.

The model is built on the meta device and each tensor is copied once into its final place (safetensors
``safe_open``), so the weights are never held twice. MTP tensors (``mtp.N.*`` / ``model.mtp.N.*``) are
optional: a checkpoint without any drops the MTP module (transformers never saves it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from parity import devices
from parity.checkpoint.conversion import check_quantization
from parity.checkpoint.layout import INDEX_FILE, canonical_name
from parity.checkpoint.msmodelslim import is_msmodelslim_checkpoint
from parity.checkpoint.msmodelslim_io import load_msmodelslim
from parity.checkpoint.official_reader import load_official
from parity.checkpoint.shards import is_official_checkpoint, missing_index_cause
from parity.config import load_config
from parity.errors import CheckpointError, ParallelError
from parity.model.build import reset_rope, resolve_dtype
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.memory import check_fits
from parity.model.parallel_layers import expert_part, parallelize_, shard_spec
from parity.model.weight_storage import STORAGE_DTYPES, store_weights_, stored_matrix_names

#: The per-expert pseudo-names `canonical_name` gives routed experts.
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


def from_pretrained(
    path,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    kv_cache_dtype: str | None = None,
    indexer_dtype: str | None = None,
    quantization: str | None = None,
    parallel=None,
) -> V4ForCausalLM:
    """Load a checkpoint directory (config.json + safetensors, single file or sharded).

    Args:
        path: directory in the published FP8/FP4 layout, or written by transformers'
            ``DeepseekV4ForCausalLM.save_pretrained``, or float tensors under DeepSeek's names.
        device: anything `parity.devices.resolve` accepts.
        dtype: compute dtype of the parameters, a torch.dtype or a name ("bfloat16", "float32"); mHC,
            norms, sinks, biases and the LM head stay fp32.
        kv_cache_dtype / indexer_dtype: default numerics of the returned model; float checkpoints default
            to the pure math ("bf16" / "bf16"), the published layout to "fp8" / "fp4".
        quantization: how published FP8/FP4 weights are held (`parity.checkpoint.conversion.QUANTIZATIONS`;
            None = as published, or W8A8 on a device without float8 tensors). msModelSlim checkpoints
            (``quant_model_description.json``) keep their own W8A8 / W4A8 weights and accept only None or
            their own format; float checkpoints only None / "bf16": "bf16" stores the matrices (linears,
            experts, router, LM head) in bf16 under a wider `dtype` (`parity.model.weight_storage`); None
            does so on the CPU when the checkpoint holds them in bf16 or fp16 (they keep that dtype),
            else everything is held in `dtype`.
        parallel: a `parity.distributed.context.ParallelContext` (None = one process): build this rank's
            part (`parity.model.parallel_layers`) and read only its slices of each tensor (safetensors
            ``get_slice``; the published layout: `load_official` with its block scales; peak memory ~ the
            shard plus one tensor).
    Returns:
        `V4ForCausalLM` in eval mode.
    Raises:
        ConfigError: config.json missing or invalid (from `parity.config`).
        CheckpointError: no safetensors, unreadable files, missing or unexpected tensors (first names and
            counts listed), wrong shapes (expected vs got); published-layout shards without their
            model.safetensors.index.json (the lost index named as the cause).
        DeviceError: unknown device, or the weights would not fit in its free memory
            (`parity.model.memory.check_fits`, checked before anything is allocated).
        ParallelError: the layout does not divide the model, or splits a published FP8 / FP4 tensor off
            its scale blocks (the tensor named); a parallel load of a msModelSlim checkpoint.
    """
    dtype = resolve_dtype(dtype)
    sharded = parallel is not None and not parallel.is_single
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    quantization = check_quantization(quantization)
    if is_msmodelslim_checkpoint(p):
        if sharded:
            raise ParallelError(
                f"{p}: tensor / expert parallel loading of msModelSlim checkpoints is not "
                f"supported yet; serve it on one device"
            )
        model = load_msmodelslim(p, device, dtype, kv_cache_dtype=kv_cache_dtype, indexer_dtype=indexer_dtype)
        if quantization not in (None, model.weight_format):
            raise CheckpointError(
                f"--quantization {quantization}: {p} is a msModelSlim {model.weight_format} "
                f"checkpoint; expected auto or {model.weight_format}"
            )
        return model
    if is_official_checkpoint(p):
        return load_official(
            p,
            device,
            dtype,
            kv_cache_dtype=kv_cache_dtype,
            indexer_dtype=indexer_dtype,
            quantization=quantization,
            parallel=parallel if sharded else None,
        )
    if quantization not in (None, "bf16"):
        raise CheckpointError(
            f"--quantization {quantization}: {p} holds float weights; converting float "
            f"checkpoints is not supported (expected auto or bf16)"
        )
    cause = missing_index_cause(p)  # published-layout shards whose index was lost
    if cause:
        raise CheckpointError(cause)
    cfg = load_config(p)
    files = _list_tensors(p)
    dev = devices.resolve(device)
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    expected = dict(model.state_dict())
    plan, drop_mtp = _plan(p, cfg, files, expected)
    storage, narrow = _matrix_storage(model, files, plan, dev, dtype, quantization)
    check_fits(
        cfg,
        dev,
        storage or dtype,
        quantized=False,
        include_mtp=not drop_mtp,
        what=f"loading {p}",
        **({"parallel": parallel.config} if sharded else {}),
    )
    if drop_mtp:
        model.model.mtp = torch.nn.ModuleList()
    if sharded:
        parallelize_(model, parallel)
    model.to_dtype(dtype)  # still on meta: each tensor is allocated once, in its final dtype
    if storage is not None:
        store_weights_(model, storage, narrow)
    model.to_empty(device=dev)
    reset_rope(model)
    _copy_tensors(
        model,
        cfg,
        files,
        plan,
        drop_mtp,
        {k: tuple(v.shape) for k, v in expected.items()},
        parallel if sharded else None,
    )
    if cfg.tie_word_embeddings and not any(v[0] == "lm_head.weight" for v in plan.values()):
        model.lm_head.weight = model.model.embed_tokens.weight
    if kv_cache_dtype:
        model.kv_cache_dtype = kv_cache_dtype
    if indexer_dtype:
        model.indexer_dtype = indexer_dtype
    model._modes(None, None)
    model.weight_format = "bf16"
    return model.eval()


def _matrix_storage(
    model, files: dict[str, Path], plan: dict, dev, dtype, quantization
) -> tuple[torch.dtype | None, set[str] | None]:
    """(dtype, parameter names or None = all) of the matrices stored narrower than `dtype`, by
    `from_pretrained`'s rule: all of them in bf16 for ``quantization="bf16"``; on the CPU with no
    quantization named, those the checkpoint holds in bf16 (else fp16); (None, None) = all in `dtype`."""
    if dtype.itemsize <= 2:
        return None, None
    if quantization == "bf16":
        return torch.bfloat16, None
    if dev.type != "cpu":
        return None, None
    names = stored_matrix_names(model)
    by_file: dict[Path, list[str]] = {}
    for name, (param, _) in plan.items():
        if param in names:
            by_file.setdefault(files[name], []).append(name)
    stored: dict[str, set[str]] = {}  # safetensors dtype -> model parameters
    for fp, ckpt_names in by_file.items():
        with safe_open(str(fp), "pt") as f:
            for n in ckpt_names:
                stored.setdefault(f.get_slice(n).get_dtype(), set()).add(plan[n][0])
    for st_dtype, t_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        if st_dtype in stored and t_dtype in STORAGE_DTYPES:
            return t_dtype, stored[st_dtype]
    return None, None


def _list_tensors(path: Path) -> dict[str, Path]:
    """{checkpoint tensor name: file holding it}, from the index or every ``*.safetensors`` file.

    Raises:
        CheckpointError: unreadable index, a shard it names is missing, no safetensors file, or a file
            that is not safetensors.
    """
    index = path / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index}: unreadable index ({e}); expected a JSON object with 'weight_map'"
            ) from None
        files = {}
        for k, f in wm.items():
            fp = path / f
            if not fp.is_file():
                raise CheckpointError(f"{index}: shard {f!r} (holding {k!r}) does not exist")
            files[k] = fp
        return files
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no *.safetensors file and no {INDEX_FILE}")
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


def _stacked(k: str) -> bool:
    return k.endswith(".mlp.experts.gate_up_proj") or k.endswith(".mlp.experts.down_proj")


def _plan(
    p: Path, cfg, files: dict[str, Path], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, tuple[str, tuple[int, str] | None]], bool]:
    """({checkpoint name: (model tensor, (expert, "w1" | "w2" | "w3") or None)}, drop the MTP module).

    Every model tensor, and for stacked experts every per-expert part, must be covered once; MTP may be
    absent as a whole; a tied LM head may be absent.

    Raises:
        CheckpointError: missing or unexpected tensors, counted and the first names listed.
    """
    slots: dict[str, str] = {}  # required slots: every tensor, and every per-expert part of stacked experts
    for k, t in expected.items():
        if not _stacked(k):
            slots[k] = k
        else:
            for e in range(t.shape[0]):
                for w in ("w2",) if k.endswith("down_proj") else ("w1", "w3"):
                    slots[f"{k}#{e}:{w}"] = k
    plan: dict[str, tuple] = {}
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
    return plan, drop_mtp


def _read_shard(f, name: str, spec):
    """The part ``spec`` (`parity.model.parallel_layers.Shard`) of tensor ``name``, read by slices."""
    sl = f.get_slice(name)
    dim, parts = spec
    pieces = [sl[(slice(None),) * dim + (slice(a, b),)] for a, b in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _copy_tensors(
    model: V4ForCausalLM,
    cfg,
    files: dict[str, Path],
    plan: dict,
    drop_mtp: bool,
    full_shapes: dict[str, tuple] | None = None,
    parallel=None,
) -> None:
    """Copy every planned tensor into the allocated model, file by file; routed experts into their rows
    of ``gate_up_proj`` (``w1`` -> ``[:I]``, ``w3`` -> ``[I:]``) or ``down_proj`` (``w2``). With
    ``parallel``, only this rank's slices are read (``full_shapes``: the unsharded shapes).

    Raises:
        CheckpointError: a tensor's shape differs from the model's (expected vs got).
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    inter = cfg.moe_intermediate_size
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
                        want = full_shapes[param] if parallel is not None else tuple(dst.shape)
                    else:
                        want = (inter, cfg.hidden_size) if sel[1] in ("w1", "w3") else (cfg.hidden_size, inter)
                    if shp != want:
                        raise CheckpointError(
                            f"tensor {name!r} has shape {list(shp)}: expected {list(want)} (for {param})"
                        )
                    if parallel is not None:
                        _copy_shard(f, name, param, sel, dst, cfg, full_shapes[param], parallel)
                        continue
                    t = f.get_tensor(name)
                    if sel is None:
                        dst.copy_(t.to(dst.dtype))
                    else:
                        e, w = sel
                        part = {"w1": dst[e, :inter], "w3": dst[e, inter:], "w2": dst[e]}[w]
                        part.copy_(t.to(dst.dtype))


def _copy_shard(f, name: str, param: str, sel, dst: torch.Tensor, cfg, full_shape: tuple, parallel) -> None:
    """This rank's part of checkpoint tensor ``name`` into ``dst`` (its local `param`)."""
    if sel is None:
        spec = shard_spec(param, full_shape, cfg, parallel)
        dst.copy_((_read_shard(f, name, spec) if spec is not None else f.get_tensor(name)).to(dst.dtype))
        return
    e, w = sel
    where = expert_part(e, w, cfg, parallel)
    if where is None:
        return
    le, cols = where
    inter = dst.shape[1] // 2 if w != "w2" else dst.shape[2]
    if w == "w2":
        dst[le].copy_(_read_shard(f, name, (1, [(cols.start, cols.stop)])).to(dst.dtype))
    else:
        part = dst[le, :inter] if w == "w1" else dst[le, inter:]
        part.copy_(_read_shard(f, name, (0, [(cols.start, cols.stop)])).to(dst.dtype))
