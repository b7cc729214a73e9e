"""A model as the training cost model sees it (`TrainShape`): parameter counts, per-token FLOPs and the
widths that size activations and messages.

Built from a DeepSeek-V4 `ModelConfig` (`parity.shapes` counts, `V4Arch` attention), from the DeepSeek-V3
data file (`MLAArch`), or from an inline `[model]` table of a published training run
(`parity/data/published/training/*.toml`).

FLOP convention (used for MFU everywhere in `parity plan train`): a multiply-add is 2 FLOPs; a token's
training step costs 6 x activated matmul parameters (forward 2, backward 4; LM head and MTP modules
included, embedding lookup excluded) plus 3 x the causal attention forward FLOPs (QK and PV over the keys
each query sees, averaged over the sequence); recomputation is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from parity import shapes as P
from parity.errors import PlanError

_INLINE_INT = (
    "layers",
    "moe_layers",
    "hidden",
    "vocab",
    "n_experts",
    "topk",
    "attn_heads",
    "attn_qk_dim",
    "attn_v_dim",
    "kv_width",
    "mtp_layers",
)
_INLINE_NUM = ("total_params", "activated_params", "expert_params", "ffn_act_width")


@dataclass(frozen=True)
class TrainShape:
    """Counts in elements; `attn_fwd_flops(seq)` in FLOPs per token (all layers incl. MTP, forward only,
    causal average over a sequence of `seq` tokens)."""

    name: str
    layers: int  # main decoder layers
    mtp_layers: int  # MTP modules trained with the main model (each about one more layer)
    moe_layers: int  # layers (incl. MTP) with routed experts
    hidden: int
    vocab: int
    total_params: float  # everything held in memory, MTP included
    activated_params: float  # matmul parameters one token passes through (LM head + MTP in, embedding out)
    expert_params_total: float  # all routed experts, all layers (memory split by EP)
    embed_head_params: float  # embedding table + LM head (held by the first / last pipeline stage)
    n_experts: int
    topk: int
    ffn_act_width: float  # activated FFN intermediate width per layer (sum over the token's experts)
    resid_width: int  # residual stream width kept per token (mHC: hc_mult * hidden)
    kv_width: int  # K+V values per token per layer exchanged by context parallelism
    route_limit_groups: int = 0  # node-limited routing: a token's experts lie on at most this many nodes
    attn_fwd_flops: Callable[[float], float] = field(default=lambda s: 0.0, compare=False, repr=False)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0 and self.moe_layers > 0

    def model_flops_per_token(self, seq: float) -> dict:
        """Training FLOPs per token under the module's convention: {'matmul', 'attention', 'total'}."""
        mm = 6.0 * self.activated_params
        at = 3.0 * self.attn_fwd_flops(seq)
        return {"matmul": mm, "attention": at, "total": mm + at}


