"""The published DeepSeek-V4 checkpoint layout as one table: official tensor names <-> parity's names,
dtypes and shapes. Torch-free.

Layout of ``deepseek-ai/DeepSeek-V4-Flash`` / ``-Pro`` on the Hugging Face Hub: sharded safetensors
``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``; tensor names of DeepSeek's
``inference/model.py`` (no ``model.`` prefix); FP8 linears ``F8_E4M3 [out, in]`` + ``.scale``
``F8_E8M0 [ceil(out/128), ceil(in/128)]``; routed experts FP4 e2m1 packed two per byte (low nibble = even
element) ``I8 [out, in/2]`` + ``.scale`` ``F8_E8M0 [out, in/32]``; the rest BF16 / F32 / I64 as `TABLE`
lists them.

Sources (facts, not code): DeepSeek's ``inference/model.py`` (``Linear``, ``Compressor``, ``Indexer``,
``Gate``, ``Block``, ``MTPBlock``) and ``inference/convert.py``; the release's ``config.json`` and
safetensors headers (e.g. ``layers.0.attn.wq_a.weight`` F8_E4M3 [1024, 4096] / ``.scale`` F8_E8M0 [8, 32];
``layers.0.ffn.experts.0.w1.weight`` I8 [2048, 2048] / ``.scale`` F8_E8M0 [2048, 128]), as reproduced in
TensorRT-LLM's DeepSeek-V4 checkpoint-layout tests; transformers 5.23 ``conversion_mapping.py``
(``"deepseek_v4"``: official -> transformers names, whose state-dict names parity's model uses).
"""

from __future__ import annotations

import dataclasses
import math
import re

from parity.config import CSA, HASH_MOE, ModelConfig
from parity.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: quantization_config the reader understands (the release's config.json).
SUPPORTED_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"}
SUPPORTED_EXPERT_DTYPES = ("fp4",)
#: Weights per UE8M0 scale of an FP4 routed-expert row (``inference/model.py``: ``[out, in/32]`` scales).
FP4_SCALE_BLOCK = 32

# Roles of a tensor: one plain tensor, or a quantized weight / its block scale.
FP8 = "fp8"  # F8_E4M3 weight, sibling .scale
FP8_SCALE = "fp8_scale"
FP4 = "fp4"  # I8 packed e2m1 weight, sibling .scale
FP4_SCALE = "fp4_scale"
PLAIN = "plain"

#: Bytes per element of the safetensors dtypes the layout uses.
ST_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}
FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I64", "I32")

# Where a row lives (`Row.scope`) and which blocks have it (`Row.part`).
EMBED, BLOCK, MTP, FINAL = "embed", "block", "mtp", "final"
ALL, COMPRESSED, CSA_ONLY, HASH, SCORED, EXPERT = "all", "compressed", "csa", "hash", "scored", "expert"


@dataclasses.dataclass(frozen=True)
class Row:
    """One entry of the layout table.

    scope: EMBED / FINAL (model level, full names), BLOCK (inside ``layers.{i}.`` / ``mtp.{k}.``; official
    ``Block``), MTP (the extra tensors of an ``MTPBlock``, inside ``mtp.{k}.``).
    part: which blocks hold it: ALL, COMPRESSED (compress ratio > 0), CSA_ONLY (ratio = the CSA rate;
    the indexer), HASH / SCORED (hash-routed or scored MoE gate), EXPERT (once per routed expert ``{e}``).
    official: official name in the scope; for FP8 / FP4 the module, whose tensors are ``.weight`` + ``.scale``.
    module: parity's (transformers') name in the scope: the parameter (PLAIN), the linear (FP8) or the
    stacked experts module (FP4; ``w1``/``w3`` fill ``gate_up_proj`` rows ``[:I]``/``[I:]``, ``w2`` ``down_proj``).
    kind: PLAIN, FP8 or FP4. dtype: safetensors dtype of a PLAIN tensor ("" for FP8 / FP4).
    shape: dims by name (`_dims`) or int; PLAIN: the tensor's shape, FP8 / FP4: the logical ``[out, in]``.
    aliases: other official-style spellings of the same tensor (transformers' ``save_pretrained`` original
    format writes the attention ``kv_norm`` as ``attn.norm``).
    """

    scope: str
    part: str
    official: str
    module: str
    kind: str
    dtype: str
    shape: tuple[str | int, ...]
    aliases: tuple[str, ...] = ()


def _r(scope, part, official, module, kind, dtype, *shape, aliases=()) -> Row:
    return Row(scope, part, official, module, kind, dtype, tuple(shape), tuple(aliases))


