"""NVIDIA GPU energy through NVML's cumulative energy counter.

`nvmlDeviceGetTotalEnergyConsumption`: millijoules since the driver was loaded, Volta and newer (NVML API
reference, "Device Queries"). Needs the optional extra ``parity[nvidia]`` (package ``nvidia-ml-py``, module
``pynvml``), imported only when the meter is opened.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from parity.devices.energy.meter import DEFAULT_INTERVAL_S, EnergyMeter, EnergyReading, PeriodicSampler
from parity.errors import DeviceError


def _import_pynvml():
    try:
        import pynvml  # provided by nvidia-ml-py (optional extra `parity[nvidia]`)
    except ImportError:
        raise DeviceError("nvml: nvidia-ml-py is not installed (pip install 'parity[nvidia]')") from None
    return pynvml


class NvmlMeter(EnergyMeter):
    """NVIDIA GPU energy from NVML's total-energy counter (mJ since driver load; Volta or newer).

    Args:
        devices: GPU indices to meter (NVML order); None = every GPU NVML sees.
        nvml: an object with the pynvml functions (tests pass a fake); None imports `pynvml`.
        interval_s: seconds between counter reads recorded in the reading's timeline (for sub-interval energy);
            the total is the counter difference between start and stop either way.
    Raises:
        DeviceError: pynvml missing, NVML init failing (no driver), no GPU, or a GPU without an energy counter.
    """

    name = "nvml"

    def __init__(self, devices: list[int] | None = None, nvml: Any = None, interval_s: float = DEFAULT_INTERVAL_S):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self.nvml = nvml if nvml is not None else _import_pynvml()
        try:
            self.nvml.nvmlInit()
            count = int(self.nvml.nvmlDeviceGetCount())
        except DeviceError:
            raise
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise DeviceError(f"nvml: NVML could not be initialised ({e}); is an NVIDIA driver loaded?") from None
        if count == 0:
            raise DeviceError("nvml: NVML sees no GPU")
        idx = list(range(count)) if devices is None else list(devices)
        for i in idx:
            if not 0 <= i < count:
                raise DeviceError(f"nvml: GPU index {i} out of range; NVML sees {count} GPU(s)")
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
        self.names = []
        for i, h in zip(idx, self.handles, strict=True):
            try:
                n = self.nvml.nvmlDeviceGetName(h)
                n = n.decode() if isinstance(n, bytes) else str(n)
            except Exception:
                n = "NVIDIA GPU"
            self.names.append(f"gpu{i}: {n}")
        try:
            self._read()
        except Exception as e:
            raise DeviceError(f"nvml: total energy counter not readable ({e}); it needs a Volta or newer GPU") from None

    def _read(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]

    def _sample(self) -> list[int]:
        e = self._read()
        t = time.perf_counter()
        with self._lock:
            self._timeline.append((t, [(b - a) * 1e-3 for a, b in zip(self._e0, e, strict=True)]))
        return e

    def start(self) -> None:
        self._e0 = self._read()
        self._t0 = time.perf_counter()
        self._timeline = [(self._t0, [0.0] * len(self._e0))]
        self._sampler = PeriodicSampler(self._sample, self.interval_s)
        self._sampler.start()

    def stop(self) -> EnergyReading:
        self._sampler.stop()
        e1 = self._sample()
        dt = time.perf_counter() - self._t0
        # mJ -> J; the counter is 64-bit, no wrap in practice
        per = [(b - a) * 1e-3 for a, b in zip(self._e0, e1, strict=True)]
        j = sum(per)
        return EnergyReading(
            meter="nvml",
            joules=j,
            seconds=dt,
            avg_watts=j / dt if dt > 0 else None,
            devices=list(self.names),
            per_device_j=per,
            samples=len(self._timeline),
            timeline=list(self._timeline),
            method="NVML nvmlDeviceGetTotalEnergyConsumption counter (mJ), read at start and stop "
            f"and every {self.interval_s:g} s",
        )

    def describe(self) -> str:
        return f"nvml ({len(self.handles)} GPU(s))"
