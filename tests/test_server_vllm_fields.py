"""vLLM's request fields on the OpenAI server (fake engine): the logprobs limit, `prompt_logprobs`, the
default-only fields, what is refused, and the messages of bad `stop` and assistant-message input."""

from __future__ import annotations

import httpx
import pytest
from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams

from parity.engine.sampling_params import MAX_LOGPROBS
from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer
from parity.server.vllm_flags import BY_NAME

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(step_s=0.001, max_num_seqs=16, max_waiting=64)
    app = build_app(
        eng,
        ServerSettings(served_model_names=["tiny"]),
        chat_format=FakeChatFormat(),
        sampling_params_cls=FakeSamplingParams,
    )
    srv = ThreadedServer(app, drain_timeout_s=1.0).start()
    yield srv
    srv.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=30)


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


# ------------------------------------------------------------------------------------ the logprobs limit
def test_logprobs_limit_is_the_engines_for_both_endpoints(server):
    """Completions `logprobs` and chat `top_logprobs` go up to SamplingParams' MAX_LOGPROBS (20, vLLM's)."""
    assert MAX_LOGPROBS == 20
    r = post(server, CMPL, {"prompt": "Hello", "max_tokens": 2, "logprobs": MAX_LOGPROBS})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["top_logprobs"]) == 2
    r = post(server, CHAT, {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": MAX_LOGPROBS})
    assert r.status_code == 200, r.text
    for path, body, name in (
        (CMPL, {"prompt": "Hello", "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        (CMPL, {"prompt": "Hello", "logprobs": -1}, "logprobs"),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    ):
        err = error_of(post(server, path, body))
        assert err["param"] == name and err["code"] == "invalid_value"
        assert f"expected an integer in [0, {MAX_LOGPROBS}]" in err["message"]
    assert f"up to {MAX_LOGPROBS} logprobs" in BY_NAME["--max-logprobs"].note


# ------------------------------------------------------------------------------------ messages of bad input
@pytest.mark.parametrize(
    "stop,param,got", [([1], "stop.0", "(got 1)"), (["a", "b", 2.5], "stop.2", "(got 2.5)"), (5, "stop", "(got 5)")]
)
def test_a_bad_stop_names_the_element_at_fault(server, stop, param, got):
    err = error_of(post(server, CMPL, {"prompt": "Hello", "stop": stop}))
    assert err["param"] == param and err["code"] == "invalid_type"
    assert err["message"] == f"Invalid value for '{param}': Input should be a valid string {got}"


def test_a_bad_content_part_in_a_list_names_the_part(server):
    err = error_of(post(server, CHAT, {"messages": [{"role": "user", "content": [{"type": 5}]}]}))
    assert err["param"] == "messages.0.content.0.type"


def test_assistant_message_without_content_says_what_it_needs(server):
    msgs = [*USER, {"role": "assistant", "tool_calls": []}, *USER]
    err = error_of(post(server, CHAT, {"messages": msgs}))
    assert err["param"] == "messages.1.tool_calls"
    assert err["message"] == (
        "messages[1].tool_calls is empty: an assistant message needs content or at least one tool call"
    )
    err = error_of(post(server, CHAT, {"messages": [*USER, {"role": "assistant"}, *USER]}))
    assert err["param"] == "messages.1.content"
    assert err["message"] == (
        "messages[1].content: an assistant message needs content (a string or a list of text parts) or tool_calls"
    )
    err = error_of(post(server, CHAT, {"messages": [{"role": "user", "content": None}]}))
    assert err["param"] == "messages.0.content" and "a user message needs content" in err["message"]
    assert "only an assistant message with tool_calls may leave it null" in err["message"]
