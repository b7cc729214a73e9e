"""A TP=2 engine (2 gloo processes): greedy tokens as one process, the OpenAI API, a killed worker."""

import time

import httpx
import openai
import pytest
import torch

from parity.config import load_preset
from parity.distributed import ParallelConfig
from parity.engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from parity.engine.worker import ModelSpec, launch_local
from parity.model.build import build_model
from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer
from parity.server.parallel_serve import FAILURE_EXIT_CODE, ParallelServing

pytestmark = pytest.mark.slow

SP = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
KW = dict(tokenizer=None, device="cpu", cache_memory=1 << 28, max_num_batched_tokens=64)


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, 129280, (n,), generator=g).tolist() for n in (130, 37, 5)]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model_obj=build_model(load_preset("tiny"), seed=0), **KW)
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=_prompts(), sampling_params=SP)]


@pytest.fixture(scope="module")
def tp2():
    model, workers = launch_local(ParallelConfig(2), ModelSpec("tiny", "cpu", "float32", 0), timeout_s=60)
    exits = []
    serving = ParallelServing(model, workers, exit=exits.append)
    serving.exits = exits
    yield serving
    serving.close()


def test_tp2_engine_greedy_matches_one_process(tp2, reference):
    llm = LLM(model_obj=tp2.model, **KW)
    out = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=_prompts(), sampling_params=SP)]
    assert out == reference


def test_tp2_server_api_then_killed_worker(tp2, reference, caplog):
    engine = AsyncEngine(
        EngineArgs(device="cpu", cache_memory=1 << 28, max_num_batched_tokens=64), model=tp2.model, tokenizer=None
    )
    tp2.engine = engine
    srv = ThreadedServer(build_app(engine, ServerSettings(served_model_names=["tiny"])), drain_timeout_s=1.0).start()
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(
            model="tiny", prompt=_prompts()[1], max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        text = ""
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            text += next(line for line in lines if line.startswith("data:"))  # streaming has begun
            tp2.workers.procs[0].kill()
            text += "\n".join(lines)
        assert "rank 1 exited" in text, text[-500:]  # the in-flight stream's error names the rank
        assert "rank 1 exited" in str(tp2.model.failed)
        assert httpx.get(srv.base_url + "/health").status_code == 503  # at once, not after the grace period
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
        assert e.value.status_code == 503
        deadline = time.monotonic() + 10
        while not tp2.exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tp2.exits == [FAILURE_EXIT_CODE]
        assert not tp2.workers.procs[0].is_alive()
        assert not [r for r in caplog.records if r.exc_info], "an expected rank failure logs one line, no traceback"
    finally:
        srv.stop()
