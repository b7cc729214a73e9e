"""Energy meters around a benchmark run: start/stop them, the idle baseline before the run, and the result's
energy sections (whole run, and the steady-state window minus the idle baseline)."""

from __future__ import annotations

import time

from parity.devices.energy import EnergyReading, energy_between
from parity.errors import DeviceError


def as_meters(meter) -> list:
    """None -> [], one meter -> [meter], a list -> the list."""
    if meter is None:
        return []
    return list(meter) if isinstance(meter, (list, tuple)) else [meter]


def describe_meters(meters: list) -> str:
    return "; ".join(m.describe() for m in meters) if meters else "none (not requested)"


def add_energy(result: dict, readings: list, summary: dict) -> None:
    """result["energy_meters"]: one section per meter; result["energy"]: the first (the accelerator's when
    there is one), kept for readers of a single figure."""
    sections = [energy_section(r, summary) for r in readings]
    result["energy_meters"] = sections
    result["energy"] = sections[0] if sections else energy_section(None, summary)


def stop_meter(meter):
    """Stop `meter` (None passes through). A meter failing mid-run must not cost the latency results: its
    error becomes the reading's reason (meter name kept, joules None)."""
    if meter is None:
        return None
    try:
        reading = meter.stop()
    except DeviceError as e:
        reading = EnergyReading(
            meter=meter.name, joules=None, seconds=0.0, avg_watts=None, reason=f"meter failed during the run: {e}"
        )
    meter.last_reading = reading  # kept for the steady-state window (parity.bench.runner)
    return reading


def measure_idle(meters: list, seconds: float, sleep=time.sleep) -> list[dict | None]:
    """Idle power per meter, read over `seconds` s before the run (nothing sent meanwhile).

    Returns:
        Per meter (same order): {"seconds", "watts_per_device": [W...], "watts": W summed} or None for a meter
        that reads nothing ("none") or fails (then {"reason": ...}).
    """
    out: list[dict | None] = []
    for m in meters:
        if m.name == "none":
            out.append(None)
            continue
        try:
            m.start()
            sleep(seconds)
            r = m.stop()
        except DeviceError as e:
            out.append({"reason": f"idle baseline failed: {e}"})
            continue
        if r.joules is None or not r.seconds:
            out.append({"reason": r.reason or "meter read nothing"})
            continue
        w = [j / r.seconds for j in r.per_device_j] if r.per_device_j else [r.joules / r.seconds]
        out.append({"seconds": r.seconds, "watts_per_device": w, "watts": sum(w)})
    return out


def steady_state_energy(
    reading, idle: dict | None, t0: float | None, t1: float | None, output_tokens: int | None, whole_run_tokens: int
) -> dict:
    """Energy over the steady-state window [t0, t1] (perf_counter s) minus the idle baseline.

    gross J = the meter's energy inside the window (interpolated on its timeline); idle J = idle W x window s;
    net J = gross - idle; J per output token = net / tokens arriving in the window; tokens per J its inverse;
    average W per device = gross / window / metered devices. Without a window (no steady state) the whole metered
    run is used and said so.

    Returns:
        {"basis", "window_s", "gross_joules", "idle_watts", "idle_joules", "net_joules", "output_tokens",
        "joules_per_output_token", "output_tokens_per_joule", "avg_watts_per_device", "baseline"}; figures None
        (with "reason") when the meter read nothing.
    """
    if reading is None or reading.joules is None:
        return {"basis": None, "reason": getattr(reading, "reason", None) or "no meter", "net_joules": None}
    per = energy_between(reading.timeline, t0, t1) if t0 is not None and t1 is not None and t1 > t0 else None
    if per is not None and output_tokens:
        basis, dt, tokens = "steady-state window", t1 - t0, output_tokens
    else:
        per = list(reading.per_device_j) or [reading.joules]
        basis, dt, tokens = "whole metered run (no steady-state window)", reading.seconds, whole_run_tokens
    gross = sum(per)
    n = max(len(per), 1)
    if idle and "watts" in idle:
        idle_w = idle["watts"]
        baseline = f"idle baseline {idle_w:.1f} W measured over {idle['seconds']:.1f} s before the run, subtracted"
    else:
        idle_w = 0.0
        baseline = (
            "no idle baseline subtracted (--idle-baseline 0)"
            if not idle
            else f"no idle baseline subtracted ({idle['reason']})"
        )
    net = gross - idle_w * dt
    return {
        "basis": basis,
        "window_s": dt,
        "gross_joules": gross,
        "idle_watts": idle_w if idle_w else None,
        "idle_joules": idle_w * dt,
        "net_joules": net,
        "output_tokens": tokens,
        "joules_per_output_token": net / tokens if tokens else None,
        "output_tokens_per_joule": tokens / net if tokens and net > 0 else None,
        "gross_joules_per_output_token": gross / tokens if tokens else None,
        "avg_watts_per_device": gross / dt / n if dt > 0 else None,
        "metered_devices": n,
        "baseline": baseline,
    }


def energy_section(reading, summary: dict) -> dict:
    """Energy figures of a run, each labelled with its meter: J, average W, J per output token, output tokens per J."""
    if reading is None:
        return {"meter": "none", "reason": "not requested", "joules": None}
    d = reading.to_dict()
    tout = summary.get("total_output_tokens") or 0
    j = reading.joules
    d["joules_per_output_token"] = (j / tout) if (j is not None and tout) else None
    d["output_tokens_per_joule"] = (tout / j) if (j and tout) else None
    d["provenance"] = f"measured:{reading.meter}" if j is not None else None
    return d
