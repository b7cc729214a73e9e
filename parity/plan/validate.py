"""Published measurements (`parity/data/published/*.toml`) and the model's error against them.

Every entry is a `parity estimate` setup (`Setup`) plus the metric it published. `predict(entry, constants)`
runs `parity.plan.estimate` on it with the hardware family's constants; `report()` gives each entry's
error, the MAPE over the entries marked for validation, the leave-one-out error (each entry predicted with
its family's constants refitted without it) and that error per setup class (hardware family x phase x
model generation), which labels every modeled figure (`error_label`). `fit()` is how `families.toml` was
produced: per family, minimise the squared log error of that family's entries plus a weak pull towards
physically typical values (`PRIOR`, weight `PRIOR_WEIGHT`), so that families with fewer entries than constants
stay well defined.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from parity.errors import PlanError
from parity.plan.arch import V4Arch, load_arch
from parity.plan.estimate import METRICS, QUANTIZATION, Setup, build, figures
from parity.plan.fitting import refine_log_coordinates
from parity.plan.hardware import CONSTANT_NAMES, families, get_hardware
from parity.plan.serving_model import MODEL_VERSION

PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "data" / "published"

#: Typical achieved fractions of peak used as the prior of the fit (not data): large FP8 GEMMs reach
#: ~60-70% of peak (DeepGEMM reports up to 1,550 TFLOPS of H800's 1,979), FlashMLA ~50-60% in compute-
#: bound decode, HBM ~80-90% (FlashMLA 3,000 GB/s of 3,350), all-to-all ~60-70% of link (DeepEP README).
PRIOR = {"gemm_eff": 0.6, "attn_eff": 0.5, "hbm_eff": 0.8, "link_eff": 0.6}
PRIOR_WEIGHT = 0.05

_ENTRY_REQUIRED = {
    "id": str,
    "model": str,
    "hardware": str,
    "phase": str,
    "published": (int, float),
    "per": str,
    "n_devices": int,
    "dense_format": str,
    "expert_format": str,
    "kv_dtype": str,
}
_SETUP_REQUIRED = {"id": str, "phase": str, "published": (int, float), "per": str, "metric": str, "setup": dict}
PHASES = ("prefill", "decode", "serving")
#: Divisor of a published figure to get it per device, by `per` ('node' = 8 devices unless
#: `devices_per_unit` says otherwise; 'instance' = the setup's devices; 'device' = 1).
PER = ("node", "device", "instance")


@dataclass
class Entry:
    """One published measurement: the estimate setup it was measured on, the metric and its value
    (per device for throughputs, ms for latencies, in `value`)."""

    id: str
    source_id: str
    phase: str
    metric: str
    value: float
    published: float
    per: str
    setup: Setup
    validate: bool = True
    assumed: list = field(default_factory=list)
    note: str = ""
    file: str = ""

    @property
    def model(self) -> str:
        return self.setup.model

    @property
    def hardware(self) -> str:
        return self.setup.hardware


def _formats_quantization(dense: str, experts: str, where: str) -> str:
    for q, pair in QUANTIZATION.items():
        if pair == (dense, experts):
            return q
    raise PlanError(f"{where}: weight formats {dense}/{experts} match no --quantization ({', '.join(QUANTIZATION)})")


def _legacy_setup(d: dict, where: str) -> tuple[Setup, str]:
    """A prefill/decode entry in the per-field form as (Setup, metric)."""
    n, tp = d["n_devices"], d.get("attn_tp", 1)
    if tp < 1 or n % tp:
        raise PlanError(f"{where}: deployment attn_tp ({tp}) must divide n_devices ({n})")
    common = dict(
        model=d["model"],
        hardware=d["hardware"],
        phase=d["phase"],
        tp=tp,
        dp=n // tp,
        quantization=_formats_quantization(d["dense_format"], d["expert_format"], where),
        kv_cache_dtype=d["kv_dtype"],
        mtp=d.get("mtp", 0),
        tbo=d.get("overlap", True),
        redundant_experts=d.get("redundant_experts", 0),
        stack=d.get("stack", ""),
    )
    if d["phase"] == "prefill":
        # the source measured steps of `tokens_per_device` tokens: the token budget holds them
        budget = math.ceil(d["tokens_per_device"] * tp - 1e-9)
        return Setup(
            **common, isl=int(d["prompt"]), tokens_per_device=d["tokens_per_device"], max_num_batched_tokens=budget
        ), "input_tok_s_per_device"
    ctx = d["context"]
    return Setup(
        **common,
        isl=int(ctx),
        osl=1,
        decode_context=ctx,
        batch_per_device=d["batch_per_device"],
        mtp_acceptance=d.get("mtp_acceptance", 0.0),
    ), "output_tok_s_per_device"


def _entry(d: dict, source_id: str, path: Path) -> Entry:
    where = f"published file {path.name}, entry {d.get('id', '?')!r}"
    required = _SETUP_REQUIRED if "setup" in d else _ENTRY_REQUIRED
    for k, typ in required.items():
        if not isinstance(d.get(k), typ) or isinstance(d.get(k), bool):
            raise PlanError(f"{where}: field {k!r} must be {getattr(typ, '__name__', 'a number')}, got {d.get(k)!r}")
    if d["phase"] not in PHASES:
        raise PlanError(f"{where}: field 'phase' is {d['phase']!r}: expected one of {', '.join(PHASES)}")
    if d["per"] not in PER:
        raise PlanError(f"{where}: field 'per' is {d['per']!r}: expected one of {', '.join(PER)}")
    if d["published"] <= 0:
        raise PlanError(f"{where}: field 'published' must be positive")
    if "setup" in d:
        try:
            setup = Setup(**d["setup"])
        except TypeError as e:
            raise PlanError(f"{where}: setup: {e}") from None
        metric = d["metric"]
        if metric not in METRICS:
            raise PlanError(f"{where}: metric {metric!r}: expected one of {', '.join(METRICS)}")
    else:
        need = ("prompt", "tokens_per_device") if d["phase"] == "prefill" else ("context", "batch_per_device")
        for k in need:
            if not isinstance(d.get(k), (int, float)) or d[k] <= 0:
                raise PlanError(f"{where}: field {k!r} must be a positive number for phase {d['phase']!r}")
        setup, metric = _legacy_setup(d, where)
    try:
        setup.validate()
        setup.deployment()
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    if metric.endswith("_ms") or d["per"] == "device":
        per_unit = 1
    elif d["per"] == "instance":
        per_unit = setup.n_devices
    else:
        per_unit = d.get("devices_per_unit", 8)
    return Entry(
        id=d["id"],
        source_id=source_id,
        phase=d["phase"],
        metric=metric,
        value=d["published"] / per_unit,
        published=d["published"],
        per=d["per"],
        setup=setup,
        validate=d.get("validate", True),
        assumed=list(d.get("assumed", [])),
        note=d.get("note", ""),
        file=path.name,
    )


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


_EVAL: dict = {}


def _evaluator(entry: Entry):
    """The entry's step terms (independent of the constants; cached)."""
    key = (entry.id, entry.file)
    if key not in _EVAL:
        _EVAL[key] = build(entry.setup)
    return _EVAL[key]


