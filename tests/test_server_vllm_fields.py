"""vLLM's request fields on the OpenAI server (fake engine): the logprobs limit, `prompt_logprobs`, the
default-only fields, what is refused, and the messages of bad `stop` and assistant-message input."""

from __future__ import annotations

import httpx
import pytest
from test_server_fakes import FakeEngine, start_fake_server

from parity.engine.sampling_params import MAX_LOGPROBS
from parity.server.vllm_flags import BY_NAME

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server():
    srv = start_fake_server(FakeEngine(step_s=0.001, max_num_seqs=16, max_waiting=64))
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


# ------------------------------------------------------------------------------------ prompt_logprobs
def _prompt_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # the fake tokenizer: one token per byte


def test_completions_prompt_logprobs_on_each_choice(server):
    """The fake engine scores prompt token t at -0.5 with one rival, token 7, at -2.0: each choice carries
    them as vLLM's `prompt_logprobs` (null first, then the prompt token and the top N by token id)."""
    r = post(server, CMPL, {"prompt": "Hello", "max_tokens": 2, "n": 2, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    ids = _prompt_ids("Hello")
    for c in r.json()["choices"]:
        plp = c["prompt_logprobs"]
        assert len(plp) == len(ids) and plp[0] is None
        for tid, d in zip(ids[1:], plp[1:], strict=True):
            assert list(d) == [str(tid), "7"]
            assert d[str(tid)] == {"logprob": -0.5, "rank": 1, "decoded_token": chr(tid - 3)}
            assert d["7"] == {"logprob": -2.0, "rank": 2, "decoded_token": "\x04"}
        assert c["logprobs"] is None  # generated-token logprobs are a separate field
    zero = post(server, CMPL, {"prompt": "Hello", "max_tokens": 1, "prompt_logprobs": 0}).json()["choices"][0]
    assert [list(d) for d in zero["prompt_logprobs"][1:]] == [[str(t)] for t in ids[1:]]  # the token alone
    plain = post(server, CMPL, {"prompt": "Hello", "max_tokens": 1, "prompt_logprobs": None}).json()["choices"][0]
    assert "prompt_logprobs" not in plain


def test_prompt_logprobs_with_echo_keep_their_own_top_n(server):
    """echo + logprobs 1 and prompt_logprobs 2 (the engine computes the larger): the echoed tokens' top_logprobs
    hold one entry, prompt_logprobs two; echo with max_tokens 0 (prompt scoring) carries them too."""
    for max_tokens in (2, 0):
        body = {"prompt": "Hello", "max_tokens": max_tokens, "echo": True, "logprobs": 1, "prompt_logprobs": 2}
        c = post(server, CMPL, body).json()["choices"][0]
        assert [len(t) for t in c["logprobs"]["top_logprobs"][1:5]] == [1] * 4
        assert [len(d) for d in c["prompt_logprobs"][1:]] == [2] * 4


def test_chat_prompt_logprobs_on_the_response(server):
    """Chat puts `prompt_logprobs` on the response, not on each choice (as vLLM: the prompt is shared)."""
    r = post(server, CHAT, {"messages": USER, "max_tokens": 2, "n": 2, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    plp, n_prompt = body["prompt_logprobs"], body["usage"]["prompt_tokens"]
    assert len(plp) == n_prompt and plp[0] is None and all(len(d) == 1 for d in plp[1:])
    assert all("prompt_logprobs" not in c for c in body["choices"])
    assert "prompt_logprobs" not in post(server, CHAT, {"messages": USER, "max_tokens": 2}).json()


@pytest.mark.parametrize(
    "path,body,code",
    [
        (CMPL, {"prompt": "Hello", "prompt_logprobs": MAX_LOGPROBS + 1}, "invalid_value"),
        (CHAT, {"messages": USER, "prompt_logprobs": -1}, "invalid_value"),
        (CMPL, {"prompt": "Hello", "prompt_logprobs": 1, "stream": True}, "invalid_value"),
        (CHAT, {"messages": USER, "prompt_logprobs": "2"}, "invalid_type"),
    ],
)
def test_bad_prompt_logprobs_is_a_400_naming_it(server, path, body, code):
    err = error_of(post(server, path, body))
    assert err["param"] == "prompt_logprobs" and err["code"] == code


@pytest.mark.parametrize("path,base", [(CMPL, {"prompt": "Hello"}), (CHAT, {"messages": USER})])
def test_prompt_logprobs_zero_streams_as_vllm(server, path, base):
    """vLLM refuses prompt_logprobs > 0 with stream and accepts 0: the stream is the plain one."""
    r = post(server, path, {**base, "max_tokens": 2, "stream": True, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------------------------ vLLM defaults and refusals
@pytest.mark.parametrize("path,base", [(CMPL, {"prompt": "Hello"}), (CHAT, {"messages": USER})])
def test_vllm_fields_at_their_defaults_are_accepted(server, path, base):
    body = {
        **base,
        "max_tokens": 2,
        "spaces_between_special_tokens": True,
        "use_beam_search": False,
        "length_penalty": 1.0,
        "bad_words": [],
        "allowed_token_ids": None,
        "guided_json": None,
        "guided_choice": None,
        "structured_outputs": None,
        "response_format": {"type": "text"},
    }
    r = post(server, path, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field,value",
    [
        ("spaces_between_special_tokens", False),
        ("use_beam_search", True),
        ("length_penalty", 0.8),
        ("bad_words", ["x"]),
        ("allowed_token_ids", [5, 6]),
        ("guided_json", {"type": "object"}),
        ("guided_regex", "a+"),
        ("guided_choice", ["yes", "no"]),
        ("guided_grammar", "root ::= 'a'"),
        ("structured_outputs", {"json": {"type": "object"}}),
        ("logit_bias", {"5": 1.0}),
        ("response_format", {"type": "json_object"}),
    ],
)
@pytest.mark.parametrize("path,base", [(CMPL, {"prompt": "Hello"}), (CHAT, {"messages": USER})])
def test_what_parity_cannot_honour_is_refused_by_name(server, path, base, field, value):
    err = error_of(post(server, path, {**base, field: value}))
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    assert "not supported" in err["message"]
