"""The throughput-latency frontier of a sweep: output tok/s per device against tok/s per user (1 / TPOT).

Each sweep point contributes its steady-state figures (whole-run ones when it has no steady state); a point is on
the frontier when no other point of the same ISL/OSL pair has both more tok/s per device and more tok/s per user
(the Pareto frontier, as in InferenceX's throughput-vs-interactivity charts).
"""

from __future__ import annotations


def point_figures(result: dict) -> dict:
    """(tok/s per user, output tok/s per device, basis) of one result: the steady-state window's figures when
    it has a non-empty window, else the whole run's (median TPOT, output throughput / devices)."""
    n_dev = (result.get("metadata") or {}).get("num_devices") or 1
    ss = result.get("steady_state") or {}
    if ss.get("duration_s") and ss.get("tok_s_per_user") and ss.get("output_tok_s_per_device") is not None:
        return {
            "tok_s_per_user": ss["tok_s_per_user"],
            "output_tok_s_per_device": ss["output_tok_s_per_device"],
            "basis": "steady state",
        }
    s = result["summary"]
    tpot = s["tpot_ms"].get("median")
    return {
        "tok_s_per_user": (1e3 / tpot) if tpot else None,
        "output_tok_s_per_device": s["output_throughput_tok_s"] / n_dev,
        "basis": "whole run",
    }


def pareto_frontier(points: list[dict], x: str = "tok_s_per_user", y: str = "output_tok_s_per_device") -> list[dict]:
    """The points not dominated in (`x`, `y`), both to maximise, sorted by `x` descending (points lacking either
    value are left out)."""
    pts = sorted((p for p in points if p.get(x) is not None and p.get(y) is not None), key=lambda p: (-p[x], -p[y]))
    front, best = [], float("-inf")
    for p in pts:
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front
