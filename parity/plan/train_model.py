"""The training step model: time and memory of one optimizer step of a `TrainShape` on a cluster layout.

Model version `TRAIN_MODEL_VERSION`. Per device and per step (global batch of `global_batch_tokens`):

- compute: matmul FLOPs at the compute dtype's dense peak (FP8 GEMMs on chips that have FP8 when the
  layout says so, else BF16), attention at the BF16 peak, both x `gemm_eff`; recomputation adds a forward
  (full: matmuls + attention; selective: attention core + the FFN activation, counted as 1/3 of the
  attention forward plus nothing else - the recomputed norms/activations are memory-bound and small);
- pipeline bubble, as a fraction of compute, with m micro-batches per replica and p stages: 1F1B
  (p-1)/m, interleaved 1F1B with v chunks (p-1)/(v m) (Narayanan et al. 2021, SC'21 sec. 2.2), zero-bubble
  ZB-H1 (p-1)/(3m) (Qi et al. 2024, ICLR, table 1: bubble (p-1)(F+B-2W) with F=B=2W), DualPipe (p/2-1)/m
  (DeepSeek-V3 report arXiv 2412.19437 sec. 3.2.1, table 2: (PP/2-1)(F&B+B-3W));
- communication over the catalog's links x `link_eff`: TP all-reduce of the activations (2 per layer
  forward, 2 backward, ring 2(t-1)/t), EP all-to-all (dispatch + combine forward and backward; one copy per
  remote node when routing is node-limited, DeepSeek-V3 sec. 3.2.2), PP point-to-point activations and
  gradients, DP reduce-scatter of gradients + all-gather of parameters (ZeRO; ZeRO-3 gathers parameters
  per micro-batch forward and backward), CP all-gather of K/V forward and reduce-scatter backward
  (Llama 3, arXiv 2407.21783 sec. 3.3.2). TP, CP and PP traffic is exposed; EP traffic is hidden behind
  compute when the schedule overlaps it (DualPipe, or `ep_overlap`), else exposed; DP traffic overlaps the
  last micro-batch's backward (Megatron `overlap_grad_reduce`), the rest is exposed;
- memory: bf16 weights + fp32 gradients + AdamW (fp32 master + 2 moments) = 18 bytes per parameter,
  sharded by ZeRO stage (Megatron-LM docs, distributed optimizer: 6 + 12/d bytes per parameter for
  bf16 params with fp32 grads); DualPipe keeps a second copy of the weights (V3 sec. 3.2.1); activations
  per token per layer (bytes, bf16, divided by TP with sequence parallelism and by CP) none:
  2(8 r + 3 f), selective: 2(8 r + f), full: 2 r (layer input only), r = residual width, f = activated
  FFN width (Korthikanti et al. 2022, arXiv 2205.05198 table 2, with flash attention); the first stage
  holds PP micro-batches in flight (1F1B, ZB), PP(1 + (PP-1)/(PP v)) (interleaved), PP+1 (DualPipe).

Constants: `gemm_eff` (fraction of dense peak) and `link_eff` (fraction of link bandwidth) per hardware
family, fitted on published training runs (`parity.plan.train_validate`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from parity.errors import PlanError
from parity.plan.hardware import Hardware
from parity.plan.serving_model import EXPERT_IMBALANCE
from parity.plan.train_shape import TrainShape

TRAIN_MODEL_VERSION = "parity-train-1"
SCHEDULES = ("1f1b", "interleaved", "zb", "dualpipe")
RECOMPUTE = ("none", "selective", "full")
#: Fraction of HBM usable for weights, optimizer state and activations (as the serving model's HBM_USABLE).
HBM_USABLE = 0.9
#: Bytes per parameter of [weights, gradients, optimizer state] (bf16 weights, fp32 grads, fp32 master +
#: Adam m, v): Megatron-LM docs "Distributed Optimizer" (18 bytes; 6 + 12/d with the distributed optimizer).
STATE_BYTES = (2.0, 4.0, 12.0)
#: Bytes per gradient value reduced across DP and per parameter value gathered (bf16).
DP_BYTES = 2.0
#: Fraction of a chip's compute given to communication kernels while EP traffic is overlapped with compute:
#: DeepSeek-V3 report sec. 3.2.2 dedicates 20 of the H800's 132 SMs to the all-to-all.
OVERLAP_COMPUTE_TAX = 20 / 132


@dataclass(frozen=True)
class TrainLayout:
    """How a training job is laid out on `n_devices` chips. DP = n / (TP * PP * CP); EP divides the
    DP x TP x CP ranks of one pipeline stage (expert TP = 1). `micro_batch` in sequences."""

    n_devices: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    micro_batch: int = 1
    schedule: str = "1f1b"
    vpp: int = 1
    recompute: str = "none"
    zero: int = 1
    fp8: bool = False
    ep_overlap: bool | None = None  # None: as the schedule (DualPipe overlaps EP traffic)

    @property
    def dp(self) -> int:
        return self.n_devices // (self.tp * self.pp * self.cp)

    def validate(self, shape: TrainShape | None = None) -> None:
        """Raises PlanError naming the inconsistent field."""
        for k in ("n_devices", "tp", "pp", "ep", "cp", "micro_batch", "vpp"):
            if getattr(self, k) < 1:
                raise PlanError(f"training layout: {k} must be >= 1, got {getattr(self, k)}")
        if self.n_devices % (self.tp * self.pp * self.cp):
            raise PlanError(
                f"training layout: {self.n_devices} devices are not a multiple of TP{self.tp} x "
                f"PP{self.pp} x CP{self.cp}"
            )
        if (self.dp * self.tp * self.cp) % self.ep:
            raise PlanError(
                f"training layout: EP{self.ep} does not divide the DP x TP x CP = "
                f"{self.dp * self.tp * self.cp} ranks of a pipeline stage"
            )
        if self.schedule not in SCHEDULES:
            raise PlanError(f"training layout: schedule {self.schedule!r}: expected one of {SCHEDULES}")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"training layout: recompute {self.recompute!r}: expected one of {RECOMPUTE}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"training layout: zero stage must be 0-3, got {self.zero}")
        if shape is not None:
            if self.pp > shape.layers:
                raise PlanError(f"training layout: PP{self.pp} exceeds the model's {shape.layers} layers")
            if self.ep > 1 and (not shape.moe or shape.n_experts % self.ep):
                raise PlanError(f"training layout: EP{self.ep} must divide the {shape.n_experts} routed experts")


def _bubble(lay: TrainLayout, m: int) -> float:
    p = lay.pp
    if p == 1:
        return 0.0
    if lay.schedule == "interleaved":
        return (p - 1) / (lay.vpp * m)
    if lay.schedule == "zb":
        return (p - 1) / (3.0 * m)
    if lay.schedule == "dualpipe":
        return max(p / 2 - 1, 0) / m
    return (p - 1) / m


def _in_flight(lay: TrainLayout, m: int) -> float:
    p = lay.pp
    if lay.schedule == "dualpipe":
        return min(m, p + 1)
    if lay.schedule == "interleaved":
        return min(m, p) * (1 + (p - 1) / (p * lay.vpp))
    return min(m, p)


def act_bytes_token_layer(shape: TrainShape, recompute: str) -> float:
    """Activation bytes one token keeps for the backward in one layer (before TP/CP division)."""
    r, f = shape.resid_width, shape.ffn_act_width
    if recompute == "full":
        return 2.0 * r
    if recompute == "selective":
        return 2.0 * (8 * r + f)
    return 2.0 * (8 * r + 3 * f)


def memory(shape: TrainShape, lay: TrainLayout, seq: int, m: int) -> dict:
    """Bytes per device on the most loaded (first) pipeline stage: {'weights', 'grads', 'optimizer',
    'activations', 'total', 'params_per_device'}."""
    dense = shape.total_params - shape.expert_params_total - shape.embed_head_params
    dense_dev = dense / (lay.tp * lay.pp) + shape.embed_head_params / 2 / lay.tp
    exp_dev = shape.expert_params_total / (lay.ep * lay.pp)
    dp_dense = lay.dp * lay.cp
    dp_exp = max(lay.n_devices // (lay.ep * lay.pp), 1)
    w, g, o = STATE_BYTES

    def shard(nbytes, stage_min):
        return (nbytes / dp_dense, nbytes / dp_exp) if lay.zero >= stage_min else (nbytes, nbytes)

    parts = {}
    for name, nbytes, stage in (("weights", w, 3), ("grads", g, 2), ("optimizer", o, 1)):
        a, b = shard(nbytes, stage)
        parts[name] = dense_dev * a + exp_dev * b
    if lay.schedule == "dualpipe":
        parts["weights"] *= 2
    layers_stage = math.ceil((shape.layers + shape.mtp_layers) / lay.pp)
    tokens = lay.micro_batch * seq / lay.cp
    per_tok = act_bytes_token_layer(shape, lay.recompute) / lay.tp
    parts["activations"] = tokens * per_tok * layers_stage * _in_flight(lay, m)
    parts["total"] = sum(parts.values())
    parts["params_per_device"] = dense_dev + exp_dev
    return parts


def min_devices_for_memory(shape: TrainShape, hw: Hardware, seq: int) -> int:
    """Smallest chip count that could hold the model's training state: 18 bytes per parameter sharded over
    every chip (ZeRO-3) plus one sequence's activations per layer with full recomputation, in
    HBM_USABLE of each chip's HBM."""
    usable = hw.hbm_gb * 1e9 * HBM_USABLE
    act = seq * act_bytes_token_layer(shape, "full") * (shape.layers + shape.mtp_layers)
    state = shape.total_params * sum(STATE_BYTES)
    if act >= usable:
        return 2**62
    return max(1, math.ceil(state / (usable - act)))


