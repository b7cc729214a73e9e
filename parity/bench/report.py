"""`parity bench report results*.json --out report.html|.png`: latency CDFs and throughput vs latency across runs.

Figures (matplotlib, Agg backend, no display needed):
- CDFs of TTFT, TPOT, ITL (per token) and E2EL, one line per run, each starting at fraction 0 (x axis from 0 ms);
  a run with no completed request has no line: it is named in a line under the table (and under the figure);
- throughput vs latency across runs: output tokens/s against median TPOT and against p99 TTFT, one point per run
  (runs sweeping request rate or concurrency draw the usual serving curve).
- the throughput-latency frontier (output tok/s per device vs tok/s per user) with the planner's modeled frontier
  for the declared hardware overlaid, the metadata header, per-point and energy tables (`parity.bench.frontier_report`).
HTML embeds the figures as PNG (base64) next to the tables; ``.png`` writes the latency figure, and the frontier
figure next to it as ``<name>.frontier.png``.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from parity.bench.frontier_report import energy_html, frontier_figure, header_html, points_html
from parity.bench.metrics import RequestRecord
from parity.bench.result import concurrency_text, load_result, result_files
from parity.bench.workloads import parse_workload
from parity.errors import BenchError


def run_label(result: dict, path: str | Path) -> str:
    """Short label of a run: file stem, arrivals (request rate, or the trace file a trace replay ran) and
    concurrency cap."""
    c = result["config"]
    workload = str(c.get("workload") or "")
    if workload.strip().lower().startswith("trace:"):
        # a trace replay sends at the trace's times: its --request-rate (default inf) was ignored
        try:
            trace = parse_workload(workload).path
        except BenchError:
            trace = None
        arrivals = f"trace {Path(trace).name}" if trace else "trace"
    else:
        arrivals = f"rate {c.get('request_rate')}"
    return f"{Path(path).stem} ({arrivals}, conc {concurrency_text(c)})"


def no_completed_note(label: str, result: dict) -> str | None:
    """One line for a run with no completed request (it has nothing to plot), else None.

    Names how many requests failed and the most common failure reason, e.g.
    "run r1 (rate inf, conc unbounded): all 30 requests failed (connection refused: 30)".
    """
    s = result["summary"]
    if s.get("completed"):
        return None
    n = len(result.get("requests") or [])
    reasons = s.get("failure_reasons") or {}
    why = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
    if n == 0:
        what = "no request was sent"
    elif s.get("failed", 0) == n:
        what = f"all {n} request{'s' if n != 1 else ''} failed"
    else:
        what = f"none of its {n} request{'s' if n != 1 else ''} completed"
    return f"run {label}: {what}" + (f" ({why})" if why else "") + " - nothing to plot"


def _latencies(result: dict) -> dict[str, list[float]]:
    recs = [RequestRecord.from_dict(r) for r in result["requests"]]
    ok = [r for r in recs if r.ok]
    return {
        "TTFT": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "TPOT": [t * 1e3 for r in ok if (t := r.tpot_s) is not None],
        "ITL": [x * 1e3 for r in ok for x in r.itl_s],
        "E2EL": [r.e2el_s * 1e3 for r in ok if r.e2el_s is not None],
    }


def make_figure(results: list[tuple[str, dict]]):
    """A matplotlib Figure with the four CDFs and the two throughput-vs-latency panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.95, wspace=0.28, hspace=0.32)
    cdf_axes = [axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]]
    for ax, metric in zip(cdf_axes, ("TTFT", "TPOT", "ITL", "E2EL"), strict=True):
        for label, res in results:
            v = np.sort(np.asarray(_latencies(res)[metric]))
            if v.size:
                # start each curve at fraction 0 at its smallest value, then step up at every sample
                ax.step(np.concatenate(([v[0]], v)), np.arange(0, v.size + 1) / v.size, where="post", label=label)
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of " + ("tokens" if metric == "ITL" else "requests"))
        ax.set_title(f"{metric} CDF")
        ax.grid(alpha=0.3)
    for ax, (key, stat, name) in zip(
        (axes[1, 1], axes[1, 2]), (("tpot_ms", "median", "median TPOT"), ("ttft_ms", "p99", "p99 TTFT")), strict=True
    ):
        pts = [
            (r["summary"][key][stat], r["summary"]["output_throughput_tok_s"], label)
            for label, r in results
            if r["summary"][key][stat] is not None
        ]
        pts.sort(key=lambda p: p[1])  # along increasing throughput: the usual serving curve
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
            for x, y, label in pts:
                ax.annotate(label.split(" ")[0], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("output throughput (tok/s)")
        ax.set_title(f"throughput vs {name}")
        ax.grid(alpha=0.3)
    if len(results) <= 8 and axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=7)
    empty = [n for label, r in results if (n := no_completed_note(label, r))]
    if empty:
        import textwrap

        fig.text(
            0.5,
            0.005,
            "\n".join(textwrap.shorten(n, 160) for n in empty[:4])
            + (f"\n... and {len(empty) - 4} more" if len(empty) > 4 else ""),
            ha="center",
            va="bottom",
            fontsize=8,
            color="darkred",
        )
        fig.subplots_adjust(bottom=0.07 + 0.02 * min(len(empty), 5))
    return fig


