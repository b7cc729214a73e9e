"""parity bench end to end against a scripted SSE server on 127.0.0.1 whose timings are known exactly."""

import asyncio
import json
import math
import os
import signal
import socket
import threading
import time

import pytest

from parity.bench.fake_server import FakeServer, Script, ScriptedTransport, VirtualClock
from parity.bench.loadgen import arrival_offsets, run_requests
from parity.bench.run_config import BenchConfig
from parity.bench.runner import run_bench
from parity.bench.tokenizer import load_bench_tokenizer
from parity.bench.workloads import build_requests
from parity.errors import BenchError

MS = 1e-3


@pytest.fixture(scope="module")
def tok(bench_tokenizer_json):
    """Word-level tokenizer: the fake server's " tok" is exactly one token."""
    return load_bench_tokenizer(bench_tokenizer_json(11))


def _cfg(url, **kw):
    base = dict(
        base_url=url,
        model="fake",
        workload="fixed:in=8,out=12",
        num_prompts=8,
        max_concurrency=2,
        progress=False,
        energy="none",
    )
    base.update(kw)
    return BenchConfig(**base)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize(
    "endpoint,k,usage",
    [("chat", 1, "continuous"), ("completions", 4, "continuous"), ("chat", 3, "none"), ("completions", 2, "final")],
)
def test_exact_timings_with_scripted_clock(tok, monkeypatch, endpoint, k, usage):
    """TTFT / TPOT / ITL / E2EL / throughput / goodput equal the script's known values (well within 1 ms).

    The scripted transport delivers each SSE event with a virtual clock set to its scripted time, so the
    measurement is exact and independent of machine load. 12 output tokens in chunks of k, first token chunk 30 ms
    after the request (after an empty role chunk at 0 ms for chat), then one chunk every 6 ms:
    chunks = 12/k; E2EL = 30 + (chunks-1)*6 ms; TPOT = (chunks-1)*6/11 ms; ITL = 6/k ms per token.
    """
    ttft, itl, n, reqs = 0.030, 0.006, 12, 8
    chunks = math.ceil(n / k)
    e2el = ttft + (chunks - 1) * itl
    tpot = (chunks - 1) * itl / (n - 1)
    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    transport = ScriptedTransport(Script(ttft_s=ttft, itl_s=itl, tokens_per_chunk=k, usage=usage), clock)
    res = run_bench(
        _cfg(
            "http://127.0.0.1:9",
            endpoint=endpoint,
            warmup=1,
            max_concurrency=1,
            num_prompts=reqs,
            slo=f"ttft_ms={ttft / MS + 1e-6},tpot_ms={tpot / MS + 1e-6}",
        ),
        tokenizer=tok,
        transport=transport,
    )
    s = res["summary"]
    assert (s["completed"], s["failed"]) == (reqs, 0)
    assert s["total_output_tokens"] == reqs * n
    src = "tokenizer" if usage == "none" else "usage"
    assert s["count_sources"] == {src: reqs}
    assert all(r["chunks"] == chunks and r["output_tokens"] == n for r in res["requests"])
    for key, want in (("ttft_ms", ttft), ("tpot_ms", tpot), ("e2el_ms", e2el), ("itl_ms", itl / k)):
        for stat in ("mean", "median", "p90", "p99", "min", "max"):
            assert s[key][stat] == pytest.approx(want / MS, abs=1e-6), (key, stat)
    assert s["itl_ms"]["count"] == reqs * (n - k)  # per token; the first chunk's tokens have no gap
    assert s["duration_s"] == pytest.approx(reqs * e2el, abs=1e-9)  # sequential requests
    assert s["request_throughput_req_s"] == pytest.approx(1 / e2el)
    assert s["output_throughput_tok_s"] == pytest.approx(n / e2el)
    assert s["good_requests"] == reqs and s["goodput_req_s"] == pytest.approx(1 / e2el)
    assert res["warmup"] == {"requests": 1, "failed": 0}
    # tighter SLOs just below the known values: no request is good
    clock2 = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock2.perf_counter)
    res = run_bench(
        _cfg(
            "http://127.0.0.1:9",
            endpoint=endpoint,
            max_concurrency=1,
            num_prompts=reqs,
            slo=f"ttft_ms={ttft / MS - 0.01:g}",
        ),
        tokenizer=tok,
        transport=ScriptedTransport(Script(ttft_s=ttft, itl_s=itl, tokens_per_chunk=k, usage=usage), clock2),
    )
    assert res["summary"]["good_requests"] == 0 and res["summary"]["goodput_req_s"] == 0.0


