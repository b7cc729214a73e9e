"""The energy-meter interface (`EnergyMeter.start()` then `stop() -> EnergyReading`), the "none" meter, and the
background sampler and trapezoid integration shared by sampled meters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

#: Default sampling interval in seconds for sampled meters (npu-smi power, RAPL wrap detection).
#: A design choice: each npu-smi call is a process start, so sampling much faster would cost CPU on the
#: machine under test; a RAPL package counter (wrapping at max_energy_range_uj, typically about 262 kJ,
#: i.e. minutes at package power) cannot wrap twice within 0.5 s.
DEFAULT_INTERVAL_S = 0.5


@dataclass
class EnergyReading:
    """Result of one metered interval.

    Attributes:
        meter: "nvml" | "npu-smi" | "rapl" | "none".
        joules: energy over the interval in J, summed over `devices` (None for meter "none").
        seconds: wall-clock length of the interval in s.
        avg_watts: joules / seconds in W (None for "none" or a zero-length interval).
        devices: what was metered, e.g. ["gpu0: NVIDIA H200", "gpu1: NVIDIA H200"] or ["package-0"].
        method: how joules were obtained ("hardware energy counter", "power samples integrated ...").
        samples: number of reads taken.
        reason: for meter "none", one line saying why nothing could be read.
        per_device_j: joules per device, same order as `devices`.
    """

    meter: str
    joules: float | None
    seconds: float
    avg_watts: float | None
    devices: list[str] = field(default_factory=list)
    method: str = ""
    samples: int = 0
    reason: str | None = None
    per_device_j: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class EnergyMeter:
    """Base class: `start()` begins an interval, `stop()` ends it and returns an `EnergyReading`."""

    name = "base"

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> EnergyReading:  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self) -> str:
        """One line: meter name and what it reads."""
        return self.name


class NoneMeter(EnergyMeter):
    """No meter available. `stop()` returns a reading with `joules=None` and the `reason`."""

    name = "none"

    def __init__(self, reason: str):
        self.reason = reason
        self._t0 = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> EnergyReading:
        dt = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return EnergyReading(meter="none", joules=None, seconds=dt, avg_watts=None, reason=self.reason)

    def describe(self) -> str:
        return f"none ({self.reason})"


class PeriodicSampler:
    """Background thread calling `fn()` every `interval_s` until stopped. Exceptions end the thread and are
    kept in `.error` (re-raised as DeviceError by the owning meter)."""

    def __init__(self, fn: Callable[[], None], interval_s: float):
        self.fn, self.interval_s = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="parity-energy", daemon=True)
        self.error: BaseException | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except BaseException as e:  # noqa: BLE001 - reported by the meter
                self.error = e
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def integrate_trapezoid(times_s: list[float], watts: list[float]) -> float:
    """Energy in J from power samples (W) at times (s) by the trapezoid rule; 0 for fewer than 2 samples."""
    steps = zip(times_s, times_s[1:], watts, watts[1:], strict=False)  # consecutive pairs
    return sum((t1 - t0) * (w0 + w1) / 2 for t0, t1, w0, w1 in steps)
