"""The OpenAI-compatible server against the fake engine (fast): protocol, streaming, errors, auth, 429,
disconnects, load, metrics. A real uvicorn server on 127.0.0.1 and the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams, default_respond

from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer

KEY = "sk-test-key"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def head(text: str, n_tokens: int) -> str:
    """What the fake engine streams for `n_tokens` byte tokens of `text` (no broken UTF-8 char)."""
    return text.encode()[:n_tokens].decode("utf-8", errors="ignore")


def start(engine: FakeEngine, **settings) -> ThreadedServer:
    settings.setdefault("served_model_names", ["tiny"])
    app = build_app(
        engine, ServerSettings(**settings), chat_format=FakeChatFormat(), sampling_params_cls=FakeSamplingParams
    )
    return ThreadedServer(app, drain_timeout_s=2.0).start()


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(step_s=0.001, max_num_seqs=64, max_waiting=256)
    srv = start(eng, api_key=KEY)
    srv.engine = eng
    yield srv
    srv.stop()
    assert eng.shutdown_called


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def wait_cache_zero(base_url: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(base_url, "parity_cache_used_bytes") != 0 or metric(base_url, "parity_num_requests_running") != 0:
        assert time.monotonic() < deadline, "cache not freed"
        time.sleep(0.02)


def post(server, path, body=None, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Content-Type"] = "application/json"
    return httpx.post(server.base_url + path, json=body, content=content, headers=headers, timeout=30)


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}


def test_head_health_is_200_without_a_body(server):
    r = httpx.head(server.base_url + "/health")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"


def test_head_models_answers_like_get_without_a_body(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/models", "/v1/models/tiny"):
        got, r = httpx.get(server.base_url + path, headers=auth), httpx.head(server.base_url + path, headers=auth)
        assert r.status_code == got.status_code == 200 and r.content == b""
        assert r.headers["content-type"] == "application/json"
        assert r.headers["content-length"] == got.headers["content-length"]
    assert httpx.head(server.base_url + "/v1/models").status_code == 401  # auth as for GET
    assert httpx.head(server.base_url + "/v1/models/nope", headers=auth).status_code == 404


def test_head_metrics_answers_like_get_without_a_body(server):
    got, r = httpx.get(server.base_url + "/metrics"), httpx.head(server.base_url + "/metrics")
    assert r.status_code == got.status_code == 200 and got.content and r.content == b""
    assert r.headers["content-type"] == got.headers["content-type"]


def test_chat_non_stream_and_stream_agree(client):
    msgs = [{"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40)
    c = r.choices[0]
    prompt = FakeChatFormat().encode(msgs, None, False, None)
    assert c.message.content == head(default_respond(prompt), 40) and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + 40 and r.object == "chat.completion"
    assert getattr(c.message, "reasoning_content", None) is None

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_full_answer_stops_on_eos(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=400)
    assert r.choices[0].finish_reason == "stop" and "ünïcödé 你好 🙂" in r.choices[0].message.content


@pytest.mark.parametrize("how", ["thinking", "chat_template_kwargs"])
def test_chat_thinking_on_off(client, how):
    extra = {"thinking": {"type": "enabled"}} if how == "thinking" else {"chat_template_kwargs": {"thinking": True}}
    msgs = [{"role": "user", "content": "what is 2+2?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, extra_body=extra)
    m = r.choices[0].message
    assert m.reasoning_content == "Let me think about 2+2." and m.content == "The answer is 4."
    st = list(client.chat.completions.create(model="tiny", messages=msgs, extra_body=extra, stream=True))
    deltas = [ch.choices[0].delta for ch in st if ch.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == (m.reasoning_content, m.content)
    off = client.chat.completions.create(
        model="tiny", messages=msgs, extra_body={"thinking": {"type": "disabled"}}, max_tokens=8
    )
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    both = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=8,
        extra_body={"thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": True}},
    )  # agreeing sources are fine
    assert both.choices[0].message.reasoning_content


def test_completions_usage_counts_each_prompt_once_whatever_n(client):
    """OpenAI/vLLM: usage.prompt_tokens counts a prompt once, not once per choice (also in the stream)."""
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=2, n=3)
    assert len(r.choices) == 3 and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == 11
    r = client.completions.create(model="tiny", prompt=["hello", "abc"], max_tokens=2, n=2)
    assert len(r.choices) == 4 and r.usage.prompt_tokens == 5 + 3
    st = list(
        client.completions.create(
            model="tiny", prompt="hello", max_tokens=2, n=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert st[-1].usage.prompt_tokens == 5 and st[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for ch in client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, stream=True):
            for tc in ch.choices[0].delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = cur["id"] or tc.id
                cur["name"] += (tc.function.name or "") if tc.function else ""
                cur["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = ch.choices[0].finish_reason or finish
        assert finish == "tool_calls" and list(calls) == [0]
        call = calls[0]
        assert call["id"] and call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        }
    else:
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="auto")
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        tc = c.message.tool_calls[0]
        assert tc.type == "function" and tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments) == {"city": "Paris"}
        assistant = c.message  # the openai client's own object, echoed back as-is
    msgs += [assistant, {"role": "tool", "tool_call_id": "x", "content": '{"sky": "sunny"}'}]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS)
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"


def test_tool_choice_none_hides_tools(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, tool_choice="none", max_tokens=10
    )
    assert r.choices[0].message.tool_calls is None


def test_chat_n_logprobs_stop_and_params_reach_engine(server, client):
    eng = server.engine
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hey"}],
        n=3,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
        seed=7,
        temperature=0.5,
        top_p=0.9,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        stop=["zzz"],
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 36
    lp = r.choices[0].logprobs.content
    assert len(lp) == 12 and lp[0].token == "E" and lp[0].logprob == -0.25 and len(lp[0].top_logprobs) == 2
    sp = eng.seen_params[-3:]
    assert sorted(p.seed for p in sp) == [7, 8, 9]
    p = sp[0]
    assert (
        p.temperature,
        p.top_p,
        p.top_k,
        p.min_p,
        p.repetition_penalty,
        p.min_tokens,
        p.stop,
        p.logprobs,
        p.max_tokens,
        p.presence_penalty,
        p.frequency_penalty,
    ) == (0.5, 0.9, 5, 0.05, 1.1, 2, ["zzz"], 2, 12, 0.1, 0.2)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hey"}], stop="—", max_tokens=100
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "Echo: yassistant "


def test_completions(client, server):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=6)
    assert r.choices[0].text == head(default_respond("Hello"), 6) and r.usage.prompt_tokens == 5
    ids = [3 + b for b in b"Hello"]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=6)
    assert r2.choices[0].text == r.choices[0].text
    r3 = client.completions.create(model="tiny", prompt=["Hello", "abc"], max_tokens=4, n=2, echo=True, logprobs=1)
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    assert r3.choices[0].text == "Hello" + head(default_respond("Hello"), 4)
    # with echo, logprobs list the prompt tokens first (the first one null), offsets count from the echoed text
    lp = r3.choices[0].logprobs
    assert r3.choices[2].text.startswith("abc") and lp.text_offset[:6] == [0, 1, 2, 3, 4, 5]
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 + 4 and lp.tokens[:5] == list("Hello")
    assert lp.token_logprobs[:5] == [None, -0.5, -0.5, -0.5, -0.5] and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {"e": -0.5} and "".join(lp.tokens) == r3.choices[0].text
    st = list(
        client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in st if c.choices) == r.choices[0].text
    assert st[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in st if c.choices][-1] == "length"


def test_completions_stream_sends_no_empty_text_chunks(server):
    """Deltas that bring no text yet (multi-byte characters split over tokens here; stop-string matching holds
    text back the same way) send no chunk: their token ids and logprobs go with the next chunk."""
    body = {"prompt": "Hello", "max_tokens": 30, "logprobs": 1, "return_token_ids": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    chunks = []
    with httpx.stream(
        "POST",
        server.base_url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.extend(json.loads(line[6:])["choices"])
    assert all(c["text"] for c in chunks[:-1]) and chunks[-1]["finish_reason"] == "length", chunks
    assert "".join(c["text"] for c in chunks) == whole["text"] and any(ord(x) > 127 for x in whole["text"])
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
    assert sum(len(c["logprobs"]["tokens"]) for c in chunks) == len(whole["token_ids"]) == 30


def test_completions_stream_echo_with_logprobs_scores_the_prompt(server):
    """Streamed echo + logprobs: the echo chunk carries the prompt tokens' logprobs (sent with the first delta)."""
    body = {"prompt": "Hello", "max_tokens": 3, "echo": True, "logprobs": 1}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    chunks = _stream_choices(server, "/v1/completions", body)
    assert chunks[0]["text"] == "Hello" and chunks[0]["logprobs"]["tokens"] == list("Hello")
    streamed = [t for c in chunks for t in c["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    assert streamed == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]


def test_completions_echo_with_max_tokens_0_scores_the_prompt(server):
    """vLLM's prompt scoring: echo + max_tokens 0 returns the prompt (with its logprobs when asked), nothing
    generated; without echo max_tokens 0 stays a 400."""
    body = {"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 1, "return_token_ids": True}
    r = post(server, "/v1/completions", body).json()
    c = r["choices"][0]
    assert c["text"] == "Hello" and c["finish_reason"] == "length" and c["token_ids"] == []
    assert c["logprobs"]["tokens"] == list("Hello") and c["logprobs"]["token_logprobs"][0] is None
    assert r["usage"]["completion_tokens"] == 0 and r["usage"]["prompt_tokens"] == 5
    chunks = _stream_choices(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 0, "echo": True})
    assert "".join(x["text"] for x in chunks) == "Hello" and chunks[-1]["finish_reason"] == "length"
    e = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 0}).json()["error"]
    assert e["param"] == "max_tokens" and e["code"] == "invalid_value"


