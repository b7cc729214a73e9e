"""Output parsing: whole-text and streaming parsers agree for every split point.

Output format (thinking ``{reasoning}</think>{content}``, DSML tool-call block, EOS): DeepSeek-V4
``encoding/README.md`` ("Interleaved Thinking Mode", "Tool Calling (DSML Format)") and
``encoding/encoding_dsv4.py`` (``parse_message_from_completion_text``) in
https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash/tree/main/encoding.
"""

from __future__ import annotations

import json
import random

import pytest

from parity.tokenizer import IncrementalDetokenizer, StreamingOutputParser, load_tokenizer, parse_output

EOS = "<｜end▁of▁sentence｜>"

TOOL_OUTPUT = (
    'The user wants weather; call the tool.</think>Checking "now".\n\n<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">São "Paulo"\n😀</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"units": ["c"], "x": null}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="get_time">\n\n</｜DSML｜invoke>\n'
    "</｜DSML｜tool_calls>" + EOS
)

# (name, text, thinking, tools_enabled)
SAMPLES = [
    ("readme_thinking", "Simple arithmetic.</think>2 + 2 = 4." + EOS, True, True),
    ("tool_calls", TOOL_OUTPUT, True, True),
    ("chat_plain", "Hello <b>world</b> 深度求索 \n\n still content <｜DSML｜tool_ca", False, True),
    (
        "chat_tool_no_content",
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="q" string="true">a</b>\\n</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>" + EOS + "ignored after EOS",
        False,
        True,
    ),
    (
        "truncated_in_param",
        '<think>r</think>x\n\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="q" string="true">partial </｜DSML',
        True,
        True,
    ),
    (
        "malformed",
        'c1<｜DSML｜tool_calls>junk<｜DSML｜invoke oops>\n<｜DSML｜invoke name="g">'
        '<｜DSML｜parameter bad>v</｜DSML｜parameter><｜DSML｜parameter name="k">v2</｜DSML｜parameter>'
        '<｜DSML｜invoke name="h"></｜DSML｜tool_calls> after '
        '<｜DSML｜tool_calls><｜DSML｜invoke name="i"><｜DSML｜invoke name="j"',
        False,
        True,
    ),
    ("thinking_truncated", "<think>still thinking <｜end▁of▁sen", True, True),
    ("tools_disabled", "a</think>b\n\n<｜DSML｜tool_calls>x</｜DSML｜tool_calls>", True, False),
]


def accumulate(deltas, thinking):
    content, reasoning, calls = [], [], {}
    for d in deltas:
        assert len(d) == 1
        if "content" in d:
            assert d["content"]
            content.append(d["content"])
        elif "reasoning_content" in d:
            assert d["reasoning_content"] and thinking
            reasoning.append(d["reasoning_content"])
        else:
            tc = d["tool_call"]
            if tc["index"] not in calls:
                assert tc["id"] and tc["name"] is not None  # first delta of a call names it
                assert tc["index"] == len(calls)
                calls[tc["index"]] = {
                    "id": tc["id"],
                    "type": "function",
                    "function": {"name": tc["name"], "arguments": ""},
                }
            else:
                assert tc["id"] is None and tc["name"] is None
            calls[tc["index"]]["function"]["arguments"] += tc["arguments"]
    return ("".join(content), "".join(reasoning) if thinking else None, [calls[i] for i in sorted(calls)])


def stream(chunks, thinking, tools):
    p = StreamingOutputParser(thinking, tools_enabled=tools, call_id_prefix="call_")
    out = []
    for c in chunks:
        out += p.feed(c)
    out += p.finish()
    return accumulate(out, thinking)


def whole(text, thinking, tools):
    r = parse_output(text, thinking, tools_enabled=tools, call_id_prefix="call_")
    return (r.content, r.reasoning_content, r.tool_calls)


def test_readme_example():
    r = parse_output("Simple arithmetic.</think>2 + 2 = 4." + EOS, thinking=True)
    assert (r.content, r.reasoning_content, r.tool_calls) == ("2 + 2 = 4.", "Simple arithmetic.", [])
    assert parse_output("Hi", thinking=False).reasoning_content is None


