"""Load a checkpoint in the published FP8/FP4 layout into parity's `V4ForCausalLM`.

The model is built on the meta device with its FP8 linears swapped for `parity.model.quant` FP8 modules
and its routed experts for `FP4Experts`, allocated once on the target device, and every shard is read
once, tensor by tensor, in file order (`parity.checkpoint.tensor_io.read_into`). With
``quantized=False`` each weight is paired with its scale and dequantized into a plain model instead;
``quantization="bf16"`` (the CPU default) does the same into bf16-stored matrices under an fp32 compute
dtype (`parity.model.weight_storage`: exact for FP8/FP4 values, half the bytes of fp32).
With a parallel context the skeleton is this rank's part (`parity.model.parallel_layers.parallelize_`)
and only its slices are read: weights with their block scales, routed experts it does not own skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from parity import devices
from parity.checkpoint.conversion import check_quantization, convert_published
from parity.checkpoint.layout import (
    FP4,
    FP4_SCALE,
    FP4_SCALE_BLOCK,
    FP8,
    FP8_SCALE,
    PLAIN,
    ST_ITEMSIZE,
    TensorSpec,
    block_size,
    resolve_target,
)
from parity.checkpoint.shards import validate_checkpoint
from parity.checkpoint.tensor_io import read_shard_into, torch_dtype
from parity.config import ModelConfig
from parity.devices.capability_table import no_fp8_requested
from parity.errors import CheckpointError
from parity.model import fp_formats as ff
from parity.model import quant
from parity.model.build import reset_rope
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.memory import check_fits
from parity.model.parallel_layers import (
    Shard,
    expert_part,
    fp8_shards,
    parallelize_,
    scaled_shard,
    shard_shape,
    shard_spec,
)
from parity.model.weight_storage import store_weights_

#: How the published FP8/FP4 weights are held on the CPU when no quantization is named (see `load_official`).
CPU_DEFAULT_QUANTIZATION = "bf16"


def load_official(
    path: str | Path,
    device: Any = "cpu",
    dtype=None,
    *,
    quantized: bool = True,
    kv_cache_dtype: str | None = None,
    indexer_dtype: str | None = None,
    native_fp8: bool | None = None,
    progress: bool = True,
    quantization: str | None = None,
    parallel=None,
) -> V4ForCausalLM:
    """Load a checkpoint in the published FP8/FP4 layout into parity's model.

    Parameters the model keeps in fp32 stay fp32; the rest are allocated in `dtype`; the high-precision
    model is never materialised when `quantized`. A tqdm bar counts the bytes read.

    Args:
        path: checkpoint directory (config.json, model.safetensors.index.json, shards).
        device: anything `parity.devices.resolve` accepts. dtype: compute dtype (default torch.float32).
        quantized: False dequantizes every weight into a plain model instead (the reference the
            quantized modules are tested against; needs the high-precision memory).
        kv_cache_dtype / indexer_dtype: default numerics of the returned model; checkpoints in the
            published layout default to the official behaviour, "fp8" / "fp4".
        native_fp8: use FP8 GEMMs in QuantLinear; None = where `parity.devices.has_fp8(device)`.
        progress: show the progress bar.
        quantization: how the FP8/FP4 weights are held (`parity.checkpoint.conversion.QUANTIZATIONS`):
            "fp8"/"fp4" as published (dequantized block by block in each forward), "w8a8"/"w4a8" converted
            to int8 linears and int8/int4 experts after loading, "bf16" = dequantized once at load into
            bf16 matrices (exact: `parity.model.weight_storage`; under an fp32 `dtype` the activations
            and accumulation stay fp32 and the LM head is stored bf16 as published). None = "bf16" on the
            CPU (`CPU_DEFAULT_QUANTIZATION`: decode there is bound by reading weights, and widening bf16
            in registers beats dequantizing FP8/FP4 per step, docs/benchmarks.md), elsewhere as
            published where the device has float8 tensors; without float8 tensors "w8a8"
            (`parity.devices.float8_tensors`; there FP8 bytes are read as uint8). With ``quantized=False``,
            None keeps `dtype` throughout.
        parallel: a `parity.distributed.context.ParallelContext` (None = one process): load this rank's
            part, reading only its slices (FP8 weights split by rows or columns with their 128x128 scales;
            FP4 experts whole per owning rank under EP, else split along the intermediate dimension with
            their 1x32 scales). A conversion to w8a8 / w4a8 then quantizes each rank's part on its own,
            so row-parallel shards get per-channel scales of their own columns (not bit-equal to one
            process).
    Returns:
        The model (eval mode) with ``model.config`` = the parsed ModelConfig.
    Raises:
        CheckpointError / ConfigError: see `parity.checkpoint.shards.validate_checkpoint`; also a scale
            holding NaN (UE8M0 byte 255), or a shard that cannot be opened or ends early.
        DeviceError: unknown or unavailable device; the model would not fit in the device's free memory
            (`parity.model.memory.check_fits`, per device under `parallel`; checked before anything is
            allocated).
        ParallelError: the layout does not divide the model, or splits an FP8 / FP4 tensor off its
            scale blocks (the tensor named).
    """
    path = Path(path)
    dtype = dtype or torch.float32
    dev = devices.resolve(device)
    quantization = check_quantization(quantization)
    if not devices.float8_tensors(dev) and not no_fp8_requested():
        ff.set_float8_tensors(False)  # a real device without float8 tensors: for the rest of the process
    if quantization is None:
        if dev.type == "cpu" and quantized and ff.float8_tensors():
            quantization = CPU_DEFAULT_QUANTIZATION
        else:
            quantization = "fp8" if ff.float8_tensors() else "w8a8"
    storage = torch.bfloat16 if quantization == "bf16" and quantized and dtype.itemsize > 2 else None
    if quantization == "bf16":
        quantized = False
    cfg, layout, wm, headers = validate_checkpoint(path)
    ctx = parallel if parallel is not None and not parallel.is_single else None
    check_fits(
        cfg,
        dev,
        storage or dtype,
        quantized=quantized,
        weights="bf16" if storage is not None else None,
        what=f"loading {path}",
        **({"parallel": ctx.config} if ctx is not None else {}),
    )
    block = block_size(cfg)
    if native_fp8 is None:
        native_fp8 = devices.has_fp8(dev)
    model = _build_skeleton(cfg, dev, dtype, quantized, block, layout, native_fp8, ctx, storage)
    present = (
        {n for n, _ in model.named_parameters()}
        | {n for n, _ in model.named_buffers()}
        | {n for n, _ in model.named_modules()}
    )
    targets: dict[str, str] = {}  # official name -> model name (MTP skipped if the model has none)
    parts: dict[str, tuple[Shard | None, int | None]] = {}  # official name -> (slice read, local expert)
    for name, spec in layout.items():
        local = resolve_target(spec.target, present)
        if local is None:
            if spec.mtp:
                continue
            raise CheckpointError(f"the model has no {spec.target!r} to receive checkpoint tensor {name!r}")
        part = _rank_part(name, spec, local, layout, cfg, block, ctx)
        if part is not None:  # None: a routed expert another rank holds
            targets[name] = local
            parts[name] = part
    pending: dict[str, dict[str, torch.Tensor]] = {}
    by_file: dict[str, list[str]] = {}
    for name in targets:
        by_file.setdefault(wm[name], []).append(name)
    shapes = {n: shard_shape(layout[n].shape, parts[n][0]) for n in targets}
    total = sum(math.prod(shapes[n]) * ST_ITEMSIZE[layout[n].dtype] for n in targets)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=not progress)
    with torch.no_grad():
        for fname in sorted(by_file):
            header, base = headers[fname]
            names = sorted(by_file[fname], key=lambda n: header[n]["data_offsets"][0])  # sequential reads
            try:
                fh = open(path / fname, "rb", buffering=0)
            except OSError as e:
                raise CheckpointError(f"shard {fname}: cannot open ({e})") from None
            with fh:
                for name in names:
                    spec, local, meta = layout[name], targets[name], header[name]
                    shard, le = parts[name]
                    direct = quantized or spec.role == PLAIN
                    dst = (
                        _destination(model, spec, local, le)
                        if direct
                        else torch.empty(shapes[name], dtype=torch_dtype(meta["dtype"]))
                    )
                    read_shard_into(fh, base + meta["data_offsets"][0], meta, dst, shard, fname, name)
                    if spec.role in (FP8_SCALE, FP4_SCALE) and bool((dst.view(torch.uint8) == ff.UE8M0_NAN).any()):
                        raise CheckpointError(
                            f"shard {fname}: scale tensor {name!r} holds NaN (UE8M0 byte 255); "
                            f"expected finite power-of-two scales"
                        )
                    if not direct:
                        _fill_dequantized(model, spec, local, dst, block, pending, le)
                    bar.update(dst.numel() * ST_ITEMSIZE[spec.dtype])
    bar.close()
    if pending:
        raise CheckpointError(f"checkpoint {path}: weight/scale pair incomplete for {sorted(pending)[0]!r}")
    model.config = cfg
    model.kv_cache_dtype = kv_cache_dtype or "fp8"
    model.indexer_dtype = indexer_dtype or "fp4"
    model._modes(None, None)
    if quantized:
        convert_published(model, quantization)
    model.weight_format = quantization if quantized else "bf16"
    return model.eval()


def _build_skeleton(
    cfg: ModelConfig,
    dev,
    dtype,
    quantized: bool,
    block: tuple[int, int],
    layout: dict,
    native_fp8: bool,
    parallel=None,
    storage: torch.dtype | None = None,
) -> V4ForCausalLM:
    """parity's `V4ForCausalLM` for `cfg`, built on the meta device, with FP8 linears / routed experts
    swapped for quantized modules (if `quantized`), cut to rank ``parallel``'s part (if given; a
    `ParallelContext`), its matrices set to `storage` (if given: `store_weights_`), then allocated
    (uninitialised) on `dev` in `dtype`.

    Raises:
        ParallelError: from `parity.model.parallel_layers.parallelize_`.
    """
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    model.to_dtype(dtype)  # still on meta: allocate each tensor once, in its final dtype
    present = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
    if quantized:
        meta = torch.device("meta")
        for mpath in sorted({s.target for s in layout.values() if s.role == FP8}):
            local = resolve_target(mpath, present)
            if local is not None:
                _set_module(model, local, quant.quantize_linear_(_get_module(model, local), block, meta, dtype))
        for mpath in sorted({s.target for s in layout.values() if s.role == FP4}):
            local = resolve_target(mpath, present)
            if local is None:
                continue
            old = _get_module(model, local)
            e, inter2, h = old.gate_up_proj.shape
            limit = float(getattr(old, "limit", cfg.swiglu_limit))
            _set_module(model, local, quant.FP4Experts(e, h, inter2 // 2, limit, device=meta, compute_dtype=dtype))
    if parallel is not None:
        parallelize_(model, parallel)
    if storage is not None:
        store_weights_(model, storage)
    model.to_empty(device=dev)
    reset_rope(model)
    for m in model.modules():
        if isinstance(m, quant._FP8WeightMixin):
            m.native_fp8 = bool(native_fp8)
    return model


def _get_module(model, path: str):
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _set_module(model, path: str, new) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_module(model, parent) if parent else model, leaf, new)


def _get_tensor(model, name: str) -> torch.Tensor:
    parent, _, leaf = name.rpartition(".")
    mod = _get_module(model, parent) if parent else model
    t = mod._parameters.get(leaf)
    if t is None:
        t = mod._buffers.get(leaf)
    if t is None:
        raise CheckpointError(f"the model has no parameter or buffer {name!r}")
    return t


def _rank_part(
    name: str, spec: TensorSpec, local: str, layout: dict, cfg: ModelConfig, block: tuple[int, int], ctx
) -> tuple[Shard | None, int | None] | None:
    """(the part of official tensor ``name`` this rank reads, None = all of it; the local index of its
    routed expert or None), or None when the tensor is a routed expert another rank holds.

    Raises:
        ParallelError: a split off the FP8 128x128 or FP4 1x32 scale blocks (`scaled_shard`).
    """
    e = spec.expert[0] if spec.expert is not None else None
    if ctx is None:
        return None, e
    if spec.role == PLAIN:
        return shard_spec(local, spec.shape, cfg, ctx), None
    if spec.role in (FP8, FP8_SCALE):
        out_f, in_f = layout[name.rpartition(".")[0] + ".weight"].shape
        w, s = fp8_shards(local, out_f, in_f, block, cfg, ctx)
        return (w if spec.role == FP8 else s), None
    where = expert_part(e, spec.expert[1], cfg, ctx)
    if where is None:
        return None
    le, cols = where
    inter = cfg.moe_intermediate_size
    if cols.start == 0 and cols.stop == inter:
        return None, le
    if spec.expert[1] != "w2":  # w1 / w3 [I, H]: rows of the weight and of its 1x32 scales
        return (0, [(cols.start, cols.stop)]), le
    split = (1, [(cols.start, cols.stop)])  # w2 [H, I]: columns, 2 values per byte / one scale per 32
    return scaled_shard(split, 2 if spec.role == FP4 else FP4_SCALE_BLOCK, inter, name, ctx), le


def _destination(model, spec: TensorSpec, local: str, expert: int | None = None) -> torch.Tensor:
    """The model tensor (or slice of it) that official tensor `spec` is read into (quantized model);
    ``expert``: the routed expert's local index (this rank's experts)."""
    if spec.role == PLAIN:
        return _get_tensor(model, local)
    mod = _get_module(model, local)
    if spec.role == FP8:
        return mod.qweight
    if spec.role == FP8_SCALE:
        return mod.scale
    e, part = expert, spec.expert[1]  # FP4 routed experts: w1 -> gate_up rows [:I], w3 -> rows [I:], w2 -> down
    inter = mod.inter
    if spec.role == FP4:
        gu, dn = mod.gate_up_qweight, mod.down_qweight
    else:
        gu, dn = mod.gate_up_scale, mod.down_scale
    dst = {"w1": gu[e, :inter], "w3": gu[e, inter:], "w2": dn[e]}[part]
    return dst.view(torch.int8) if spec.role == FP4 else dst


def _fill_dequantized(
    model,
    spec: TensorSpec,
    local: str,
    t: torch.Tensor,
    block: tuple[int, int],
    pending: dict,
    expert: int | None = None,
) -> None:
    """quantized=False: pair each FP8/FP4 weight (this rank's part) with its scale and write the
    dequantized values; ``expert``: the routed expert's local index."""
    mod = _get_module(model, local)
    key = local if spec.expert is None else f"{local}#{spec.expert[0]}.{spec.expert[1]}"
    slot = pending.setdefault(key, {})
    slot[spec.role] = t
    if len(slot) < 2:
        return
    del pending[key]
    if spec.role in (FP8, FP8_SCALE):
        w = ff.dequantize_fp8_weight(slot[FP8], slot[FP8_SCALE], block, torch.float32)
        mod.weight.copy_(w.to(mod.weight.dtype))
        return
    e, part = expert, spec.expert[1]
    w = ff.dequantize_fp4_weight(slot[FP4].view(torch.uint8), slot[FP4_SCALE], FP4_SCALE_BLOCK, torch.float32)
    inter = mod.gate_up_proj.shape[1] // 2
    dst = {"w1": mod.gate_up_proj[e, :inter], "w3": mod.gate_up_proj[e, inter:], "w2": mod.down_proj[e]}[part]
    dst.copy_(w.to(dst.dtype))
