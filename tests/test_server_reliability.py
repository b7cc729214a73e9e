"""One request cannot hurt another, and every mistake gets a one-line OpenAI-shaped answer: prompts x n cap,
lone surrogates in keys, the drain timeout, JSON-only bodies, Host checks, slow and idle clients, 405 `Allow`,
published request schemas, integral floats for integer fields, clients that leave while sending the body."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams

from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer
from parity.server.settings import default_max_seqs_per_request
from parity.server.state import OpenAIServer

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
JSON = {"Content-Type": "application/json"}


def start(engine: FakeEngine, drain_timeout_s: float = 1.0, **settings) -> ThreadedServer:
    settings.setdefault("served_model_names", ["tiny"])
    app = build_app(
        engine,
        ServerSettings(drain_timeout_s=drain_timeout_s, **settings),
        chat_format=FakeChatFormat(),
        sampling_params_cls=FakeSamplingParams,
    )
    return ThreadedServer(app, drain_timeout_s=drain_timeout_s).start()


@pytest.fixture(scope="module")
def server():
    srv = start(FakeEngine(step_s=0.001), max_seqs_per_request=8)
    yield srv
    srv.stop()


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"] and "\n" not in e["message"]
    return e


def post(srv, path, body, **kw):
    return httpx.post(srv.base_url + path, json=body, timeout=10, **kw)


# ----------------------------------------------------------------------------- prompts x n cap
def test_prompts_times_n_is_capped_with_a_400_naming_the_limit(server):
    e = err(post(server, CMPL, {"prompt": ["a"] * 5, "n": 2, "max_tokens": 1}), 400)
    assert e["code"] == "too_many_sequences" and "8" in e["message"] and "--max-seqs-per-request" in e["message"]
    t0 = time.perf_counter()
    e = err(post(server, CMPL, {"prompt": [[5]] * 100_000, "max_tokens": 1}), 400)
    assert e["code"] == "too_many_sequences" and time.perf_counter() - t0 < 5
    r = post(server, CMPL, {"prompt": ["a"] * 4, "n": 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    assert default_max_seqs_per_request(64) == 256 and default_max_seqs_per_request(100) == 400


def test_request_larger_than_the_queue_can_ever_hold_is_a_400_not_a_429():
    srv = start(FakeEngine(step_s=0.001, max_num_seqs=1, max_waiting=4))
    try:
        for path, body in [
            (CMPL, {"prompt": "a", "n": 8, "max_tokens": 1}),
            (CMPL, {"prompt": ["a"] * 6, "max_tokens": 1}),
            (CHAT, {"messages": [{"role": "user", "content": "a"}], "n": 8, "max_tokens": 1}),
        ]:
            r = post(srv, path, body)
            e = err(r, 400)
            assert "retry-after" not in r.headers
            assert e["code"] == "too_many_sequences" and "max_waiting (4)" in e["message"]
            assert e["param"] == ("prompt" if "prompt" in body and isinstance(body["prompt"], list) else "n")
        r = post(srv, CMPL, {"prompt": "a", "n": 4, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
    finally:
        srv.stop()
    from types import SimpleNamespace

    real = SimpleNamespace(args=SimpleNamespace(max_num_seqs=1, max_waiting=4))  # AsyncEngine keeps them in .args
    assert OpenAIServer(real, ServerSettings()).queue_capacity() == (1, 4)
    assert OpenAIServer(SimpleNamespace(), ServerSettings()).queue_capacity() is None


def test_many_prompts_are_tokenized_off_the_event_loop():
    eng = FakeEngine()
    threads = []
    encode = eng.tokenizer.encode

    def spy(text, *a, **k):
        threads.append(threading.current_thread())
        return encode(text, *a, **k)

    eng.tokenizer.encode = spy
    srv = OpenAIServer(eng, ServerSettings())
    ids = asyncio.run(srv.tokenize_many(["ab", "c"], ["prompt.0", "prompt.1"]))
    assert ids == [encode("ab"), encode("c")]
    assert threads and all(t is not threading.main_thread() for t in threads)


# ----------------------------------------------------------------------------- lone surrogate in a key
def test_lone_surrogate_in_a_json_key_is_a_400(server):
    for raw in (b'{"prompt": "hi", "\\ud800": 1}', b'{"prompt": "hi", "x\\udfffy": {"\\ud83d": 2}}'):
        e = err(httpx.post(server.base_url + CMPL, content=raw, headers=JSON), 400)
        assert "surrogate" in e["message"] or "Unrecognized" in e["message"]
    assert post(server, CMPL, {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_a_thinking_budget_below_one_token_is_a_400_naming_it(server):
    msgs = [{"role": "user", "content": "hi"}]
    for budget in (-5, 0):
        body = {"messages": msgs, "max_tokens": 1, "thinking": {"type": "enabled", "budget_tokens": budget}}
        e = err(post(server, CHAT, body), 400)
        assert "budget_tokens" in e["message"], e
    ok = {"messages": msgs, "max_tokens": 1, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert post(server, CHAT, ok).status_code == 200


# ----------------------------------------------------------------------------- JSON only, Host check
def test_non_json_content_types_get_415(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        e = err(httpx.post(server.base_url + CMPL, content=body, headers=headers), 415)
        assert e["code"] == "unsupported_media_type" and "application/json" in e["message"]
    r = httpx.post(server.base_url + CMPL, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_allowed_hosts_refuses_other_host_headers():
    srv = start(FakeEngine(step_s=0.001), allowed_hosts=["localhost", "127.0.0.1", "*.example.org"])
    try:
        body = {"prompt": "hi", "max_tokens": 1}
        e = err(post(srv, CMPL, body, headers={"Host": "evil.test"}), 400)
        assert e["code"] == "host_not_allowed" and "--allowed-hosts" in e["message"]
        assert post(srv, CMPL, body).status_code == 200  # Host: 127.0.0.1:<port>
        assert post(srv, CMPL, body, headers={"Host": "api.example.org:8000"}).status_code == 200
        assert httpx.get(srv.base_url + "/health", headers={"Host": "rebind.attacker.test"}).status_code == 400
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- 405, OpenAPI, integral floats
def test_405_keeps_the_allow_header(server):
    r = httpx.get(server.base_url + CMPL)
    e = err(r, 405)
    assert r.headers["allow"] == "POST" and "GET" in e["message"]


def test_openapi_publishes_request_body_schemas(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    comps = doc["components"]["schemas"]
    for path, model in ((CHAT, "ChatCompletionRequest"), (CMPL, "CompletionRequest")):
        rb = doc["paths"][path]["post"]["requestBody"]
        ref = rb["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and rb["required"]
        assert model in comps
    assert "messages" in comps["ChatCompletionRequest"]["required"]
    assert "prompt" in comps["CompletionRequest"]["required"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert all(r.removeprefix("#/components/schemas/") in comps for r in refs)


def test_integral_floats_are_accepted_for_integer_fields(server):
    r = post(server, CMPL, {"prompt": "hi", "max_tokens": 2.0, "n": 2.0, "seed": 7.0, "top_k": 5.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] == 4
    r = post(
        server, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3.0, "stop_token_ids": [1.0]}
    )
    assert r.status_code == 200, r.text
    assert err(post(server, CMPL, {"prompt": "hi", "max_tokens": 2.5}), 400)["param"] == "max_tokens"
    assert err(post(server, CMPL, {"prompt": "hi", "max_tokens": "2"}), 400)["param"] == "max_tokens"
    assert err(post(server, CMPL, {"prompt": "hi", "n": True}), 400)["param"] == "n"


def test_null_for_an_optional_field_means_its_default(server):
    from parity.server import protocol as P

    bases = {
        P.ChatCompletionRequest: {"messages": [{"role": "user", "content": "hi"}]},
        P.CompletionRequest: {"prompt": "hi"},
    }
    for cls, base in bases.items():
        for name, field in cls.model_fields.items():
            if not field.is_required():  # every optional field accepts null: its default, or None where allowed
                req = cls.model_validate({**base, name: None}, strict=True)
                assert getattr(req, name) in (field.default, None), name
    nulls = {"n": None, "stream": None, "min_tokens": None, "ignore_eos": None, "skip_special_tokens": None}
    r = post(
        server, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": None, **nulls}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = post(server, CMPL, {"prompt": "hi", "max_tokens": 2, "logprobs": None, "echo": None, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] and "hi" not in r.json()["choices"][0]["text"][:2]
    r = post(server, CMPL, {"prompt": "hi", "max_tokens": None})  # null max_tokens: up to the context, as before
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 16
    assert err(post(server, CMPL, {"prompt": None}), 400)["param"] == "prompt"  # required fields stay required
    assert err(post(server, CHAT, {"messages": None}), 400)["param"] == "messages"


def _sse_chunks(srv, path: str, body: dict) -> list[dict]:
    r = post(srv, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize(
    "path,body",
    [
        (CHAT, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "n": 2}),
        (CMPL, {"prompt": "hello", "max_tokens": 4}),
    ],
)
def test_continuous_usage_stats_puts_cumulative_usage_on_every_chunk(server, path, body):
    plain = _sse_chunks(server, path, {**body, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] > 0
    for opts in ({"include_usage": True, "continuous_usage_stats": True}, {"continuous_usage_stats": True}):
        chunks = _sse_chunks(server, path, {**body, "stream_options": opts})
        done = [c["usage"]["completion_tokens"] for c in chunks]
        assert done == sorted(done) and done[-1] == plain[-1]["usage"]["completion_tokens"]
        for c in chunks:
            u = c["usage"]
            assert u["prompt_tokens"] == plain[-1]["usage"]["prompt_tokens"]
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert (chunks[-1]["choices"] == []) == bool(opts.get("include_usage"))  # the final usage-only chunk


# ----------------------------------------------------------------------------- the drain timeout
def test_drain_timeout_ends_requests_with_openai_errors():
    srv = start(FakeEngine(step_s=0.05), drain_timeout_s=0.3)
    results: dict[str, object] = {}
    started = threading.Event()

    def stream():
        with httpx.stream(
            "POST", srv.base_url + CMPL, json={"prompt": "hi", "max_tokens": 400, "stream": True}, timeout=10
        ) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
            results["stream"] = lines

    def full():
        results["full"] = post(srv, CMPL, {"prompt": "hello", "max_tokens": 400})

    threads = [threading.Thread(target=stream), threading.Thread(target=full)]
    for t in threads:
        t.start()
    assert started.wait(5)
    time.sleep(0.1)
    t0 = time.perf_counter()
    assert srv.drain() == 2
    for t in threads:
        t.join(5)
    srv.stop()
    assert time.perf_counter() - t0 < 3
    lines = results["stream"]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["error"]["code"] == "server_shutting_down"
    e = err(results["full"], 503)
    assert e["code"] == "server_shutting_down" and "--drain-timeout" in e["message"]


# ----------------------------------------------------------------------------- slow and idle clients
@pytest.fixture(scope="module")
def strict_server():
    srv = start(FakeEngine(step_s=0.001), request_read_timeout_s=0.5, timeout_keep_alive_s=0.5)
    yield srv
    srv.stop()


def _connect(srv) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=4)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def test_slow_headers_get_408_and_the_connection_closes(strict_server):
    s = _connect(strict_server)
    t0 = time.perf_counter()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    data = _read_all(s)
    assert time.perf_counter() - t0 < 3
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data
    s.close()
    s = _connect(strict_server)  # a connection that sends nothing at all
    t0 = time.perf_counter()
    assert _read_all(s).startswith(b"HTTP/1.1 408") and time.perf_counter() - t0 < 3
    s.close()


def test_slow_body_gets_408_json(strict_server):
    s = _connect(strict_server)
    t0 = time.perf_counter()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt":'
    )
    data = _read_all(s)
    assert time.perf_counter() - t0 < 3
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert json.loads(body)["error"]["code"] == "request_timeout"
    s.close()


def test_idle_keep_alive_connection_is_closed(strict_server):
    s = _connect(strict_server)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    while b"\r\n\r\n" not in first:  # the response may arrive in several segments
        first += s.recv(65536)
    head, _, body = first.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    t0 = time.perf_counter()
    assert _read_all(s) == b""  # closed by the server after the keep-alive timeout
    assert 0.2 < time.perf_counter() - t0 < 3
    s.close()


def test_connection_limit_answers_503():
    srv = start(FakeEngine(step_s=0.001), limit_concurrency=2)
    try:
        idle = [_connect(srv) for _ in range(2)]
        time.sleep(0.1)
        r = httpx.get(srv.base_url + "/health", timeout=4)
        assert r.status_code == 503
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert httpx.get(srv.base_url + "/health", timeout=4).status_code == 200
    finally:
        srv.stop()


def _requests_total(srv, status: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=4).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("parity_requests_total{") and f'status="{status}"' in line
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"Content-Length: 100\r\n\r\n" + b'{"messages": [{',  # 16 of 100 bytes, then close
        b"Transfer-Encoding: chunked\r\n\r\n" + b"zz\r\n{}\r\n",  # a malformed chunk size
    ],
)
def test_client_leaving_while_sending_its_body_is_499_without_traceback(server, raw, caplog):
    before_499, before_500 = _requests_total(server, "499"), _requests_total(server, "500")
    s = _connect(server)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + raw)
    s.close()
    deadline = time.perf_counter() + 3
    while _requests_total(server, "499") == before_499 and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert _requests_total(server, "499") == before_499 + 1
    assert _requests_total(server, "500") == before_500
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert post(server, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------- vLLM's request extras
def test_include_stop_str_in_output_keeps_the_matched_stop_string(server):
    body = {"prompt": "hello", "max_tokens": 30, "stop": ["l"]}
    assert post(server, CMPL, body).json()["choices"][0]["text"] == "Echo: he"
    r = post(server, CMPL, {**body, "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["text"] == "Echo: hel" and r.json()["choices"][0]["stop_reason"] == "l"
    chunks = _sse_chunks(server, CMPL, {**body, "include_stop_str_in_output": True})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Echo: hel"


def test_request_id_names_the_response_and_priority_is_accepted(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def twice():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            return await asyncio.gather(
                c.post(CHAT, json={**body, "request_id": "mine", "priority": 0}),
                c.post(CHAT, json={**body, "request_id": "mine"}),
            )

    for r in asyncio.run(twice()):  # the same request_id twice at once: both answered
        assert r.status_code == 200 and r.json()["id"] == "chatcmpl-mine"
    assert post(server, CMPL, {"prompt": "hi", "max_tokens": 1, "request_id": "x"}).json()["id"] == "cmpl-x"
    assert post(server, CMPL, {"prompt": "hi", "max_tokens": 1}).json()["id"].startswith("cmpl-")
    e = err(post(server, CHAT, {**body, "priority": 1}), 400)
    assert e["param"] == "priority" and "first come, first served" in e["message"]


def test_truncate_prompt_tokens_keeps_the_last_tokens():
    eng = FakeEngine(step_s=0.001)
    srv = start(eng)
    try:
        ids = [3 + b for b in b"abcdefgh"]
        r = post(srv, CMPL, {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3 and eng.seen_prompts[-1] == ids[-3:]
        r = post(srv, CMPL, {"prompt": "abcdefgh", "max_tokens": 1, "truncate_prompt_tokens": 2, "echo": True})
        assert eng.seen_prompts[-1] == ids[-2:] and r.json()["choices"][0]["text"].startswith("gh")
        r = post(srv, CMPL, {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": -1})  # -1: max_model_len
        assert r.status_code == 200 and eng.seen_prompts[-1] == ids
        chat = {"messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 1, "truncate_prompt_tokens": 4}
        r = post(srv, CHAT, chat)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4 and len(eng.seen_prompts[-1]) == 4
        for bad in (0, -2, 513):
            e = err(post(srv, CMPL, {"prompt": ids, "truncate_prompt_tokens": bad}), 400)
            assert e["param"] == "truncate_prompt_tokens"
    finally:
        srv.stop()
