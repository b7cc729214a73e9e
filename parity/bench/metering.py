"""Energy meters around a benchmark run: start/stop them, and the result's energy sections."""

from __future__ import annotations

from parity.devices.energy import EnergyReading
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
        return meter.stop()
    except DeviceError as e:
        return EnergyReading(meter=meter.name, joules=None, seconds=0.0, avg_watts=None,
                             reason=f"meter failed during the run: {e}")


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