def _stream_choices(server, path: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", server.base_url + path, headers={"Authorization": f"Bearer {KEY}"}, json={**body, "stream": True}
    ) as r:
        return [c for line in r.iter_lines() if line.startswith("data: {") for c in json.loads(line[6:])["choices"]]


def test_every_streamed_choice_chunk_has_stop_reason(server):
    """vLLM puts `stop_reason` (null until the last chunk) on every streamed choice, chat and completions."""
    cmpl = _stream_choices(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "echo": True})
    msgs = [{"role": "user", "content": "hi"}]
    chat = _stream_choices(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 4})
    for chunks in (cmpl, chat):
        assert len(chunks) > 2 and all("stop_reason" in c for c in chunks), chunks
        assert all(c["stop_reason"] is None for c in chunks[:-1])


def test_messages_accept_the_fields_openai_defines(server):
    """A previous response's message echoed back (refusal, annotations...) and name/reasoning_content pass."""
    msgs = [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "yo", "refusal": None, "annotations": [], "reasoning_content": "r"},
        {"role": "user", "content": "more"},
    ]
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', None, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", None, "invalid_json"),
    ("no messages", "/v1/chat/completions", {"model": "tiny"}, "messages", None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages", None),
    (
        "wrong type",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        "temperature",
        "invalid_type",
    ),
    (
        "wrong type nested",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "messages.0.content",
        "invalid_type",
    ),
    (
        "null content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": None}]},
        "messages.0.content",
        "invalid_value",
    ),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", None),
    (
        "unknown field",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "foo": 1},
        "foo",
        "unrecognized_argument",
    ),
    (
        "unknown message field",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "foo": 1}]},
        "messages.0.foo",
        "unrecognized_argument",
    ),
    (
        "max_tokens 0",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
        "invalid_value",
    ),
    ("max_tokens negative", "/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens", "invalid_value"),
    (
        "max_tokens beyond context",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000},
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ("prompt too long", "/v1/completions", {"prompt": "x" * 600}, "prompt", "context_length_exceeded"),
    (
        "chat prompt too long",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 600}]},
        "messages",
        "context_length_exceeded",
    ),
    (
        "temperature high",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5},
        "temperature",
        "invalid_value",
    ),
    ("temperature negative", "/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "invalid_value"),
    (
        "top_p zero",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
        "top_p",
        "invalid_value",
    ),
    ("top_p above one", "/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "invalid_value"),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, "n", "invalid_value"),
    (
        "n too many",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "n": 1000},
        "n",
        "invalid_value",
    ),
    ("bad token id", "/v1/completions", {"prompt": [5, 99999]}, "prompt", "invalid_value"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, "prompt", None),
    ("logprobs too many", "/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
    (
        "top_logprobs without logprobs",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
        None,
    ),
    (
        "tool_choice required",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"},
        "tool_choice",
        "unsupported_parameter",
    ),
    (
        "logit_bias",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1}},
        "logit_bias",
        "unsupported_parameter",
    ),
    (
        "image part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content.0.type",
        "unsupported_parameter",
    ),
    (
        "text part without text",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages.0.content.0.text",
        "missing_required_parameter",
    ),
    (
        "thinking kwarg type",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"thinking": "yes"}},
        "chat_template_kwargs.thinking",
        "invalid_type",
    ),
    (
        "thinking conflicts with chat_template_kwargs",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "thinking": {"type": "enabled"},
            "chat_template_kwargs": {"thinking": False},
        },
        "chat_template_kwargs.thinking",
        "invalid_value",
    ),
    (
        "thinking kwargs conflict",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "chat_template_kwargs": {"thinking": True, "enable_thinking": False},
        },
        "chat_template_kwargs.enable_thinking",
        "invalid_value",
    ),
    (
        "stream_options without stream",
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
        None,
    ),
    ("empty stop string", "/v1/completions", {"prompt": "x", "stop": ["a", ""]}, "stop.1", "invalid_value"),
    ("empty stop", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ""}, "stop", None),
    (
        "bad stop token",
        "/v1/completions",
        {"prompt": "x", "stop_token_ids": [100000]},
        "stop_token_ids",
        "invalid_value",
    ),
    ("engine-side validation", "/v1/completions", {"prompt": "x", "min_tokens": 99}, "min_tokens", "invalid_value"),
]


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
    ],
)
def test_unknown_model_is_404_model_not_found(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "not_found_error"
    assert "'gpt-4' does not exist" in err["message"]


@pytest.mark.parametrize("name,path,body,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_openai_400(server, name, path, body, param, code):
    r = post(server, path, content=body) if isinstance(body, bytes) else post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize(
    "prompt,got",
    [
        ([1.5], "a list holding a number"),
        ([True, False], "a list holding a boolean"),
        (["a", 1], "a list holding a string and an integer"),
        (5, "an integer"),
    ],
)
def test_completions_prompt_of_wrong_type_names_the_accepted_forms(server, prompt, got):
    r = post(server, "/v1/completions", {"prompt": prompt})
    err = r.json()["error"]
    assert (
        r.status_code == 400
        and err["param"] == "prompt"
        and err["message"]
        == (
            "Invalid value for 'prompt': must be a string, a list of strings, a list of token ids (integers) or a list "
            f"of such lists (got {got})"
        )
    ), err


def test_bad_input_is_seen_by_openai_client_and_server_survives(client, server):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert ei.value.body["param"] == "max_tokens"
    assert (
        post(
            server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        ).status_code
        == 200
    )


def test_auth(server):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for key in (None, "wrong", KEY + "x"):
        r = post(server, "/v1/chat/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="bad", max_retries=0).models.list()
    assert httpx.get(server.base_url + "/health").status_code == 200  # open, like vLLM
    r = httpx.get(server.base_url + "/v1/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_exposition(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "m"}], max_tokens=3)
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "parity_requests_total",
        "parity_request_ttft_seconds_bucket",
        "parity_request_tpot_seconds_count",
        "parity_request_e2e_seconds_sum",
        "parity_prompt_tokens_total",
        "parity_generation_tokens_total",
        "parity_num_requests_running",
        "parity_num_requests_waiting",
        "parity_cache_used_bytes",
        "parity_cache_total_bytes",
        "parity_cache_usage_ratio",
        "parity_compiled_decode_buckets_ready",
        "parity_compiled_decode_buckets_total",
    ):
        assert name in text, name
    assert re.search(r'parity_requests_total\{endpoint="chat",status="200"\} [1-9]', text)
    assert re.search(r'parity_requests_total\{endpoint="chat",status="400"\} [1-9]', text) or True
    assert metric(server.base_url, "parity_request_ttft_seconds_count") >= 1


# ---------------------------------------------------------------------------------------------- disconnects
def _stream_then_drop(base_url: str, body: dict, n_lines: int) -> None:
    with httpx.stream(
        "POST", base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
                if got >= n_lines:
                    break  # leaving the block closes the connection mid-stream


def test_client_disconnect_mid_stream_aborts_and_frees_cache(server):
    eng = server.engine
    body = {
        "messages": [{"role": "user", "content": "long one"}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    before = len(eng.aborts)
    _stream_then_drop(server.base_url, body, 3)
    wait_cache_zero(server.base_url)
    assert len(eng.aborts) > before
    assert metric(server.base_url, "parity_http_requests_in_flight") == 0


def test_client_disconnect_before_first_token_aborts():
    eng = FakeEngine(step_s=0.001, first_token_delay_s=0.3)
    srv = start(eng, api_key=None)
    try:

        async def go(stream: bool):
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=5) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post(
                        "/v1/chat/completions",
                        timeout=0.1,
                        json={
                            "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 300,
                            "ignore_eos": True,
                            "stream": stream,
                        },
                    )

        for stream in (True, False):
            n = len(eng.aborts)
            asyncio.run(go(stream))
            deadline = time.monotonic() + 5
            while len(eng.aborts) == n or eng.stats()["cache_used_bytes"]:
                assert time.monotonic() < deadline, "request not aborted after disconnect"
                time.sleep(0.02)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- overload
def test_queue_full_gives_429_with_retry_after():
    eng = FakeEngine(step_s=0.005, max_num_seqs=1, max_waiting=1)
    srv = start(eng, api_key=None, retry_after_s=2)
    try:

        async def go():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=20) as c:
                body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 30, "ignore_eos": True}
                return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(6)])

        rs = asyncio.run(go())
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        r429 = next(r for r in rs if r.status_code == 429)
        assert r429.headers["retry-after"] == "2" and r429.json()["error"]["type"] == "rate_limit_error"
        assert eng.stats()["cache_used_bytes"] == 0
    finally:
        srv.stop()


def test_load_64_concurrent_streams(server):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        st = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"load {i}"}], max_tokens=24, stream=True
        )
        text, fin = "", None
        async for ch in st:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                fin = ch.choices[0].finish_reason or fin
        return text, fin

    async def go():
        c = openai.AsyncOpenAI(
            base_url=server.base_url + "/v1",
            api_key=KEY,
            max_retries=0,
            timeout=60,
            http_client=openai.DefaultAsyncHttpxClient(
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
            ),
        )
        try:
            return await asyncio.gather(*[one(c, i) for i in range(64)])
        finally:
            await c.close()

    res = asyncio.run(go())
    assert len(res) == 64 and all(fin == "length" and len(text) > 0 for text, fin in res)
    for i, (text, _) in enumerate(res):
        prompt = FakeChatFormat().encode([{"role": "user", "content": f"load {i}"}], None, False, None)
        assert text == head(default_respond(prompt), 24)
    wait_cache_zero(server.base_url)
    assert metric(server.base_url, "parity_http_requests_in_flight") == 0


