"""Which planner preset a served model name denotes, and whether a bench result's served model can be the
planner model it is compared with (`parity bench --plan-model`, `parity validate --measured`, `--calibrate`).

A served name that is a bundled parity preset is that preset; a name holding "v4" and "pro" / "flash"
(e.g. 'deepseek-ai/DeepSeek-V4-Flash') is v4-pro / v4-flash. A preset under `MIN_PLAN_PARAMS` parameters
(the `tiny` test miniature) is never a planner model.
"""

from __future__ import annotations

from functools import cache

from parity.plan.arch import MIN_PLAN_PARAMS, V4Arch


def plan_preset(served_model: str | None) -> str | None:
    """The planner preset a served model name denotes (v4-pro / v4-flash, e.g. 'deepseek-ai/DeepSeek-V4-Flash'),
    or None when the name says neither."""
    n = (served_model or "").lower()
    if "v4" not in n:
        return None
    return "v4-pro" if "pro" in n else "v4-flash" if "flash" in n else None


@cache
def _miniature_presets() -> frozenset[str]:
    """Bundled presets under `MIN_PLAN_PARAMS` parameters (MTP excluded): test miniatures such as `tiny`."""
    from parity.config import load_preset, preset_names

    return frozenset(n for n in preset_names() if V4Arch(load_preset(n)).total_params < MIN_PLAN_PARAMS)


def served_model_mismatch(served_model: str | None, plan_model: str | None) -> tuple[str, str] | None:
    """Whether measurements of `served_model` (the name the server was asked for) can stand for the planner
    preset `plan_model`.

    Returns:
        None when they agree (or either is missing); ("error", why) when the served name is a parity test
        miniature, or names a planner preset other than `plan_model`; ("warning", why) when the served name
        names no planner preset, so the pairing cannot be checked.
    """
    if not served_model or not plan_model:
        return None
    name = str(served_model).strip()
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    if base in _miniature_presets():
        return "error", f"served model {name!r} is a parity test miniature, not the planner model {plan_model!r}"
    from parity.config import preset_names

    presets = preset_names()
    denoted = base if base in presets else plan_preset(name)
    target = plan_model if plan_model in presets else plan_preset(plan_model)
    if denoted is None or target is None:
        return "warning", f"served model {name!r} names no planner preset; taken to be {plan_model!r} (--plan-model)"
    if denoted != target:
        return "error", f"served model {name!r} is {denoted!r}, not the planner model {plan_model!r}"
    return None
