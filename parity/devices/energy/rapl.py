"""CPU package energy from the Linux powercap sysfs interface (RAPL).

``/sys/class/powercap/intel-rapl:N/energy_uj`` counts microjoules and wraps at ``max_energy_range_uj``
(kernel Documentation/power/powercap/powercap.rst); it is read every ``interval_s`` so that a wrap-around between
two reads is seen and added back. Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694); the
meter then reports why it cannot read.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from parity.devices.energy.meter import (
    DEFAULT_INTERVAL_S,
    EnergyMeter,
    EnergyReading,
    PeriodicSampler,
)
from parity.errors import DeviceError

#: Default powercap root (Linux kernel powercap framework).
POWERCAP_ROOT = "/sys/class/powercap"


@dataclass
class RaplDomain:
    """One powercap package domain: `path` holds `energy_uj` and `max_energy_range_uj`."""

    name: str
    path: Path
    max_range_uj: int


def find_rapl_domains(root: str | Path = POWERCAP_ROOT) -> list[RaplDomain]:
    """Top-level RAPL package domains under `root` (``intel-rapl:N`` whose ``name`` starts with "package";
    AMD CPUs expose the same ``intel-rapl`` interface since Linux 5.8). Sub-domains (core, uncore, dram,
    ``intel-rapl:N:M``) are skipped so that nothing is counted twice.

    Raises:
        DeviceError: `root` missing, no package domain, or a domain's files unreadable (message names the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DeviceError(f"rapl: {root} does not exist (no powercap/RAPL support exposed here)")
    out = []
    for d in sorted(root.iterdir()):
        if not re.fullmatch(r"intel-rapl:\d+", d.name):
            continue
        try:
            name = (d / "name").read_text().strip()
        except OSError:
            name = d.name
        if not name.startswith("package"):
            continue
        try:
            max_range = int((d / "max_energy_range_uj").read_text().strip())
            int((d / "energy_uj").read_text().strip())
        except PermissionError as e:
            raise DeviceError(
                f"rapl: permission denied reading {e.filename} (root only since Linux 5.10, CVE-2020-8694)"
            ) from None
        except (OSError, ValueError) as e:
            raise DeviceError(f"rapl: cannot read {d}/energy_uj or max_energy_range_uj: {e}") from None
        out.append(RaplDomain(name=name, path=d, max_range_uj=max_range))
    if not out:
        raise DeviceError(f"rapl: {root} has no intel-rapl:N package domain")
    return out


def counter_delta(prev: int, cur: int, max_range: int) -> int:
    """Increase of a wrapping counter from `prev` to `cur` (both in [0, max_range]).

    A counter that went down has wrapped once: delta = cur + max_range - prev (powercap counters restart
    at 0 after `max_energy_range_uj`; kernel powercap.rst). Units are those of the inputs (uJ for RAPL).
    """
    if cur >= prev:
        return cur - prev
    return cur + max_range - prev


class RaplMeter(EnergyMeter):
    """CPU package energy from RAPL powercap counters, read every `interval_s` to catch wrap-arounds.

    Args:
        root: powercap sysfs root (tests pass a fake directory).
        interval_s: seconds between reads.
    Raises:
        DeviceError: from `find_rapl_domains` when nothing is readable.
    """

    name = "rapl"

    def __init__(self, root: str | Path = POWERCAP_ROOT, interval_s: float = DEFAULT_INTERVAL_S):
        self.domains = find_rapl_domains(root)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._sampler: PeriodicSampler | None = None

    def _read(self) -> list[int]:
        return [int((d.path / "energy_uj").read_text().strip()) for d in self.domains]

    def _sample(self) -> None:
        cur = self._read()
        with self._lock:
            for i, d in enumerate(self.domains):
                self._acc_uj[i] += counter_delta(self._prev[i], cur[i], d.max_range_uj)
            self._prev = cur
            self._n += 1
            self._timeline.append((time.perf_counter(), [uj * 1e-6 for uj in self._acc_uj]))

    def start(self) -> None:
        self._prev = self._read()
        self._acc_uj = [0] * len(self.domains)
        self._n = 1
        self._t0 = time.perf_counter()
        self._timeline = [(self._t0, [0.0] * len(self.domains))]
        self._sampler = PeriodicSampler(self._sample, self.interval_s)
        self._sampler.start()

    def stop(self) -> EnergyReading:
        self._sampler.stop()
        if self._sampler.error is not None:
            raise DeviceError(f"rapl: reading energy_uj failed during the run: {self._sampler.error}")
        self._sample()
        dt = time.perf_counter() - self._t0
        per = [uj * 1e-6 for uj in self._acc_uj]
        j = sum(per)
        return EnergyReading(
            meter="rapl",
            joules=j,
            seconds=dt,
            avg_watts=j / dt if dt > 0 else None,
            devices=[d.name for d in self.domains],
            per_device_j=per,
            samples=self._n,
            timeline=list(self._timeline),
            method=f"powercap energy_uj counter read every {self.interval_s:g} s, wrap-around added back",
        )

    def describe(self) -> str:
        return f"rapl ({', '.join(d.name for d in self.domains)})"
