"""One streamed request to an OpenAI-compatible endpoint, timed (httpx async + server-sent events).

Endpoints: ``chat`` -> POST {base}/v1/chat/completions, ``completions`` -> POST {base}/v1/completions, both with
``stream: true`` and ``stream_options: {include_usage: true, continuous_usage_stats: true}`` (continuous usage
stats are a vLLM / SGLang / parity extension: every chunk carries the running ``completion_tokens``, which lets the
bench count the tokens of each chunk exactly; servers that omit them are handled by counting each chunk's text
with the tokenizer). URLs, error bodies and SSE parsing come from `parity.openai_client`; this module keeps the
timing (TTFT, ITL, E2E latency) and token counting.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from parity import openai_client
from parity.bench.metrics import RequestRecord
from parity.bench.tokenizer import BenchTokenizer
from parity.bench.workloads import BenchRequest
from parity.errors import BenchError
from parity.openai_client import SSEDecoder, SSEFormatError, error_message


def endpoint_url(base_url: str, endpoint: str) -> str:
    """Full URL of `endpoint` ("chat" or "completions") under `base_url` (which may or may not end in /v1).

    Raises:
        BenchError: base_url not http(s)://host[:port][/path], or unknown endpoint.
    """
    return openai_client.endpoint_url(base_url, endpoint, BenchError)


async def fetch_default_model(base_url: str, headers: dict, timeout_s: float = 30.0, transport=None) -> str:
    """The model to benchmark when ``--model`` is not given: the first entry of the server's ``GET /v1/models``.

    Args:
        base_url: server root (a trailing /v1 is accepted).
        headers: sent with the GET (the ``Authorization: Bearer`` API key).
        timeout_s: limit for the GET, in s (at most 30 s).
        transport: httpx async transport replacing the network (tests).
    Returns:
        The ``id`` of ``data[0]`` in the server's answer.
    Raises:
        BenchError: the server is unreachable or times out, answers an HTTP error (e.g. 401 for a wrong key), or
            its answer is not a model list with at least one entry; the message says to pass ``--model``.
    """
    url = openai_client.server_root(base_url, BenchError) + "/v1/models"
    hint = "; pass --model NAME to name the model yourself"
    limit_s = min(timeout_s, 30.0)
    try:
        async with httpx.AsyncClient(transport=transport, timeout=limit_s) as client:
            resp = await client.get(url, headers=headers)
    except httpx.ConnectError as e:
        raise BenchError(
            f"--model not given and GET {url} failed: server unreachable ({e or type(e).__name__}){hint}"
        ) from None
    except httpx.TimeoutException as e:
        raise BenchError(
            f"GET {url} (asked for the model, as --model is not given) timed out after {limit_s:g} s "
            f"({type(e).__name__}); pass a longer --timeout, or --model NAME to skip the lookup"
        ) from None
    except httpx.HTTPError as e:
        raise BenchError(f"--model not given and GET {url} failed: {type(e).__name__}: {e}{hint}") from None
    if resp.status_code != 200:
        try:
            msg = resp.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - any non-OpenAI error body
            msg = resp.text[:200]
        key = " (check --api-key / $OPENAI_API_KEY)" if resp.status_code in (401, 403) else ""
        raise BenchError(f"--model not given and GET {url} answered HTTP {resp.status_code}{key}: {msg}{hint}")
    try:
        data = resp.json()["data"]
        if not isinstance(data, list):
            raise TypeError("data is not a list")
    except (ValueError, KeyError, TypeError):
        raise BenchError(
            f"--model not given and GET {url} did not answer an OpenAI model list "
            f'({{"data": [{{"id": ...}}]}}): {resp.text[:200]!r}{hint}'
        ) from None
    if not data:
        raise BenchError(f"--model not given and the server lists no models at {url}{hint}")
    first = data[0].get("id") if isinstance(data[0], dict) else None
    if not isinstance(first, str) or not first:
        raise BenchError(f"--model not given and the first model listed at {url} has no id: {data[0]!r}{hint}")
    return first


def build_payload(
    endpoint: str,
    model: str,
    req: BenchRequest,
    *,
    ignore_eos: bool = False,
    temperature: float | None = 0.0,
    continuous_usage: bool = True,
    extra: dict | None = None,
) -> dict:
    """JSON body for one request: the prompt, ``max_tokens`` = requested output length, streaming with usage."""
    stream_options = {"include_usage": True, **({"continuous_usage_stats": True} if continuous_usage else {})}
    body: dict = {
        "model": model,
        "stream": True,
        "max_tokens": int(req.output_tokens),
        "stream_options": stream_options,
    }
    if endpoint == "chat":
        body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if temperature is not None:
        body["temperature"] = float(temperature)
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


class _StreamState:
    """Accumulates one response stream; `feed(event_data, t)` handles one SSE event."""

    __slots__ = (
        "chat",
        "tok",
        "st",
        "ttft",
        "last_t",
        "itl",
        "chunks",
        "stream_tokens",
        "usage_ct",
        "usage_pt",
        "text",
        "done",
        "done_t",
        "finished",
        "error",
        "events",
    )

    def __init__(self, chat: bool, tok: BenchTokenizer, st: float):
        self.chat, self.tok, self.st = chat, tok, st
        self.ttft = None
        self.last_t = 0.0
        self.itl: list[float] = []
        self.chunks = 0
        self.stream_tokens = 0
        self.usage_ct: int | None = None
        self.usage_pt: int | None = None
        self.text: list[str] = []
        self.done = False
        self.done_t: float | None = None
        self.finished = False
        self.error: str | None = None
        self.events = 0

    def feed(self, data: str, t: float) -> None:
        self.events += 1
        if data == "[DONE]":
            self.done, self.done_t = True, t
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"malformed SSE: event {self.events} is not JSON: {data[:60]!r}"
            return
        if not isinstance(obj, dict):
            self.error = f"malformed SSE: event {self.events} is not a JSON object"
            return
        choices = obj.get("choices")
        if obj.get("error") is not None and not choices:
            err = obj["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            self.error = f"server error in stream: {str(msg)[:200]}"
            return
        k_usage = None
        usage = obj.get("usage")
        if isinstance(usage, dict):
            ct = usage.get("completion_tokens")
            if isinstance(ct, int):
                if choices:
                    k_usage = ct - (self.usage_ct or 0)
                self.usage_ct = ct
            pt = usage.get("prompt_tokens")
            if isinstance(pt, int):
                self.usage_pt = pt
        if not choices:
            return
        c = choices[0]
        if not isinstance(c, dict):
            self.error = f"malformed SSE: event {self.events} has a non-object choice"
            return
        text = ""
        tool = False
        if self.chat:
            d = c.get("delta") or {}
            text = (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
            tc = d.get("tool_calls")
            if tc:
                tool = True
                for call in tc:
                    fn = (call or {}).get("function") or {}
                    text += (fn.get("name") or "") + (fn.get("arguments") or "")
        else:
            text = c.get("text") or ""
        if c.get("finish_reason"):
            self.finished = True
        if text:
            self.text.append(text)
        if k_usage is not None:
            k = k_usage if k_usage > 0 else (1 if text or tool else 0)
        elif text:
            k = max(1, self.tok.count(text))
        else:
            k = 1 if tool else 0
        if k <= 0:
            return
        self.chunks += 1
        self.stream_tokens += k
        if self.ttft is None:
            self.ttft = t - self.st
        else:
            g = (t - self.last_t) / k
            self.itl.extend([g] * k)
        self.last_t = t


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict,
    req: BenchRequest,
    rec: RequestRecord,
    tokenizer: BenchTokenizer,
    origin_s: float,
    chat: bool,
    headers: dict | None = None,
    request_id: str | None = None,
    timeout_s: float | None = None,
) -> None:
    """Send one streamed request and fill `rec` (RequestRecord) in place.

    Args:
        origin_s: `time.perf_counter()` of the run start; `rec.send_s` is relative to it.
        request_id: sent as the ``X-Request-Id`` header (vLLM and parity log it; lets server-side logs be joined
            with the bench's records).
        timeout_s: total limit in s for the whole request, from sending it to the last byte of the stream
            (``--timeout``; vLLM's benchmark sets the same as aiohttp's total timeout); None = no total limit.
    Failures never raise (except cancellation): they set `rec.ok = False` and `rec.error` to a reason such as
    ``HTTP 503: ...``, ``connection failed: ...``, ``malformed SSE: ...``, ``stream ended before [DONE]``,
    ``timeout: no complete response within --timeout ... s``.
    On cancellation (Ctrl-C) `rec.error` becomes "interrupted" and CancelledError propagates.
    """
    rec.requested_output_tokens = req.output_tokens
    rec.prompt_tokens = req.prompt_tokens
    st = time.perf_counter()
    rec.send_s = st - origin_s
    state = _StreamState(chat, tokenizer, st)
    try:
        if request_id is not None:
            headers = {**(headers or {}), "X-Request-Id": request_id}
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=payload, headers=headers) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                body = await resp.aread()
                rec.ok, rec.error = False, f"HTTP {resp.status_code}: {error_message(body)}"
                return
            ctype = resp.headers.get("content-type", "")
            if ctype and "text/event-stream" not in ctype:
                body = await resp.aread()
                rec.ok, rec.error = (
                    False,
                    (f"malformed SSE: content-type {ctype!r}, expected text/event-stream ({error_message(body)[:80]})"),
                )
                return
            decoder = SSEDecoder()
            async for raw in resp.aiter_bytes():
                t = time.perf_counter()
                try:
                    for data in decoder.feed(raw):
                        state.feed(data, t)
                        if state.error:
                            break
                except SSEFormatError as e:
                    state.error = str(e)
                if state.error:
                    break
            if not state.error:
                last = decoder.flush()
                if last is not None:
                    state.feed(last, time.perf_counter())
        end = time.perf_counter()
    except asyncio.CancelledError:
        rec.ok, rec.error = False, "interrupted"
        raise
    except httpx.ConnectError as e:
        rec.ok, rec.error = False, f"connection failed: {url} ({e or type(e).__name__})"
        return
    except TimeoutError:  # asyncio.timeout: the whole request took longer than timeout_s
        rec.ok, rec.error = False, f"timeout: no complete response within --timeout {timeout_s:g} s"
        return
    except httpx.TimeoutException as e:
        rec.ok, rec.error = False, f"timeout: {type(e).__name__} after {time.perf_counter() - st:.1f} s"
        return
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        rec.ok, rec.error = False, f"connection closed mid-stream ({e or type(e).__name__})"
        return
    except httpx.HTTPError as e:
        rec.ok, rec.error = False, f"{type(e).__name__}: {e}"
        return
    rec.chunks = state.chunks
    rec.ttft_s = state.ttft
    rec.itl_s = state.itl
    rec.e2el_s = (state.done_t if state.done_t is not None else end) - st  # [DONE] ends the stream
    if state.usage_pt is not None:
        rec.prompt_tokens = state.usage_pt
    if state.usage_ct is not None:
        rec.output_tokens, rec.count_source = state.usage_ct, "usage"
    else:
        n = tokenizer.count("".join(state.text))
        rec.output_tokens, rec.count_source = (n if n > 0 else state.stream_tokens), "tokenizer"
    if state.error:
        rec.ok, rec.error = False, state.error
    elif not (state.done or state.finished):
        rec.ok, rec.error = False, "stream ended before [DONE]"
    elif state.ttft is None:
        rec.ok, rec.error = False, "no output tokens in response"
    else:
        rec.ok, rec.error = True, None
