"""Bytes of DeepSeek-V4 weights per weight format (bf16, fp8, fp4, w8a8, w4a8). Torch-free.

Splits the parameter counts of `parity.shapes` by the storage parity's model gives each tensor:

- the dense linears the release stores in FP8 (attention ``q_a/q_b/kv/o_a/o_b``, the indexer ``q_b``,
  the shared expert, MTP ``e_proj/h_proj``) and the routed experts, in the chosen weight format
  (`WEIGHT_FORMATS`);
- always fp32 (`parity.model.deepseek_v4._FP32_SUFFIXES`): the LM head (fp32 logits, as the official
  ``ParallelHead``), norms, mHC mixing parameters, attention sinks, compressor position biases; buffers
  ``e_score_correction_bias`` (fp32) and ``tid2eid`` (int64) of the MoE gates;
- everything else (embedding, router, compressor / indexer projections) in the model dtype.
"""

from __future__ import annotations

import math

from parity.config import CSA, HCA, ModelConfig
from parity.errors import ConfigError, DeviceError
from parity.shapes import hc_head_params, layer_params, mtp_layer_types

#: Weight formats -> (dense FP8-layout linears, routed experts), the names of ``parity plan --quantization``:
#: bf16 = model dtype; fp8 = FP8 e4m3 + one UE8M0 byte per 128x128 tile (`parity.model.quant.QuantLinear`);
#: fp4 = the release (FP8 linears, FP4 e2m1 experts: 0.5 byte + one UE8M0 byte per 32,
#: `parity.model.quant.FP4Experts`); w8a8 = int8 + fp32 scale and offset per output row
#: (`parity.model.int8_quant.Int8Linear` / `Int8Experts`); w4a8 = int8 linears, int4 experts (0.5 byte).
WEIGHT_FORMATS = {
    "bf16": ("model", "model"),
    "fp8": ("fp8", "fp8"),
    "fp4": ("fp8", "fp4"),
    "w8a8": ("int8", "int8"),
    "w4a8": ("int8", "int4"),
}
#: Bytes per output row of an int8 linear: fp32 ``weight_scale`` + fp32 ``weight_offset``
#: (msModelSlim per-channel layout, `parity.model.int8_quant.Int8Linear`).
INT_ROW_BYTES = 8
#: Bytes per output row of int8 / int4 routed experts: one fp32 scale (`parity.model.int8_quant.Int8Experts`
#: ``gate_up_scale`` / ``down_scale``; symmetric, no offset).
INT_EXPERT_ROW_BYTES = 4

#: Values per UE8M0 scale of an FP4 routed-expert row (official ``fp4`` weights: 1x32 blocks).
FP4_BLOCK = 32

_ITEMSIZE = {
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float64": 8,
    "fp64": 8,
    "double": 8,
}


def dtype_itemsize(dtype) -> int:
    """Bytes per element of a floating dtype given as a torch.dtype or a name ("bfloat16", "fp32", ...).

    Raises:
        DeviceError: unknown dtype name.
    """
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _ITEMSIZE:
        raise DeviceError(f"dtype {dtype!r}: expected one of {', '.join(sorted(_ITEMSIZE))} to estimate memory")
    return _ITEMSIZE[name]


def _block(cfg: ModelConfig) -> tuple[int, int]:
    b = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])
    try:
        return int(b[0]), int(b[1])
    except (TypeError, ValueError, IndexError):
        return 128, 128


