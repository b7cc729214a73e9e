"""Parameter counts and cache sizes of a DeepSeek-V4 model, from `ModelConfig` alone (no torch).

Tensor shapes follow transformers 5.23 `models/deepseek_v4/modeling_deepseek_v4.py` (the classes named
below) and, for the MTP module that transformers does not build, DeepSeek's official
`inference/model.py` of the V4 release (`MTPBlock`: a full `Block` plus `e_proj`, `h_proj` [D, D],
`enorm`, `hnorm`, `norm` [D] and its own `hc_head_fn` [hc, hc*D], `hc_head_base` [hc], `hc_head_scale`
[1]; the embedding and LM head are shared with the main model).

Counting convention (matches `sum(p.numel() for p in DeepseekV4ForCausalLM(cfg).parameters())`):
learned tensors only. Routing buffers are not parameters there and are reported apart:
`e_score_correction_bias` [E] of scored MoE layers and `tid2eid` [vocab, top_k] (int) of hash layers.

Cache formula (per sequence, per layer; docs/numerics.md "Cache layout"; official
`inference/model.py` `Attention.__init__`/`Compressor`/`Indexer`):

- every layer: a sliding window of `sliding_window` K=V entries of `head_dim` values;
- CSA (ratio m=4): one compressed KV entry (`head_dim`) and one indexer key (`index_head_dim`) per m
  tokens, plus the compressors' partial state for the unfinished window (official `Compressor.kv_state`
  and `score_state`, fp32, [coff*m, coff*d] each with coff=2 for the overlapping CSA windows);
- HCA (ratio m'=128): one compressed KV entry per m' tokens plus the compressor state (coff=1).

Bytes per cached vector of width d with r = qk_rope_head_dim RoPE dims:
- bf16 cache: 2*d;
- fp8 cache: (d - r) FP8 e4m3 bytes + (d - r)/64 one-byte UE8M0 scales + 2*r bytes of bf16 RoPE dims
  (official `inference/model.py`: `act_quant(kv[..., :-rd], 64, scale_fmt, ...)` on the non-RoPE part,
  RoPE dims left in bf16 "for positional precision").
Bytes per cached indexer key of width d (`index_key_bytes`):
- bf16 cache: 2*d;
- fp8 cache (the official numerics, which pair the fp8 KV cache with the fp4 indexer): d/2 bytes of
  packed FP4 e2m1 codes + d/32 one-byte UE8M0 scales. The official code rotates the indexer keys
  (`rotate_activation`) and rounds them through `fp4_act_quant(x, 32, True)`, so nothing finer than
  FP4 + a block scale survives (the official code keeps those values in a bf16 buffer); parity's engine
  stores them packed (`parity.model.numerics.IndexCodec`, e.g. 64 + 4 = 68 bytes for index_head_dim 128),
  and this figure matches its layout. (The engine's fp8 KV row has one more padding byte than `vector_bytes`.)
Compressor state stays fp32 in both (it is small and bounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parity.config import CSA, HASH_MOE, HCA, SLIDING, ModelConfig

#: Values per UE8M0 scale in the fp8 KV cache (official inference/model.py: act_quant block 64).
FP8_CACHE_BLOCK = 64
#: Values per UE8M0 scale of the FP4 indexer keys (official inference/model.py: fp4_act_quant block 32).
FP4_INDEX_BLOCK = 32


# ----------------------------------------------------------------------------- parameter counts
def _rmsnorm(d: int) -> int:
    return d


def attention_params(cfg: ModelConfig, layer_type: str) -> int:
    """Learned parameters of one `DeepseekV4Attention` (with its compressor/indexer) of `layer_type`."""
    D, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    n = (
        D * cfg.q_lora_rank
        + _rmsnorm(cfg.q_lora_rank)  # q_a_proj, q_a_norm
        + cfg.q_lora_rank * H * hd  # q_b_proj
        + D * hd
        + _rmsnorm(hd)  # kv_proj, kv_norm
        + H * hd * cfg.o_lora_rank  # o_a_proj (grouped: g x [olr, H*hd/g])
        + cfg.o_groups * cfg.o_lora_rank * D  # o_b_proj
        + H
    )  # sinks
    if layer_type == CSA:
        m = cfg.compress_rates[CSA]
        n += 2 * (D * 2 * hd) + m * 2 * hd + hd  # DeepseekV4CSACompressor
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        n += 2 * (D * 2 * ihd) + m * 2 * ihd + ihd  # DeepseekV4Indexer compressor part
        n += cfg.q_lora_rank * ih * ihd + D * ih  # indexer q_b_proj, scorer weights_proj
    elif layer_type == HCA:
        m = cfg.compress_rates[HCA]
        n += 2 * (D * hd) + m * hd + hd  # DeepseekV4HCACompressor
    return n


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert (SwiGLU gate/up/down): 3 * hidden * moe_intermediate."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def moe_params(cfg: ModelConfig) -> dict[str, int]:
    """One `DeepseekV4SparseMoeBlock`: router [E, D], routed experts, shared expert(s)."""
    return {
        "router": cfg.n_routed_experts * cfg.hidden_size,
        "routed": cfg.n_routed_experts * expert_params(cfg),
        "shared": cfg.n_shared_experts * expert_params(cfg),
    }


def hc_params(cfg: ModelConfig) -> int:
    """One `DeepseekV4HyperConnection` (mHC): fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3]."""
    mix = (2 + cfg.hc_mult) * cfg.hc_mult
    return mix * cfg.hc_mult * cfg.hidden_size + mix + 3


def hc_head_params(cfg: ModelConfig) -> int:
    """`DeepseekV4HyperHead`: hc_fn [hc, hc*D], hc_base [hc], hc_scale [1]."""
    return cfg.hc_mult * cfg.hc_mult * cfg.hidden_size + cfg.hc_mult + 1


def layer_params(cfg: ModelConfig, layer_type: str) -> dict[str, int]:
    """One decoder layer, split into attention / moe parts (norms and mHC go to `other`)."""
    moe = moe_params(cfg)
    return {
        "attention": attention_params(cfg, layer_type),
        "router": moe["router"],
        "routed": moe["routed"],
        "shared": moe["shared"],
        "other": 2 * cfg.hidden_size + 2 * hc_params(cfg),
    }


def mtp_layer_types(cfg: ModelConfig) -> list[str]:
    """Attention type of each MTP block: from the legacy per-layer `compress_ratios` tail when given
    (V4-Flash lists 0 = sliding for its MTP layer), else sliding."""
    out = []
    rates = {0: SLIDING, cfg.compress_rates[CSA]: CSA, cfg.compress_rates[HCA]: HCA}
    for i in range(cfg.num_nextn_predict_layers):
        r = cfg.mtp_compress_ratios[i] if i < len(cfg.mtp_compress_ratios) else 0
        out.append(rates.get(r, SLIDING))
    return out


def mtp_params(cfg: ModelConfig) -> int:
    """All MTP blocks (official `MTPBlock`; embedding and LM head shared, not counted again)."""
    D = cfg.hidden_size
    total = 0
    for t in mtp_layer_types(cfg):
        block = sum(layer_params(cfg, t).values())
        total += block + 2 * D * D + 3 * D + hc_head_params(cfg)
    return total


@dataclass
class ParamCount:
    """Parameter counts (elements). `total` excludes MTP; `activated_per_token` counts what one token
    touches in the main model: everything except the non-selected routed experts and the embedding
    table (one row is read), LM head included."""

    embedding: int
    lm_head: int
    attention: int
    routed_experts: int
    shared_experts: int
    router: int
    other: int
    mtp: int
    activated_per_token: int
    buffers: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.lm_head
            + self.attention
            + self.routed_experts
            + self.shared_experts
            + self.router
            + self.other
        )

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count parameters of `cfg` (see module docstring for the convention).

    Returns:
        ParamCount; `.total` equals transformers' `DeepseekV4ForCausalLM(cfg)` parameter count.
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    att = routed = shared = router = other = 0
    for t in cfg.layer_types:
        lp = layer_params(cfg, t)
        att += lp["attention"]
        routed += lp["routed"]
        shared += lp["shared"]
        router += lp["router"]
        other += lp["other"]
    other += _rmsnorm(D) + hc_head_params(cfg)  # final norm, hc_head
    emb = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    active_routed = cfg.num_hidden_layers * cfg.num_experts_per_tok * expert_params(cfg)
    activated = att + shared + router + other + active_routed + (head or emb)
    n_scored = sum(not cfg.is_hash_layer(i) for i in range(cfg.num_hidden_layers))
    buffers = {
        "e_score_correction_bias": n_scored * cfg.n_routed_experts,
        "tid2eid": cfg.num_hash_layers * V * cfg.num_experts_per_tok,
    }
    return ParamCount(
        embedding=emb,
        lm_head=head,
        attention=att,
        routed_experts=routed,
        shared_experts=shared,
        router=router,
        other=other,
        mtp=mtp_params(cfg),
        activated_per_token=activated,
        buffers=buffers,
    )


def layer_schedule(cfg: ModelConfig) -> list[dict]:
    """Per-layer schedule: index, attention type (sliding/CSA/HCA), compress ratio, MoE routing
    (hash/scored); MTP blocks appended with `mtp=True`."""
    rows = []
    for i, t in enumerate(cfg.layer_types):
        rows.append(
            {
                "layer": i,
                "attention": _short(t),
                "compress_ratio": cfg.compress_ratio(i),
                "moe": "hash" if cfg.mlp_layer_types[i] == HASH_MOE else "scored",
                "mtp": False,
            }
        )
    for j, t in enumerate(mtp_layer_types(cfg)):
        rows.append(
            {
                "layer": cfg.num_hidden_layers + j,
                "attention": _short(t),
                "compress_ratio": 0 if t == SLIDING else cfg.compress_rates[t],
                "moe": "scored",
                "mtp": True,
            }
        )
    return rows


def _short(t: str) -> str:
    return {SLIDING: "sliding", CSA: "csa", HCA: "hca"}[t]


# ----------------------------------------------------------------------------- cache sizes
def vector_bytes(width: int, rope_dims: int, cache_dtype: str) -> float:
    """Bytes to cache one vector of `width` values whose last `rope_dims` are RoPE dims.

    Raises:
        ValueError: unknown cache_dtype (expected 'bf16' or 'fp8').
    """
    if cache_dtype == "bf16":
        return 2.0 * width
    if cache_dtype == "fp8":
        nope = width - rope_dims
        return nope + -(-nope // FP8_CACHE_BLOCK) + 2.0 * rope_dims
    raise ValueError(f"cache dtype {cache_dtype!r}: expected 'bf16' or 'fp8'")


def index_key_bytes(width: int, cache_dtype: str) -> float:
    """Bytes to cache one lightning-indexer key of `width` values ('fp8' = the official numerics: the
    key stored as packed FP4 e2m1 codes plus one UE8M0 scale byte per 32 values, as parity's engine does).

    Raises:
        ValueError: unknown cache_dtype (expected 'bf16' or 'fp8').
    """
    if cache_dtype == "bf16":
        return 2.0 * width
    if cache_dtype == "fp8":
        return float(-(-width // 2) + -(-width // FP4_INDEX_BLOCK))
    raise ValueError(f"cache dtype {cache_dtype!r}: expected 'bf16' or 'fp8'")


@dataclass
class CacheSize:
    """Per-sequence cache of one model for one cache dtype (bytes).

    `per_token_growth_bytes`: average bytes added per token of context once the sliding windows are
    full (compressed entries amortised over their ratio); `fixed_bytes`: sliding windows + compressor
    state, the part that does not grow; `total_bytes(n)`: exact at n tokens of context.
    """

    cache_dtype: str
    per_token_growth_bytes: float
    fixed_bytes: float
    layers: list[dict]

    def total_bytes(self, n_tokens: int) -> float:
        """Exact cache bytes for a sequence of `n_tokens` context tokens (n_tokens >= 0)."""
        total = 0.0
        for lay in self.layers:
            total += min(n_tokens, lay["window"]) * lay["window_entry_bytes"]
            if lay["ratio"]:
                total += (n_tokens // lay["ratio"]) * lay["compressed_entry_bytes"] + lay["state_bytes"]
        return total


def cache_size(cfg: ModelConfig, cache_dtype: str = "bf16", include_mtp: bool = False) -> CacheSize:
    """Per-sequence cache layout of `cfg` in `cache_dtype` ('bf16' | 'fp8'); formula in module docstring.

    Raises:
        ValueError: unknown cache_dtype.
    """
    r = cfg.qk_rope_head_dim
    kv = vector_bytes(cfg.head_dim, r, cache_dtype)
    ikey = index_key_bytes(cfg.index_head_dim, cache_dtype)
    types = list(cfg.layer_types) + (mtp_layer_types(cfg) if include_mtp else [])
    layers, growth, fixed = [], 0.0, 0.0
    for t in types:
        lay = {
            "type": _short(t),
            "window": cfg.sliding_window,
            "window_entry_bytes": kv,
            "ratio": 0,
            "compressed_entry_bytes": 0.0,
            "state_bytes": 0.0,
        }
        if t == CSA:
            m = cfg.compress_rates[CSA]
            lay["ratio"] = m
            lay["compressed_entry_bytes"] = kv + ikey
            # kv_state + score_state, fp32, [2m, 2d] each, for the KV compressor and the indexer's
            lay["state_bytes"] = 2 * 4 * (2 * m) * (2 * cfg.head_dim) + 2 * 4 * (2 * m) * (2 * cfg.index_head_dim)
        elif t == HCA:
            m = cfg.compress_rates[HCA]
            lay["ratio"] = m
            lay["compressed_entry_bytes"] = kv
            lay["state_bytes"] = 2 * 4 * m * cfg.head_dim
        if lay["ratio"]:
            growth += lay["compressed_entry_bytes"] / lay["ratio"]
        fixed += lay["window"] * kv + lay["state_bytes"]
        layers.append(lay)
    return CacheSize(cache_dtype=cache_dtype, per_token_growth_bytes=growth, fixed_bytes=fixed, layers=layers)


def model_info(cfg: ModelConfig, context: int = 65536) -> dict:
    """Everything `parity info` prints, as a JSON-ready dict.

    Raises:
        ValueError: context < 0.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens, got {context}")
    pc = count_params(cfg)
    caches = {}
    for dt in ("bf16", "fp8"):
        cs = cache_size(cfg, dt)
        caches[dt] = {
            "per_token_growth_bytes": cs.per_token_growth_bytes,
            "fixed_bytes": cs.fixed_bytes,
            "total_bytes_at_context": cs.total_bytes(context),
        }
    return {
        "model": cfg.source or "config",
        "params": {
            "total": pc.total,
            "total_with_mtp": pc.total_with_mtp,
            "mtp": pc.mtp,
            "activated_per_token": pc.activated_per_token,
            "embedding": pc.embedding,
            "lm_head": pc.lm_head,
            "attention": pc.attention,
            "routed_experts": pc.routed_experts,
            "shared_experts": pc.shared_experts,
            "router": pc.router,
            "other_norms_mhc": pc.other,
            "buffers_not_counted": pc.buffers,
        },
        "schedule": layer_schedule(cfg),
        "context_tokens": context,
        "kv_cache": caches,
        "kv_cache_formula": (
            "per layer: min(n, window)*B(head_dim) [all]; + floor(n/4)*(B(head_dim)+I(index_head_dim)) + "
            "compressor fp32 state [CSA]; + floor(n/128)*B(head_dim) + state [HCA]; B(d)=2d for bf16, "
            "(d-r) + ceil((d-r)/64) + 2r for fp8 (e4m3 + UE8M0 scale per 64, RoPE dims r in bf16); "
            "I(d)=2d for bf16, d/2 + d/32 for fp8 (official fp4 indexer: packed e2m1 + UE8M0 scale per 32)"
        ),
    }
