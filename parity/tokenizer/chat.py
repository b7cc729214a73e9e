"""Chat encoding: OpenAI-style messages -> a DeepSeek-V4 prompt string.

The format is DeepSeek's, published with the weights: ``encoding/README.md`` ("DeepSeek-V4 Encoding")
and the reference implementation ``encoding/encoding_dsv4.py`` in the Hugging Face repos
``deepseek-ai/DeepSeek-V4-Flash`` and ``deepseek-ai/DeepSeek-V4-Pro``
(https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash/tree/main/encoding). This module is an
independent implementation of that format (no code copied). What it produces::

    <｜begin▁of▁sentence｜>[max-effort prefix]{system}[\\n\\n## Tools ...]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>      (history, either mode)
    <｜User｜>{user}<｜Assistant｜><think>                                     (thinking mode prompt)
    <｜User｜>{user}<｜Assistant｜></think>                                    (non-thinking prompt)

(line breaks above are for reading only; turns are concatenated.)

Rules (README "Message Format" and the reference ``render_message``/``encode_messages``):

* BOS once at the start; no separator between turns; EOS closes every assistant turn.
* Non-thinking ("chat") mode: ``</think>`` right after ``<｜Assistant｜>``; assistant turns carry no
  reasoning.
* Thinking mode: the last user turn is followed by ``<｜Assistant｜><think>``; an assistant turn after
  the last user turn renders ``{reasoning}</think>{content}``. Earlier assistant turns lose their
  reasoning (``drop_thinking``) and their user turn ends with ``<｜Assistant｜></think>`` - unless tools
  are given: then every turn keeps ``{reasoning}</think>`` and every user turn ends with ``<think>``.
* ``reasoning_effort="max"`` (thinking mode only) puts the fixed "Reasoning Effort: Absolute maximum"
  paragraph right after BOS, before the system prompt. Other values add nothing in V4's format.
* Tools: ``\\n\\n`` + the "## Tools" section (DSML usage + one JSON schema per line) is appended to the
  leading system message (one with empty content is inserted when there is none).
* Assistant tool calls: ``{content}\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="f">\\n
  <｜DSML｜parameter name="k" string="true">v</｜DSML｜parameter>\\n...</｜DSML｜invoke>\\n
  </｜DSML｜tool_calls>`` (string values raw with ``string="true"``, others as JSON, ``string="false"``).
* Tool results (role ``tool``) have no turn of their own: they become ``<tool_result>...</tool_result>``
  blocks of a user turn; consecutive user/tool messages merge into one user turn joined by ``\\n\\n``;
  results are ordered like the calls of the preceding assistant turn (matched by ``tool_call_id``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from parity.errors import RequestError
from parity.tokenizer import special
from parity.tokenizer.encoding import REASONING_EFFORT_MAX_PREFIX, ChatEncoding, default_encoding

#: Roles accepted by :func:`encode_chat`: OpenAI's, plus the reference encoder's ``developer`` (a user-like
#: turn, ``<｜User｜>{content}``) and ``latest_reminder`` (``<｜latest_reminder｜>{content}``, e.g. date and
#: locale, placed after the assistant opening of the turn it precedes).
ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")

#: Accepted ``reasoning_effort`` values of V4's published format. Only "max" changes V4's prompt;
#: "low"/"medium"/"high" are accepted for OpenAI-client compatibility and render like None (the
#: reference encoder accepts None/"high"/"max" and only "max" adds text). A checkpoint may bring its own
#: table (:mod:`parity.tokenizer.encoding`).
REASONING_EFFORTS = (None, "low", "medium", "high", "max")

#: The "## Tools" section, verbatim from DeepSeek-V4 ``encoding/README.md`` ("Tool Calling (DSML
#: Format)"); ``{tool_schemas}`` is one JSON object per line.
TOOLS_SECTION = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "{special.TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{special.TOOL_CALLS_OPEN}\n"
    f'{special.INVOKE_OPEN} name="$TOOL_NAME">\n'
    f'{special.PARAM_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    f"{special.PARAM_CLOSE}\n"
    "...\n"
    f"{special.INVOKE_CLOSE}\n"
    f'{special.INVOKE_OPEN} name="$TOOL_NAME2">\n'
    "...\n"
    f"{special.INVOKE_CLOSE}\n"
    f"{special.TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {special.THINK_START}), you MUST output your complete "
    f"reasoning inside {special.THINK_START}...{special.THINK_END} BEFORE any tool calls or final "
    "response.\n\n"
    f"Otherwise, output directly after {special.THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)


class ChatError(RequestError):
    """Invalid chat request (messages, tools, mode). ``str(e)`` starts with the offending field path
    (``messages[1].tool_calls[0].function.name: ...``); ``e.param`` is that path in OpenAI's dotted form
    (``messages.1.tool_calls.0.function.name``)."""

    def __init__(self, message: str):
        super().__init__(message)
        path = message.split(": ", 1)[0]
        self.param: str | None = re.sub(r"\[(\d+)\]", r".\1", path) if " " not in path else None


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------- validation
def _text(value: Any, where: str, joiner: str = "") -> str:
    """Content as text: None -> "", str, or a list of ``{"type": "text", "text": str}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise ChatError(f"{where}[{j}]: expected a content part object, got {type(part).__name__}")
            if part.get("type", "text") != "text":
                raise ChatError(
                    f"{where}[{j}].type: unsupported content part {part.get('type')!r}; "
                    "expected 'text' (DeepSeek-V4 is text-only)"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatError(f"{where}[{j}].text: expected a string, got {type(text).__name__}")
            parts.append(text)
        return joiner.join(parts)
    raise ChatError(f"{where}: expected a string, a list of text parts or null, got {type(value).__name__}")


def validate_tools(tools: Any) -> list[dict]:
    """Check an OpenAI ``tools`` list and return the function definitions to render.

    Args:
        tools: ``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``; a bare
            function object (with ``name``) is accepted too.
    Returns:
        list of function dicts (``name``, optional ``description``, optional ``parameters``).
    Raises:
        ChatError (a RequestError): naming ``tools[k]`` and the field (type, name, description, parameters).
    """
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatError(f"tools: expected a list of tool objects, got {type(tools).__name__}")
    out, seen = [], set()
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, Mapping):
            raise ChatError(f"{where}: expected an object, got {type(tool).__name__}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise ChatError(f"{where}.type: unsupported tool type {tool.get('type')!r}; expected 'function'")
            fn = tool.get("function")
            where += ".function"
            if not isinstance(fn, Mapping):
                raise ChatError(f"{where}: expected an object with 'name', got {type(fn).__name__}")
        else:
            fn = tool
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ChatError(f"{where}.name: expected a non-empty string, got {name!r}")
        if '"' in name or "<" in name or ">" in name:
            raise ChatError(
                f"{where}.name: {name!r} contains '\"', '<' or '>'; expected a plain "
                "identifier (it is written inside a DSML tag)"
            )
        if name in seen:
            raise ChatError(f"{where}.name: duplicate tool name {name!r}; expected unique names")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ChatError(f"{where}.description: expected a string, got {type(desc).__name__}")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"{where}.parameters")
        out.append(dict(fn))
    return out


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, Mapping):
        raise ChatError(f"{where}: expected a JSON Schema object, got {type(schema).__name__}")
    if "type" in schema and schema["type"] != "object":
        raise ChatError(f"{where}.type: expected 'object' (function parameters are an object), got {schema['type']!r}")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, Mapping):
            raise ChatError(
                f"{where}.properties: expected an object mapping names to schemas, got {type(props).__name__}"
            )
        for pname, psch in props.items():
            if not isinstance(psch, Mapping):
                raise ChatError(f"{where}.properties.{pname}: expected a JSON Schema object, got {type(psch).__name__}")
    req = schema.get("required")
    if req is not None:
        if not isinstance(req, Sequence) or isinstance(req, str) or not all(isinstance(r, str) for r in req):
            raise ChatError(f"{where}.required: expected a list of property names, got {req!r}")
        if isinstance(props, Mapping):
            missing = [r for r in req if r not in props]
            if missing:
                raise ChatError(f"{where}.required: {missing} not in {where}.properties")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ChatError(f"{where}: not JSON-serialisable ({e})") from None


