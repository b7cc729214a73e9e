"""Energy meters for `parity bench`: joules drawn by the local accelerators / CPU during a run.

Four meters, one interface (`EnergyMeter.start()` then `EnergyMeter.stop() -> EnergyReading`):

- ``nvml``    NVIDIA GPUs through NVML's cumulative energy counter
              (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver was loaded, Volta and
              newer; NVML API reference, "Device Queries"). Needs the optional extra ``parity[nvidia]``
              (package ``nvidia-ml-py``, module ``pynvml``), imported only when this meter is opened.
- ``npu-smi`` Huawei Ascend NPUs: ``npu-smi info -t power -i <id>`` prints the board power in watts
              (line ``Power Dissipation(W) : 93.6`` on Atlas 800 / 910 series; some versions print
              ``Power Usage(W)`` or ``Real-time Power(W)``; Ascend "npu-smi command reference", ``info -t power``).
              There is no energy counter, so power is sampled every ``interval_s`` in a background thread and
              integrated over time with the trapezoid rule.
- ``rapl``    CPU packages through the Linux powercap sysfs interface
              (``/sys/class/powercap/intel-rapl:N/energy_uj``, microjoules, wrapping at
              ``max_energy_range_uj``; kernel Documentation/power/powercap/powercap.rst). Read every
              ``interval_s`` so that a wrap-around between two reads is seen and added back. Since Linux 5.10
              ``energy_uj`` is readable by root only (CVE-2020-8694); the meter then reports why it cannot read.
- ``none``    nothing readable; carries a one-line reason (as on a CPU-only container).

`open_meter("auto")` tries nvml, npu-smi, rapl in that order and returns the first one that can be read,
else a `NoneMeter` whose reason lists why each was unusable. `open_meters("auto")` (what `parity bench` uses)
returns the readable accelerator meter *and* the RAPL meter when both can be read, so accelerator and host CPU
energy are reported side by side, each under its own name. An explicitly requested meter that cannot be read
raises `DeviceError` naming the meter and the cause.

This module never imports torch itself (the `parity.devices` package does, on first import).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from parity.errors import DeviceError

#: Meter names accepted by `open_meter` (and `parity bench --energy`).
METERS = ("auto", "none", "nvml", "npu-smi", "rapl")

#: Default powercap root (Linux kernel powercap framework).
POWERCAP_ROOT = "/sys/class/powercap"

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


class _Sampler:
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


# ----------------------------------------------------------------------------------------------- RAPL
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
            raise DeviceError(f"rapl: permission denied reading {e.filename} "
                              "(root only since Linux 5.10, CVE-2020-8694)") from None
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
        self._sampler: _Sampler | None = None

    def _read(self) -> list[int]:
        return [int((d.path / "energy_uj").read_text().strip()) for d in self.domains]

    def _sample(self) -> None:
        cur = self._read()
        with self._lock:
            for i, d in enumerate(self.domains):
                self._acc_uj[i] += counter_delta(self._prev[i], cur[i], d.max_range_uj)
            self._prev = cur
            self._n += 1

    def start(self) -> None:
        self._prev = self._read()
        self._acc_uj = [0] * len(self.domains)
        self._n = 1
        self._t0 = time.perf_counter()
        self._sampler = _Sampler(self._sample, self.interval_s)
        self._sampler.start()

    def stop(self) -> EnergyReading:
        self._sampler.stop()
        if self._sampler.error is not None:
            raise DeviceError(f"rapl: reading energy_uj failed during the run: {self._sampler.error}")
        self._sample()
        dt = time.perf_counter() - self._t0
        per = [uj * 1e-6 for uj in self._acc_uj]
        j = sum(per)
        return EnergyReading(meter="rapl", joules=j, seconds=dt, avg_watts=j / dt if dt > 0 else None,
                             devices=[d.name for d in self.domains], per_device_j=per, samples=self._n,
                             method=f"powercap energy_uj counter read every {self.interval_s:g} s, "
                                    "wrap-around added back")

    def describe(self) -> str:
        return f"rapl ({', '.join(d.name for d in self.domains)})"


# ----------------------------------------------------------------------------------------------- NVML
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
    Raises:
        DeviceError: pynvml missing, NVML init failing (no driver), no GPU, or a GPU without an energy counter.
    """

    name = "nvml"

    def __init__(self, devices: list[int] | None = None, nvml: Any = None):
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
        for i, h in zip(idx, self.handles):
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

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._e0 = self._read()

    def stop(self) -> EnergyReading:
        e1 = self._read()
        dt = time.perf_counter() - self._t0
        per = [(b - a) * 1e-3 for a, b in zip(self._e0, e1)]  # mJ -> J; 64-bit counter, no wrap in practice
        j = sum(per)
        return EnergyReading(meter="nvml", joules=j, seconds=dt, avg_watts=j / dt if dt > 0 else None,
                             devices=list(self.names), per_device_j=per, samples=2,
                             method="NVML nvmlDeviceGetTotalEnergyConsumption counter (mJ), read at start and stop")

    def describe(self) -> str:
        return f"nvml ({len(self.handles)} GPU(s))"


