"""`parity serve --tensor-parallel-size N [--data-parallel-size D] [--enable-expert-parallel]`: the engine
over several ranks, and what happens when one fails.

Rank 0 (this process) runs the scheduler and the HTTP server; the other ranks are spawned here or, under
torchrun, started by it. A rank that dies, or a collective that fails or times out
(``--distributed-timeout``), fails the in-flight requests with the error, makes new requests and
``/health`` answer 503 and, after `FAILURE_GRACE_S`, ends the server with exit code `FAILURE_EXIT_CODE`
naming the rank; the remaining workers are terminated first (no orphans).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading

from parity.config import load_config
from parity.distributed.config import DEFAULT_TIMEOUT_S, ParallelConfig
from parity.errors import ParallelError

#: Seconds between a rank failure and the exit (the failed requests' answers go out meanwhile).
FAILURE_GRACE_S = 2.0
#: Exit status of `parity serve` after a rank failure.
FAILURE_EXIT_CODE = 3


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size, --data-parallel-size, --enable-expert-parallel, --distributed-timeout."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="TP ranks per model replica")
    g.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="attention data-parallel replicas (EP size = TP x DP with --enable-expert-parallel)",
    )
    g.add_argument(
        "--enable-expert-parallel", action="store_true", help="partition the routed experts over all TP x DP ranks"
    )
    g.add_argument(
        "--distributed-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the other ranks at start-up and in a step (default {DEFAULT_TIMEOUT_S:.0f})",
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The `ParallelConfig` of the parsed flags (single-process when absent).

    Raises:
        ParallelError: a size below 1, or a --distributed-timeout that is not a positive number of seconds.
    """
    timeout_s = getattr(args, "distributed_timeout", DEFAULT_TIMEOUT_S)
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ParallelError(f"--distributed-timeout must be a positive number of seconds, got {timeout_s!r}")
    return ParallelConfig(
        getattr(args, "tensor_parallel_size", 1),
        getattr(args, "data_parallel_size", 1),
        bool(getattr(args, "enable_expert_parallel", False)),
    )


class ParallelServing:
    """Rank 0's parallel model, its workers and the failure path. ``engine`` is set by the caller once
    the AsyncEngine exists; ``exit(code)`` ends the process (default ``os._exit``)."""

    def __init__(self, model, workers, exit=os._exit):
        self.model, self.workers, self._exit = model, workers, exit
        self._engine = None
        self._failed = threading.Event()
        model.on_failure = self.fail
        if workers is not None:
            workers.on_failure = self.fail
            model.failure_cause = workers.wait_failed_rank

    @property
    def engine(self):
        """The AsyncEngine over ``model`` (set by the caller); one set after a failure is marked failed."""
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        self._engine = engine
        if engine is not None and self._failed.is_set():
            self._mark(engine)

    def _mark(self, engine) -> None:
        if hasattr(engine, "mark_failed"):
            engine.mark_failed(self.model.failed)  # /health 503 and new requests refused from now on
        else:
            engine.stop_accepting()

    def fail(self, message: str) -> None:
        """A rank failed: refuse new requests, fail in-flight ones, exit non-zero after a grace period."""
        if self._failed.is_set():
            return
        if self.model.failed is None:
            self.model.failed = ParallelError(message)
        self._failed.set()
        if self._engine is not None:
            self._mark(self._engine)
        print(f"parity serve: {message}; failing in-flight requests and exiting", file=sys.stderr, flush=True)

        def _exit():
            if self.workers is not None:
                self.workers.stop(0.0)
            self._exit(FAILURE_EXIT_CODE)

        threading.Timer(FAILURE_GRACE_S, _exit).start()

    def close(self) -> None:
        """Normal shutdown: stop the workers."""
        self.model.close()
        if self.workers is not None:
            self.workers.stop()


def check_layout(config: ParallelConfig, model: str | None) -> None:
    """Check ``config`` against the model's config (read torch-free) before any rank is started.

    Args:
        config: the layout. model: checkpoint directory or preset name (None: the default miniature,
            exported here on first use, as `parity.engine.model_loading.load_model` does, so that every
            rank finds it).
    Raises:
        ParallelError: the layout does not divide the model (`ParallelConfig.validate`, the field named).
        ConfigError: no model config under that name.
    """
    if model is None:
        from parity.checkpoint.default_model import ensure_default_model

        model = str(ensure_default_model())
    config.validate(load_config(model))


def start_parallel(args: argparse.Namespace, config: ParallelConfig) -> ParallelServing | None:
    """Start (or, under torchrun, join) the ranks. Returns None on a torchrun worker rank once rank 0 has
    stopped it.

    Raises:
        ParallelError: bad layout for the model, a rank that failed to start, a group that did not form.
    """
    from parity.distributed.context import env_rank
    from parity.engine.worker import ModelSpec, device_type, join_torchrun, launch_local

    if getattr(args, "quantize_lm_head", False):
        raise ParallelError("--quantize-lm-head runs on one device only: the vocab-parallel LM head stays float")
    spec = ModelSpec(args.model, device_type(args.device), args.dtype, args.seed, getattr(args, "quantization", None))
    check_layout(config, spec.model)
    if env_rank() is not None:
        model = join_torchrun(config, spec, args.distributed_timeout)
        return None if model is None else ParallelServing(model, None)
    model, workers = launch_local(config, spec, args.distributed_timeout)
    return ParallelServing(model, workers)
