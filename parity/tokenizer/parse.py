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

Two implementations share one grammar: :func:`parse_output` (whole text) and
:class:`StreamingOutputParser` (deltas as text arrives). For every way of splitting a text into
chunks, the deltas accumulate to exactly what :func:`parse_output` returns (tests check every split
point). The grammar is deliberately lenient with model mistakes, identically in both:

1. the text is cut at the first EOS (``<｜end▁of▁sentence｜>``), if any (engines usually strip it);
2. thinking mode: one leading ``<think>`` is skipped; reasoning runs to the first ``</think>`` (all of
   it when there is none, e.g. output cut by ``max_tokens``);
3. content runs to ``<｜DSML｜tool_calls>``; two newlines right before it belong to the markup;
4. inside a block, text between tags is ignored; a tag whose attributes do not parse is ignored;
   ``<｜DSML｜invoke name="..">`` opens a call, closed by ``</｜DSML｜invoke>``, a new invoke, the block's
   end or the end of text; ``<｜DSML｜parameter name=".." string="true|false">value</｜DSML｜parameter>``
   adds an argument (``string`` defaults to true); ``</｜DSML｜tool_calls>`` returns to content (text
   after a block is content).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from parity.tokenizer import special

_INVOKE_ATTRS = re.compile(r'\s+name="([^"]*)"\s*')
_PARAM_ATTRS = re.compile(r'\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*')
#: Tags that can end each state inside a DSML tool-call block (shared by the whole-text and streaming parsers).
_TOOL_MARKERS = {
    "block": (special.INVOKE_OPEN, special.TOOL_CALLS_CLOSE),
    "invoke": (special.PARAM_OPEN, special.INVOKE_CLOSE, special.INVOKE_OPEN, special.TOOL_CALLS_CLOSE),
}


def _json_str_body(s: str) -> str:
    """JSON-escape ``s`` without the quotes (concatenation-safe: escape(a)+escape(b) == escape(a+b))."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _param_prefix(first: bool, name: str, is_str: bool) -> str:
    return ("" if first else ", ") + json.dumps(name, ensure_ascii=False) + ": " + ('"' if is_str else "")


def _new_call_id(prefix: str | None, index: int) -> str:
    return f"{prefix}{index}" if prefix is not None else f"call_{uuid.uuid4().hex[:24]}"


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


def parse_output(text: str, thinking: bool, tools_enabled: bool = True,
                 call_id_prefix: str | None = None) -> ParsedOutput:
    """Parse a whole generated text (see the module docstring for the grammar).

    Args:
        text: the decoded output (special tokens skipped or not; EOS ends it).
        thinking: the prompt was encoded in thinking mode (ends with ``<think>``).
        tools_enabled: parse DSML tool calls; when False the markup stays in ``content``.
        call_id_prefix: tool-call ids become ``f"{prefix}{index}"``; None draws random
            ``call_<24 hex>`` ids.
    Returns:
        :class:`ParsedOutput`. Never raises on malformed model output.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    cut = text.find(special.EOS)
    if cut >= 0:
        text = text[:cut]
    n = len(text)
    pos = 0
    reasoning: str | None = None
    if thinking:
        if text.startswith(special.THINK_START):
            pos = len(special.THINK_START)
        end = text.find(special.THINK_END, pos)
        if end < 0:
            return ParsedOutput("", text[pos:], [])
        reasoning = text[pos:end]
        pos = end + len(special.THINK_END)
    if not tools_enabled:
        return ParsedOutput(text[pos:], reasoning, [])

    content: list[str] = []
    calls: list[dict] = []
    cur: dict | None = None  # {"name", "params": [(name, is_str, value)]}

    def close_call() -> None:
        nonlocal cur
        if cur is not None:
            args = "{" + ", ".join(
                json.dumps(k, ensure_ascii=False) + ": " + (json.dumps(v, ensure_ascii=False) if s else v)
                for k, s, v in cur["params"]) + "}"
            calls.append({"id": _new_call_id(call_id_prefix, len(calls)), "type": "function",
                          "function": {"name": cur["name"], "arguments": args}})
            cur = None

    def earliest(start: int, markers: tuple[str, ...]) -> tuple[int, str | None]:
        best, which = n, None
        for m in markers:
            i = text.find(m, start)
            if 0 <= i < best:
                best, which = i, m
        return best, which

    state = "body"
    while pos < n:
        if state == "body":
            q = text.find(special.TOOL_CALLS_OPEN, pos)
            if q < 0:
                content.append(text[pos:])
                break
            seg = text[pos:q]
            content.append(seg[:-2] if seg.endswith("\n\n") else seg)
            pos = q + len(special.TOOL_CALLS_OPEN)
            state = "block"
        elif state in ("block", "invoke"):
            markers = _TOOL_MARKERS[state]
            i, m = earliest(pos, markers)
            if m is None:
                break
            pos = i + len(m)
            if m == special.TOOL_CALLS_CLOSE:
                close_call()
                state = "body"
            elif m == special.INVOKE_CLOSE:
                close_call()
                state = "block"
            elif m == special.INVOKE_OPEN:
                close_call()
                gt = text.find(">", pos)
                if gt < 0:
                    break
                mm = _INVOKE_ATTRS.fullmatch(text, pos, gt)
                pos = gt + 1
                if mm:
                    cur = {"name": mm.group(1), "params": []}
                    state = "invoke"
                else:
                    state = "block"
            else:  # PARAM_OPEN inside an invoke
                gt = text.find(">", pos)
                if gt < 0:
                    break
                mm = _PARAM_ATTRS.fullmatch(text, pos, gt)
                pos = gt + 1
                if mm:
                    end = text.find(special.PARAM_CLOSE, pos)
                    value = text[pos:] if end < 0 else text[pos:end]
                    cur["params"].append((mm.group(1), mm.group(2) != "false", value))
                    pos = n if end < 0 else end + len(special.PARAM_CLOSE)
    close_call()
    return ParsedOutput("".join(content), reasoning, calls)