# -------------------------------------------------------------------------------------------- npu-smi
_POWER_LINE = re.compile(r"^\s*([^:]*?power[^:]*?)\(W\)\s*:\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)
_NPU_ID = re.compile(r"^\s*NPU ID\s*:\s*(\d+)", re.IGNORECASE)


def parse_npu_smi_power(text: str) -> float:
    """Board power in W from ``npu-smi info -t power -i <id>`` output.

    Accepts the key spellings seen across npu-smi versions ("Power Dissipation(W)", "Power Usage(W)",
    "Real-time Power(W)") and ignores limit / rated lines.

    Raises:
        DeviceError: no power line found (message quotes the first line of the output).
    """
    for line in text.splitlines():
        m = _POWER_LINE.match(line)
        if m and not re.search(r"limit|rated|max|cap", m.group(1), re.IGNORECASE):
            return float(m.group(2))
    first = text.strip().splitlines()[0] if text.strip() else "<empty>"
    raise DeviceError(f"npu-smi: no 'Power ...(W) : <watts>' line in `npu-smi info -t power` output (got {first!r})")


def parse_npu_smi_ids(text: str) -> list[int]:
    """NPU ids from ``npu-smi info -l`` output (lines ``NPU ID : 0``)."""
    return [int(m.group(1)) for line in text.splitlines() if (m := _NPU_ID.match(line))]


def integrate_trapezoid(times_s: list[float], watts: list[float]) -> float:
    """Energy in J from power samples (W) at times (s) by the trapezoid rule; 0 for fewer than 2 samples."""
    return sum((t1 - t0) * (w0 + w1) / 2 for t0, t1, w0, w1 in zip(times_s, times_s[1:], watts, watts[1:]))


class NpuSmiMeter(EnergyMeter):
    """Ascend NPU energy: board power from `npu-smi` sampled every `interval_s`, integrated over time.

    Args:
        devices: NPU ids; None = all ids listed by ``npu-smi info -l``.
        npu_smi: the executable (name on PATH or a path).
        run: a `subprocess.run`-like callable (tests pass a fake) taking an argv list and returning an
            object with `.returncode` and `.stdout` (text).
        interval_s: seconds between samples.
    Raises:
        DeviceError: npu-smi not found, failing, listing no NPU, or printing no power line.
    """

    name = "npu-smi"

    def __init__(self, devices: list[int] | None = None, npu_smi: str = "npu-smi",
                 run: Callable[..., Any] | None = None, interval_s: float = DEFAULT_INTERVAL_S):
        self.run = run
        if run is None:
            if shutil.which(npu_smi) is None:
                raise DeviceError(f"npu-smi: {npu_smi!r} not found on PATH")
            self.run = lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=10)
        self.npu_smi = npu_smi
        self.interval_s = interval_s
        if devices is None:
            devices = parse_npu_smi_ids(self._call("info", "-l"))
            if not devices:
                raise DeviceError("npu-smi: `npu-smi info -l` lists no NPU")
        self.ids = list(devices)
        for i in self.ids:
            self._power(i)  # fail now, not mid-run
        self._lock = threading.Lock()

    def _call(self, *args: str) -> str:
        argv = [self.npu_smi, *args]
        try:
            r = self.run(argv)
        except (OSError, subprocess.SubprocessError) as e:
            raise DeviceError(f"npu-smi: running {' '.join(argv)!r} failed: {e}") from None
        if r.returncode != 0:
            raise DeviceError(f"npu-smi: {' '.join(argv)!r} exited with {r.returncode}")
        return r.stdout if isinstance(r.stdout, str) else r.stdout.decode(errors="replace")

    def _power(self, npu_id: int) -> float:
        return parse_npu_smi_power(self._call("info", "-t", "power", "-i", str(npu_id)))

    def _sample(self) -> None:
        t = time.perf_counter()
        w = [self._power(i) for i in self.ids]
        with self._lock:
            self._t.append(t)
            self._w.append(w)

    def start(self) -> None:
        self._t, self._w = [], []
        self._t0 = time.perf_counter()
        self._sample()
        self._sampler = _Sampler(self._sample, self.interval_s)
        self._sampler.start()

    def stop(self) -> EnergyReading:
        self._sampler.stop()
        if self._sampler.error is not None:
            raise DeviceError(f"npu-smi: sampling failed during the run: {self._sampler.error}")
        self._sample()
        dt = time.perf_counter() - self._t0
        per = [integrate_trapezoid(self._t, [w[k] for w in self._w]) for k in range(len(self.ids))]
        j = sum(per)
        return EnergyReading(meter="npu-smi", joules=j, seconds=dt, avg_watts=j / dt if dt > 0 else None,
                             devices=[f"npu{i}" for i in self.ids], per_device_j=per, samples=len(self._t),
                             method=f"npu-smi board power sampled every {self.interval_s:g} s, trapezoid-integrated")

    def describe(self) -> str:
        return f"npu-smi ({len(self.ids)} NPU(s))"


