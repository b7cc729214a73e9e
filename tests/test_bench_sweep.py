"""Sweeps: the steady-state window, the frontier arithmetic, the stop rule, metadata, the CLI and its report."""

import json
import time

import pytest

from parity.bench.fake_server import FakeServer, Script, ScriptedTransport, VirtualClock
from parity.bench.frontier import pareto_frontier
from parity.bench.metrics import RequestRecord
from parity.bench.run_config import BenchConfig
from parity.bench.runner import run_bench
from parity.bench.steady_state import steady_state, steady_state_window
from parity.bench.sweep import load_points, past_slo, run_sweep, workload_for
from parity.bench.tokenizer import load_bench_tokenizer
from parity.errors import BenchError


@pytest.fixture(scope="module")
def tok(bench_tokenizer_json):
    return load_bench_tokenizer(bench_tokenizer_json(11))


def _rec(i, send):
    # 4 tokens: first at send + 0.25, then one every 0.25 s; E2EL 1.0 s (binary-exact times)
    return RequestRecord(index=i, ok=True, send_s=send, ttft_s=0.25, e2el_s=1.0, itl_s=[0.25] * 3, output_tokens=4)


def test_steady_state_window_and_figures_exact():
    """Target 2 in flight: reached at 0.5 s (A running, B sent), last send 1.5 s. Tokens arriving in [0.5, 1.5]:
    A 3, B 4, C 2, D 0 = 9 over 1 s; requests sent inside: B, C, D, TPOT 0.75 / 3 = 250 ms -> 4 tok/s per user."""
    recs = [_rec(0, 0.0), _rec(1, 0.5), _rec(2, 1.0), _rec(3, 1.5)]
    w = steady_state_window(recs, 2)
    assert (w["start_s"], w["end_s"], w["duration_s"]) == (0.5, 1.5, 1.0)
    assert w["mean_concurrency"] == pytest.approx(2.0) and w["reached_concurrency"] == 2
    ss = steady_state(recs, 2, num_devices=2)
    assert ss["output_tokens"] == 9 and ss["output_throughput_tok_s"] == pytest.approx(9.0)
    assert ss["output_tok_s_per_device"] == pytest.approx(4.5)
    assert ss["requests_sent"] == 3 and ss["tpot_ms_median"] == pytest.approx(250.0)
    assert ss["tok_s_per_user"] == pytest.approx(4.0) and ss["ttft_ms_median"] == pytest.approx(250.0)
    # all sent at once: no steady state, said so
    burst = [_rec(i, 0.0) for i in range(4)]
    w = steady_state_window(burst, 4)
    assert w["duration_s"] == 0.0 and "no steady state" in w["note"]
    assert steady_state(burst, 4)["output_throughput_tok_s"] is None
    w = steady_state_window(recs, 3)
    assert "never reached" in w["note"]


def test_pareto_frontier():
    pts = [
        {"n": "a", "tok_s_per_user": 100, "output_tok_s_per_device": 50},
        {"n": "b", "tok_s_per_user": 50, "output_tok_s_per_device": 200},
        {"n": "c", "tok_s_per_user": 40, "output_tok_s_per_device": 150},  # dominated by b
        {"n": "d", "tok_s_per_user": 20, "output_tok_s_per_device": 400},
        {"n": "e", "tok_s_per_user": None, "output_tok_s_per_device": 900},
    ]
    assert [p["n"] for p in pareto_frontier(pts)] == ["a", "b", "d"]


def test_scripted_sequential_run_steady_state(tok, monkeypatch):
    """Concurrency 1 on the scripted clock: N requests of E2EL e back to back, window [0, (N-1) e] holds the
    N-1 first requests' tokens: throughput n / e, tok/s per user 1 / TPOT."""
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
        hardware="h200",
        num_devices=8,
    )
    res = run_bench(cfg, tokenizer=tok, transport=ScriptedTransport(Script(ttft_s=ttft, itl_s=itl), clock))
    ss = res["steady_state"]
    assert ss["start_s"] == pytest.approx(0.0) and ss["end_s"] == pytest.approx((N - 1) * e2el)
    assert ss["output_tokens"] == (N - 1) * n
    assert ss["output_throughput_tok_s"] == pytest.approx(n / e2el)
    assert ss["output_tok_s_per_device"] == pytest.approx(n / e2el / 8)
    assert ss["tok_s_per_user"] == pytest.approx(1 / itl)
    meta = res["metadata"]
    assert meta["hardware"]["id"] == "h200" and meta["num_devices"] == 8 and meta["model"] == "fake"
    assert meta["parity_version"] and meta["date_utc"] and meta["workload"] == cfg.workload


def test_hardware_validated_against_catalog():
    with pytest.raises(BenchError, match="--hardware: unknown hardware 'h2000'"):
        BenchConfig(base_url="http://x:1", model="m", hardware="h2000").validate()
    with pytest.raises(BenchError, match="--num-devices"):
        BenchConfig(base_url="http://x:1", model="m", num_devices=0).validate()


def test_load_points_and_workload_lengths():
    assert load_points([4, 1], None) == [(1, float("inf")), (4, float("inf"))]
    assert load_points([1], [2.0, 1.0]) == [(1, 1.0), (1, 2.0)]
    with pytest.raises(BenchError, match="--concurrency and/or --request-rate"):
        load_points(None, None)
    assert workload_for("random:in=5,out=5,ratio=0.5", 100, 10) == "random:in=100,out=10,ratio=0.5,convention=vllm"
    with pytest.raises(BenchError, match="random or fixed"):
        workload_for("trace:/x.jsonl", 1, 1)


