"""parity bench building blocks: workloads (both random-range conventions), SLO syntax, metrics, tokenizer, report."""

import json
import math
import re

import numpy as np
import pytest

from parity.bench import workloads as wl
from parity.bench.metrics import RequestRecord, meets_slo, parse_slo, stats_ms, summarize
from parity.bench.tokenizer import load_bench_tokenizer
from parity.errors import BenchError


# ------------------------------------------------------------------ workloads
def test_range_conventions_differ_and_match_reference_definitions():
    # vLLM: symmetric [floor(L(1-r)), ceil(L(1+r))]
    assert wl.length_range(100, 0.5, "vllm") == (50, 150)
    assert wl.length_range(10, 0.25, "vllm") == (7, 13)  # floor(7.5), ceil(12.5)
    assert wl.length_range(100, 0.0, "vllm") == (100, 100)
    # SGLang: [max(int(L r), 1), L]
    assert wl.length_range(100, 0.5, "sglang") == (50, 100)
    assert wl.length_range(100, 1.0, "sglang") == (100, 100)
    assert wl.length_range(100, 0.0, "sglang") == (1, 100)
    rng = np.random.default_rng(0)
    v = wl.sample_lengths(100, 0.5, "vllm", 4000, rng)
    s = wl.sample_lengths(100, 0.5, "sglang", 4000, rng)
    assert min(v) == 50 and max(v) == 150 and abs(np.mean(v) - 100) < 2
    assert min(s) == 50 and max(s) == 100 and abs(np.mean(s) - 75) < 2


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("zipf:in=3", "unknown kind 'zipf'"),
        ("random:in=10", "`out` must be an integer"),
        ("random:in=10,out=0", "`out` must be an integer >= 1, got 0"),
        ("random:in=10,out=5,ratio=1.0", r"ratio for convention=vllm must be in \[0, 1\)"),
        ("random:in=10,out=5,ratio=1.5,convention=sglang", r"convention=sglang must be in \[0, 1\]"),
        ("random:in=10,out=5,convention=trt", "convention must be one of vllm, sglang"),
        ("fixed:in=10,out=5,ratio=0.1", "unknown key"),
        ("sharegpt:", "needs a file path"),
        ("fixed:in=10,5", "is not key=value"),
    ],
)
def test_workload_spec_errors(spec, msg):
    with pytest.raises(BenchError, match=msg):
        wl.parse_workload(spec)


def test_random_and_fixed_prompts_have_exact_token_counts(tok):
    reqs, notes = wl.build_requests("random:in=40,out=8,ratio=0.5,convention=sglang", tok, 20, seed=3)
    assert len(reqs) == 20
    for r in reqs:
        assert 20 <= r.prompt_tokens <= 40 and 4 <= r.output_tokens <= 8
        assert tok.count(r.prompt) == r.prompt_tokens
    assert "sglang range convention" in notes[0] and "[20, 40]" in notes[0]
    again, _ = wl.build_requests("random:in=40,out=8,ratio=0.5,convention=sglang", tok, 20, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded
    fixed, _ = wl.build_requests("fixed:in=17,out=5", tok, 6, seed=0)
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(17, 5)}
    assert len({r.prompt for r in fixed}) == 6  # no shared prompts


def test_default_v4_tokenizer_builds_exact_prompts():
    t = load_bench_tokenizer(None)
    assert t.vocab_size > 100_000
    reqs, _ = wl.build_requests("fixed:in=64,out=4", t, 3, seed=1)
    assert [r.prompt_tokens for r in reqs] == [64, 64, 64]
    assert all(t.count(r.prompt) == 64 for r in reqs)


def test_sharegpt_dataset(tok, tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "alpha bravo charlie"}, {"from": "gpt", "value": "delta echo"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "golf"}, {"from": "gpt", "value": "hotel india juliet kilo"}]},
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    reqs, notes = wl.build_requests(f"sharegpt:{p}", tok, 5, seed=0)
    assert sorted((r.prompt_tokens, r.output_tokens) for r in reqs) == [(1, 4), (3, 2)]
    assert "fewer than --num-prompts" in notes[0]
    reqs, _ = wl.build_requests(f"sharegpt:path={p},out=7", tok, None, seed=0)
    assert {r.output_tokens for r in reqs} == {7}


