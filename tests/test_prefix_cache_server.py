"""`usage.prompt_tokens_details.cached_tokens` and the prefix-cache counters over HTTP (real engine, default
miniature: prefix blocks of 128 tokens), chat and completions, streamed and not; 0 with caching off."""

from __future__ import annotations

import json
import re

import httpx
import pytest

pytest.importorskip("torch")

from parity.engine import AsyncEngine, EngineArgs  # noqa: E402
from parity.server.app import ServerSettings, build_app  # noqa: E402
from parity.server.launcher import ThreadedServer  # noqa: E402

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 14


def serve(**kw):
    engine = AsyncEngine(EngineArgs(device="cpu", max_model_len=1024, cache_memory=64 << 20, **kw))
    return ThreadedServer(build_app(engine, ServerSettings(served_model_names=["tiny"])), drain_timeout_s=2.0).start()


def metric(base_url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", httpx.get(base_url + "/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def stream_usage(url: str, body: dict) -> dict:
    with httpx.stream(
        "POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60
    ) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    return json.loads(lines[-1])["usage"]


@pytest.fixture(scope="module")
def on():
    srv = serve()
    yield srv
    srv.stop()


def test_cached_tokens_in_usage_chat_and_completions(on):
    base = on.base_url + "/v1"
    prompt = list(range(1000, 1300))  # 300 tokens: two whole 128-token blocks
    comp = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = httpx.post(base + "/completions", json=comp, timeout=60).json()["usage"]
    again = httpx.post(base + "/completions", json=comp, timeout=60).json()["usage"]
    streamed = stream_usage(base + "/completions", comp)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0 and first["prompt_tokens"] == 300
    assert again["prompt_tokens_details"]["cached_tokens"] == 256
    assert streamed["prompt_tokens_details"]["cached_tokens"] == 256 and streamed["prompt_tokens"] == 300

    def chat(q: str) -> dict:
        return {
            "model": "tiny",
            "max_tokens": 2,
            "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        }

    a = httpx.post(base + "/chat/completions", json=chat("What is 2 + 2?"), timeout=60).json()["usage"]
    b = httpx.post(base + "/chat/completions", json=chat("Name a color."), timeout=60).json()["usage"]
    c = stream_usage(base + "/chat/completions", chat("Name a fruit."))
    assert a["prompt_tokens"] > 128 and a["prompt_tokens_details"]["cached_tokens"] == 0
    for u in (b, c):
        assert 0 < u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]
        assert u["prompt_tokens_details"]["cached_tokens"] % 128 == 0
    hits = metric(on.base_url, "parity_prefix_cache_hits_total")
    assert hits == 256 * 2 + b["prompt_tokens_details"]["cached_tokens"] + c["prompt_tokens_details"]["cached_tokens"]
    assert metric(on.base_url, "parity_prefix_cache_queries_total") >= 300 * 3
    assert metric(on.base_url, "parity_cache_used_bytes") == 0


def test_no_cached_tokens_with_caching_off():
    srv = serve(enable_prefix_caching=False)
    try:
        body = {"model": "tiny", "prompt": list(range(1000, 1300)), "max_tokens": 1, "temperature": 0}
        for _ in range(2):
            u = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60).json()["usage"]
            assert u["prompt_tokens_details"] == {"cached_tokens": 0}
        assert metric(srv.base_url, "parity_prefix_cache_hits_total") == 0
    finally:
        srv.stop()


def test_cli_flags_reach_engine_args():
    from parity.cli import build_parser
    from parity.server.serve_cli import engine_kwargs

    p = build_parser()
    assert engine_kwargs(p.parse_args(["serve"]))["enable_prefix_caching"] is True
    kw = engine_kwargs(p.parse_args(["serve", "--no-enable-prefix-caching", "--prefix-block-tokens", "256"]))
    assert kw["enable_prefix_caching"] is False and kw["prefix_block_tokens"] == 256
    assert EngineArgs(**kw).enable_prefix_caching is False
