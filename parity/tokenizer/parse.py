"""Parse DeepSeek-V4 generated text into ``content``, ``reasoning_content`` and ``tool_calls``.

Format (DeepSeek-V4 ``encoding/README.md`` and ``encoding/encoding_dsv4.py``,
``parse_message_from_completion_text``, in https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash):

* thinking mode: the prompt ends with ``<think>``; the output is ``{reasoning}</think>{content}``;
  non-thinking ("chat") mode: the prompt ends with ``</think>`` and the output is ``{content}``;
* tool calls follow the content as one DSML block, then EOS::

      {content}\\n\\n<｜DSML｜tool_calls>
      <｜DSML｜invoke name="get_weather">
      <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
      <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜tool_calls><｜end▁of▁sentence｜>

  ``string="true"`` marks a raw string value, ``string="false"`` a JSON value; the OpenAI
  ``arguments`` string is rebuilt as ``{"city": "Paris", "days": 3}`` (keys in order, ``", "`` and
  ``": "`` separators, as the reference decoder does).

One streaming state machine (:class:`StreamingOutputParser`) implements the grammar; :func:`parse_output`
feeds it the whole text, so streamed and whole results agree for every split of the text. Where the
model breaks the grammar the parser recovers (docs/chat.md lists each choice):

1. the text is cut at the first EOS (``<｜end▁of▁sentence｜>``) - an EOS ends the output like a ``stop``;
2. thinking mode: one leading ``<think>`` is skipped; reasoning runs to the first ``</think>``, or to a
   tool-call block opened before it (the block is parsed, a later stray ``</think>`` dropped); output that
   ends with ``stop`` while still in reasoning is the answer (``content``), one cut by ``length`` stays
   reasoning;
3. content runs to ``<｜DSML｜tool_calls>``; two newlines right before it belong to the markup;
4. inside a block, text between tags is ignored, a tag whose attributes do not parse is ignored;
   ``<｜DSML｜invoke name="..">`` opens a call, ended by ``</｜DSML｜invoke>``, a new invoke or the block's
   end; a call still open when the output ends is dropped when it was cut inside a tag or value or by
   ``length``; ``</｜DSML｜tool_calls>`` returns to content;
5. ``content`` and ``reasoning_content`` never carry markup: DSML tags, think tags and control tokens
   (``<｜...｜>``) the model writes anywhere else are dropped, and so is whitespace that ends the output
   after a tool-call block; without tools (``tools_enabled`` False) tool-call blocks are parsed and dropped;
6. argument values: ``string="false"`` values that are not JSON become JSON strings; a call whose only
   parameter is ``arguments`` or ``input`` holding a JSON object (and whose tool does not declare that
   parameter) gets that object as its arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from parity.tokenizer import special

_INVOKE_ATTRS = re.compile(r'\s+name="([^"]*)"\s*')
_PARAM_ATTRS = re.compile(r'\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*')
#: Tags that can end each state inside a DSML tool-call block.
_TOOL_MARKERS = {
    "block": (special.INVOKE_OPEN, special.TOOL_CALLS_CLOSE),
    "invoke": (special.PARAM_OPEN, special.INVOKE_CLOSE, special.INVOKE_OPEN, special.TOOL_CALLS_CLOSE),
}
_REASONING_MARKERS = (special.THINK_END, special.TOOL_CALLS_OPEN)
_REASONING_HELD = (special.THINK_END, special.TOOL_CALLS_START, special.TOOL_CALLS_OPEN)

#: Markup that never reaches content or reasoning: think tags, ``<|EOT|>``, control tokens written
#: ``<｜name｜>`` (the added tokens of V4's tokenizer.json: BOS/EOS, ``<｜User｜>``, ``<｜Assistant｜>``,
#: ``<｜latest_reminder｜>``, placeholders...), any DSML tag and the bare ``｜DSML｜`` token.
_MARKUP = re.compile(r"</?think>|<\|EOT\|>|<｜[^｜<>\n]{1,64}｜>|</?｜DSML｜[^<>\n]{0,512}>|｜DSML｜")
#: Every prefix of a :data:`_MARKUP` match (and a few more) fully matches one of these.
_MARKUP_PREFIX = re.compile(
    r"</?t?h?i?n?k?|<\|E?O?T?\|?|<(?:｜[^｜<>\n]{0,64}｜?)?"
    r"|</?(?:｜(?:D(?:S(?:M(?:L(?:｜[^<>\n]{0,512})?)?)?)?)?)?|｜(?:D(?:S(?:M(?:L)?)?)?)?"
)
_MARKUP_START = re.compile("[<｜]")
#: Parameters a model wraps all arguments in (vLLM's DeepSeek tool parsers unwrap them too).
_WRAPPER_PARAMS = ("arguments", "input")


def _new_call_id(prefix: str | None, index: int) -> str:
    return f"{prefix}{index}" if prefix is not None else f"call_{uuid.uuid4().hex[:24]}"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_value(raw: str) -> object:
    """``raw`` parsed as strict JSON (NaN/Infinity refused); raises ValueError when it is not JSON."""
    return json.loads(raw, parse_constant=_reject_constant)


def tool_arguments(params: list[tuple[str, bool, str]], declared: Collection[str] | None = None) -> str:
    """The OpenAI ``arguments`` JSON text of one call's DSML parameters.

    Args:
        params: ``(name, string attribute true, raw value)`` in output order.
        declared: the tool's declared parameter names (None: unknown tool); a lone ``arguments``/``input``
            parameter holding a JSON object is unwrapped unless the tool declares it.
    Returns:
        always valid JSON: ``{"k": v, ...}`` with ``", "``/``": "`` separators (the reference decoder's);
        a ``string="false"`` value that is not JSON becomes a JSON string.
    """
    if len(params) == 1 and params[0][0] in _WRAPPER_PARAMS and params[0][0] not in (declared or ()):
        try:
            inner = _json_value(params[0][2])
        except ValueError:
            inner = None
        if isinstance(inner, dict):
            return json.dumps(inner, ensure_ascii=False)
    parts = []
    for name, is_str, raw in params:
        value = None
        if not is_str:
            try:
                _json_value(raw)
                value = raw.strip()
            except ValueError:
                value = None
        if value is None:
            value = json.dumps(raw, ensure_ascii=False)
        parts.append(json.dumps(name, ensure_ascii=False) + ": " + value)
    return "{" + ", ".join(parts) + "}"


class _MarkupFilter:
    """Drops :data:`_MARKUP` from one text channel, incrementally; the output does not depend on how the
    input is split (a possible start of markup is held until the next text decides it)."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> str:
        buf = self._buf + text
        out, i, n = [], 0, len(buf)
        while i < n:
            m = _MARKUP_START.search(buf, i)
            if m is None:
                out.append(buf[i:])
                i = n
                break
            j = m.start()
            out.append(buf[i:j])
            hit = _MARKUP.match(buf, j)
            if hit is not None:
                i = hit.end()
                continue
            if _MARKUP_PREFIX.fullmatch(buf, j):
                if not final:
                    i = j
                    break
                if special.DSML in buf[j:]:  # a DSML tag cut by the end of the output
                    i = n
                    break
            out.append(buf[j])
            i = j + 1
        self._buf = buf[i:]
        return "".join(out)


@dataclass
class ParsedOutput:
    """One assistant turn, parsed.

    Attributes:
        content: the answer text ("" when the turn is only tool calls).
        reasoning_content: the reasoning text in thinking mode (possibly ""), None otherwise.
        tool_calls: OpenAI-format calls ``{"id", "type": "function", "function": {"name",
            "arguments": JSON str}}``, in output order.
    """

    content: str
    reasoning_content: str | None
    tool_calls: list[dict] = field(default_factory=list)

    def to_message(self) -> dict:
        """The turn as an OpenAI chat message (``role`` "assistant"); feed it back to encode_chat."""
        msg: dict = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def parse_output(
    text: str,
    thinking: bool,
    tools_enabled: bool = True,
    call_id_prefix: str | None = None,
    finish_reason: str | None = None,
    tool_params: Mapping[str, Collection[str]] | None = None,
) -> ParsedOutput:
    """Parse a whole generated text (see the module docstring for the grammar and the recoveries).

    Args:
        text: the decoded output (special tokens skipped or not; an EOS in it ends it).
        thinking: the output starts inside the reasoning block (the prompt ends with ``<think>``).
        tools_enabled: report DSML tool calls; when False blocks are parsed and dropped.
        call_id_prefix: tool-call ids become ``f"{prefix}{index}"``; None draws random ``call_<24 hex>``.
        finish_reason: why generation ended ("stop", "length", ...; None: unknown, like "length");
            decides unterminated reasoning and calls (module docstring, rules 2 and 4).
        tool_params: declared parameter names per tool name (for the wrapper unwrapping of rule 6).
    Returns:
        :class:`ParsedOutput`; when the unterminated reasoning became the answer, ``reasoning_content``
        is "". Never raises on malformed model output.
    Raises:
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    p = StreamingOutputParser(thinking, tools_enabled, call_id_prefix, tool_params=tool_params)
    items = p.feed(text) + p.finish(finish_reason)
    content = "".join(d.get("content", "") for d in items)
    reasoning = "".join(d.get("reasoning_content", "") for d in items) if thinking else None
    if p.answer_recovered:
        reasoning = ""
    calls = [
        {
            "id": d["tool_call"]["id"],
            "type": "function",
            "function": {"name": d["tool_call"]["name"], "arguments": d["tool_call"]["arguments"]},
        }
        for d in items
        if "tool_call" in d
    ]
    return ParsedOutput(content, reasoning, calls)


class StreamingOutputParser:
    """The output grammar as a state machine over text deltas; feed deltas, get typed deltas back.

    Deltas (dicts, in output order; consecutive ones of one kind from one call are merged):

    * ``{"reasoning_content": str}`` (thinking mode only)
    * ``{"content": str}``
    * ``{"tool_call": {"index": int, "id": str, "name": str, "arguments": str}}`` - one delta per call,
      sent once the call is complete (its arguments are then known to be whole, valid JSON).

    Text that might be the start of a marker (``</think>``, ``\\n\\n<｜DSML｜tool_calls>``, EOS, a control
    token...) is held back until the next delta decides it, so the latency cost is at most one marker.

    Args:
        thinking: the output starts inside the reasoning block (the prompt ends with ``<think>``).
        tools_enabled: report tool calls (False: blocks are parsed and dropped).
        call_id_prefix: as for :func:`parse_output`.
        tool_params: declared parameter names per tool name (argument unwrapping, see tool_arguments).
    Attributes:
        answer_recovered: True once the output ended with ``stop`` inside the reasoning block and its
            text was sent again as ``content``.
        tool_call_count: calls sent so far.
    """

    def __init__(
        self,
        thinking: bool,
        tools_enabled: bool = True,
        call_id_prefix: str | None = None,
        tool_params: Mapping[str, Collection[str]] | None = None,
    ):
        self.thinking = thinking
        self.tools_enabled = tools_enabled
        self.call_id_prefix = call_id_prefix
        self.tool_params = tool_params
        self._raw = ""  # pre-filter buffer (EOS detection)
        self._buf = ""  # state-machine buffer
        self._state = "start" if thinking else "body"
        self._tag_return = "block"  # state to return to when a tag fails to parse
        self._done = False
        self._out: list[dict] = []
        self._filters = {"content": _MarkupFilter(), "reasoning_content": _MarkupFilter()}
        self._reasoning: list[str] = []
        self._after_block = False  # a tool-call block was seen: trailing whitespace of content is held
        self._held_space = ""
        self._call: dict | None = None  # {"name", "params": [(name, is_str, value)]}
        self._param: tuple[str, bool] | None = None
        self._value: list[str] = []
        self.answer_recovered = False
        self.tool_call_count = 0

    # ------------------------------------------------------------------ public
    def feed(self, delta_text: str) -> list[dict]:
        """Consume the next piece of generated text; return the deltas it completes."""
        if self._done or not delta_text:
            return []
        raw = self._raw + delta_text
        cut = raw.find(special.EOS)
        if cut >= 0:
            self._raw = ""
            self._buf += raw[:cut]
            self._end("stop")
        else:
            keep = _held_suffix(raw, (special.EOS,))
            self._raw = raw[len(raw) - keep :] if keep else ""
            self._buf += raw[: len(raw) - keep]
            self._run(final=False)
        return self._take()

    def finish(self, finish_reason: str | None = None) -> list[dict]:
        """End of output: flush held-back text and settle an unfinished reasoning block or call.

        Args:
            finish_reason: "stop" (EOS, stop string/token), "length", "abort"... or None (unknown,
                treated as a cut).
        """
        if self._done:
            return self._take()
        self._buf += self._raw
        self._raw = ""
        self._end(finish_reason)
        return self._take()

    @property
    def in_reasoning(self) -> bool:
        """True while the output is still inside the reasoning block."""
        return self._state in ("start", "reasoning")

    # ------------------------------------------------------------------ internals
    def _end(self, finish_reason: str | None) -> None:
        self._run(final=True)
        self._done = True
        if self._state in ("invoke", "block"):
            self._close_call(complete=finish_reason == "stop" or self._state == "block")
        self._call = None
        for kind in ("reasoning_content", "content"):
            self._emit(kind, "", final=True)
        if self.in_reasoning and finish_reason == "stop":
            self.answer_recovered = True
            self._out.append({"content": "".join(self._reasoning)})

    def _emit(self, kind: str, text: str, final: bool = False) -> None:
        text = self._filters[kind].feed(text, final)
        if kind == "content" and self._after_block:  # whitespace that ends the output after a block is dropped
            text = self._held_space + text
            kept = text.rstrip()
            self._held_space = "" if final else text[len(kept) :]
            text = kept
        if text:
            if kind == "reasoning_content":
                self._reasoning.append(text)
            self._out.append({kind: text})

    def _close_call(self, complete: bool = True) -> None:
        call, self._call = self._call, None
        if call is None or not complete or not self.tools_enabled:
            return
        declared = self.tool_params.get(call["name"]) if self.tool_params is not None else None
        index = self.tool_call_count
        self.tool_call_count += 1
        self._out.append(
            {
                "tool_call": {
                    "index": index,
                    "id": _new_call_id(self.call_id_prefix, index),
                    "name": call["name"],
                    "arguments": tool_arguments(call["params"], declared),
                }
            }
        )

    def _take(self) -> list[dict]:
        merged: list[dict] = []
        for d in self._out:
            if merged and "tool_call" not in d:
                kind = next(iter(d))
                if kind in merged[-1]:
                    merged[-1][kind] += d[kind]
                    continue
            merged.append(dict(d))
        self._out = []
        return [d for d in merged if "tool_call" in d or next(iter(d.values()))]

    def _run(self, final: bool) -> None:
        """Advance the state machine over ``self._buf``; with ``final`` no more text will come."""
        while True:
            st = self._state
            buf = self._buf
            if st == "start":
                if buf.startswith(special.THINK_START):
                    self._buf = buf[len(special.THINK_START) :]
                    self._state = "reasoning"
                    continue
                if special.THINK_START.startswith(buf) and not final:
                    return  # could still become "<think>"
                self._state = "reasoning"
                continue
            if st == "reasoning":
                i, m = _earliest(buf, _REASONING_MARKERS)
                if m is not None:
                    seg = buf[:i]
                    if m == special.TOOL_CALLS_OPEN:  # a tool block opened inside the reasoning block
                        seg = seg[:-2] if seg.endswith("\n\n") else seg
                        self._state = "block"
                    else:
                        self._state = "body"
                    self._emit("reasoning_content", seg)
                    self._buf = buf[i + len(m) :]
                    continue
                keep = 0 if final else _held_suffix(buf, _REASONING_HELD)
                self._emit("reasoning_content", buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return
            if st == "body":
                i = buf.find(special.TOOL_CALLS_OPEN)
                if i >= 0:
                    seg = buf[:i]
                    self._emit("content", seg[:-2] if seg.endswith("\n\n") else seg)
                    self._buf = buf[i + len(special.TOOL_CALLS_OPEN) :]
                    self._state = "block"
                    continue
                keep = 0 if final else _held_suffix(buf, (special.TOOL_CALLS_START, special.TOOL_CALLS_OPEN))
                self._emit("content", buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return
            if st in ("block", "invoke"):
                markers = _TOOL_MARKERS[st]
                i, m = _earliest(buf, markers)
                if m is None:
                    keep = 0 if final else _held_suffix(buf, markers)
                    self._buf = buf[len(buf) - keep :]  # text between tags is ignored
                    return
                self._buf = buf[i + len(m) :]
                if m == special.TOOL_CALLS_CLOSE:
                    self._close_call()
                    self._state = "body"
                    self._after_block = True
                elif m == special.INVOKE_CLOSE:
                    self._close_call()
                    self._state = "block"
                elif m == special.INVOKE_OPEN:
                    self._close_call()
                    self._state, self._tag_return = "invoke_tag", "block"
                else:
                    self._state, self._tag_return = "param_tag", "invoke"
                continue
            if st in ("invoke_tag", "param_tag"):
                gt = buf.find(">")
                if gt < 0:
                    return  # at the end: a tag cut short, its call is dropped by _end
                attrs = buf[:gt]
                self._buf = buf[gt + 1 :]
                if st == "invoke_tag":
                    mm = _INVOKE_ATTRS.fullmatch(attrs)
                    if mm:
                        self._call = {"name": mm.group(1), "params": []}
                        self._state = "invoke"
                    else:
                        self._state = self._tag_return
                else:
                    mm = _PARAM_ATTRS.fullmatch(attrs)
                    if mm:
                        self._param = (mm.group(1), mm.group(2) != "false")
                        self._value = []
                        self._state = "param"
                    else:
                        self._state = self._tag_return
                continue
            if st == "param":
                i = buf.find(special.PARAM_CLOSE)
                if i < 0:
                    keep = 0 if final else _held_suffix(buf, (special.PARAM_CLOSE,))
                    self._value.append(buf[: len(buf) - keep])
                    self._buf = buf[len(buf) - keep :]
                    return  # at the end: a value cut short, its call is dropped by _end
                self._value.append(buf[:i])
                if self._call is not None and self._param is not None:
                    self._call["params"].append((self._param[0], self._param[1], "".join(self._value)))
                self._param, self._value = None, []
                self._buf = buf[i + len(special.PARAM_CLOSE) :]
                self._state = "invoke"
                continue
            raise AssertionError(f"unknown parser state {st!r}")  # pragma: no cover


def _earliest(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    best, which = len(buf), None
    for m in markers:
        i = buf.find(m)
        if 0 <= i < best:
            best, which = i, m
    return best, which


def _held_suffix(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``markers``."""
    n = len(buf)
    best = 0
    for m in markers:
        # candidate starts: occurrences of the marker's first character in the last len(m)-1 chars
        i = buf.find(m[0], max(0, n - len(m) + 1))
        while i >= 0 and n - i > best:
            if m.startswith(buf[i:]):
                best = n - i
                break
            i = buf.find(m[0], i + 1)
    return best


__all__ = ["ParsedOutput", "StreamingOutputParser", "parse_output", "tool_arguments"]
