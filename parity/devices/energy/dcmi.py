"""Whole-server power from the BMC over IPMI DCMI (``ipmitool dcmi power reading``), sampled and integrated.

``ipmitool dcmi power reading`` prints ``Instantaneous power reading:   220 Watts`` (DCMI 1.5 specification,
"Get Power Reading" command; ipmitool's ``dcmi`` sub-command). It is the node's power at the wall side of the
power supplies (accelerators, CPUs, fans, everything), so it is reported as its own meter, next to the
accelerator's. Needs ``ipmitool`` and, usually, root (``/dev/ipmi0``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from parity.devices.energy.meter import DEFAULT_INTERVAL_S, SampledPowerMeter
from parity.errors import DeviceError

_INSTANT = re.compile(r"^\s*Instantaneous power reading\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*Watts", re.IGNORECASE | re.M)


def parse_dcmi_power(text: str) -> float:
    """Instantaneous node power in W from ``ipmitool dcmi power reading`` output.

    Raises:
        DeviceError: no "Instantaneous power reading: N Watts" line, or the BMC reports power readings
            deactivated ("Power reading state is: deactivated").
    """
    if re.search(r"Power reading state is\s*:\s*deactivated", text, re.IGNORECASE):
        raise DeviceError("dcmi: the BMC reports power readings deactivated (ipmitool dcmi power activate)")
    m = _INSTANT.search(text)
    if not m:
        first = text.strip().splitlines()[0] if text.strip() else "<empty>"
        raise DeviceError(f"dcmi: no 'Instantaneous power reading: <W> Watts' line in ipmitool output (got {first!r})")
    return float(m.group(1))


class DcmiMeter(SampledPowerMeter):
    """Node power from ``ipmitool dcmi power reading`` sampled every `interval_s`, trapezoid-integrated.

    Args:
        ipmitool: the executable (name on PATH or a path).
        run: a `subprocess.run`-like callable (tests pass a fake): argv list -> object with .returncode, .stdout.
        interval_s: seconds between samples.
    Raises:
        DeviceError: ipmitool missing or failing (e.g. no /dev/ipmi0, not root), or no power line.
    """

    name = "dcmi"

    def __init__(
        self, ipmitool: str = "ipmitool", run: Callable[..., Any] | None = None, interval_s: float = DEFAULT_INTERVAL_S
    ):
        self.run = run
        if run is None:
            if shutil.which(ipmitool) is None:
                raise DeviceError(f"dcmi: {ipmitool!r} not found on PATH")
            self.run = lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=10)
        self.argv = [ipmitool, "dcmi", "power", "reading"]
        super().__init__(interval_s)
        self._power()  # fail now, not mid-run

    def _power(self) -> float:
        try:
            r = self.run(self.argv)
        except (OSError, subprocess.SubprocessError) as e:
            raise DeviceError(f"dcmi: running {' '.join(self.argv)!r} failed: {e}") from None
        if r.returncode != 0:
            raise DeviceError(f"dcmi: {' '.join(self.argv)!r} exited with {r.returncode} (needs root and a BMC)")
        return parse_dcmi_power(r.stdout if isinstance(r.stdout, str) else r.stdout.decode(errors="replace"))

    def _watts(self) -> list[float]:
        return [self._power()]

    def _device_names(self) -> list[str]:
        return ["node (BMC)"]

    def _method(self) -> str:
        return f"IPMI DCMI instantaneous node power sampled every {self.interval_s:g} s, trapezoid-integrated"

    def describe(self) -> str:
        return "dcmi (node power via BMC)"
