"""Refit a hardware family's calibration constants from the user's own measurements (`parity plan --calibrate`).

Opt-in: the shipped constants (`families.toml`, fitted on published entries) stay the default; calibrated ones
are labelled ``calibrated:<results>``. The fit minimises the squared log error of every measured figure
(output tok/s per device, median TPOT, median TTFT; `parity.plan.measured`) plus a weak pull towards the
family's shipped constants (`PRIOR_WEIGHT`) that keeps the fit well posed; a constant the measurements do not
constrain (`DETERMINED`) is then held at its shipped value and reported as not determined by the data.
"""

from __future__ import annotations

import math

import numpy as np

from parity.errors import PlanError
from parity.plan.hardware import CONSTANT_NAMES, family_of, get_hardware
from parity.plan.measured import MeasuredPoint, load_measured, predict_point

#: Weight of the pull towards the shipped constants, per constant, in squared-log units (a design choice: small
#: against one measured figure's weight of 1).
PRIOR_WEIGHT = 1e-4
#: Bounds of every constant (fraction of peak).
BOUNDS = (0.02, 1.0)
#: A constant counts as determined by the data when a 10% change of it moves the measured figures by at least
#: this much (root-sum-square of log changes).
DETERMINED = 0.01


def fit_constants(points: list[MeasuredPoint], start: dict, prior_weight: float = PRIOR_WEIGHT) -> dict:
    """Least-squares fit (scipy.optimize.least_squares, in log space, bounded by `BOUNDS`) of the constants to
    `points`, from `start` (also the prior). A constant not determined by the data (`DETERMINED`, judged at the
    fit of all four) is then held at its `start` value and the others are refitted without it.

    Returns:
        {"constants": {name: value}, "determined": {name: bool}, "rms_log_error": float, "residuals": n}.
    Raises:
        PlanError: the points hold no measured figure.
    """
    from scipy.optimize import least_squares

    cache: dict = {}
    names = list(CONSTANT_NAMES)
    x0 = np.log([start[k] for k in names])
    pairs = [(p, m, v) for p in points for m, v in p.measured.items() if v and v > 0]
    if not pairs:
        raise PlanError("--calibrate: the results hold no measured figure to fit")

    def data_resid(x):
        c = dict(zip(names, np.exp(x), strict=True))
        preds = {p.id: predict_point(p, c, cache) for p in points}
        return np.array([math.log(preds[p.id][m] / v) for p, m, v in pairs])

    lo, hi = math.log(BOUNDS[0]), math.log(BOUNDS[1])

    def fit(free):
        def resid(xf):
            x = x0.copy()
            x[free] = xf
            return np.concatenate([data_resid(x), math.sqrt(prior_weight) * (xf - x0[free])])

        sol = least_squares(
            resid, np.clip(x0[free], lo, hi - 1e-9), bounds=(lo, hi), x_scale=1.0, xtol=1e-10, ftol=1e-12
        )
        x = x0.copy()
        x[free] = sol.x
        return x

    x = fit(np.arange(len(names)))
    data = data_resid(x)
    determined = {}
    for i, k in enumerate(names):
        xi = x.copy()
        xi[i] += math.log(1.1)
        determined[k] = bool(np.sqrt(np.sum((data_resid(xi) - data) ** 2)) >= DETERMINED)
    free = np.array([i for i, k in enumerate(names) if determined[k]], dtype=int)
    if len(free) < len(names):
        x = fit(free) if len(free) else x0.copy()
        data = data_resid(x)
    c = dict(zip(names, (float(v) for v in np.exp(x)), strict=True))
    return {
        "constants": c,
        "determined": determined,
        "rms_log_error": float(np.sqrt(np.mean(data**2))),
        "residuals": len(pairs),
    }


def calibrate(paths: list[str], hardware: str, **kw) -> dict:
    """Constants of `hardware`'s family refitted on the results under `paths` measured on that family.

    Args:
        kw: as `parity.plan.measured.measured_point` (model, tp, quantization).
    Returns:
        {"family", "constants", "shipped", "determined", "rms_log_error", "points", "label"}; "label" is None
        when the measurements determine no constant (the constants are then the shipped ones and figures keep
        their ``modeled:`` label).
    Raises:
        PlanError: no result measured on the family, or results the planner cannot place.
    """
    fam = family_of(get_hardware(hardware))
    pts = [p for p in load_measured(paths, **kw) if get_hardware(p.setup.hardware).family == fam.id]
    if not pts:
        raise PlanError(
            f"--calibrate {' '.join(map(str, paths))}: no result measured on a {fam.id} chip "
            f"(results declare their chip with parity bench --hardware)"
        )
    fit = fit_constants(pts, fam.as_dict())
    if not any(fit["determined"].values()):
        return {"family": fam.id, "shipped": fam.as_dict(), **fit, "points": [p.id for p in pts], "label": None}
    label = f"calibrated:{','.join(map(str, paths))} ({len(pts)} points, family {fam.id})"
    return {"family": fam.id, "shipped": fam.as_dict(), **fit, "points": [p.id for p in pts], "label": label}
