"""The engine's step path (eager / compiled) and the device compile table; one slow test checks that the
compiled regions (`parity.model.compiled`) give the eager greedy tokens and logits (the engine's compiled
decode step: tests/test_decode_graph.py)."""

from __future__ import annotations

import pytest
import torch
from test_model_helpers import make_decode_model

from parity import devices
from parity.engine.model_runner import ENFORCE_EAGER_ENV, wants_eager


def _small_model():
    return make_decode_model()


def test_compile_backend_per_device():
    assert devices.compile_backend("cpu") == ("inductor", None)
    assert devices.compile_backend("cuda:1") == ("inductor", "reduce-overhead")
    assert devices.compile_backend("npu:0")[0] == "torchair"
    assert devices.compile_backend("weird") == ("inductor", None)
    assert devices.compile_by_default("weird") is False


def test_wants_eager_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENFORCE_EAGER_ENV, raising=False)
    assert wants_eager(True, cpu) and not wants_eager(False, cpu)
    assert wants_eager(None, cpu) is (not devices.compile_by_default(cpu))
    monkeypatch.setenv(ENFORCE_EAGER_ENV, "1")
    assert wants_eager(None, cpu) and not wants_eager(False, cpu)
    monkeypatch.setenv(ENFORCE_EAGER_ENV, "0")
    assert not wants_eager(None, cpu)


def test_engine_reports_eager_path():
    from parity.engine import LLM

    llm = LLM(model_obj=_small_model(), tokenizer=None, enforce_eager=True, cache_memory=1 << 24)
    assert llm.engine.step_path.path == "eager" and llm.engine.step_path.compile_s == 0


def test_enforce_eager_must_be_bool():
    from parity.engine import EngineArgs
    from parity.errors import RequestError

    with pytest.raises(RequestError, match="enforce_eager"):
        EngineArgs(enforce_eager="yes").validate()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_compiled_regions_match_eager():
    from parity.model.compiled import compile_regions, is_compiled, warm_up

    eager, compiled = _small_model(), _small_model()
    compile_regions(compiled, devices.compiler("cpu"))
    assert is_compiled(compiled) and warm_up(compiled) > 0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 512, (n,), generator=g) for n in (20, 7)]
    toks, logits = {}, {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        states = [m.new_state() for _ in prompts]
        lg = m.forward_incremental(prompts, states)
        out, lgs = [lg.argmax(-1)], [lg]
        for _ in range(6):  # decode steps at batch 2, then batch 1
            lg = m.forward_incremental([[int(t)] for t in out[-1]], states)
            out.append(lg.argmax(-1))
            lgs.append(lg)
        lg = m.forward_incremental([[int(out[-1][0])]], states[:1])
        lgs.append(lg)
        toks[name], logits[name] = torch.stack(out), lgs
    assert torch.equal(toks["eager"], toks["compiled"])
    for a, b in zip(logits["eager"], logits["compiled"], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
