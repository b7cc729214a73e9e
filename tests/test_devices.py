"""Device layer: resolution, backends, and the device-neutrality rule."""

import re
from pathlib import Path

import pytest
import torch

from parity import devices
from parity.errors import DeviceError

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_auto_and_cpu():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto").type in devices.KNOWN_TYPES
    assert devices.resolve(None).type in devices.KNOWN_TYPES


def test_resolve_errors():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        devices.resolve("tpu")
    if not devices.is_available("npu"):
        with pytest.raises(DeviceError, match="not available"):
            devices.resolve("npu")


def test_dist_backend_mapping():
    assert devices.dist_backend("cpu") == "gloo"
    assert devices.dist_backend("cuda:1") == "nccl"
    assert devices.dist_backend("npu") == "hccl"
    assert devices.dist_backend(torch.device("xpu", 0)) == "xccl"


def test_supported_dtypes_cpu():
    assert torch.float32 in devices.supported_dtypes("cpu")


def test_no_cuda_outside_devices():
    pat = re.compile(r"torch\.cuda|\.cuda\(")
    bad = []
    for path in (ROOT / "parity").rglob("*.py"):
        if "devices" in path.relative_to(ROOT / "parity").parts[:1]:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pat.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "torch.cuda / .cuda( outside parity/devices:\n" + "\n".join(bad)