@pytest.mark.parametrize("endpoint,k", [("chat", 1), ("completions", 2)])
def test_real_socket_timings(tok, endpoint, k):
    """Over real HTTP on 127.0.0.1 (threaded server, real sleeps): counts exact; timings can never beat the
    script (same monotonic clock) and stay close to it (the margin absorbs load from other processes; on an
    idle 2-core machine the median TTFT error measured about 0.7 ms)."""
    ttft, itl, n = 0.020, 0.004, 12
    chunks = math.ceil(n / k)
    sc = Script(ttft_s=ttft, itl_s=itl, tokens_per_chunk=k)
    with FakeServer(sc) as srv:
        res = run_bench(_cfg(srv.base_url, endpoint=endpoint, warmup=1, workload=f"fixed:in=8,out={n}"), tokenizer=tok)
    s = res["summary"]
    assert (s["completed"], s["failed"]) == (8, 0) and s["total_output_tokens"] == 8 * n
    assert s["itl_ms"]["count"] == 8 * (n - k)
    for r in res["requests"]:
        assert r["chunks"] == chunks
        assert r["ttft_s"] >= ttft and r["e2el_s"] >= ttft + (chunks - 1) * itl
    assert s["ttft_ms"]["median"] < ttft / MS + 40
    assert s["itl_ms"]["mean"] == pytest.approx(itl / k / MS, abs=3.0)


def test_timeout_is_the_total_time_of_a_request(tok):
    """--timeout bounds a request from send to the end of its stream, not each read: a stream whose chunks
    come every 20 ms but which takes about 0.4 s in all fails under a 0.15 s timeout."""
    with FakeServer(Script(ttft_s=0.01, itl_s=0.02)) as srv:
        cfg = _cfg(srv.base_url, num_prompts=2, timeout_s=0.15, workload="fixed:in=4,out=20")
        res = run_bench(cfg, tokenizer=tok)
        s = res["summary"]
        assert (s["completed"], s["failed"]) == (0, 2)
        assert s["failure_reasons"] == {"timeout: no complete response within --timeout 0.15 s": 2}
        res = run_bench(_cfg(srv.base_url, num_prompts=2, timeout_s=30.0, workload="fixed:in=4,out=20"), tokenizer=tok)
    assert (res["summary"]["completed"], res["summary"]["failed"]) == (2, 0)


def test_goodput_counts_slo_misses(tok):
    with FakeServer(Script(ttft_s=0.020, itl_s=0.002)) as srv:
        res = run_bench(_cfg(srv.base_url, slo="ttft_ms=5"), tokenizer=tok)
    assert res["summary"]["good_requests"] == 0 and res["summary"]["goodput_req_s"] == 0.0


def test_failures_counted_with_reasons(tok):
    sc = Script(ttft_s=0.002, itl_s=0.001, fail_every=3, fail_status=503, malformed_every=4, drop_every=5)
    with FakeServer(sc) as srv:
        res = run_bench(
            _cfg(srv.base_url, num_prompts=12, max_concurrency=1, workload="fixed:in=4,out=3"), tokenizer=tok
        )
    s = res["summary"]
    # 1-based request numbers: 3,6,9,12 -> 503; 4,8 -> malformed; 5,10 -> dropped (15 would be 503 first)
    assert s["failed"] == 8 and s["completed"] == 4
    reasons = s["failure_reasons"]
    assert reasons["HTTP 503: scripted failure of request 3"] == 1
    assert sum(v for k, v in reasons.items() if k.startswith("HTTP 503")) == 4
    assert sum(v for k, v in reasons.items() if k.startswith("malformed SSE: event")) == 2
    assert sum(v for k, v in reasons.items() if k.startswith("connection closed mid-stream")) == 2


