"""`parity bench sweep`: one run per load point (concurrency and/or request rate, per ISL/OSL pair), stopped once
the load is past the SLOs, and the throughput-latency frontier of the points.

Points of one ISL/OSL pair run in increasing load (concurrency outer, request rate inner). After each point the
median TTFT and median TPOT (of its steady-state window, else of the whole run) are compared with the SLOs: once
either exceeds twice its SLO the remaining points of that pair are skipped (more load only gets slower) and the
index says why. Every point is a normal result file; ``sweep.json`` indexes them with their frontier figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from parity.bench.frontier import pareto_frontier, point_figures
from parity.bench.metering import as_meters, measure_idle
from parity.bench.metrics import parse_slo
from parity.bench.result import save_result
from parity.bench.result_schema import SWEEP_SCHEMA
from parity.bench.run_config import BenchConfig
from parity.bench.workloads import parse_workload
from parity.errors import BenchError

SWEEP_VERSION = 1
#: A sweep stops once a median latency exceeds this multiple of its SLO.
STOP_FACTOR = 2.0


def load_points(concurrencies: list[int] | None, rates: list[float] | None) -> list[tuple[int | None, float]]:
    """(max concurrency, request rate) of every point in increasing load; a missing list is one unbounded value.

    Raises:
        BenchError: both lists missing or empty, a concurrency < 1, a rate <= 0.
    """
    if not concurrencies and not rates:
        raise BenchError("bench sweep: give --concurrency and/or --request-rate lists, e.g. --concurrency 1,4,16,64")
    for c in concurrencies or []:
        if c < 1:
            raise BenchError(f"bench sweep: --concurrency values must be >= 1, got {c}")
    for r in rates or []:
        if not r > 0:
            raise BenchError(f"bench sweep: --request-rate values must be > 0 or inf, got {r}")
    cs = sorted(set(concurrencies)) if concurrencies else [None]
    rs = sorted(set(rates)) if rates else [math.inf]
    return [(c, r) for c in cs for r in rs]


def workload_for(workload: str, isl: int, osl: int) -> str:
    """`workload` (a random or fixed spec) with its input / output lengths set to `isl` / `osl`.

    Raises:
        BenchError: the workload is not random or fixed (file workloads have their own lengths).
    """
    ws = parse_workload(workload)
    if ws.kind not in ("random", "fixed"):
        raise BenchError(f"bench sweep: --isl-osl needs a random or fixed --workload, got {ws.kind!r}")
    if ws.kind == "fixed":
        return f"fixed:in={isl},out={osl}"
    return f"random:in={isl},out={osl},ratio={ws.ratio:g},convention={ws.convention}"


def past_slo(result: dict, slo: dict[str, float]) -> str | None:
    """Why the sweep stops after `result` (median TTFT or TPOT > STOP_FACTOR x its SLO), else None."""
    ss = result.get("steady_state") or {}
    s = result["summary"]
    med = {
        "ttft_ms": ss.get("ttft_ms_median") if ss.get("duration_s") else None,
        "tpot_ms": ss.get("tpot_ms_median") if ss.get("duration_s") else None,
    }
    for key in ("ttft_ms", "tpot_ms"):
        if med[key] is None:
            med[key] = s[key].get("median")
        if key in slo and med[key] is not None and med[key] > STOP_FACTOR * slo[key]:
            return (
                f"median {key[:4].upper()} {med[key]:.1f} ms > {STOP_FACTOR:g} x SLO {slo[key]:g} ms: "
                "higher loads skipped"
            )
    return None


def _name(isl, osl, conc, rate) -> str:
    pair = f"isl{isl}-osl{osl}-" if isl else ""
    r = "inf" if math.isinf(rate) else f"{rate:g}"
    return f"{pair}c{conc if conc is not None else 'inf'}-r{r}.json"


def run_sweep(
    cfg: BenchConfig,
    concurrencies: list[int] | None,
    rates: list[float] | None,
    isl_osl: list[tuple[int, int]] | None,
    out_dir: str | Path,
    *,
    run=None,
    tokenizer=None,
    meter=None,
    transport=None,
    prompts_per_concurrency: int = 10,
) -> dict:
    """Run every point, write one result per point and ``sweep.json`` into `out_dir`.

    Args:
        cfg: the base configuration (its concurrency, rate and, with `isl_osl`, workload lengths are replaced).
        concurrencies, rates: the load points (see `load_points`).
        isl_osl: (input, output) token lengths per pair (None: the workload's own).
        out_dir: directory for the files (created).
        run: `parity.bench.runner.run_bench`-like callable (tests); None = run_bench.
        tokenizer, meter, transport: passed to every run (built once here when None).
        prompts_per_concurrency: requests per point when ``cfg.num_prompts`` is None: this many x the
            concurrency (at least 20), or 200 for a rate-only point.
    Returns:
        The sweep index: {"schema", "version", "points": [...], "stopped": {pair: reason}, "frontiers": {pair: [...]}}.
    Raises:
        BenchError: bad lists or workload, ``cfg.num_prompts`` below 1, an unwritable `out_dir`.
    """
    from parity.bench.runner import run_bench
    from parity.bench.tokenizer import load_bench_tokenizer
    from parity.devices.energy import open_meters

    run = run or run_bench
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise BenchError(f"bench sweep: --num-prompts must be >= 1, got {cfg.num_prompts}")
    points = load_points(concurrencies, rates)
    pairs = isl_osl or [(None, None)]
    workloads = {p: (workload_for(cfg.workload, *p) if p[0] else cfg.workload) for p in pairs}
    slo = parse_slo(cfg.slo)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"bench sweep: cannot create --out-dir {out}: {e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise BenchError(f"bench sweep: --out-dir {out} is not writable")
    tokenizer = tokenizer or load_bench_tokenizer(cfg.tokenizer)
    if meter is None and cfg.energy and transport is None:
        meter = open_meters(cfg.energy, devices=cfg.energy_devices)
    meters = as_meters(meter)
    idle = measure_idle(meters, cfg.idle_baseline_s) if cfg.idle_baseline_s > 0 else [None] * len(meters)
    index: dict = {
        "schema": SWEEP_SCHEMA,
        "version": SWEEP_VERSION,
        "slo_ms": slo,
        "stop_factor": STOP_FACTOR,
        "points": [],
        "stopped": {},
        "frontiers": {},
    }
    for pair in pairs:
        key = f"{pair[0]}/{pair[1]}" if pair[0] else "workload"
        for conc, rate in points:
            n = (
                cfg.num_prompts
                if cfg.num_prompts is not None
                else (max(prompts_per_concurrency * conc, 20) if conc else 200)
            )
            name = _name(pair[0], pair[1], conc, rate)
            pcfg = dataclasses.replace(
                cfg,
                max_concurrency=conc,
                request_rate=rate,
                workload=workloads[pair],
                num_prompts=n,
                output=str(out / name),
                idle_baseline_s=0.0,
            )
            res = run(pcfg, tokenizer=tokenizer, meter=meter, transport=transport, idle=idle)
            res.setdefault("sweep", {}).update(
                {
                    "isl": pair[0],
                    "osl": pair[1],
                    "concurrency": conc,
                    "request_rate": "inf" if math.isinf(rate) else rate,
                    "idle_baseline_s": cfg.idle_baseline_s,
                }
            )
            save_result(res, out / name)
            index["points"].append(
                {
                    "file": name,
                    "pair": key,
                    "isl": pair[0],
                    "osl": pair[1],
                    "concurrency": conc,
                    "request_rate": "inf" if math.isinf(rate) else rate,
                    **point_figures(res),
                    "ttft_ms_median": res["summary"]["ttft_ms"]["median"],
                    "tpot_ms_median": res["summary"]["tpot_ms"]["median"],
                }
            )
            why = past_slo(res, slo)
            if why:
                index["stopped"][key] = f"after {name}: {why}"
                break
        index["frontiers"][key] = [p["file"] for p in pareto_frontier([p for p in index["points"] if p["pair"] == key])]
    (out / "sweep.json").write_text(json.dumps(index, indent=1))
    return index
