"""Run one benchmark: build the workload, open the energy meters, run in this process (`parity.bench.loadgen`)
or over client worker processes (`parity.bench.workers`), write the result."""

from __future__ import annotations

import asyncio

from parity.bench.client import fetch_default_model
from parity.bench.loadgen import run_requests
from parity.bench.result import save_result
from parity.bench.run_config import BenchConfig
from parity.bench.tokenizer import BenchTokenizer, load_bench_tokenizer
from parity.bench.workers import run_with_workers
from parity.bench.workloads import BenchRequest, build_requests
from parity.devices.energy import open_meters


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
        cfg.model = asyncio.run(fetch_default_model(cfg.base_url, cfg.auth_headers(), cfg.timeout_s, transport))
        notes.append(f"--model not given: benchmarked {cfg.model!r}, the first model listed by the server's "
                     "GET /v1/models.")
    cfg.validate()
    tokenizer = tokenizer or load_bench_tokenizer(cfg.tokenizer)
    if requests is None:
        requests, wl_notes = build_requests(cfg.workload, tokenizer, cfg.num_prompts, cfg.seed)
        notes.extend(wl_notes)
    if meter is None and cfg.energy:
        meter = open_meters(cfg.energy, devices=cfg.energy_devices)
    if cfg.client_workers > 1 and transport is None:
        result = run_with_workers(cfg, requests, tokenizer, meter)
    else:
        result = asyncio.run(run_requests(cfg, requests, tokenizer, meter, transport=transport))
    result["notes"].extend(notes)
    if cfg.output:
        save_result(result, cfg.output)
    return result
