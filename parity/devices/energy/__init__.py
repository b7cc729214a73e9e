"""Energy meters for `parity bench`: joules drawn by the local accelerators / CPU during a run.

One interface (`parity.devices.energy.meter`), four readable meters: ``nvml`` (NVIDIA GPUs, `.nvml`),
``npu-smi`` (Ascend NPUs, `.npu_smi`), ``rapl`` (CPU packages, `.rapl`), ``dcmi`` (whole-node power from the BMC,
`.dcmi`); ``none`` carries a one-line reason.

`open_meter("auto")` tries nvml, npu-smi, rapl in that order and returns the first one that can be read,
else a `NoneMeter` whose reason lists why each was unusable. `open_meters("auto")` (what `parity bench` uses)
returns the readable accelerator meter *and* the RAPL and DCMI meters when they can be read, so accelerator,
host CPU and node energy are reported side by side, each under its own name. An explicitly requested meter that
cannot be read raises `DeviceError` naming the meter and the cause. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.devices.energy.dcmi import DcmiMeter, parse_dcmi_power
from parity.devices.energy.meter import (
    DEFAULT_INTERVAL_S,
    EnergyMeter,
    EnergyReading,
    NoneMeter,
    cumulative_trapezoid,
    energy_between,
    integrate_trapezoid,
)
from parity.devices.energy.npu_smi import (
    NpuSmiMeter,
    parse_npu_smi_ids,
    parse_npu_smi_power,
)
from parity.devices.energy.nvml import NvmlMeter
from parity.devices.energy.rapl import (
    POWERCAP_ROOT,
    RaplMeter,
    counter_delta,
    find_rapl_domains,
)
from parity.errors import DeviceError

#: Meter names accepted by `open_meter` (and `parity bench --energy`).
METERS = ("auto", "none", "nvml", "npu-smi", "rapl", "dcmi")


def _makers(
    devices=None,
    powercap_root: str | Path = POWERCAP_ROOT,
    nvml: Any = None,
    npu_smi: str = "npu-smi",
    npu_smi_run: Callable[..., Any] | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    ipmitool: str = "ipmitool",
    ipmitool_run: Callable[..., Any] | None = None,
) -> dict:
    return {
        "nvml": lambda: NvmlMeter(devices=devices, nvml=nvml, interval_s=interval_s),
        "npu-smi": lambda: NpuSmiMeter(devices=devices, npu_smi=npu_smi, run=npu_smi_run, interval_s=interval_s),
        "rapl": lambda: RaplMeter(root=powercap_root, interval_s=interval_s),
        "dcmi": lambda: DcmiMeter(ipmitool=ipmitool, run=ipmitool_run, interval_s=interval_s),
    }


def _first_readable(names: tuple[str, ...], makers: dict) -> tuple[EnergyMeter | None, list[str]]:
    reasons = []
    for name in names:
        try:
            return makers[name](), reasons
        except DeviceError as e:
            reasons.append(str(e))
    return None, reasons


def open_meter(
    spec: str = "auto",
    *,
    devices: list[int] | None = None,
    powercap_root: str | Path = POWERCAP_ROOT,
    nvml: Any = None,
    npu_smi: str = "npu-smi",
    npu_smi_run: Callable[..., Any] | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    ipmitool: str = "ipmitool",
    ipmitool_run: Callable[..., Any] | None = None,
) -> EnergyMeter:
    """Open an energy meter.

    Args:
        spec: "auto" | "none" | "nvml" | "npu-smi" | "rapl" | "dcmi".
        devices: accelerator indices for nvml / npu-smi (None = all).
        powercap_root, nvml, npu_smi, npu_smi_run, ipmitool, ipmitool_run: sources, replaceable for tests.
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
    makers = _makers(devices, powercap_root, nvml, npu_smi, npu_smi_run, interval_s, ipmitool, ipmitool_run)
    if spec == "none":
        return NoneMeter("disabled with --energy none")
    if spec != "auto":
        return makers[spec]()
    m, reasons = _first_readable(("nvml", "npu-smi", "rapl"), makers)
    return m if m is not None else NoneMeter("no energy meter readable: " + "; ".join(reasons))


def open_meters(spec: str = "auto", **kw) -> list[EnergyMeter]:
    """Open one or several meters, e.g. an accelerator's and the host CPU's, each reported under its own name.

    Args:
        spec: "auto" | "none" | a comma list of "nvml", "npu-smi", "rapl", "dcmi" (e.g. "nvml,rapl").
            "auto" = the first readable accelerator meter (nvml, then npu-smi) plus rapl and dcmi when readable;
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
    node, r3 = _first_readable(("dcmi",), makers)
    out = [m for m in (accel, cpu, node) if m is not None]
    return out or [NoneMeter("no energy meter readable: " + "; ".join(r1 + r2 + r3))]


__all__ = [
    "METERS",
    "open_meters",
    "open_meter",
    "EnergyReading",
    "EnergyMeter",
    "NoneMeter",
    "RaplMeter",
    "NvmlMeter",
    "NpuSmiMeter",
    "DcmiMeter",
    "parse_dcmi_power",
    "energy_between",
    "cumulative_trapezoid",
    "counter_delta",
    "find_rapl_domains",
    "parse_npu_smi_power",
    "parse_npu_smi_ids",
    "integrate_trapezoid",
    "DEFAULT_INTERVAL_S",
    "POWERCAP_ROOT",
]
