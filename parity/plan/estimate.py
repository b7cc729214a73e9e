"""`parity estimate`: the figures of one fixed deployment (no search), as `parity serve` / vLLM spell it.

A `Setup` names the deployment (TP x DP devices, EP over all of them, quantization, cache dtype, MTP, EPLB,
TBO, software stack) and the workload (ISL/OSL, prefix-cache hit rate, batch or concurrency). Three phases:

- `prefill`: one prefill instance at `tokens_per_device` tokens per device (default: one prompt per
  attention-TP group): TTFT and input tok/s per device;
- `decode`: one decode instance at `batch_per_device` sequences (or `concurrency` over the instance):
  TPOT and output tok/s per device;
- `serving`: end-to-end, colocated (`disagg=False`: every step decodes the running batch, and prefill
  chunks of `max_num_batched_tokens` ride along; closed loop of `concurrency` users) or disaggregated
  (`disagg=True`: prefill and decode pools of `prefill_devices` / `decode_devices`).

`build(setup)` returns the ideal-time terms of every step the figures need (independent of the
calibration constants) and `figures(evaluator, constants)` turns them into numbers, so that validation
can refit constants without rebuilding the terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from parity.distributed.config import ParallelConfig
from parity.errors import ParallelError, PlanError
from parity.plan.arch import check_context, load_arch
from parity.plan.hardware import family_of, get_hardware
from parity.plan.serving_model import (
    IMBALANCE,
    Deployment,
    groups_terms,
    hbm_budget,
    max_batch,
    mixed_step_groups,
    op_costs,
    stack_of,
    weight_bytes_per_device,
)

#: `--quantization` -> (dense/attention weight format, routed-expert weight format). 'fp4' is V4's native
#: mixed checkpoint (FP4 experts, FP8 elsewhere: DeepSeek-V4 release notes / recipes); 'w4a8' is INT4
#: experts with INT8 activations and W8A8 elsewhere (vllm-ascend V4-Pro W4A8 tutorial).
QUANTIZATION = {
    "bf16": ("bf16", "bf16"),
    "fp8": ("fp8", "fp8"),
    "w8a8": ("int8", "int8"),
    "w4a8": ("int8", "int4"),
    "fp4": ("fp8", "fp4"),
}
PHASES = ("prefill", "decode", "serving")
#: `--max-num-batched-tokens` default: 0 = the software stack's default token budget per step
#: (`parity/data/hardware/stacks.toml` `max_num_batched_tokens`, with its source).
MAX_NUM_BATCHED_TOKENS = 0
#: Every throughput figure `estimate` reports, with its explicit metric name. `e2e_tok_s_per_user` is
#: OSL / (TTFT + OSL x TPOT), the per-user rate over a whole request (Dynamo's "E2E").
METRICS = {
    "ttft_ms": "time to first token (ms)",
    "tpot_ms": "time per output token (ms)",
    "input_tok_s_per_device": "input (prompt) tokens/s per device",
    "output_tok_s_per_device": "output tokens/s per device",
    "total_tok_s_per_device": "input + output tokens/s per device",
    "output_tok_s_per_instance": "output tokens/s per instance",
    "output_tok_s_per_user": "output tokens/s per user (1 / TPOT)",
    "e2e_tok_s_per_user": "output tokens/s per user incl. TTFT",
}


@dataclass(frozen=True)
class Setup:
    """One fixed deployment and workload (field names follow `parity estimate` flags)."""

    model: str = "v4-flash"
    hardware: str = "h200"
    phase: str = "serving"
    isl: int = 4096
    osl: int = 1024
    tp: int = 1
    dp: int = 8
    ep: int = 0  # 0 = TP x DP (the only EP the model describes)
    batch_per_device: float = 0.0  # decode sequences per device (0 = from concurrency)
    concurrency: float = 0.0  # sequences in flight over the instance (0 = from batch)
    tokens_per_device: float = 0.0  # prefill tokens per device per step (0 = one prompt per TP group)
    decode_context: float = 0.0  # decode KV length (0 = isl + osl / 2)
    mtp: int = 0
    mtp_acceptance: float = 0.0  # <= 1: acceptance rate per draft; > 1: accepted length per step
    quantization: str = "fp4"
    kv_cache_dtype: str = "bf16"
    prefix_hit_rate: float = 0.0
    eplb: str = "default"
    tbo: bool = True
    disagg: bool = False
    prefill_devices: int = 0
    decode_devices: int = 0
    redundant_experts: int = 0
    stack: str = ""
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS

    @property
    def n_devices(self) -> int:
        return self.tp * self.dp

    def validate(self) -> None:
        """Raises PlanError naming the bad flag."""
        if self.phase not in PHASES:
            raise PlanError(f"--phase is {self.phase!r}: expected one of {', '.join(PHASES)}")
        for name in ("isl", "osl", "tp", "dp", "max_num_batched_tokens"):
            v = getattr(self, name)
            low = 0 if name == "max_num_batched_tokens" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise PlanError(
                    f"--{_flag(name)} must be a {'non-negative' if low == 0 else 'positive'} integer, got {v!r}"
                )
        if self.ep not in (0, self.n_devices):
            raise PlanError(
                f"--expert-parallel-size {self.ep} must equal --tensor-parallel-size x "
                f"--data-parallel-size = {self.n_devices} (experts are spread over every device)"
            )
        if self.quantization not in QUANTIZATION:
            raise PlanError(f"--quantization is {self.quantization!r}: expected one of {', '.join(QUANTIZATION)}")
        if self.eplb not in IMBALANCE:
            raise PlanError(f"--eplb is {self.eplb!r}: expected one of {', '.join(IMBALANCE)}")
        if not 0 <= self.prefix_hit_rate < 1:
            raise PlanError(f"--prefix-hit-rate must be in [0, 1), got {self.prefix_hit_rate}")
        for name in ("batch_per_device", "concurrency", "tokens_per_device", "decode_context", "mtp_acceptance"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise PlanError(f"--{_flag(name)} must be a finite number >= 0, got {v}")
        if not isinstance(self.redundant_experts, int) or self.redundant_experts < 0:
            raise PlanError(f"--redundant-experts must be an integer >= 0, got {self.redundant_experts!r}")
        if self.mtp < 0 or self.mtp_acceptance < 0 or self.mtp_acceptance > self.mtp + 1:
            raise PlanError(
                f"--mtp {self.mtp} / --mtp-acceptance {self.mtp_acceptance}: acceptance must be a rate "
                f"in [0, 1] or an accepted length in (1, mtp + 1]"
            )
        if (
            self.disagg
            and self.phase == "serving"
            and (
                self.prefill_devices < self.tp
                or self.decode_devices < self.tp
                or self.prefill_devices % self.tp
                or self.decode_devices % self.tp
            )
        ):
            raise PlanError(
                "--disagg on needs --prefill-devices and --decode-devices, each a multiple of "
                f"--tensor-parallel-size ({self.tp})"
            )

    def token_budget(self) -> int:
        """Tokens per step per attention-TP group (`max_num_batched_tokens`; 0 = the stack's default)."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return stack_of(get_hardware(self.hardware), self.deployment()).max_num_batched_tokens

    def deployment(self, n_devices: int | None = None) -> Deployment:
        """The serving model's `Deployment` of this setup (on `n_devices`, default TP x DP)."""
        dense, experts = QUANTIZATION[self.quantization]
        acc = self.mtp_acceptance
        dep = Deployment(
            n_devices=n_devices or self.n_devices,
            attn_tp=self.tp,
            dense_format=dense,
            expert_format=experts,
            kv_dtype=self.kv_cache_dtype,
            mtp=self.mtp,
            mtp_acceptance=acc if acc <= 1 else 0.0,
            accept_length=acc if acc > 1 else 0.0,
            overlap=self.tbo,
            redundant_experts=self.redundant_experts,
            expert_imbalance=IMBALANCE[self.eplb],
            stack=self.stack,
        )
        dep.validate()
        return dep

    def flags(self) -> list[str]:
        """The `parity estimate` command-line flags that reproduce this setup (non-defaults only)."""
        out, default = [], Setup()
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("model", "hardware", "phase") or v != getattr(default, f.name):
                if isinstance(v, bool):
                    v = "on" if v else "off"
                elif f.name == "mtp":
                    v = str(v) if v else "off"
                elif isinstance(v, float) and v.is_integer():
                    v = int(v)
                out += [f"--{_flag(f.name)}", str(v)]
        return out


_FLAG = {
    "tp": "tensor-parallel-size",
    "dp": "data-parallel-size",
    "ep": "expert-parallel-size",
    "kv_cache_dtype": "kv-cache-dtype",
}


def _flag(name: str) -> str:
    return _FLAG.get(name, name.replace("_", "-"))


@dataclass
class Evaluator:
    """Step terms of a setup (constants-independent) and how to turn step times into figures."""

    setup: Setup
    terms: dict
    info: dict


def build(setup: Setup) -> Evaluator:
    """Ideal-time terms of every step the setup's figures need.

    Raises:
        PlanError: invalid setup, unknown model/hardware, or a sequence over the model's context
            (`check_context`: isl for the prefill phase, isl + osl otherwise); weights over HBM only add
            `warnings`.
    """
    setup.validate()
    arch, hw = load_arch(setup.model), get_hardware(setup.hardware)
    s = setup
    check_context(arch, s.isl, 0 if s.phase == "prefill" else s.osl)
    check_layout(arch, s)
    isl_u = max(1.0, s.isl * (1 - s.prefix_hit_rate))  # tokens actually prefilled per request
    ctx = s.decode_context or s.isl + s.osl / 2
    info = {"isl_uncached": isl_u, "n_devices": s.n_devices}
    terms = {}
    n_pre = s.prefill_devices if s.disagg and s.phase == "serving" else s.n_devices
    n_dec = s.decode_devices if s.disagg and s.phase == "serving" else s.n_devices
    for n in sorted({n_pre, n_dec}):
        w = weight_bytes_per_device(arch, s.deployment(n))["total"]
        if w > hw.hbm_gb * 1e9:
            info.setdefault("warnings", []).append(
                f"weights need {w / 1e9:.0f} GB per device on {n} x {hw.id} (HBM {hw.hbm_gb:.0f} GB): the "
                f"figures assume they fit (e.g. offloaded to host memory, which is not modeled)"
            )
    if s.phase in ("prefill", "serving"):
        dep = s.deployment(n_pre)
        tok = s.tokens_per_device or isl_u / s.tp
        pdep = replace(dep, mtp=min(dep.mtp, 1))
        # chunked prefill: the TP group's tokens go through in steps of at most the token budget; each
        # step re-reads the weights and pays the floor and host launch again (`prefill_steps` x step time);
        # attention FLOPs per step are the step's share of the whole prompts' causal attention
        steps = math.ceil(tok * s.tp / s.token_budget() - 1e-9)
        groups = op_costs(arch, hw, pdep, "prefill", tok / steps, s.isl, tok / steps / isl_u)
        terms["prefill"] = groups_terms(groups, hw, pdep, eager=True).compact()
        info["prefill_tokens_per_device"] = tok
        info["prefill_steps"] = steps
    if s.phase in ("decode", "serving"):
        dep = s.deployment(n_dec)
        conc = s.concurrency or s.batch_per_device * n_dec
        if conc <= 0:
            raise PlanError("--batch-per-device or --concurrency must be given for the decode and serving phases")
        # busiest attention group: ceil(concurrency / DP) sequences over its TP devices
        dp = n_dec // s.tp
        b = math.ceil(conc / dp - 1e-9) / s.tp
        info.update(concurrency=conc, batch_per_device=b, tokens_per_step=dep.tokens_per_step)
        _warn_cache_fit(info, arch, hw, dep, b, s.decode_context or s.isl + s.osl)
        terms["decode"] = groups_terms(op_costs(arch, hw, dep, "decode", b * (1 + dep.mtp), ctx, b), hw, dep).compact()
        if s.phase == "serving" and not s.disagg:
            chunk = min(isl_u, s.token_budget())
            info["chunk"], info["n_chunks"] = chunk, math.ceil(isl_u / chunk - 1e-9)
            terms["mixed"] = groups_terms(
                mixed_step_groups(arch, hw, dep, b, ctx, chunk / s.tp, s.isl), hw, dep, eager=True
            ).compact()
    return Evaluator(setup=s, terms=terms, info=info)


def check_layout(arch, s: Setup) -> None:
    """Refuse a layout the model cannot be split into: attention TP must divide the query heads and output
    groups (and the other TP-split sizes `parity serve` checks: `parity.distributed.config.ParallelConfig`),
    and EP over every device (TP x DP, or each disaggregated pool) needs at least one expert per device.

    Raises:
        PlanError: naming --tensor-parallel-size or the device count and the limit.
    """
    cfg = getattr(arch, "cfg", None)
    if cfg is not None:
        try:
            ParallelConfig(tensor_parallel_size=s.tp).validate(cfg)
        except ParallelError as e:
            raise PlanError(f"--tensor-parallel-size {s.tp}: {e}") from None
    elif getattr(arch, "d", {}).get("num_attention_heads", 1) % s.tp:
        raise PlanError(
            f"--tensor-parallel-size {s.tp} does not divide the {arch.d['num_attention_heads']} "
            f"attention heads of {s.model}; choose a size that divides it"
        )
    experts = arch.n_experts + s.redundant_experts
    pools = [s.prefill_devices, s.decode_devices] if s.disagg and s.phase == "serving" else [s.n_devices]
    for n in pools:
        if n > experts:
            raise PlanError(
                f"{n} devices hold more than the {experts} experts of {s.model} ({arch.n_experts} "
                f"routed + {s.redundant_experts} redundant): experts are spread over every device "
                f"(EP = TP x DP), one at least on each; use at most {experts} devices"
            )


def _warn_cache_fit(info: dict, arch, hw, dep: Deployment, batch: float, ctx: float) -> None:
    """Add a warning to `info` when `batch` sequences per device at `ctx` tokens do not fit their caches
    beside the weights (`serving_model.max_batch`; weights over HBM are warned about on their own)."""
    if hbm_budget(arch, hw, dep) <= 0:
        return
    cap = max_batch(arch, hw, dep, ctx)
    if batch > cap:
        need = batch * dep.attn_tp * arch.cache_bytes_seq(ctx, dep.kv_dtype)
        seqs = f"{batch:,.0f}" if batch >= 10 else f"{batch:g}"
        info.setdefault("warnings", []).append(
            f"the caches of {seqs} sequences per device at {ctx:,.0f} tokens need {need / 1e9:,.0f} GB per "
            f"device beside the weights, {hbm_budget(arch, hw, dep) / 1e9:,.0f} GB free on {hw.id} (HBM "
            f"{hw.hbm_gb:.0f} GB): at most {math.floor(cap):,} sequences per device fit; the figures assume "
            f"they all do"
        )


def figures(ev: Evaluator, consts: dict) -> dict:
    """Figures of an evaluated setup under calibration constants (keys: `METRICS` where defined)."""
    s, i = ev.setup, ev.info
    t = {k: v.combine(consts)["step_s"] for k, v in ev.terms.items()}
    out = {}
    if "prefill" in t:
        t_pre = t["prefill"] * i["prefill_steps"]
        out["prefill_ttft_ms"] = t_pre * 1e3
        out["prefill_input_tok_s_per_device"] = i["prefill_tokens_per_device"] / t_pre
    if "decode" in t:
        tps = i["tokens_per_step"]
        out["decode_tpot_ms"] = t["decode"] / tps * 1e3
        out["decode_output_tok_s_per_device"] = (
            i["concurrency"]
            * tps
            / t["decode"]
            / (s.decode_devices if s.disagg and s.phase == "serving" else s.n_devices)
        )
    if s.phase == "prefill":
        out["ttft_ms"] = out["prefill_ttft_ms"]
        out["input_tok_s_per_device"] = out["prefill_input_tok_s_per_device"]
    elif s.phase == "decode":
        out["tpot_ms"] = out["decode_tpot_ms"]
        out["output_tok_s_per_device"] = out["decode_output_tok_s_per_device"]
        out["output_tok_s_per_user"] = 1e3 / out["tpot_ms"]
    elif s.disagg:
        n_p, n_d = s.prefill_devices, s.decode_devices
        req_s = min(
            n_p * out["prefill_input_tok_s_per_device"] / i["isl_uncached"],
            n_d * out["decode_output_tok_s_per_device"] / s.osl,
        )
        out["ttft_ms"], out["tpot_ms"] = out["prefill_ttft_ms"], out["decode_tpot_ms"]
        _serving(out, s, req_s, n_p + n_d)
    else:
        out.update(
            colocated(
                t["decode"],
                t["mixed"],
                i["tokens_per_step"],
                i["concurrency"],
                s.n_devices // s.tp,
                s.osl,
                i["n_chunks"],
            )
        )
        _serving(out, s, out.pop("req_s"), s.n_devices)
    return out


def colocated(t_dec: float, t_mix: float, tps: float, concurrency: float, dp: int, osl: int, n_chunks: int) -> dict:
    """Closed-loop colocated serving of `concurrency` users over `dp` attention groups.

    Each request needs `n_chunks` steps that carry one of its prefill chunks (step time `t_mix`) and
    osl / tps decode steps (`t_dec`); a user is in exactly one of them per step, so the fraction of
    mixed steps in a group is f = (C/dp) * n_chunks / (osl/tps + n_chunks). f > 1 means prefill-bound:
    every step carries a chunk and requests queue for prefill. A user's own chunks make its TTFT; its
    decode steps carry the other users' chunks (fraction f * (users - 1) / users), which is its TPOT.

    Returns: ttft_ms, tpot_ms, req_s (requests/s over the instance).
    """
    users = concurrency / dp
    dec_steps = osl / tps
    f = users * n_chunks / (dec_steps + n_chunks)
    if f <= 1:
        f_others = f * max(0.0, users - 1) / users
        step = t_dec + f_others * (t_mix - t_dec)
        ttft = n_chunks * t_mix
        cycle = ttft + dec_steps * step
    else:
        step = t_mix
        cycle = users * n_chunks * t_mix
        ttft = cycle - dec_steps * t_mix
    return {"ttft_ms": ttft * 1e3, "tpot_ms": step / tps * 1e3, "req_s": concurrency / cycle}


def _serving(out: dict, s: Setup, req_s: float, n: int) -> None:
    out["output_tok_s_per_instance"] = req_s * s.osl
    out["output_tok_s_per_device"] = req_s * s.osl / n
    out["input_tok_s_per_device"] = req_s * s.isl / n
    out["total_tok_s_per_device"] = req_s * (s.isl + s.osl) / n
    out["output_tok_s_per_user"] = 1e3 / out["tpot_ms"]
    out["e2e_tok_s_per_user"] = s.osl / ((out["ttft_ms"] + s.osl * out["tpot_ms"]) / 1e3)


def estimate(setup: Setup, consts: dict | None = None) -> dict:
    """Figures of `setup` (see module docstring) with its hardware family's constants unless given.

    Returns: {"setup": fields, "flags": [...], metric: value, ...} (units in `METRICS`).

    Raises:
        PlanError: invalid setup (names the flag) or unknown model/hardware.
    """
    ev = build(setup)
    consts = consts or family_of(get_hardware(setup.hardware)).as_dict()
    return {"setup": asdict(setup), "flags": setup.flags(), **ev.info, **figures(ev, consts)}