#: The layout, in the release's file order (embed, layers, mtp, final norm and head).
TABLE: tuple[Row, ...] = (
    _r(EMBED, ALL, "embed.weight", "model.embed_tokens.weight", PLAIN, "BF16", "vocab", "hidden"),
    # Block: norms and the two hyper-connections (mHC)
    _r(BLOCK, ALL, "attn_norm.weight", "input_layernorm.weight", PLAIN, "BF16", "hidden"),
    _r(BLOCK, ALL, "ffn_norm.weight", "post_attention_layernorm.weight", PLAIN, "BF16", "hidden"),
    _r(BLOCK, ALL, "hc_attn_fn", "attn_hc.fn", PLAIN, "F32", "mix", "hc*hidden"),
    _r(BLOCK, ALL, "hc_attn_base", "attn_hc.base", PLAIN, "F32", "mix"),
    _r(BLOCK, ALL, "hc_attn_scale", "attn_hc.scale", PLAIN, "F32", 3),
    _r(BLOCK, ALL, "hc_ffn_fn", "ffn_hc.fn", PLAIN, "F32", "mix", "hc*hidden"),
    _r(BLOCK, ALL, "hc_ffn_base", "ffn_hc.base", PLAIN, "F32", "mix"),
    _r(BLOCK, ALL, "hc_ffn_scale", "ffn_hc.scale", PLAIN, "F32", 3),
    # Block: attention
    _r(BLOCK, ALL, "attn.attn_sink", "self_attn.sinks", PLAIN, "F32", "heads"),
    _r(BLOCK, ALL, "attn.wq_a", "self_attn.q_a_proj", FP8, "", "q_rank", "hidden"),
    _r(BLOCK, ALL, "attn.q_norm.weight", "self_attn.q_a_norm.weight", PLAIN, "BF16", "q_rank"),
    _r(BLOCK, ALL, "attn.wq_b", "self_attn.q_b_proj", FP8, "", "heads*head_dim", "q_rank"),
    _r(BLOCK, ALL, "attn.wkv", "self_attn.kv_proj", FP8, "", "head_dim", "hidden"),
    _r(
        BLOCK,
        ALL,
        "attn.kv_norm.weight",
        "self_attn.kv_norm.weight",
        PLAIN,
        "BF16",
        "head_dim",
        aliases=("attn.norm.weight",),
    ),
    _r(BLOCK, ALL, "attn.wo_a", "self_attn.o_a_proj", FP8, "", "o_rank", "group_in"),
    _r(BLOCK, ALL, "attn.wo_b", "self_attn.o_b_proj", FP8, "", "hidden", "o_rank"),
    # Block: the KV compressor (CSA and HCA layers)
    _r(
        BLOCK,
        COMPRESSED,
        "attn.compressor.wkv.weight",
        "self_attn.compressor.kv_proj.weight",
        PLAIN,
        "BF16",
        "kv_width",
        "hidden",
    ),
    _r(
        BLOCK,
        COMPRESSED,
        "attn.compressor.wgate.weight",
        "self_attn.compressor.gate_proj.weight",
        PLAIN,
        "BF16",
        "kv_width",
        "hidden",
    ),
    _r(
        BLOCK,
        COMPRESSED,
        "attn.compressor.ape",
        "self_attn.compressor.position_bias",
        PLAIN,
        "F32",
        "ratio",
        "kv_width",
    ),
    _r(
        BLOCK,
        COMPRESSED,
        "attn.compressor.norm.weight",
        "self_attn.compressor.kv_norm.weight",
        PLAIN,
        "BF16",
        "head_dim",
    ),
    # Block: the lightning indexer and its compressor (CSA layers)
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.wq_b",
        "self_attn.compressor.indexer.q_b_proj",
        FP8,
        "",
        "index_heads*index_dim",
        "q_rank",
    ),
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.weights_proj.weight",
        "self_attn.compressor.indexer.scorer.weights_proj.weight",
        PLAIN,
        "BF16",
        "index_heads",
        "hidden",
    ),
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.compressor.wkv.weight",
        "self_attn.compressor.indexer.kv_proj.weight",
        PLAIN,
        "BF16",
        "index_kv_width",
        "hidden",
    ),
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.compressor.wgate.weight",
        "self_attn.compressor.indexer.gate_proj.weight",
        PLAIN,
        "BF16",
        "index_kv_width",
        "hidden",
    ),
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.compressor.ape",
        "self_attn.compressor.indexer.position_bias",
        PLAIN,
        "F32",
        "ratio",
        "index_kv_width",
    ),
    _r(
        BLOCK,
        CSA_ONLY,
        "attn.indexer.compressor.norm.weight",
        "self_attn.compressor.indexer.kv_norm.weight",
        PLAIN,
        "BF16",
        "index_dim",
    ),
    # Block: MoE (gate, routed experts, shared expert)
    _r(BLOCK, ALL, "ffn.gate.weight", "mlp.gate.weight", PLAIN, "BF16", "experts", "hidden"),
    _r(BLOCK, HASH, "ffn.gate.tid2eid", "mlp.gate.tid2eid", PLAIN, "I64", "vocab", "topk"),
    _r(BLOCK, SCORED, "ffn.gate.bias", "mlp.gate.e_score_correction_bias", PLAIN, "F32", "experts"),
    _r(BLOCK, EXPERT, "ffn.experts.{e}.w1", "mlp.experts", FP4, "", "inter", "hidden"),
    _r(BLOCK, EXPERT, "ffn.experts.{e}.w2", "mlp.experts", FP4, "", "hidden", "inter"),
    _r(BLOCK, EXPERT, "ffn.experts.{e}.w3", "mlp.experts", FP4, "", "inter", "hidden"),
    _r(BLOCK, ALL, "ffn.shared_experts.w1", "mlp.shared_experts.gate_proj", FP8, "", "shared_inter", "hidden"),
    _r(BLOCK, ALL, "ffn.shared_experts.w2", "mlp.shared_experts.down_proj", FP8, "", "hidden", "shared_inter"),
    _r(BLOCK, ALL, "ffn.shared_experts.w3", "mlp.shared_experts.up_proj", FP8, "", "shared_inter", "hidden"),
    # MTPBlock: input projections, norms and its own hyper-connection head
    _r(MTP, ALL, "e_proj", "e_proj", FP8, "", "hidden", "hidden"),
    _r(MTP, ALL, "h_proj", "h_proj", FP8, "", "hidden", "hidden"),
    _r(MTP, ALL, "enorm.weight", "enorm.weight", PLAIN, "BF16", "hidden"),
    _r(MTP, ALL, "hnorm.weight", "hnorm.weight", PLAIN, "BF16", "hidden"),
    _r(MTP, ALL, "norm.weight", "norm.weight", PLAIN, "BF16", "hidden"),
    _r(MTP, ALL, "hc_head_fn", "hc_head.hc_fn", PLAIN, "F32", "hc", "hc*hidden"),
    _r(MTP, ALL, "hc_head_base", "hc_head.hc_base", PLAIN, "F32", "hc"),
    _r(MTP, ALL, "hc_head_scale", "hc_head.hc_scale", PLAIN, "F32", 1),
    # final norm, hyper-connection head, LM head
    _r(FINAL, ALL, "norm.weight", "model.norm.weight", PLAIN, "BF16", "hidden"),
    _r(FINAL, ALL, "hc_head_fn", "model.hc_head.hc_fn", PLAIN, "F32", "hc", "hc*hidden"),
    _r(FINAL, ALL, "hc_head_base", "model.hc_head.hc_base", PLAIN, "F32", "hc"),
    _r(FINAL, ALL, "hc_head_scale", "model.hc_head.hc_scale", PLAIN, "F32", 1),
    _r(FINAL, ALL, "head.weight", "lm_head.weight", PLAIN, "BF16", "vocab", "hidden"),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the published layout for a given config.

    name: official tensor name; shape: elements per dim; dtype: safetensors dtype string
    (F8_E4M3, F8_E8M0, I8, BF16, F32, I64); role: PLAIN / FP8 / FP8_SCALE / FP4 / FP4_SCALE;
    target: parity's (transformers-style, ``model.``-prefixed) name of what it fills -- the parameter
    (PLAIN), the linear module (FP8, FP8_SCALE) or the experts module (FP4, FP4_SCALE); expert:
    (index, "w1" | "w3" | "w2") for routed experts; mtp: True inside an MTP block (skipped when the model
    has none).
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
        return math.prod(self.shape) * ST_ITEMSIZE[self.dtype]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_size(cfg: ModelConfig) -> tuple[int, int]:
    """FP8 weight tile ``quantization_config.weight_block_size`` (rows, cols); [128, 128] in the release."""
    b = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])
    return int(b[0]), int(b[1])