def test_unreachable_url_and_404(tok):
    url = f"http://127.0.0.1:{_free_port()}"
    res = run_bench(_cfg(url, num_prompts=3), tokenizer=tok)
    assert res["summary"]["completed"] == 0 and res["summary"]["failed"] == 3
    (reason,) = res["summary"]["failure_reasons"]
    assert reason.startswith(f"connection failed: {url}/v1/chat/completions")
    with pytest.raises(BenchError, match="all 2 warm-up request\\(s\\) to .* failed: connection failed"):
        run_bench(_cfg(url, num_prompts=3, warmup=2), tokenizer=tok)
    with FakeServer(Script()) as srv:
        res = run_bench(_cfg(srv.base_url + "/v2", num_prompts=2), tokenizer=tok)
    assert list(res["summary"]["failure_reasons"]) == ["HTTP 404: no route /v2/v1/chat/completions"]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(base_url="ftp://x"), "--base-url 'ftp://x' is not a URL"),
        (dict(model=""), "--model is required"),
        (dict(request_rate=0), "--request-rate must be > 0"),
        (dict(burstiness=0), "--burstiness must be a finite number > 0"),
        (dict(max_concurrency=0), "--max-concurrency must be >= 1"),
        (dict(slo="ttft=3"), "--slo: unknown key 'ttft'"),
        (dict(workload="random:in=5"), "`out` must be an integer"),
        (dict(endpoint="embeddings"), "--endpoint must be one of chat, completions"),
    ],
)
def test_config_errors(kw, msg):
    cfg = _cfg("http://127.0.0.1:1")
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(BenchError, match=msg):
        cfg.validate()


def _assert_on_schedule(sends, planned):
    """Never early (1 ms slack); late by at most 100 ms, a margin for other processes on a loaded 2-core box
    (idle, the lateness measured under 1 ms; 59 ms seen with two test suites sharing the cores)."""
    assert len(sends) == len(planned)
    for got, want in zip(sends, planned, strict=True):
        assert want - 0.001 <= got <= want + 0.100, (sends, planned)


