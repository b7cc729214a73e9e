"""Chat encoding golden tests: DeepSeek-V4's published prompt format.

Source of every expected string: DeepSeek-V4 ``encoding/README.md`` ("DeepSeek-V4 Encoding": Quick Start,
Basic Chat, Interleaved Thinking Mode, Tool Calling (DSML Format), Reasoning Effort) and the reference
``encoding/encoding_dsv4.py`` (``encode_messages``: tools on the leading system message, tool results merged
into user turns and ordered by call order, drop_thinking disabled when tools are present), both in
https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash/tree/main/encoding.
"""

from __future__ import annotations

import json

import pytest

from parity.errors import RequestError
from parity.tokenizer import encode_chat, load_tokenizer, parse_output

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

# README, "Tool Calling (DSML Format)": the block injected after the system prompt (verbatim).
README_TOOLS_HEAD = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""
README_TOOLS_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

# README, "Reasoning Effort" (verbatim).
MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def tools_section(*tools):
    return (
        README_TOOLS_HEAD + "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools) + README_TOOLS_TAIL
    )


def test_readme_quick_start_thinking():
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}]
    assert encode_chat(msgs, thinking=True) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>"
    )


def test_basic_chat_multi_turn_non_thinking():
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "ignored in chat mode"},
        {"role": "user", "content": "2+2?"},
    ]
    assert encode_chat(msgs) == f"{BOS}SYS{U}Hi{A}</think>Hello!{EOS}{U}2+2?{A}</think>"


def test_thinking_multi_turn_drops_earlier_reasoning():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    assert encode_chat(msgs, thinking=True) == f"{BOS}{U}q1{A}</think>a1{EOS}{U}q2{A}<think>"
    # drop_thinking=False keeps every turn's reasoning
    assert encode_chat(msgs, thinking=True, drop_thinking=False) == (
        f"{BOS}{U}q1{A}<think>r1</think>a1{EOS}{U}q2{A}<think>"
    )


def test_thinking_final_assistant_turn_keeps_reasoning():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert encode_chat(msgs, thinking=True, add_generation_prompt=False) == f"{BOS}{U}q{A}<think>r</think>a{EOS}"
    assert encode_chat(msgs, thinking=False, add_generation_prompt=False) == f"{BOS}{U}q{A}</think>a{EOS}"


def test_reasoning_effort():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_chat(msgs, thinking=True, reasoning_effort="max") == f"{BOS}{MAX_PREFIX}S{U}q{A}<think>"
    # only "max" changes V4's prompt, and only in thinking mode
    base = encode_chat(msgs, thinking=True)
    for effort in ("high", "medium", "low", None):
        assert encode_chat(msgs, thinking=True, reasoning_effort=effort) == base
    assert encode_chat(msgs, thinking=False, reasoning_effort="max") == encode_chat(msgs)


def test_add_generation_prompt_false():
    msgs = [{"role": "user", "content": "q"}]
    assert encode_chat(msgs, add_generation_prompt=False) == f"{BOS}{U}q"


def test_tools_on_system_message():
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "weather?"}]
    got = encode_chat(msgs, tools=[WEATHER, TIME], thinking=True)
    assert got == f"{BOS}SYS\n\n{tools_section(WEATHER, TIME)}{U}weather?{A}<think>"
    # no system message: one with empty content is put first
    got = encode_chat(msgs[1:], tools=[WEATHER])
    assert got == f"{BOS}\n\n{tools_section(WEATHER)}{U}weather?{A}</think>"


def test_tool_call_and_result_thinking_keeps_reasoning():
    msgs = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Need two tools.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        # results out of order: encoding orders them by the calls (c1, then c2)
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "Sunny, noon.", "reasoning_content": "Got both."},
        {"role": "user", "content": "Thanks"},
    ]
    dsml = (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="get_time">\n'
        "\n"
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls>"
    )
    expected = (
        f"{BOS}SYS\n\n{tools_section(WEATHER, TIME)}"
        f"{U}Weather in Paris and the time?{A}<think>Need two tools.</think>Let me check.{dsml}{EOS}"
        f'{U}<tool_result>{{"sky": "sunny"}}</tool_result>\n\n<tool_result>12:00</tool_result>'
        f"{A}<think>Got both.</think>Sunny, noon.{EOS}"
        f"{U}Thanks{A}<think>"
    )
    assert encode_chat(msgs, tools=[WEATHER, TIME], thinking=True) == expected


def test_tool_call_round_trip():
    """Encode an assistant tool call, parse the model-side text back, re-encode: identical prompt."""
    args = {
        "city": "São Paulo",
        "days": 3,
        "units": ["c", "f"],
        "opts": {"x": None, "y": True},
        "note": 'He said "hi"\nbye',
    }
    msgs = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "call it",
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    ]
    prompt = encode_chat(msgs, tools=[WEATHER], thinking=True)
    # the assistant turn as the model would have generated it (after the prompt's "<think>")
    start = prompt.index(f"{U}weather?{A}<think>") + len(f"{U}weather?{A}<think>")
    generated = prompt[start : prompt.index(EOS, start) + len(EOS)]
    parsed = parse_output(generated, thinking=True, call_id_prefix="call_")
    assert parsed.reasoning_content == "call it" and parsed.content == ""
    (call,) = parsed.tool_calls
    assert call["function"]["name"] == "get_weather" and call["id"] == "call_0"
    assert json.loads(call["function"]["arguments"]) == args
    again = encode_chat([msgs[0], parsed.to_message(), msgs[2]], tools=[WEATHER], thinking=True)
    assert again == prompt


