"""Type checks of a bench result read back from disk: every field `parity bench report` reads has the type
`parity bench --output` writes, so a damaged file gets one error naming the file and the field."""

from __future__ import annotations

from pathlib import Path

from parity.errors import BenchError

_STATS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
_SUMMARY_INTS = ("completed", "failed", "interrupted")
_SUMMARY_NUMS = (
    "duration_s",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput_req_s",
    "output_throughput_tok_s",
    "total_token_throughput_tok_s",
)
#: RequestRecord fields (parity.bench.metrics) and their kinds; index and ok are required.
_RECORD = {
    "index": "int",
    "ok": "bool",
    "error": "str?",
    "send_s": "num",
    "ttft_s": "num?",
    "e2el_s": "num?",
    "itl_s": "nums",
    "prompt_tokens": "int",
    "output_tokens": "int",
    "requested_output_tokens": "int",
    "chunks": "int",
    "count_source": "str",
    "status": "int?",
}
_KIND_TEXT = {
    "int": "an integer",
    "num": "a number",
    "str": "a string",
    "bool": "true or false",
    "dict": "an object",
    "list": "a list",
    "nums": "a list of numbers",
}


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, kind: str, value) -> None:
        want = _KIND_TEXT[kind.rstrip("?")] + (" or null" if kind.endswith("?") else "")
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BenchError(f"bench report: {self.path} is damaged: field {where!r} must be {want}, got {shown}")

    def check(self, value, kind: str, where: str):
        """Return `value` when it is of `kind` ("int", "num", "str", "bool", "dict", "list", "nums"; a trailing
        "?" also allows None), else raise BenchError naming `where`."""
        base = kind.rstrip("?")
        if value is None and kind.endswith("?"):
            return value
        is_num = isinstance(value, int | float) and not isinstance(value, bool)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "num": is_num,
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "nums": isinstance(value, list)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value),
        }[base]
        if not ok:
            self.fail(where, kind, value)
        return value

    def flat_numbers(self, d, where: str) -> None:
        """An optional object whose other entries (not text, flags, objects or lists) are numbers or null."""
        if self.check(d, "dict?", where) is None:
            return
        for k, v in d.items():
            if not isinstance(v, str | bool | dict | list):
                self.check(v, "num?", f"{where}.{k}")


def check_result(data: dict, path: str | Path) -> None:
    """Check the types of the sections of a bench result (``data`` already has the right schema and version).

    Raises:
        BenchError: a field the report reads has the wrong type; the message names `path` and the field
            (e.g. ``requests[3].ttft_s``).
    """
    c = _Checker(Path(path))
    c.check(data["config"], "dict", "config")
    s = c.check(data["summary"], "dict", "summary")
    for k in _SUMMARY_INTS:
        c.check(s.get(k), "int", f"summary.{k}")
    c.check(s.get("not_sent", 0), "int", "summary.not_sent")
    for k in _SUMMARY_NUMS:
        c.check(s.get(k), "num", f"summary.{k}")
    c.check(s.get("goodput_req_s"), "num?", "summary.goodput_req_s")
    c.check(s.get("good_requests"), "int?", "summary.good_requests")
    for k in ("slo_ms", "failure_reasons", "count_sources"):
        c.flat_numbers(s.get(k), f"summary.{k}")
    for k in _STATS:
        c.check(s.get(k), "dict", f"summary.{k}")
        c.flat_numbers(s[k], f"summary.{k}")
    for i, r in enumerate(c.check(data["requests"], "list", "requests")):
        c.check(r, "dict", f"requests[{i}]")
        for k, kind in _RECORD.items():
            if k in ("index", "ok") or k in r:
                c.check(r.get(k), kind, f"requests[{i}].{k}")
    meters = c.check(data.get("energy_meters"), "list?", "energy_meters") or []
    for i, e in enumerate(meters):
        _check_energy(c, e, f"energy_meters[{i}]")
    if data.get("energy") is not None:
        _check_energy(c, data["energy"], "energy")
    for k in ("metadata", "steady_state", "sweep"):
        c.flat_numbers(data.get(k), k)
    meta = data.get("metadata") or {}
    for k in ("server", "hardware"):
        c.check(meta.get(k), "dict?", f"metadata.{k}")
    c.check(meta.get("command_line"), "list?", "metadata.command_line")
    notes = c.check(data.get("notes", []), "list", "notes")
    for i, n in enumerate(notes):
        c.check(n, "str", f"notes[{i}]")


def _check_energy(c: _Checker, e, where: str) -> None:
    c.flat_numbers(e, where)
    c.check(e.get("meter"), "str?", f"{where}.meter")
    c.flat_numbers(e.get("steady_state"), f"{where}.steady_state")