def predict(entry: Entry, consts: dict) -> float:
    """Modeled value of `entry`'s metric (the figure `parity estimate` prints for its setup)."""
    return figures(_evaluator(entry), consts)[entry.metric]


def _family(entry: Entry) -> str:
    return get_hardware(entry.hardware).family


def generation(model: str) -> str:
    """Model generation of a setup class: 'v4' (DeepSeek-V4 presets / checkpoints) or 'v3' (V3/R1, MLA)."""
    return "v4" if isinstance(load_arch(model), V4Arch) else "v3"


def setup_class(family: str, phase: str, gen: str) -> str:
    """Setup class id: hardware family x phase x model generation, e.g. 'ascend/decode/v4'."""
    return f"{family}/{phase}/{gen}"


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
        cc = dict(zip(CONSTANT_NAMES, vals, strict=True))
        v = loss(cc)
        if v < best:
            best, c = v, cc
    return refine_log_coordinates(loss, c, best, CONSTANT_NAMES, min_step=0.004)


def fit_all(entries: list[Entry]) -> dict[str, dict]:
    """`fit` per hardware family over the entries marked for validation."""
    by_fam: dict[str, list] = {}
    for e in entries:
        if e.validate:
            by_fam.setdefault(_family(e), []).append(e)
    return {f: fit(es) for f, es in by_fam.items()}


