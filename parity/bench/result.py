"""Bench results on disk (versioned JSON) and on the console (a rich table)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from parity.bench.result_check import check_result
from parity.bench.result_schema import RESULT_SCHEMA, RESULT_VERSION, SWEEP_SCHEMA
from parity.errors import BenchError


def check_output_path(path: str | Path) -> Path:
    """Check that a result can be written to `path` (run before any request is sent): its directory exists
    and is writable, and `path` is not a directory.

    Returns:
        `path` as a Path.
    Raises:
        BenchError: naming --output and what is wrong.
    """
    path = Path(path)
    d = path.parent
    if path.is_dir():
        raise BenchError(f"--output: {path} is a directory; expected a file name such as {path / 'results.json'}")
    if not d.is_dir():
        raise BenchError(f"--output: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise BenchError(f"--output: directory {d} is not writable")
    return path


def save_result(result: dict, path: str | Path) -> Path:
    """Write `result` as JSON to `path` atomically (temp file + rename; a Ctrl-C never leaves half a file).

    Raises:
        BenchError: the directory does not exist or is not writable (message names --output).
    """
    path = check_output_path(path)
    d = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=d)
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1, allow_nan=False, default=str)
        os.replace(tmp, path)
    except OSError as e:
        raise BenchError(f"--output: cannot write {path}: {e}") from None
    return path


def load_result(path: str | Path) -> dict:
    """Read a result written by `save_result`.

    Raises:
        BenchError: missing file, invalid JSON, not a parity bench result of a known version, or a field of
            the wrong type (`parity.bench.result_check.check_result`).
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"bench report: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"bench report: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA:
        raise BenchError(f"bench report: {path} is not a parity bench result (schema != {RESULT_SCHEMA!r})")
    if data.get("version") != RESULT_VERSION:
        raise BenchError(f"bench report: {path} has result version {data.get('version')}, expected {RESULT_VERSION}")
    for key in ("summary", "requests", "config"):
        if key not in data:
            raise BenchError(f"bench report: {path} lacks the {key!r} section")
    check_result(data, path)
    return data


def _sweep_points(path: Path) -> list[Path] | None:
    """The point files a sweep index lists (beside it), or None when `path` is no sweep index."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_result names the problem
    if not isinstance(data, dict) or data.get("schema") != SWEEP_SCHEMA:
        return None
    return [path.parent / p["file"] for p in data.get("points", []) if isinstance(p, dict) and p.get("file")]


def result_files(paths: list[str | Path]) -> list[Path]:
    """The result files of `paths`: a directory gives its ``*.json`` files, a sweep index (``sweep.json``)
    the point files it lists; each file once, in order.

    Raises:
        BenchError: a path that does not exist, or a directory without any JSON file.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise BenchError(f"bench report: directory {p} holds no result (*.json) file")
        elif p.is_file():
            found = [p]
        else:
            raise BenchError(f"bench report: {p} not found")
        for f in found:
            points = _sweep_points(f)
            out += [f] if points is None else points
    unique: dict[Path, Path] = {}
    for f in out:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _f(v, nd=2) -> str:
    return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else str(v))


def concurrency_text(config: dict) -> str:
    """A run's ``--max-concurrency`` as printed: the cap, or "unbounded" when none was set (every request
    may be in flight at once)."""
    cap = config.get("max_concurrency")
    return "unbounded" if cap is None else str(cap)


def render_table(result: dict, console=None) -> None:
    """Print the summary of one result as a rich table (plus notes, failures and energy)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=False)
    s, cfg = result["summary"], result["config"]
    title = f"parity bench - {cfg.get('model')} @ {cfg.get('base_url')} ({cfg.get('endpoint')})"
    if result.get("interrupted"):
        title += " (INTERRUPTED: partial results)"
    t = Table(title=escape(title), show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("workload", str(cfg.get("workload"))),
        ("request rate (req/s)", str(cfg.get("request_rate"))),
        ("max concurrency", concurrency_text(cfg)),
        (
            "completed / failed / interrupted / not sent",
            f"{s['completed']} / {s['failed']} / {s['interrupted']} / {s.get('not_sent', 0)}",
        ),
        ("duration (s)", _f(s["duration_s"])),
        ("total input / output tokens", f"{s['total_input_tokens']:,} / {s['total_output_tokens']:,}"),
        ("request throughput (req/s)", _f(s["request_throughput_req_s"])),
        ("output token throughput (tok/s)", _f(s["output_throughput_tok_s"])),
        ("total token throughput (tok/s)", _f(s["total_token_throughput_tok_s"])),
    ]
    if s.get("goodput_req_s") is not None:
        slo = ", ".join(f"{k}={v:g}" for k, v in s["slo_ms"].items())
        rows.append((f"goodput (req/s) under {slo}", f"{_f(s['goodput_req_s'])} ({s['good_requests']} good)"))
    for r in rows:
        t.add_row(*(escape(x) for x in r))
    for m, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL (per token)"), ("e2el_ms", "E2EL")):
        st = s[m]
        t.add_section()
        for k in ("mean", "median", "p90", "p95", "p99"):
            t.add_row(f"{label} {k} (ms)", _f(st.get(k)))
    for e in result.get("energy_meters") or [result.get("energy") or {}]:
        t.add_section()
        if e.get("joules") is not None:
            t.add_row(f"energy, meter {e['meter']} (J)", _f(e["joules"], 1))
            t.add_row(f"average power, {e['meter']} (W)", _f(e.get("avg_watts"), 1))
            t.add_row(f"energy per output token, {e['meter']} (J/tok)", _f(e.get("joules_per_output_token"), 4))
            t.add_row(f"output tokens per joule, {e['meter']} (tok/J)", _f(e.get("output_tokens_per_joule"), 3))
        else:
            t.add_row("energy", escape(f"{e.get('meter') or 'none'}: {e.get('reason') or 'not measured'}"))
    console.print(t)
    if s.get("failure_reasons"):
        console.print("[bold red]failed requests by reason:[/]")
        for reason, n in s["failure_reasons"].items():
            console.print(f"  {n:6d}  {escape(str(reason))}")
    srcs = ", ".join(f"{k}: {v}" for k, v in (s.get("count_sources") or {}).items())
    console.print(f"[dim]token counts from {escape(srcs or '-')}[/]")
    for note in result.get("notes", []):
        console.print(f"[dim]note: {escape(note)}[/]")
