"""Published measurements (`parity/data/published/*.toml`) and the model's error against them.

`predict(entry, constants)` runs the serving model (`parity.plan.serving_model`) on the published setup with the
hardware family's constants; `report()` gives each entry's error, the MAPE over the entries marked for
validation, and the leave-one-out error (each entry predicted with its family's constants refitted
without it). `fit()` is how `families.toml` was produced: per family, minimise the squared log error of
that family's entries plus a weak pull towards physically typical values (`PRIOR`, weight
`PRIOR_WEIGHT`), so that families with fewer entries than constants stay well defined.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from parity.errors import PlanError
from parity.plan.arch import load_arch
from parity.plan.hardware import CONSTANT_NAMES, families, get_hardware
from parity.plan.serving_model import MODEL_VERSION, Deployment, step_terms

PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "data" / "published"

#: Typical achieved fractions of peak used as the prior of the fit (not data): large FP8 GEMMs reach
#: ~60-70% of peak (DeepGEMM reports up to 1,550 TFLOPS of H800's 1,979), FlashMLA ~50-60% in compute-
#: bound decode, HBM ~80-90% (FlashMLA 3,000 GB/s of 3,350), all-to-all ~60-70% of link (DeepEP README).
PRIOR = {"gemm_eff": 0.6, "attn_eff": 0.5, "hbm_eff": 0.8, "link_eff": 0.6}
PRIOR_WEIGHT = 0.05

_ENTRY_REQUIRED = {"id": str, "model": str, "hardware": str, "phase": str, "published": (int, float),
                   "per": str, "n_devices": int, "dense_format": str, "expert_format": str, "kv_dtype": str}


@dataclass
class Entry:
    """One published measurement with its full setup (per-device value in `value`)."""

    id: str
    source_id: str
    model: str
    hardware: str
    phase: str
    value: float                 # per device: input tok/s (prefill) or output tok/s (decode)
    published: float
    per: str
    deployment: Deployment
    prompt: float = 0.0
    tokens_per_device: float = 0.0
    context: float = 0.0
    batch_per_device: float = 0.0
    validate: bool = True
    assumed: list = field(default_factory=list)
    note: str = ""
    file: str = ""


def _entry(d: dict, source_id: str, path: Path) -> Entry:
    where = f"published file {path.name}, entry {d.get('id', '?')!r}"
    for k, typ in _ENTRY_REQUIRED.items():
        if not isinstance(d.get(k), typ) or isinstance(d.get(k), bool):
            raise PlanError(f"{where}: field {k!r} must be {getattr(typ, '__name__', 'a number')}, got {d.get(k)!r}")
    if d["phase"] not in ("prefill", "decode"):
        raise PlanError(f"{where}: field 'phase' is {d['phase']!r}: expected 'prefill' or 'decode'")
    if d["per"] not in ("node", "device"):
        raise PlanError(f"{where}: field 'per' is {d['per']!r}: expected 'node' or 'device'")
    if d["published"] <= 0:
        raise PlanError(f"{where}: field 'published' must be positive")
    need = ("prompt", "tokens_per_device") if d["phase"] == "prefill" else ("context", "batch_per_device")
    for k in need:
        if not isinstance(d.get(k), (int, float)) or d[k] <= 0:
            raise PlanError(f"{where}: field {k!r} must be a positive number for phase {d['phase']!r}")
    dep = Deployment(n_devices=d["n_devices"], attn_tp=d.get("attn_tp", 1), dense_format=d["dense_format"],
                     expert_format=d["expert_format"], kv_dtype=d["kv_dtype"], mtp=d.get("mtp", 0),
                     mtp_acceptance=d.get("mtp_acceptance", 0.0), overlap=d.get("overlap", True),
                     redundant_experts=d.get("redundant_experts", 0))
    try:
        dep.validate()
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    per_unit = d.get("devices_per_unit", 8 if d["per"] == "node" else 1)
    return Entry(id=d["id"], source_id=source_id, model=d["model"], hardware=d["hardware"], phase=d["phase"],
                 value=d["published"] / per_unit, published=d["published"], per=d["per"], deployment=dep,
                 prompt=d.get("prompt", 0), tokens_per_device=d.get("tokens_per_device", 0),
                 context=d.get("context", 0), batch_per_device=d.get("batch_per_device", 0),
                 validate=d.get("validate", True), assumed=list(d.get("assumed", [])), note=d.get("note", ""),
                 file=path.name)


@lru_cache(maxsize=4)
def _load(directory: str) -> tuple:
    entries, sources = [], {}
    for p in sorted(Path(directory).glob("*.toml")):
        try:
            d = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise PlanError(f"published file {p.name} is not valid TOML: {e}") from None
        src = d.get("source")
        if not isinstance(src, dict) or not all(str(src.get(k, "")).strip() for k in ("id", "url", "title")):
            raise PlanError(f"published file {p.name}: needs a [source] table with id, title and url")
        sources[src["id"]] = src
        items = d.get("entry")
        if not isinstance(items, list) or not items:
            raise PlanError(f"published file {p.name}: needs at least one [[entry]]")
        entries += [_entry(e, src["id"], p) for e in items]
    ids = [e.id for e in entries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise PlanError(f"published entries with duplicate id: {sorted(dup)}")
    return tuple(entries), sources


def published(directory: str | Path | None = None) -> tuple[list[Entry], dict]:
    """(entries, sources by id). Raises PlanError on a malformed file."""
    e, s = _load(str(directory or PUBLISHED_DIR))
    return list(e), s


_TERMS: dict = {}


def _terms(entry: Entry):
    """Ideal-time terms of the entry's step (independent of the constants; cached)."""
    key = (entry.id, entry.file)
    if key not in _TERMS:
        arch, hw = load_arch(entry.model), get_hardware(entry.hardware)
        if entry.phase == "prefill":
            seqs = entry.tokens_per_device / entry.prompt
            t = step_terms(arch, hw, entry.deployment, "prefill", entry.tokens_per_device, entry.prompt, seqs)
            work = entry.tokens_per_device
        else:
            b = entry.batch_per_device
            t = step_terms(arch, hw, entry.deployment, "decode", b * (1 + entry.deployment.mtp), entry.context, b)
            work = b * entry.deployment.tokens_per_step
        _TERMS[key] = (t.compact(), work)
    return _TERMS[key]


