"""HTTP client pieces for OpenAI-compatible servers, shared by `parity chat` and `parity bench` (torch-free).

- URLs: `server_root` / `endpoint_url` (a base URL with or without a trailing `/v1`), `auth_headers`.
- Errors: `error_message` pulls the message out of an OpenAI error body (or whatever else came back).
- Server-sent events: `SSEDecoder` parses a byte stream per the WHATWG "server-sent events" rules
  (`data:` lines, events ended by a blank line, `:` comments and `event:` / `id:` / `retry:` fields
  ignored); OpenAI streams end with the event `[DONE]`.
- The model list (GET /v1/models): `model_entries` (parity bench's preflight), `served_models`, `first_model`.
- `parity chat`'s client: `first_model` and `stream_chat` (streamed chat completion as
  typed `Piece`s), on httpx (a runtime dependency) rather than the `openai` package (test-only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from parity.errors import ParityError, RequestError

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class SSEFormatError(ParityError, ValueError):
    """A server-sent-event stream holds a line that is no SSE field."""


def server_root(base_url: str, error_cls: type[Exception] = RequestError) -> str:
    """`base_url` without a trailing "/" or "/v1".

    Raises:
        error_cls: base_url is not an http(s)://host[:port][/path] URL (the message names `--base-url`).
    """
    try:
        u = httpx.URL(base_url)
    except Exception:  # noqa: BLE001 - httpx.InvalidURL and friends
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host:
        raise error_cls(f"--base-url {base_url!r} is not a URL like http://127.0.0.1:8000 (scheme http or https)")
    base = str(u).rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base


def endpoint_url(base_url: str, endpoint: str, error_cls: type[Exception] = RequestError) -> str:
    """Full URL of `endpoint` ("chat" or "completions", see ENDPOINTS) under `base_url`.

    Raises:
        error_cls: base_url not http(s)://host[:port][/path], or unknown endpoint.
    """
    if endpoint not in ENDPOINTS:
        raise error_cls(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    return server_root(base_url, error_cls) + ENDPOINTS[endpoint]


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer <api_key>` when a key is given, else no headers."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(body: bytes, limit: int = 200) -> str:
    """The message of an error answer: OpenAI's `error.message`, FastAPI's `detail`, else the body's text
    (at most `limit` characters; "<empty body>" for nothing)."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            err = obj.get("error", obj.get("detail", obj))
            if isinstance(err, dict):
                err = err.get("message", err)
            return str(err)[:limit]
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    return body[:limit].decode("utf-8", errors="replace").strip() or "<empty body>"


class SSEDecoder:
    """Incremental server-sent-events parser: bytes in, the `data` of each complete event out."""

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, raw: bytes) -> Iterator[str]:
        """The data (lines joined with "\\n", UTF-8 decoded with replacement) of each event `raw` completes.

        Raises:
            SSEFormatError: a line that is no SSE field, after the events before it were yielded.
        """
        self._buf += raw
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    data, self._data = "\n".join(self._data), []
                    yield data
                continue
            if line.startswith(b"data:"):
                v = line[5:]
                self._data.append((v[1:] if v.startswith(b" ") else v).decode("utf-8", errors="replace"))
            elif line.startswith(b":") or line.split(b":", 1)[0] in (b"event", b"id", b"retry"):
                continue  # comment, event:, id:, retry: fields
            else:
                raise SSEFormatError(f"malformed SSE: unexpected line {line[:60].decode('utf-8', 'replace')!r}")

    def flush(self) -> str | None:
        """At the end of the stream: the data of an event not ended by a blank line, or None."""
        rest = self._buf.strip()
        self._buf = b""
        if rest.startswith(b"data:"):
            self._data.append(rest[5:].strip().decode("utf-8", errors="replace"))
        data, self._data = ("\n".join(self._data) if self._data else None), []
        return data


# ---- parity chat's client ---------------------------------------------------------------------
@dataclass
class Piece:
    """One streamed piece: kind is "reasoning" | "content" | "tool_call" | "finish" | "usage"."""

    kind: str
    text: str = ""
    data: Any = None


