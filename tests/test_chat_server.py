"""Chat encoding, output recovery and the OpenAI fields through the real V4 tokenizer and the HTTP server.

The engine is parity's own AsyncEngine over a ScriptedModel (its greedy output is a script chosen by a
``[case:NAME]`` marker in the prompt), so detokenization, stop strings and the sampler are the real ones.
Every case runs non-streamed and streamed token by token and in groups of 2-3 tokens per delta, and the
three must agree.
"""

from __future__ import annotations

import itertools
import json
import re
from types import SimpleNamespace

import httpx
import pytest

from parity.engine import AsyncEngine, EngineArgs
from parity.engine.testing import ScriptedModel
from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer
from parity.tokenizer import load_tokenizer, special
from parity.tokenizer.tokenizer import _bytes_to_unicode

TOK = load_tokenizer(None)
EOS = special.EOS
#: case name -> the scripted answer (text, tokenized with the real tokenizer, or token ids)
SCRIPTS: dict[str, str | list[int]] = {"default": "Hello!"}
#: prompt texts the model saw, latest last
PROMPTS: list[str] = []
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {"name": "run", "parameters": {"type": "object", "properties": {"input": {"type": "object"}}}},
    },
]


def dsml_call(name: str, *params: tuple[str, str, str], close: bool = True) -> str:
    """A DSML block as the model writes it: params are (name, "true"|"false", value)."""
    body = "".join(f'<｜DSML｜parameter name="{k}" string="{s}">{v}</｜DSML｜parameter>\n' for k, s, v in params)
    block = f'\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="{name}">\n{body}</｜DSML｜invoke>\n'
    return block + ("</｜DSML｜tool_calls>" if close else "")


def respond(prompt_ids: list[int]) -> list[int]:
    text = TOK.decode(prompt_ids, skip_special_tokens=False)
    PROMPTS.append(text)
    names = re.findall(r"\[case:(\w+)\]", text)
    answer = SCRIPTS[names[-1] if names else "default"]
    return TOK.encode(answer) if isinstance(answer, str) else list(answer)


