"""Worker processes of a parallel engine: local spawn (torch.multiprocessing) or torchrun ranks.

`launch_local` starts ranks 1..N-1 as spawned processes (a free loopback port for the rendezvous), joins
as rank 0 and returns rank 0's `DistributedModel` plus a `WorkerGroup` that watches the workers. Under
torchrun (``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` set), `join_torchrun` joins the job instead: rank 0
gets the `DistributedModel`, every other rank runs `parity.engine.executor.run_worker` until stopped.
Workers ignore SIGINT: rank 0 owns shutdown (it sends "stop"; `WorkerGroup.stop` terminates stragglers).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.multiprocessing as mp

from parity import devices
from parity.distributed.config import DEFAULT_TIMEOUT_S, ParallelConfig
from parity.distributed.context import (
    env_rank,
    free_port,
    init_parallel,
    rank_device,
    shutdown_parallel,
)
from parity.engine.executor import DistributedModel, run_worker
from parity.errors import ParallelError

log = logging.getLogger("parity.worker")

#: Seconds between two liveness checks of the worker processes.
POLL_S = 0.2


@dataclass
class ModelSpec:
    """What every rank loads: `parity.engine.model_loading.load_model` arguments (picklable)."""

    model: str | None
    device_type: str
    dtype: object
    seed: int = 0
    quantization: str | None = None


def _load(spec: ModelSpec, ctx):
    from parity.engine.model_loading import load_model, resolve_dtype  # heavy import, rank-local

    dtype = resolve_dtype(spec.dtype, ctx.device)
    model, _ = load_model(spec.model, ctx.device, dtype, spec.seed, spec.quantization, parallel=ctx)
    return model


def _worker_main(
    rank: int, config: ParallelConfig, init_method: str, spec: ModelSpec, timeout_s: float, local_rank: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns Ctrl-C and the drain
    ctx = init_parallel(config, rank, rank_device(spec.device_type, local_rank), init_method, timeout_s)
    try:
        run_worker(_load(spec, ctx), ctx)
    finally:
        shutdown_parallel()


def _spawned(local_rank: int, config, init_method, spec, timeout_s) -> None:
    rank = local_rank + 1
    try:
        _worker_main(rank, config, init_method, spec, timeout_s, rank)
    except ParallelError as e:
        log.error("%s", e)
        raise SystemExit(3) from None


class WorkerGroup:
    """The spawned worker processes of rank 0 (ranks 1..N-1) and a watchdog thread.

    ``on_failure(message)`` is called once, from the watchdog thread, when a worker exits while the
    engine runs (the message names the rank and its exit code)."""

    def __init__(self, procs: list, on_failure: Callable[[str], None] | None = None):
        self.procs = procs
        self.on_failure = on_failure
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="parity-worker-watch", daemon=True)
        self._thread.start()

    def failed_rank(self) -> tuple[int, int] | None:
        """(rank, exit code) of the first worker that has exited, or None."""
        for i, p in enumerate(self.procs):
            if not p.is_alive():
                return i + 1, p.exitcode
        return None

    def wait_failed_rank(self, timeout_s: float = 1.0) -> str | None:
        """ "rank R exited with code C" for the first worker that has exited or exits within
        ``timeout_s`` (a collective can fail a moment before the dead process is reaped), else None."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.failed_rank()
            if dead is not None:
                return f"rank {dead[0]} exited with code {dead[1]}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S / 4)

    def _watch(self) -> None:
        while not self._stopping:
            dead = self.failed_rank()
            if dead is not None:
                if not self._stopping and self.on_failure is not None:
                    self.on_failure(f"rank {dead[0]} exited with code {dead[1]}")
                return
            time.sleep(POLL_S)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for the workers to exit (after "stop"), then terminate / kill them."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)


def launch_local(
    config: ParallelConfig, spec: ModelSpec, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[DistributedModel, WorkerGroup]:
    """Spawn ranks 1..N-1 on this machine, join as rank 0, load rank 0's part.

    Raises:
        ParallelError: a worker died during start-up (rank and exit code named) or the group did not form
            within ``timeout_s``; the workers are stopped first.
    """
    port = free_port()
    init_method = f"tcp://127.0.0.1:{port}"
    ctx_mp = mp.get_context("spawn")
    procs = []
    for local in range(config.world_size - 1):
        p = ctx_mp.Process(
            target=_spawned,
            args=(local, config, init_method, spec, timeout_s),
            name=f"parity-rank{local + 1}",
            daemon=True,
        )
        p.start()
        procs.append(p)
    group = WorkerGroup(procs)
    try:
        ctx = init_parallel(config, 0, rank_device(spec.device_type, 0), init_method, timeout_s)
        model = _load(spec, ctx)
    except BaseException:
        dead = group.failed_rank()
        group.stop(0.0)
        if dead is not None:
            raise ParallelError(f"rank {dead[0]} exited with code {dead[1]} during start-up") from None
        raise
    return DistributedModel(model, ctx), group


def join_torchrun(
    config: ParallelConfig, spec: ModelSpec, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistributedModel | None:
    """Join a torchrun job (``env://`` rendezvous): rank 0 returns its `DistributedModel`; other ranks
    serve steps until rank 0 stops them and return None.

    Raises:
        ParallelError: WORLD_SIZE differs from TP x DP, or the group did not form / a collective failed.
    """
    rank, local_rank, world = env_rank()
    if world != config.world_size:
        raise ParallelError(
            f"torchrun started {world} ranks (WORLD_SIZE) but {config.describe()} needs "
            f"{config.world_size}: set --nnodes x --nproc-per-node = TP x DP"
        )
    if rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = init_parallel(config, rank, rank_device(spec.device_type, local_rank), "env://", timeout_s)
    model = _load(spec, ctx)
    if rank == 0:
        return DistributedModel(model, ctx)
    try:
        run_worker(model, ctx)
    finally:
        shutdown_parallel()
    return None


def device_type(device: str) -> str:
    """The device type ranks use for a --device value ("auto" resolved here)."""
    return devices.resolve(device).type


__all__ = ["ModelSpec", "WorkerGroup", "launch_local", "join_torchrun", "device_type"]