def from_v4(arch) -> TrainShape:
    """`TrainShape` of a DeepSeek-V4 `V4Arch` (counts from `parity.shapes`; attention, CSA compressor
    and lightning indexer FLOPs from `V4Arch.attn_flops_token(kind, seq, 'prefill')`)."""
    cfg = arch.cfg
    pc = P.count_params(cfg)
    n_mtp = cfg.num_nextn_predict_layers
    e = P.expert_params(cfg)
    head = pc.lm_head or pc.embedding
    idle_mtp_experts = n_mtp * (cfg.n_routed_experts - cfg.num_experts_per_tok) * e
    activated = pc.activated_per_token + P.mtp_params(cfg) - idle_mtp_experts + n_mtp * head
    kinds = [lay.kind for lay in arch.layers + arch.mtp_layers]

    def attn(seq: float) -> float:
        return sum(sum(arch.attn_flops_token(k, seq, "prefill")) for k in kinds)

    return TrainShape(
        name=arch.name,
        layers=cfg.num_hidden_layers,
        mtp_layers=n_mtp,
        moe_layers=cfg.num_hidden_layers + n_mtp,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        total_params=float(pc.total_with_mtp),
        activated_params=float(activated),
        expert_params_total=float(pc.routed_experts + n_mtp * cfg.n_routed_experts * e),
        embed_head_params=float(pc.embedding + pc.lm_head),
        n_experts=cfg.n_routed_experts,
        topk=cfg.num_experts_per_tok,
        ffn_act_width=float((cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size),
        resid_width=cfg.hc_mult * cfg.hidden_size,
        kv_width=cfg.head_dim,
        attn_fwd_flops=attn,
    )


def from_mla(arch) -> TrainShape:
    """`TrainShape` of DeepSeek-V3/R1 (`MLAArch`, data file `parity/data/published/models/deepseek-v3.toml`)."""
    d = arch.d
    mtp = arch.mtp_layers
    per_tok = sum(
        lay.proj_params + lay.dense_params + (arch.topk * arch.expert_params if lay.moe else 0)
        for lay in arch.layers + mtp
    )
    activated = per_tok + arch.head_params * (1 + len(mtp)) + len(mtp) * arch.mtp_extra_params
    mtp_total = sum(lay.proj_params + lay.dense_params + arch.n_experts * arch.expert_params for lay in mtp)
    n_moe = sum(lay.moe for lay in arch.layers + mtp)
    attn_one = arch.attn_flops_token("mla", 1.0, "prefill")[0]  # linear in seq for MLA prefill
    n_attn = len(arch.layers) + len(mtp)
    return TrainShape(
        name=arch.name,
        layers=len(arch.layers),
        mtp_layers=len(mtp),
        moe_layers=n_moe,
        hidden=arch.hidden,
        vocab=arch.vocab,
        total_params=float(arch.total_params + mtp_total + len(mtp) * arch.mtp_extra_params),
        activated_params=float(activated),
        expert_params_total=float(n_moe * arch.n_experts * arch.expert_params),
        embed_head_params=float(arch.embed_params + arch.head_params),
        n_experts=arch.n_experts,
        topk=arch.topk,
        ffn_act_width=float((arch.topk + d["n_shared_experts"]) * d["moe_intermediate_size"]),
        resid_width=arch.hidden,
        kv_width=d["kv_lora_rank"] + d["qk_rope_head_dim"],
        route_limit_groups=arch.route_limit_groups,
        attn_fwd_flops=lambda s: n_attn * attn_one * s,
    )


def from_table(t: dict, where: str) -> TrainShape:
    """`TrainShape` from an inline `[model]` table of a training-run file (fields: `_INLINE_INT`,
    `_INLINE_NUM`, `name`). Attention: every layer (and MTP module) runs causal attention with
    `attn_heads` query heads of `attn_qk_dim` / `attn_v_dim` values: 2 * heads * (qk + v) * seq / 2 FLOPs
    per token forward.

    Raises:
        PlanError: a missing or non-positive field (named with `where`).
    """
    for k in _INLINE_INT + _INLINE_NUM:
        v = t.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        if not ok or (k in _INLINE_INT and not isinstance(v, int)):
            raise PlanError(
                f"{where}: [model] field {k!r} must be a non-negative "
                f"{'integer' if k in _INLINE_INT else 'number'}, got {v!r}"
            )
    n_attn = t["layers"] + t["mtp_layers"]
    per_seq = 2.0 * t["attn_heads"] * (t["attn_qk_dim"] + t["attn_v_dim"]) / 2.0
    return TrainShape(
        name=str(t.get("name", "model")),
        layers=t["layers"],
        mtp_layers=t["mtp_layers"],
        moe_layers=t["moe_layers"],
        hidden=t["hidden"],
        vocab=t["vocab"],
        total_params=float(t["total_params"]),
        activated_params=float(t["activated_params"]),
        expert_params_total=float(t["moe_layers"] * t["n_experts"] * t["expert_params"]),
        embed_head_params=float(2 * t["vocab"] * t["hidden"]),
        n_experts=t["n_experts"],
        topk=t["topk"],
        ffn_act_width=float(t["ffn_act_width"]),
        resid_width=t["hidden"],
        kv_width=t["kv_width"],
        route_limit_groups=int(t.get("route_limit_groups", 0)),
        attn_fwd_flops=lambda s: n_attn * per_seq * s,
    )


def load_shape(name: str) -> TrainShape:
    """`TrainShape` for a preset / checkpoint dir (V4) or a data-file model (deepseek-v3).

    Raises:
        PlanError: unknown model or a miniature (see `parity.plan.arch.load_arch`).
    """
    from parity.plan.arch import MLAArch, load_arch

    arch = load_arch(name)
    return from_mla(arch) if isinstance(arch, MLAArch) else from_v4(arch)
