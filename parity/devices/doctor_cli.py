"""`parity doctor`: what this machine offers parity (devices, dtypes, distributed backend)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show devices, dtypes and backends parity can use here")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    import torch

    from parity import devices

    info = devices.describe("auto")
    out = {"torch": torch.__version__, "auto_device": f"{info.type}" + (f":{info.index}" if info.index is not None else ""),
           **dataclasses.asdict(info),
           "available": [t for t in devices.KNOWN_TYPES if devices.is_available(t)]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:20s} {v}")
    return 0
