"""Architectures as the cost model sees them: per-layer GEMM parameters, attention FLOPs per token,
cache bytes read per decode step, cache bytes held per sequence.

Two interpreters of one interface:
- `V4Arch(ModelConfig)`: DeepSeek-V4 (sliding window / CSA with compressor + lightning indexer / HCA,
  mHC residual streams, MoE with shared expert, MTP) — shapes as in `parity.shapes`;
- `MLAArch`: DeepSeek-V3/R1 (MLA + DeepSeekMoE, first layers dense), described by a data file
  (`parity/data/published/models/deepseek-v3.toml`, sources inside).

FLOP conventions: a multiply-add is 2 FLOPs; attention FLOPs per key and head are QK plus PV.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from parity import shapes as P
from parity.config import CSA, HCA, SLIDING, ModelConfig
from parity.errors import PlanError

MODELS_DIR = Path(__file__).resolve().parent.parent / "data" / "published" / "models"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer for the cost model (counts of parameters, not bytes)."""

    kind: str  # 'sliding' | 'csa' | 'hca' | 'mla'
    proj_params: int  # attention-side GEMM weights every token passes through
    dense_params: int  # shared expert(s) + router, or the dense FFN of a dense layer
    moe: bool  # has routed experts


def _avg_min(S: float, c: float) -> float:
    """Mean over positions p = 1..S of min(p, c) (continuous approximation)."""
    if S <= c:
        return S / 2.0
    return c - c * c / (2.0 * S)


def _byte_layout(kv_dtype: str) -> str:
    """Cache byte layout of a cache dtype: INT8 caches store 1 byte per value plus block scales like FP8."""
    return "fp8" if kv_dtype == "int8" else kv_dtype


class V4Arch:
    """DeepSeek-V4 from a `ModelConfig` (see module docstring)."""

    kind = "v4"

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._cache_sizes: dict = {}
        self.name = cfg.source or "deepseek-v4"
        #: longest sequence (prompt + output, tokens) the model serves: config.json max_position_embeddings
        self.max_context = cfg.max_position_embeddings
        self.hidden = cfg.hidden_size
        self.vocab = cfg.vocab_size
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.expert_params = P.expert_params(cfg)
        shared = P.moe_params(cfg)["shared"] + P.moe_params(cfg)["router"]
        short = {SLIDING: "sliding", CSA: "csa", HCA: "hca"}

        def spec(t):
            return LayerSpec(short[t], P.attention_params(cfg, t), shared, True)

        self.layers = [spec(t) for t in cfg.layer_types]
        self.mtp_layers = [spec(t) for t in P.mtp_layer_types(cfg)]
        self.mtp_extra_params = 2 * cfg.hidden_size**2  # e_proj, h_proj
        pc = P.count_params(cfg)
        self.total_params = pc.total
        self.embed_params = pc.embedding
        self.head_params = pc.lm_head or pc.embedding
        # mHC: per layer two HC modules read/write [hc, D] residual streams a few times (pre-mix read,
        # post-mix read + write) in bf16: ~6 passes over hc*D*2 bytes per token (estimate).
        self.other_bytes_per_token_layer = 6 * cfg.hc_mult * cfg.hidden_size * 2

    # -- attention -----------------------------------------------------------------------------
    def attn_flops_token(self, kind: str, ctx: float, phase: str) -> tuple[float, float]:
        """(core attention FLOPs, indexer FLOPs) per query token at context `ctx` (decode) or averaged
        over a prompt of `ctx` tokens (prefill)."""
        c = self.cfg
        per_key = 4.0 * c.head_dim * c.num_attention_heads
        W = c.sliding_window
        if phase == "prefill":
            keys = _avg_min(ctx, W)
            if kind == "csa":
                m = c.compress_rates[CSA]
                keys += _avg_min(ctx / m, c.index_topk)
                idx = 2.0 * c.index_n_heads * c.index_head_dim * ctx / (2 * m)
                return per_key * keys, idx
            if kind == "hca":
                keys += ctx / (2 * c.compress_rates[HCA])
            return per_key * keys, 0.0
        keys = min(ctx, W)
        if kind == "csa":
            m = c.compress_rates[CSA]
            keys += min(ctx / m, c.index_topk)
            return per_key * keys, 2.0 * c.index_n_heads * c.index_head_dim * ctx / m
        if kind == "hca":
            keys += ctx / c.compress_rates[HCA]
        return per_key * keys, 0.0

    def attn_read_bytes(self, kind: str, ctx: float, kv_dtype: str) -> float:
        """Cache bytes one sequence's decode step reads in a layer of `kind` at context `ctx`."""
        c = self.cfg
        kv_dtype = _byte_layout(kv_dtype)
        kv = P.vector_bytes(c.head_dim, c.qk_rope_head_dim, kv_dtype)
        b = min(ctx, c.sliding_window) * kv
        if kind == "csa":
            m = c.compress_rates[CSA]
            ik = P.index_key_bytes(c.index_head_dim, kv_dtype)
            b += min(ctx / m, c.index_topk) * kv + (ctx / m) * ik
        elif kind == "hca":
            b += ctx / c.compress_rates[HCA] * kv
        return b

    def cache_write_bytes_token(self, kind: str, kv_dtype: str) -> float:
        """Cache bytes written per new token in a layer of `kind` (window entry + amortised compressed
        entries)."""
        c = self.cfg
        kv_dtype = _byte_layout(kv_dtype)
        kv = P.vector_bytes(c.head_dim, c.qk_rope_head_dim, kv_dtype)
        if kind == "csa":
            ik = P.index_key_bytes(c.index_head_dim, kv_dtype)
            return kv + (kv + ik) / c.compress_rates[CSA]
        if kind == "hca":
            return kv + kv / c.compress_rates[HCA]
        return kv

    def cache_bytes_seq(self, ctx: float, kv_dtype: str) -> float:
        """Cache bytes held per sequence at `ctx` tokens (main layers + MTP layers)."""
        kv_dtype = _byte_layout(kv_dtype)
        cs = self._cache_sizes.get(kv_dtype)
        if cs is None:
            cs = self._cache_sizes[kv_dtype] = P.cache_size(self.cfg, kv_dtype, include_mtp=True)
        return cs.total_bytes(int(ctx))