def test_consecutive_user_messages_and_text_parts():
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]
    assert encode_chat(msgs) == f"{BOS}{U}ab\n\nc{A}</think>"


def test_tokenized_prompt_uses_single_special_ids():
    tok = load_tokenizer(None)
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], thinking=True)
    assert ids[0] == tok.bos_token_id and ids[1] == tok.user_token_id
    assert ids[-2:] == [tok.assistant_token_id, tok.think_start_id]
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}{U}你好{A}<think>"


@pytest.mark.parametrize(
    "messages, kwargs, match",
    [
        ([], {}, r"messages: expected a non-empty list"),
        (["hi"], {}, r"messages\[0\]: expected a message object"),
        (
            [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}],
            {},
            r"messages\[1\]\.role: unknown role 'robot'",
        ),
        ([{"content": "q"}], {}, r"messages\[0\]\.role: unknown role None"),
        ([{"role": "user", "content": 5}], {}, r"messages\[0\]\.content: expected a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            {},
            r"messages\[0\]\.content\[0\]\.type: unsupported content part 'image_url'",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
            ],
            {},
            r"messages\[1\]\.tool_calls\[0\]\.function\.name: expected a non-empty string",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ],
            {},
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            ],
            {},
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: expected a JSON object",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "f()"}],
            {},
            r"messages\[1\]\.tool_calls: expected a list",
        ),
        ([{"role": "assistant", "content": "a", "reasoning_content": 3}], {}, r"messages\[0\]\.reasoning_content"),
        ([{"role": "tool", "content": "r", "tool_call_id": 7}], {}, r"messages\[0\]\.tool_call_id"),
        (
            [{"role": "user", "content": "q"}],
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            r"tools\[0\]\.function\.name: expected a non-empty string",
        ),
        (
            [{"role": "user", "content": "q"}],
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            r"tools\[0\]\.function\.parameters: expected a JSON Schema object",
        ),
        (
            [{"role": "user", "content": "q"}],
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            r"tools\[0\]\.function\.parameters\.type: expected 'object'",
        ),
        (
            [{"role": "user", "content": "q"}],
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {}}, "required": ["b"]},
                        },
                    }
                ]
            },
            r"tools\[0\]\.function\.parameters\.required: \['b'\] not in",
        ),
        (
            [{"role": "user", "content": "q"}],
            {"tools": [{"type": "retrieval"}]},
            r"tools\[0\]\.type: unsupported tool type",
        ),
        ([{"role": "user", "content": "q"}], {"tools": [WEATHER, WEATHER]}, r"tools\[1\]\.function\.name: duplicate"),
        ([{"role": "user", "content": "q"}], {"tools": "get_weather"}, r"tools: expected a list"),
        (
            [{"role": "user", "content": "q"}],
            {"reasoning_effort": "extreme"},
            r"reasoning_effort: 'extreme' is not supported",
        ),
        ([{"role": "user", "content": "q"}], {"thinking": "yes"}, r"thinking: expected true or false"),
    ],
)
def test_bad_input_names_the_field(messages, kwargs, match):
    with pytest.raises(RequestError, match=match):
        encode_chat(messages, **kwargs)


def test_error_param_is_openai_dotted_path():
    from parity.tokenizer import ChatError

    bad = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
    ]
    with pytest.raises(ChatError) as e:
        encode_chat(bad)
    assert e.value.param == "messages.1.tool_calls.0.function.name"
    assert isinstance(e.value, RequestError)


_CALLS = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ],
}


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "tool", "tool_call_id": "c1", "content": "r"}], "messages.0.role"),  # first message
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "messages.1.role"),  # after a user turn
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},  # assistant without tool_calls
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
            "messages.2.role",
        ),
        (
            [
                {"role": "user", "content": "q"},
                _CALLS,
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "user", "content": "more"},
                {"role": "tool", "tool_call_id": "c2", "content": "r"},
            ],
            "messages.4.role",
        ),
        (
            [{"role": "user", "content": "q"}, _CALLS, {"role": "tool", "tool_call_id": "c9", "content": "r"}],
            "messages.2.tool_call_id",
        ),  # an id no call has
        (
            [
                {"role": "user", "content": "q"},
                _CALLS,
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"id": "d1", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
            ],
            "messages.4.tool_call_id",
        ),  # an older call's id
    ],
)
def test_tool_message_must_answer_a_preceding_tool_call(messages, param):
    """OpenAI answers 400 to a tool message that answers no assistant tool call; so does encode_chat."""
    from parity.tokenizer import ChatError

    with pytest.raises(ChatError) as e:
        encode_chat(messages)
    assert e.value.param == param and str(e.value).startswith(param.replace(".", "[", 1).replace(".", "].", 1))


def test_tool_messages_answering_the_calls_are_accepted():
    ok = [
        {"role": "user", "content": "q"},
        _CALLS,
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
    ]
    assert encode_chat(ok).count("<tool_result>") == 2
    # without ids (ours are optional) nothing can be matched: accepted
    no_ids = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "anything", "content": "r"},
        {"role": "tool", "content": "r"},
    ]
    assert encode_chat(no_ids).count("<tool_result>") == 2