@pytest.mark.parametrize(
    "content,msg",
    [
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "must hold a JSON list"),
        ("[]", "no conversation with at least two turns"),
        ('[{"x": 1}]', "entry 0 has no `conversations` list"),
        ('[{"conversations": [{"from": "human"}, {"from": "gpt"}]}]', "each turn needs a `value`"),
    ],
)
def test_sharegpt_bad_files(tok, tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(BenchError, match=msg):
        wl.build_requests(f"sharegpt:{p}", tok, 3)
    with pytest.raises(BenchError, match="not found"):
        wl.build_requests(f"sharegpt:{tmp_path / 'missing.json'}", tok, 3)
    with pytest.raises(BenchError, match="is a directory, not a file"):
        wl.build_requests(f"sharegpt:{tmp_path}", tok, 3)


def test_trace_replay(tok, tmp_path):
    p = tmp_path / "trace.jsonl"
    p.write_text(
        '{"arrival_s": 10.5, "input_len": 12, "output_len": 3}\n\n'
        '{"arrival_s": 10.0, "input_len": 5, "output_len": 2}\n'
        '{"timestamp_ms": 12000, "prompt": "alpha bravo", "output_length": 4}\n'
    )
    reqs, notes = wl.build_requests(f"trace:{p}", tok, None)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.0]
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(5, 2), (12, 3), (2, 4)]
    assert any("trace replay" in n for n in notes)


@pytest.mark.parametrize(
    "content,msg",
    [
        ("", "is empty"),
        ("{bad\n", "line 1 is not valid JSON"),
        ('{"input_len": 3, "output_len": 2}\n', "line 1 lacks `arrival_s`"),
        (
            '{"arrival_s": 0, "input_len": 3, "output_len": 2}\n{"arrival_s": -1, "input_len": 3, "output_len": 2}\n',
            r"line 2: `arrival_s` \(arrival time\) must be a finite number >= 0, got -1",
        ),
        ('{"arrival_s": 0, "input_len": 0, "output_len": 2}\n', "`input_len` must be an integer >= 1, got 0"),
        ("[1, 2]\n", "line 1 must be a JSON object"),
    ],
)
def test_trace_bad_files(tok, tmp_path, content, msg):
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(BenchError, match=msg):
        wl.build_requests(f"trace:{p}", tok, None)


@pytest.mark.parametrize(
    "line,field,got",
    [
        ('{"arrival_s": Infinity, "input_len": 3, "output_len": 2}', "arrival_s", "inf"),  # used to hang the run
        ('{"arrival_s": NaN, "input_len": 3, "output_len": 2}', "arrival_s", "nan"),  # used to be accepted
        ('{"arrival_s": -Infinity, "input_len": 3, "output_len": 2}', "arrival_s", "-inf"),
        ('{"timestamp_ms": NaN, "input_len": 3, "output_len": 2}', "timestamp_ms", "nan"),
        ('{"timestamp_ms": Infinity, "input_len": 3, "output_len": 2}', "timestamp_ms", "inf"),
        ('{"arrival_s": true, "input_len": 3, "output_len": 2}', "arrival_s", "True"),
        ('{"arrival_s": 1, "input_len": NaN, "output_len": 2}', "input_len", "nan"),
        ('{"arrival_s": 1, "input_len": 3, "output_len": Infinity}', "output_len", "inf"),
        ('{"arrival_s": 1, "input_len": 3.5, "output_len": 2}', "input_len", "3.5"),
    ],
)
def test_trace_non_finite_values_rejected(tok, tmp_path, line, field, got):
    p = tmp_path / "tr.jsonl"
    p.write_text('{"arrival_s": 0, "input_len": 3, "output_len": 2}\n' + line + "\n")
    with pytest.raises(BenchError) as e:
        wl.build_requests(f"trace:{p}", tok, None)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(p) in msg and "line 2" in msg and f"`{field}`" in msg
    assert f"got {got}" in msg


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"request_rate": math.nan}, "--request-rate"),
        ({"request_rate": -math.inf}, "--request-rate"),
        ({"burstiness": math.nan}, "--burstiness"),
        ({"burstiness": math.inf}, "--burstiness"),
        ({"timeout_s": math.nan}, "--timeout"),
        ({"timeout_s": math.inf}, "--timeout"),
        ({"temperature": math.nan}, "--temperature"),
        ({"temperature": math.inf}, "--temperature"),
        ({"workload": "random:in=8,out=4,ratio=nan"}, "ratio"),
        ({"workload": "random:in=8,out=4,ratio=inf"}, "ratio"),
        ({"slo": "ttft_ms=nan"}, "--slo"),
        ({"slo": "ttft_ms=inf"}, "--slo"),
    ],
)
def test_config_rejects_non_finite_numbers(kw, flag):
    from parity.bench.run_config import BenchConfig

    BenchConfig(base_url="http://127.0.0.1:8000", model="m", request_rate=math.inf).validate()  # inf rate is fine
    with pytest.raises(BenchError, match=flag):
        BenchConfig(base_url="http://127.0.0.1:8000", model="m", **kw).validate()


