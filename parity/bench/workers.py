"""Several client processes for one benchmark (``parity bench --client-workers N``).

A Python asyncio + httpx client spends about 0.1 ms of CPU per received SSE event (measured by
benchmarks/bench_client_overhead.py, see docs/benchmarks.md), so one process tops out near 10k streamed tokens/s.
Faster servers need more client cores: the workload is split round robin over N spawned processes, each with its
own event loop and connection pools, and ``--max-concurrency C`` is split as evenly as possible (worker w gets
C // N, plus one for the first C % N workers).

All workers start the measured run at one absolute ``time.perf_counter()`` instant (CLOCK_MONOTONIC, shared by
the processes of one Linux machine) chosen by the parent once every worker has finished its warm-up, and send at
the globally computed arrival offsets, so the arrival process is the same as with one process. The parent merges
the per-request records and computes the summary; the energy meter runs in the parent.
Ctrl-C reaches every process of the group: workers return their partial records, the parent saves them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import select
import selectors
import subprocess
import sys
import time

from parity.bench.loadgen import arrival_offsets, run_requests
from parity.bench.metering import add_energy, as_meters, describe_meters, stop_meter
from parity.bench.metrics import RequestRecord, parse_slo, summarize
from parity.bench.result_schema import NOTES, RESULT_SCHEMA, RESULT_VERSION, environment
from parity.bench.run_config import BenchConfig
from parity.bench.tokenizer import load_bench_tokenizer
from parity.bench.workloads import BenchRequest
from parity.errors import BenchError

#: Seconds between "all workers ready" and the common start, so that every worker sees the start message first.
START_MARGIN_S = 0.2
#: Seconds a worker may take to start (spawn, imports, tokenizer) and finish its warm-up.
READY_TIMEOUT_S = 300.0


def _split(total: int | None, n: int) -> list[int | None]:
    if total is None:
        return [None] * n
    return [total // n + (1 if w < total % n else 0) for w in range(n)]


def _send(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main() -> int:
    """Worker process (``python -m parity.bench.workers``): reads its job as one JSON line on stdin, reports
    ``{"ready": warmup}``, waits for ``{"go": origin}`` (or ``{"stop": true}``) on stdin, runs, prints
    ``{"tick": 1}`` per finished request and finally ``{"result": ...}`` or ``{"error": message}``."""
    job = json.loads(sys.stdin.readline())
    try:
        cfg = BenchConfig(**job["config"])
        tok = load_bench_tokenizer(cfg.tokenizer)
    except BenchError as e:
        _send({"error": str(e)})
        return 1
    reqs = [BenchRequest(**d) for d in job["requests"]]

    async def gate(warm: dict) -> float:
        _send({"ready": warm})
        while not select.select([sys.stdin], [], [], 0)[0]:
            await asyncio.sleep(0.002)
        msg = json.loads(sys.stdin.readline() or '{"stop": true}')
        if "go" not in msg:
            raise SystemExit(0)
        return float(msg["go"])

    try:
        res = asyncio.run(
            run_requests(
                cfg, reqs, tok, None, offsets=job["offsets"], start_gate=gate, on_done=lambda: _send({"tick": 1})
            )
        )
    except BenchError as e:
        _send({"error": str(e)})
        return 1
    except KeyboardInterrupt:
        return 130
    _send(
        {
            "result": {
                "requests": res["requests"],
                "interrupted": res["interrupted"],
                "end": res["clock"]["end_perf_counter_s"],
                "cpu_s": res["clock"]["client_cpu_s"],
                "warmup": res["warmup"],
            }
        }
    )
    return 0


class _Worker:
    """Parent-side handle of one worker process: non-blocking line reader over its stdout."""

    def __init__(self, w: int, job: dict):
        self.w = w
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parity.bench.workers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.buf = b""
        self.eof = False
        self.write(job)

    def write(self, obj) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def messages(self) -> list[dict]:
        """Complete messages available now (call when the fd is readable)."""
        data = os.read(self.fileno(), 1 << 20)
        if not data:
            self.eof = True
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]


def run_with_workers(cfg, requests, tokenizer, meter) -> dict:
    """Run `requests` over ``cfg.client_workers`` processes; same result layout as `loadgen.run_requests`.

    Raises:
        BenchError: a worker failed to start or its warm-up failed entirely.
        KeyboardInterrupt: Ctrl-C before the measured run started.
    """
    meters = as_meters(meter)

    n = min(cfg.client_workers, max(len(requests), 1))
    if requests and requests[0].arrival_s is not None:
        offsets = [r.arrival_s for r in requests]
    else:
        offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    concs, warms = _split(cfg.max_concurrency, n), _split(cfg.warmup, n)
    workers = []
    for w in range(n):
        idx = list(range(w, len(requests), n))
        wcfg = dataclasses.replace(
            cfg, max_concurrency=concs[w], warmup=warms[w], progress=False, output=None, client_workers=1, energy="none"
        )
        job = {
            "config": dataclasses.asdict(wcfg),
            "requests": [dataclasses.asdict(requests[i]) for i in idx],
            "offsets": [offsets[i] for i in idx],
        }
        if job["config"]["request_rate"] == math.inf:
            job["config"]["request_rate"] = 1e308  # JSON has no inf; offsets are explicit anyway
        workers.append(_Worker(w, job))

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=f"requests ({n} workers)", unit="req", file=sys.stderr, dynamic_ncols=True)
    sel = selectors.DefaultSelector()
    for wk in workers:
        sel.register(wk, selectors.EVENT_READ)
    results: dict[int, dict] = {}
    warm_stats: dict[int, dict] = {}
    errors: list[str] = []
    interrupted = False
    origin = None

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            wk = key.fileobj
            for msg in wk.messages():
                if "tick" in msg:
                    if bar is not None:
                        bar.update(1)
                elif "ready" in msg:
                    warm_stats[wk.w] = msg["ready"]
                elif "result" in msg:
                    results[wk.w] = msg["result"]
                elif "error" in msg:
                    errors.append(f"client worker {wk.w}: {msg['error']}")
            if wk.eof:
                sel.unregister(wk)
                if wk.w not in results and not any(e.startswith(f"client worker {wk.w}:") for e in errors):
                    errors.append(f"client worker {wk.w} exited without a result (exit code {wk.proc.wait()})")

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(warm_stats) < n:
            if errors:
                raise BenchError(errors[0])
            if time.monotonic() > deadline:
                raise BenchError(f"client workers did not become ready within {READY_TIMEOUT_S:g} s")
            pump(0.5)
        for m in meters:
            m.start()
        origin = time.perf_counter() + START_MARGIN_S
        for wk in workers:
            wk.write({"go": origin})
        while sel.get_map():
            try:
                pump(0.5)
            except KeyboardInterrupt:
                interrupted = True  # the workers got the same SIGINT and send their partial results
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for wk in workers:
            if origin is None:
                wk.write({"stop": True})
            try:
                wk.proc.stdin.close()
            except OSError:
                pass
        for wk in workers:
            try:
                wk.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                wk.proc.kill()
        sel.close()
        if bar is not None:
            bar.close()
    readings = [stop_meter(m) for m in meters] if origin is not None else []
    if origin is None:
        raise KeyboardInterrupt
    # every worker measured send_s from the same broadcast origin
    records = [RequestRecord.from_dict(r) for res in results.values() for r in res["requests"]]
    records.sort(key=lambda r: r.index)
    end = max((res["end"] for res in results.values()), default=time.perf_counter())
    interrupted = interrupted or any(res["interrupted"] for res in results.values())
    summary = summarize(records, end - origin, parse_slo(cfg.slo))
    summary["not_sent"] = len(requests) - len(records)
    notes = (
        list(NOTES)
        + [
            f"{n} client worker processes (--client-workers); requests dealt round robin; "
            f"--max-concurrency split as {concs}"
        ]
        + errors
    )
    result = {
        "schema": RESULT_SCHEMA,
        "version": RESULT_VERSION,
        "config": cfg.to_dict(),
        "environment": environment(tokenizer, describe_meters(meters)),
        "notes": notes,
        "interrupted": interrupted,
        "warmup": {"requests": cfg.warmup, "failed": sum(w["failed"] for w in warm_stats.values())},
        "clock": {
            "origin_perf_counter_s": origin,
            "end_perf_counter_s": end,
            "client_cpu_s": sum(res["cpu_s"] for res in results.values()),
            "note": "send_s of each record is relative to this time.perf_counter() value (all workers)",
        },
        "summary": summary,
        "requests": [r.to_dict() for r in records],
    }
    add_energy(result, readings, summary)
    return result


if __name__ == "__main__":  # pragma: no cover - run as a worker process
    sys.exit(worker_main())
