"""Is `parity bench` itself a bottleneck? Client overhead at 256 concurrent streams and the highest request rate
the client sustains, against the scripted SSE server (parity.bench.fake_server) in a separate process.

Two measurements, side by side in one run:

1. 256 concurrent streams (``--max-concurrency 256``, rate inf): client CPU time per request and per streamed
   chunk (process CPU time of this process / requests), and how much the measured TTFT / ITL / E2EL exceed the
   server's script (latency inflation = client + server + loopback overhead; an upper bound on the client's).
2. Request-rate sweep (Poisson arrivals, no concurrency cap): for each offered rate, the achieved request
   throughput, how late sends left versus their schedule (p99), and the TTFT inflation. A rate is "sustained"
   when p99 send lateness <= 10 ms and median TTFT inflation <= 10 ms; the highest sustained rate is reported.

A third table repeats the sweep with ``--client-workers 2`` (two client processes).

Run:  .venv/bin/python benchmarks/bench_client_overhead.py [--quick]
The server runs on another process, but on a 2-core machine it competes with the client for CPU: both limits
are reported as measured here, together with the load average at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import numpy as np

from parity.bench.loadgen import arrival_offsets, run_requests
from parity.bench.run_config import BenchConfig
from parity.bench.tokenizer import load_bench_tokenizer
from parity.bench.workloads import build_requests


def start_server(ttft_ms: float, itl_ms: float) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "parity.bench.fake_server", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline().split()
    assert line and line[0] == "READY", line
    return p, line[1]


def run(cfg: BenchConfig, reqs, tok) -> tuple[dict, float, float]:
    """Run in this process; returns (result, client CPU s of the measured phase, wall s)."""
    t0 = time.perf_counter()
    res = asyncio.run(run_requests(cfg, reqs, tok, None))
    return res, res["clock"]["client_cpu_s"], time.perf_counter() - t0


def lags(res: dict, url: str) -> dict[str, np.ndarray]:
    """Join the bench's records with the scripted server's own log (same CLOCK_MONOTONIC on one machine):

    send lag   = server read the request line - client took its send time (client send path + server accept/parse)
    first lag  = client saw the first token - server wrote it (loopback + client receive path)
    end lag    = client saw the end of the stream - server wrote [DONE] (idem, at the end)
    """
    import httpx

    log = {e["id"]: e for e in httpx.get(url + "/_log", timeout=30).json()["log"]}
    origin = res["clock"]["origin_perf_counter_s"]
    out = {"send": [], "first": [], "end": []}
    for r in res["requests"]:
        e = log.get(f"bench-{r['index']}")
        if not r["ok"] or e is None:
            continue
        send_abs = origin + r["send_s"]
        out["send"].append(e["arrival_s"] - send_abs)
        out["first"].append(send_abs + r["ttft_s"] - (e["arrival_s"] + e["sent_at_s"][1]))  # [0] is the role chunk
        out["end"].append(send_abs + r["e2el_s"] - (e["arrival_s"] + e["sent_at_s"][-1]))
    return {k: np.asarray(v) * 1e3 for k, v in out.items()}


def _ms(a: np.ndarray) -> str:
    return f"{np.median(a):.2f} / {np.percentile(a, 99):.2f}"


def concurrency_256(tok, n: int, out: int, ttft_ms: float, itl_ms: float, burst: bool) -> None:
    """256 streams in flight. burst=False: Poisson arrivals at 256 / stream length, so about 256 streams are in
    flight in steady state (the ramp-up/down at the ends included); burst=True: all sent at once (rate inf)."""
    proc, url = start_server(ttft_ms, itl_ms)
    stream_s = (ttft_ms + (out - 1) * itl_ms) / 1e3
    rate = float("inf") if burst else 256 / stream_s
    try:
        reqs, _ = build_requests(f"fixed:in=64,out={out}", tok, n, seed=0)
        # 256 warm-up requests open the 256 connections (and server threads) before the measured run
        cfg = BenchConfig(
            base_url=url,
            model="fake",
            workload=f"fixed:in=64,out={out}",
            num_prompts=n,
            max_concurrency=256,
            warmup=256,
            request_rate=rate,
            progress=False,
            energy="none",
        )
        res, cpu_s, wall_s = run(cfg, reqs, tok)
        lag = lags(res, url)
    finally:
        proc.terminate()
        proc.wait()
    s = res["summary"]
    events = out + 3  # role chunk, token chunks, usage chunk, [DONE]
    dur = s["duration_s"]
    how = "all sent at once (burst)" if burst else f"Poisson arrivals at {rate:.1f} req/s (steady state)"
    print(f"## 256 concurrent streams, {how}: {n} requests x {out} tokens, script TTFT {ttft_ms} ms, ITL {itl_ms} ms")
    print(
        f"completed {s['completed']}, failed {s['failed']}, peak in flight {s['max_concurrent_requests']}, "
        f"run {dur:.2f} s, {n * events / dur:,.0f} SSE events/s received"
    )
    print(
        f"client CPU: {cpu_s / n * 1e3:.2f} ms per request, {cpu_s / (n * events) * 1e6:.1f} us per SSE event "
        f"({cpu_s / dur * 100:.0f}% of one core)"
    )
    print("latency added on each side, median / p99 ms (joined with the server's own log):")
    print(f"  send lag (client send path + server accept/parse): {_ms(lag['send'])}")
    print(f"  first-token receive lag (loopback + client):      {_ms(lag['first'])}")
    print(f"  end-of-stream receive lag (loopback + client):    {_ms(lag['end'])}")
    print(
        f"measured - script, median / p99 ms: TTFT {s['ttft_ms']['median'] - ttft_ms:+.2f} / "
        f"{s['ttft_ms']['p99'] - ttft_ms:+.2f}, ITL {s['itl_ms']['median'] - itl_ms:+.2f} / "
        f"{s['itl_ms']['p99'] - itl_ms:+.2f}"
    )


def rate_sweep(
    tok, rates: list[float], seconds: float, out: int, ttft_ms: float, itl_ms: float, workers: int = 1
) -> None:
    from parity.bench.runner import run_bench

    proc, url = start_server(ttft_ms, itl_ms)
    best, fails = None, 0
    print(
        f"## rate sweep, {workers} client process(es): Poisson arrivals, {seconds:g} s per rate, {out} tokens "
        f"per request, script TTFT {ttft_ms} ms, ITL {itl_ms} ms"
    )
    print(
        "| offered req/s | completed/duration req/s | p99 send lateness ms | TTFT inflation median/p99 ms "
        "| client CPU % of one core | sustained |"
    )
    print("|---|---|---|---|---|---|")
    try:
        for rate in rates:
            n = max(8, int(rate * seconds))
            reqs, _ = build_requests(f"fixed:in=32,out={out}", tok, n, seed=1)
            cfg = BenchConfig(
                base_url=url,
                model="fake",
                workload=f"fixed:in=32,out={out}",
                num_prompts=n,
                request_rate=rate,
                seed=1,
                progress=False,
                energy="none",
                client_workers=workers,
                warmup=workers,
            )
            res = run_bench(cfg, tokenizer=tok, requests=reqs, meter=None)
            cpu_s = res["clock"]["client_cpu_s"]  # measured phase only, summed over client processes
            s = res["summary"]
            plan = arrival_offsets(n, rate, 1.0, 1)
            late = np.array([r["send_s"] - plan[r["index"]] for r in res["requests"]]) * 1e3
            p99_late = float(np.percentile(late, 99))
            infl_med = s["ttft_ms"]["median"] - ttft_ms
            infl_p99 = s["ttft_ms"]["p99"] - ttft_ms
            achieved = s["completed"] / s["duration_s"]  # includes the last request's own length
            ok = s["failed"] == 0 and p99_late <= 10 and infl_med <= 5
            print(
                f"| {rate:g} | {achieved:.1f} | {p99_late:.2f} | {infl_med:.2f} / {infl_p99:.2f} | "
                f"{cpu_s / s['duration_s'] * 100:.0f} | {'yes' if ok else 'no'} |",
                flush=True,
            )
            if ok and fails == 0:
                best = rate
            fails = 0 if ok else fails + 1
            if fails == 2:
                break
    finally:
        proc.terminate()
        proc.wait()
    print(
        f"highest sustained request rate ({workers} client process(es)): {best} req/s "
        "(p99 send lateness <= 10 ms, median TTFT inflation <= 5 ms, no failure, at this and every lower rate)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (smoke test)")
    a = ap.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}, "
        f"python {sys.version.split()[0]}"
    )
    tok = load_bench_tokenizer(None)
    if a.quick:
        concurrency_256(tok, n=256, out=16, ttft_ms=50, itl_ms=40, burst=True)
        rate_sweep(tok, [50, 100], seconds=1.0, out=16, ttft_ms=20, itl_ms=10)
        rate_sweep(tok, [50, 100], seconds=1.0, out=16, ttft_ms=20, itl_ms=10, workers=2)
    else:
        concurrency_256(tok, n=1024, out=64, ttft_ms=50, itl_ms=40, burst=False)
        concurrency_256(tok, n=256, out=64, ttft_ms=50, itl_ms=40, burst=True)
        rates = [50, 100, 150, 200, 250, 300, 400, 500, 600]
        rate_sweep(tok, rates, seconds=3.0, out=16, ttft_ms=20, itl_ms=10)
        rate_sweep(tok, rates, seconds=3.0, out=16, ttft_ms=20, itl_ms=10, workers=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