def test_cli_rate_accepts_inf_rejects_nan():
    import argparse

    from parity.bench.bench_cli import _rate

    assert _rate("inf") == math.inf and _rate("2.5") == 2.5
    for bad in ("nan", "NaN", "-inf", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be > 0 or 'inf'"):
            _rate(bad)


def test_tokenizer_path_errors(tmp_path):
    with pytest.raises(BenchError, match="--tokenizer: .* not found"):
        load_bench_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(BenchError, match="not a valid tokenizer.json"):
        load_bench_tokenizer(tmp_path)  # a directory holding tokenizer.json


# ------------------------------------------------------------------ SLO + metrics
def test_parse_slo():
    assert parse_slo("ttft_ms=200, tpot_ms=50,e2el_ms=1000ms") == {"ttft_ms": 200.0, "tpot_ms": 50.0, "e2el_ms": 1000.0}
    assert parse_slo(None) == {}
    for bad, msg in [
        ("", "empty value ''"),
        ("  ", "empty value"),
        ("ttft_ms=500,,tpot_ms=5", "item 2 is empty"),
        ("ttft_ms=500,", "item 2 is empty"),
        ("ttft=200", "unknown key 'ttft'"),
        ("ttft_ms", "is not key=value"),
        ("ttft_ms=abc", "must be a number of milliseconds"),
        ("tpot_ms=-1", "> 0 ms"),
        ("ttft_ms=1,ttft_ms=2", "given twice"),
        ("ttft_ms=inf", "finite"),
    ]:
        with pytest.raises(BenchError, match=msg):
            parse_slo(bad)


def _rec(i, ttft, e2el, n, ok=True, itl=None, send=0.0, err=None):
    return RequestRecord(
        index=i,
        ok=ok,
        error=err,
        send_s=send,
        ttft_s=ttft,
        e2el_s=e2el,
        output_tokens=n,
        prompt_tokens=10,
        itl_s=itl or [],
        count_source="usage",
    )


def test_summary_metrics_exact():
    recs = [
        _rec(0, 0.100, 1.000, 10, itl=[0.1] * 9, send=0.0),  # TPOT 0.1
        _rec(1, 0.200, 0.600, 5, itl=[0.1] * 4, send=0.5),  # TPOT 0.1
        _rec(2, 0.050, 0.050, 1, send=1.0),  # single token: no TPOT
        _rec(3, 0.400, 2.400, 11, itl=[0.2] * 10, send=1.5),  # TPOT 0.2
        _rec(4, None, None, 0, ok=False, err="HTTP 500: boom", send=2.0),
        _rec(5, None, None, 0, ok=False, err="HTTP 500: boom", send=2.0),
        _rec(6, None, None, 0, ok=False, err="interrupted", send=2.0),
    ]
    s = summarize(recs, duration_s=4.0, slo={"ttft_ms": 250, "tpot_ms": 150})
    assert (s["completed"], s["failed"], s["interrupted"]) == (4, 2, 1)
    assert s["failure_reasons"] == {"HTTP 500: boom": 2}
    assert s["total_output_tokens"] == 27 and s["total_input_tokens"] == 40
    assert s["request_throughput_req_s"] == pytest.approx(1.0)
    assert s["output_throughput_tok_s"] == pytest.approx(27 / 4)
    assert s["total_token_throughput_tok_s"] == pytest.approx(67 / 4)
    assert s["good_requests"] == 3  # rec 3 misses TTFT (400 > 250) and TPOT; rec 2 has no TPOT -> passes
    assert s["goodput_req_s"] == pytest.approx(0.75)
    assert s["ttft_ms"]["mean"] == pytest.approx(187.5) and s["ttft_ms"]["median"] == pytest.approx(150.0)
    assert s["tpot_ms"]["count"] == 3 and s["tpot_ms"]["mean"] == pytest.approx(400 / 3)
    assert s["itl_ms"]["count"] == 23 and s["itl_ms"]["max"] == pytest.approx(200.0)
    assert s["e2el_ms"]["p99"] == pytest.approx(float(np.percentile([1000, 600, 50, 2400], 99)))
    assert s["max_concurrent_requests"] == 2
    assert summarize(recs, 4.0)["goodput_req_s"] is None


def test_meets_slo_and_empty_stats():
    r = _rec(0, 0.1, 1.0, 10)
    assert meets_slo(r, {"e2el_ms": 1000}) and not meets_slo(r, {"e2el_ms": 999})
    assert not meets_slo(_rec(1, None, None, 0, ok=False), {})
    st = stats_ms([])
    assert st["mean"] is None and st["count"] == 0


# ------------------------------------------------------------------ report
def _fake_result(rate, ttft):
    from parity.bench.result_schema import RESULT_SCHEMA, RESULT_VERSION

    recs = [_rec(i, ttft + 0.001 * i, 1.0 + 0.01 * i, 20, itl=[0.05] * 19) for i in range(30)]
    return {
        "schema": RESULT_SCHEMA,
        "version": RESULT_VERSION,
        "config": {"request_rate": rate, "max_concurrency": None, "model": "m", "base_url": "u", "endpoint": "chat"},
        "summary": summarize(recs, 10.0 / rate),
        "requests": [r.to_dict() for r in recs],
        "energy": {"meter": "none", "joules": None},
        "notes": ["a note"],
    }


@pytest.mark.parametrize("cap, shown", [(None, "unbounded"), (8, "8")])
def test_summary_table_names_the_concurrency_cap_or_unbounded(cap, shown):
    import re

    from rich.console import Console

    from parity.bench.result import render_table

    res = _fake_result(2, 0.05)
    res["config"]["max_concurrency"] = cap
    console = Console(record=True, width=120)
    render_table(res, console)
    rows = {m[0].strip(): m[1].strip() for m in re.findall(r"│ (.+?)│(.+?)│", console.export_text())}
    assert rows["max concurrency"] == shown and rows["request rate (req/s)"] == "2"


def test_report_png_and_errors(tmp_path):
    from parity.bench.report import write_report
    from parity.bench.result import load_result, save_result

    paths = [save_result(_fake_result(r, 0.05 * r), tmp_path / f"run{r}.json") for r in (1, 2, 4)]
    png = write_report(paths, tmp_path / "r.png")  # the HTML form is exercised by the CLI test (test_bench_e2e)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BenchError, match="must end in .html or .png"):
        write_report(paths, tmp_path / "r.pdf")
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(BenchError, match="is not a parity bench result"):
        load_result(tmp_path / "x.json")
    with pytest.raises(BenchError, match="not found"):
        load_result(tmp_path / "missing.json")
    assert math.isclose(load_result(paths[0])["summary"]["duration_s"], 10.0)


def _failed_result(n=4):
    from parity.bench.result_schema import RESULT_SCHEMA, RESULT_VERSION

    recs = [_rec(i, None, None, 0, ok=False, err="HTTP 503: overloaded") for i in range(n)]
    return {
        "schema": RESULT_SCHEMA,
        "version": RESULT_VERSION,
        "config": {
            "request_rate": "inf",
            "max_concurrency": None,
            "model": "m",
            "base_url": "u",
            "endpoint": "chat",
            "workload": "random:in=8,out=4",
        },
        "summary": summarize(recs, 1.0),
        "requests": [r.to_dict() for r in recs],
        "energy": {"meter": "none", "joules": None},
        "notes": [],
    }


def test_report_all_failed_run_is_named_without_warning(tmp_path):
    import warnings

    from parity.bench.report import write_report
    from parity.bench.result import save_result

    ok = save_result(_fake_result(1, 0.05), tmp_path / "good.json")
    bad = save_result(_failed_result(4), tmp_path / "down.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" UserWarning would fail here
        text = write_report([bad], tmp_path / "only_bad.html").read_text()
        assert "run down (rate inf, conc unbounded): all 4 requests failed (HTTP 503: overloaded: 4)" in text
        text = write_report([ok, bad], tmp_path / "both.html").read_text()
        assert "all 4 requests failed" in text and "data:image/png;base64," in text
        assert write_report([bad], tmp_path / "bad.png").read_bytes()[:4] == b"\x89PNG"


def test_report_labels_trace_runs_and_cdfs_start_at_zero(tmp_path):
    import matplotlib.pyplot as plt

    from parity.bench.report import make_figure, run_label

    res = _fake_result(1, 0.05)
    res["config"]["workload"] = "trace:/data/tr.jsonl"
    res["config"]["request_rate"] = "inf"
    label = run_label(res, tmp_path / "run1.json")
    assert label == "run1 (trace tr.jsonl, conc unbounded)" and "rate" not in label
    res2 = _fake_result(2, 0.05)
    assert run_label(res2, "r2.json") == "r2 (rate 2, conc unbounded)"
    fig = make_figure([(label, res), ("r2", res2)])
    try:
        for ax in fig.axes[:3] + fig.axes[3:4]:
            for line in ax.get_lines():
                y = line.get_ydata()
                assert y[0] == 0.0 and y[-1] == 1.0
            assert ax.get_xlim()[0] == 0
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("requests", "oops", "'requests'"),
        ("energy_meters", "oops", "'energy_meters'"),
        ("summary", "oops", "'summary'"),
        ("config", 5, "'config'"),
        ("requests", [5], "'requests[0]'"),
        ("requests", [{}], "'requests[0].index'"),
        ("energy", [1], "'energy'"),
        ("notes", "x", "'notes'"),
    ],
)
def test_report_damaged_result_names_file_and_field(tmp_path, field, value, named):
    from parity.bench.report import write_report

    res = _fake_result(1, 0.05)
    res[field] = value
    p = tmp_path / "damaged.json"
    p.write_text(json.dumps(res))
    with pytest.raises(BenchError, match=rf"damaged\.json is damaged: field {re.escape(named)} must be"):
        write_report([p], tmp_path / "r.html")
