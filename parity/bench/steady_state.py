"""The steady-state window of a run and the figures measured inside it.

A load test ramps up (requests start while the target concurrency is not yet reached) and drains (after the
last send, in-flight requests finish with ever fewer neighbours). Both ends flatter latency and lower throughput,
so a sweep point is reported over its steady-state window, from the moment the number of requests in flight
first reaches the target concurrency (``--max-concurrency``; without a cap, from the first send) to the moment the
last request is sent. Whole-run figures stay in the result's ``summary``.

Token arrival times are rebuilt from each record: the first chunk's tokens arrive at send + TTFT, each later
token at the previous one + its per-token ITL value (a chunk of k tokens after a gap g is spread as k steps g/k,
see `parity.bench.metrics`), so tokens of one multi-token chunk are spread over its gap.
"""

from __future__ import annotations

import numpy as np

from parity.bench.metrics import RequestRecord


def in_flight_steps(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Requests in flight over time: (times_s, count from that time on), times sorted.

    A request is in flight from its send to its end (send + E2EL; a failed request without E2EL ends at its
    send + TTFT when it has one, else at its send). At equal times ends are counted before starts.
    """
    ev = []
    for r in records:
        end = r.e2el_s if r.e2el_s is not None else (r.ttft_s or 0.0)
        ev.append((r.send_s, 1))
        ev.append((r.send_s + end, -1))
    ev.sort(key=lambda e: (e[0], e[1]))
    if not ev:
        return np.zeros(0), np.zeros(0)
    t = np.array([e[0] for e in ev])
    n = np.cumsum([e[1] for e in ev])
    return t, n


def steady_state_window(records: list[RequestRecord], target_concurrency: int | None) -> dict:
    """The steady-state window (offsets in s from the run start, the records' `send_s` origin).

    Returns:
        {"start_s", "end_s", "duration_s", "target_concurrency", "reached_concurrency", "mean_concurrency",
        "note"}; ``duration_s`` is 0 and ``note`` says why when the window is empty (e.g. every request sent at
        once, or the target never reached before the last send).
    """
    out = {
        "start_s": None,
        "end_s": None,
        "duration_s": 0.0,
        "target_concurrency": target_concurrency,
        "reached_concurrency": None,
        "mean_concurrency": None,
        "note": None,
    }
    if not records:
        out["note"] = "no request was sent"
        return out
    sends = sorted(r.send_s for r in records)
    t, n = in_flight_steps(records)
    peak = int(n.max())
    out["reached_concurrency"] = peak
    end = sends[-1]
    if target_concurrency is None:
        start = sends[0]
    else:
        hit = np.nonzero(n >= min(target_concurrency, len(records)))[0]
        if target_concurrency > len(records):
            out["note"] = (
                f"only {len(records)} requests for a target concurrency of {target_concurrency}: "
                "window starts when all are in flight"
            )
        if hit.size == 0:
            start = float(t[int(np.argmax(n))])
            out["note"] = (
                f"target concurrency {target_concurrency} never reached (peak {peak} in flight): "
                "window starts at the peak"
            )
        else:
            start = float(t[hit[0]])
    out["start_s"], out["end_s"] = float(start), float(end)
    if end <= start:
        out["note"] = out["note"] or (
            "the target concurrency was first reached when the last request was sent: "
            "no steady state (raise --num-prompts)"
        )
        return out
    out["duration_s"] = float(end - start)
    # time-averaged number in flight over the window
    idx = np.searchsorted(t, [start, end], side="right")
    times = np.concatenate(([start], t[idx[0] : idx[1]], [end]))
    counts = np.concatenate(([n[idx[0] - 1] if idx[0] > 0 else 0], n[idx[0] : idx[1]]))
    out["mean_concurrency"] = float(np.sum(np.diff(times) * counts) / (end - start))
    return out


def token_times(rec: RequestRecord) -> np.ndarray:
    """Arrival times (s from the run start) of each output token of `rec` (empty without a first token)."""
    if rec.ttft_s is None or rec.output_tokens <= 0:
        return np.zeros(0)
    first = max(rec.output_tokens - len(rec.itl_s), 1)
    t0 = rec.send_s + rec.ttft_s
    return np.concatenate((np.full(first, t0), t0 + np.cumsum(rec.itl_s))) if rec.itl_s else np.full(first, t0)


def _median(v: list[float]) -> float | None:
    return float(np.median(v)) if v else None


def window_figures(records: list[RequestRecord], window: dict, num_devices: int = 1) -> dict:
    """Figures inside `window` (from `steady_state_window`).

    Returns:
        {"output_tokens", "output_throughput_tok_s", "output_tok_s_per_device", "requests_sent", "completed",
        "ttft_ms_median", "tpot_ms_median", "tok_s_per_user"} — throughputs count the tokens arriving inside the
        window over its length; latencies are those of the requests sent inside it; tok/s per user = 1000 /
        median TPOT (ms). All None when the window is empty.
    """
    keys = (
        "output_tokens",
        "output_throughput_tok_s",
        "output_tok_s_per_device",
        "requests_sent",
        "completed",
        "ttft_ms_median",
        "tpot_ms_median",
        "tok_s_per_user",
    )
    dur = window.get("duration_s") or 0.0
    if dur <= 0:
        return dict.fromkeys(keys)
    a, b = window["start_s"], window["end_s"]
    ntok = 0
    for r in records:
        tt = token_times(r)
        if tt.size:
            ntok += int(np.count_nonzero((tt >= a) & (tt <= b)))
    sent = [r for r in records if a <= r.send_s <= b]
    ok = [r for r in sent if r.ok]
    tpot = _median([x * 1e3 for r in ok if (x := r.tpot_s) is not None])
    thr = ntok / dur
    return {
        "output_tokens": ntok,
        "output_throughput_tok_s": thr,
        "output_tok_s_per_device": thr / num_devices,
        "requests_sent": len(sent),
        "completed": len(ok),
        "ttft_ms_median": _median([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
        "tpot_ms_median": tpot,
        "tok_s_per_user": (1e3 / tpot) if tpot else None,
    }


def steady_state(records: list[RequestRecord], target_concurrency: int | None, num_devices: int = 1) -> dict:
    """`steady_state_window` and its `window_figures` in one section (the result's ``steady_state``)."""
    w = steady_state_window(records, target_concurrency)
    return {**w, **window_figures(records, w, num_devices), "num_devices": num_devices}
