"""`plan_train`: the fastest training layout of a model on a cluster, and what the whole run costs.

Search space: TP in {1, 2, 4, 8} (inside the scale-up domain), PP in {1, 2, 4, 8, 16, 32}, CP in {1, 2, 4, 8,
16} for sequences over 16K tokens, EP over the powers of two that divide the routed experts and a stage's
ranks, schedule (1F1B, interleaved with 2 chunks, zero-bubble, DualPipe for MoE with an even PP), micro-batch
of 1 or 2 sequences, and per layout the recomputation (none / selective / full) and ZeRO stage (1-3) that
fit in memory at the best throughput. FP8 GEMMs where the chip has FP8 (DeepSeek-V3 recipe), else BF16.
"""

from __future__ import annotations

import math
import re

from parity.errors import PlanError
from parity.plan.hardware import get_hardware
from parity.plan.train_model import (
    HBM_USABLE,
    RECOMPUTE,
    TRAIN_MODEL_VERSION,
    TrainLayout,
    fits,
    memory,
    min_devices_for_memory,
    step,
)
from parity.plan.train_shape import TrainShape, load_shape
from parity.plan.train_validate import constants_for

#: Default tokens per optimizer step: 16,384 sequences of 4,096 tokens, about DeepSeek-V3's final batch
#: (15,360 x 4K, arXiv 2412.19437 sec. 4.2).
DEFAULT_GLOBAL_BATCH_TOKENS = 16384 * 4096
#: Default power usage effectiveness of the data centre (a flag; typical large AI data centres report
#: 1.1-1.4). Energy = chips x TDP x hours x PUE: an upper-bound model, not a measurement.
DEFAULT_PUE = 1.2
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
TERM_NAMES = {
    "compute": "compute (GEMM + attention FLOPs)",
    "bubble": "pipeline bubble",
    "tp": "TP all-reduce (scale-up)",
    "ep": "EP all-to-all",
    "pp": "PP point-to-point",
    "dp": "DP gradient reduce / parameter gather",
    "cp": "CP K/V exchange",
}


def parse_tokens(text: str | float | int) -> float:
    """'33T', '14.8T', '500B', '2e12', 1e12 -> tokens (float).

    Raises:
        PlanError: unparsable, or not positive.
    """
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        mt = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
        if not mt:
            raise PlanError(f"--tokens {text!r}: expected a number with an optional K/M/B/T suffix, e.g. 33T")
        v = float(mt.group(1)) * _SUFFIX[mt.group(2)]
    if not v > 0 or math.isinf(v):
        raise PlanError(f"--tokens must be a positive number of tokens, got {text!r}")
    return v