def report(directory: str | Path | None = None, loo: bool = True) -> dict:
    """Predicted vs published for every entry with the fixed family constants; MAPE and max |error| over
    validation entries; with `loo`, leave-one-out errors per entry and per setup class (`classes`:
    {class id: {"n", "loo_mape", "loo_max"}})."""
    entries, sources = published(directory)
    fams = families()
    rows = []
    for e in entries:
        fam = _family(e)
        if fam not in fams:
            raise PlanError(f"published entry {e.id!r}: hardware family {fam!r} has no calibration constants")
        pred = predict(e, fams[fam].as_dict())
        rows.append(
            {
                "id": e.id,
                "source": e.source_id,
                "model": e.model,
                "hardware": e.hardware,
                "family": fam,
                "phase": e.phase,
                "class": setup_class(fam, e.phase, generation(e.model)),
                "metric": e.metric,
                "published": e.value,
                "predicted": pred,
                "error": pred / e.value - 1,
                "validate": e.validate,
                "assumed": e.assumed,
                "note": e.note,
                "flags": e.setup.flags(),
            }
        )
    vrows = [r for r in rows if r["validate"]]
    out = {
        "model_version": MODEL_VERSION,
        "rows": rows,
        "mape": sum(abs(r["error"]) for r in vrows) / len(vrows),
        "max_abs_error": max(abs(r["error"]) for r in vrows),
        "constants": {f: {**fam.as_dict(), "source": fam.source} for f, fam in fams.items()},
        "sources": {k: {"title": v["title"], "url": v["url"]} for k, v in sources.items()},
    }
    if loo:
        val = [e for e in entries if e.validate]
        for e in val:
            fam = _family(e)
            rest = [x for x in val if x.id != e.id and _family(x) == fam]
            consts = fit(rest) if rest else dict(PRIOR)
            r = next(r for r in rows if r["id"] == e.id)
            r["loo_predicted"] = predict(e, consts)
            r["loo_error"] = r["loo_predicted"] / e.value - 1
        out["loo_mape"] = sum(abs(r["loo_error"]) for r in vrows) / len(vrows)
        out["loo_max_abs_error"] = max(abs(r["loo_error"]) for r in vrows)
        classes: dict = {}
        for r in vrows:
            classes.setdefault(r["class"], []).append(abs(r["loo_error"]))
        out["classes"] = {
            c: {"n": len(v), "loo_mape": sum(v) / len(v), "loo_max": max(v)} for c, v in sorted(classes.items())
        }
    return out


_CLASSES: list = []


def class_errors() -> dict:
    """Leave-one-out error per setup class of the shipped published set (computed once per process)."""
    if not _CLASSES:
        _CLASSES.append(report(loo=True)["classes"])
    return _CLASSES[0]


def error_label(family: str, phase: str, gen: str) -> str:
    """Provenance of a modeled figure of this setup class: the class's leave-one-out MAPE, or
    'unvalidated' when no validated published entry covers the class."""
    c = class_errors().get(setup_class(family, phase, gen))
    gname = "V4" if gen == "v4" else "V3/R1"
    if not c:
        return f"modeled:{MODEL_VERSION} (unvalidated: no validated {gname} {phase} entry on {family})"
    plural = "entry" if c["n"] == 1 else "entries"
    return (
        f"modeled:{MODEL_VERSION} (+-{c['loo_mape'] * 100:.0f}%, LOO over {c['n']} {gname} {phase} "
        f"{plural} on {family})"
    )