def _links(hw: Hardware, group: int, consts: dict) -> float:
    """Bytes/s per device for a collective over `group` ranks laid out densely from one device."""
    bw = hw.scaleup_gb_s if group <= hw.scaleup_domain else hw.scaleout_gb_s
    return bw * 1e9 * consts["link_eff"]


def step(shape: TrainShape, hw: Hardware, lay: TrainLayout, seq: int, global_batch_tokens: float, consts: dict) -> dict:
    """Time of one optimizer step (s) and its parts; tokens/s per chip; MFU; memory per device.

    Args:
        seq: tokens per sequence; global_batch_tokens: tokens per optimizer step (rounded to whole
            micro-batches per DP replica, at least one); consts: {'gemm_eff', 'link_eff'} in (0, 1].
    Returns:
        dict with step_s, tokens_per_s_per_chip, mfu (model FLOPs / peak of the matmul compute dtype),
        mfu_bf16, terms (s: compute, bubble, tp, ep, pp, dp, cp exposed), memory (bytes), micro_batches,
        limiting (the largest term).
    """
    D = lay.n_devices
    mb_tokens = lay.micro_batch * seq
    m = max(1, round(global_batch_tokens / (lay.dp * mb_tokens)))
    gbt = m * lay.dp * mb_tokens
    fl = shape.model_flops_per_token(seq)
    mm_dtype = "fp8" if lay.fp8 and hw.peak("fp8") else "bf16"
    peak_mm, peak_bf16 = hw.peak(mm_dtype), hw.peak("bf16")
    eff = consts["gemm_eff"]
    rc_mm = fl["matmul"] / 3 if lay.recompute == "full" else 0.0
    rc_at = (
        fl["attention"] / 3
        if lay.recompute == "full"
        else (fl["attention"] / 9 if lay.recompute == "selective" else 0.0)
    )
    expert_mm = (
        6.0
        * shape.topk
        * shape.expert_params_total
        / max(shape.moe_layers * shape.n_experts, 1)
        * shape.moe_layers
        * (EXPERT_IMBALANCE - 1)
        if shape.moe and lay.ep > 1
        else 0.0
    )
    overlap = lay.ep_overlap if lay.ep_overlap is not None else lay.schedule == "dualpipe"
    tax = 1 / (1 - OVERLAP_COMPUTE_TAX) if overlap and shape.moe and lay.ep > 1 else 1.0
    t_comp = (
        gbt / D * ((fl["matmul"] + rc_mm + expert_mm) / peak_mm + (fl["attention"] + rc_at) / peak_bf16) / eff * tax
    )
    t_bubble = t_comp * _bubble(lay, m)

    layers_stage = (shape.layers + shape.mtp_layers) / lay.pp
    tok_dev = mb_tokens / (lay.tp * lay.cp)  # tokens per device per micro-batch (sequence parallel)
    n_fwd_bwd = 3 if lay.recompute == "full" else 2  # passes that move activations (forward again if full)
    t_tp = 0.0
    if lay.tp > 1:
        size = mb_tokens / lay.cp * shape.hidden * 2.0
        per_mb = layers_stage * 2 * n_fwd_bwd * 2 * (lay.tp - 1) / lay.tp * size
        t_tp = m * per_mb / _links(hw, lay.tp, consts)
    t_ep = 0.0
    if shape.moe and lay.ep > 1:
        moe_stage = shape.moe_layers / lay.pp
        disp_b = 1.0 if mm_dtype == "fp8" else 2.0
        span = lay.ep * (lay.tp if lay.tp * lay.ep <= hw.scaleup_domain else 1)
        remote = 1 - hw.scaleup_domain / span if span > hw.scaleup_domain else 0.0
        copies_out = min(shape.topk, shape.route_limit_groups or shape.topk) * remote
        per_val = shape.hidden * (disp_b + 2.0)  # dispatch + combine bytes per token copy
        su = tok_dev * shape.topk * (lay.ep - 1) / lay.ep * per_val
        so = tok_dev * copies_out * per_val
        per_mb = moe_stage * n_fwd_bwd * max(su / (hw.scaleup_gb_s * 1e9), so / (hw.scaleout_gb_s * 1e9))
        t_ep = m * per_mb * EXPERT_IMBALANCE / consts["link_eff"]
    t_pp = 0.0
    if lay.pp > 1:
        t_pp = m * 2 * lay.vpp * tok_dev * shape.hidden * 2.0 / (hw.scaleout_gb_s * 1e9 * consts["link_eff"])
    mem = memory(shape, lay, seq, m)
    dp_group = lay.dp * lay.cp
    dense_dev = mem["params_per_device"] - shape.expert_params_total / (lay.ep * lay.pp)
    exp_dev = shape.expert_params_total / (lay.ep * lay.pp)
    dp_exp = max(D // (lay.ep * lay.pp), 1)
    vol = (dense_dev * 2 * (dp_group - 1) / dp_group if dp_group > 1 else 0.0) + (
        exp_dev * 2 * (dp_exp - 1) / dp_exp if dp_exp > 1 else 0.0
    )
    t_dp_all = vol * DP_BYTES / (hw.scaleout_gb_s * 1e9 * consts["link_eff"])
    if lay.zero == 3:
        t_dp_all *= 1 + m  # parameters gathered again for every micro-batch's forward and backward
    t_dp = max(0.0, t_dp_all - t_comp / m)
    t_cp = 0.0
    if lay.cp > 1:
        kv = mb_tokens / lay.cp * shape.kv_width * 2.0 / lay.tp
        per_mb = (shape.layers + shape.mtp_layers) / lay.pp * n_fwd_bwd * (lay.cp - 1) * kv
        t_cp = m * per_mb / _links(hw, lay.tp * lay.cp, consts)
    exposed = t_tp + t_pp + t_dp + t_cp
    busy = t_comp + t_bubble
    step_s = (max(busy, t_ep) if overlap else busy + t_ep) + exposed
    terms = {"compute": t_comp, "bubble": t_bubble, "tp": t_tp, "ep": t_ep, "pp": t_pp, "dp": t_dp, "cp": t_cp}
    tok_s = gbt / step_s / D
    return {
        "step_s": step_s,
        "global_batch_tokens": gbt,
        "micro_batches": m,
        "tokens_per_s_per_chip": tok_s,
        "mfu": tok_s * fl["total"] / peak_mm,
        "mfu_bf16": tok_s * fl["total"] / peak_bf16,
        "compute_dtype": mm_dtype,
        "ep_overlapped": bool(overlap),
        "terms": terms,
        "memory": mem,
        "limiting": max(terms, key=terms.get),
        "model_flops_per_token": fl["total"],
        "layout": asdict(lay),
    }


def fits(mem: dict, hw: Hardware) -> bool:
    """Whether a `memory()` result fits in HBM_USABLE of the chip's HBM."""
    return mem["total"] <= hw.hbm_gb * 1e9 * HBM_USABLE