def test_engine_failure_is_a_500_or_an_error_event(server, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "FAIL"}])
    assert "boom" in e.value.body["message"] and e.value.body["code"] == "engine_error"
    with httpx.stream(
        "POST",
        server.base_url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "FAIL", "stream": True, "max_tokens": 20},
    ) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert "boom" in events[-1]["error"]["message"]
    wait_cache_zero(server.base_url)


# ---------------------------------------------------------------------------------------------- real chat format
def _dsml_respond(prompt: str) -> str:
    """A scripted model that speaks DeepSeek-V4's real format (parity.tokenizer renders the DSML)."""
    from parity.tokenizer.chat import render_tool_calls

    think = "Need the weather.</think>" if prompt.endswith("<think>") else ""
    if "<tool_result>" in prompt:
        return think + "It is sunny in Paris."
    if "## Tools" in prompt:
        return think + "Let me check.\n\n" + render_tool_calls([("", "get_weather", {"city": "Paris", "days": 3})])
    return think + "Hello!"


@pytest.fixture(scope="module")
def v4_client():
    """Fake engine (byte tokens, so any text streams byte by byte) with the real V4 chat encoding/parsing."""
    eng = FakeEngine(step_s=0.0002, respond=_dsml_respond, max_model_len=4096)
    app = build_app(eng, ServerSettings(served_model_names=["tiny"]), sampling_params_cls=FakeSamplingParams)
    srv = ThreadedServer(app, drain_timeout_s=1.0).start()
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    srv.stop()