def _pow2(limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def _layouts(shape: TrainShape, hw, n: int, seq: int, fp8: bool):
    tps = [t for t in (1, 2, 4, 8) if t <= hw.scaleup_domain]
    cps = [c for c in (1, 2, 4, 8, 16) if c == 1 or seq > 16384]
    for tp in tps:
        for pp in (1, 2, 4, 8, 16, 32):
            if pp > shape.layers:
                continue
            for cp in cps:
                if n % (tp * pp * cp):
                    continue
                ranks = n // pp
                eps = (
                    [e for e in _pow2(min(shape.n_experts, ranks)) if shape.n_experts % e == 0 and ranks % e == 0]
                    if shape.moe
                    else [1]
                )
                scheds = (
                    ["1f1b"]
                    if pp == 1
                    else ["1f1b", "interleaved", "zb"] + (["dualpipe"] if shape.moe and pp % 2 == 0 else [])
                )
                for ep in eps:
                    for sc in scheds:
                        for mb in (1, 2):
                            yield TrainLayout(
                                n_devices=n,
                                tp=tp,
                                pp=pp,
                                ep=ep,
                                cp=cp,
                                micro_batch=mb,
                                schedule=sc,
                                vpp=2 if sc == "interleaved" else 1,
                                fp8=fp8,
                            )


def _provenance(fam: str, summary: dict, hw_family: str) -> str:
    note = "" if fam == hw_family else f"; constants of {fam}: no published training run on {hw_family}"
    return (
        f"modeled:{TRAIN_MODEL_VERSION} (+-{summary['loo_mape'] * 100:.0f}%, LOO over {summary['entries']} "
        f"entries{note})"
    )


def plan_train(
    model: str,
    hardware: str,
    n_devices: int,
    tokens,
    seq_len: int = 4096,
    global_batch_tokens: float | None = None,
    pue: float = DEFAULT_PUE,
) -> dict:
    """Best layout and the run's time, chip-hours, energy and cost (JSON-ready dict).

    Raises:
        PlanError: unknown model/chip, non-positive tokens / devices / seq_len / batch / PUE < 1, or a
            cluster too small to hold the model (the message gives the minimum chip count and why).
    """
    tok = parse_tokens(tokens)
    if not isinstance(n_devices, int) or n_devices < 1:
        raise PlanError(f"--num-devices must be a positive integer, got {n_devices!r}")
    if seq_len < 1:
        raise PlanError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if not (math.isfinite(pue) and pue >= 1):
        raise PlanError(f"--pue must be a finite number >= 1 (facility power / IT power), got {pue}")
    gbt = DEFAULT_GLOBAL_BATCH_TOKENS if global_batch_tokens is None else parse_tokens(global_batch_tokens)
    hw = get_hardware(hardware)
    shape = load_shape(model)
    consts, fam, summary = constants_for(hw.family, hw.vendor)
    usable = hw.hbm_gb * HBM_USABLE
    need = min_devices_for_memory(shape, hw, seq_len)
    if n_devices < need:
        raise PlanError(
            f"{n_devices} x {hw.id} cannot hold {shape.name} for training: needs at least {need:,} chips "
            f"(memory: {shape.total_params / 1e9:,.0f} B parameters x 18 bytes of bf16 weights, fp32 "
            f"gradients and AdamW state = {shape.total_params * 18 / 1e12:,.1f} TB, sharded over every "
            f"chip, plus activations, in {usable:,.0f} GB usable of {hw.hbm_gb:,.0f} GB per chip)"
        )
    fp8 = hw.peak("fp8") is not None
    best, smallest, min_dp = None, None, n_devices
    options = [(rc, z) for rc in RECOMPUTE for z in (1, 2, 3)]
    for base in _layouts(shape, hw, n_devices, seq_len, fp8):
        min_dp = min(min_dp, base.dp)
        if gbt < base.dp * base.micro_batch * seq_len / 2:
            continue
        m = max(1, round(gbt / (base.dp * base.micro_batch * seq_len)))
        for rc, z in options:
            lay = TrainLayout(**{**base.__dict__, "recompute": rc, "zero": z})
            mem = memory(shape, lay, seq_len, m)
            if not fits(mem, hw):
                if smallest is None or mem["total"] < smallest:
                    smallest = mem["total"]
                continue
            r = step(shape, hw, lay, seq_len, gbt, consts)
            if best is None or r["tokens_per_s_per_chip"] > best["tokens_per_s_per_chip"]:
                best = r
    if best is None:
        head = (
            f"no TP/PP/EP/CP layout of {n_devices} x {hw.id} trains {shape.name} at seq {seq_len} with a "
            f"global batch of {gbt:,.0f} tokens: "
        )
        if smallest is None:  # every layout has more data-parallel replicas than the batch has sequences
            raise PlanError(
                head + f"the cluster is too large for the global batch (each data-parallel replica "
                f"needs at least one micro-batch of {seq_len:,} tokens, and every layout of "
                f"{n_devices:,} chips has at least {min_dp:,} replicas); use fewer chips or "
                f"--global-batch-tokens of at least {min_dp * seq_len:,}"
            )
        raise PlanError(
            head + f"the smallest layout needs {smallest / 1e9:,.0f} GB per chip of {usable:,.0f} GB "
            f"usable (memory); use more chips or a larger --global-batch-tokens"
        )
    return _result(shape, hw, best, tok, seq_len, pue, _provenance(fam, summary, hw.family), consts, fam)


def _result(shape, hw, r, tok, seq_len, pue, prov, consts, fam) -> dict:
    n = r["layout"]["n_devices"]
    cluster = r["tokens_per_s_per_chip"] * n
    seconds = tok / cluster
    chip_h = n * seconds / 3600
    energy = None if hw.tdp_w is None else chip_h * hw.tdp_w / 1000 * pue / 1000
    cost = None if hw.usd_per_hour is None else chip_h * hw.usd_per_hour
    lim = r["limiting"]
    terms = r["terms"]
    return {
        "model": shape.name,
        "hardware": hw.id,
        "hardware_name": hw.name,
        "hardware_status": hw.status,
        "n_devices": n,
        "tokens": tok,
        "seq_len": seq_len,
        "global_batch_tokens": r["global_batch_tokens"],
        "layout": r["layout"],
        "dp": n // (r["layout"]["tp"] * r["layout"]["pp"] * r["layout"]["cp"]),
        "micro_batches": r["micro_batches"],
        "compute_dtype": r["compute_dtype"],
        "ep_overlapped": r["ep_overlapped"],
        "step_s": r["step_s"],
        "tokens_per_s_per_chip": r["tokens_per_s_per_chip"],
        "tokens_per_s_cluster": cluster,
        "mfu": r["mfu"],
        "mfu_bf16": r["mfu_bf16"],
        "model_flops_per_token": r["model_flops_per_token"],
        "mfu_convention": (
            "model FLOPs = 6 x activated matmul parameters (LM head and MTP in, embedding out) "
            "+ 3 x causal attention forward FLOPs, recomputation not counted; / dense peak of "
            f"the matmul compute dtype ({r['compute_dtype']})"
        ),
        "days": seconds / 86400,
        "chip_hours": chip_h,
        "energy_mwh": energy,
        "pue": pue,
        "energy_basis": f"modeled: chips x TDP {hw.tdp_w} W x hours x PUE {pue:g} (catalog TDP)",
        "usd": cost,
        "usd_per_chip_hour": hw.usd_per_hour,
        "price_source": hw.sources.get("price.usd_per_hour", ""),
        "memory_gb_per_chip": r["memory"]["total"] / 1e9,
        "hbm_gb": hw.hbm_gb,
        "terms_s": terms,
        "limiting_resource": TERM_NAMES[lim],
        "constants": {**consts, "family": fam},
        "provenance": prov,
    }
