"""Energy per token over the steady-state window: recorded tool outputs, timelines, idle-baseline subtraction and
J/token arithmetic (to 1%), and the RAPL reader on this machine (or its reason for not running)."""

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from parity.bench.fake_server import Script, ScriptedTransport, VirtualClock
from parity.bench.metering import measure_idle, steady_state_energy
from parity.bench.run_config import BenchConfig
from parity.bench.runner import run_bench
from parity.bench.tokenizer import load_bench_tokenizer
from parity.devices import energy
from parity.devices.energy import EnergyMeter, EnergyReading, energy_between
from parity.errors import DeviceError

DATA = Path(__file__).parent / "data" / "energy"


def _fixture(name):
    return (DATA / name).read_text()


def test_recorded_tool_outputs_parse():
    assert energy.parse_npu_smi_ids(_fixture("npu_smi_info_l.txt")) == [0, 1]
    assert energy.parse_npu_smi_power(_fixture("npu_smi_power.txt")) == 93.6
    assert energy.parse_dcmi_power(_fixture("ipmitool_dcmi_power_reading.txt")) == 412.0
    with pytest.raises(DeviceError, match="deactivated"):
        energy.parse_dcmi_power(_fixture("ipmitool_dcmi_deactivated.txt"))
    with pytest.raises(DeviceError, match="no 'Instantaneous power reading"):
        energy.parse_dcmi_power("Error: Unable to establish IPMI v2 / RMCP+ session")


def test_energy_between_interpolates_cumulative_timeline():
    tl = [(10.0, [0.0, 0.0]), (11.0, [300.0, 100.0]), (13.0, [900.0, 300.0])]
    assert energy_between(tl, 10.5, 12.0) == pytest.approx([450.0, 150.0])
    assert energy_between(tl, 9.0, 12.0) is None  # outside the metered interval
    assert energy.cumulative_trapezoid([0.0, 1.0, 3.0], [[100.0], [300.0], [300.0]]) == [
        (0.0, [0.0]),
        (1.0, [200.0]),
        (3.0, [800.0]),
    ]


def test_steady_state_energy_subtracts_idle():
    """2 devices at 300 W each over a 10 s window with 2,000 output tokens, idle 100 W each: gross 6,000 J,
    idle 2,000 J, net 4,000 J -> 2 J/token, 0.5 token/J, 300 W per device."""
    tl = [(0.0, [0.0, 0.0]), (20.0, [6000.0, 6000.0])]
    r = EnergyReading(
        meter="nvml",
        joules=12000.0,
        seconds=20.0,
        avg_watts=600.0,
        devices=["gpu0", "gpu1"],
        per_device_j=[6000.0, 6000.0],
        timeline=tl,
    )
    idle = {"seconds": 5.0, "watts_per_device": [100.0, 100.0], "watts": 200.0}
    e = steady_state_energy(r, idle, 5.0, 15.0, 2000, 4000)
    assert e["basis"] == "steady-state window" and e["window_s"] == 10.0
    assert e["gross_joules"] == pytest.approx(6000.0) and e["idle_joules"] == pytest.approx(2000.0)
    assert e["net_joules"] == pytest.approx(4000.0, rel=0.01)
    assert e["joules_per_output_token"] == pytest.approx(2.0, rel=0.01)
    assert e["output_tokens_per_joule"] == pytest.approx(0.5, rel=0.01)
    assert e["avg_watts_per_device"] == pytest.approx(300.0) and "subtracted" in e["baseline"]
    e = steady_state_energy(r, None, None, None, None, 4000)  # no window: whole run, said so
    assert e["basis"].startswith("whole metered run") and e["joules_per_output_token"] == pytest.approx(3.0)
    assert "no idle baseline" in e["baseline"]


class _Ipmi:
    """`ipmitool dcmi power reading` answering the recorded output with a fixed power."""

    def __init__(self, watts):
        self.text = _fixture("ipmitool_dcmi_power_reading.txt").replace("412 Watts", f"{watts} Watts")

    def __call__(self, argv):
        assert argv[1:] == ["dcmi", "power", "reading"]
        return SimpleNamespace(returncode=0, stdout=self.text)


