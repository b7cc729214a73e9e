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
from dataclasses import dataclass

import torch

from parity import devices
from parity.model.decode_graph import DecodeGraph, unsupported_reason

log = logging.getLogger("parity.engine")

#: Environment variable: "1" / "true" forces eager when the engine argument ``enforce_eager`` is None
#: (the test suite sets it so that no test pays for compilation unless it asks).
ENFORCE_EAGER_ENV = "PARITY_ENFORCE_EAGER"

#: Batch buckets compiled at start-up (larger buckets of `DecodeGraph` compile on first use).
WARM_BUCKETS = (1, 2, 4, 8)


@dataclass(frozen=True)
class StepPath:
    """The engine's forward path. path: "compiled" or "eager"; backend / mode: the torch.compile backend
    and mode (None when eager); compile_s: wall seconds spent compiling and warming up (0 when eager)."""

    path: str
    device: str
    backend: str | None = None
    mode: str | None = None
    compile_s: float = 0.0


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


def prepare_step_path(model, device: torch.device, enforce_eager: bool | None) -> StepPath:
    """Attach the compiled decode step to ``model`` unless eager is wanted (or the model has none: test
    doubles; or it has layers the graph does not know: quantized, sharded) and log the path.
    Returns the `StepPath`."""
    if wants_eager(enforce_eager, device) or not hasattr(model, "new_state"):
        sp = StepPath("eager", str(device))
        log.info("engine step path: eager on %s", device)
        return sp
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("engine step path: eager on %s (the compiled decode step does not support it: %s)", device, reason)
        return StepPath("eager", str(device))
    graph = DecodeGraph(model, device)
    model.decode_graph = graph
    times = graph.warm_up(tuple(b for b in WARM_BUCKETS if b in graph.buckets))
    seconds = sum(times.values())
    fn = devices.compiler(device)
    sp = StepPath("compiled", str(device), fn.backend_name, fn.mode, seconds)
    log.info(
        "engine step path: compiled decode step (%s%s) on %s; batch buckets %s compiled and warmed up in %.1f s (%s)",
        sp.backend,
        f", mode {sp.mode}" if sp.mode else "",
        device,
        ", ".join(str(b) for b in graph.buckets),
        seconds,
        ", ".join(f"batch {b}: {t:.1f} s" for b, t in times.items()),
    )
    return sp
