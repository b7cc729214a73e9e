"""Which forward path the engine steps with: eager, or the compiled decode step.

`prepare_step_path` decides (``enforce_eager``; else the ``PARITY_ENFORCE_EAGER`` environment variable;
else `parity.devices.compile_by_default`), attaches the whole-step graph (`parity.model.decode_graph`:
decode steps compiled per batch bucket, prefill and mixed steps eager), warms its buckets up once
(inductor keeps them in its on-disk cache, so a later start-up loads instead of compiling) and logs the
choice and the compile time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from parity import devices
from parity.errors import first_line
from parity.model.decode_graph import DecodeGraph, unsupported_reason

log = logging.getLogger("parity.engine")

#: Environment variable: "1" / "true" forces eager when the engine argument ``enforce_eager`` is None
#: (the test suite sets it so that no test pays for compilation unless it asks).
ENFORCE_EAGER_ENV = "PARITY_ENFORCE_EAGER"

#: Batch buckets compiled at start-up, up to the bucket of the engine's ``max_num_seqs`` (a batch runs the
#: smallest warm bucket that holds it; batches above every warm bucket run eager).
WARM_BUCKETS = (1, 2, 4, 8, 16)


#: What a wait for the compiled decode step is, in the words the CLIs print (measured on 2-core CPUs: 61-236 s per
#: batch bucket cold, 9-50 s for a process's buckets from the inductor cache; docs/benchmarks.md).
COMPILE_WAIT = "minutes on a few cold CPU cores, seconds from the inductor cache"


@dataclass(frozen=True)
class StepPath:
    """The engine's forward path. path: "compiled" or "eager"; backend / mode: the torch.compile backend
    and mode (None when eager); compile_s: wall seconds spent compiling and warming up before the engine
    started (0 when eager or when the buckets warm up in the background); background: the buckets compile
    in a background thread while decode steps of not-yet-warm buckets run eager; buckets: the decode
    batch buckets it compiles (`WARM_BUCKETS`; empty when eager)."""

    path: str
    device: str
    backend: str | None = None
    mode: str | None = None
    compile_s: float = 0.0
    background: bool = False
    buckets: tuple[int, ...] = ()


@dataclass
class _BackgroundWarmUp:
    """A warm-up running in a background thread: ``stop`` asks it to stop before its next bucket; ``bucket``
    is the batch bucket compiling now (None between buckets)."""

    stop: threading.Event
    thread: threading.Thread | None = None
    bucket: int | None = None


#: The background warm-ups still running (`start_background_warm_up`; each removes itself when it ends).
_BACKGROUND: list[_BackgroundWarmUp] = []
_BACKGROUND_LOCK = threading.Lock()


def start_background_warm_up(graph: DecodeGraph, buckets: tuple[int, ...], threads: int) -> threading.Thread:
    """Warm ``buckets`` up in a daemon thread named "parity-compile" (`_warm_up_buckets`), one that
    `stop_background_warm_ups` can stop between buckets. Returns the started thread."""
    job = _BackgroundWarmUp(threading.Event())

    def run() -> None:
        try:
            _warm_up_buckets(graph, buckets, threads, job)
        finally:
            with _BACKGROUND_LOCK:
                _BACKGROUND.remove(job)

    job.thread = threading.Thread(target=run, name="parity-compile", daemon=True)
    with _BACKGROUND_LOCK:
        _BACKGROUND.append(job)
    job.thread.start()
    return job.thread


def stop_background_warm_ups(wait_s: float = 0.2) -> list[int | None]:
    """Ask every background warm-up to stop before its next bucket and wait up to ``wait_s`` s for them to end.

    Returns:
        The batch buckets still compiling (None: between two), one per warm-up that has not ended (a
        bucket's compile cannot be interrupted; a process exiting now must skip interpreter teardown, which
        aborts while a thread is inside inductor's C++ code).
    """
    with _BACKGROUND_LOCK:
        jobs = list(_BACKGROUND)
    for job in jobs:
        job.stop.set()
    deadline = time.monotonic() + wait_s
    for job in jobs:
        job.thread.join(max(0.0, deadline - time.monotonic()))
    return [job.bucket for job in jobs if job.thread is not None and job.thread.is_alive()]


def wants_eager(enforce_eager: bool | None, device: torch.device) -> bool:
    """Resolve the ``enforce_eager`` engine argument (None = environment, then the device default)."""
    if enforce_eager is not None:
        return bool(enforce_eager)
    env = os.environ.get(ENFORCE_EAGER_ENV, "").strip().lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    return not devices.compile_by_default(device)


def prepare_step_path(
    model, device: torch.device, enforce_eager: bool | None, background: bool = False, max_batch: int | None = None
) -> StepPath:
    """Attach the compiled decode step to ``model`` unless eager is wanted (or the model has none: test
    doubles; or it has layers the graph does not know: quantized, sharded) and log the path.

    Args:
        background: warm the buckets up in a daemon thread (a server answers at once; each bucket serves
            compiled from the moment it is warm, eager before) instead of before returning.
        max_batch: the most sequences a decode step will hold (the engine's ``max_num_seqs``): buckets
            above the one that holds it are not compiled. None: every `WARM_BUCKETS` bucket.
    Returns:
        The `StepPath`. A compile that fails (e.g. no C++ compiler for inductor) is logged and leaves the
        engine eager, it never stops the engine.
    """
    if torch.device(device).type == "cpu" and hasattr(model, "new_state"):
        # parity's C++ CPU ops: built (first time on a machine) or loaded now rather than in the first
        # request, and the build named in the log (a failure is logged as a warning; torch's kernels serve)
        from parity.devices import native_kernels

        native_kernels.load()
        log.info("parity's C++ CPU ops: %s", native_kernels.status())
    if wants_eager(enforce_eager, device) or not hasattr(model, "new_state"):
        sp = StepPath("eager", str(device))
        log.info("engine step path: eager on %s", device)
        return sp
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("engine step path: eager on %s (the compiled decode step does not support it: %s)", device, reason)
        return StepPath("eager", str(device))
    graph = DecodeGraph(model, device)
    top = graph.bucket(max_batch) if max_batch else None
    buckets = tuple(b for b in WARM_BUCKETS if b in graph.buckets and (top is None or b <= top))
    graph.ready = set()  # served steps take warm buckets only: none compiles on first use mid-serving
    model.decode_graph = graph
    fn = devices.compiler(device)
    if background:
        # the engine's thread count: inductor specialises its kernels for it
        start_background_warm_up(graph, buckets, torch.get_num_threads())
        log.info(
            "engine step path: compiled decode step (%s) on %s; batch buckets %s compile in the background "
            "(decode steps run eager until their bucket is warm)",
            fn.backend_name,
            device,
            ", ".join(str(b) for b in buckets),
        )
        return StepPath("compiled", str(device), fn.backend_name, fn.mode, 0.0, background=True, buckets=buckets)
    log.info(
        "engine step path: compiling the decode step (%s) on %s for batch buckets %s before the first step (%s)",
        fn.backend_name,
        device,
        ", ".join(str(b) for b in buckets),
        COMPILE_WAIT,
    )
    times = _warm_up_buckets(graph, buckets, torch.get_num_threads())
    if not graph.ready:
        model.decode_graph = None
        log.warning("engine step path: eager on %s (compiling the decode step failed)", device)
        return StepPath("eager", str(device))
    seconds = sum(times.values())
    sp = StepPath("compiled", str(device), fn.backend_name, fn.mode, seconds, buckets=buckets)
    log.info(
        "engine step path: compiled decode step (%s%s) on %s; batch buckets %s compiled and warmed up in %.1f s (%s)",
        sp.backend,
        f", mode {sp.mode}" if sp.mode else "",
        device,
        ", ".join(str(b) for b in sorted(graph.ready)),
        seconds,
        ", ".join(f"batch {b}: {t:.1f} s" for b, t in times.items()),
    )
    return sp


def step_path_stats(sp: StepPath, model) -> dict:
    """On the compiled path: {"compiled_buckets_ready": buckets of ``sp.buckets`` warm and serving,
    "compiled_buckets_total": len(sp.buckets)} (what /metrics reports); {} when eager."""
    graph = getattr(model, "decode_graph", None) if sp.path == "compiled" else None
    if graph is None:
        return {}
    want = set(sp.buckets)
    return {
        "compiled_buckets_ready": len(want if graph.ready is None else want & graph.ready),
        "compiled_buckets_total": len(want),
    }


def _warm_up_buckets(
    graph: DecodeGraph, buckets: tuple[int, ...], threads: int, job: _BackgroundWarmUp | None = None
) -> dict[int, float]:
    """Warm ``buckets`` up one by one with ``threads`` torch threads (each joins ``graph.ready`` when warm),
    in the engine's grad mode (dynamo guards on it). A compiler failure (e.g. no C++ compiler for inductor) is
    logged and leaves that bucket and the later ones eager; it never stops the engine. A background ``job``
    records the bucket compiling and stops before the next bucket once ``job.stop`` is set (the later buckets
    stay eager).

    Returns:
        {bucket: wall seconds} of the buckets warmed.
    """
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    times = {}
    for b in buckets:
        if job is not None:
            if job.stop.is_set():
                log.info("compiled decode step: warm-up stopped before batch bucket %d (shutting down)", b)
                break
            job.bucket = b
        try:
            with torch.inference_mode():
                times[b] = graph.warm_up((b,))[b]
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not take the engine down
            log.warning(
                "compiled decode step: bucket %d failed to compile (%s); batches of that size and above stay eager",
                b,
                first_line(exc),
            )
            break
        log.info(
            "compiled decode step: batch bucket %d warm in %.1f s (%.1f s since start-up)",
            b,
            times[b],
            time.perf_counter() - t0,
        )
    if job is not None:
        job.bucket = None
    return times
