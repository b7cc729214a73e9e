"""TP=1 vs TP=2 step time on CPU (gloo): the cost of the collectives, not a speed-up.

Usage: PYTHONPATH=$PWD .venv/bin/python benchmarks/parallel_step.py [--preset tiny] [--batch 4] [--steps 20]
Prints the median decode-step and prefill-step times (ms) of one process and of 2 TP ranks (rank 0's clock).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp

from parity.config import load_preset
from parity.distributed import ParallelConfig
from parity.distributed.context import free_port, init_parallel, shutdown_parallel
from parity.model.build import build_model


def measure(model, batch: int, prompt: int, steps: int) -> tuple[float, float]:
    """(median decode step ms, prefill step ms) for ``batch`` sequences of ``prompt`` tokens."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, model.config.vocab_size, (prompt,), generator=g) for _ in range(batch)]
    warm = model.new_state()
    model.forward_incremental([ids[0][:8]], [warm])  # first collectives set up gloo's connections
    warm.free()
    states = [model.new_state() for _ in range(batch)]
    t0 = time.perf_counter()
    logits = model.forward_incremental(ids, states)
    prefill = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model.forward_incremental([[int(t)] for t in logits.argmax(-1)], states)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), prefill


def _rank(rank, port, preset, batch, prompt, steps, box):
    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(2), rank, "cpu", f"tcp://127.0.0.1:{port}", 120)
    model = build_model(load_preset(preset), seed=0, parallel=ctx)
    res = measure(model, batch, prompt, steps)
    if rank == 0:
        box.put(res)
    shutdown_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    one = measure(build_model(load_preset(a.preset), seed=0), a.batch, a.prompt, a.steps)
    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(free_port(), a.preset, a.batch, a.prompt, a.steps, q), nprocs=2)
    two = q.get()
    print(f"preset {a.preset}, batch {a.batch}, prompt {a.prompt} tokens, 1 thread per rank")
    print(f"TP=1  decode step {one[0]:8.2f} ms   prefill step {one[1]:8.1f} ms")
    print(f"TP=2  decode step {two[0]:8.2f} ms   prefill step {two[1]:8.1f} ms")


if __name__ == "__main__":
    main()