class MLAArch:
    """DeepSeek-V3/R1 (MLA + DeepSeekMoE) from a data file dict (see `load_mla`)."""

    kind = "mla"

    def __init__(self, d: dict):
        self.d = d
        self.name = d["id"]
        #: longest sequence (tokens) when the data file records max_position_embeddings, else None (unchecked)
        self.max_context = d.get("max_position_embeddings")
        D, H = d["hidden_size"], d["num_attention_heads"]
        self.hidden, self.vocab = D, d["vocab_size"]
        self.n_experts, self.topk = d["n_routed_experts"], d["num_experts_per_tok"]
        self.expert_params = 3 * D * d["moe_intermediate_size"]
        qk = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
        proj = (
            D * d["q_lora_rank"]
            + d["q_lora_rank"]
            + d["q_lora_rank"] * H * qk
            + D * (d["kv_lora_rank"] + d["qk_rope_head_dim"])
            + d["kv_lora_rank"]
            + d["kv_lora_rank"] * H * (d["qk_nope_head_dim"] + d["v_head_dim"])
            + H * d["v_head_dim"] * D
            + 2 * D
        )
        shared = d["n_shared_experts"] * self.expert_params + self.n_experts * D
        dense = 3 * D * d["intermediate_size"]
        k = d["first_k_dense_replace"]
        self.layers = [
            LayerSpec("mla", proj, dense if i < k else shared, i >= k) for i in range(d["num_hidden_layers"])
        ]
        self.mtp_layers = [LayerSpec("mla", proj, shared, True)] * d["num_nextn_predict_layers"]
        self.mtp_extra_params = 2 * D * D
        self.embed_params = self.head_params = d["vocab_size"] * D
        self.total_params = (
            sum(
                ly.proj_params + ly.dense_params + (self.n_experts * self.expert_params if ly.moe else 0)
                for ly in self.layers
            )
            + 2 * self.embed_params
            + D
        )
        self.other_bytes_per_token_layer = 4 * D * 2
        #: node-limited routing: each token's experts lie on at most this many nodes (V3 report 2.1.2, M=4)
        self.route_limit_groups = d.get("route_limit_nodes", 0)

    def attn_flops_token(self, kind: str, ctx: float, phase: str) -> tuple[float, float]:
        d = self.d
        H = d["num_attention_heads"]
        if phase == "prefill":  # non-absorbed MHA over qk (nope+rope) and v dims, causal average ctx/2
            per_key = 2.0 * H * (d["qk_nope_head_dim"] + d["qk_rope_head_dim"] + d["v_head_dim"])
            return per_key * ctx / 2.0, 0.0
        # decode: weights absorbed, attention in the latent space (kv_lora + rope for QK, kv_lora for PV)
        per_key = 2.0 * H * (2 * d["kv_lora_rank"] + d["qk_rope_head_dim"])
        return per_key * ctx, 0.0

    def attn_read_bytes(self, kind: str, ctx: float, kv_dtype: str) -> float:
        d = self.d
        return ctx * P.vector_bytes(
            d["kv_lora_rank"] + d["qk_rope_head_dim"], d["qk_rope_head_dim"], _byte_layout(kv_dtype)
        )

    def cache_write_bytes_token(self, kind: str, kv_dtype: str) -> float:
        return self.attn_read_bytes(kind, 1, kv_dtype)

    def cache_bytes_seq(self, ctx: float, kv_dtype: str) -> float:
        return (len(self.layers) + len(self.mtp_layers)) * self.attn_read_bytes("mla", ctx, kv_dtype)


