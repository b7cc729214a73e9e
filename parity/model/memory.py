"""How much memory a model's weights need, and a check that refuses to build one that cannot fit.

`check_fits` is called before anything is allocated (`parity.model.deepseek_v4.build_model` and the
readers and writer of `parity.checkpoint`) and raises a `DeviceError` naming the model, the estimate,
the dtype, the device and its free memory.

The estimate (`estimate_weight_bytes`) is torch-free: it takes the parameter counts of
`parity.shapes.count_params` and splits them by the storage dtype parity's model gives each tensor:

- FP8 linears (attention ``q_a/q_b/kv/o_a/o_b``, the indexer ``q_b``, the shared expert, MTP
  ``e_proj/h_proj``): quantized = 1 byte per weight + one UE8M0 byte per ``weight_block_size`` tile
  (`parity.model.quant.QuantLinear`); otherwise the model dtype.
- routed experts: quantized = FP4 e2m1, 0.5 byte per weight + one UE8M0 byte per 32 weights
  (`parity.model.quant.FP4Experts`); otherwise the model dtype.
- always fp32 (`parity.model.deepseek_v4._FP32_SUFFIXES`): the LM head (fp32 logits, as the official
  ``ParallelHead``), norms, mHC mixing parameters, attention sinks, compressor position biases; buffers
  ``e_score_correction_bias`` (fp32) and ``tid2eid`` (int64) of the MoE gates.
- everything else (embedding, router, compressor / indexer projections) in the model dtype.

Set ``PARITY_SKIP_MEMORY_CHECK=1`` to skip the check (swap, memory overcommit, unified memory).
"""

from __future__ import annotations

import math
import os

from parity.config import CSA, HCA, ModelConfig
from parity.errors import DeviceError
from parity.shapes import hc_head_params, layer_params, mtp_layer_types

#: Environment variable that disables `check_fits` ("1", "true", "yes").
SKIP_ENV = "PARITY_SKIP_MEMORY_CHECK"
#: Default safety margin of `check_fits`: fraction of the weight estimate kept free for activations,
#: caches and allocator slack.
DEFAULT_HEADROOM = 0.10
#: Values per UE8M0 scale of an FP4 routed-expert row (official ``fp4`` weights: 1x32 blocks).
FP4_BLOCK = 32

_ITEMSIZE = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
             "float64": 8, "fp64": 8, "double": 8}