def _summary_rows(results: list[tuple[str, dict]]) -> str:
    cols = [
        "run",
        "completed",
        "failed",
        "req/s",
        "out tok/s",
        "goodput req/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "ITL p50",
        "E2EL p50",
        "J/out tok",
    ]
    out = ["<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for label, r in results:
        s = r["summary"]
        e = r.get("energy") or {}

        def f(v, nd=2):
            return "-" if v is None else f"{v:,.{nd}f}"

        jpt_all = [
            f"{m['joules_per_output_token']:.4f} ({m['meter']})"
            for m in (r.get("energy_meters") or [e])
            if m.get("joules_per_output_token") is not None
        ]
        vals = [
            label,
            s["completed"],
            s["failed"],
            f(s["request_throughput_req_s"]),
            f(s["output_throughput_tok_s"]),
            f(s.get("goodput_req_s")),
            f(s["ttft_ms"]["median"]),
            f(s["ttft_ms"]["p99"]),
            f(s["tpot_ms"]["median"]),
            f(s["itl_ms"]["median"]),
            f(s["e2el_ms"]["median"]),
            ("; ".join(jpt_all) or "-"),
        ]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    return "\n".join(out)


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """Render results to `out` (.html or .png). `paths`: result files, directories of them, sweep indexes
    (`parity.bench.result.result_files`).

    Raises:
        BenchError: no input, a missing path, unreadable result, unsupported output suffix.
    """
    if not paths:
        raise BenchError("bench report: give at least one results JSON file")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm", ".png"):
        raise BenchError(f"bench report: --out {out} must end in .html or .png")
    results = [(run_label(r, p), r) for p in result_files(paths) for r in [load_result(p)]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = make_figure(results)
    ffig, fnotes = frontier_figure(results)
    try:
        if out.suffix.lower() == ".png":
            fig.savefig(out, dpi=90)
            ffig.savefig(out.with_suffix(".frontier.png"), dpi=90)
            return out
        buf, fbuf = io.BytesIO(), io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        ffig.savefig(fbuf, format="png", dpi=90)
    finally:
        plt.close(fig)
        plt.close(ffig)
    img = base64.b64encode(buf.getvalue()).decode()
    fimg = base64.b64encode(fbuf.getvalue()).decode()
    notes = sorted({n for _, r in results for n in r.get("notes", [])})
    empty = [n for label, r in results if (n := no_completed_note(label, r))]
    empty_html = "".join(f'<p class="failed">{html.escape(n)}</p>' for n in empty)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>parity bench report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#eee}}
.failed{{color:#a00;font-weight:bold}}</style></head>
<body><h1>parity bench report</h1>
<p>{len(results)} run(s). Latencies in ms; all figures measured by parity bench (provenance: measured) except the
dashed modeled frontier.</p>
<h2>Setup</h2>{header_html(results)}
<h2>Frontier</h2>
<img alt="throughput-latency frontier" src="data:image/png;base64,{fimg}" style="max-width:100%">
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in fnotes)}</ul>
<h2>Points (steady-state window: from target concurrency first reached to the last send)</h2>{points_html(results)}
<h2>Whole runs</h2>
<table>{_summary_rows(results)}</table>
{empty_html}
<h2>Energy (steady-state window, idle baseline subtracted where measured)</h2>{energy_html(results)}
<img alt="latency CDFs and throughput vs latency" src="data:image/png;base64,{img}" style="max-width:100%">
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes)}</ul>
</body></html>
"""
    try:
        out.write_text(doc)
    except OSError as e:
        raise BenchError(f"bench report: cannot write {out}: {e}") from None
    return out
