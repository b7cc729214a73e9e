"""How much memory a model's weights need, and a check that refuses to build one that cannot fit.

`check_fits` is called before anything is allocated (`parity.model.build.build_model` and the
readers and writer of `parity.checkpoint`) and raises a `DeviceError` naming the model, the estimate,
the dtype, the device and its free memory.

The estimate (`estimate_weight_bytes`, per weight format) lives in the torch-free `parity.weight_bytes`.

Set ``PARITY_SKIP_MEMORY_CHECK=1`` to skip the check (swap, memory overcommit, unified memory).
"""

from __future__ import annotations

import os

from parity.config import ModelConfig
from parity.errors import DeviceError
from parity.weight_bytes import (  # noqa: F401 - re-exported
    FP4_BLOCK,
    WEIGHT_FORMATS,
    device_fit,
    dtype_itemsize,
    estimate_weight_bytes,
)

_GIB = 1024**3

#: Environment variable that disables `check_fits` ("1", "true", "yes").
SKIP_ENV = "PARITY_SKIP_MEMORY_CHECK"
#: Default safety margin of `check_fits`: fraction of the weight estimate kept free for activations,
#: caches and allocator slack.
DEFAULT_HEADROOM = 0.10


def _label(cfg: ModelConfig) -> str:
    src = cfg.source or "this model"
    return src.removeprefix("preset:")


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def skip_requested() -> bool:
    """True when ``PARITY_SKIP_MEMORY_CHECK`` is set to 1/true/yes."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_fits(
    cfg: ModelConfig,
    device,
    dtype="float32",
    quantized: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    *,
    include_mtp: bool = True,
    extra_bytes: int = 0,
    what: str = "",
    weights: str | None = None,
    parallel=None,
) -> int:
    """Refuse to build a model whose weights cannot fit in the device's free memory.

    Args:
        cfg: the architecture. device: a torch.device or a name ("cpu", "cuda:0"; resolved already).
        dtype / quantized / include_mtp / weights: as `estimate_weight_bytes`.
        headroom: extra fraction of the estimate that must be free too (activations, caches, slack).
        extra_bytes: further bytes the caller needs at the same time (the exporter's quantized copy).
        what: what is being done, for the message (default "building the model").
        parallel: a `parity.distributed.ParallelConfig`: check one rank's part (None = the whole model).
    Returns:
        The bytes required (estimate * (1 + headroom) + extra_bytes).
    Raises:
        DeviceError: the requirement exceeds the free memory `parity.devices.memory_info` reports, with
            "<model> needs ~X GiB in <dtype> on <device>, this device has Y GiB free" and the ways out.
            Skipped when ``PARITY_SKIP_MEMORY_CHECK=1`` or when the device reports no memory figures.
    """
    tp, ep = (parallel.tp, parallel.ep) if parallel is not None else (1, 1)
    estimate = estimate_weight_bytes(cfg, dtype, quantized, include_mtp, weights, tp=tp, ep=ep)
    need = int(estimate * (1.0 + max(0.0, headroom)))
    need += extra_bytes
    if skip_requested():
        return need
    from parity import devices

    free, total = devices.memory_info(device)
    if total <= 0 or need <= free:  # no figures on this backend: nothing to compare with
        return need
    dt = str(dtype).removeprefix("torch.")
    form = f" ({weights} weights)" if weights else " (FP8/FP4 weights kept quantized)" if quantized else ""
    if parallel is not None:
        form += f" per device with {parallel.describe()}"
    raise DeviceError(
        f"{_label(cfg)} needs ~{_gib(need)} in {dt}{form} on {device}"
        f"{' for ' + what if what else ''}, this device has {_gib(free)} free (of {_gib(total)}); use a "
        f"smaller model (e.g. the 'tiny' preset), a smaller dtype, the quantized published checkpoint or a "
        f"device with more memory, or set {SKIP_ENV}=1 to try anyway (swap, overcommit)"
    )