def _dims(cfg: ModelConfig, ratio: int) -> dict[str, int]:
    """Sizes the table's shapes name, for one block with compress ratio `ratio` (0 = sliding only).

    The attention compressor emits two overlapping windows on CSA layers (``overlap`` = 2, official
    ``Compressor``), one on HCA layers; the indexer's compressor always two.
    """
    c = cfg
    overlap = 2 if ratio == c.compress_rates[CSA] else 1
    return {
        "vocab": c.vocab_size,
        "hidden": c.hidden_size,
        "hc": c.hc_mult,
        "hc*hidden": c.hc_mult * c.hidden_size,
        "mix": (2 + c.hc_mult) * c.hc_mult,
        "heads": c.num_attention_heads,
        "head_dim": c.head_dim,
        "heads*head_dim": c.num_attention_heads * c.head_dim,
        "q_rank": c.q_lora_rank,
        "o_rank": c.o_groups * c.o_lora_rank,
        "group_in": c.num_attention_heads * c.head_dim // c.o_groups,
        "ratio": ratio,
        "kv_width": overlap * c.head_dim,
        "index_heads": c.index_n_heads,
        "index_dim": c.index_head_dim,
        "index_heads*index_dim": c.index_n_heads * c.index_head_dim,
        "index_kv_width": 2 * c.index_head_dim,
        "experts": c.n_routed_experts,
        "inter": c.moe_intermediate_size,
        "shared_inter": c.moe_intermediate_size * max(c.n_shared_experts, 1),
        "topk": c.num_experts_per_tok,
    }


