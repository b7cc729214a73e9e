"""What a result was measured on: the server (its model list, ``server`` header and version endpoint), the
model, the hardware the user declared, the date, parity's version, the command line and the workload.

The server is asked before the run (never during it): ``GET /v1/models`` (OpenAI API; vLLM and SGLang add
``max_model_len``, ``owned_by``), the ``server`` response header (uvicorn, nginx, ...), and the first version
endpoint that answers among `VERSION_ENDPOINTS`. Anything the server does not offer is recorded as missing with
the reason, never an error.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import httpx

from parity import __version__, openai_client
from parity.errors import BenchError

#: Version endpoints tried in order: vLLM ``GET /version`` -> {"version": ...} (vllm/entrypoints/openai/
#: api_server.py), SGLang ``GET /get_server_info`` -> {..., "version": ...} (sglang/srt/entrypoints/
#: http_server.py), Text Generation Inference ``GET /info`` -> {"version": ...}.
VERSION_ENDPOINTS = ("/version", "/get_server_info", "/info")


async def probe_server(base_url: str, headers: dict, timeout_s: float = 10.0, transport=None) -> dict:
    """Ask the server what it is.

    Returns:
        {"models": [{"id", "owned_by", "max_model_len"}...] | None, "server_header": str | None,
        "version": str | None, "version_endpoint": path | None, "missing": [reasons]}.
    """
    root = openai_client.server_root(base_url, BenchError)
    out: dict = {"models": None, "server_header": None, "version": None, "version_endpoint": None, "missing": []}
    async with httpx.AsyncClient(transport=transport, timeout=min(timeout_s, 10.0)) as client:
        try:
            r = await client.get(root + "/v1/models", headers=headers)
            out["server_header"] = r.headers.get("server")
            if r.status_code == 200 and isinstance(r.json().get("data"), list):
                out["models"] = [
                    {"id": m.get("id"), "owned_by": m.get("owned_by"), "max_model_len": m.get("max_model_len")}
                    for m in r.json()["data"]
                    if isinstance(m, dict)
                ]
            else:
                out["missing"].append(f"GET /v1/models answered HTTP {r.status_code}")
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            out["missing"].append(f"GET /v1/models failed: {type(e).__name__}")
        for path in VERSION_ENDPOINTS:
            try:
                r = await client.get(root + path, headers=headers)
                v = r.json().get("version") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                v = None
            if v:
                out["version"], out["version_endpoint"] = str(v), path
                break
        if out["version"] is None:
            out["missing"].append(f"no version endpoint answered ({', '.join(VERSION_ENDPOINTS)})")
        if out["server_header"] is None:
            out["missing"].append("no `server` response header")
    return out


def build_metadata(cfg, server: dict | None) -> dict:
    """The result's ``metadata`` section from the run configuration and `probe_server`'s answer."""
    from parity.bench.run_config import declared_hardware

    hw = None
    if cfg.hardware:
        h = declared_hardware(cfg.hardware)
        hw = {"id": h.id, "name": h.name, "vendor": h.vendor, "family": h.family, "declared_as": cfg.hardware}
    return {
        "server": server or {"missing": ["server not asked"]},
        "base_url": cfg.base_url,
        "model": cfg.model,
        "plan_model": cfg.plan_model,
        "hardware": hw,
        "num_devices": cfg.num_devices or 1,
        "num_devices_declared": cfg.num_devices is not None,
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "parity_version": __version__,
        "command_line": cfg.command_line if cfg.command_line is not None else list(sys.argv),
        "workload": cfg.workload,
        "endpoint": cfg.endpoint,
    }


def header_lines(meta: dict) -> list[tuple[str, str]]:
    """(label, value) pairs describing `meta` for the report header and the console."""
    srv = meta.get("server") or {}
    models = ", ".join(str(m.get("id")) for m in (srv.get("models") or [])) or "-"
    version = f"{srv['version']} (GET {srv['version_endpoint']})" if srv.get("version") else "not reported"
    hw = meta.get("hardware")
    n = meta.get("num_devices") or 1
    hw_s = (
        f"{n} x {hw['name']} [{hw['id']}, family {hw['family']}] (declared)"
        if hw
        else f"not declared (--hardware); per-device figures assume {n} device(s)"
    )
    return [
        ("model", str(meta.get("model"))),
        (
            "server",
            f"{meta.get('base_url')}, `server` header "
            f"{srv.get('server_header') or '-'}, version {version}, models {models}",
        ),
        ("hardware", hw_s),
        ("date (UTC)", str(meta.get("date_utc"))),
        ("parity version", str(meta.get("parity_version"))),
        ("workload", str(meta.get("workload"))),
        ("command line", " ".join(meta.get("command_line") or [])),
    ]
