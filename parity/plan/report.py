"""`parity compare`: one table over several accelerators and the Pareto frontier of output tok/s per
chip vs tok/s per user, as text/JSON and as a self-contained HTML report (matplotlib, Agg backend,
PNG embedded as base64) or the frontier plot alone as a PNG. matplotlib is imported only when a report
is written."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from parity.errors import PlanError
from parity.plan.search import Workload, frontier, plan

#: Report formats `compare(out=...)` writes, by file suffix (lower case).
REPORT_SUFFIXES = (".html", ".png")


def compare(model: str, hardware: list[str], workload: Workload, out: str | None = None) -> dict:
    """Plan `model` on each of `hardware` and compute each chip's frontier.

    Returns {"rows": [plan results], "frontiers": {hw: [points]}, "table_text": str, "any_feasible": bool
    (some chip meets the SLOs)}; writes the report to `out` when given: a self-contained HTML page
    (table + frontier plot) for ``.html``, the frontier plot alone for ``.png``.

    Raises:
        PlanError: unknown hardware/model, bad workload, an `out` path not ending in .html or .png (checked
            before any planning), or an unwritable `out` path.
    """
    if out is not None:
        suffix = Path(out).suffix.lower()
        if suffix not in REPORT_SUFFIXES:
            raise PlanError(
                f"--out {out}: the report is written as HTML (.html) or as the frontier plot (.png); "
                f"got {'no suffix' if not suffix else repr(suffix)} - use a path ending in .html or .png"
            )
    hardware, notes = dedupe_hardware(hardware)
    rows, fronts = [], {}
    for h in hardware:
        r = plan(model, h, workload)
        rows.append(r)
        usable = r["feasible"] or r.get("limiting_resource") != "memory"
        fronts[r["hardware"]] = frontier(model, h, workload) if usable else []
    res = {
        "model": model,
        "workload": vars(workload),
        "rows": rows,
        "frontiers": fronts,
        "provenance": rows[0]["provenance"] if rows else "",
        "notes": notes,
    }
    w = workload
    head = (
        f"{model}: isl {w.isl}, osl {w.osl}, prefix hits {w.prefix_hit_rate:g}, SLO TTFT {w.slo_ttft_ms:g} ms, "
        f"TPOT {w.slo_tpot_ms:g} ms; "
        "output and input tok/s per chip; the frontier (--out) spans both modes, each point labelled"
    )
    res["table_text"] = head + "\n" + _table(rows, res["provenance"]) + "".join(f"\nnote: {n}" for n in notes)
    res["any_feasible"] = any(r["feasible"] for r in rows)
    if out:
        path = Path(out)
        if path.suffix.lower() == ".png":
            _write_bytes(path, _plot_png(fronts, _title(res)))
        else:
            _write_html(res, path)
    return res


def dedupe_hardware(hardware: list[str]) -> tuple[list[str], list[str]]:
    """Drop repeated chips from a ``--hardware`` list, keeping the first occurrence and the given order.

    Names are compared by the catalog id they resolve to, so an id, its alias or another spelling of it
    count as the same chip.

    Returns:
        (unique names in first-seen order, notes naming each chip that was given more than once).
    Raises:
        PlanError: an unknown name (from `get_hardware`; checked before any planning).
    """
    from parity.plan.hardware import get_hardware

    seen: dict[str, list[str]] = {}
    unique = []
    for name in hardware:
        hw_id = get_hardware(name).id
        if hw_id not in seen:
            seen[hw_id] = []
            unique.append(name)
        seen[hw_id].append(name)
    notes = [
        f"--hardware lists {hw_id} {len(names)} times ({', '.join(repr(n) for n in names)}); compared once"
        for hw_id, names in seen.items()
        if len(names) > 1
    ]
    return unique, notes


_COLS = [
    ("hardware", "chip"),
    ("mode", "mode"),
    ("output_tok_s_per_chip", "out tok/s/chip"),
    ("input_tok_s_per_chip", "in tok/s/chip"),
    ("ttft_ms", "TTFT ms"),
    ("tpot_ms", "TPOT ms"),
    ("tokens_per_joule", "tok/J (TDP)"),
    ("usd_per_m_output_tokens", "$/M out"),
]


def _cell(r, key):
    if not r["feasible"]:
        return r["limiting_resource"] if key == "mode" else ("-" if key != "hardware" else r["hardware"])
    v = r.get(key)
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.2f}" if key in ("tokens_per_joule", "usd_per_m_output_tokens") else f"{v:,.0f}"
    return str(v)


def _table(rows, provenance) -> str:
    widths = [max(len(h), *(len(_cell(r, k)) for r in rows)) for k, h in _COLS]
    line = "  ".join(h.rjust(w) for (_, h), w in zip(_COLS, widths, strict=True))
    out = [f"output tok/s per chip of the first row: {provenance} (per-figure errors: parity plan)", line]
    for r in rows:
        out.append("  ".join(_cell(r, k).rjust(w) for (k, _), w in zip(_COLS, widths, strict=True)))
    for r in rows:
        if not r["feasible"]:
            out.append(r["reason"])
    return "\n".join(out)


def _plot_png(fronts: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for hw, pts in fronts.items():
        if pts:
            ax.plot(
                [p["tok_s_per_user"] for p in pts],
                [p["output_tok_s_per_chip"] for p in pts],
                marker="o",
                markersize=3,
                label=hw,
            )
    ax.set_xlabel("output tokens/s per user (1 / TPOT)")
    ax.set_ylabel("output tokens/s per chip")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(True, alpha=0.3)
    if any(fronts.values()):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no chip meets the SLOs", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _title(res: dict) -> str:
    w = res["workload"]
    return (
        f"{res['model']}: isl {w['isl']}, osl {w['osl']}, SLO TTFT {w['slo_ttft_ms']:g} ms / "
        f"TPOT {w['slo_tpot_ms']:g} ms — {res['provenance']}"
    )


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise PlanError(f"--out {path}: cannot write the report: {e}") from None


def _write_html(res: dict, path: Path) -> None:
    title = _title(res)
    png = base64.b64encode(_plot_png(res["frontiers"], title)).decode()
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in _COLS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r, k))}</td>" for k, _ in _COLS) + "</tr>" for r in res["rows"]
    )
    notes = "".join(f"<li>{html.escape(r['reason'])}</li>" for r in res["rows"] if not r["feasible"])
    notes += "".join(f"<li>{html.escape(n)}</li>" for n in res.get("notes", []))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>parity compare</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>parity compare</h1><p>{html.escape(title)}</p>
<table><tr>{head}</tr>{body}</table><ul>{notes}</ul>
<h2>Pareto frontier: output tokens/s per chip vs tokens/s per user</h2>
<img alt="Pareto frontier" src="data:image/png;base64,{png}">
<p>Both modes: disaggregated (prefill at its best TTFT-feasible point, decode swept over batch and
deployments) and colocated (swept over batch, TTFT SLO applied); the table row names the chosen mode.
Tokens per joule are modeled from TDP. See docs/plan.md for the model and its validated error.</p>
</body></html>"""
    _write_bytes(path, doc.encode())
