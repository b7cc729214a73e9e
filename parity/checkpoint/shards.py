"""Safetensors shards and their index: headers, the weight map, recognising and validating the published
layout. Torch-free; reads headers only, never tensor data.

Safetensors format: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}}`` (plus ``__metadata__``), then the data section that
``data_offsets`` index. The index ``model.safetensors.index.json`` is
``{"metadata": {"total_size": ...}, "weight_map": {tensor: shard file}}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from parity.checkpoint.layout import (
    FLOAT_DTYPES,
    FP4_SCALE,
    FP8_SCALE,
    INDEX_FILE,
    INT_DTYPES,
    PLAIN,
    SINGLE_FILE,
    ST_ITEMSIZE,
    SUPPORTED_EXPERT_DTYPES,
    SUPPORTED_QUANT,
    TensorSpec,
    block_size,
    official_layout,
)
from parity.config import ModelConfig, load_config
from parity.errors import CheckpointError


def is_official_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory in the published quantized layout: DeepSeek's own tensor names
    (``embed.weight`` / ``layers.N.attn...``, not transformers' ``model.embed_tokens.weight``) with
    block-scale siblings (``<module>.scale``). A bf16 checkpoint in DeepSeek's names is not (the plain
    reader reads it). Reads only the index (or the single file's header); never raises."""
    p = Path(path)
    try:
        if (p / INDEX_FILE).is_file():
            names = json.loads((p / INDEX_FILE).read_text()).get("weight_map", {})
        elif (p / SINGLE_FILE).is_file():
            names = read_header(p / SINGLE_FILE)
        else:
            return False
    except Exception:
        return False
    official = "embed.weight" in names or any(str(n).startswith("layers.") for n in names)
    return official and any(str(n).endswith(".scale") for n in names)


def missing_index_cause(path: str | Path) -> str | None:
    """Why a directory that holds published-layout shards is not recognised as such, or None.

    The published layout is recognised through ``model.safetensors.index.json`` (or a single
    ``model.safetensors``). When both are absent but ``*.safetensors`` shards in DeepSeek's names with FP8/FP4
    block scales (``<module>.scale``) are present, the index was lost (deleted, partial download): the
    returned sentence says so, naming a scale tensor and the shards. Reads only shard headers; never raises.
    """
    p = Path(path)
    if (p / INDEX_FILE).exists() or (p / SINGLE_FILE).exists():
        return None
    shards = sorted(p.glob("*.safetensors"))
    scales = []
    for f in shards:
        try:
            names = read_header(f)
        except Exception:
            continue
        if "embed.weight" in names or any(n.startswith("layers.") for n in names):
            scales += sorted(n for n in names if n.endswith(".scale"))
    if not scales:
        return None
    listed = ", ".join(f.name for f in shards[:3]) + (", ..." if len(shards) > 3 else "")
    return (
        f"checkpoint {str(p)!r} has no {INDEX_FILE}: its shards ({listed}) hold DeepSeek's published FP8/FP4 "
        f"layout (block scales such as {scales[0]!r}), which is recognised and loaded through that index "
        f"(it maps every tensor to its shard); restore {INDEX_FILE} (re-download it, or re-run the export)"
    )


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header of `path` ({name: {dtype, shape, data_offsets}}), validated against the size.

    Raises:
        CheckpointError: unreadable, truncated or corrupted file.
    """
    return read_header_and_base(path)[0]


def read_header_and_base(path: Path) -> tuple[dict[str, dict], int]:
    """(`read_header`, byte offset of the data section in the file).

    Raises:
        CheckpointError: unreadable, truncated or corrupted file (offsets outside the data section, a
            tensor whose byte span disagrees with its dtype and shape).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        end = 0
        for name, meta in header.items():
            a, z = meta["data_offsets"]
            if not (0 <= a <= z):
                raise ValueError(f"tensor {name!r} has invalid data offsets {meta['data_offsets']}")
            end = max(end, z)
        if 8 + n + end != size:
            raise ValueError(f"data section needs {8 + n + end} bytes, the file has {size}")
        for name, meta in header.items():
            if meta["dtype"] in ST_ITEMSIZE:
                want = math.prod(meta["shape"]) * ST_ITEMSIZE[meta["dtype"]]
                if meta["data_offsets"][1] - meta["data_offsets"][0] != want:
                    raise ValueError(f"tensor {name!r} spans {meta['data_offsets']}, its shape needs {want} bytes")
    except CheckpointError:
        raise
    except Exception as e:  # OSError, JSON, KeyError, ValueError...
        raise CheckpointError(
            f"shard {path.name}: not a complete safetensors file ({e}); expected an intact shard -- re-download it"
        ) from None
    return header, 8 + n


