"""Published training runs (`parity/data/published/training/*.toml`), the step model's error against them,
and the fit of the training constants (`gemm_eff`, `link_eff`) per hardware family.

Every entry is compared on tokens/s per chip. A run's published figure is converted with the run's own
numbers: chip-hours per trillion tokens -> 1e12 / (h * 3600); TFLOPs per chip -> TFLOPs / model FLOPs per
token; MFU -> MFU * BF16 peak / model FLOPs per token (both under `parity.plan.train_shape`'s convention,
recorded as `assumed` in the files). `fit` minimises sum log(pred/pub)^2 + PRIOR_WEIGHT * sum
log(c/PRIOR)^2 per family; `report` adds the leave-one-out error (each entry predicted with its family's
constants refitted without it).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from parity.errors import PlanError
from parity.plan.fitting import refine_log_coordinates
from parity.plan.hardware import get_hardware
from parity.plan.train_model import TRAIN_MODEL_VERSION, TrainLayout, step
from parity.plan.train_shape import TrainShape, from_table, load_shape

TRAINING_DIR = Path(__file__).resolve().parent.parent / "data" / "published" / "training"
CONSTANTS = ("gemm_eff", "link_eff")
#: Prior of the fit (not data): large BF16/FP8 GEMMs reach ~60% of dense peak in training (Megatron-LM's
#: published 41-48% MFU for GPT models at scale include bubbles and communication), collectives ~60% of link.
PRIOR = {"gemm_eff": 0.6, "link_eff": 0.6}
PRIOR_WEIGHT = 0.05
METRICS = ("chip_hours_per_trillion_tokens", "tflops_per_chip", "mfu")
_LAYOUT_KEYS = ("tp", "pp", "ep", "cp", "micro_batch", "schedule", "vpp", "recompute", "zero", "fp8")


@dataclass
class Run:
    """One published training measurement with its full setup; `value` = tokens/s per chip."""

    id: str
    source_id: str
    hardware: str
    family: str
    metric: str
    published: float
    value: float
    shape: TrainShape
    layout: TrainLayout
    seq_len: int
    global_batch_tokens: float
    assumed: list = field(default_factory=list)
    note: str = ""


def _run(d: dict, shape: TrainShape, source_id: str, path: Path) -> Run:
    where = f"training file {path.name}, entry {d.get('id', '?')!r}"
    for k in ("id", "hardware", "metric"):
        if not isinstance(d.get(k), str):
            raise PlanError(f"{where}: field {k!r} must be a string")
    for k in ("published", "n_devices", "seq_len", "global_batch_tokens"):
        v = d.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise PlanError(f"{where}: field {k!r} must be a positive number, got {v!r}")
    if d["metric"] not in METRICS:
        raise PlanError(f"{where}: metric {d['metric']!r}: expected one of {METRICS}")
    hw = get_hardware(d["hardware"])
    lay = TrainLayout(n_devices=int(d["n_devices"]), **{k: d[k] for k in _LAYOUT_KEYS if k in d})
    try:
        lay.validate(shape)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    fl = shape.model_flops_per_token(d["seq_len"])["total"]
    pub = float(d["published"])
    value = {
        "chip_hours_per_trillion_tokens": lambda: 1e12 / (pub * 3600.0),
        "tflops_per_chip": lambda: pub * 1e12 / fl,
        "mfu": lambda: pub * hw.peak("bf16") / fl,
    }[d["metric"]]()
    return Run(
        id=d["id"],
        source_id=source_id,
        hardware=hw.id,
        family=hw.family,
        metric=d["metric"],
        published=pub,
        value=value,
        shape=shape,
        layout=lay,
        seq_len=int(d["seq_len"]),
        global_batch_tokens=float(d["global_batch_tokens"]),
        assumed=list(d.get("assumed", [])),
        note=d.get("note", ""),
    )


@lru_cache(maxsize=4)
def _load(directory: str) -> tuple:
    runs, sources = [], {}
    for p in sorted(Path(directory).glob("*.toml")):
        try:
            d = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PlanError(f"training file {p.name} is not valid TOML: {e}") from None
        src = d.get("source")
        if not isinstance(src, dict) or not all(str(src.get(k, "")).strip() for k in ("id", "url", "title", "where")):
            raise PlanError(f"training file {p.name}: needs a [source] table with id, title, url and where")
        sources[src["id"]] = src
        items = d.get("entry")
        if not isinstance(items, list) or not items:
            raise PlanError(f"training file {p.name}: needs at least one [[entry]]")
        inline = from_table(d["model"], f"training file {p.name}") if "model" in d else None
        for e in items:
            shape = inline if inline is not None else load_shape(str(e.get("model", "")))
            runs.append(_run(e, shape, src["id"], p))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        raise PlanError(f"training entries with duplicate ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return tuple(runs), sources


def runs(directory: str | Path | None = None) -> tuple[list[Run], dict]:
    """(runs, sources by id). Raises PlanError on a malformed file."""
    r, s = _load(str(directory or TRAINING_DIR))
    return list(r), s


def predict(run: Run, consts: dict) -> dict:
    """The step model on the run's published setup (tokens/s per chip in `tokens_per_s_per_chip`)."""
    return step(run.shape, get_hardware(run.hardware), run.layout, run.seq_len, run.global_batch_tokens, consts)