def _tool_calls(value: Any, where: str) -> list[tuple[str, str, dict]]:
    """Validate an assistant's ``tool_calls``; return ``(id, name, arguments dict)`` per call."""
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ChatError(f"{where}: expected a list of tool calls, got {type(value).__name__}")
    out = []
    for j, tc in enumerate(value):
        w = f"{where}[{j}]"
        if not isinstance(tc, Mapping):
            raise ChatError(f"{w}: expected an object, got {type(tc).__name__}")
        if tc.get("type", "function") != "function":
            raise ChatError(f"{w}.type: unsupported tool call type {tc.get('type')!r}; expected 'function'")
        fn = tc.get("function", tc if "name" in tc else None)
        if not isinstance(fn, Mapping):
            raise ChatError(f"{w}.function: expected an object with 'name' and 'arguments'")
        fw = f"{w}.function" if "function" in tc else w
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ChatError(f"{fw}.name: expected a non-empty string, got {name!r}")
        if '"' in name or "<" in name or ">" in name:
            raise ChatError(f"{fw}.name: {name!r} contains '\"', '<' or '>'; expected a plain identifier")
        args = fn.get("arguments")
        if args is None or (isinstance(args, str) and not args.strip()):
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise ChatError(f"{fw}.arguments: not valid JSON ({e}); expected a JSON object string") from None
        if not isinstance(args, Mapping):
            raise ChatError(f"{fw}.arguments: expected a JSON object, got {type(args).__name__}")
        for key in args:
            if not isinstance(key, str) or '"' in key:
                raise ChatError(f"{fw}.arguments: key {key!r} is not a plain string")
        call_id = tc.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ChatError(f"{w}.id: expected a string, got {type(call_id).__name__}")
        out.append((call_id or "", name, dict(args)))
    return out