def test_tool_calls_parsed():
    r = parse_output(TOOL_OUTPUT, thinking=True, call_id_prefix="call_")
    assert r.reasoning_content == "The user wants weather; call the tool."
    assert r.content == 'Checking "now".'
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather", "get_time"]
    assert [c["id"] for c in r.tool_calls] == ["call_0", "call_1"]
    args = json.loads(r.tool_calls[0]["function"]["arguments"])
    assert args == {"city": 'São "Paulo"\n😀', "days": 3, "opts": {"units": ["c"], "x": None}}
    assert r.tool_calls[1]["function"]["arguments"] == "{}"
    assert r.to_message()["tool_calls"] == r.tool_calls
    # random ids by default, OpenAI style
    ids = [c["id"] for c in parse_output(TOOL_OUTPUT, thinking=True).tool_calls]
    assert all(i.startswith("call_") and len(i) == 29 for i in ids) and len(set(ids)) == 2


def test_lenient_cases():
    r = parse_output(SAMPLES[4][1], thinking=True, call_id_prefix="c")  # truncated mid-parameter
    assert r.reasoning_content == "r" and r.content == "x\n"
    assert r.tool_calls == []  # a call cut inside a value is dropped, never completed with a cut value
    r = parse_output(SAMPLES[5][1], thinking=False, call_id_prefix="c")  # malformed tags ignored
    assert r.content == "c1 after"  # whitespace ending the output after a block is dropped
    assert parse_output(SAMPLES[2][1], thinking=False).content == "Hello <b>world</b> 深度求索 \n\n still content "
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in r.tool_calls] == [
        ("g", '{"k": "v2"}'),
        ("h", "{}"),
        ("i", "{}"),
    ]  # "j": unfinished tag, dropped
    r = parse_output(SAMPLES[6][1], thinking=True)  # cut by max_tokens while thinking
    assert (r.content, r.reasoning_content) == ("", "still thinking <｜end▁of▁sen")
    r = parse_output(SAMPLES[7][1], thinking=True, tools_enabled=False)  # tools off: block dropped
    assert r.content == "b" and r.tool_calls == []


@pytest.mark.parametrize("name, text, thinking, tools", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_streaming_equals_whole_for_every_split(name, text, thinking, tools):
    expected = whole(text, thinking, tools)
    assert stream([text], thinking, tools) == expected
    assert stream(list(text), thinking, tools) == expected  # one character at a time
    for k in range(len(text) + 1):  # every single split point
        assert stream([text[:k], text[k:]], thinking, tools) == expected, k
    rng = random.Random(name)
    for _ in range(40):  # random multi-way splits
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(2, 12))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=False)]
        assert stream(chunks, thinking, tools) == expected, cuts


def test_every_pair_of_splits_on_tool_output():
    # exhaustive 3-way splits around the tool-call block (where markers and hold-back interact)
    text = TOOL_OUTPUT
    lo = text.index("</think>") - 3
    hi = text.index("</｜DSML｜parameter>") + 5
    expected = whole(text, True, True)
    for a in range(lo, hi):
        for b in range(a, hi, 3):
            assert stream([text[:a], text[a:b], text[b:]], True, True) == expected, (a, b)


def test_stream_deltas_are_prompt_and_merged():
    p = StreamingOutputParser(thinking=True, tools_enabled=True, call_id_prefix="call_")
    assert p.feed("abc</th") == [{"reasoning_content": "abc"}]
    assert p.feed("ink>Hi\n") == [{"content": "Hi"}]  # "\n" held: it may start the tool block
    assert p.feed('\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n') == []
    assert p.feed('<｜DSML｜parameter name="a" string="true">x') == []  # a call is sent once complete
    assert p.feed("y</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>") == [
        {"tool_call": {"index": 0, "id": "call_0", "name": "f", "arguments": '{"a": "xy"}'}}
    ]
    assert p.feed(EOS) == [] and p.finish() == [] and p.tool_call_count == 1
    assert p.feed("more") == []


def test_stream_from_real_token_ids():
    """Engine path: ids -> IncrementalDetokenizer -> StreamingOutputParser, token by token."""
    tok = load_tokenizer(None)
    ids = tok.encode(TOOL_OUTPUT)
    assert ids[-1] == tok.eos_token_id
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        chunks = [detok.add([i]) for i in ids] + [detok.flush()]
        assert stream(chunks, True, True) == whole(TOOL_OUTPUT, True, True)


def test_held_suffix_matches_brute_force():
    from parity.tokenizer.parse import _held_suffix

    markers = ("\n\n<｜DSML｜tool_calls>", "<｜DSML｜tool_calls>", "</think>")
    alphabet = "\n<｜DSML/tk>a"
    rng = random.Random(7)
    for _ in range(2000):
        buf = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        brute = max(
            (k for k in range(1, len(buf) + 1) for m in markers if len(m) > k and m.startswith(buf[-k:])), default=0
        )
        assert _held_suffix(buf, markers) == brute, buf
