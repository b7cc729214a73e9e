"""A minimal streaming chat client for OpenAI-compatible servers (used by `parity chat`).

Built on httpx (a runtime dependency) rather than the `openai` package (test-only). It reads the
server-sent events of `POST /v1/chat/completions` with `stream: true` and yields typed pieces: reasoning
text (DeepSeek's `reasoning_content` deltas), answer text, tool-call fragments, and the final usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

from parity.errors import RequestError


@dataclass
class Piece:
    """One streamed piece: kind is "reasoning" | "content" | "tool_call" | "finish" | "usage"."""

    kind: str
    text: str = ""
    data: Any = None


def _root(base_url: str) -> str:
    """Server root without a trailing "/" or "/v1"."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id `GET {base_url}/v1/models` lists.

    Raises:
        RequestError: the server cannot be reached or answers with an error (message says which).
    """
    url = _root(base_url) + "/v1/models"
    try:
        r = httpx.get(url, headers=_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise RequestError(f"--base-url: cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise RequestError(f"--base-url: {url} answered {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    if not data:
        raise RequestError(f"--base-url: {url} lists no models")
    return str(data[0]["id"])


def stream_chat(base_url: str, payload: dict[str, Any], api_key: str | None = None,
                timeout_s: float = 600.0) -> Iterator[Piece]:
    """Stream one chat completion.

    Args:
        base_url: server root, e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
        payload: the request body; `stream` is forced to true, usage is requested.
        api_key: bearer token, if the server needs one.
        timeout_s: read timeout between events (s).
    Yields:
        Piece objects in arrival order.
    Raises:
        RequestError: connection failure, an HTTP error answer, an error event in the stream
            (the server's message is included), or a payload that is not valid UTF-8.
    """
    root = _root(base_url)
    body = dict(payload, stream=True, stream_options={"include_usage": True})
    try:
        with httpx.stream("POST", root + "/v1/chat/completions", json=body, headers=_headers(api_key),
                          timeout=httpx.Timeout(timeout_s, connect=10.0)) as r:
            if r.status_code != 200:
                r.read()
                try:
                    msg = r.json()["error"]["message"]
                except Exception:
                    msg = r.text[:300]
                raise RequestError(f"server answered {r.status_code}: {msg}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise RequestError(f"server error: {obj['error'].get('message')}")
                for ch in obj.get("choices") or []:
                    delta = ch.get("delta") or {}
                    if delta.get("reasoning_content"):
                        yield Piece("reasoning", delta["reasoning_content"])
                    if delta.get("content"):
                        yield Piece("content", delta["content"])
                    for tc in delta.get("tool_calls") or []:
                        yield Piece("tool_call", (tc.get("function") or {}).get("arguments") or "", tc)
                    if ch.get("finish_reason"):
                        yield Piece("finish", ch["finish_reason"])
                if obj.get("usage"):
                    yield Piece("usage", data=obj["usage"])
    except httpx.HTTPError as e:
        raise RequestError(f"chat request to {root} failed: {e}") from None
    except UnicodeEncodeError:
        # Lone surrogates (bytes that were not UTF-8, decoded with surrogateescape) cannot become JSON.
        raise RequestError("the request is not valid UTF-8 (a message holds undecodable bytes)") from None
