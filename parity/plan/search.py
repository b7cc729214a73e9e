"""Deployment search: the best way to serve a model on a chip under TTFT/TPOT SLOs (`parity plan`), and
the throughput-vs-interactivity frontier across chips (`parity compare`).

Search space per chip: instance size n (powers of two up to 256, plus the scale-up domain size),
attention TP (1/2/4/8, within the scale-up domain, DP attention over the rest), expert weight format
(the checkpoint's FP4 experts where the model ships them — V4 — stored as FP4 and computed at the best
dtype the chip has; else the chip's best 8-bit format), dense format (FP8, else W8A8 INT8, else BF16),
cache format (FP8 where the chip has FP8, else BF16), MTP on/off (acceptance `MTP_ACCEPTANCE`), decode
batch per device (memory- and TPOT-limited), prefill tokens per device (TTFT-limited), and colocated vs
prefill/decode-disaggregated serving.

Definitions (all modeled):
- TTFT = time of the prefill step that holds the request (queueing at load is not modeled) + KV
  transfer to the decode instance over scale-out (disaggregated); colocated: the prompt is chunked over
  decode steps, TTFT = steps needed x step time.
- TPOT = decode step time / accepted tokens per step.
- Output tok/s per chip over the whole service = osl / (isl / P + osl / D) with P input tok/s per
  prefill device and D output tok/s per decode device (disaggregated), or the colocated step's rate.
- Tokens per joule = output tok/s per chip / TDP (chip TDP, not measured power).
- $ per million output tokens = hourly price / (3600 * output tok/s per chip) * 1e6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from parity.errors import PlanError
from parity.plan.arch import V4Arch, check_context, load_arch
from parity.plan.estimate import colocated
from parity.plan.hardware import Hardware, family_of, get_hardware
from parity.plan.serving_model import (
    Deployment,
    decode_point,
    hbm_budget,
    max_batch,
    mixed_step_terms,
    prefill_point,
    stack_of,
    weight_bytes_per_device,
)

#: MTP acceptance per draft token: DeepSeek-V3 report section 5.4.3 (85-90% for the second token); taken
#: for V4's MTP too (not yet measured by parity).
MTP_ACCEPTANCE = 0.85
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TPS = (1, 2, 4, 8)
BATCHES = tuple(sorted({int(round(2 ** (i / 2))) for i in range(0, 25)}))  # 1 .. 4096, sqrt(2) steps
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class Workload:
    """A serving target. Lengths in tokens, SLOs in ms, load in requests/s; `prefix_hit_rate`: fraction of
    each prompt's tokens found in the prefix cache (only the rest is prefilled)."""

    isl: int
    osl: int
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 50.0
    target_qps: float | None = None
    prefix_hit_rate: float = 0.0

    @property
    def uncached(self) -> float:
        """Prompt tokens each request prefills (tokens): isl x (1 - prefix_hit_rate), at least 1."""
        return max(1.0, self.isl * (1 - self.prefix_hit_rate))

    def validate(self) -> None:
        """Raises PlanError naming the bad parameter."""
        for name in ("isl", "osl"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PlanError(f"--{name} must be a positive integer number of tokens, got {v!r}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise PlanError(f"--{name.replace('_', '-')} must be a positive number of milliseconds, got {v!r}")
        if self.target_qps is not None and not (self.target_qps > 0 and math.isfinite(self.target_qps)):
            raise PlanError(f"--target-qps must be a positive number of requests/s, got {self.target_qps!r}")
        if not 0 <= self.prefix_hit_rate < 1:
            raise PlanError(f"--prefix-hit-rate must be in [0, 1), got {self.prefix_hit_rate}")


def _formats(arch, hw: Hardware) -> list[tuple[str, str, str]]:
    dense = "fp8" if hw.peak("fp8") else ("int8" if hw.peak("int8") else "bf16")
    kv = "fp8" if hw.peak("fp8") else "bf16"
    experts = {dense}
    if isinstance(arch, V4Arch) or hw.peak("fp4"):
        experts.add("fp4")  # V4 ships FP4 experts; V3 only where the chip computes FP4
    return [(dense, e, kv) for e in sorted(experts)]


def _deployments(arch, hw: Hardware, mtp_options) -> list[Deployment]:
    sizes = sorted(set(SIZES) | ({hw.scaleup_domain} if hw.scaleup_domain <= 512 else set()))
    out = []
    for n in sizes:
        for tp in TPS:
            if tp > n or n % tp or tp > hw.scaleup_domain:
                continue
            for dense, experts, kv in _formats(arch, hw):
                for m in mtp_options:
                    out.append(
                        Deployment(
                            n_devices=n,
                            attn_tp=tp,
                            dense_format=dense,
                            expert_format=experts,
                            kv_dtype=kv,
                            mtp=m,
                            mtp_acceptance=MTP_ACCEPTANCE if m else 0.0,
                        )
                    )
    return out


def _largest(batches, ok):
    """Largest b in ascending `batches` with ok(b) true, assuming ok is monotone (true then false);
    None if none. Binary search: the model's TPOT grows with the batch."""
    lo, hi, best = 0, len(batches) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(batches[mid]):
            best, lo = batches[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _best_decode(arch, hw, dep, consts, ctx_avg, ctx_max, tpot_slo_s):
    """Decode at the largest batch meeting TPOT and memory (throughput per device grows with the batch
    in this model); returns (point or None, TPOT at batch 1 or None when nothing fits)."""
    cap = max_batch(arch, hw, dep, ctx_max)
    if cap < 1:
        return None, None
    cache: dict = {}

    def point(b):
        if b not in cache:
            cache[b] = decode_point(arch, hw, dep, consts, b, ctx_avg)
        return cache[b]

    cands = [b for b in BATCHES if b <= cap]
    b = _largest(cands, lambda x: point(x)["tpot_s"] <= tpot_slo_s)
    return (point(b) if b else None), point(1)["tpot_s"]


def _kv_transfer_s(arch, hw, dep, isl) -> float:
    return arch.cache_bytes_seq(isl, dep.kv_dtype) / (hw.scaleout_gb_s * 1e9)


def _best_prefill(arch, hw, dep, consts, isl, ttft_slo_s, uncached=None):
    """Prefill at the tokens per device with the most input tok/s meeting TTFT and memory. A prompt's
    `uncached` tokens (default all `isl`; the rest come from the prefix cache) are split over its
    attention-TP group (uncached / TP tokens per device at the least), so TP cuts TTFT. Input tok/s
    counts prefilled (uncached) tokens."""
    uncached = uncached or isl
    budget = hbm_budget(arch, hw, dep)
    if budget <= 0:
        return None, None
    best, ttft_min = None, None
    per_seq = arch.cache_bytes_seq(isl, dep.kv_dtype)
    least = uncached / dep.attn_tp
    for tok in sorted({t for t in PREFILL_TOKENS if t > least} | {least}):
        seqs = tok / uncached
        if seqs * dep.attn_tp * per_seq > budget:
            break
        p = prefill_point(arch, hw, dep, consts, tok, isl, uncached)
        ttft = p["step_s"] + _kv_transfer_s(arch, hw, dep, isl)
        ttft_min = ttft if ttft_min is None else min(ttft_min, ttft)
        if ttft > ttft_slo_s:
            break
        if best is None or p["in_tok_s_per_device"] > best["in_tok_s_per_device"]:
            best = {**p, "ttft_s": ttft}
    return best, ttft_min


def _describe(dep: Deployment) -> dict:
    d = asdict(dep)
    d["attn_dp"] = dep.n_devices // dep.attn_tp
    d["ep"] = dep.n_devices
    return d


def plan(model: str, hardware: str, workload: Workload, consts: dict | None = None) -> dict:
    """Best deployment of `model` on `hardware` meeting `workload`'s SLOs.

    Returns a dict with `feasible`; when feasible the chosen mode (disaggregated / colocated), the
    prefill and decode instances, predicted input/output tok/s per chip, TTFT, TPOT, tok/s per user,
    tokens per joule, $ per million output tokens and chips for the target load; otherwise `reason`
    naming the limiting resource (memory, TPOT SLO, TTFT SLO) with the best value reachable.

    Raises:
        PlanError: unknown model/hardware (with suggestions), invalid workload, or isl + osl over the model's
            context (`check_context`).
    """
    workload.validate()
    arch = load_arch(model)
    check_context(arch, workload.isl, workload.osl)
    hw = get_hardware(hardware)
    consts = consts or family_of(hw).as_dict()
    mtp_options = (0, 1) if arch.mtp_layers else (0,)
    deps = _deployments(arch, hw, mtp_options)
    ctx_avg = workload.isl + workload.osl / 2
    ctx_max = workload.isl + workload.osl
    tpot_slo, ttft_slo = workload.slo_tpot_ms / 1e3, workload.slo_ttft_ms / 1e3

    fits = [d for d in deps if hbm_budget(arch, hw, d) > 0]
    if not fits:
        need = min(weight_bytes_per_device(arch, d)["total"] for d in deps)
        return _infeasible(
            model,
            hw,
            workload,
            "memory",
            f"weights need at least {need / 1e9:.0f} GB per device even at n={max(SIZES)} "
            f"(HBM {hw.hbm_gb:.0f} GB, {int(0.9 * 100)}% usable)",
        )
    best_dec, best_tpot1 = None, None
    for d in fits:
        p, t1 = _best_decode(arch, hw, d, consts, ctx_avg, ctx_max, tpot_slo)
        if t1 is not None and (best_tpot1 is None or t1 < best_tpot1):
            best_tpot1 = t1
        if p and (best_dec is None or p["out_tok_s_per_device"] > best_dec[1]["out_tok_s_per_device"]):
            best_dec = (d, p)
    best_pre, ttft_min = None, None
    for d in fits:
        if d.mtp > 1:
            continue
        p, tmin = _best_prefill(arch, hw, d, consts, workload.isl, ttft_slo, workload.uncached)
        if tmin is not None and (ttft_min is None or tmin < ttft_min):
            ttft_min = tmin
        if p and (best_pre is None or p["in_tok_s_per_device"] > best_pre[1]["in_tok_s_per_device"]):
            best_pre = (d, p)
    colo = _colocated(arch, hw, fits, consts, workload, ctx_avg, ctx_max)
    if best_dec is None or best_pre is None:
        if colo:
            return _finish(model, hw, workload, colo)
    if best_dec is None:
        if best_tpot1 is None:
            return _infeasible(
                model,
                hw,
                workload,
                "memory",
                f"no instance holds the weights plus one sequence's cache at {ctx_max} tokens",
            )
        return _infeasible(
            model,
            hw,
            workload,
            "tpot-slo",
            f"best TPOT at batch 1 is {best_tpot1 * 1e3:.1f} ms > SLO {workload.slo_tpot_ms:g} ms",
        )
    if best_pre is None:
        if ttft_min is None:
            return _infeasible(
                model,
                hw,
                workload,
                "memory",
                f"no prefill instance holds the weights plus a {workload.isl}-token prompt's cache",
            )
        return _infeasible(
            model,
            hw,
            workload,
            "ttft-slo",
            f"fastest prefill of a {workload.isl}-token prompt takes {ttft_min * 1e3:.0f} ms > "
            f"SLO {workload.slo_ttft_ms:g} ms",
        )
    (dd, dp), (pd_, pp) = best_dec, best_pre
    P, D = pp["in_tok_s_per_device"], dp["out_tok_s_per_device"]
    out_chip = workload.osl / (workload.uncached / P + workload.osl / D)
    result = {
        "mode": "disaggregated",
        "decode": {**_describe(dd), "batch_per_device": dp["batch"]},
        "prefill": {**_describe(pd_), "tokens_per_device": pp["tokens"]},
        "ttft_ms": pp["ttft_s"] * 1e3,
        "tpot_ms": dp["tpot_s"] * 1e3,
        "tok_s_per_user": dp["tok_s_per_user"],
        "output_tok_s_per_chip": out_chip,
        "input_tok_s_per_chip": out_chip * workload.isl / workload.osl,
        "prefill_in_tok_s_per_device": P,
        "decode_out_tok_s_per_device": D,
        "prefill_fraction_of_chips": (workload.uncached / P) / (workload.uncached / P + workload.osl / D),
    }
    if colo and colo["output_tok_s_per_chip"] > result["output_tok_s_per_chip"]:
        result = colo
    return _finish(model, hw, workload, result)


def colocated_point(arch, hw, dep, consts, batch, workload, ctx_avg) -> dict:
    """Colocated serving at `batch` sequences per device (closed loop of batch x n users): each step
    decodes the batch and carries a prefill chunk of up to the stack's token budget (stacks.toml; split over
    the attention-TP group) in the fraction of steps the arriving prompts need (`estimate.colocated`); only a
    prompt's uncached tokens (`Workload.uncached`) are chunked, each chunk attending over the whole prompt."""
    dp = dep.n_devices // dep.attn_tp
    chunk = min(workload.uncached, stack_of(hw, dep).max_num_batched_tokens)
    n_chunks = math.ceil(workload.uncached / chunk - 1e-9)
    dec = decode_point(arch, hw, dep, consts, batch, ctx_avg)
    mix = mixed_step_terms(arch, hw, dep, batch, ctx_avg, chunk / dep.attn_tp, workload.isl).combine(consts)
    r = colocated(dec["step_s"], mix["step_s"], dep.tokens_per_step, batch * dep.n_devices, dp, workload.osl, n_chunks)
    out = r["req_s"] * workload.osl / dep.n_devices
    return {"b": batch, "chunk": chunk, "ttft": r["ttft_ms"] / 1e3, "tpot": r["tpot_ms"] / 1e3, "out": out}


def _colocated(arch, hw, fits, consts, workload, ctx_avg, ctx_max):
    """Best colocated deployment meeting both SLOs (largest such batch per deployment)."""
    best = None
    tpot_slo, ttft_slo = workload.slo_tpot_ms / 1e3, workload.slo_ttft_ms / 1e3
    for d in fits:
        if d.mtp > 1:
            continue
        cap = max_batch(arch, hw, d, ctx_max)
        cands = [b for b in BATCHES if b <= cap]
        cache: dict = {}

        def point(b, d=d, cache=cache):
            if b not in cache:
                cache[b] = colocated_point(arch, hw, d, consts, b, workload, ctx_avg)
            return cache[b]

        b = _largest(cands, lambda x: point(x)["tpot"] <= tpot_slo and point(x)["ttft"] <= ttft_slo)
        if not b:
            continue
        q = point(b)
        if best is None or q["out"] > best["output_tok_s_per_chip"]:
            best = {
                "mode": "colocated",
                "decode": {**_describe(d), "batch_per_device": b},
                "prefill": {**_describe(d), "tokens_per_device": q["chunk"] / d.attn_tp},
                "ttft_ms": q["ttft"] * 1e3,
                "tpot_ms": q["tpot"] * 1e3,
                "tok_s_per_user": 1 / q["tpot"],
                "output_tok_s_per_chip": q["out"],
                "input_tok_s_per_chip": q["out"] * workload.isl / workload.osl,
                "prefill_in_tok_s_per_device": None,
                "decode_out_tok_s_per_device": q["out"],
                "prefill_fraction_of_chips": 0.0,
            }
    return best


def _provenance(model: str, hw: Hardware, mode: str | None) -> dict:
    """Error label of each modeled figure: its setup class's leave-one-out error (`validate.error_label`)."""
    from parity.plan.validate import error_label, generation

    gen = generation(model)
    pre, dec = ("serving", "serving") if mode == "colocated" else ("prefill", "decode")
    return {
        "ttft_ms": error_label(hw.family, pre, gen),
        "tpot_ms": error_label(hw.family, dec, gen),
        "output_tok_s_per_chip": error_label(hw.family, dec, gen),
    }


def _finish(model, hw: Hardware, workload: Workload, r: dict) -> dict:
    out = r["output_tok_s_per_chip"]
    r["tokens_per_joule"] = out / hw.tdp_w if hw.tdp_w else None
    r["tokens_per_joule_basis"] = "modeled from TDP" if hw.tdp_w else "unknown (no TDP published)"
    r["usd_per_m_output_tokens"] = hw.usd_per_hour / (3600 * out) * 1e6 if hw.usd_per_hour else None
    if workload.target_qps:
        if r["mode"] == "disaggregated":
            n_p, n_d = r["prefill"]["n_devices"], r["decode"]["n_devices"]
            pre = math.ceil(workload.target_qps * workload.uncached / r["prefill_in_tok_s_per_device"] / n_p) * n_p
            dec = math.ceil(workload.target_qps * workload.osl / r["decode_out_tok_s_per_device"] / n_d) * n_d
            r["chips_for_target"] = {"prefill": pre, "decode": dec, "total": pre + dec}
        else:
            n = r["decode"]["n_devices"]
            tot = math.ceil(workload.target_qps * workload.osl / r["decode_out_tok_s_per_device"] / n) * n
            r["chips_for_target"] = {"total": tot}
    prov = _provenance(model, hw, r["mode"])
    return {
        "feasible": True,
        "model": model,
        "hardware": hw.id,
        "hardware_name": hw.name,
        "hardware_status": hw.status,
        "workload": asdict(workload),
        "provenance": prov["output_tok_s_per_chip"],
        "provenance_by_figure": prov,
        **r,
    }


def _infeasible(model, hw: Hardware, workload: Workload, limit: str, why: str) -> dict:
    return {
        "feasible": False,
        "model": model,
        "hardware": hw.id,
        "hardware_name": hw.name,
        "hardware_status": hw.status,
        "workload": asdict(workload),
        "limiting_resource": limit,
        "reason": f"no deployment of {model} on {hw.id} fits: {limit}: {why}",
        "provenance": _provenance(model, hw, None)["output_tok_s_per_chip"],
    }


def frontier(model: str, hardware: str, workload: Workload, consts: dict | None = None) -> list[dict]:
    """Pareto frontier of output tok/s per chip vs tok/s per user over both modes (each point names its
    `mode`): disaggregated (prefill at its best TTFT-feasible point, decode swept over batch and
    deployments) and colocated (swept over batch, TTFT SLO applied); TPOT SLO not applied."""
    workload.validate()
    arch, hw = load_arch(model), get_hardware(hardware)
    check_context(arch, workload.isl, workload.osl)
    consts = consts or family_of(hw).as_dict()
    mtp_options = (0, 1) if arch.mtp_layers else (0,)
    fits = [d for d in _deployments(arch, hw, mtp_options) if hbm_budget(arch, hw, d) > 0]
    best_P = None
    for d in fits:
        p, _ = _best_prefill(arch, hw, d, consts, workload.isl, workload.slo_ttft_ms / 1e3, workload.uncached)
        if p and (best_P is None or p["in_tok_s_per_device"] > best_P):
            best_P = p["in_tok_s_per_device"]
    ctx_avg, ctx_max = workload.isl + workload.osl / 2, workload.isl + workload.osl
    pts = []
    for d in fits:
        cap = max_batch(arch, hw, d, ctx_max)
        desc = {"n_devices": d.n_devices, "attn_tp": d.attn_tp, "expert_format": d.expert_format, "mtp": d.mtp}
        for b in BATCHES:
            if b > cap:
                break
            if best_P:
                p = decode_point(arch, hw, d, consts, b, ctx_avg)
                chip = workload.osl / (workload.uncached / best_P + workload.osl / p["out_tok_s_per_device"])
                pts.append(
                    {
                        "mode": "disaggregated",
                        "tok_s_per_user": p["tok_s_per_user"],
                        "output_tok_s_per_chip": chip,
                        **desc,
                        "batch_per_device": b,
                    }
                )
            q = colocated_point(arch, hw, d, consts, b, workload, ctx_avg)
            if q["ttft"] <= workload.slo_ttft_ms / 1e3:
                pts.append(
                    {
                        "mode": "colocated",
                        "tok_s_per_user": 1 / q["tpot"],
                        "output_tok_s_per_chip": q["out"],
                        **desc,
                        "batch_per_device": b,
                    }
                )
    pts.sort(key=lambda x: (-x["tok_s_per_user"], -x["output_tok_s_per_chip"]))
    front, best = [], -1.0
    for p in pts:
        if p["output_tok_s_per_chip"] > best:
            front.append(p)
            best = p["output_tok_s_per_chip"]
    return front
