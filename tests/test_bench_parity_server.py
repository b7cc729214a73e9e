"""parity bench against a real parity server (FastAPI/uvicorn on 127.0.0.1, the real engine on the default
miniature model, CPU): every request completes, token counts agree with the server's usage and /metrics."""

from __future__ import annotations

import re

import httpx
import pytest

pytest.importorskip("torch")

from parity.bench.run_config import BenchConfig  # noqa: E402
from parity.bench.runner import run_bench  # noqa: E402


@pytest.fixture(scope="module")
def parity_server():
    from parity.engine import AsyncEngine, EngineArgs
    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import ThreadedServer

    engine = AsyncEngine(
        EngineArgs(device="cpu", max_model_len=256, cache_memory=16 << 20, max_num_seqs=8, max_num_batched_tokens=512)
    )
    srv = ThreadedServer(
        build_app(engine, ServerSettings(served_model_names=["tiny"], drain_timeout_s=2.0)), drain_timeout_s=2.0
    ).start()
    yield srv
    srv.stop()


def _generated_tokens(base_url: str) -> float:
    """The server's own count of generated tokens (Prometheus counter parity_generation_tokens_total)."""
    m = re.search(r"^parity_generation_tokens_total ([0-9.e+]+)$", httpx.get(base_url + "/metrics").text, re.M)
    assert m, "parity_generation_tokens_total missing from /metrics"
    return float(m.group(1))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bench_against_parity_server(parity_server, endpoint, tmp_path):
    before = _generated_tokens(parity_server.base_url)
    cfg = BenchConfig(
        base_url=parity_server.base_url + "/v1",
        model="tiny",
        endpoint=endpoint,
        workload="random:in=24,out=6,ratio=0.5,convention=vllm",
        num_prompts=6,
        max_concurrency=3,
        warmup=1,
        ignore_eos=True,
        slo="ttft_ms=60000",
        progress=False,
        energy="auto",
        output=str(tmp_path / "r.json"),
    )
    res = run_bench(cfg)
    s = res["summary"]
    assert s["failed"] == 0, s["failure_reasons"]
    assert s["completed"] == 6 and s["good_requests"] == 6
    for r in res["requests"]:
        assert r["count_source"] == "usage"  # final usage chunk: exact output count
        assert r["output_tokens"] == r["requested_output_tokens"]  # ignore_eos honoured
        assert r["ttft_s"] > 0 and r["e2el_s"] >= r["ttft_s"]
    assert s["total_output_tokens"] == sum(r["requested_output_tokens"] for r in res["requests"])
    assert s["tpot_ms"]["count"] == 6 and s["output_throughput_tok_s"] > 0
    # the server counted the same tokens (the warm-up request repeats workload request 0)
    warm = res["requests"][0]["requested_output_tokens"]
    assert _generated_tokens(parity_server.base_url) - before == s["total_output_tokens"] + warm
    assert (tmp_path / "r.json").is_file()


def test_sweep_against_parity_server(parity_server, tmp_path):
    """A two-point sweep against parity's own server gives per-point results, a frontier and the report."""
    from parity.bench.report import write_report
    from parity.bench.sweep import run_sweep

    cfg = BenchConfig(
        base_url=parity_server.base_url,
        model="tiny",
        workload="fixed:in=16,out=4",
        num_prompts=6,
        ignore_eos=True,
        progress=False,
        energy="none",
        hardware="h200",
        num_devices=1,
    )
    index = run_sweep(cfg, [1, 3], None, None, tmp_path)
    assert [p["file"] for p in index["points"]] == ["c1-rinf.json", "c3-rinf.json"]
    assert all(p["output_tok_s_per_device"] > 0 and p["tok_s_per_user"] > 0 for p in index["points"])
    assert index["frontiers"]["workload"]
    files = [str(tmp_path / p["file"]) for p in index["points"]]
    html = write_report(files, tmp_path / "report.html").read_text()
    assert "throughput-latency frontier" in html and "h200" in html


def test_a_workload_longer_than_the_servers_context_is_refused_before_any_request(parity_server, capsys):
    """A synthetic workload whose every request exceeds the max_model_len that GET /v1/models reports fails at
    once with one line (before its prompts are built or sent), and absurd lengths are refused while parsing."""
    from parity import cli

    base = ["bench", "--base-url", parity_server.base_url, "--model", "tiny", "--num-prompts", "2"]
    assert cli.main([*base, "--workload", "fixed:in=300,out=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "every request needs at least 302 tokens (prompt + output), more than the max_model_len 256 that the "
        "server reports for --model 'tiny'"
    ), err
    assert cli.main([*base, "--workload", "fixed:in=99999999,out=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "`in` must be at most 2097152 tokens" in err[-1], err