def _has(part: str, cfg: ModelConfig, ratio: int, is_hash: bool) -> bool:
    csa = bool(ratio) and ratio == cfg.compress_rates[CSA]
    return {ALL: True, EXPERT: True, COMPRESSED: bool(ratio), CSA_ONLY: csa, HASH: is_hash, SCORED: not is_hash}[part]


def _emit(
    out: dict[str, TensorSpec],
    row: Row,
    official: str,
    target: str,
    dims: dict[str, int],
    block: tuple[int, int],
    mtp: bool,
    expert: tuple[int, str] | None = None,
) -> None:
    shape = tuple(d if isinstance(d, int) else dims[d] for d in row.shape)
    if row.kind == PLAIN:
        out[official] = TensorSpec(official, shape, row.dtype, PLAIN, target, None, mtp)
    elif row.kind == FP8:
        (o, i), (br, bc) = shape, block
        out[f"{official}.weight"] = TensorSpec(f"{official}.weight", (o, i), "F8_E4M3", FP8, target, None, mtp)
        out[f"{official}.scale"] = TensorSpec(
            f"{official}.scale", (_cdiv(o, br), _cdiv(i, bc)), "F8_E8M0", FP8_SCALE, target, None, mtp
        )
    else:
        o, i = shape
        out[f"{official}.weight"] = TensorSpec(f"{official}.weight", (o, i // 2), "I8", FP4, target, expert, mtp)
        out[f"{official}.scale"] = TensorSpec(
            f"{official}.scale", (o, i // FP4_SCALE_BLOCK), "F8_E8M0", FP4_SCALE, target, expert, mtp
        )


def _block(out: dict, cfg: ModelConfig, off: str, mod: str, ratio: int, is_hash: bool, mtp: bool) -> None:
    dims, block = _dims(cfg, ratio), block_size(cfg)
    rows = [r for r in TABLE if r.scope == BLOCK and _has(r.part, cfg, ratio, is_hash)]
    experts = [r for r in rows if r.part == EXPERT]
    for row in rows:
        if row.part != EXPERT:
            _emit(out, row, f"{off}.{row.official}", f"{mod}.{row.module}", dims, block, mtp)
        elif row is experts[0]:  # all routed experts at the first expert row, expert by expert
            for e in range(cfg.n_routed_experts):
                for xr in experts:
                    _emit(
                        out,
                        xr,
                        f"{off}.{xr.official.format(e=e)}",
                        f"{mod}.{xr.module}",
                        dims,
                        block,
                        mtp,
                        (e, xr.official.rpartition(".")[2]),
                    )
    if mtp:
        for row in TABLE:
            if row.scope == MTP:
                _emit(out, row, f"{off}.{row.official}", f"{mod}.{row.module}", dims, block, True)


def official_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the published layout for `cfg`, in file order (embed, layers, mtp, final, head).

    Returns:
        {official name: TensorSpec}; targets use the ``model.`` prefix (``model.layers.0.self_attn.q_a_proj``),
        ``lm_head.weight``, and ``model.mtp.{k}.`` for MTP blocks (parity's MTP module; transformers has none).
    """
    out: dict[str, TensorSpec] = {}
    dims, block = _dims(cfg, 0), block_size(cfg)
    for row in TABLE:
        if row.scope == EMBED:
            _emit(out, row, row.official, row.module, dims, block, False)
    for i in range(cfg.num_hidden_layers):
        _block(
            out,
            cfg,
            f"layers.{i}",
            f"model.layers.{i}",
            cfg.compress_ratio(i),
            cfg.mlp_layer_types[i] == HASH_MOE,
            False,
        )
    for k in range(cfg.num_nextn_predict_layers):
        ratio = cfg.mtp_compress_ratios[k] if k < len(cfg.mtp_compress_ratios) else 0
        _block(out, cfg, f"mtp.{k}", f"model.mtp.{k}", ratio, False, True)
    for row in TABLE:
        if row.scope == FINAL:
            _emit(out, row, row.official, row.module, dims, block, False)
    return out


def official_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """The parity (transformers-style) name an official tensor fills (module path for quantized weights/scales).

    Raises:
        CheckpointError: `name` is not part of the layout for `cfg`.
    """
    spec = official_layout(cfg).get(name)
    if spec is None:
        raise CheckpointError(f"tensor {name!r} is not part of the DeepSeek-V4 published layout for this config")
    return spec.target


def resolve_target(name: str, present: set[str]) -> str | None:
    """The model's name for target `name` among `present` names (with or without the ``model.`` prefix)."""
    if name in present:
        return name
    if name.startswith("model.") and name[6:] in present:
        return name[6:]
    return None


# ----------------------------------------------------------------- name mapping derived from TABLE
def _name_pairs(rows) -> dict[str, str]:
    """{official tensor name: parity tensor name} of non-expert rows (FP8 rows: ``.weight`` and ``.scale``)."""
    out = {}
    for r in rows:
        if r.part == EXPERT:
            continue
        if r.kind == PLAIN:
            for o in (r.official, *r.aliases):
                out[o] = r.module
        else:
            for suffix in (".weight", ".scale"):
                out[r.official + suffix] = r.module + suffix
    return out


_MODEL_LEVEL = _name_pairs(r for r in TABLE if r.scope in (EMBED, FINAL))
_IN_BLOCK = _name_pairs(r for r in TABLE if r.scope in (BLOCK, MTP))
#: Routed experts, one tensor per expert: ``ffn.experts.{e}.w1.weight`` -> ``mlp.experts.{e}.w1.weight``
#: (``.scale`` likewise).
_EXPERT_NAMES = [
    (
        re.compile("^" + r"(\d+)".join(map(re.escape, r.official.split("{e}"))) + r"\.(weight|scale)$"),
        r.module + ".{e}." + r.official.rpartition(".")[2] + ".{suffix}",
    )
    for r in TABLE
    if r.part == EXPERT
]
_BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.*)$")


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name to parity's parameter name (derived from `TABLE`).

    Accepts parity's own (= transformers state-dict) names, which come back unchanged; DeepSeek's official
    names (``layers.0.attn.wq_a.weight``, ``embed.weight``, ``head.weight``); and the original format of
    transformers' ``save_pretrained`` (official names with a ``model.`` prefix, ``attn.norm`` for the
    attention ``kv_norm``). Routed experts map to one pseudo-name per expert,
    ``model.layers.{i}.mlp.experts.{e}.{w1|w2|w3}.weight``, that the reader packs into ``gate_up_proj`` /
    ``down_proj``. Unknown names come back with a ``model.`` prefix.
    """
    if name in _MODEL_LEVEL:
        return _MODEL_LEVEL[name]
    if name in _MODEL_LEVEL.values() and not name.startswith("model."):  # the LM head: outside `model.`
        return name
    n = name[len("model.") :] if name.startswith("model.") else name
    if _MODEL_LEVEL.get(n, "").startswith("model."):
        return _MODEL_LEVEL[n]
    m = _BLOCK_RE.match(n)
    if m:
        return f"model.{m.group(1)}.{m.group(2)}.{_block_name(m.group(3))}"
    return "model." + n


def _block_name(rest: str) -> str:
    """Rename inside one block (``layers.N.`` / ``mtp.N.`` already stripped); unknown names unchanged."""
    if rest in _IN_BLOCK:
        return _IN_BLOCK[rest]
    for pattern, module in _EXPERT_NAMES:
        m = pattern.match(rest)
        if m:
            return module.format(e=m.group(1), suffix=m.group(2))
    return rest
