"""The energy-meter interface (`EnergyMeter.start()` then `stop() -> EnergyReading`), the "none" meter, and the
background sampler and trapezoid integration shared by sampled meters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from parity.errors import DeviceError

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
        timeline: (time.perf_counter() s, [cumulative J per device since start]) at every read, so that the
            energy of any sub-interval (a steady-state window) can be taken by interpolation (`energy_between`).
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
    timeline: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Every field but the timeline (kept out of result files: one entry per read)."""
        d = asdict(self)
        d.pop("timeline")
        return d


def energy_between(timeline: list, t0: float, t1: float) -> list[float] | None:
    """Joules per device between perf_counter times `t0` and `t1` (s), linearly interpolated on the cumulative
    energy of `timeline` (see `EnergyReading`); None when the timeline does not cover [t0, t1] or has < 2 reads."""
    if len(timeline) < 2 or t1 < t0 or t0 < timeline[0][0] - 1e-6 or t1 > timeline[-1][0] + 1e-6:
        return None
    import numpy as np

    ts = np.array([t for t, _ in timeline])
    cum = np.array([c for _, c in timeline], dtype=float)  # (reads, devices)
    return [float(np.interp(t1, ts, cum[:, k]) - np.interp(t0, ts, cum[:, k])) for k in range(cum.shape[1])]


def cumulative_trapezoid(times_s: list[float], watts: list[list[float]]) -> list:
    """Timeline [(t, [cumulative J per device])] from power samples (W per device at each time), trapezoid rule."""
    out, acc = [], None
    for i, (t, w) in enumerate(zip(times_s, watts, strict=True)):
        if i == 0:
            acc = [0.0] * len(w)
        else:
            dt = t - times_s[i - 1]
            acc = [a + dt * (w0 + w1) / 2 for a, w0, w1 in zip(acc, watts[i - 1], w, strict=True)]
        out.append((t, list(acc)))
    return out


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


class SampledPowerMeter(EnergyMeter):
    """A meter that samples instantaneous power (W) per device every `interval_s` and integrates it by the
    trapezoid rule. Subclasses set `name`, `interval_s` and implement `_watts()` (one value per device),
    `_device_names()` and `_method()`.

    Raises (from `stop`):
        DeviceError: a sample failed while the run was going on.
    """

    interval_s: float

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()

    def _watts(self) -> list[float]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _device_names(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _method(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _sample(self) -> None:
        t = time.perf_counter()
        w = self._watts()
        with self._lock:
            self._t.append(t)
            self._w.append(w)

    def start(self) -> None:
        self._t, self._w = [], []
        self._t0 = time.perf_counter()
        self._sample()
        self._sampler = PeriodicSampler(self._sample, self.interval_s)
        self._sampler.start()

    def stop(self) -> EnergyReading:
        self._sampler.stop()
        if self._sampler.error is not None:
            raise DeviceError(f"{self.name}: sampling failed during the run: {self._sampler.error}")
        self._sample()
        dt = time.perf_counter() - self._t0
        names = self._device_names()
        per = [integrate_trapezoid(self._t, [w[k] for w in self._w]) for k in range(len(names))]
        j = sum(per)
        return EnergyReading(
            meter=self.name,
            joules=j,
            seconds=dt,
            avg_watts=j / dt if dt > 0 else None,
            devices=names,
            per_device_j=per,
            samples=len(self._t),
            timeline=cumulative_trapezoid(self._t, self._w),
            method=self._method(),
        )
