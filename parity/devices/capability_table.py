"""Which number formats a device supports (fp8, fp4, int8, bf16), from `parity/data/devices/capabilities.toml`.

Torch-free: `lookup` matches a device type, name and (CUDA) compute capability against the table;
`parity.devices.capabilities` feeds it the live device. ``PARITY_DEVICE_NO_FP8=1`` makes every device
report no FP8 at all (no FP8 units, no float8 tensors): the CPU then behaves like an Ascend 910B/910C
for tests, and parity keeps FP8 data as raw bytes (uint8).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from functools import cache
from pathlib import Path

from parity.errors import DeviceError

#: Environment variable: "1" = run as a device without FP8 (no float8 tensor may be created).
NO_FP8_ENV = "PARITY_DEVICE_NO_FP8"
TABLE_PATH = Path(__file__).resolve().parent.parent / "data" / "devices" / "capabilities.toml"
_FIELDS = ("fp8", "float8_tensors", "fp4", "int8", "bf16")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Number formats of one device.

    fp8: native FP8 e4m3 matmuls. float8_tensors: float8 dtypes may be created on the device (storage and
    casts); False = FP8 data is kept as uint8 bytes. fp4: native FP4 matmuls. int8: native INT8 matmuls.
    bf16: native bf16 matmuls. chip: table entry id. source: where the facts come from.
    """

    chip: str
    fp8: bool
    float8_tensors: bool
    fp4: bool
    int8: bool
    bf16: bool
    source: str

    def weight_formats(self) -> tuple[str, ...]:
        """Weight formats (`parity --quantization` names) the device holds natively, best first."""
        out = ["fp8"] if self.float8_tensors else []
        return (*out, "w8a8", "w4a8", "bf16") if self.int8 else (*out, "bf16")


def no_fp8_requested() -> bool:
    """True when ``PARITY_DEVICE_NO_FP8`` is 1/true/yes/on."""
    return os.environ.get(NO_FP8_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@cache
def _table() -> tuple[dict, ...]:
    try:
        rows = tomllib.loads(TABLE_PATH.read_text())["chip"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise DeviceError(f"{TABLE_PATH}: unreadable device capability table ({e})") from None
    for r in rows:
        missing = [k for k in ("id", "device_type", "source", *_FIELDS) if k not in r]
        if missing:
            raise DeviceError(f"{TABLE_PATH}: chip {r.get('id', '?')!r} lacks {', '.join(missing)}")
    return tuple(rows)


def lookup(device_type: str, name: str = "", sm: int | None = None) -> Capabilities:
    """Capabilities of a device from the table (first match wins; then the type's default entry).

    Args:
        device_type: "cpu", "cuda", "npu", ... name: device name (e.g. "Ascend910B2", "NVIDIA H200").
        sm: CUDA compute capability as major*10+minor (e.g. 90), None elsewhere.
    Returns:
        `Capabilities`; with ``PARITY_DEVICE_NO_FP8=1`` fp8 and float8_tensors are False.
        A device type the table does not list gets bf16 only.
    """
    low = name.lower()
    hit = None
    for r in _table():
        if r["device_type"] != device_type:
            continue
        if "sm" in r:
            if sm is not None and sm in r["sm"]:
                hit = r
                break
            continue
        if any(m.lower() in low for m in r.get("match", [])) or not r.get("match"):
            hit = r
            break
    if hit is None:
        caps = Capabilities(device_type, False, False, False, False, True, "not in the capability table")
    else:
        caps = Capabilities(hit["id"], *(bool(hit[k]) for k in _FIELDS), hit["source"])
    if no_fp8_requested():
        caps = dataclasses.replace(
            caps, fp8=False, float8_tensors=False, source=f"{caps.source}; FP8 disabled by {NO_FP8_ENV}=1"
        )
    return caps