def predict(entry: Entry, consts: dict) -> float:
    """Modeled per-device value of `entry` (input tok/s for prefill, output tok/s for decode); the same
    numbers as `parity.plan.serving_model.prefill_point` / `decode_point` give for that setup."""
    t, work = _terms(entry)
    return work / t.combine(consts)["step_s"]


def _family(entry: Entry) -> str:
    return get_hardware(entry.hardware).family


def fit(entries: list[Entry]) -> dict:
    """Constants minimising sum(log(pred/pub)^2) + PRIOR_WEIGHT * sum(log(c/prior)^2) over `entries`
    (one family): a coarse grid over [0.1, 1] per constant, then coordinate refinement in log space.
    Returns {name: value in (0, 1]}."""
    import itertools

    def loss(cc):
        s = sum(math.log(predict(e, cc) / e.value) ** 2 for e in entries)
        return s + PRIOR_WEIGHT * sum(math.log(cc[k] / PRIOR[k]) ** 2 for k in CONSTANT_NAMES)

    grid = (0.12, 0.2, 0.3, 0.45, 0.65, 0.9)
    best, c = float("inf"), dict(PRIOR)
    for vals in itertools.product(grid, repeat=len(CONSTANT_NAMES)):
        cc = dict(zip(CONSTANT_NAMES, vals))
        v = loss(cc)
        if v < best:
            best, c = v, cc
    step = 0.2
    while step > 0.004:
        improved = False
        for k in CONSTANT_NAMES:
            for sgn in (1, -1):
                trial = dict(c)
                trial[k] = min(1.0, max(0.02, c[k] * math.exp(sgn * step)))
                v = loss(trial)
                if v < best - 1e-12:
                    c, best, improved = trial, v, True
        if not improved:
            step /= 2
    return c


def fit_all(entries: list[Entry]) -> dict[str, dict]:
    """`fit` per hardware family over the entries marked for validation."""
    by_fam: dict[str, list] = {}
    for e in entries:
        if e.validate:
            by_fam.setdefault(_family(e), []).append(e)
    return {f: fit(es) for f, es in by_fam.items()}


def report(directory: str | Path | None = None, loo: bool = True) -> dict:
    """Predicted vs published for every entry with the fixed family constants; MAPE and max |error| over
    validation entries; leave-one-out errors when `loo`."""
    entries, sources = published(directory)
    fams = families()
    rows = []
    for e in entries:
        fam = _family(e)
        if fam not in fams:
            raise PlanError(f"published entry {e.id!r}: hardware family {fam!r} has no calibration constants")
        pred = predict(e, fams[fam].as_dict())
        row = {"id": e.id, "source": e.source_id, "model": e.model, "hardware": e.hardware, "family": fam,
               "phase": e.phase, "metric": "input tok/s per device" if e.phase == "prefill" else
               "output tok/s per device", "published": e.value, "predicted": pred,
               "error": pred / e.value - 1, "validate": e.validate, "assumed": e.assumed, "note": e.note}
        rows.append(row)
    if loo:
        val = [e for e in entries if e.validate]
        for e in val:
            fam = _family(e)
            rest = [x for x in val if x.id != e.id and _family(x) == fam]
            consts = fit(rest) if rest else dict(PRIOR)
            r = next(r for r in rows if r["id"] == e.id)
            r["loo_predicted"] = predict(e, consts)
            r["loo_error"] = r["loo_predicted"] / e.value - 1
    vrows = [r for r in rows if r["validate"]]
    out = {"model_version": MODEL_VERSION, "rows": rows,
           "mape": sum(abs(r["error"]) for r in vrows) / len(vrows),
           "max_abs_error": max(abs(r["error"]) for r in vrows),
           "constants": {f: {**fam.as_dict(), "source": fam.source} for f, fam in fams.items()},
           "sources": {k: {"title": v["title"], "url": v["url"]} for k, v in sources.items()}}
    if loo:
        out["loo_mape"] = sum(abs(r["loo_error"]) for r in vrows) / len(vrows)
        out["loo_max_abs_error"] = max(abs(r["loo_error"]) for r in vrows)
    return out
