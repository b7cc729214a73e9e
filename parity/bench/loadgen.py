"""The in-process load generator: arrival schedule, concurrency limit, warm-up, energy metering, Ctrl-C.

Arrivals follow vLLM ``bench serve``: with ``--request-rate R`` the gaps between sends are drawn from a gamma
distribution with shape = burstiness and mean 1/R (burstiness 1 = Poisson process; < 1 burstier, > 1 more
regular); ``inf`` sends everything at once. Sends are scheduled on absolute times from the run start (no drift).
``--max-concurrency C`` caps requests in flight; a request's send time (the origin of its TTFT) is when it
actually goes out, after waiting for a slot, as in vLLM. Trace workloads send at their recorded arrival times.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time

import numpy as np

from parity.bench.client import build_payload, endpoint_url, send_request
from parity.bench.metering import add_energy, as_meters, describe_meters, stop_meter
from parity.bench.metrics import RequestRecord, parse_slo, summarize
from parity.bench.result_schema import NOTES, RESULT_SCHEMA, RESULT_VERSION, environment
from parity.bench.run_config import BenchConfig
from parity.bench.tokenizer import BenchTokenizer
from parity.bench.workloads import BenchRequest
from parity.errors import BenchError

#: Concurrent streams per HTTP connection pool (see run_requests).
POOL_SIZE = 4


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send offsets in s from the run start for `n` requests (first at 0).

    Gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate (vLLM ``bench serve``); all 0 if
    rate is inf.
    """
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed + 104729)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


