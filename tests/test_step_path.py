"""The engine's step path start-up: buckets warmed in the background join served steps one by one, and a
compiler that fails leaves the engine eager instead of stopping it (uncompiled graphs: no compile time)."""

from __future__ import annotations

import threading

import pytest
import torch
from test_model_helpers import make_decode_model

from parity.engine import model_runner
from parity.model import decode_graph
from parity.model.decode_graph import DecodeGraph


def _tiny_model():
    return make_decode_model()


def test_only_warm_buckets_serve_when_ready_is_a_set():
    graph = DecodeGraph(_tiny_model(), "cpu", buckets=(1, 2, 4), compile=False)
    one, three = [(0, 1, 5)], [(0, 1, 5), (1, 1, 3), (2, 1, 4)]
    assert graph.accepts(one, False, False) and graph.accepts(three, False, False)  # None: every bucket
    graph.ready = set()
    assert not graph.accepts(one, False, False) and not graph.accepts(three, False, False)
    graph.warm_up((1,))
    assert graph.ready == {1} and graph.steps == 0  # warm-up steps are not served steps
    assert graph.accepts(one, False, False) and not graph.accepts(three, False, False)


def _uncompiled_graph(monkeypatch):
    real = DecodeGraph
    monkeypatch.setattr(model_runner, "DecodeGraph", lambda m, d: real(m, d, compile=False))


def test_background_warm_up_hands_over_every_bucket(monkeypatch):
    _uncompiled_graph(monkeypatch)
    started = []
    real_thread = threading.Thread

    def recording_thread(*a, **kw):
        t = real_thread(*a, **kw)
        started.append(t)
        return t

    monkeypatch.setattr(model_runner.threading, "Thread", recording_thread)
    model = _tiny_model()
    sp = model_runner.prepare_step_path(model, torch.device("cpu"), enforce_eager=False, background=True)
    assert sp.path == "compiled" and sp.background and sp.compile_s == 0
    assert sp.buckets == tuple(b for b in model_runner.WARM_BUCKETS if b in model.decode_graph.buckets)
    assert len(started) == 1 and started[0].daemon
    started[0].join(timeout=120)
    assert model.decode_graph.ready == set(model_runner.WARM_BUCKETS) & set(model.decode_graph.buckets)


def test_buckets_stop_at_the_one_holding_max_num_seqs(monkeypatch):
    _uncompiled_graph(monkeypatch)
    sp = model_runner.prepare_step_path(_tiny_model(), torch.device("cpu"), enforce_eager=False, max_batch=3)
    assert sp.buckets == (1, 2, 4)
    sp = model_runner.prepare_step_path(_tiny_model(), torch.device("cpu"), enforce_eager=False, max_batch=64)
    assert sp.buckets == model_runner.WARM_BUCKETS


def test_engine_stats_count_the_warm_buckets(monkeypatch):
    """What /metrics reports (parity_compiled_decode_buckets_ready / _total): warm of compiled buckets."""
    from parity.engine import EngineArgs, LLMEngine

    _uncompiled_graph(monkeypatch)
    eng = LLMEngine(EngineArgs(device="cpu", enforce_eager=False), model=_tiny_model(), tokenizer=None)
    total = len(eng.step_path.buckets)
    assert eng.stats()["compiled_buckets_ready"] == eng.stats()["compiled_buckets_total"] == total > 0
    eng.model.decode_graph.ready = {1}
    assert eng.stats()["compiled_buckets_ready"] == 1
    eager = LLMEngine(EngineArgs(device="cpu", enforce_eager=True), model=_tiny_model(), tokenizer=None)
    assert "compiled_buckets_ready" not in eager.stats()


def test_a_failing_compiler_leaves_the_engine_eager(monkeypatch):
    _uncompiled_graph(monkeypatch)

    def broken(*a, **kw):
        raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

    monkeypatch.setattr(decode_graph, "decode_step", broken)
    model = _tiny_model()
    sp = model_runner.prepare_step_path(model, torch.device("cpu"), enforce_eager=False)
    assert sp.path == "eager" and model.decode_graph is None
    model = _tiny_model()
    sp = model_runner.prepare_step_path(model, torch.device("cpu"), enforce_eager=False, background=True)
    for t in threading.enumerate():
        if t.name == "parity-compile":
            t.join(timeout=60)
    assert sp.background and model.decode_graph.ready == set()  # every decode step stays eager
    out = model.forward_incremental([[1, 2]], [st := model.new_state()])
    assert model.forward_incremental([[3]], [st]).shape[-1] == model.config.vocab_size and out is not None


def test_a_cache_budget_below_one_page_fails_before_compiling(monkeypatch):
    """An explicit cache budget too small for one cache page is refused before the decode step compiles (a
    compile takes minutes), naming the argument."""
    from parity.engine import llm_engine
    from parity.engine.args import EngineArgs
    from parity.errors import RequestError

    compiled = []
    monkeypatch.setattr(llm_engine, "prepare_step_path", lambda *a, **k: compiled.append(1))
    with pytest.raises(RequestError, match=r"'cache_memory' \(1024 bytes\) is smaller than one cache page"):
        llm_engine.LLMEngine(EngineArgs(device="cpu", cache_memory=1024), model=_tiny_model(), tokenizer=None)
    assert not compiled