def weight_map(path: Path) -> dict[str, str]:
    """{tensor: shard file name} from the index (or the single file).

    Raises:
        CheckpointError: the index is unreadable or names a shard that does not exist; neither an index
            nor ``model.safetensors`` is present.
    """
    idx = path / INDEX_FILE
    if idx.is_file():
        try:
            data = json.loads(idx.read_text())
            wm = data["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("'weight_map' is not an object")
        except Exception as e:
            raise CheckpointError(
                f"{INDEX_FILE} in {path}: unreadable ({e}); expected JSON with a 'weight_map' "
                f"object mapping tensor names to shard files"
            ) from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{INDEX_FILE} names shard {missing[0]!r} which does not exist in {path}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return {str(k): str(v) for k, v in wm.items()}
    if (path / SINGLE_FILE).is_file():
        return {k: SINGLE_FILE for k in read_header(path / SINGLE_FILE)}
    raise CheckpointError(f"checkpoint directory {path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def check_quantization_config(cfg: ModelConfig, where: str = "config.json") -> None:
    """Check `cfg.quantization_config` / `expert_dtype` describe the published FP8 + FP4 layout.

    Raises:
        CheckpointError: missing or unknown quantization method / format / scale format / block size /
            expert dtype, naming the field and the expected value.
    """
    q = cfg.quantization_config
    if not isinstance(q, dict):
        raise CheckpointError(
            f"{where}: 'quantization_config' is missing: expected {SUPPORTED_QUANT} for the published FP8 layout"
        )
    for key, want in SUPPORTED_QUANT.items():
        got = q.get(key, "e4m3" if key == "fmt" else None)
        if str(got).lower() != want:
            raise CheckpointError(
                f"{where}: quantization_config.{key} is {got!r}: expected {want!r} (unknown quantization method)"
            )
    b = q.get("weight_block_size", [128, 128])
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        raise CheckpointError(
            f"{where}: quantization_config.weight_block_size is {b!r}: expected two positive "
            f"integers such as [128, 128]"
        )
    if cfg.expert_dtype not in SUPPORTED_EXPERT_DTYPES:
        raise CheckpointError(
            f"{where}: 'expert_dtype' is {cfg.expert_dtype!r}: expected one of "
            f"{SUPPORTED_EXPERT_DTYPES} (routed experts in FP4 e2m1)"
        )


def validate_checkpoint(
    path: str | Path, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, TensorSpec], dict[str, str], dict[str, tuple[dict, int]]]:
    """Check a published-layout checkpoint without reading tensor data.

    Returns:
        (cfg, layout, weight_map, headers): the parsed config, the expected tensors, {tensor: shard file},
        {shard file: (safetensors header, data-section offset)}.
    Raises:
        ConfigError: invalid config.json.
        CheckpointError: bad quantization_config; index unreadable or naming a missing shard; a truncated
            or corrupted shard; a tensor missing, unexpected, absent from its shard, or with the wrong
            dtype or shape (scales included) -- naming the file, the tensor and what was expected.
    """
    path = Path(path)
    cfg = cfg or load_config(path)
    check_quantization_config(cfg, str(path / "config.json"))
    layout = official_layout(cfg)
    wm = weight_map(path)
    headers = {f: read_header_and_base(path / f) for f in sorted(set(wm.values()))}
    missing = [n for n in layout if n not in wm]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: tensor {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; expected every tensor of the DeepSeek-V4 published layout for this config.json"
        )
    unexpected = [n for n in wm if n not in layout]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path}: unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ": not part of the published layout for this config.json"
        )
    for name, spec in layout.items():
        f = wm[name]
        meta = headers[f][0].get(name)
        if meta is None:
            raise CheckpointError(f"shard {f}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
        dt, shape = meta.get("dtype"), tuple(meta.get("shape", ()))
        ok_dt = (
            dt == spec.dtype
            or (spec.role == PLAIN and spec.dtype in FLOAT_DTYPES and dt in FLOAT_DTYPES)
            or (spec.role == PLAIN and spec.dtype in INT_DTYPES and dt in INT_DTYPES)
        )
        if not ok_dt:
            raise CheckpointError(f"shard {f}: tensor {name!r} has dtype {dt}; expected {spec.dtype}")
        if shape != spec.shape:
            what = ""
            if spec.role == FP8_SCALE:
                w = layout[name[: -len(".scale")] + ".weight"]
                br, bc = block_size(cfg)
                what = f" (ceil(out/{br}), ceil(in/{bc})) for weight {list(w.shape)}"
            elif spec.role == FP4_SCALE:
                w = layout[name[: -len(".scale")] + ".weight"]
                what = f" (out, in/32) for packed FP4 weight {list(w.shape)}"
            kind = "scale tensor" if spec.role in (FP8_SCALE, FP4_SCALE) else "tensor"
            raise CheckpointError(
                f"shard {f}: {kind} {name!r} has shape {list(shape)}; expected {list(spec.shape)}{what}"
            )
    return cfg, layout, wm, headers
