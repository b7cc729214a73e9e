"""Run one benchmark: ask the server what it is, build the workload, open the energy meters (and read their idle
baseline), run in this process (`parity.bench.loadgen`) or over client worker processes (`parity.bench.workers`),
add the metadata, the steady-state window and its energy, write the result."""

from __future__ import annotations

import asyncio
import sys

from parity.bench.client import fetch_default_model
from parity.bench.loadgen import run_requests
from parity.bench.metadata import build_metadata, probe_server
from parity.bench.metering import as_meters, measure_idle, steady_state_energy
from parity.bench.metrics import RequestRecord
from parity.bench.result import save_result
from parity.bench.run_config import BenchConfig
from parity.bench.shared_workloads import build_workload
from parity.bench.steady_state import steady_state
from parity.bench.tokenizer import BenchTokenizer, load_bench_tokenizer
from parity.bench.workers import run_with_workers
from parity.bench.workloads import BenchRequest
from parity.devices.energy import open_meters
from parity.plan.served_model import served_model_mismatch


def run_bench(
    cfg: BenchConfig,
    *,
    tokenizer: BenchTokenizer | None = None,
    requests: list[BenchRequest] | None = None,
    meter=None,
    transport=None,
    probe: bool = True,
    idle: list | None = None,
) -> dict:
    """Synchronous entry point: build the workload, open the energy meter, run, write ``cfg.output``.

    Ctrl-C (SIGINT) stops the run: in-flight requests are cancelled and recorded as "interrupted", the partial
    result (``"interrupted": true``) is still summarised and written to ``cfg.output``.

    Args:
        tokenizer, requests, meter: pre-built pieces (tests); None = built from `cfg`.
        transport: httpx async transport replacing the network (see `run_requests`).
        idle: idle baseline per meter already measured (`parity.bench.metering.measure_idle`; a sweep reads it
            once); None = measured here for ``cfg.idle_baseline_s`` s.
        probe: ask the server for its model list, `server` header and version before the run (metadata).
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
        notes.append(
            f"--model not given: benchmarked {cfg.model!r}, the first model listed by the server's GET /v1/models."
        )
    cfg.validate()
    notes.extend(plan_model_warnings(cfg))
    tokenizer = tokenizer or load_bench_tokenizer(cfg.tokenizer)
    if requests is None:
        requests, wl_notes = build_workload(cfg.workload, tokenizer, cfg.num_prompts, cfg.seed)
        notes.extend(wl_notes)
    server = asyncio.run(probe_server(cfg.base_url, cfg.auth_headers(), cfg.timeout_s, transport)) if probe else None
    if meter is None and cfg.energy:
        meter = open_meters(cfg.energy, devices=cfg.energy_devices)
    meters = as_meters(meter)
    if idle is None:
        idle = measure_idle(meters, cfg.idle_baseline_s) if cfg.idle_baseline_s > 0 else [None] * len(meters)
    if cfg.client_workers > 1 and transport is None:
        result = run_with_workers(cfg, requests, tokenizer, meter)
    else:
        result = asyncio.run(run_requests(cfg, requests, tokenizer, meter, transport=transport))
    result["notes"].extend(notes)
    add_v2_sections(result, cfg, server, meters, idle)
    if cfg.output:
        save_result(result, cfg.output)
    return result


def plan_model_warnings(cfg: BenchConfig) -> list[str]:
    """Warnings (also printed to stderr) when the served ``cfg.model`` is not, or may not be, the planner preset
    ``cfg.plan_model`` (`parity.plan.served_model.served_model_mismatch`): `parity validate --measured` and
    `parity plan --calibrate` refuse a result whose served model is another model."""
    mismatch = served_model_mismatch(cfg.model, cfg.plan_model)
    if mismatch is None:
        return []
    kind, why = mismatch
    tail = "; parity validate --measured and --calibrate will refuse this result" if kind == "error" else ""
    note = f"warning: {why}{tail}"
    print(note, file=sys.stderr)
    return [note]


def add_v2_sections(result: dict, cfg: BenchConfig, server: dict | None, meters: list, idle: list) -> None:
    """result["metadata"], result["steady_state"] and, per energy section, its "steady_state" energy."""
    result["metadata"] = build_metadata(cfg, server)
    n_dev = result["metadata"]["num_devices"]
    records = [RequestRecord.from_dict(r) for r in result["requests"]]
    ss = steady_state(records, cfg.max_concurrency, n_dev)
    result["steady_state"] = ss
    origin = result["clock"]["origin_perf_counter_s"]
    t0 = origin + ss["start_s"] if ss["duration_s"] else None
    t1 = origin + ss["end_s"] if ss["duration_s"] else None
    sections = result.get("energy_meters") or []
    for m, base, sec in zip(meters, idle, sections, strict=False):
        reading = getattr(m, "last_reading", None)
        if reading is not None and reading.meter == sec.get("meter"):
            sec["steady_state"] = steady_state_energy(
                reading, base, t0, t1, ss.get("output_tokens"), result["summary"]["total_output_tokens"]
            )
            if base:
                sec["idle_baseline"] = base
