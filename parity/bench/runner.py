"""The load generator: arrival schedule, concurrency limit, warm-up, energy metering, Ctrl-C handling.

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
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from parity.bench.client import build_payload, endpoint_url, fetch_default_model, send_request
from parity.bench.metrics import RequestRecord, parse_slo, summarize
from parity.bench.tokenizer import BenchTokenizer, load_bench_tokenizer
from parity.bench.workloads import BenchRequest, build_requests, parse_workload
from parity.errors import BenchError

#: Concurrent streams per HTTP connection pool (see run_requests).
POOL_SIZE = 4

#: Version of the JSON result layout written by `parity bench --output` (bump on incompatible change).
RESULT_SCHEMA = "parity.bench.result"
RESULT_VERSION = 1

NOTES = [
    "TTFT = first token-carrying chunk - send (vLLM also counts a role-only first chunk; we do not).",
    "Tokens are counted, not chunks: a chunk carrying k tokens after a gap g adds k ITL values g/k; "
    "TPOT = (E2EL - TTFT) / (output_tokens - 1).",
    "Per-chunk token counts come from the server's streamed usage (continuous_usage_stats) when present, "
    "else from counting each chunk's text with the bench tokenizer; output_tokens from the final usage when present.",
    "E2EL = arrival of data: [DONE] (else end of stream) - send. Goodput = completed requests meeting every SLO "
    "/ duration.",
]


@dataclass
class BenchConfig:
    """Everything that defines a run (recorded verbatim in the result's `config`).

    Attributes:
        base_url: server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted).
        model: model name sent in each request (None/"": `run_bench` asks the server, the first entry of
            GET /v1/models).
        endpoint: "chat" | "completions".
        workload: ``--workload`` spec (see parity.bench.workloads).
        num_prompts: requests to send (None: workload default).
        request_rate: requests/s, math.inf = all at once.
        burstiness: gamma shape of inter-arrival gaps (1 = Poisson).
        max_concurrency: cap on requests in flight (None = no cap).
        warmup: requests sent (and discarded) before the measured run.
        slo: ``--slo`` string, e.g. "ttft_ms=200,tpot_ms=50".
        ignore_eos: ask the server to ignore EOS (vLLM/SGLang extension) so outputs reach max_tokens.
        seed: seeds prompts, lengths and arrival gaps.
        energy: "auto" | "none" | comma list of "nvml", "npu-smi", "rapl" (auto: accelerator meter + RAPL when
            readable, see parity.devices.energy.open_meters).
        energy_devices: accelerator indices to meter (None = all).
        tokenizer: tokenizer.json path (None = parity's V4 tokenizer).
        api_key: sent as ``Authorization: Bearer`` (None: $OPENAI_API_KEY if set).
        timeout_s: per-request timeout in s.
        temperature: sent with each request (None = not sent).
        continuous_usage: ask for usage in every chunk (stream_options.continuous_usage_stats).
        output: JSON result path (None = not written).
        progress: show a progress bar.
        client_workers: client processes sharing the requests (round robin) and the concurrency cap, so that
            the client is not CPU-bound on fast servers; 1 = this process only.
    """

    base_url: str
    model: str | None = None
    endpoint: str = "chat"
    workload: str = "random:in=1024,out=128"
    num_prompts: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0
    slo: str | None = None
    ignore_eos: bool = False
    seed: int = 0
    energy: str = "auto"
    energy_devices: list[int] | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = 600.0
    temperature: float | None = 0.0
    continuous_usage: bool = True
    output: str | None = None
    progress: bool = True
    client_workers: int = 1

    def validate(self, need_model: bool = True) -> None:
        """Check every field; NaN is refused everywhere, infinity everywhere but `request_rate`.

        Raises:
            BenchError: naming the flag, for an out-of-range or non-finite value (a missing model only when
                `need_model`).
        """
        endpoint_url(self.base_url, self.endpoint)
        if need_model and not self.model:
            raise BenchError("--model is required (the model name the server serves)")
        # NaN fails every comparison, so each check below is written to reject it (`not x > 0`, math.isfinite)
        if not (self.request_rate > 0):
            raise BenchError(f"--request-rate must be > 0 (requests/s) or inf, got {self.request_rate}")
        if not (self.burstiness > 0) or not math.isfinite(self.burstiness):
            raise BenchError(f"--burstiness must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if not 1 <= self.client_workers <= 256:
            raise BenchError(f"--client-workers must be in [1, 256], got {self.client_workers}")
        if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
            raise BenchError(f"--timeout must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise BenchError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        parse_slo(self.slo)
        parse_workload(self.workload)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        d["api_key"] = "***" if self.api_key else None
        return d


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


def environment(tokenizer: BenchTokenizer | None, meter_desc: str) -> dict:
    """Where the client ran (the server's hardware is the user's to record in the run label)."""
    import httpx

    from parity import __version__

    return {"parity_version": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "httpx": httpx.__version__,
            "tokenizer": tokenizer.name if tokenizer else None, "energy_meter": meter_desc,
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _headers(cfg: BenchConfig) -> dict:
    key = cfg.api_key if cfg.api_key is not None else os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_requests(cfg: BenchConfig, requests: list[BenchRequest], tokenizer: BenchTokenizer,
                       meter=None, interrupt: asyncio.Event | None = None, transport=None, *,
                       offsets: list[float] | None = None, start_gate=None, on_done=None) -> dict:
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
    headers = _headers(cfg)
    slo = parse_slo(cfg.slo)
    host = httpx.URL(url).host
    local = host in ("127.0.0.1", "localhost", "::1")
    limit = cfg.max_concurrency or max(len(requests), 1)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 30.0))
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    payloads = [build_payload(cfg.endpoint, cfg.model, r, ignore_eos=cfg.ignore_eos, temperature=cfg.temperature,
                              continuous_usage=cfg.continuous_usage) for r in requests]

    async def one(clients, i, origin, sink, tag="bench"):
        client = clients[i % len(clients)]
        # the record exists from the moment the request is sent (after waiting for a concurrency slot), so a
        # request still queued at Ctrl-C counts as "not sent", one in flight as "interrupted"
        if sem is not None:
            await sem.acquire()
        try:
            rec = RequestRecord(index=requests[i].index, ok=False)
            sink.append(rec)
            await send_request(client, url, payloads[i], requests[i], rec, tokenizer, origin, chat, headers,
                               request_id=f"{tag}-{requests[i].index if tag == 'bench' else len(sink)}")
        finally:
            if sem is not None:
                sem.release()

    meters = as_meters(meter)
    result: dict = {"schema": RESULT_SCHEMA, "version": RESULT_VERSION, "config": cfg.to_dict(),
                    "environment": environment(tokenizer, describe_meters(meters)),
                    "notes": list(NOTES), "interrupted": False}
    # Several small connection pools instead of one big one: httpcore's pool scans every connection on each
    # request start/finish (cost ~ connections x in-flight requests), which made one 256-connection pool use
    # most of a core at 256 concurrent streams (measured with cProfile, benchmarks/bench_client_overhead.py).
    n_pools = 1 if transport is not None else max(1, min(128, math.ceil(limit / POOL_SIZE)))
    ssl_ctx = httpx.create_ssl_context(trust_env=not local) if httpx.URL(url).scheme == "https" else False
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=not local, transport=transport, verify=ssl_ctx))
            for _ in range(n_pools)]
        # --- warm-up
        warm = []
        if cfg.warmup:
            wreqs = [requests[i % len(requests)] for i in range(cfg.warmup)]
            origin = time.perf_counter()
            await asyncio.gather(*(one(clients, i % len(requests), origin, warm, "warmup")
                                   for i in range(len(wreqs))))
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
    result["clock"] = {"origin_perf_counter_s": origin, "end_perf_counter_s": end, "client_cpu_s": cpu_s,
                       "note": "send_s of each record is relative to this time.perf_counter() value "
                               "(CLOCK_MONOTONIC on Linux, comparable with other processes' on this machine)"}
    result["summary"] = summary
    add_energy(result, readings, summary)
    result["requests"] = [r.to_dict() for r in records]
    return result


def as_meters(meter) -> list:
    """None -> [], one meter -> [meter], a list -> the list."""
    if meter is None:
        return []
    return list(meter) if isinstance(meter, (list, tuple)) else [meter]


def describe_meters(meters: list) -> str:
    return "; ".join(m.describe() for m in meters) if meters else "none (not requested)"


def add_energy(result: dict, readings: list, summary: dict) -> None:
    """result["energy_meters"]: one section per meter; result["energy"]: the first (the accelerator's when
    there is one), kept for readers of a single figure."""
    sections = [energy_section(r, summary) for r in readings]
    result["energy_meters"] = sections
    result["energy"] = sections[0] if sections else energy_section(None, summary)


def stop_meter(meter):
    """Stop `meter` (None passes through). A meter failing mid-run must not cost the latency results: its
    error becomes the reading's reason (meter name kept, joules None)."""
    if meter is None:
        return None
    from parity.errors import DeviceError

    try:
        return meter.stop()
    except DeviceError as e:
        from parity.devices.energy import EnergyReading

        return EnergyReading(meter=meter.name, joules=None, seconds=0.0, avg_watts=None,
                             reason=f"meter failed during the run: {e}")


def energy_section(reading, summary: dict) -> dict:
    """Energy figures of a run, each labelled with its meter: J, average W, J per output token, output tokens per J."""
    if reading is None:
        return {"meter": "none", "reason": "not requested", "joules": None}
    d = reading.to_dict()
    tout = summary.get("total_output_tokens") or 0
    j = reading.joules
    d["joules_per_output_token"] = (j / tout) if (j is not None and tout) else None
    d["output_tokens_per_joule"] = (tout / j) if (j and tout) else None
    d["provenance"] = f"measured:{reading.meter}" if j is not None else None
    return d


def run_bench(cfg: BenchConfig, *, tokenizer: BenchTokenizer | None = None, requests: list[BenchRequest] | None = None,
              meter=None, transport=None) -> dict:
    """Synchronous entry point: build the workload, open the energy meter, run, write ``cfg.output``.

    Ctrl-C (SIGINT) stops the run: in-flight requests are cancelled and recorded as "interrupted", the partial
    result (``"interrupted": true``) is still summarised and written to ``cfg.output``.

    Args:
        tokenizer, requests, meter: pre-built pieces (tests); None = built from `cfg`.
        transport: httpx async transport replacing the network (see `run_requests`).
    Returns:
        The result dict (see `run_requests`).
    When ``cfg.model`` is empty it is set to the first model the server lists (GET /v1/models, with the API key).

    Raises:
        BenchError: bad configuration or dataset, no model given and none listed by a reachable server, all
            warm-up requests failing.
        DeviceError: an explicitly requested energy meter that cannot be read.
    """
    cfg.validate(need_model=False)
    notes: list[str] = []
    if not cfg.model:
        cfg.model = asyncio.run(fetch_default_model(cfg.base_url, _headers(cfg), cfg.timeout_s, transport))
        notes.append(f"--model not given: benchmarked {cfg.model!r}, the first model listed by the server's "
                     "GET /v1/models.")
    cfg.validate()
    tokenizer = tokenizer or load_bench_tokenizer(cfg.tokenizer)
    if requests is None:
        requests, wl_notes = build_requests(cfg.workload, tokenizer, cfg.num_prompts, cfg.seed)
        notes.extend(wl_notes)
    if meter is None and cfg.energy:
        from parity.devices.energy import open_meters

        meter = open_meters(cfg.energy, devices=cfg.energy_devices)
    if cfg.client_workers > 1 and transport is None:
        from parity.bench.workers import run_with_workers

        result = run_with_workers(cfg, requests, tokenizer, meter)
    else:
        result = asyncio.run(run_requests(cfg, requests, tokenizer, meter, transport=transport))
    result["notes"].extend(notes)
    if cfg.output:
        from parity.bench.result import save_result

        save_result(result, cfg.output)
    return result
