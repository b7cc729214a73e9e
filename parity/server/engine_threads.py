"""How many intra-op threads the engine of a server on the CPU computes with.

The server's event loop (HTTP, tokenization, SSE framing) shares the process and the cores with the model.
With one torch thread per core, every runnable front-end thread preempts an OpenMP worker and stalls
each of the ~5,000 per-step op barriers behind it, so a CPU server keeps one core for its front end
(measured in docs/benchmarks.md, "Served: parity serve vs llama-server"; vLLM's CPU worker has the same
knob, ``VLLM_CPU_NUM_OF_RESERVED_CPU`` in vllm/v1/worker/cpu_worker.py). ``OMP_NUM_THREADS`` (or
``MKL_NUM_THREADS``) set by the user wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

#: Cores kept for the server's front end (event loop, tokenizer, SSE) when the engine runs on the CPU.
RESERVED_FRONT_END_CORES = 1
#: Environment variables that fix the thread count explicitly (then nothing is changed).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def serving_threads(device: torch.device | str, env: dict | None = None) -> int | None:
    """Intra-op threads for the engine thread of a server on ``device``.

    Args:
        device: the engine's device; env: the environment (default os.environ).
    Returns:
        torch's thread count less RESERVED_FRONT_END_CORES (at least 1) on the CPU; None (leave torch's
        setting) on other devices, with one thread already, or when a THREAD_ENV variable is set.
    """
    env = os.environ if env is None else env
    if torch.device(device).type != "cpu" or any(env.get(k) for k in THREAD_ENV):
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    return max(1, n - RESERVED_FRONT_END_CORES)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (None: unchanged) inside the block, restored after: set
    before the model is built, so the engine thread and any compiled kernels (inductor fixes their OpenMP
    thread count when it generates them) run with ``n``."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
