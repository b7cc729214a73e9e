"""Energy meters against fake sysfs / NVML / npu-smi readings (parity.devices.energy)."""

import os
import threading
import time
from types import SimpleNamespace

import pytest

from parity.devices import energy
from parity.errors import DeviceError


def _rapl_tree(root, packages):
    """packages: list of (energy_uj, max_range_uj); also adds a core sub-domain that must be ignored."""
    for i, (e, mx) in enumerate(packages):
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{e}\n")
        (d / "max_energy_range_uj").write_text(f"{mx}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("999999\n")
        (sub / "max_energy_range_uj").write_text("1000000000\n")
    return root


def _write(path, text):
    """Atomic replace, as a sysfs read never sees a half-written value."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_counter_delta_wraps():
    assert energy.counter_delta(100, 250, 1000) == 150
    assert energy.counter_delta(900, 100, 1000) == 200  # wrapped: 100 to the top + 100 after
    assert energy.counter_delta(5, 5, 1000) == 0


def test_rapl_meter_with_wraparound(tmp_path):
    root = _rapl_tree(tmp_path / "powercap", [(900_000_000, 1_000_000_000), (10_000_000, 1_000_000_000)])
    m = energy.RaplMeter(root=root, interval_s=0.02)
    assert [d.name for d in m.domains] == ["package-0", "package-1"]  # core sub-domains skipped
    m.start()
    # package-0 wraps: 900 J -> (top at 1000 J) -> 50 J  => 150 J; package-1: 10 J -> 30 J => 20 J
    _write(root / "intel-rapl:0" / "energy_uj", "50000000\n")
    _write(root / "intel-rapl:1" / "energy_uj", "30000000\n")
    time.sleep(0.06)  # let the sampler see the wrapped value
    _write(root / "intel-rapl:0" / "energy_uj", "60000000\n")  # +10 J more
    r = m.stop()
    assert r.meter == "rapl"
    assert r.per_device_j == pytest.approx([160.0, 20.0])
    assert r.joules == pytest.approx(180.0)
    assert r.avg_watts == pytest.approx(180.0 / r.seconds)
    assert r.samples >= 2 and "wrap" in r.method


def test_rapl_errors(tmp_path):
    with pytest.raises(DeviceError, match="does not exist"):
        energy.RaplMeter(root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeviceError, match="no intel-rapl:N package domain"):
        energy.RaplMeter(root=tmp_path / "empty")
    root = _rapl_tree(tmp_path / "bad", [(1, 10)])
    (root / "intel-rapl:0" / "energy_uj").write_text("garbage\n")
    with pytest.raises(DeviceError, match="cannot read"):
        energy.RaplMeter(root=root)


class FakeNvml:
    """Minimal pynvml stand-in: energy counters in mJ, advanced by the test."""

    def __init__(self, n=2, fail_init=False):
        self.mj = [1_000_000 * (i + 1) for i in range(n)]
        self.n, self.fail_init = n, fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("Driver Not Loaded")

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self.mj[h]


def test_nvml_meter_counts_millijoules():
    nv = FakeNvml(2)
    m = energy.open_meter("nvml", nvml=nv)
    m.start()
    nv.mj[0] += 300_000  # 300 J
    nv.mj[1] += 150_500  # 150.5 J
    r = m.stop()
    assert r.meter == "nvml" and r.devices == ["gpu0: NVIDIA H200", "gpu1: NVIDIA H200"]
    assert r.per_device_j == pytest.approx([300.0, 150.5])
    assert r.joules == pytest.approx(450.5)
    m1 = energy.NvmlMeter(devices=[1], nvml=nv)
    assert m1.names == ["gpu1: NVIDIA H200"]


def test_nvml_errors():
    with pytest.raises(DeviceError, match="could not be initialised"):
        energy.NvmlMeter(nvml=FakeNvml(fail_init=True))
    with pytest.raises(DeviceError, match="sees no GPU"):
        energy.NvmlMeter(nvml=FakeNvml(0))
    with pytest.raises(DeviceError, match="GPU index 5 out of range"):
        energy.NvmlMeter(devices=[5], nvml=FakeNvml(2))


NPU_LIST = """Total Count                    : 2

NPU ID                         : 0
Product Name                   : IT21DMDA
NPU ID                         : 1
Product Name                   : IT21DMDA
"""


class FakeNpuSmi:
    """Answers `npu-smi info -l` and `npu-smi info -t power -i N` with scripted watts."""

    def __init__(self, watts):
        self.watts = dict(watts)
        self.calls = 0
        self.power_calls = 0
        self.changed = threading.Condition()

    def __call__(self, argv):
        self.calls += 1
        with self.changed:
            self.power_calls += argv[1:3] == ["info", "-t"]
            self.changed.notify_all()
        if argv[1:] == ["info", "-l"]:
            return SimpleNamespace(returncode=0, stdout=NPU_LIST)
        i = int(argv[-1])
        out = (
            f"        NPU ID                         : {i}\n        Power Limit(W)                 : 400\n"
            f"        Power Dissipation(W)           : {self.watts[i]}\n"
        )
        return SimpleNamespace(returncode=0, stdout=out)


def test_npu_smi_parsing():
    assert energy.parse_npu_smi_power("Power Dissipation(W)    : 93.6\n") == 93.6
    assert energy.parse_npu_smi_power("  Power Limit(W) : 400\n  Power Usage(W) : 71\n") == 71.0
    assert energy.parse_npu_smi_power("Real-time Power(W) : 12.5") == 12.5
    with pytest.raises(DeviceError, match="no 'Power"):
        energy.parse_npu_smi_power("Temperature(C) : 40\n")
    assert energy.parse_npu_smi_ids(NPU_LIST) == [0, 1]
    assert energy.integrate_trapezoid([0.0, 1.0, 3.0], [100.0, 200.0, 200.0]) == pytest.approx(150 + 400)


def test_npu_smi_meter_integrates_power():
    fake = FakeNpuSmi({0: 100.0, 1: 200.0})
    m = energy.open_meter("npu-smi", npu_smi_run=fake, interval_s=0.01)
    assert m.ids == [0, 1]
    m.start()
    time.sleep(0.1)  # the metered interval
    with fake.changed:  # 2 NPUs x (probe when opened, start sample, >= 1 sample of the sampler thread)
        assert fake.changed.wait_for(lambda: fake.power_calls >= 2 * 3, timeout=30.0)
    r = m.stop()
    # constant power: energy = P * t for each NPU (trapezoid is exact for constant power)
    assert r.per_device_j[0] == pytest.approx(100.0 * r.seconds, rel=0.05)
    assert r.per_device_j[1] == pytest.approx(200.0 * r.seconds, rel=0.05)
    assert r.avg_watts == pytest.approx(300.0, rel=0.05)
    assert r.samples >= 3 and r.devices == ["npu0", "npu1"]


def test_npu_smi_failure_is_device_error():
    bad = lambda argv: SimpleNamespace(returncode=255, stdout="")  # noqa: E731
    with pytest.raises(DeviceError, match="exited with 255"):
        energy.NpuSmiMeter(run=bad)
    with pytest.raises(DeviceError, match="not found on PATH"):
        energy.NpuSmiMeter(npu_smi="definitely-not-npu-smi-xyz")


def test_auto_picks_first_readable_and_none_with_reason(tmp_path):
    nv = FakeNvml(1)
    assert energy.open_meter("auto", nvml=nv).name == "nvml"
    root = _rapl_tree(tmp_path / "pc", [(0, 1000)])
    m = energy.open_meter("auto", nvml=FakeNvml(fail_init=True), npu_smi="no-such-npu-smi", powercap_root=root)
    assert m.name == "rapl"
    m = energy.open_meter(
        "auto", nvml=FakeNvml(fail_init=True), npu_smi="no-such-npu-smi", powercap_root=tmp_path / "none"
    )
    assert m.name == "none"
    assert "nvml:" in m.reason and "npu-smi:" in m.reason and "rapl:" in m.reason and "\n" not in m.reason
    m.start()
    r = m.stop()
    assert r.joules is None and r.reason == m.reason


def test_auto_on_this_machine_reports_none_or_a_meter():
    m = energy.open_meter("auto")  # never raises
    if m.name == "none":
        assert m.reason.startswith("no energy meter readable")
    with pytest.raises(DeviceError, match="energy meter 'joulemeter' unknown"):
        energy.open_meter("joulemeter")
    assert energy.open_meter("none").stop().joules is None


def test_open_meters_accelerator_plus_cpu(tmp_path):
    root = _rapl_tree(tmp_path / "pc", [(0, 1000)])
    ms = energy.open_meters("auto", nvml=FakeNvml(1), powercap_root=root)
    assert [m.name for m in ms] == ["nvml", "rapl"]
    ms = energy.open_meters("auto", nvml=FakeNvml(fail_init=True), npu_smi="no-such-npu-smi", powercap_root=root)
    assert [m.name for m in ms] == ["rapl"]
    (m,) = energy.open_meters(
        "auto", nvml=FakeNvml(fail_init=True), npu_smi="no-such-npu-smi", powercap_root=tmp_path / "none"
    )
    assert m.name == "none" and "nvml:" in m.reason and "rapl:" in m.reason
    assert [m.name for m in energy.open_meters("rapl,nvml", nvml=FakeNvml(1), powercap_root=root)] == ["rapl", "nvml"]
    for bad, msg in [("", "is empty"), ("nvml,nvml", "distinct"), ("auto,rapl", "distinct"), ("gpu", "unknown")]:
        with pytest.raises(DeviceError, match=msg):
            energy.open_meters(bad)
    with pytest.raises(DeviceError, match="could not be initialised"):
        energy.open_meters("nvml", nvml=FakeNvml(fail_init=True))