_GIB = 1024 ** 3


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
    si = cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1)   # the model's single shared expert
    fp8 = [(qlr, D), (H * hd, qlr), (hd, D), (g * olr, H * hd // g), (D, g * olr),
           (si, D), (D, si), (si, D)]
    fp32 = H + qlr + hd                                                 # sinks, q_a_norm, kv_norm
    if layer_type == CSA:
        m, ihd = cfg.compress_rates[CSA], cfg.index_head_dim
        fp8.append((cfg.index_n_heads * ihd, qlr))                      # indexer q_b_proj
        fp32 += m * 2 * hd + hd + m * 2 * ihd + ihd                     # position biases, compressor norms
    elif layer_type == HCA:
        fp32 += cfg.compress_rates[HCA] * hd + hd
    lp = layer_params(cfg, layer_type)
    fp32 += lp["other"]                                                 # the two layer norms, the two mHC
    rest = lp["attention"] + lp["router"] + lp["other"] - fp32 - sum(o * i for o, i in fp8[:5] + fp8[8:])
    return fp8, fp32, rest


def estimate_weight_bytes(cfg: ModelConfig, dtype="float32", quantized: bool = False,
                          include_mtp: bool = True, tp: int = 1, ep: int = 1) -> int:
    """Bytes of parameters and buffers parity's `V4ForCausalLM` allocates for `cfg`, on one device.

    Args:
        cfg: the architecture.
        dtype: the model (compute) dtype, a torch.dtype or a name; fp32-only tensors stay fp32.
        quantized: True = FP8 linears and FP4 routed experts kept quantized, as
            `parity.checkpoint.official_reader.load_official` loads the published checkpoint; False = every
            weight in `dtype` (`build_model`, `from_pretrained`, ``load_official(quantized=False)``).
        include_mtp: count the multi-token-prediction blocks (the model builds them when the config has any).
        tp / ep: tensor- and expert-parallel sizes: the bytes of one rank's part
            (`parity.model.parallel_layers`: query heads, output groups, shared expert, embedding and LM
            head split over tp; routed experts split over ep, or by intermediate size over tp when ep = 1).
    Returns:
        Bytes (int) per device; activations, caches and allocator overhead are not included.
    Raises:
        DeviceError: unknown dtype name.
    """
    isz = dtype_itemsize(dtype)
    br, bc = _block(cfg)
    D, V = cfg.hidden_size, cfg.vocab_size
    E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size

    def fp8_bytes(linears) -> int:
        if not quantized:
            return sum(o * i for o, i in linears) * isz
        return sum(o * i + math.ceil(o / br) * math.ceil(i / bc) for o, i in linears)

    def local(linears):
        # (out, in) of one rank: q_b / o_a / shared gate, up split by rows, o_b / shared down by columns
        out = list(linears)
        for j in (1, 3, 5, 7):
            out[j] = (out[j][0] // tp, out[j][1])
        for j in (4, 6):
            out[j] = (out[j][0], out[j][1] // tp)
        return out

    expert_elems = E * 3 * D * inter // (ep if ep > 1 else tp)
    expert_bytes = (expert_elems // 2 + expert_elems // FP4_BLOCK) if quantized else expert_elems * isz

    def layer_bytes(t: str, is_hash: bool) -> int:
        fp8, fp32, rest = _layer_split(cfg, t)
        fp8, fp32 = local(fp8), fp32 - cfg.num_attention_heads + cfg.num_attention_heads // tp  # sinks split
        buffers = V * cfg.num_experts_per_tok * 8 if is_hash else E * 4   # tid2eid int64 / gate bias fp32
        return fp8_bytes(fp8) + fp32 * 4 + rest * isz + expert_bytes + buffers

    total = (V // tp) * D * (isz + 4)                                    # embedding; LM head kept in fp32
    total += (D + hc_head_params(cfg)) * 4                               # final norm, hc_head
    total += sum(layer_bytes(t, cfg.is_hash_layer(i)) for i, t in enumerate(cfg.layer_types))
    if include_mtp:
        for t in mtp_layer_types(cfg):
            total += layer_bytes(t, False) + fp8_bytes([(D, D), (D, D)]) + (3 * D + hc_head_params(cfg)) * 4
    return int(total)


def _label(cfg: ModelConfig) -> str:
    src = cfg.source or "this model"
    return src.removeprefix("preset:")


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def skip_requested() -> bool:
    """True when ``PARITY_SKIP_MEMORY_CHECK`` is set to 1/true/yes."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_fits(cfg: ModelConfig, device, dtype="float32", quantized: bool = False,
               headroom: float = DEFAULT_HEADROOM, *, include_mtp: bool = True, extra_bytes: int = 0,
               what: str = "", parallel=None) -> int:
    """Refuse to build a model whose weights cannot fit in the device's free memory.

    Args:
        cfg: the architecture. device: a torch.device or a name ("cpu", "cuda:0"; resolved already).
        dtype / quantized / include_mtp: as `estimate_weight_bytes`.
        headroom: extra fraction of the estimate that must be free too (activations, caches, slack).
        extra_bytes: further bytes the caller needs at the same time (the exporter's quantized copy).
        what: what is being done, for the message (default "building the model").
        parallel: a `parity.distributed.ParallelConfig`: check one rank's part (None = the whole model).
    Returns:
        The bytes required (estimate * (1 + headroom) + extra_bytes).
    Raises:
        DeviceError: the requirement exceeds the free memory `parity.devices.memory_info` reports, with
            "<model> needs ~X GiB in <dtype> on <device>, this device has Y GiB free" and the ways out.
            Skipped when ``PARITY_SKIP_MEMORY_CHECK=1`` or when the device reports no memory figures.
    """
    tp, ep = (parallel.tp, parallel.ep) if parallel is not None else (1, 1)
    need = int(estimate_weight_bytes(cfg, dtype, quantized, include_mtp, tp=tp, ep=ep) * (1.0 + max(0.0, headroom)))
    need += extra_bytes
    if skip_requested():
        return need
    from parity import devices

    free, total = devices.memory_info(device)
    if total <= 0 or need <= free:  # no figures on this backend: nothing to compare with
        return need
    dt = str(dtype).removeprefix("torch.")
    form = " (FP8/FP4 weights kept quantized)" if quantized else ""
    if parallel is not None:
        form += f" per device with {parallel.describe()}"
    raise DeviceError(
        f"{_label(cfg)} needs ~{_gib(need)} in {dt}{form} on {device}"
        f"{' for ' + what if what else ''}, this device has {_gib(free)} free (of {_gib(total)}); use a "
        f"smaller model (e.g. the 'tiny' preset), a smaller dtype, the quantized published checkpoint or a "
        f"device with more memory, or set {SKIP_ENV}=1 to try anyway (swap, overcommit)")


def device_fit(cfg: ModelConfig, hbm_bytes: float, tp: int = 1, ep: int = 1, dtype="bfloat16",
               quantized: bool = True, cache_dtype: str = "fp8", headroom: float = DEFAULT_HEADROOM) -> dict:
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

    w = estimate_weight_bytes(cfg, dtype, quantized, tp=tp, ep=ep)
    need = int(w * (1.0 + max(0.0, headroom)))
    left = max(0.0, float(hbm_bytes) - need)
    cs = cache_size(cfg, cache_dtype)
    tokens = int(max(0.0, left - cs.fixed_bytes) / cs.per_token_growth_bytes) if left > cs.fixed_bytes else 0
    return {"weight_bytes": w, "required_bytes": need, "hbm_bytes": float(hbm_bytes), "fits": need <= hbm_bytes,
            "cache_bytes": left, "cache_tokens": tokens}