def _check_tool_answer(where: str, tool_call_id: str | None, answering: tuple[int, list[str]] | None) -> None:
    """OpenAI's rule for a ``tool`` message at ``where``: it answers the assistant message with
    ``tool_calls`` right before it (only other tool messages in between), and its ``tool_call_id``, when
    given, is the id of one of those calls (not checked when the calls carry no ids).

    Raises:
        ChatError: ``messages[i].role`` when no such assistant message precedes it;
            ``messages[i].tool_call_id`` when the id matches none of its calls.
    """
    if answering is None:
        raise ChatError(
            f"{where}.role: a 'tool' message must answer a preceding assistant message with "
            "'tool_calls' (directly after it or after other tool messages)"
        )
    k, ids = answering
    known = [cid for cid in ids if cid]
    if tool_call_id and known and tool_call_id not in known:
        raise ChatError(
            f"{where}.tool_call_id: {tool_call_id!r} matches no tool call of messages[{k}]; expected one of {known}"
        )


# ---------------------------------------------------------------------------- rendering
def render_tools(functions: list[dict]) -> str:
    """The "## Tools" section for validated function definitions (one JSON schema per line)."""
    return TOOLS_SECTION.replace("{tool_schemas}", "\n".join(_to_json(f) for f in functions))


def render_tool_calls(calls: list[tuple[str, str, dict]]) -> str:
    """The DSML block of an assistant turn (without the leading ``\\n\\n``)."""
    invokes = []
    for _id, name, args in calls:
        params = "\n".join(
            f'{special.PARAM_OPEN} name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _to_json(v)}{special.PARAM_CLOSE}"
            for k, v in args.items()
        )
        invokes.append(f'{special.INVOKE_OPEN} name="{name}">\n{params}\n{special.INVOKE_CLOSE}')
    return f"{special.TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{special.TOOL_CALLS_CLOSE}"