# ---------------------------------------------------------------------------------------------- open
def _makers(devices=None, powercap_root: str | Path = POWERCAP_ROOT, nvml: Any = None, npu_smi: str = "npu-smi",
            npu_smi_run: Callable[..., Any] | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> dict:
    return {
        "nvml": lambda: NvmlMeter(devices=devices, nvml=nvml),
        "npu-smi": lambda: NpuSmiMeter(devices=devices, npu_smi=npu_smi, run=npu_smi_run, interval_s=interval_s),
        "rapl": lambda: RaplMeter(root=powercap_root, interval_s=interval_s),
    }


def _first_readable(names: tuple[str, ...], makers: dict) -> tuple[EnergyMeter | None, list[str]]:
    reasons = []
    for name in names:
        try:
            return makers[name](), reasons
        except DeviceError as e:
            reasons.append(str(e))
    return None, reasons


def open_meter(spec: str = "auto", *, devices: list[int] | None = None, powercap_root: str | Path = POWERCAP_ROOT,
               nvml: Any = None, npu_smi: str = "npu-smi", npu_smi_run: Callable[..., Any] | None = None,
               interval_s: float = DEFAULT_INTERVAL_S) -> EnergyMeter:
    """Open an energy meter.

    Args:
        spec: "auto" | "none" | "nvml" | "npu-smi" | "rapl".
        devices: accelerator indices for nvml / npu-smi (None = all).
        powercap_root, nvml, npu_smi, npu_smi_run: sources, replaceable for tests.
        interval_s: sampling interval in s for npu-smi and RAPL.
    Returns:
        The meter; for "auto" the first of nvml, npu-smi, rapl that can be read, else a `NoneMeter` whose
        reason names why each failed (one line).
    Raises:
        DeviceError: unknown `spec`, or an explicitly named meter that cannot be read.
    """
    spec = str(spec).strip().lower()
    if spec not in METERS:
        raise DeviceError(f"energy meter {spec!r} unknown: expected one of {', '.join(METERS)}")
    makers = _makers(devices, powercap_root, nvml, npu_smi, npu_smi_run, interval_s)
    if spec == "none":
        return NoneMeter("disabled with --energy none")
    if spec != "auto":
        return makers[spec]()
    m, reasons = _first_readable(("nvml", "npu-smi", "rapl"), makers)
    return m if m is not None else NoneMeter("no energy meter readable: " + "; ".join(reasons))


def open_meters(spec: str = "auto", **kw) -> list[EnergyMeter]:
    """Open one or several meters, e.g. an accelerator's and the host CPU's, each reported under its own name.

    Args:
        spec: "auto" | "none" | a comma list of "nvml", "npu-smi", "rapl" (e.g. "nvml,rapl").
            "auto" = the first readable accelerator meter (nvml, then npu-smi) plus rapl when it is readable;
            a single `NoneMeter` whose reason says why each failed when none is.
        **kw: as `open_meter` (devices, powercap_root, nvml, npu_smi, npu_smi_run, interval_s).
    Raises:
        DeviceError: unknown or repeated name, "auto"/"none" combined with others, or an explicitly named meter
            that cannot be read.
    """
    names = [x.strip().lower() for x in str(spec).split(",") if x.strip()]
    if not names:
        raise DeviceError(f"energy meter spec {spec!r} is empty: expected auto, none or a list of nvml, npu-smi, rapl")
    for n in names:
        if n not in METERS:
            raise DeviceError(f"energy meter {n!r} unknown: expected one of {', '.join(METERS)}")
    if len(set(names)) != len(names) or (len(names) > 1 and ({"auto", "none"} & set(names))):
        raise DeviceError(f"energy meter spec {spec!r}: give auto, none, or distinct names among nvml, npu-smi, rapl")
    if names != ["auto"]:
        return [open_meter(n, **kw) for n in names]
    makers = _makers(**kw)
    accel, r1 = _first_readable(("nvml", "npu-smi"), makers)
    cpu, r2 = _first_readable(("rapl",), makers)
    out = [m for m in (accel, cpu) if m is not None]
    return out or [NoneMeter("no energy meter readable: " + "; ".join(r1 + r2))]


__all__ = ["METERS", "open_meters", "open_meter", "EnergyReading", "EnergyMeter", "NoneMeter", "RaplMeter",
           "NvmlMeter", "NpuSmiMeter", "counter_delta", "find_rapl_domains", "parse_npu_smi_power",
           "parse_npu_smi_ids", "integrate_trapezoid"]
