"""The server's view of chat encoding and output parsing.

`ChatFormat` adapts `parity.tokenizer` (DeepSeek-V4's chat format: `encode_chat`, `parse_output`,
`StreamingOutputParser`) to the shapes the OpenAI API needs, so the HTTP layer never depends on the
tokenizer module's internal result types. Tests can pass another object with the same three methods.
"""

from __future__ import annotations

import json
import uuid
from typing import Any


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id ("call_" + 24 hex chars)."""
    return "call_" + uuid.uuid4().hex[:24]


def normalize_tool_call(tc: Any, index: int) -> dict[str, Any]:
    """One parsed tool call as OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`.

    Accepts the OpenAI shape itself, a flat `{"name", "arguments"}` dict, or an object with those
    attributes; `arguments` becomes a JSON string when it is a dict.
    """
    if not isinstance(tc, dict):
        tc = {k: getattr(tc, k) for k in ("id", "name", "arguments", "function") if hasattr(tc, k)}
    fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc
    name = fn.get("name", "")
    args = fn.get("arguments", "")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": tc.get("id") or new_tool_call_id(), "type": "function",
            "function": {"name": name, "arguments": args}}


class ChatFormat:
    """DeepSeek-V4 chat encoding/parsing, via `parity.tokenizer` (imported lazily)."""

    def __init__(self) -> None:
        import parity.tokenizer as t

        self._t = t

    def encode(self, messages: list[dict], tools: list[dict] | None, thinking: bool,
               reasoning_effort: str | None) -> str:
        """Prompt text for `messages` (OpenAI message dicts). Raises the tokenizer's error (a
        `RequestError` subclass) naming the message index and field."""
        return self._t.encode_chat(messages, tools=tools, thinking=thinking,
                                   reasoning_effort=reasoning_effort, add_generation_prompt=True)

    def parse(self, text: str, thinking: bool, tools_enabled: bool = True) -> tuple[str, str | None, list[dict]]:
        """(content, reasoning_content, tool_calls in OpenAI shape) of a whole generated text; with
        `tools_enabled` False, tool-call markup stays in the content."""
        p = self._t.parse_output(text, thinking=thinking, tools_enabled=tools_enabled)
        calls = [normalize_tool_call(tc, i) for i, tc in enumerate(getattr(p, "tool_calls", None) or [])]
        return getattr(p, "content", "") or "", getattr(p, "reasoning_content", None), calls

    def stream_parser(self, thinking: bool, tools_enabled: bool) -> Any:
        """An object with `feed(delta_text) -> list[dict]` and `finish() -> list[dict]`, each dict one of
        {"reasoning_content": str} | {"content": str} | {"tool_call": {index, id, name, arguments}}."""
        return self._t.StreamingOutputParser(thinking=thinking, tools_enabled=tools_enabled)