class StreamingOutputParser:
    """Incremental :func:`parse_output`: feed text deltas, get typed deltas back.

    Deltas (dicts, in output order; consecutive ones of one kind from one ``feed`` are merged):

    * ``{"reasoning_content": str}`` (thinking mode only)
    * ``{"content": str}``
    * ``{"tool_call": {"index": int, "id": str | None, "name": str | None, "arguments": str}}`` - the
      first delta of a call carries ``id`` and ``name`` (and ``arguments`` "{"), later ones have
      ``id``/``name`` None and an ``arguments`` fragment; the fragments of one index concatenate to the
      call's full JSON ``arguments`` (OpenAI streaming convention).

    Text that might be the start of a marker (``</think>``, ``\\n\\n<｜DSML｜tool_calls>``, EOS...) is
    held back until the next delta decides it, so the latency cost is at most one marker's length.

    Args:
        thinking: the prompt was encoded in thinking mode.
        tools_enabled: parse DSML tool calls (False: the markup is content).
        call_id_prefix: as for :func:`parse_output`.
    """

    def __init__(self, thinking: bool, tools_enabled: bool = True, call_id_prefix: str | None = None):
        self.thinking = thinking
        self.tools_enabled = tools_enabled
        self.call_id_prefix = call_id_prefix
        self._raw = ""  # pre-filter buffer (EOS detection)
        self._buf = ""  # state-machine buffer
        self._state = "start" if thinking else "body"
        self._tag_return = "block"  # state to return to when a tag fails to parse
        self._done = False
        self._out: list[dict] = []
        self._call_index = -1  # index of the open call (or last one)
        self._call_open = False
        self._param_first = True
        self._param_is_str = True
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
            self._run(final=True)
            self._done = True
        else:
            keep = _held_suffix(raw, (special.EOS,))
            self._raw = raw[len(raw) - keep:] if keep else ""
            self._buf += raw[:len(raw) - keep]
            self._run(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        """End of output: flush held-back text and close an unfinished tool call."""
        if self._done:
            return self._take()
        self._buf += self._raw
        self._raw = ""
        self._run(final=True)
        self._done = True
        return self._take()

    # ------------------------------------------------------------------ internals
    def _emit(self, kind: str, text: str) -> None:
        if text:
            self._out.append({kind: text})

    def _emit_args(self, text: str, call_id: str | None = None, name: str | None = None) -> None:
        self._out.append({"tool_call": {"index": self._call_index, "id": call_id, "name": name,
                                        "arguments": text}})

    def _open_call(self, name: str) -> None:
        self._call_index = self.tool_call_count
        self.tool_call_count += 1
        self._call_open = True
        self._param_first = True
        self._emit_args("{", _new_call_id(self.call_id_prefix, self._call_index), name)

    def _close_call(self) -> None:
        if self._call_open:
            self._emit_args("}")
            self._call_open = False

    def _take(self) -> list[dict]:
        merged: list[dict] = []
        for d in self._out:
            if merged:
                last = merged[-1]
                if "tool_call" in d and "tool_call" in last:
                    a, b = last["tool_call"], d["tool_call"]
                    if a["index"] == b["index"] and b["id"] is None and b["name"] is None:
                        last["tool_call"] = {**a, "arguments": a["arguments"] + b["arguments"]}
                        continue
                elif "content" in d and "content" in last:
                    last["content"] += d["content"]
                    continue
                elif "reasoning_content" in d and "reasoning_content" in last:
                    last["reasoning_content"] += d["reasoning_content"]
                    continue
            merged.append(dict(d))
        self._out = []
        return merged

    def _run(self, final: bool) -> None:
        """Advance the state machine over ``self._buf``; with ``final`` no more text will come."""
        while True:
            st = self._state
            buf = self._buf
            if st == "start":
                if buf.startswith(special.THINK_START):
                    self._buf = buf[len(special.THINK_START):]
                    self._state = "reasoning"
                    continue
                if special.THINK_START.startswith(buf) and not final:
                    return  # could still become "<think>"
                self._state = "reasoning"
                continue
            if st == "reasoning":
                i = buf.find(special.THINK_END)
                if i >= 0:
                    self._emit("reasoning_content", buf[:i])
                    self._buf = buf[i + len(special.THINK_END):]
                    self._state = "body"
                    continue
                keep = 0 if final else _held_suffix(buf, (special.THINK_END,))
                self._emit("reasoning_content", buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return
            if st == "body":
                if not self.tools_enabled:
                    self._emit("content", buf)
                    self._buf = ""
                    return
                i = buf.find(special.TOOL_CALLS_OPEN)
                if i >= 0:
                    seg = buf[:i]
                    self._emit("content", seg[:-2] if seg.endswith("\n\n") else seg)
                    self._buf = buf[i + len(special.TOOL_CALLS_OPEN):]
                    self._state = "block"
                    continue
                keep = 0 if final else _held_suffix(buf, (special.TOOL_CALLS_START, special.TOOL_CALLS_OPEN))
                self._emit("content", buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return
            if st in ("block", "invoke"):
                markers = _TOOL_MARKERS[st]
                i, m = _earliest(buf, markers)
                if m is None:
                    keep = 0 if final else _held_suffix(buf, markers)
                    self._buf = buf[len(buf) - keep:]  # text between tags is ignored
                    if final:
                        self._close_call()
                    return
                self._buf = buf[i + len(m):]
                if m == special.TOOL_CALLS_CLOSE:
                    self._close_call()
                    self._state = "body"
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
                    if final:
                        self._buf = ""
                        self._close_call()
                    return
                attrs = buf[:gt]
                self._buf = buf[gt + 1:]
                if st == "invoke_tag":
                    mm = _INVOKE_ATTRS.fullmatch(attrs)
                    if mm:
                        self._open_call(mm.group(1))
                        self._state = "invoke"
                    else:
                        self._state = self._tag_return
                else:
                    mm = _PARAM_ATTRS.fullmatch(attrs)
                    if mm:
                        self._param_is_str = mm.group(2) != "false"
                        self._emit_args(_param_prefix(self._param_first, mm.group(1), self._param_is_str))
                        self._param_first = False
                        self._state = "param"
                    else:
                        self._state = self._tag_return
                continue
            if st == "param":
                i = buf.find(special.PARAM_CLOSE)
                end = i if i >= 0 else (len(buf) - (0 if final else _held_suffix(buf, (special.PARAM_CLOSE,))))
                value = buf[:end]
                if value:
                    self._emit_args(_json_str_body(value) if self._param_is_str else value)
                if i >= 0 or final:
                    if self._param_is_str:
                        self._emit_args('"')
                    self._buf = buf[i + len(special.PARAM_CLOSE):] if i >= 0 else ""
                    self._state = "invoke"
                    if i >= 0:
                        continue
                    self._close_call()
                    return
                self._buf = buf[end:]
                return
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


__all__ = ["ParsedOutput", "StreamingOutputParser", "parse_output"]
