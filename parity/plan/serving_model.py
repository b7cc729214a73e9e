"""The serving model: time of one prefill or decode step on one device of a deployment.

Model version `MODEL_VERSION`. Physics, per device and per step (all layers, plus MTP layers):

- every GEMM-like term costs max(FLOPs / (peak[dtype] * gemm_eff), bytes / (HBM * hbm_eff)) — a
  roofline per term; attention kernels use `attn_eff` instead of `gemm_eff`;
- weights are read once per step: dense/attention weights (replicated per attention-DP rank, split by
  attention TP), the local routed experts actually hit this step (expected fraction 1 - exp(-tokens per
  local expert)), the LM head;
- decode reads each sequence's cache once per step (MTP draft tokens share the read); with attention
  TP t, each device reads the cache of all t*B sequences of its group (the single shared KV head /
  latent cannot be split by head);
- routed-expert work and all-to-all traffic are multiplied by the expert load imbalance
  `EXPERT_IMBALANCE` (max/mean tokens per device);
- all-to-all: dispatch (token in the expert format's activation width, FP8 = 1 byte/value, FP4 =
  0.5625, else 2) and combine (BF16) of T*k token copies, (n-1)/n of them remote. Decode sends every
  copy straight to its expert's device (DeepEP low-latency kernels: RDMA), inside the scale-up domain
  over scale-up links, the rest over scale-out. Prefill is hierarchical (DeepEP normal kernels): one
  copy per remote scale-up domain over scale-out (expected distinct domains hit by k uniform experts,
  capped by the architecture's node-limited routing, V3: 4 nodes), forwarded over scale-up. The slower
  path bounds the time;
- attention TP adds two all-reduces of the activations per layer over scale-up;
- communication is hidden behind compute with two micro-batches (`overlap`): step = max(compute,
  comm); without overlap step = compute + comm; plus a fixed latency floor per layer of the software
  stack (`parity/data/hardware/stacks.toml`: CUDA graphs, Ascend graph mode, eager; per architecture,
  a V4 layer replaying more kernels than an MLA layer) and, with attention TP, two small-message
  all-reduce latencies per layer; every MTP draft pays them for the MTP block;
- colocated serving fuses a prefill chunk into a decode step (`mixed_step_terms`): weights are read and
  the floor is paid once for both.

Calibration constants (`gemm_eff`, `attn_eff`, `hbm_eff`, `link_eff`) are per hardware family
(`parity/data/hardware/families.toml`). Nothing here is fitted per published entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from parity.errors import PlanError
from parity.plan.hardware import Hardware

MODEL_VERSION = "parity-plan-3"

#: Expert load imbalance (max/mean tokens per device) with an expert-parallel load balancer: SGLang
#: measured 59,337 vs 50,302 tok/s/node prefill with simulated perfect vs default EPLB (lmsys blog
#: 2025-05-05, "Overall Throughput") -> 1.18; rounded to 1.2.
EXPERT_IMBALANCE = 1.2
#: Expert load imbalance per `--eplb` setting: 'perfect' (simulated perfect balance) and 'default'
#: (SGLang's EPLB as measured; the value above).
IMBALANCE = {"perfect": 1.0, "default": EXPERT_IMBALANCE}
#: Fraction of HBM usable for weights + cache (the rest: activations, workspace, fragmentation).
HBM_USABLE = 0.9
#: Default software stack (latency floor per layer, `parity/data/hardware/stacks.toml`) per vendor.
DEFAULT_STACK = {"nvidia": "cuda-graphs", "huawei": "ascend-graph"}

#: Storage bytes per weight value, scales included (FP8 128x128 block scales and INT8 per-channel
#: scales are negligible; FP4 e2m1 carries one UE8M0 byte per 32 values: DeepSeek-V4 inference/model.py
#: `fp4_block_size = 32`).
#: INT4 (W4A8) carries one bf16 scale per 128-value group (assumed group size, as common W4A8 kernels).
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5 + 1 / 32, "int4": 0.5 + 2 / 128}
#: Activation bytes per value sent in the MoE dispatch for an expert format (W4A8 sends INT8 activations).
DISPATCH_BYTES = {"bf16": 2.0, "fp8": 1.0 + 1 / 128, "int8": 1.0 + 1 / 128, "fp4": 0.5 + 1 / 16, "int4": 1.0 + 1 / 128}
FORMATS = tuple(WEIGHT_BYTES)
KV_DTYPES = ("bf16", "fp8", "int8")


@dataclass(frozen=True)
class Deployment:
    """How one serving instance is laid out.

    n_devices: devices in the instance (the EP group; attention runs DP x TP over them).
    attn_tp: attention tensor-parallel degree (divides n_devices); DP attention = n_devices / attn_tp.
    dense_format / expert_format: weight formats ('bf16' | 'fp8' | 'int8' | 'fp4').
    kv_dtype: cache format ('bf16' | 'fp8').
    mtp: MTP draft tokens per decode step (0 = off; K > 1 drafts re-run the MTP block K times);
    mtp_acceptance: acceptance rate per draft; accept_length: expected accepted tokens per step
    (1 .. mtp + 1, overrides mtp_acceptance when > 0).
    overlap: two micro-batches hide communication behind compute (TBO).
    redundant_experts: extra expert replicas across the EP group (EPLB).
    expert_imbalance: max/mean expert tokens per device (`IMBALANCE`).
    stack: software stack id in stacks.toml ('' = the vendor default `DEFAULT_STACK`).
    """

    n_devices: int = 8
    attn_tp: int = 1
    dense_format: str = "fp8"
    expert_format: str = "fp8"
    kv_dtype: str = "bf16"
    mtp: int = 0
    mtp_acceptance: float = 0.0
    overlap: bool = True
    redundant_experts: int = 0
    accept_length: float = 0.0
    expert_imbalance: float = EXPERT_IMBALANCE
    stack: str = ""

    def validate(self) -> None:
        """Raises PlanError naming the bad field."""
        if self.n_devices < 1:
            raise PlanError(f"deployment n_devices must be >= 1, got {self.n_devices}")
        if self.attn_tp < 1 or self.n_devices % self.attn_tp:
            raise PlanError(f"deployment attn_tp ({self.attn_tp}) must divide n_devices ({self.n_devices})")
        for f in ("dense_format", "expert_format"):
            if getattr(self, f) not in FORMATS:
                raise PlanError(f"deployment {f} is {getattr(self, f)!r}: expected one of {FORMATS}")
        if self.kv_dtype not in KV_DTYPES:
            raise PlanError(f"deployment kv_dtype is {self.kv_dtype!r}: expected one of {KV_DTYPES}")
        if self.mtp < 0 or not 0 <= self.mtp_acceptance <= 1:
            raise PlanError(
                f"deployment mtp must be >= 0 and mtp_acceptance in [0, 1], got {self.mtp}, {self.mtp_acceptance}"
            )
        if self.accept_length and not 1 <= self.accept_length <= self.mtp + 1:
            raise PlanError(f"MTP accepted length {self.accept_length:g} must lie in [1, mtp + 1 = {self.mtp + 1}]")
        if not self.expert_imbalance >= 1:
            raise PlanError(f"expert imbalance must be >= 1, got {self.expert_imbalance}")

    @property
    def tokens_per_step(self) -> float:
        """Expected accepted tokens per sequence per decode step: `accept_length` when given, else
        sum_{i=0..mtp} a^i (chain drafts)."""
        if self.accept_length:
            return self.accept_length
        return sum(self.mtp_acceptance**i for i in range(self.mtp + 1))


@dataclass
class Terms:
    """Ideal times (s) of one step at 100% of every peak; `combine` applies the constants."""

    gemm: list = field(default_factory=list)  # (compute_s, memory_s)
    attn: list = field(default_factory=list)  # (compute_s, memory_s)
    other_mem_s: float = 0.0
    comm_up_s: float = 0.0
    comm_out_s: float = 0.0
    overlap: bool = True
    fixed_s: float = 0.0
    host_s: float = 0.0  # host time to launch a step that is not graph-captured (hidden when the device is slower)

    def compact(self) -> Terms:
        """An equivalent Terms with identical (compute, memory) pairs merged (faster `combine`)."""

        def merge(pairs):
            acc: dict = {}
            for f, m in pairs:
                key = (round(f / m, 9) if m else None) if f else ("m",)
                if f and m:
                    key = ("r", round(f / m, 9))
                elif f:
                    key = ("f",)
                else:
                    key = ("m",)
                a = acc.setdefault(key, [0.0, 0.0])
                a[0] += f
                a[1] += m
            return [tuple(v) for v in acc.values()]

        return Terms(
            gemm=merge(self.gemm),
            attn=merge(self.attn),
            other_mem_s=self.other_mem_s,
            comm_up_s=self.comm_up_s,
            comm_out_s=self.comm_out_s,
            overlap=self.overlap,
            fixed_s=self.fixed_s,
            host_s=self.host_s,
        )

    def combine(self, c: dict) -> dict:
        """Step time (s) under calibration constants `c` (gemm_eff, attn_eff, hbm_eff, link_eff)."""
        he = c["hbm_eff"]
        comp = sum(max(f / c["gemm_eff"], m / he) for f, m in self.gemm)
        comp += sum(max(f / c["attn_eff"], m / he) for f, m in self.attn)
        comp += self.other_mem_s / he
        comm = max(self.comm_up_s, self.comm_out_s) / c["link_eff"]
        device = max(comp, comm) if self.overlap else comp + comm
        step = max(device, self.host_s) + self.fixed_s
        return {"step_s": step, "compute_s": comp, "comm_s": comm, "fixed_s": self.fixed_s, "host_s": self.host_s}


def weight_bytes_per_device(arch, dep: Deployment) -> dict:
    """Resident weight bytes on one device: dense (attention, shared/dense FFN, router, mHC; split by
    attention TP), local routed experts (E + redundant over n devices), embedding + LM head (bf16)."""
    wd, we = WEIGHT_BYTES[dep.dense_format], WEIGHT_BYTES[dep.expert_format]
    layers = list(arch.layers) + list(arch.mtp_layers)
    dense = sum(ly.proj_params + ly.dense_params for ly in layers) + arch.mtp_extra_params * len(arch.mtp_layers)
    n_moe = sum(ly.moe for ly in layers)
    local = math.ceil((arch.n_experts + dep.redundant_experts) / dep.n_devices)
    experts = n_moe * local * arch.expert_params * we
    emb = (arch.embed_params + arch.head_params) * 2.0
    return {
        "dense": dense * wd / dep.attn_tp,
        "experts": experts,
        "embedding": emb,
        "total": dense * wd / dep.attn_tp + experts + emb,
    }


def _layer_counts(arch) -> dict:
    """Identical layers grouped: {LayerSpec: count} (cached on the arch object)."""
    lc = getattr(arch, "_layer_counts", None)
    if lc is None:
        lc = {}
        for spec in arch.layers:
            lc[spec] = lc.get(spec, 0) + 1
        arch._layer_counts = lc
    return lc


def op_costs(arch, hw: Hardware, dep: Deployment, phase: str, tokens: float, ctx: float, seqs: float) -> list[dict]:
    """Op-level cost of one step on one device, per layer type (physical units, no efficiencies).

    Args:
        phase: 'prefill' or 'decode'.
        tokens: query tokens this device processes in the step (decode: seqs * (1 + mtp)).
        ctx: prefill prompt length, or decode context (KV length) in tokens.
        seqs: sequences on this device (decode: B; prefill: tokens / prompt length).

    Returns:
        One dict per group of identical layers (plus MTP and LM head groups): `kind`, `count`, FLOPs
        (`proj_flops`, `attn_flops`, `indexer_flops`, `dense_flops`, `expert_flops`), bytes of HBM traffic
        (`proj_weight_bytes`, `dense_weight_bytes`, `expert_weight_bytes`, `cache_read_bytes`,
        `cache_write_bytes`, `other_bytes` for mHC/norm streams) and bytes sent (`a2a_scaleup_bytes`,
        `a2a_scaleout_bytes`, `tp_bytes`), all totals over the group's `count` layers.
    """
    D = arch.hidden
    wd, we = WEIGHT_BYTES[dep.dense_format], WEIGHT_BYTES[dep.expert_format]
    n = dep.n_devices
    local = math.ceil((arch.n_experts + dep.redundant_experts) / n)
    k = arch.topk
    remote = (n - 1) / n
    in_domain = 1.0 if n <= hw.scaleup_domain else (hw.scaleup_domain - 1) / (n - 1)
    groups = []

    def layer(spec, tok, sq, c, cnt, label):
        fl, idx = arch.attn_flops_token(spec.kind, c, phase)
        g = {
            "kind": label,
            "count": cnt,
            # attention-side projections (and V4's compressor / indexer projections)
            "proj_flops": 2.0 * spec.proj_params * tok,
            "proj_weight_bytes": spec.proj_params * wd / dep.attn_tp,
            # core attention (+ lightning indexer scores)
            "attn_flops": fl * tok,
            "indexer_flops": idx * tok,
            "cache_read_bytes": (
                arch.attn_read_bytes(spec.kind, c, dep.kv_dtype) * sq * dep.attn_tp if phase == "decode" else 0.0
            ),
            "cache_write_bytes": arch.cache_write_bytes_token(spec.kind, dep.kv_dtype) * tok,
            # dense FFN, or shared expert + router
            "dense_flops": 2.0 * spec.dense_params * tok,
            "dense_weight_bytes": spec.dense_params * wd / dep.attn_tp,
            "other_bytes": arch.other_bytes_per_token_layer * tok,
            "expert_flops": 0.0,
            "expert_weight_bytes": 0.0,
            "a2a_scaleup_bytes": 0.0,
            "a2a_scaleout_bytes": 0.0,
            "tp_bytes": 0.0,
            "arch": arch.kind,
            # small-message all-reduces of the attention-TP group (attention output and FFN output)
            "allreduces": 2 * cnt if dep.attn_tp > 1 else 0,
        }
        if spec.moe:
            g["expert_flops"] = 2.0 * arch.expert_params * tok * k * dep.expert_imbalance
            g["expert_weight_bytes"] = local * (1.0 - math.exp(-tok * k / local)) * arch.expert_params * we
            per_copy = D * (DISPATCH_BYTES[dep.expert_format] + 2.0) * dep.expert_imbalance
            if phase == "prefill" and n > hw.scaleup_domain:
                # hierarchical all-to-all (DeepEP normal kernels): one copy per remote scale-up domain
                # over scale-out, then forwarded to the experts over scale-up
                ng = n / hw.scaleup_domain
                out_copies = (ng - 1) * (1 - (1 - 1 / ng) ** k)
                limit = getattr(arch, "route_limit_groups", 0)
                if limit:
                    out_copies = min(out_copies, limit - 1 + 1 / ng)
                g["a2a_scaleout_bytes"] = tok * out_copies * per_copy
                g["a2a_scaleup_bytes"] = tok * k * remote * per_copy
            else:
                # direct all-to-all (DeepEP low-latency kernels): every copy goes to its expert's device
                g["a2a_scaleup_bytes"] = tok * k * remote * in_domain * per_copy
                g["a2a_scaleout_bytes"] = tok * k * remote * (1 - in_domain) * per_copy
        if dep.attn_tp > 1:
            tp = dep.attn_tp
            g["tp_bytes"] = 2 * 2 * (tp - 1) / tp * tok * tp * D * 2.0  # two all-reduces of bf16 activations
        for key in list(g):
            if key.endswith(("_flops", "_bytes")):
                g[key] *= cnt
        groups.append(g)

    for spec, cnt in _layer_counts(arch).items():
        layer(spec, tokens, seqs, ctx, cnt, spec.kind + ("" if spec.moe else "-dense"))
    if phase == "decode":
        for i in range(dep.mtp if arch.mtp_layers else 0):  # each draft runs an MTP block on one token per seq
            spec = arch.mtp_layers[min(i, len(arch.mtp_layers) - 1)]
            layer(spec, seqs, seqs, ctx, 1, f"mtp{i}-" + spec.kind)
        head_tokens = tokens + seqs * (dep.mtp if arch.mtp_layers else 0)
    else:
        if dep.mtp:
            for spec in arch.mtp_layers[:1]:  # the MTP block also prefills the prompt (its own cache)
                layer(spec, tokens, seqs, ctx, 1, "mtp0-" + spec.kind)
        head_tokens = seqs
    zero = {key: 0.0 for key in groups[0] if key.endswith(("_flops", "_bytes"))}
    groups.append(
        {
            **zero,
            "kind": "lm_head",
            "count": 1,
            "dense_flops": 2.0 * arch.head_params * head_tokens,
            "dense_weight_bytes": arch.head_params * 2.0,
        }
    )
    return groups


def step_terms(arch, hw: Hardware, dep: Deployment, phase: str, tokens: float, ctx: float, seqs: float) -> Terms:
    """`op_costs` turned into ideal times at 100% of each peak (same arguments); prefill steps are eager
    (`groups_terms`)."""
    return groups_terms(op_costs(arch, hw, dep, phase, tokens, ctx, seqs), hw, dep, eager=phase == "prefill")


def stack_of(hw: Hardware, dep: Deployment):
    """The deployment's software stack (`parity.plan.hardware.Stack` from stacks.toml).

    Raises:
        PlanError: unknown stack id.
    """
    from parity.plan.hardware import stacks

    sid = dep.stack or DEFAULT_STACK.get(hw.vendor, "cuda-graphs")
    st = stacks()
    if sid not in st:
        raise PlanError(f"unknown software stack {sid!r}: known are {', '.join(sorted(st))}")
    return st[sid]


def layer_floor_s(hw: Hardware, dep: Deployment, arch_kind: str = "mla") -> float:
    """Latency floor per layer per step (s) of the deployment's software stack (stacks.toml) for an
    architecture ('v4' or 'mla'), plus the latency of the attention-TP group's two all-reduces.

    Raises:
        PlanError: unknown stack id.
    """
    st = stack_of(hw, dep)
    return st.layer_latency(arch_kind) + (2 * st.allreduce_latency(dep.attn_tp) if dep.attn_tp > 1 else 0.0)


def groups_terms(groups: list[dict], hw: Hardware, dep: Deployment, eager: bool = False) -> Terms:
    """Ideal times of a step from its op-cost groups (`op_costs` or `mixed_step_groups`).

    eager: the stack runs this step without a captured graph (prefill and prefill+decode steps: CUDA
    graphs and Ascend graph mode capture decode batches only), so the host must launch every kernel:
    `host_s` = layers x the stack's eager host time per layer on the node's host CPU (`Stack.eager_host`);
    the step takes the longer of host and device.
    """
    t = Terms(overlap=dep.overlap)
    stack = stack_of(hw, dep)
    hbm = hw.hbm_tb_s * 1e12
    pd_ = hw.peak(hw.weight_compute_dtype(dep.dense_format))
    pe = hw.peak(hw.weight_compute_dtype(dep.expert_format))
    kv_dt = dep.kv_dtype if dep.kv_dtype in ("fp8", "int8") and hw.peak(dep.kv_dtype) else "bf16"
    pa = hw.peak(kv_dt)
    pi = hw.peak(hw.best_dtype("fp8"))  # indexer scores run in low precision (official: fp4/fp8 QAT)
    ph = hw.peak("bf16")
    up_bw, out_bw = hw.scaleup_gb_s * 1e9, hw.scaleout_gb_s * 1e9
    allreduce = stack.allreduce_latency(dep.attn_tp)
    for g in groups:
        head = g["kind"] == "lm_head"
        if not head:
            t.fixed_s += g["count"] * stack.layer_latency(g.get("arch", "mla")) + g.get("allreduces", 0) * allreduce
            if eager:
                t.host_s += g["count"] * stack.eager_host(hw.host_cpu)
        t.gemm.append((g["proj_flops"] / pd_, g["proj_weight_bytes"] / hbm))
        t.attn.append(
            (g["attn_flops"] / pa + g["indexer_flops"] / pi, (g["cache_read_bytes"] + g["cache_write_bytes"]) / hbm)
        )
        t.gemm.append((g["dense_flops"] / (ph if head else pd_), g["dense_weight_bytes"] / hbm))
        if g["expert_flops"]:
            t.gemm.append((g["expert_flops"] / pe, g["expert_weight_bytes"] / hbm))
        t.other_mem_s += g["other_bytes"] / hbm
        t.comm_up_s += (g["a2a_scaleup_bytes"] + g["tp_bytes"]) / up_bw
        t.comm_out_s += g["a2a_scaleout_bytes"] / out_bw
    return t


def mixed_step_groups(
    arch, hw: Hardware, dep: Deployment, batch: float, ctx: float, chunk: float, prompt: float
) -> list[dict]:
    """Op-cost groups of one colocated step on one device: a decode of `batch` sequences at context
    `ctx` fused with a prefill chunk of `chunk` tokens of prompts of `prompt` tokens. FLOPs, cache and
    network bytes add; dense weights are read once; routed-expert weights once for the union of tokens."""
    dec = op_costs(arch, hw, dep, "decode", batch * (1 + dep.mtp), ctx, batch)
    if chunk <= 0:
        return dec
    pre = op_costs(arch, hw, replace(dep, mtp=min(dep.mtp, 1)), "prefill", chunk, prompt, chunk / prompt)
    we = WEIGHT_BYTES[dep.expert_format]
    local = math.ceil((arch.n_experts + dep.redundant_experts) / dep.n_devices)
    by_kind = {g["kind"]: dict(g) for g in dec}
    tok_d = batch * (1 + dep.mtp)
    for g in pre:
        m = by_kind.get(g["kind"])
        if m is None:
            by_kind[g["kind"]] = dict(g)
            continue
        for key, v in g.items():
            if key.endswith("_flops") or key in (
                "cache_read_bytes",
                "cache_write_bytes",
                "other_bytes",
                "a2a_scaleup_bytes",
                "a2a_scaleout_bytes",
                "tp_bytes",
            ):
                m[key] += v
        if g["expert_weight_bytes"]:
            tok = tok_d + chunk
            m["expert_weight_bytes"] = (
                g["count"] * local * (1.0 - math.exp(-tok * arch.topk / local)) * arch.expert_params * we
            )
    return list(by_kind.values())


def mixed_step_terms(
    arch, hw: Hardware, dep: Deployment, batch: float, ctx: float, chunk: float, prompt: float
) -> Terms:
    """`mixed_step_groups` as ideal times (see there); eager when it carries a prefill chunk."""
    return groups_terms(mixed_step_groups(arch, hw, dep, batch, ctx, chunk, prompt), hw, dep, eager=chunk > 0)


def hbm_budget(arch, hw: Hardware, dep: Deployment) -> float:
    """Bytes left for the cache on one device after weights (HBM * HBM_USABLE - weights); may be < 0."""
    return hw.hbm_gb * 1e9 * HBM_USABLE - weight_bytes_per_device(arch, dep)["total"]


def max_batch(arch, hw: Hardware, dep: Deployment, ctx: float) -> float:
    """Most sequences per device (batch B) whose caches at `ctx` tokens fit beside the weights (0 if none).
    With attention TP t every device of a group holds the caches of all t*B sequences of its group
    (the single shared KV head / latent is not split by head), so B = free / (t * cache per sequence)."""
    free = hbm_budget(arch, hw, dep)
    per = arch.cache_bytes_seq(ctx, dep.kv_dtype) * dep.attn_tp
    return max(0.0, free / per) if per > 0 else float("inf")


def decode_point(arch, hw, dep: Deployment, consts: dict, batch: float, ctx: float) -> dict:
    """Decode at `batch` sequences per device and context `ctx`: step time, TPOT (s), output tok/s per
    device, tok/s per user."""
    tokens = batch * (1 + dep.mtp)
    r = step_terms(arch, hw, dep, "decode", tokens, ctx, batch).combine(consts)
    acc = dep.tokens_per_step
    tpot = r["step_s"] / acc
    return {
        **r,
        "tpot_s": tpot,
        "out_tok_s_per_device": batch * acc / r["step_s"],
        "tok_s_per_user": 1.0 / tpot,
        "batch": batch,
    }


def prefill_point(
    arch, hw, dep: Deployment, consts: dict, tokens: float, prompt: float, uncached: float | None = None
) -> dict:
    """Prefill of `tokens` tokens per device from prompts of `prompt` tokens of which `uncached` (default
    all) are prefilled, the rest read from the prefix cache: step time, input (prefilled) tok/s per device."""
    if tokens <= 0 or prompt <= 0:
        raise PlanError(f"prefill tokens and prompt length must be positive, got {tokens}, {prompt}")
    seqs = tokens / (uncached or prompt)
    dep_p = replace(dep, mtp=min(dep.mtp, 1))
    r = step_terms(arch, hw, dep_p, "prefill", tokens, prompt, seqs).combine(consts)
    return {**r, "in_tok_s_per_device": tokens / r["step_s"], "tokens": tokens}
