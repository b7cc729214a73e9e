"""Fitting a planner's efficiency constants: coordinate descent in log space, shared by the serving and the
training validation."""

from __future__ import annotations

import math
from collections.abc import Callable


def refine_log_coordinates(
    loss: Callable[[dict], float],
    start: dict[str, float],
    best: float,
    names: tuple[str, ...] | list[str],
    step: float = 0.2,
    min_step: float = 0.004,
    bounds: tuple[float, float] = (0.02, 1.0),
) -> dict[str, float]:
    """Coordinate descent from `start` (its loss `best`): multiply one constant at a time by exp(+-step), keep
    strict improvements, halve `step` when none helps, stop below `min_step`. Constants stay within `bounds`.

    Returns:
        The refined constants {name: value}.
    """
    c = dict(start)
    lo, hi = bounds
    while step > min_step:
        improved = False
        for k in names:
            for sgn in (1, -1):
                trial = dict(c)
                trial[k] = min(hi, max(lo, c[k] * math.exp(sgn * step)))
                v = loss(trial)
                if v < best - 1e-12:
                    c, best, improved = trial, v, True
        if not improved:
            step /= 2
    return c
