"""The server over the real engine and the default miniature, talked to with the official `openai` client
on 127.0.0.1: outputs equal the offline engine's for the same greedy request; thinking on/off; a tool-call
round trip; completions; bad input; disconnect and a 64-stream load test with the cache back to zero."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

torch = pytest.importorskip("torch")

from parity.engine import LLM, AsyncEngine, EngineArgs, SamplingParams  # noqa: E402
from parity.server.app import ServerSettings, build_app  # noqa: E402
from parity.server.launcher import ThreadedServer  # noqa: E402
from parity.tokenizer import encode_chat, parse_output  # noqa: E402

MAX_LEN = 1024
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def real():
    engine = AsyncEngine(
        EngineArgs(
            device="cpu", max_model_len=MAX_LEN, cache_memory=96 << 20, max_num_seqs=64, max_num_batched_tokens=2048
        )
    )
    offline = LLM(
        device="cpu",
        model_obj=engine.engine.model,
        tokenizer=engine.tokenizer,
        max_model_len=MAX_LEN,
        cache_memory=32 << 20,
    )
    app = build_app(engine, ServerSettings(served_model_names=["tiny"], drain_timeout_s=2.0))
    srv = ThreadedServer(app, drain_timeout_s=2.0).start()
    srv.engine, srv.offline = engine, offline
    srv.client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield srv
    srv.stop()


def offline_text(real, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    out = real.offline.generate(
        prompt_token_ids=ids, sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )
    c = out[0].outputs[0]
    assert c.finish_reason in ("length", "stop") and c.token_ids, out[0]  # a real, non-empty generation
    return c.text, c.token_ids


def metric(base_url: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", httpx.get(base_url + "/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def wait_cache_zero(base_url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(base_url, "parity_cache_used_bytes") or metric(base_url, "parity_num_requests_running"):
        assert time.monotonic() < deadline, "cache not back to zero"
        time.sleep(0.05)


def test_models(real):
    models = real.client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == MAX_LEN


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_greedy_equals_offline_engine(real, thinking):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour. 你好"}]
    ids = real.engine.tokenizer.encode(encode_chat(msgs, thinking=thinking))
    text, tok_ids = offline_text(real, ids, 10)
    want = parse_output(text, thinking=thinking)
    r = real.client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        extra_body={"thinking": {"type": "enabled" if thinking else "disabled"}},
    )
    m = r.choices[0].message
    assert m.content == want.content and getattr(m, "reasoning_content", None) == want.reasoning_content
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tok_ids)
    chunks = list(
        real.client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"chat_template_kwargs": {"thinking": thinking}},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == want.content
    if thinking:
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.reasoning_content


def test_tool_call_round_trip_equals_offline(real):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = real.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=6, temperature=0)
    ids = real.engine.tokenizer.encode(encode_chat(msgs, tools=TOOLS))
    text, _ = offline_text(real, ids, 6)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == parse_output(text, False).content
    # the client sends back a tool call and its result; the server encodes them in V4's DSML format
    msgs += [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    r2 = real.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=6, temperature=0)
    ids2 = real.engine.tokenizer.encode(encode_chat(msgs, tools=TOOLS))
    text2, _ = offline_text(real, ids2, 6)
    assert r2.usage.prompt_tokens == len(ids2) and r2.choices[0].message.content == parse_output(text2, False).content


def test_completions_equal_offline(real):
    prompt = "The quick brown fox"
    ids = real.engine.tokenizer.encode(prompt)
    text, _ = offline_text(real, ids, 8)
    r = real.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == text and r.usage.prompt_tokens == len(ids)
    r2 = real.client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    assert r2.choices[0].text == text and len(r2.choices[0].logprobs.token_logprobs) == 8
    st = list(real.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in st if c.choices) == text


def test_bad_input_against_real_engine(real):
    c = real.client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=list(range(5, 5 + MAX_LEN + 3)), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_LEN)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], reasoning_effort="extreme"
        )
    assert "reasoning_effort" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}],
                },
            ],
        )
    assert e.value.body["param"].startswith("messages.1")
    assert c.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason == "length"


def test_disconnect_frees_cache(real):
    with httpx.stream(
        "POST",
        real.base_url + "/v1/completions",
        timeout=30,
        json={"prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True, "stream": True},
    ) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got >= 2:
                assert metric(real.base_url, "parity_cache_used_bytes") > 0
                break
    wait_cache_zero(real.base_url)


def test_load_64_streams_cache_back_to_zero(real):
    async def one(c: openai.AsyncOpenAI, i: int):
        st = await c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Request {i}"}],
            max_tokens=4,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        fin, usage = None, None
        async for ch in st:
            if ch.choices:
                fin = ch.choices[0].finish_reason or fin
            usage = ch.usage or usage
        return fin, usage

    async def go():
        c = openai.AsyncOpenAI(
            base_url=real.base_url + "/v1",
            api_key="none",
            max_retries=0,
            timeout=120,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
            ),
        )
        try:
            return await asyncio.gather(*[one(c, i) for i in range(64)])
        finally:
            await c.close()

    res = asyncio.run(go())
    assert len(res) == 64 and all(fin == "length" and u.completion_tokens == 4 for fin, u in res)
    wait_cache_zero(real.base_url)
    assert metric(real.base_url, "parity_request_e2e_seconds_count") >= 64


def test_parity_generate_one_shot(real, capsys, monkeypatch):
    """`parity generate` end to end (the model object is shared with the server fixture to save a load)."""
    import parity.engine
    from parity.cli import main

    class SharedLLM(LLM):
        def __init__(self, **kw):
            super().__init__(
                model_obj=real.engine.engine.model,
                tokenizer=real.engine.tokenizer,
                **{k: v for k, v in kw.items() if k != "model"},
            )

    monkeypatch.setattr(parity.engine, "LLM", SharedLLM)
    prompt = "Hello"
    text, ids = offline_text(real, real.engine.tokenizer.encode(prompt), 3)
    assert (
        main(
            [
                "generate",
                "--prompt",
                prompt,
                "--max-tokens",
                "3",
                "--device",
                "cpu",
                "--max-model-len",
                "128",
                "--cache-memory",
                "16MiB",
                "--json",
                "--logprobs",
                "1",
            ]
        )
        == 0
    )
    o = json.loads(capsys.readouterr().out)["outputs"][0]
    assert o["token_ids"] == ids and o["text"] == text and o["finish_reason"] == "length" and len(o["logprobs"]) == 3
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hi",
                "--max-tokens",
                "0",
                "--device",
                "cpu",
                "--max-model-len",
                "128",
                "--cache-memory",
                "16MiB",
            ]
        )
        == 2
    )
    assert "max_tokens" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hi",
                "--chat",
                "--thinking",
                "--max-tokens",
                "3",
                "--device",
                "cpu",
                "--max-model-len",
                "128",
                "--cache-memory",
                "16MiB",
            ]
        )
        == 0
    )
    assert "[reasoning]" in capsys.readouterr().out


def test_echo_with_logprobs_scores_the_prompt_tokens(real):
    """echo + logprobs: the prompt's tokens come first (the first logprob null, the others the model's, each
    with its top_logprobs), text_offset counts from the start of the echoed text, as OpenAI's legacy API."""
    r = httpx.post(
        real.base_url + "/v1/completions",
        json={"model": "tiny", "prompt": "Hello world", "max_tokens": 2, "echo": True, "logprobs": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    lp, n_prompt = c["logprobs"], r.json()["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert c["text"].startswith("Hello world") and lp["text_offset"][n_prompt] == len("Hello world")


def test_prompt_logprobs_are_the_engines(real):
    """vLLM's `prompt_logprobs` field: per prompt token (the first null) the token's logprob and rank from the
    engine, with its top N; chat puts them on the response."""
    ids = real.engine.tokenizer.encode("Hello world, how are you")
    (want,) = real.offline.generate(
        prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    )
    r = httpx.post(
        real.base_url + "/v1/completions",
        json={"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for tid, d, e in zip(ids[1:], got[1:], want.prompt_logprobs[1:], strict=True):
        own = d[str(tid)]
        assert abs(own["logprob"] - e.logprob) < 1e-3 and own["rank"] == e.rank
        assert own["decoded_token"] == real.engine.tokenizer.decode([tid], skip_special_tokens=False)
        assert {str(k) for k, _ in e.top} | {str(tid)} == set(d) and len(d) in (2, 3)
        assert all(d[str(k)]["rank"] == j + 1 for j, (k, _) in enumerate(e.top) if k != tid)
    r = httpx.post(
        real.base_url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0},
        timeout=60,
    )
    body = r.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