_MLA_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_nextn_predict_layers",
)


@lru_cache(maxsize=8)
def _mla_models(directory: str) -> dict[str, dict]:
    out = {}
    for p in sorted(Path(directory).glob("*.toml")):
        try:
            d = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PlanError(f"model file {p.name} is not valid TOML: {e}") from None
        if not str(d.get("source", "")).strip() or not isinstance(d.get("id"), str):
            raise PlanError(f"model file {p.name}: needs string fields 'id' and 'source'")
        for k in _MLA_INT_FIELDS:
            v = d.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PlanError(f"model file {p.name}: field {k!r} must be a non-negative integer, got {v!r}")
        out[d["id"]] = d
        for a in d.get("aliases", ()):
            out[a] = d
    return out


#: Smallest model (total parameters, MTP excluded) the cost model plans. Its efficiency constants are fitted
#: on published measurements of 284 B-1.6 T parameter deployments; a miniature such as the `tiny` preset
#: (34 M) would get absurd figures (millions of tok/s per chip) that describe no real deployment.
MIN_PLAN_PARAMS = 1_000_000_000


def load_arch(name: str):
    """`V4Arch` for a parity preset / checkpoint dir, or `MLAArch` for a data-file model id or alias
    (deepseek-v3, deepseek-r1).

    Raises:
        PlanError: unknown model (suggesting close names), invalid config, or a model under `MIN_PLAN_PARAMS`
            parameters (the `tiny` test preset, a toy checkpoint): not a real deployment.
    """
    import difflib

    from parity.config import load_config, preset_names
    from parity.errors import ConfigError

    mla = _mla_models(str(MODELS_DIR))
    if name in mla:
        return MLAArch(mla[name])
    try:
        arch = V4Arch(load_config(name))
    except ConfigError as e:
        known = [n for n in preset_names() if n != "tiny"] + sorted(mla)  # tiny: a test miniature, not plannable
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if "unknown model preset" in str(e) or "neither a preset" in str(e):
            raise PlanError(f"unknown model {name!r}: known are {', '.join(known)}{hint}") from None
        raise PlanError(f"model {name!r}: {e}") from None
    if arch.total_params < MIN_PLAN_PARAMS:
        real = ", ".join(n for n in preset_names() + sorted(mla) if n != name and n != "tiny")
        raise PlanError(
            f"model {name!r} ({arch.name}) has {arch.total_params / 1e6:,.1f} M parameters: a "
            f"miniature for tests, not a real deployment; the cost model is calibrated on published "
            f"measurements of full-size models and needs >= {MIN_PLAN_PARAMS / 1e9:g} B parameters, "
            f"else its figures (millions of tok/s per chip) are meaningless. Plan one of {real}, or "
            f"a checkpoint directory whose config.json is real-size"
        )
    return arch


def check_context(arch, isl: int, osl: int = 0) -> None:
    """Refuse a request longer than the model's context (`arch.max_context`, tokens; None = unchecked).

    Raises:
        PlanError: `isl` + `osl` tokens over `arch.max_context`, naming the limit.
    """
    limit = arch.max_context
    if limit is None or isl + osl <= limit:
        return
    what = (
        f"the prompt (--isl {isl:,} tokens) exceeds"
        if isl > limit or not osl
        else f"--isl {isl:,} + --osl {osl:,} = {isl + osl:,} tokens exceed"
    )
    raise PlanError(f"{what} the context of {arch.name}: {limit:,} tokens (max_position_embeddings)")
