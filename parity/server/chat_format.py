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
    return {"id": tc.get("id") or new_tool_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


class ChatFormat:
    """DeepSeek-V4 chat encoding/parsing, via `parity.tokenizer` (imported lazily).

    Args:
        encoding: the checkpoint's `parity.tokenizer.encoding.ChatEncoding` (None: the published format).
    """

    def __init__(self, encoding: Any = None) -> None:
        import parity.tokenizer as t

        self._t = t
        self.encoding = encoding

    def encode(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        thinking: bool,
        reasoning_effort: str | None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """Prompt text for `messages` (OpenAI message dicts). Raises the tokenizer's error (a
        `RequestError` subclass) naming the message index and field."""
        return self._t.encode_chat(
            messages,
            tools=tools,
            thinking=thinking,
            reasoning_effort=reasoning_effort,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            encoding=self.encoding,
        )

    def opens_reasoning(self, prompt: str) -> bool:
        """True when generation after `prompt` starts inside a reasoning block (its last think tag opens)."""
        special = self._t.special
        return prompt.rfind(special.THINK_START) > prompt.rfind(special.THINK_END)

    def parse(
        self,
        text: str,
        thinking: bool,
        tools_enabled: bool = True,
        finish_reason: str | None = None,
        tool_params: dict[str, list[str]] | None = None,
    ) -> tuple[str, str | None, list[dict]]:
        """(content, reasoning_content, tool_calls in OpenAI shape) of a whole generated text; with
        `tools_enabled` False tool-call blocks are dropped; `finish_reason` settles unterminated output."""
        p = self._t.parse_output(
            text, thinking=thinking, tools_enabled=tools_enabled, finish_reason=finish_reason, tool_params=tool_params
        )
        calls = [normalize_tool_call(tc, i) for i, tc in enumerate(getattr(p, "tool_calls", None) or [])]
        return getattr(p, "content", "") or "", getattr(p, "reasoning_content", None), calls

    def stream_parser(
        self, thinking: bool, tools_enabled: bool, tool_params: dict[str, list[str]] | None = None
    ) -> Any:
        """An object with `feed(delta_text) -> list[dict]` and `finish(finish_reason) -> list[dict]`, each dict
        one of {"reasoning_content": str} | {"content": str} | {"tool_call": {index, id, name, arguments}}."""
        return self._t.StreamingOutputParser(thinking=thinking, tools_enabled=tools_enabled, tool_params=tool_params)