def model_entries(
    base_url: str, headers: dict[str, str], timeout_s: float = 10.0, error_cls: type[Exception] = RequestError
) -> list[dict[str, Any]] | None:
    """The entries of the model list `GET {base_url}/v1/models` answers (OpenAI's ``{"data": [{"id": ...}, ...]}``;
    each entry a dict with at least ``id``), or None where the server has no such route (404 / 405).

    Args:
        headers: request headers (`auth_headers`); timeout_s: seconds to wait for the answer.
    Raises:
        error_cls: base_url is not an http(s) URL; the server refuses the connection, does not answer within
            ``timeout_s`` or fails otherwise; answers another HTTP error (its message quoted, e.g. 401 for a
            wrong key); or answers 200 with something that is not a model list (each message names the URL).
    """
    url = server_root(base_url, error_cls) + "/v1/models"
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.ConnectError:
        raise error_cls(f"cannot reach the server: GET {url} was refused; is it running at --base-url?") from None
    except httpx.TimeoutException:
        raise error_cls(f"the server did not answer GET {url} within {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise error_cls(f"GET {url} failed: {type(e).__name__}: {e}") from None
    if r.status_code in (404, 405):
        return None
    if r.status_code != 200:
        raise error_cls(f"GET {url} answered {r.status_code}: {error_message(r.content)}")
    try:
        data = r.json().get("data") or []
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise TypeError
    except (ValueError, TypeError, AttributeError):
        raise error_cls(f"GET {url} did not answer a model list (JSON with a 'data' list of {{'id': ...}})") from None
    return data


def served_models(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str] | None:
    """The model ids `GET {base_url}/v1/models` lists (None: the server has no such route, 404 / 405).

    Raises:
        RequestError: as `model_entries`.
    """
    entries = model_entries(base_url, auth_headers(api_key), timeout_s)
    return None if entries is None else [str(m["id"]) for m in entries]


def first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id `GET {base_url}/v1/models` lists.

    Raises:
        RequestError: as `served_models`, or the server has no model list or lists no models.
    """
    models = served_models(base_url, api_key, timeout_s)
    url = server_root(base_url) + "/v1/models"
    if models is None:
        raise RequestError(f"--base-url: the server has no {url} (404 / 405); name the model with --model-name")
    if not models:
        raise RequestError(f"--base-url: {url} lists no models")
    return models[0]


def _chat_event(data: str) -> dict[str, Any]:
    """One chat stream event as JSON; raises RequestError for an error event."""
    obj = json.loads(data)
    if "error" in obj:
        raise RequestError(f"server error: {obj['error'].get('message')}")
    return obj


def _chat_pieces(obj: dict[str, Any]) -> Iterator[Piece]:
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


def stream_chat(
    base_url: str, payload: dict[str, Any], api_key: str | None = None, timeout_s: float = 600.0
) -> Iterator[Piece]:
    """Stream one chat completion.

    Args:
        base_url: server root, e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
        payload: the request body; `stream` is forced to true, usage is requested.
        api_key: bearer token, if the server needs one.
        timeout_s: read timeout between events (s).
    Yields:
        Piece objects in arrival order.
    Raises:
        RequestError: base_url is not an http(s) URL, connection failure, an HTTP error answer, an error
            event or a malformed line in the stream (the server's message is included), or a payload that
            is not valid UTF-8.
    """
    root = server_root(base_url)
    body = dict(payload, stream=True, stream_options={"include_usage": True})
    decoder = SSEDecoder()
    try:
        with httpx.stream(
            "POST",
            endpoint_url(root, "chat"),
            json=body,
            headers=auth_headers(api_key),
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        ) as r:
            if r.status_code != 200:
                raise RequestError(f"server answered {r.status_code}: {error_message(r.read(), 300)}")
            for raw in r.iter_bytes():
                for data in decoder.feed(raw):
                    if data == "[DONE]":
                        return
                    yield from _chat_pieces(_chat_event(data))
            last = decoder.flush()
            if last is not None and last != "[DONE]":
                yield from _chat_pieces(_chat_event(last))
    except httpx.HTTPError as e:
        raise RequestError(f"chat request to {root} failed: {e}") from None
    except SSEFormatError as e:
        raise RequestError(f"chat request to {root}: {e}") from None
    except UnicodeEncodeError:
        # Lone surrogates (bytes that were not UTF-8, decoded with surrogateescape) cannot become JSON.
        raise RequestError("the request is not valid UTF-8 (a message holds undecodable bytes)") from None
