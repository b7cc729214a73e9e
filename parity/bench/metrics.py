"""Per-request records and the summary metrics of `parity bench`.

Definitions follow vLLM's ``bench serve`` (vllm/benchmarks/serve.py, ``calculate_metrics``):

- TTFT  time to first token: arrival of the first token-carrying chunk - send time.
- E2EL  end-to-end latency: arrival of ``data: [DONE]`` (the end of the stream if the server sends none) - send.
- TPOT  time per output token, per request: (E2EL - TTFT) / (output_tokens - 1); requests with one output
        token have no TPOT (vLLM records 0 for them; we leave them out of the TPOT statistics).
- ITL   inter-token latency: gaps between token-carrying chunks, **per token**: a chunk that carries k tokens
        (speculative decoding, server-side batching of deltas) after a gap g contributes k values g/k. vLLM
        appends one value g per chunk, which overstates ITL by k when chunks carry several tokens. Tokens of the
        first chunk have no preceding gap and add no ITL value.
- throughput: completed requests / duration (req/s); output tokens / duration; (input + output) / duration (tok/s).
- goodput: completed requests meeting every SLO given / duration (req/s), SLOs as in vLLM ``--goodput``.
- statistics: mean, median, std, p90, p95, p99 (numpy linear-interpolation percentiles, as vLLM), plus min/max.

Deviation from vLLM's client (stated in every result's notes): vLLM's chat client takes the first SSE chunk as
the first token even when it carries only the assistant role and no text; we wait for the first chunk carrying a
token (non-empty content / reasoning / tool call / text, or a rise of the streamed completion_tokens count).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from parity.errors import BenchError

#: SLO keys accepted by ``--slo`` (all milliseconds), mirroring vLLM ``--goodput ttft: tpot: e2el:``.
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
PERCENTILES = (90, 95, 99)


@dataclass
class RequestRecord:
    """Timing and counts of one request (all times in s, relative to `send_s`'s origin, the run start).

    Attributes:
        index: workload index.
        ok: completed successfully.
        error: failure reason (None when ok).
        send_s: send time since run start.
        ttft_s: time to first token (None if no token arrived).
        e2el_s: end-to-end latency (None if the request failed before the stream ended).
        itl_s: per-token inter-token gaps (see module docstring).
        prompt_tokens: input tokens (server usage.prompt_tokens when reported, else the bench tokenizer's count).
        output_tokens: generated tokens (server usage.completion_tokens when reported, else tokenizer count).
        requested_output_tokens: max_tokens sent.
        chunks: token-carrying chunks received.
        count_source: "usage" (server usage) or "tokenizer" (counted client-side).
        status: HTTP status (None if no answer).
    """

    index: int
    ok: bool
    error: str | None = None
    send_s: float = 0.0
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    requested_output_tokens: int = 0
    chunks: int = 0
    count_source: str = "tokenizer"
    status: int | None = None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output_tokens - 1) in s; None when undefined (failed, or a single output token)."""
        if not self.ok or self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["itl_s"] = [round(x, 7) for x in self.itl_s]
        d["tpot_s"] = self.tpot_s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)


def parse_slo(text: str | None) -> dict[str, float]:
    """Parse ``--slo ttft_ms=200,tpot_ms=50[,e2el_ms=...]``.

    Returns:
        {key: milliseconds}; empty for None (no ``--slo`` given).
    Raises:
        BenchError: an empty or blank string (``--slo ""`` would otherwise silently drop the SLOs), an empty
            item (``ttft_ms=500,,tpot_ms=5``), unknown key, missing '=', non-numeric or non-positive value,
            repeated key.
    """
    out: dict[str, float] = {}
    if text is None:
        return out
    if not text.strip():
        raise BenchError(
            f"--slo: got an empty value {text!r}; give key=value pairs such as ttft_ms=200,tpot_ms=50 "
            "or leave out --slo for no goodput"
        )
    for pos, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            raise BenchError(
                f"--slo {text!r}: item {pos} is empty (stray comma); expected comma-separated "
                "key=value pairs such as ttft_ms=200,tpot_ms=50"
            )
        if "=" not in item:
            raise BenchError(f"--slo: {item!r} is not key=value; expected e.g. ttft_ms=200,tpot_ms=50")
        k, v = (s.strip() for s in item.split("=", 1))
        k = k.lower()
        if k not in SLO_KEYS:
            raise BenchError(f"--slo: unknown key {k!r}; expected one of {', '.join(SLO_KEYS)} (milliseconds)")
        if k in out:
            raise BenchError(f"--slo: {k} given twice")
        try:
            val = float(v.removesuffix("ms"))
        except ValueError:
            raise BenchError(f"--slo: {k} must be a number of milliseconds, got {v!r}") from None
        if not val > 0 or val != val or val == float("inf"):
            raise BenchError(f"--slo: {k} must be a finite number > 0 ms, got {v!r}")
        out[k] = val
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO in `slo` (ms). Failed requests never do; a request with a
    single output token has no TPOT and meets a TPOT SLO trivially (as vLLM, where its TPOT is 0)."""
    if not rec.ok:
        return False
    if "ttft_ms" in slo and (rec.ttft_s is None or rec.ttft_s * 1e3 > slo["ttft_ms"]):
        return False
    if "e2el_ms" in slo and (rec.e2el_s is None or rec.e2el_s * 1e3 > slo["e2el_ms"]):
        return False
    tpot = rec.tpot_s
    if "tpot_ms" in slo and tpot is not None and tpot * 1e3 > slo["tpot_ms"]:
        return False
    return True


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean / median / std / p90 / p95 / p99 / min / max of `values_s` (seconds), in milliseconds.
    All None for an empty list."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES), "min", "max", "count"]
    if not values_s:
        return {k: (0 if k == "count" else None) for k in keys}
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    out.update(min=float(a.min()), max=float(a.max()), count=int(a.size))
    return out


def summarize(records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None) -> dict:
    """Summary metrics over the records of one run.

    Args:
        records: every request sent (completed and failed; interrupted ones carry error "interrupted").
        duration_s: wall time of the run in s (first send to last completion, or to the interruption).
        slo: parsed SLOs (ms) for goodput; None/{} = no goodput.
    Returns:
        dict with counts, throughputs (req/s, tok/s), goodput, and `ttft_ms`/`tpot_ms`/`itl_ms`/`e2el_ms` stats.
    """
    slo = slo or {}
    done = [r for r in records if r.ok]
    interrupted = [r for r in records if not r.ok and r.error == "interrupted"]
    failed = [r for r in records if not r.ok and r.error != "interrupted"]
    dur = max(duration_s, 1e-9)
    tin = sum(r.prompt_tokens for r in done)
    tout = sum(r.output_tokens for r in done)
    s = {
        "completed": len(done),
        "failed": len(failed),
        "interrupted": len(interrupted),
        "failure_reasons": dict(Counter(r.error for r in failed).most_common()),
        "duration_s": duration_s,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput_req_s": len(done) / dur,
        "output_throughput_tok_s": tout / dur,
        "total_token_throughput_tok_s": (tin + tout) / dur,
        "max_concurrent_requests": _max_concurrency(done),
        "count_sources": dict(Counter(r.count_source for r in done)),
        "ttft_ms": stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([x for r in done for x in r.itl_s]),
        "e2el_ms": stats_ms([r.e2el_s for r in done if r.e2el_s is not None]),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in done)
        s["slo_ms"] = dict(slo)
        s["good_requests"] = good
        s["goodput_req_s"] = good / dur
    else:
        s["slo_ms"] = {}
        s["good_requests"] = None
        s["goodput_req_s"] = None
    return s


def _max_concurrency(done: list[RequestRecord]) -> int:
    """Peak number of completed requests in flight at once (from send_s and e2el_s)."""
    ev = []
    for r in done:
        if r.e2el_s is not None:
            ev.append((r.send_s, 1))
            ev.append((r.send_s + r.e2el_s, -1))
    ev.sort(key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak
