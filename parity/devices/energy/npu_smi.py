"""Huawei Ascend NPU energy from ``npu-smi`` board power samples.

``npu-smi info -t power -i <id>`` prints the board power in watts (line ``Power Dissipation(W) : 93.6`` on Atlas
800 / 910 series; some versions print ``Power Usage(W)`` or ``Real-time Power(W)``; Ascend "npu-smi command
reference", ``info -t power``). There is no energy counter, so power is sampled every ``interval_s`` in a
background thread and integrated over time with the trapezoid rule.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from parity.devices.energy.meter import DEFAULT_INTERVAL_S, SampledPowerMeter
from parity.errors import DeviceError

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


class NpuSmiMeter(SampledPowerMeter):
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

    def __init__(
        self,
        devices: list[int] | None = None,
        npu_smi: str = "npu-smi",
        run: Callable[..., Any] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ):
        self.run = run
        if run is None:
            if shutil.which(npu_smi) is None:
                raise DeviceError(f"npu-smi: {npu_smi!r} not found on PATH")
            self.run = lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=10)
        self.npu_smi = npu_smi
        super().__init__(interval_s)
        if devices is None:
            devices = parse_npu_smi_ids(self._call("info", "-l"))
            if not devices:
                raise DeviceError("npu-smi: `npu-smi info -l` lists no NPU")
        self.ids = list(devices)
        for i in self.ids:
            self._power(i)  # fail now, not mid-run

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

    def _watts(self) -> list[float]:
        return [self._power(i) for i in self.ids]

    def _device_names(self) -> list[str]:
        return [f"npu{i}" for i in self.ids]

    def _method(self) -> str:
        return f"npu-smi board power sampled every {self.interval_s:g} s, trapezoid-integrated"

    def describe(self) -> str:
        return f"npu-smi ({len(self.ids)} NPU(s))"