class GroupedEngine:
    """The engine with its deltas merged in groups (`groups` cycles: [1] token by token, [2, 3]...)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.groups = [1]

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def generate(self, prompt_token_ids, params, request_id):
        sizes = itertools.cycle(self.groups)
        want, pending = next(sizes), []
        inner = self.engine.generate(prompt_token_ids, params, request_id)
        try:
            async for d in inner:
                pending.append(d)
                if len(pending) >= want or d.finished:
                    yield merge(pending)
                    want, pending = next(sizes), []
        finally:
            await inner.aclose()


def merge(ds: list) -> SimpleNamespace:
    last = ds[-1]
    lps = [x for d in ds for x in (d.logprobs or [])]
    return SimpleNamespace(
        request_id=last.request_id,
        new_token_ids=[t for d in ds for t in d.new_token_ids],
        new_text="".join(d.new_text for d in ds),
        finished=last.finished,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        logprobs=lps if any(d.logprobs is not None for d in ds) else None,
        error=last.error,
    )


def start_server(tokenizer=TOK, chat_format=None, **settings) -> tuple[ThreadedServer, GroupedEngine]:
    model = ScriptedModel(respond, vocab_size=TOK.vocab_size, runner_up=TOK.think_end_id)
    eng = GroupedEngine(
        AsyncEngine(
            EngineArgs(device="cpu", cache_memory=1 << 24, max_model_len=4096), model=model, tokenizer=tokenizer
        )
    )
    app = build_app(eng, ServerSettings(served_model_names=["v4"], **settings), chat_format=chat_format)
    srv = ThreadedServer(app, drain_timeout_s=1.0).start()
    srv.engine, srv.app = eng, app
    return srv, eng


@pytest.fixture(scope="module")
def server():
    srv, _ = start_server()
    yield srv
    srv.stop()


MODES = ("full", "tokens", "groups")


def call(srv, path: str, body: dict, mode: str = "full") -> dict:
    """One request; a streamed answer is folded into the shape of a whole one (plus `raw` chunks)."""
    srv.engine.groups = [2, 3] if mode == "groups" else [1]
    body = {"model": "v4", **body}
    if mode == "full":
        r = httpx.post(srv.base_url + path, json=body, timeout=60)
        return {"status": r.status_code, **r.json()}
    body.update(stream=True, stream_options={"include_usage": True})
    chunks = []
    with httpx.stream("POST", srv.base_url + path, json=body, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, **r.json()}
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return {"status": 200, "chunks": chunks, "usage": chunks[-1]["usage"], "choices": fold(chunks)}


def fold(chunks: list[dict]) -> list[dict]:
    out: dict[int, dict] = {}
    for ch in chunks:
        for c in ch["choices"]:
            o = out.setdefault(
                c["index"],
                {
                    "index": c["index"],
                    "message": {"content": "", "reasoning_content": ""},
                    "text": "",
                    "calls": {},
                    "logprobs": [],
                    "token_ids": [],
                },
            )
            d = c.get("delta")
            if d is not None:
                o["message"]["content"] += d.get("content") or ""
                o["message"]["reasoning_content"] += d.get("reasoning_content") or ""
                for t in d.get("tool_calls") or []:
                    cur = o["calls"].setdefault(
                        t["index"],
                        {"id": t.get("id"), "function": {"name": t["function"].get("name"), "arguments": ""}},
                    )
                    cur["function"]["arguments"] += t["function"].get("arguments") or ""
            o["text"] += c.get("text") or ""
            o["token_ids"] += c.get("token_ids") or []
            if c.get("logprobs"):
                lp = c["logprobs"]
                o["logprobs"] += lp["content"] if "content" in lp else [lp]
            if c.get("finish_reason"):
                o["finish_reason"] = c["finish_reason"]
    for o in out.values():
        o["message"]["tool_calls"] = [o["calls"][i] for i in sorted(o["calls"])] or None
    return [out[i] for i in sorted(out)]


def summary(res: dict) -> tuple:
    """(content, reasoning, [(name, arguments)], finish_reason) of choice 0, mode-independent."""
    c = res["choices"][0]
    m = c["message"]
    calls = [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in m.get("tool_calls") or []]
    return m.get("content") or "", m.get("reasoning_content"), calls, c["finish_reason"]


def chat_all_modes(srv, body: dict, thinking: bool) -> list[tuple]:
    """Run `body` in every mode; return the summaries (the streamed ones with reasoning "" as None when
    thinking is off)."""
    body = {**body, "thinking": {"type": "enabled" if thinking else "disabled"}}
    out = []
    for mode in MODES:
        res = call(srv, "/v1/chat/completions", body, mode)
        assert res["status"] == 200, res
        content, reasoning, calls, finish = summary(res)
        if mode != "full" and not thinking:
            assert reasoning == ""
            reasoning = None
        out.append((content, reasoning, calls, finish))
    return out


def user(case: str, text: str = "Hi") -> list[dict]:
    return [{"role": "user", "content": f"{text} [case:{case}]"}]


def no_markup(*texts: str | None) -> None:
    for t in texts:
        for bad in ("｜DSML｜", "<think>", "</think>", "<｜", "｜>"):
            assert bad not in (t or ""), (bad, t)


# ---------------------------------------------------------------- logprobs bytes and token ids
def byte_ids(data: bytes) -> list[int]:
    to_char = _bytes_to_unicode()
    return [TOK.token_to_id(to_char[b]) for b in data]


def test_logprobs_bytes_of_byte_level_tokens(server):
    ids = byte_ids("赋".encode()) + TOK.encode("!")
    assert len(ids) == 4
    SCRIPTS["bytes"] = ids
    for mode in MODES:
        res = call(
            server, "/v1/chat/completions", {"messages": user("bytes"), "logprobs": True, "top_logprobs": 2}, mode
        )
        c = res["choices"][0]
        assert (c["message"]["content"] or "") == "赋!"
        items = c["logprobs"]["content"] if mode == "full" else c["logprobs"]
        assert [i["bytes"] for i in items[:3]] == [[232], [181], [139]]
        assert [i["token"] for i in items[:3]] == ["bytes:\\xe8", "bytes:\\xb5", "bytes:\\x8b"]
        assert items[3]["token"] == "!" and items[3]["bytes"] == [33]
        assert items[0]["top_logprobs"][0]["bytes"] == [232]
        res = call(server, "/v1/completions", {"prompt": "[case:bytes]", "logprobs": 2, "max_tokens": 10}, mode)
        c = res["choices"][0]
        lps = [c["logprobs"]] if mode == "full" else c["logprobs"]
        tokens = [t for lp in lps for t in lp["tokens"]]
        offsets = [o for lp in lps for o in lp["text_offset"]]
        assert c["text"] == "赋!" and tokens[:3] == ["bytes:\\xe8", "bytes:\\xb5", "bytes:\\x8b"]
        assert offsets[:4] == [0, 0, 0, 1]
        tops = [t for lp in lps for t in lp["top_logprobs"]]
        assert "bytes:\\xe8" in tops[0] and "</think>" in tops[0]


def test_text_offset_after_an_unfinished_character_counts_its_replacement(server):
    """A token ending in part of a character the next token does not complete: that part is one U+FFFD of
    the token's own (the whole-response text and the streamed one agree), the next token starts after it.
    Once as one multi-byte token (bytes E0 B2 B0 E0 B3 8D E0 B2: two characters and a cut third), once
    split into byte-level tokens."""
    kannada = b"\xe0\xb2\xb0\xe0\xb3\x8d\xe0\xb2"
    tok_id = TOK.token_to_id("".join(_bytes_to_unicode()[b] for b in kannada))
    assert tok_id is not None
    rest = TOK.encode(" Citations")
    for ids, want in (([tok_id] + rest, [0, 3]), (byte_ids(kannada) + rest, [0, 0, 0, 1, 1, 1, 2, 2, 3])):
        SCRIPTS["cut_char"] = ids
        for mode in MODES:
            res = call(server, "/v1/completions", {"prompt": "[case:cut_char]", "logprobs": 1, "max_tokens": 12}, mode)
            c = res["choices"][0]
            lps = [c["logprobs"]] if mode == "full" else c["logprobs"]
            offsets = [o for lp in lps for o in lp["text_offset"]]
            text = c["text"]
            assert text == "\u0cb0\u0ccd\ufffd Citations", (mode, text)
            assert offsets[: len(ids)] == want, (mode, offsets)
            assert text[offsets[len(ids) - 1] :] == " Citations"


def test_skip_tokenizer_init_returns_token_ids_and_distinct_top_logprobs():
    srv, _ = start_server(tokenizer=None)
    try:
        SCRIPTS["ids"] = [1000, 1001, 1002]
        prompt = TOK.encode("[case:ids]")
        for mode in MODES:
            res = call(srv, "/v1/completions", {"prompt": prompt, "logprobs": 2, "max_tokens": 10}, mode)
            c = res["choices"][0]
            assert c["token_ids"][:3] == [1000, 1001, 1002] and c["text"] == ""
            lps = [c["logprobs"]] if mode == "full" else c["logprobs"]
            assert [t for lp in lps for t in lp["tokens"]][:3] == ["token_id:1000", "token_id:1001", "token_id:1002"]
            top = [t for lp in lps for t in lp["top_logprobs"]][0]
            assert set(top) == {"token_id:1000", f"token_id:{TOK.think_end_id}"}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={"messages": user("ids")}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "tokenizer_unavailable"
    finally:
        srv.stop()


def test_return_token_ids_and_token_id_logprobs_with_a_tokenizer(server):
    SCRIPTS["ids2"] = "Yes."
    res = call(
        server,
        "/v1/completions",
        {
            "prompt": "[case:ids2]",
            "max_tokens": 10,
            "return_token_ids": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        },
    )
    c = res["choices"][0]
    assert c["text"] == "Yes." and c["token_ids"] == TOK.encode("Yes.") + [TOK.eos_token_id]
    assert c["logprobs"]["tokens"][0] == f"token_id:{TOK.encode('Yes.')[0]}"


# ---------------------------------------------------------------- prompt shape (trailing system, template flags)
A_CHAT = special.ASSISTANT + special.THINK_END


def last_prompt_of(srv, body: dict) -> str:
    res = call(srv, "/v1/chat/completions", {"max_tokens": 5, **body})
    assert res["status"] == 200, res
    return PROMPTS[-1]


def test_trailing_and_mid_system_messages_get_the_assistant_transition(server):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi [case:default]"},
        {"role": "system", "content": "Reminder: be brief."},
    ]
    p = last_prompt_of(server, {"messages": msgs})
    assert p.endswith("Reminder: be brief." + A_CHAT), p
    p = last_prompt_of(server, {"messages": msgs, "thinking": {"type": "enabled"}})
    assert p.endswith("Reminder: be brief." + special.ASSISTANT + special.THINK_START)
    msgs = [
        {"role": "user", "content": "q [case:default]"},
        {"role": "system", "content": "mid"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    p = last_prompt_of(server, {"messages": msgs})
    assert f"mid{A_CHAT}a{EOS}" in p and f"q [case:default]{special.USER}" not in p


def test_add_generation_prompt_and_continue_final_message(server):
    msgs = user("default") + [{"role": "assistant", "content": "The answer is"}]
    p = last_prompt_of(server, {"messages": msgs})  # default: a fresh turn after the complete one
    assert p.endswith(f"The answer is{EOS}{A_CHAT}")
    p = last_prompt_of(server, {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True})
    assert p.endswith(f"{A_CHAT}The answer is")
    p = last_prompt_of(server, {"messages": user("default"), "add_generation_prompt": False})
    assert p.endswith("Hi [case:default]")
    res = call(server, "/v1/chat/completions", {"messages": msgs, "continue_final_message": True})
    assert res["status"] == 400 and res["error"]["param"] == "continue_final_message", res
    # thinking: continuing an answer starts outside the reasoning block; continuing reasoning inside it
    SCRIPTS["cont"] = " 4.</think>"
    msgs = user("cont") + [{"role": "assistant", "content": "", "reasoning_content": "2+2 is"}]
    for got in chat_all_modes(
        server, {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True}, thinking=True
    ):
        assert got == ("", " 4.", [], "stop")
    assert PROMPTS[-1].endswith(special.THINK_START + "2+2 is")


# ---------------------------------------------------------------- output that breaks the grammar
CALL = dsml_call("get_weather", ("city", "true", "Paris"))


@pytest.mark.parametrize(
    "script, thinking, expected",
    [
        # a tool block opened inside the reasoning block; the stray close tag after it is absorbed
        (
            "Need weather." + CALL + "</think>" + EOS,
            True,
            ("", "Need weather.", [("get_weather", {"city": "Paris"})], "tool_calls"),
        ),
        # redundant closing tags after a complete block
        (
            "Sure." + CALL + "</｜DSML｜tool_calls></｜DSML｜invoke>\n" + EOS,
            False,
            ("Sure.", None, [("get_weather", {"city": "Paris"})], "tool_calls"),
        ),
        # control tokens sampled mid-output
        (
            "Let<｜User｜> me<think> see.</think>Hi<｜Assistant｜> there<｜latest_reminder｜>!" + EOS,
            True,
            ("Hi there!", "Let me see.", [], "stop"),
        ),
        ("Hi<｜User｜> there｜DSML｜!</think>" + EOS, False, ("Hi there!", None, [], "stop")),
    ],
    ids=["call-in-reasoning", "redundant-close", "control-thinking", "control-chat"],
)
def test_grammar_breaks_recovered_identically(server, script, thinking, expected):
    SCRIPTS["broken"] = script
    got = chat_all_modes(server, {"messages": user("broken"), "tools": TOOLS[:1]}, thinking)
    assert got == [expected] * 3
    no_markup(got[0][0], got[0][1])


def test_answer_without_closing_the_thinking_block(server):
    SCRIPTS["noclose"] = "Good morning! How can I help?" + EOS
    full, *streams = chat_all_modes(server, {"messages": user("noclose")}, thinking=True)
    assert full == ("Good morning! How can I help?", "", [], "stop")
    for s in streams:  # reasoning was streamed before the end was known; the answer is content too
        assert s == ("Good morning! How can I help?", "Good morning! How can I help?", [], "stop")
    # cut by max_tokens: it stays reasoning
    SCRIPTS["noclose"] = "still thinking about it" * 5
    got = chat_all_modes(server, {"messages": user("noclose"), "max_tokens": 4}, thinking=True)
    assert got == [("", TOK.decode(TOK.encode(got[0][1])[:4]), [], "length")] * 3 and got[0][1]


def test_truncation_inside_a_tool_call(server):
    SCRIPTS["cut"] = "Let me check." + dsml_call("get_weather", ("city", "true", "Paris is a long name"))
    n_cut = len(TOK.encode("Let me check." + CALL[:-60])) + 2
    for thinking in (False, True):
        prefix = "ok</think>" if thinking else ""
        SCRIPTS["cut"] = prefix + SCRIPTS["cut"].removeprefix("ok</think>")
        got = chat_all_modes(server, {"messages": user("cut"), "tools": TOOLS, "max_tokens": n_cut}, thinking)
        assert got == [("Let me check.", "ok" if thinking else None, [], "length")] * 3


def test_tool_choice_none_never_leaks_dsml(server):
    SCRIPTS["none"] = "Let me check." + CALL + EOS
    got = chat_all_modes(server, {"messages": user("none"), "tools": TOOLS, "tool_choice": "none"}, False)
    assert got == [("Let me check.", None, [], "stop")] * 3
    got = chat_all_modes(server, {"messages": user("none")}, False)  # no tools at all
    assert got == [("Let me check.", None, [], "stop")] * 3


# ---------------------------------------------------------------- stop strings, usage, strict thinking
def test_stop_strings_apply_to_the_answer_only(server):
    SCRIPTS["stop"] = "I could say STOP here.</think>The answer STOP more" + EOS
    got = chat_all_modes(server, {"messages": user("stop"), "stop": ["STOP"]}, thinking=True)
    assert got == [("The answer ", "I could say STOP here.", [], "stop")] * 3
    SCRIPTS["stop"] = "I could say STOP here." + EOS
    got = chat_all_modes(server, {"messages": user("stop"), "stop": ["STOP"]}, thinking=False)
    assert got == [("I could say ", None, [], "stop")] * 3


def test_usage_reasoning_tokens(server):
    SCRIPTS["usage"] = "abc def ghi</think>Hi." + EOS
    n_reasoning = len(TOK.encode("abc def ghi"))
    for thinking, expected in ((True, n_reasoning), (False, 0)):
        body = {"messages": user("usage"), "thinking": {"type": "enabled" if thinking else "disabled"}}
        for mode in MODES:
            u = call(server, "/v1/chat/completions", body, mode)["usage"]
            assert u["completion_tokens_details"] == {"reasoning_tokens": expected}, (mode, u)
            assert u["completion_tokens"] == len(TOK.encode(SCRIPTS["usage"]))


def test_strict_thinking_bans_eos_until_the_reasoning_block_closes(server):
    SCRIPTS["strict"] = "Thinking </thi nk> <｜end▁of▁sen" + EOS  # EOS inside the reasoning block
    settings = server.app.state.server.settings
    settings.strict_thinking = True
    try:
        got = chat_all_modes(server, {"messages": user("strict")}, thinking=True)
        # EOS banned: the runner-up (</think>) closes the block, then EOS ends the answer
        assert got == [("", "Thinking </thi nk> <｜end▁of▁sen", [], "stop")] * 3
        got = chat_all_modes(server, {"messages": user("strict")}, thinking=False)  # off without thinking
        assert got == [("Thinking </thi nk> <｜end▁of▁sen", None, [], "stop")] * 3
        res = call(
            server,
            "/v1/chat/completions",
            {"messages": user("strict"), "ignore_eos": True, "max_tokens": 20, "thinking": {"type": "enabled"}},
        )
        assert res["choices"][0]["finish_reason"] == "length"
    finally:
        settings.strict_thinking = False
    got = chat_all_modes(server, {"messages": user("strict")}, thinking=True)  # opt-in: off by default
    assert got[0][0] == "Thinking </thi nk> <｜end▁of▁sen"  # the unclosed block became the answer


# ---------------------------------------------------------------- tool arguments
@pytest.mark.parametrize(
    "call_text, expected",
    [
        (dsml_call("get_weather", ("city", "false", "Paris, France")), ("get_weather", {"city": "Paris, France"})),
        (dsml_call("get_weather", ("arguments", "false", '{"city": "Rome"}')), ("get_weather", {"city": "Rome"})),
        (dsml_call("get_weather", ("input", "true", '{"city": "Oslo"}')), ("get_weather", {"city": "Oslo"})),
        (dsml_call("run", ("input", "false", '{"cmd": "ls"}')), ("run", {"input": {"cmd": "ls"}})),  # declared
        (dsml_call("get_weather", ("days", "false", "NaN")), ("get_weather", {"days": "NaN"})),
    ],
    ids=["not-json-value", "arguments-wrapper", "input-wrapper-string", "declared-input-kept", "nan-is-a-string"],
)
def test_tool_arguments_are_always_valid_json(server, call_text, expected):
    SCRIPTS["args"] = "On it." + call_text + EOS
    got = chat_all_modes(server, {"messages": user("args"), "tools": TOOLS}, False)
    assert got == [("On it.", None, [expected], "tool_calls")] * 3
