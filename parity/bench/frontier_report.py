"""The sweep part of `parity bench report`: metadata header, measured frontier (output tok/s per device vs tok/s
per user) with the planner's modeled frontier for the same hardware overlaid, per-point and energy tables."""

from __future__ import annotations

import html

from parity.bench.frontier import pareto_frontier, point_figures
from parity.bench.metadata import header_lines
from parity.errors import ParityError


def group_key(result: dict) -> str:
    """ISL/OSL group of a result: the sweep's pair, else the workload spec."""
    sw = result.get("sweep") or {}
    if sw.get("isl"):
        return f"ISL {sw['isl']} / OSL {sw['osl']}"
    return str(result["config"].get("workload"))


def _isl_osl(result: dict) -> tuple[int, int]:
    ok = [r for r in result.get("requests", []) if r.get("ok")] or [{"prompt_tokens": 1, "output_tokens": 1}]
    return (
        max(1, round(sum(r["prompt_tokens"] for r in ok) / len(ok))),
        max(1, round(sum(r["output_tokens"] for r in ok) / len(ok))),
    )


def modeled_frontier(result: dict) -> tuple[list[dict], str]:
    """The planner's frontier (`parity.plan.search.frontier`) for a result's declared hardware, planner model
    and mean ISL/OSL: (points, label) or ([], why not)."""
    from parity.plan.served_model import plan_preset, served_model_mismatch

    meta = result.get("metadata") or {}
    hw = (meta.get("hardware") or {}).get("id")
    model = meta.get("plan_model") or plan_preset(meta.get("model"))
    if not hw:
        return [], "no modeled frontier: hardware not declared (--hardware)"
    if not model:
        return [], f"no modeled frontier: model {meta.get('model')!r} names no planner preset (--plan-model)"
    mismatch = served_model_mismatch(meta.get("model"), model)
    if mismatch and mismatch[0] == "error":
        return [], f"no modeled frontier: {mismatch[1]}"
    from parity.plan.search import Workload, frontier
    from parity.plan.serving_model import MODEL_VERSION

    isl, osl = _isl_osl(result)
    slo = (result.get("summary") or {}).get("slo_ms") or {}
    try:
        pts = frontier(
            model,
            hw,
            Workload(isl=isl, osl=osl, slo_ttft_ms=slo.get("ttft_ms", 2000.0), slo_tpot_ms=slo.get("tpot_ms", 50.0)),
        )
    except ParityError as e:
        return [], f"no modeled frontier: {e}"
    return pts, f"modeled:{MODEL_VERSION} {model} on {hw}, ISL {isl} / OSL {osl}"


def frontier_figure(results: list[tuple[str, dict]]):
    """Matplotlib figure: measured points and their Pareto frontier per group, modeled frontier dashed.
    Returns (figure, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    notes = []
    groups: dict[str, list] = {}
    for label, r in results:
        groups.setdefault(group_key(r), []).append((label, r))
    for g, items in groups.items():
        pts = [{**point_figures(r), "label": label} for label, r in items]
        pts = [p for p in pts if p["tok_s_per_user"] is not None]
        if pts:
            line = ax.plot(
                [p["tok_s_per_user"] for p in pts], [p["output_tok_s_per_device"] for p in pts], "o", alpha=0.5
            )[0]
            front = pareto_frontier(pts)
            ax.plot(
                [p["tok_s_per_user"] for p in front],
                [p["output_tok_s_per_device"] for p in front],
                "-",
                color=line.get_color(),
                label=f"measured {g}",
            )
        mpts, mlabel = modeled_frontier(items[0][1])
        if mpts:
            ax.plot([p["tok_s_per_user"] for p in mpts], [p["output_tok_s_per_chip"] for p in mpts], "--", label=mlabel)
        notes.append(f"{g}: {mlabel}")
    ax.set_xlabel("tok/s per user (1 / median TPOT)")
    ax.set_ylabel("output tok/s per device")
    ax.set_title("throughput-latency frontier (modeled vs measured)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, notes


def _f(v, nd=2) -> str:
    return "-" if v is None else f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def header_html(results: list[tuple[str, dict]]) -> str:
    """Metadata of every distinct setup (model, server, hardware, date, version, command line, workload)."""
    seen, out = set(), []
    for label, r in results:
        meta = r.get("metadata")
        if not meta:
            out.append(f"<p>{html.escape(label)}: no metadata (result written by an older parity bench)</p>")
            continue
        lines = header_lines(meta)
        key = tuple(v for k, v in lines if k not in ("date (UTC)", "command line", "workload"))
        if key in seen:
            continue
        seen.add(key)
        out.append(
            "<table class='meta'>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in lines)
            + "</table>"
        )
    return "\n".join(out)


def points_html(results: list[tuple[str, dict]]) -> str:
    """Per-point table: steady-state window, figures, whole-run figures."""
    cols = [
        "run",
        "group",
        "window (s)",
        "mean in flight",
        "out tok/s/device (window)",
        "tok/s/user (window)",
        "TTFT p50 (window)",
        "TPOT p50 (window)",
        "out tok/s (whole run)",
        "window note",
    ]
    rows = ["<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for label, r in results:
        ss = r.get("steady_state") or {}
        vals = [
            label,
            group_key(r),
            _f(ss.get("duration_s")),
            _f(ss.get("mean_concurrency")),
            _f(ss.get("output_tok_s_per_device")),
            _f(ss.get("tok_s_per_user")),
            _f(ss.get("ttft_ms_median")),
            _f(ss.get("tpot_ms_median")),
            _f(r["summary"]["output_throughput_tok_s"]),
            ss.get("note") or "",
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def energy_html(results: list[tuple[str, dict]]) -> str:
    """Energy per point and meter: steady-state J per output token (idle subtracted), tokens per J, W per device."""
    cols = ["run", "meter", "basis", "J/out tok (net)", "out tok/J (net)", "avg W/device", "idle W", "baseline"]
    rows = ["<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for label, r in results:
        for e in r.get("energy_meters") or [r.get("energy") or {}]:
            st = e.get("steady_state")
            if st and st.get("net_joules") is not None:
                vals = [
                    label,
                    e["meter"],
                    st["basis"],
                    _f(st["joules_per_output_token"], 4),
                    _f(st["output_tokens_per_joule"], 3),
                    _f(st["avg_watts_per_device"], 1),
                    _f(st["idle_watts"], 1),
                    st["baseline"],
                ]
            else:
                vals = [
                    label,
                    e.get("meter") or "none",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"not available: {e.get('reason') or (st or {}).get('reason') or 'not measured'}",
                ]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    return "<table>" + "\n".join(rows) + "</table>"