def test_dcmi_meter_integrates_sampled_power_to_1_percent():
    m = energy.open_meter("dcmi", ipmitool_run=_Ipmi(220), interval_s=0.02)
    m.start()
    time.sleep(0.3)
    r = m.stop()
    assert r.meter == "dcmi" and r.samples >= 3
    assert r.joules == pytest.approx(220 * r.seconds, rel=0.01)
    t0, t1 = r.timeline[1][0], r.timeline[-2][0]
    assert sum(energy_between(r.timeline, t0, t1)) == pytest.approx(220 * (t1 - t0), rel=0.01)


class ClockNvml:
    """pynvml stand-in whose energy counters (mJ) grow at fixed watts per GPU with time.perf_counter()."""

    def __init__(self, watts):
        self.watts, self.t0 = watts, time.perf_counter()

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.watts)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H200"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return int((time.perf_counter() - self.t0) * self.watts[h] * 1e3)


def test_nvml_timeline_and_idle_baseline():
    m = energy.open_meter("nvml", nvml=ClockNvml([250.0, 150.0]), interval_s=0.02)
    idle = measure_idle([m], 0.2)[0]
    assert idle["watts_per_device"] == pytest.approx([250.0, 150.0], rel=0.02)
    m.start()
    time.sleep(0.3)
    r = m.stop()
    t0, t1 = r.timeline[1][0], r.timeline[-1][0]
    assert sum(energy_between(r.timeline, t0, t1)) == pytest.approx(400.0 * (t1 - t0), rel=0.02)
    assert measure_idle([energy.NoneMeter("x")], 0.1) == [None]


class LinearMeter(EnergyMeter):
    """Constant power per device on the (virtual) perf_counter clock: an exact cumulative timeline."""

    name = "nvml"

    def __init__(self, watts):
        self.watts = watts

    def describe(self):
        return "nvml (linear stub)"

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        t1 = time.perf_counter()
        per = [w * (t1 - self.t0) for w in self.watts]
        return EnergyReading(
            meter="nvml",
            joules=sum(per),
            seconds=t1 - self.t0,
            avg_watts=sum(self.watts),
            devices=[f"gpu{i}" for i in range(len(per))],
            per_device_j=per,
            timeline=[(self.t0, [0.0] * len(per)), (t1, per)],
        )


def test_bench_run_energy_per_token_over_window(word_tokenizer_json, monkeypatch):
    """Scripted clock, concurrency 1: window [0, (N-1) e] carries (N-1) n tokens; 2 GPUs at 300 W, idle 100 W
    each -> net 400 W x window -> J/token = 400 e / n."""
    words = ["tok", "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    tok = load_bench_tokenizer(word_tokenizer_json(words))
    ttft, itl, n, N = 0.030, 0.006, 12, 6
    e2el = ttft + (n - 1) * itl
    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    cfg = BenchConfig(
        base_url="http://127.0.0.1:9",
        model="fake",
        workload=f"fixed:in=8,out={n}",
        num_prompts=N,
        max_concurrency=1,
        progress=False,
        energy="none",
        num_devices=2,
    )
    idle = [{"seconds": 5.0, "watts_per_device": [100.0, 100.0], "watts": 200.0}]
    res = run_bench(
        cfg,
        tokenizer=tok,
        meter=LinearMeter([300.0, 300.0]),
        idle=idle,
        transport=ScriptedTransport(Script(ttft_s=ttft, itl_s=itl), clock),
    )
    st = res["energy"]["steady_state"]
    window = (N - 1) * e2el
    assert st["basis"] == "steady-state window" and st["window_s"] == pytest.approx(window)
    assert st["net_joules"] == pytest.approx(400.0 * window, rel=0.01)
    assert st["joules_per_output_token"] == pytest.approx(400.0 * e2el / n, rel=0.01)
    assert st["avg_watts_per_device"] == pytest.approx(300.0, rel=0.01)
    assert res["energy"]["idle_baseline"]["watts"] == 200.0


def test_rapl_on_this_machine_runs_or_says_why():
    root = Path(energy.POWERCAP_ROOT)
    try:
        m = energy.RaplMeter(interval_s=0.05)
    except DeviceError as e:
        assert str(e).startswith("rapl: ")  # e.g. "does not exist" (no powercap) or "permission denied"
        reason = energy.open_meters("auto")[-1]
        assert reason.name != "rapl"
        return
    assert root.is_dir()
    m.start()
    time.sleep(0.2)
    r = m.stop()
    assert r.joules >= 0 and len(r.timeline) >= 2