def test_stop_rule():
    res = {
        "steady_state": {"duration_s": 1.0, "ttft_ms_median": 50.0, "tpot_ms_median": 21.0},
        "summary": {"ttft_ms": {"median": 10.0}, "tpot_ms": {"median": 5.0}},
    }
    assert past_slo(res, {"ttft_ms": 100, "tpot_ms": 20}) is None  # 21 <= 2 x 20
    assert "TPOT 21.0 ms > 2 x SLO 10 ms" in past_slo(res, {"tpot_ms": 10})


def test_sweep_against_scripted_server_with_report(tok, tmp_path):
    """Real sockets: three concurrency points per ISL/OSL pair, results + sweep.json + HTML/PNG report; a tight TPOT
    SLO stops the sweep after its first point."""
    from parity.bench.report import write_report

    sc = Script(ttft_s=0.004, itl_s=0.002)
    with FakeServer(sc) as srv:
        cfg = BenchConfig(
            base_url=srv.base_url,
            model="fake",
            workload="fixed:in=8,out=8",
            num_prompts=8,
            progress=False,
            energy="none",
            hardware="910c",
            num_devices=2,
            slo="tpot_ms=1000",
            plan_model="v4-flash",
        )
        index = run_sweep(cfg, [1, 2, 4], None, [(8, 8), (16, 6)], tmp_path / "s", tokenizer=tok)
        assert [p["file"] for p in index["points"]][:3] == [
            "isl8-osl8-c1-rinf.json",
            "isl8-osl8-c2-rinf.json",
            "isl8-osl8-c4-rinf.json",
        ]
        assert len(index["points"]) == 6 and not index["stopped"]
        assert set(index["frontiers"]) == {"8/8", "16/6"} and index["frontiers"]["8/8"]
        cfg2 = BenchConfig(**{**cfg.__dict__, "slo": "tpot_ms=0.1"})
        index2 = run_sweep(cfg2, [1, 2, 4], None, None, tmp_path / "t", tokenizer=tok)
        assert len(index2["points"]) == 1 and "higher loads skipped" in index2["stopped"]["workload"]
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert saved["schema"] == "parity.bench.sweep"
    one = json.loads((tmp_path / "s" / "isl8-osl8-c2-rinf.json").read_text())
    assert one["sweep"]["concurrency"] == 2 and one["metadata"]["server"]["server_header"].startswith("parity-fake")
    assert one["steady_state"]["target_concurrency"] == 2
    files = [str(tmp_path / "s" / p["file"]) for p in index["points"]]
    out = write_report(files, tmp_path / "r.html")
    html = out.read_text()
    assert "throughput-latency frontier" in html and "910c" in html and "modeled" in html
    assert "command line" in html
    assert write_report(files, tmp_path / "r.png").stat().st_size > 1000


def test_sweep_cli(bench_tokenizer_json, tmp_path, capsys):
    from parity.cli import main

    with FakeServer(Script(ttft_s=0.003, itl_s=0.001)) as srv:
        rc = main(
            [
                "bench",
                "sweep",
                "--base-url",
                srv.base_url,
                "--model",
                "fake",
                "--workload",
                "fixed:in=4,out=4",
                "--num-prompts",
                "6",
                "--concurrency",
                "1,2",
                "--tokenizer",
                str(bench_tokenizer_json(11)),
                "--energy",
                "none",
                "--no-progress",
                "--out-dir",
                str(tmp_path / "o"),
                "--hardware",
                "h200",
            ]
        )
    assert rc == 0
    text = capsys.readouterr().out
    assert "c1-rinf.json" in text and "report written" in text
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "report.png").is_file()
    meta = json.loads((tmp_path / "o" / "c2-rinf.json").read_text())["metadata"]
    assert meta["command_line"][:4] == ["parity", "bench", "sweep", "--base-url"]
    assert "--concurrency" in meta["command_line"] and meta["hardware"]["id"] == "h200"


def test_sweep_refuses_zero_prompts(tok, tmp_path):
    cfg = BenchConfig(base_url="http://127.0.0.1:9", model="m", num_prompts=0, progress=False, energy="none")
    with pytest.raises(BenchError, match="--num-prompts must be >= 1, got 0"):
        run_sweep(cfg, [1], None, None, tmp_path / "s", tokenizer=tok)
    with pytest.raises(BenchError, match="--num-prompts must be >= 1"):
        cfg.validate()


def test_report_reads_a_sweep_directory_its_glob_and_its_index(tok, tmp_path):
    from parity.bench.report import write_report
    from parity.bench.result import result_files

    with FakeServer(Script(ttft_s=0.002, itl_s=0.001)) as srv:
        cfg = BenchConfig(
            base_url=srv.base_url,
            model="fake",
            workload="fixed:in=4,out=4",
            num_prompts=3,
            progress=False,
            energy="none",
        )
        run_sweep(cfg, [1, 2], None, None, tmp_path / "s", tokenizer=tok)
    d = tmp_path / "s"
    points = [d / "c1-rinf.json", d / "c2-rinf.json"]
    assert result_files([d]) == points  # a directory: its results, the index read as its points
    assert result_files(sorted(d.glob("*.json"))) == points  # the shell's DIR/*.json, sweep.json included
    assert result_files([d / "sweep.json"]) == points
    assert write_report([d], tmp_path / "r.html").is_file()
    with pytest.raises(BenchError, match="not found"):
        result_files([tmp_path / "nope"])