def _layer_split(cfg: ModelConfig, layer_type: str) -> tuple[list[tuple[int, int]], int, int]:
    """(FP8 linears as (out, in), fp32 elements, model-dtype elements) of one decoder layer, routed
    experts excluded (they are counted apart)."""
    D, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    qlr, olr, g = cfg.q_lora_rank, cfg.o_lora_rank, cfg.o_groups
    si = cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1)  # the model's single shared expert
    fp8 = [(qlr, D), (H * hd, qlr), (hd, D), (g * olr, H * hd // g), (D, g * olr), (si, D), (D, si), (si, D)]
    fp32 = H + qlr + hd  # sinks, q_a_norm, kv_norm
    if layer_type == CSA:
        m, ihd = cfg.compress_rates[CSA], cfg.index_head_dim
        fp8.append((cfg.index_n_heads * ihd, qlr))  # indexer q_b_proj
        fp32 += m * 2 * hd + hd + m * 2 * ihd + ihd  # position biases, compressor norms
    elif layer_type == HCA:
        fp32 += cfg.compress_rates[HCA] * hd + hd
    lp = layer_params(cfg, layer_type)
    fp32 += lp["other"]  # the two layer norms, the two mHC
    rest = lp["attention"] + lp["router"] + lp["other"] - fp32 - sum(o * i for o, i in fp8[:5] + fp8[8:])
    return fp8, fp32, rest


def check_weight_format(weights: str) -> str:
    """`weights` if it is one of `WEIGHT_FORMATS`.

    Raises:
        ConfigError: unknown format.
    """
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format {weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    return weights


def _matrix_bytes(
    fmt: str, out_f: int, in_f: int, isz: int, block: tuple[int, int], row_bytes: int = INT_ROW_BYTES
) -> int:
    """Bytes of one [out, in] weight in storage `fmt` (model / fp8 / fp4 / int8 / int4); `row_bytes`:
    scale (+ offset) bytes per output row of int8 / int4."""
    if fmt == "model":
        return out_f * in_f * isz
    if fmt == "fp8":
        return out_f * in_f + math.ceil(out_f / block[0]) * math.ceil(in_f / block[1])
    if fmt == "fp4":
        return out_f * in_f // 2 + out_f * in_f // FP4_BLOCK
    if fmt == "int8":
        return out_f * in_f + out_f * row_bytes
    return out_f * in_f // 2 + out_f * row_bytes  # int4


def estimate_weight_bytes(
    cfg: ModelConfig,
    dtype="float32",
    quantized: bool = False,
    include_mtp: bool = True,
    weights: str | None = None,
    tp: int = 1,
    ep: int = 1,
) -> int:
    """Bytes of parameters and buffers parity's `V4ForCausalLM` allocates for `cfg`, on one device.

    Args:
        cfg: the architecture.
        dtype: the model (compute) dtype, a torch.dtype or a name; fp32-only tensors stay fp32.
        quantized: True = FP8 linears and FP4 routed experts kept quantized, as
            `parity.checkpoint.official_reader.load_official` loads the published checkpoint; False = every
            weight in `dtype` (`build_model`, `from_pretrained`, ``load_official(quantized=False)``).
        include_mtp: count the multi-token-prediction blocks (the model builds them when the config has any).
        weights: a `WEIGHT_FORMATS` name; overrides `quantized` (False = "bf16", True = "fp4").
        tp / ep: tensor- and expert-parallel sizes: the bytes of one rank's part
            (`parity.model.parallel_layers`: query heads, output groups, shared expert, embedding and LM
            head split over tp; routed experts split over ep, or by intermediate size over tp when ep = 1),
            in every weight format (block scales and per-row scales of the local part).
    Returns:
        Bytes (int) per device; activations, caches and allocator overhead are not included.
    Raises:
        DeviceError: unknown dtype name. ConfigError: unknown weight format.
    """
    isz = dtype_itemsize(dtype)
    dense_fmt, expert_fmt = WEIGHT_FORMATS[check_weight_format(weights or ("fp4" if quantized else "bf16"))]
    block = _block(cfg)
    D, V = cfg.hidden_size, cfg.vocab_size
    E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size

    def fp8_bytes(linears) -> int:
        return sum(_matrix_bytes(dense_fmt, o, i, isz, block) for o, i in linears)

    def local(linears):
        # (out, in) of one rank: q_b / o_a / shared gate, up split by rows, o_b / shared down by columns
        out = list(linears)
        for j in (1, 3, 5, 7):
            out[j] = (out[j][0] // tp, out[j][1])
        for j in (4, 6):
            out[j] = (out[j][0], out[j][1] // tp)
        return out

    local_experts, local_inter = (E // ep, inter) if ep > 1 else (E, inter // tp)
    expert_bytes = local_experts * (
        2 * _matrix_bytes(expert_fmt, local_inter, D, isz, block, INT_EXPERT_ROW_BYTES)
        + _matrix_bytes(expert_fmt, D, local_inter, isz, block, INT_EXPERT_ROW_BYTES)
    )

    def layer_bytes(t: str, is_hash: bool) -> int:
        fp8, fp32, rest = _layer_split(cfg, t)
        fp8, fp32 = local(fp8), fp32 - cfg.num_attention_heads + cfg.num_attention_heads // tp  # sinks split
        buffers = V * cfg.num_experts_per_tok * 8 if is_hash else E * 4  # tid2eid int64 / gate bias fp32
        return fp8_bytes(fp8) + fp32 * 4 + rest * isz + expert_bytes + buffers

    total = (V // tp) * D * (isz + 4)  # embedding; LM head kept in fp32
    total += (D + hc_head_params(cfg)) * 4  # final norm, hc_head
    total += sum(layer_bytes(t, cfg.is_hash_layer(i)) for i, t in enumerate(cfg.layer_types))
    if include_mtp:
        for t in mtp_layer_types(cfg):
            total += layer_bytes(t, False) + fp8_bytes([(D, D), (D, D)]) + (3 * D + hc_head_params(cfg)) * 4
    return int(total)


def device_fit(
    cfg: ModelConfig,
    hbm_bytes: float,
    tp: int = 1,
    ep: int = 1,
    dtype="bfloat16",
    quantized: bool = True,
    cache_dtype: str = "fp8",
    headroom: float = 0.10,
    weights: str | None = None,
) -> dict:
    """Whether one device of a TP / EP layout holds its weights, and how many cache tokens remain (torch-free;
    the same estimate `check_fits` applies at load time).

    Args:
        cfg: the architecture. hbm_bytes: device memory (bytes). tp / ep: as `estimate_weight_bytes`.
        dtype / quantized: the weights' form (published FP8/FP4 layout: quantized=True).
        cache_dtype: "bf16" | "fp8" cache (`parity.shapes.cache_size`; replicated over TP ranks).
        headroom: fraction of the weight bytes kept free, as `check_fits`.
    Returns:
        {"weight_bytes", "required_bytes" (weights x (1 + headroom)), "hbm_bytes", "fits" (bool),
        "cache_bytes" (what is left), "cache_tokens" (tokens of context that fit in it, sliding windows and
        compressor state of one sequence counted once)}.
    """
    from parity.shapes import cache_size

    w = estimate_weight_bytes(cfg, dtype, quantized, weights=weights, tp=tp, ep=ep)
    need = int(w * (1.0 + max(0.0, headroom)))
    left = max(0.0, float(hbm_bytes) - need)
    cs = cache_size(cfg, cache_dtype)
    tokens = int(max(0.0, left - cs.fixed_bytes) / cs.per_token_growth_bytes) if left > cs.fixed_bytes else 0
    return {
        "weight_bytes": w,
        "required_bytes": need,
        "hbm_bytes": float(hbm_bytes),
        "fits": need <= hbm_bytes,
        "cache_bytes": left,
        "cache_tokens": tokens,
    }
