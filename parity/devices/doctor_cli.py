"""`parity doctor`: what this machine offers parity (devices, dtypes, distributed backend)."""

from __future__ import annotations

import json
from typing import Any

#: Row labels of the text report (keys of the JSON report).
LABELS = {
    "torch": "torch version",
    "auto_device": "device parity picks",
    "type": "device type",
    "index": "device index",
    "name": "device name",
    "dist_backend": "distributed backend",
    "total_memory_bytes": "device memory",
    "dtypes": "dtypes",
    "available": "device types here",
    "cpu_kernels": "parity's C++ CPU ops",
    "cpu_weight_pages": "CPU weights on",
}


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show devices, dtypes and backends parity can use here")
    p.add_argument("--json", action="store_true", help="print JSON (raw values: bytes, null) instead of text")
    p.set_defaults(func=run)


def human_bytes(n: float) -> str:
    """Bytes in binary units: 25275990016 -> "23.5 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_value(key: str, value: Any) -> str:
    """One value of the report as a person reads it: memory in GiB, lists joined, missing ones as '-'."""
    if value is None:
        return "-" if key != "index" else "- (the default device of its type)"
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return human_bytes(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def run(args) -> int:
    import dataclasses

    import torch

    from parity import devices
    from parity.devices import huge_pages, native_kernels

    info = devices.describe("auto")
    out = {
        "torch": torch.__version__,
        "auto_device": f"{info.type}" + (f":{info.index}" if info.index is not None else ""),
        **dataclasses.asdict(info),
        "available": [t for t in devices.KNOWN_TYPES if devices.is_available(t)],
        "cpu_kernels": native_kernels.status(),  # which build a CPU run loads (not built here)
        "cpu_weight_pages": huge_pages.status(),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{LABELS.get(k, k.replace('_', ' ')):22s} {human_value(k, v)}")
    return 0