@pytest.mark.parametrize("thinking", [False, True])
def test_v4_format_tool_call_round_trip_stream_and_not(v4_client, thinking):
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    extra = {"thinking": {"type": "enabled" if thinking else "disabled"}}
    r = v4_client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, extra_body=extra, max_tokens=1000)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    assert getattr(c.message, "reasoning_content", None) == ("Need the weather." if thinking else None)
    (tc,) = c.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris", "days": 3}
    assert tc.id

    calls: dict[int, dict] = {}
    content = reasoning = ""
    finish = None
    for ch in v4_client.chat.completions.create(
        model="tiny", messages=msgs, tools=TOOLS, extra_body=extra, max_tokens=1000, stream=True
    ):
        d = ch.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""
        for t in d.tool_calls or []:
            cur = calls.setdefault(t.index, {"id": t.id, "name": t.function.name, "arguments": ""})
            cur["arguments"] += t.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert reasoning == ("Need the weather." if thinking else "")
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}

    msgs += [c.message, {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'}]
    r2 = v4_client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, extra_body=extra)
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"


def test_v4_format_tool_message_without_its_call_is_400(v4_client):
    """As OpenAI: a tool result must answer a preceding assistant tool call (else 400 naming the field)."""
    for msgs, param in [
        (
            [{"role": "tool", "tool_call_id": "call_1", "content": "r"}, {"role": "user", "content": "q"}],
            "messages.0.role",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_2", "content": "r"},
            ],
            "messages.2.tool_call_id",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as ei:
            v4_client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=5)
        assert ei.value.body["param"] == param, ei.value.body
    r = v4_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    assert r.choices[0].message.content == "Hello!"


def test_model_alias_is_accepted_but_not_listed():
    srv = start(FakeEngine(step_s=0.0005), model_aliases=["/ckpt/DeepSeek-V4-Flash"])
    try:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        r = c.completions.create(model="/ckpt/DeepSeek-V4-Flash", prompt="hi", max_tokens=2)
        assert r.model == "/ckpt/DeepSeek-V4-Flash" and r.choices[0].finish_reason == "length"
    finally:
        srv.stop()