def encode_chat(
    messages: list[dict],
    tools: list[dict] | None = None,
    thinking: bool = False,
    reasoning_effort: str | None = None,
    add_generation_prompt: bool = True,
    *,
    drop_thinking: bool | None = None,
    continue_final_message: bool = False,
    encoding: ChatEncoding | None = None,
) -> str:
    """Encode a conversation into DeepSeek-V4's prompt string (see the module docstring).

    Args:
        messages: OpenAI chat messages: ``{"role": "system"|"user"|"assistant"|"tool", "content": str |
            [text parts] | None}``; assistant messages may carry ``reasoning_content`` (str) and
            ``tool_calls`` (``[{"id"?, "type": "function", "function": {"name", "arguments": JSON str
            or dict}}]``); tool messages follow an assistant message with ``tool_calls`` (or another tool
            message) and may carry ``tool_call_id``, one of its call ids. Unknown extra keys are ignored.
        tools: OpenAI tool definitions (rendered into the leading system message).
        thinking: thinking mode (the prompt ends with ``<think>``) or not (ends with ``</think>``).
        reasoning_effort: one of :data:`REASONING_EFFORTS`; "max" adds the max-effort prefix in
            thinking mode.
        add_generation_prompt: end the prompt with the assistant transition ``<｜Assistant｜>`` +
            ``<think>``/``</think>``: after a last user/tool/developer/system turn, and after a complete
            last assistant turn (a fresh turn opens after its EOS). False: the conversation as it is.
        drop_thinking: drop reasoning of assistant turns before the last user turn (None: the
            encoding's default, True in the published format; ignored - nothing dropped - with tools).
        continue_final_message: the last message is an assistant answer to continue (prefill): it is
            rendered without EOS (thinking mode with reasoning and no content: without ``</think>``,
            so the reasoning continues). Exclusive with ``add_generation_prompt``.
        encoding: the checkpoint's format variant (reasoning-effort tiers, drop_thinking default);
            None: DeepSeek-V4's published one.
    Returns:
        the prompt string, BOS first; tokenize it with ``tok.encode(prompt)``.
    Raises:
        ChatError (a RequestError): naming ``messages[i].<field>`` or ``tools[k].<field>`` (unknown role, bad content,
            tool call without name, arguments not a JSON object, malformed tool schema...), or
            ``reasoning_effort`` / ``thinking`` when invalid; a ``tool`` message that does not answer a
            preceding assistant message with ``tool_calls`` (``messages[i].role``) or whose
            ``tool_call_id`` is none of that message's call ids (``messages[i].tool_call_id``), as OpenAI.
    """
    if not isinstance(thinking, bool):
        raise ChatError(f"thinking: expected true or false, got {thinking!r}")
    encoding = encoding or default_encoding()
    if reasoning_effort is not None and reasoning_effort not in encoding.reasoning_efforts:
        raise ChatError(
            f"reasoning_effort: {reasoning_effort!r} is not supported by this model; expected one "
            f"of {sorted(encoding.reasoning_efforts)} or null"
        )
    effort_prefix = encoding.reasoning_efforts.get(reasoning_effort, "") if reasoning_effort else ""
    if drop_thinking is None:
        drop_thinking = encoding.drop_thinking
    if continue_final_message and add_generation_prompt:
        raise ChatError(
            "continue_final_message: cannot be combined with add_generation_prompt (the first "
            "continues the last assistant message, the second opens a new one); set one to false"
        )
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatError("messages: expected a non-empty list of message objects")
    functions = validate_tools(tools)

    # 1. validate + normalise; merge user/tool runs into user turns of blocks
    turns: list[dict] = []
    # the assistant message tool results may answer now: (its index, its call ids), or None when the
    # previous message is neither an assistant message with tool_calls nor a tool result (OpenAI's rule)
    answering: tuple[int, list[str]] | None = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatError(f"{where}: expected a message object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}.role: unknown role {role!r}; expected one of {list(ROLES)}")
        if role != "tool":
            answering = None
        if role == "tool":
            tcid = msg.get("tool_call_id")
            if tcid is not None and not isinstance(tcid, str):
                raise ChatError(f"{where}.tool_call_id: expected a string, got {type(tcid).__name__}")
            _check_tool_answer(where, tcid, answering)
            block = ("tool", _text(msg.get("content"), f"{where}.content", "\n\n"), tcid or "")
        elif role == "user":
            block = ("text", _text(msg.get("content"), f"{where}.content"), "")
        if role in ("developer", "latest_reminder"):
            turns.append({"role": role, "content": _text(msg.get("content"), f"{where}.content")})
            continue
        if role in ("tool", "user"):
            if turns and turns[-1]["role"] == "user":
                turns[-1]["blocks"].append(block)
            else:
                turns.append({"role": "user", "blocks": [block]})
            continue
        content = _text(msg.get("content"), f"{where}.content")
        if role == "system":
            turns.append({"role": "system", "content": content, "tools": None})
            continue
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatError(f"{where}.reasoning_content: expected a string or null, got {type(reasoning).__name__}")
        calls = _tool_calls(msg.get("tool_calls"), f"{where}.tool_calls")
        turns.append({"role": "assistant", "content": content, "reasoning": reasoning or "", "calls": calls})
        if calls:
            answering = (i, [cid for cid, _, _ in calls])

    # 2. tool results in the order of the preceding assistant's calls (stable; unknown ids rank 0)
    order: dict[str, int] = {}
    for t in turns:
        if t["role"] == "assistant" and t["calls"]:
            order = {cid: n for n, (cid, _, _) in enumerate(t["calls"]) if cid}
        elif t["role"] == "user" and order:
            tool_blocks = sorted((b for b in t["blocks"] if b[0] == "tool"), key=lambda b: order.get(b[2], 0))
            if len(tool_blocks) > 1:
                it = iter(tool_blocks)
                t["blocks"] = [next(it) if b[0] == "tool" else b for b in t["blocks"]]

    # 3. tools go on the leading system message
    if functions:
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": "", "tools": None})
        turns[0]["tools"] = functions

    keep_all_reasoning = not drop_thinking or bool(functions)
    last_user = max((n for n, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)
    last = len(turns) - 1
    if continue_final_message:
        if turns[last]["role"] != "assistant":
            raise ChatError(
                f"messages[{len(messages) - 1}].role: continue_final_message needs an assistant "
                f"message last, got {messages[-1].get('role')!r}"
            )
        if turns[last]["calls"]:
            raise ChatError(
                f"messages[{len(messages) - 1}].tool_calls: an assistant message to continue cannot carry tool calls"
            )

    def transition(n: int) -> list[str]:
        opens = thinking and (keep_all_reasoning or n >= last_user)
        return [special.ASSISTANT, special.THINK_START if opens else special.THINK_END]

    # 4. render
    out = [special.BOS]
    if thinking and effort_prefix:
        out.append(effort_prefix)
    for n, t in enumerate(turns):
        role = t["role"]
        if role == "system":
            out.append(t["content"])
            if t["tools"]:
                out.append("\n\n" + render_tools(t["tools"]))
        elif role == "user":
            out.append(special.USER)
            out.append(
                "\n\n".join(
                    text if kind == "text" else special.TOOL_RESULT_OPEN + text + special.TOOL_RESULT_CLOSE
                    for kind, text, _ in t["blocks"]
                )
            )
        elif role == "developer":
            out.append(special.USER + t["content"])
        elif role == "latest_reminder":
            out.append(special.LATEST_REMINDER + t["content"])
        else:
            partial = continue_final_message and n == last
            if thinking and (keep_all_reasoning or n > last_user):
                continues_reasoning = partial and not t["content"]
                out.append(t["reasoning"] + ("" if continues_reasoning else special.THINK_END))
            out.append(t["content"])
            if t["calls"]:
                out.append("\n\n" + render_tool_calls(t["calls"]))
            if not partial:
                out.append(special.EOS)
            if n == last and add_generation_prompt:
                out += transition(n)
            continue
        # a non-assistant turn hands over to the assistant when one follows (or it is last): the
        # reference encoder does this after user/developer turns only, parity after system turns too
        nxt = turns[n + 1]["role"] if n < last else None
        if role != "latest_reminder" and (
            nxt in ("assistant", "latest_reminder") or (nxt is None and add_generation_prompt)
        ):
            out += transition(n)
    return "".join(out)


__all__ = [
    "ChatError",
    "encode_chat",
    "validate_tools",
    "render_tools",
    "render_tool_calls",
    "ROLES",
    "REASONING_EFFORTS",
    "REASONING_EFFORT_MAX_PREFIX",
    "TOOLS_SECTION",
]