def test_request_rate_and_trace_schedule(tok, tmp_path):
    """Sends follow the schedule: rate 40 req/s Poisson for 6 requests; a trace's arrival offsets exactly."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(json.dumps({"arrival_s": 5 + t, "input_len": 4, "output_len": 2}) + "\n" for t in (0.0, 0.05, 0.12))
    )
    with FakeServer(Script(ttft_s=0.001, itl_s=0.001)) as srv:
        res = run_bench(_cfg(srv.base_url, workload=f"trace:{trace}", max_concurrency=None), tokenizer=tok)
        _assert_on_schedule([r["send_s"] for r in res["requests"]], [0.0, 0.05, 0.12])
        res = run_bench(
            _cfg(srv.base_url, num_prompts=6, request_rate=40.0, seed=1, max_concurrency=None), tokenizer=tok
        )

    _assert_on_schedule([r["send_s"] for r in res["requests"]], arrival_offsets(6, 40.0, 1.0, 1))
    assert arrival_offsets(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_client_workers_share_the_load(tok, tmp_path):
    """Two client processes: every request is sent once, at its scheduled offset, and measured like in one."""
    with FakeServer(Script(ttft_s=0.010, itl_s=0.002)) as srv:
        res = run_bench(
            _cfg(
                srv.base_url,
                num_prompts=10,
                max_concurrency=3,
                warmup=2,
                request_rate=100.0,
                client_workers=2,
                slo="ttft_ms=1000",
                tokenizer=tok.name.split(":", 1)[1],
            ),
            tokenizer=tok,
        )
        assert srv.count == 12  # 10 + 2 warm-up, each sent exactly once
    s = res["summary"]
    assert (s["completed"], s["failed"], s["not_sent"]) == (10, 0, 0) and s["good_requests"] == 10
    assert [r["index"] for r in res["requests"]] == list(range(10))
    assert s["total_output_tokens"] == 10 * 12 and s["itl_ms"]["count"] == 10 * 11

    _assert_on_schedule([r["send_s"] for r in res["requests"]], arrival_offsets(10, 100.0, 1.0, 0))
    assert s["ttft_ms"]["min"] >= 10.0
    assert any("2 client worker processes" in n and "[2, 1]" in n for n in res["notes"])
    assert res["warmup"] == {"requests": 2, "failed": 0}


def test_interrupt_saves_partial_results(tok):
    """Stopping mid-run (the interrupt event, as Ctrl-C does) cancels in-flight requests and keeps the rest."""
    with FakeServer(Script(ttft_s=0.005, itl_s=0.005)) as srv:
        cfg = _cfg(srv.base_url, num_prompts=40, max_concurrency=2)
        reqs, _ = build_requests(cfg.workload, tok, cfg.num_prompts)

        async def go():
            ev, ended = asyncio.Event(), []

            def on_done():  # stop once 5 requests have ended
                ended.append(1)
                if len(ended) == 5:
                    ev.set()

            return await run_requests(cfg, reqs, tok, None, interrupt=ev, on_done=on_done)

        res = asyncio.run(go())
    s = res["summary"]
    assert res["interrupted"] is True
    assert s["completed"] >= 5 and s["failed"] == 0 and 1 <= s["interrupted"] <= 2 and s["not_sent"] > 0
    assert s["completed"] + s["interrupted"] + s["not_sent"] == 40


def test_sigint_saves_partial_results(tok, tmp_path, capsys):
    """A real SIGINT during `parity bench`, sent once 5 requests have completed: exit code 130, and the partial
    result is written with interrupted=true."""
    from parity.cli import main

    out = tmp_path / "sigint.json"
    completed_before_sigint = 5
    with FakeServer(Script(ttft_s=0.005, itl_s=0.005)) as srv:
        done = threading.Event()

        def interrupt():
            # at --max-concurrency 2, request n + 2 reaches the server only after n requests have completed
            while not done.is_set():
                if srv.wait_for_requests(completed_before_sigint + 2, timeout_s=0.05):
                    os.kill(os.getpid(), signal.SIGINT)
                    return

        killer = threading.Thread(target=interrupt, name="sigint-after-5", daemon=True)
        killer.start()
        try:
            rc = main(
                [
                    "bench",
                    "--base-url",
                    srv.base_url,
                    "--model",
                    "fake",
                    "--workload",
                    "fixed:in=8,out=12",
                    "--num-prompts",
                    "200",
                    "--max-concurrency",
                    "2",
                    "--tokenizer",
                    tok.name.split(":", 1)[1],
                    "--energy",
                    "none",
                    "--no-progress",
                    "--output",
                    str(out),
                ]
            )
        finally:
            done.set()
            killer.join()
    assert rc == 130
    saved = json.loads(out.read_text())
    s = saved["summary"]
    assert saved["interrupted"] is True and saved["config"]["num_prompts"] == 200
    assert s["completed"] >= completed_before_sigint and s["failed"] == 0 and s["not_sent"] > 0
    assert 1 <= s["interrupted"] <= 2 and s["completed"] + s["interrupted"] + s["not_sent"] == 200
    recs = saved["requests"]
    assert len(recs) == s["completed"] + s["interrupted"]
    assert sum(r["ok"] for r in recs) == s["completed"] and all(r["output_tokens"] == 12 for r in recs if r["ok"])
    assert [r["error"] for r in recs if not r["ok"]] == ["interrupted"] * s["interrupted"]
    assert "INTERRUPTED" in capsys.readouterr().out


class StubMeter:
    """An energy meter reading a fixed 12.5 J over the run (stands in for nvml / npu-smi / rapl)."""

    name = "rapl"

    def describe(self):
        return "rapl (stub)"

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        from parity.devices.energy import EnergyReading

        dt = time.perf_counter() - self.t0
        return EnergyReading(
            meter="rapl",
            joules=12.5,
            seconds=dt,
            avg_watts=12.5 / dt,
            devices=["package-0"],
            per_device_j=[12.5],
            method="stub",
            samples=2,
        )


def test_energy_figures_per_token(tok, monkeypatch, capsys):
    from parity.bench.result import render_table

    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    res = run_bench(
        _cfg("http://127.0.0.1:9", num_prompts=4, max_concurrency=1),
        tokenizer=tok,
        meter=StubMeter(),
        transport=ScriptedTransport(Script(ttft_s=0.03, itl_s=0.01), clock),
    )
    e = res["energy"]
    assert e["meter"] == "rapl" and e["provenance"] == "measured:rapl" and e["joules"] == 12.5
    assert e["seconds"] == pytest.approx(4 * (0.03 + 11 * 0.01))
    assert e["joules_per_output_token"] == pytest.approx(12.5 / 48)
    assert e["output_tokens_per_joule"] == pytest.approx(48 / 12.5)
    render_table(res)
    text = capsys.readouterr().out
    assert "energy per output token, rapl (J/tok)" in text and "0.2604" in text

    class GpuStub(StubMeter):
        name = "nvml"

        def stop(self):
            r = super().stop()
            r.meter, r.joules, r.devices = "nvml", 100.0, ["gpu0: stub"]
            return r

    res = run_bench(
        _cfg("http://127.0.0.1:9", num_prompts=2, max_concurrency=1),
        tokenizer=tok,
        meter=[GpuStub(), StubMeter()],
        transport=ScriptedTransport(Script(ttft_s=0.03, itl_s=0.01), clock),
    )
    assert [e["meter"] for e in res["energy_meters"]] == ["nvml", "rapl"] and res["energy"]["meter"] == "nvml"
    assert res["energy_meters"][0]["joules_per_output_token"] == pytest.approx(100.0 / 24)
    assert res["environment"]["energy_meter"] == "rapl (stub); rapl (stub)"

    class FailingMeter(StubMeter):
        def stop(self):
            from parity.errors import DeviceError

            raise DeviceError("rapl: reading energy_uj failed during the run: EIO")

    res = run_bench(
        _cfg("http://127.0.0.1:9", num_prompts=2, max_concurrency=1),
        tokenizer=tok,
        meter=FailingMeter(),
        transport=ScriptedTransport(Script(ttft_s=0.03, itl_s=0.01), clock),
    )
    assert res["summary"]["completed"] == 2  # latency results survive a failing meter
    assert res["energy"]["joules"] is None and res["energy"]["reason"].startswith("meter failed during the run: rapl")


def test_cli_end_to_end_with_report(bench_tokenizer_json, tmp_path, capsys):
    from parity.cli import main

    tpath = bench_tokenizer_json(11)
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    with FakeServer(Script(ttft_s=0.004, itl_s=0.002)) as srv:
        for out, conc in ((out1, "1"), (out2, "4")):
            rc = main(
                [
                    "bench",
                    "--base-url",
                    srv.base_url + "/v1",
                    "--model",
                    "fake",
                    "--workload",
                    "random:in=10,out=6,ratio=0.5",
                    "--num-prompts",
                    "8",
                    "--max-concurrency",
                    conc,
                    "--tokenizer",
                    str(tpath),
                    "--slo",
                    "ttft_ms=500",
                    "--energy",
                    "auto",
                    "--no-progress",
                    "--output",
                    str(out),
                ]
            )
            assert rc == 0
    text = capsys.readouterr().out
    assert "TTFT median (ms)" in text and "goodput" in text and "energy" in text and "none: " in text
    data = json.loads(out1.read_text())
    assert data["schema"] == "parity.bench.result" and data["version"] == 1
    assert data["config"]["workload"] == "random:in=10,out=6,ratio=0.5" and len(data["requests"]) == 8
    assert {"parity_version", "python", "platform", "tokenizer", "energy_meter"} <= set(data["environment"])
    assert any("Tokens are counted, not chunks" in n for n in data["notes"])
    assert data["energy"]["meter"] in ("none", "nvml", "npu-smi", "rapl", "dcmi")
    if data["energy"]["meter"] == "none":
        assert data["energy"]["reason"].startswith("no energy meter readable")
    report = tmp_path / "report.html"
    assert main(["bench", "report", str(out1), str(out2), "--out", str(report)]) == 0
    html = report.read_text()
    whole_runs = html.split("<h2>Whole runs</h2>")[1].split("<h2>")[0]
    assert "latency CDFs" in html and "data:image/png;base64," in html and whole_runs.count("<tr>") == 3
    assert "Tokens are counted, not chunks" in html
    assert main(["bench", "--model", "x"]) == 2  # missing --base-url -> clear error, no traceback
    assert "--base-url is required" in capsys.readouterr().err
    assert main(["bench", "--base-url", "http://127.0.0.1:1", "--model", "x", "--workload", "fixed:in=3"]) == 2
    assert "`out` must be an integer" in capsys.readouterr().err


# ------------------------------------------------------------------ --model defaults to the server's first model
def test_model_defaults_to_first_listed_model(tok, capsys):
    from parity.cli import main

    with FakeServer(Script(ttft_s=0.002, itl_s=0.001)) as srv:
        res = run_bench(_cfg(srv.base_url + "/v1", model=None, num_prompts=2), tokenizer=tok)
        assert res["config"]["model"] == "fake" and res["summary"]["completed"] == 2
        assert any("--model not given: benchmarked 'fake'" in n for n in res["notes"])
        # the obvious command, without --model, works (tokenizer: the default V4 one)
        rc = main(
            [
                "bench",
                "--base-url",
                srv.base_url,
                "--workload",
                "fixed:in=4,out=2",
                "--num-prompts",
                "1",
                "--energy",
                "none",
                "--no-progress",
            ]
        )
    assert rc == 0 and "parity bench - fake @" in capsys.readouterr().out


@pytest.mark.parametrize(
    "status,body,msg",
    [
        (200, {"object": "list", "data": []}, "the server lists no models at http://h:1/v1/models"),
        (401, {"error": {"message": "bad key"}}, "answered HTTP 401 \\(check --api-key.*bad key"),
        (200, {"models": ["x"]}, "did not answer an OpenAI model list"),
        (200, {"data": [{"object": "model"}]}, "first model listed .* has no id"),
        (200, "not json", "did not answer an OpenAI model list"),
    ],
)
def test_model_default_errors(status, body, msg):
    import httpx

    seen = []

    def handler(request):
        seen.append((request.url.path, request.headers.get("authorization")))
        return httpx.Response(status, json=body) if not isinstance(body, str) else httpx.Response(status, text=body)

    with pytest.raises(BenchError, match=msg + ".*pass --model NAME"):
        run_bench(
            _cfg("http://h:1/v1", model="", api_key="sk-1"), tokenizer=object(), transport=httpx.MockTransport(handler)
        )
    assert seen == [("/v1/models", "Bearer sk-1")]


def test_model_default_unreachable_server():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(BenchError, match=f"--model not given and GET {url}/v1/models failed: server unreachable"):
        run_bench(_cfg(url, model=None), tokenizer=object())
    with pytest.raises(BenchError, match="--slo: got an empty value"):  # config errors come before any request
        run_bench(_cfg(url, model=None, slo=""), tokenizer=object())


def test_model_default_timeout_says_it_timed_out():
    import httpx

    def handler(request):
        raise httpx.ReadTimeout("read timed out", request=request)

    with pytest.raises(BenchError) as e:
        run_bench(
            _cfg("http://h:1", model=None, timeout_s=0.25), tokenizer=object(), transport=httpx.MockTransport(handler)
        )
    msg = str(e.value)
    assert msg.startswith("GET http://h:1/v1/models (asked for the model, as --model is not given) timed out after ")
    assert "0.25 s (ReadTimeout); pass a longer --timeout, or --model NAME to skip the lookup" in msg


def test_empty_api_key_is_refused():
    with pytest.raises(BenchError, match=r"^--api-key is empty; .*pass no --api-key"):
        _cfg("http://127.0.0.1:1", api_key="").validate()


@pytest.mark.parametrize(
    "served, needle",
    [("tiny", "test miniature"), ("deepseek-ai/DeepSeek-V4-Pro", "is 'v4-pro'"), ("fake", "names no planner preset")],
)
def test_served_model_that_is_not_the_plan_model_warns_at_run_time(tok, capsys, served, needle):
    with FakeServer(Script(ttft_s=0.001, itl_s=0.001)) as srv:
        res = run_bench(_cfg(srv.base_url, model=served, num_prompts=2, plan_model="v4-flash"), tokenizer=tok)
    err = capsys.readouterr().err
    assert f"warning: served model {served!r}" in err and needle in err and "'v4-flash'" in err
    assert any(needle in n for n in res["notes"])
    assert res["metadata"]["model"] == served and res["metadata"]["plan_model"] == "v4-flash"


def test_served_model_matching_the_plan_model_does_not_warn(tok, capsys):
    with FakeServer(Script(ttft_s=0.001, itl_s=0.001)) as srv:
        res = run_bench(
            _cfg(srv.base_url, model="deepseek-ai/DeepSeek-V4-Flash", num_prompts=2, plan_model="v4-flash"),
            tokenizer=tok,
        )
    assert "served model" not in capsys.readouterr().err and not any("served model" in n for n in res["notes"])


def test_bench_report_draws_no_modeled_frontier_for_another_served_model():
    from parity.bench.frontier_report import modeled_frontier

    result = {
        "metadata": {"model": "tiny", "plan_model": "v4-flash", "hardware": {"id": "h200"}},
        "requests": [{"ok": True, "prompt_tokens": 8, "output_tokens": 8}],
    }
    pts, why = modeled_frontier(result)
    assert pts == [] and "test miniature" in why and "'v4-flash'" in why
