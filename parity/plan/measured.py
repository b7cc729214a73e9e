"""Measured points from `parity bench` result files, as the planner sees them: each result's setup (model,
declared hardware and device count, ISL/OSL, concurrency) as an estimate `Setup`, and what was measured.

Result files are read as JSON data (schema ``parity.bench.result``); nothing of `parity.bench` is imported.
Measured figures: output tok/s per device and median TPOT / TTFT of the steady-state window when the result has
one, else of the whole run. The setup's concurrency is the window's time-averaged number of requests in flight
(else ``--max-concurrency``). The deployment (TP, quantization) is not in a bench result: it is given by the
caller (`parity validate --measured ... --tp 1 --quantization fp4`), default TP1 x DP(devices), FP4 experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import PlanError
from parity.plan.estimate import Setup, build, figures
from parity.plan.hardware import family_of, get_hardware
from parity.plan.served_model import plan_preset, served_model_mismatch

RESULT_SCHEMA = "parity.bench.result"
#: Metrics compared per point (names as `parity estimate` reports them).
MEASURED_METRICS = ("output_tok_s_per_device", "tpot_ms", "ttft_ms")


@dataclass
class MeasuredPoint:
    """One measured point: its `Setup` and measured figures ({metric: value}, units of `MEASURED_METRICS`)."""

    id: str
    file: str
    setup: Setup
    measured: dict = field(default_factory=dict)
    basis: str = ""


def result_files(paths: list[str | Path]) -> list[Path]:
    """The result files among `paths` (directories expand to their ``*.json``, ``sweep.json`` indexes skipped).

    Raises:
        PlanError: a path that does not exist, or no file at all.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.glob("*.json") if x.name != "sweep.json")
        elif p.is_file():
            out.append(p)
        else:
            raise PlanError(f"--measured/--calibrate: {p} does not exist")
    if not out:
        raise PlanError(f"--measured/--calibrate: no result file in {', '.join(map(str, paths))}")
    return out


def _median(s: dict, key: str):
    return (s.get(key) or {}).get("median")


def check_measured_tp(tp) -> None:
    """Raises PlanError unless ``tp`` (``--measured-tp``) is an integer >= 1."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise PlanError(f"--measured-tp must be a positive integer, got {tp!r}")


def measured_point(
    result: dict,
    path: str | Path,
    *,
    model: str | None = None,
    default_model: str | None = None,
    tp: int = 1,
    quantization: str = "fp4",
) -> MeasuredPoint:
    """The planner's view of one bench result.

    Args:
        model: planner preset of every result (overrides what the result records).
        default_model: planner preset of a result that records none (its served model name is no preset
            and it has no ``plan_model``, `parity bench --plan-model`).
        tp: attention TP of the measured deployment (``--measured-tp``).
    Raises:
        PlanError: `tp` below 1, not a bench result, no declared hardware, no planner model known, a served
            model that is not the planner model (`served_model_mismatch`), device count not a multiple of `tp`,
            or no completed request.
    """
    check_measured_tp(tp)
    where = f"result {Path(path).name}"
    if not isinstance(result, dict) or result.get("schema") != RESULT_SCHEMA:
        raise PlanError(f"{where} is not a parity bench result (schema != {RESULT_SCHEMA!r})")
    meta = result.get("metadata") or {}
    hw = (meta.get("hardware") or {}).get("id")
    if not hw:
        raise PlanError(f"{where} declares no hardware: rerun parity bench with --hardware ID --num-devices N")
    get_hardware(hw)
    preset = model or meta.get("plan_model") or plan_preset(meta.get("model")) or default_model
    if not preset:
        raise PlanError(
            f"{where}: model {meta.get('model')!r} names no planner preset; pass --model v4-flash|v4-pro "
            f"(or record it when measuring: parity bench --plan-model)"
        )
    mismatch = served_model_mismatch(meta.get("model"), preset)
    if mismatch and mismatch[0] == "error":
        raise PlanError(f"{where}: {mismatch[1]}: measurements of another model cannot validate or calibrate it")
    n = int(meta.get("num_devices") or 1)
    if n % tp:
        raise PlanError(f"{where}: {n} devices is not a multiple of --measured-tp {tp}")
    ok = [r for r in result.get("requests", []) if r.get("ok")]
    if not ok:
        raise PlanError(f"{where} has no completed request")
    isl = max(1, round(sum(r["prompt_tokens"] for r in ok) / len(ok)))
    osl = max(1, round(sum(r["output_tokens"] for r in ok) / len(ok)))
    ss = result.get("steady_state") or {}
    s = result["summary"]
    if ss.get("duration_s") and ss.get("tpot_ms_median"):
        basis = "steady state"
        meas = {
            "output_tok_s_per_device": ss["output_tok_s_per_device"],
            "tpot_ms": ss["tpot_ms_median"],
            "ttft_ms": ss["ttft_ms_median"],
        }
        conc = ss.get("mean_concurrency") or result["config"].get("max_concurrency")
    else:
        basis = "whole run"
        meas = {
            "output_tok_s_per_device": s["output_throughput_tok_s"] / n,
            "tpot_ms": _median(s, "tpot_ms"),
            "ttft_ms": _median(s, "ttft_ms"),
        }
        conc = result["config"].get("max_concurrency") or len(ok)
    setup = Setup(
        model=preset,
        hardware=hw,
        phase="serving",
        isl=isl,
        osl=osl,
        tp=tp,
        dp=n // tp,
        concurrency=float(conc),
        quantization=quantization,
    )
    return MeasuredPoint(
        id=Path(path).stem, file=str(path), setup=setup, measured={k: v for k, v in meas.items() if v}, basis=basis
    )


def load_measured(paths: list[str | Path], **kw) -> list[MeasuredPoint]:
    """`measured_point` of every result file under `paths` (see `result_files`; `kw` as `measured_point`).

    Raises:
        PlanError: unreadable JSON or a result the planner cannot place (the message names the file).
    """
    pts = []
    for f in result_files(paths):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"result {f.name} is not readable JSON ({e})") from None
        pts.append(measured_point(data, f, **kw))
    return pts


def predict_point(point: MeasuredPoint, consts: dict | None = None, _cache: dict | None = None) -> dict:
    """The planner's figures ({metric: value}) for `point`'s setup under `consts` (default: its family's)."""
    ev = _cache.get(point.id) if _cache is not None else None
    if ev is None:
        ev = build(point.setup)
        if _cache is not None:
            _cache[point.id] = ev
    c = consts or family_of(get_hardware(point.setup.hardware)).as_dict()
    f = figures(ev, c)
    return {m: f[m] for m in MEASURED_METRICS if m in f}


def compare(points: list[MeasuredPoint], consts: dict | None = None) -> list[dict]:
    """Prediction next to measurement per point and metric: rows {id, metric, measured, predicted, error}
    (error = predicted / measured - 1)."""
    rows = []
    for p in points:
        pred = predict_point(p, consts)
        for m, v in p.measured.items():
            rows.append(
                {
                    "id": p.id,
                    "hardware": p.setup.hardware,
                    "n_devices": p.setup.n_devices,
                    "isl": p.setup.isl,
                    "osl": p.setup.osl,
                    "concurrency": p.setup.concurrency,
                    "basis": p.basis,
                    "metric": m,
                    "measured": v,
                    "predicted": pred[m],
                    "error": pred[m] / v - 1,
                }
            )
    return rows