def fit(rs: list[Run]) -> dict:
    """Constants minimising the squared log error over `rs` plus the prior pull (grid, then coordinate
    refinement in log space). Returns {name: value in (0, 1]}."""

    def loss(c):
        s = sum(math.log(predict(r, c)["tokens_per_s_per_chip"] / r.value) ** 2 for r in rs)
        return s + PRIOR_WEIGHT * sum(math.log(c[k] / PRIOR[k]) ** 2 for k in CONSTANTS)

    grid = (0.15, 0.25, 0.35, 0.45, 0.6, 0.8, 1.0)
    best, c = min((loss({"gemm_eff": g, "link_eff": lk}), {"gemm_eff": g, "link_eff": lk}) for g in grid for lk in grid)
    return refine_log_coordinates(loss, c, best, CONSTANTS, min_step=0.003)


@lru_cache(maxsize=4)
def _report(directory: str) -> dict:
    rs, sources = runs(directory)
    fams: dict[str, list] = {}
    for r in rs:
        fams.setdefault(r.family, []).append(r)
    consts = {f: fit(x) for f, x in fams.items()}
    rows = []
    for r in rs:
        pred = predict(r, consts[r.family])
        rest = [x for x in fams[r.family] if x.id != r.id]
        loo = predict(r, fit(rest) if rest else dict(PRIOR))["tokens_per_s_per_chip"]
        rows.append(
            {
                "id": r.id,
                "source": r.source_id,
                "hardware": r.hardware,
                "family": r.family,
                "model": r.shape.name,
                "n_devices": r.layout.n_devices,
                "metric": r.metric,
                "published_as": r.published,
                "published": r.value,
                "predicted": pred["tokens_per_s_per_chip"],
                "error": pred["tokens_per_s_per_chip"] / r.value - 1,
                "loo_predicted": loo,
                "loo_error": loo / r.value - 1,
                "mfu": pred["mfu"],
                "limiting": pred["limiting"],
                "assumed": r.assumed,
            }
        )
    per_family = {}
    for f in fams:
        fr = [row for row in rows if row["family"] == f]
        per_family[f] = {
            "entries": len(fr),
            "mape": sum(abs(a["error"]) for a in fr) / len(fr),
            "loo_mape": sum(abs(a["loo_error"]) for a in fr) / len(fr),
            **consts[f],
        }
    return {
        "model_version": TRAIN_MODEL_VERSION,
        "rows": rows,
        "constants": consts,
        "families": per_family,
        "mape": sum(abs(a["error"]) for a in rows) / len(rows),
        "max_abs_error": max(abs(a["error"]) for a in rows),
        "loo_mape": sum(abs(a["loo_error"]) for a in rows) / len(rows),
        "loo_max_abs_error": max(abs(a["loo_error"]) for a in rows),
        "sources": {k: {"title": v["title"], "url": v["url"], "where": v["where"]} for k, v in sources.items()},
    }


def report(directory: str | Path | None = None) -> dict:
    """Predicted vs published tokens/s per chip for every run, MAPE, leave-one-out errors, fitted constants
    per family (cached; the dict is shared, do not mutate)."""
    return _report(str(directory or TRAINING_DIR))


def constants_for(hw_family: str, vendor: str) -> tuple[dict, str, dict]:
    """(constants, family they were fitted on, that family's report summary) for a chip: its own family's
    when published runs exist, else those of the same vendor's fitted family.

    Raises:
        PlanError: no published training run on any family of that vendor.
    """
    rep = report()
    if hw_family in rep["constants"]:
        return rep["constants"][hw_family], hw_family, rep["families"][hw_family]
    from parity.plan.hardware import catalog

    for f in rep["constants"]:
        if any(h.family == f and h.vendor == vendor for h in catalog().values()):
            return rep["constants"][f], f, rep["families"][f]
    raise PlanError(
        f"no published training run on a {vendor} chip: the training model has no constants for family {hw_family!r}"
    )