async def run_requests(
    cfg: BenchConfig,
    requests: list[BenchRequest],
    tokenizer: BenchTokenizer,
    meter=None,
    interrupt: asyncio.Event | None = None,
    transport=None,
    *,
    offsets: list[float] | None = None,
    start_gate=None,
    on_done=None,
) -> dict:
    """Run warm-up then the measured requests; returns the result dict (without writing it).

    Args:
        cfg: the run configuration (validated).
        requests: the workload.
        tokenizer: counts chunk text when the server streams no usage.
        meter: a `parity.devices.energy.EnergyMeter` or a list of them, started right before the measured run
            and stopped right after it (None: no energy measured).
        interrupt: setting this event stops the run like Ctrl-C does (in-flight requests are cancelled and
            recorded as "interrupted"; the partial result is returned).
        transport: an httpx async transport to use instead of the network (tests: a scripted transport, or
            `httpx.ASGITransport` around an in-process server app).
        offsets: send offsets in s from the run start (default: from the trace or --request-rate).
        start_gate: async callable(warmup_dict) -> absolute `time.perf_counter()` at which to start the measured
            run (client worker processes start together this way; see parity.bench.workers).
        on_done: called after each measured request ends (progress reporting from worker processes).
    Returns:
        The result dict: schema, version, config, environment, notes, summary, energy, warmup, requests, interrupted.
    """
    import httpx

    chat = cfg.endpoint == "chat"
    url = endpoint_url(cfg.base_url, cfg.endpoint)
    headers = cfg.auth_headers()
    slo = parse_slo(cfg.slo)
    host = httpx.URL(url).host
    local = host in ("127.0.0.1", "localhost", "::1")
    limit = cfg.max_concurrency or max(len(requests), 1)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    payloads = [
        build_payload(
            cfg.endpoint,
            cfg.model,
            r,
            ignore_eos=cfg.ignore_eos,
            temperature=cfg.temperature,
            continuous_usage=cfg.continuous_usage,
        )
        for r in requests
    ]

    async def one(clients, i, origin, sink, tag="bench"):
        client = clients[i % len(clients)]
        # the record exists from the moment the request is sent (after waiting for a concurrency slot), so a
        # request still queued at Ctrl-C counts as "not sent", one in flight as "interrupted"
        if sem is not None:
            await sem.acquire()
        try:
            rec = RequestRecord(index=requests[i].index, ok=False)
            sink.append(rec)
            await send_request(
                client,
                url,
                payloads[i],
                requests[i],
                rec,
                tokenizer,
                origin,
                chat,
                headers,
                request_id=f"{tag}-{requests[i].index if tag == 'bench' else len(sink)}",
                timeout_s=cfg.timeout_s,
            )
        finally:
            if sem is not None:
                sem.release()

    meters = as_meters(meter)
    result: dict = {
        "schema": RESULT_SCHEMA,
        "version": RESULT_VERSION,
        "config": cfg.to_dict(),
        "environment": environment(tokenizer, describe_meters(meters)),
        "notes": list(NOTES),
        "interrupted": False,
    }
    # Several small connection pools instead of one big one: httpcore's pool scans every connection on each
    # request start/finish (cost ~ connections x in-flight requests), which made one 256-connection pool use
    # most of a core at 256 concurrent streams (measured with cProfile, benchmarks/bench_client_overhead.py).
    n_pools = 1 if transport is not None else max(1, min(128, math.ceil(limit / POOL_SIZE)))
    ssl_ctx = httpx.create_ssl_context(trust_env=not local) if httpx.URL(url).scheme == "https" else False
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    limits=limits, timeout=timeout, trust_env=not local, transport=transport, verify=ssl_ctx
                )
            )
            for _ in range(n_pools)
        ]
        # --- warm-up
        warm = []
        if cfg.warmup:
            wreqs = [requests[i % len(requests)] for i in range(cfg.warmup)]
            origin = time.perf_counter()
            await asyncio.gather(*(one(clients, i % len(requests), origin, warm, "warmup") for i in range(len(wreqs))))
            if not any(r.ok for r in warm):
                raise BenchError(f"all {cfg.warmup} warm-up request(s) to {url} failed: {warm[0].error}")
        result["warmup"] = {"requests": cfg.warmup, "failed": sum(not r.ok for r in warm)}

        # --- measured run
        if offsets is None and requests and requests[0].arrival_s is not None:
            offsets = [r.arrival_s for r in requests]
        elif offsets is None:
            offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        records: list[RequestRecord] = []
        tasks: list[asyncio.Task] = []
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True)

        def _done(_t):
            if bar is not None:
                bar.update(1)
            if on_done is not None:
                on_done()

        for m in meters:
            m.start()
        if start_gate is not None:
            origin = await start_gate(result["warmup"])
            if origin - time.perf_counter() > 0:
                await asyncio.sleep(origin - time.perf_counter())
        else:
            origin = time.perf_counter()
        cpu0 = time.process_time()
        interrupted = False

        async def dispatch():
            for i, off in enumerate(offsets):
                delay = origin + off - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t = asyncio.create_task(one(clients, i, origin, records))
                t.add_done_callback(_done)
                tasks.append(t)
            if tasks:
                await asyncio.wait(tasks)

        main = asyncio.create_task(dispatch())
        waiters = {main}
        stop_t = None
        if interrupt is not None:
            stop_t = asyncio.create_task(interrupt.wait())
            waiters.add(stop_t)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                interrupted = True
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels the main task
            interrupted = True
        end = time.perf_counter()
        cpu_s = time.process_time() - cpu0
        if interrupted:
            main.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(main, *tasks, return_exceptions=True)
            ct = asyncio.current_task()
            if ct is not None and hasattr(ct, "uncancel"):
                while ct.cancelling():
                    ct.uncancel()
        elif main.exception() is not None:
            raise main.exception()
        if stop_t is not None:
            stop_t.cancel()
        if bar is not None:
            bar.close()
        readings = [stop_meter(m) for m in meters]

    duration = end - origin
    records.sort(key=lambda r: r.index)
    summary = summarize(records, duration, slo)
    summary["not_sent"] = len(requests) - len(records)
    result["interrupted"] = interrupted
    result["clock"] = {
        "origin_perf_counter_s": origin,
        "end_perf_counter_s": end,
        "client_cpu_s": cpu_s,
        "note": "send_s of each record is relative to this time.perf_counter() value "
        "(CLOCK_MONOTONIC on Linux, comparable with other processes' on this machine)",
    }
    result["summary"] = summary
    add_energy(result, readings, summary)
    result["requests"] = [r.to_dict() for r in records]
    return result
