"""The OpenAI-compatible HTTP front: FastAPI app over an `AsyncEngine`.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`
(both streaming with server-sent events and not), `GET /health`, `GET /metrics` (Prometheus).

Design:
- The engine runs its model loop on its own thread (engine contract); handlers only await its async
  generators, so the event loop never blocks on model compute and many streaming clients share the
  engine's continuous batching.
- `n` > 1 is served as n engine requests with the same prompt (seed + i for choice i when a seed is
  given), batched together by the engine.
- A request is admitted (first delta received, which surfaces a full waiting queue as 429 and engine
  validation as 400) before the response starts, so errors are proper HTTP statuses rather than
  mid-stream events. While waiting for that first delta, and for the whole of a non-streaming request, a
  watcher awaits the ASGI `http.disconnect` message; once streaming, Starlette's StreamingResponse
  cancels the body on disconnect. Either way every engine request of the HTTP request is aborted
  (`engine.abort`) and its generator closed, which frees its cache.
- Errors have OpenAI's shape (see errors.py).
- Hostile input cannot stall the loop: bodies over `max_request_bytes` get 413 before they are read in full,
  a text longer than max_model_len tokens can hold is refused before tokenizing, and long texts are
  tokenized with `encode_batch` on a worker thread (it releases the GIL; `tokenizers`' `encode` does not).

SSE framing follows OpenAI: `data: <json>\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Known limitation: `/v1/completions` with `echo: true` and `logprobs: N` returns the prompt in `text`, but
`logprobs` covers the generated tokens only (its `text_offset` starts at the prompt's length); vLLM also
lists the prompt tokens (the first with logprob None). The engine does not compute prompt-token logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parity.errors import ParityError, RequestError
from parity.server.errors import OpenAIError, bad_request, param_from_message
from parity.server.metrics import CONTENT_TYPE, ServerMetrics
from parity.server import protocol as P

log = logging.getLogger("parity.server")

#: SamplingParams field names, used to name the parameter of an engine RequestError without `.param`.
_SAMPLING_NAMES = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "seed", "stop_token_ids", "stop", "logprobs", "n")

#: Prompts longer than this (characters) are tokenized on a worker thread.
_THREAD_TOKENIZE_CHARS = 8192

#: Default request-body limit: this many bytes per token of max_model_len, and at least _MIN_BODY_BYTES.
#: A prompt that fits the context is far smaller: ~4 UTF-8 bytes per token for ordinary text, ~9 for CJK
#: written with JSON `\\uXXXX` escapes (Python's json.dumps default), ~8 for a token-id list.
DEFAULT_BODY_BYTES_PER_TOKEN = 32
_MIN_BODY_BYTES = 1 << 20

#: Upper bound of characters per token when the tokenizer cannot tell (DeepSeek-V4's longest token
#: is 128 characters); a text longer than max_model_len * this cannot fit the context.
_FALLBACK_MAX_TOKEN_CHARS = 128


def default_max_request_bytes(max_model_len: int) -> int:
    """Default limit of an HTTP request body (bytes): max(1 MiB, 32 bytes * max_model_len tokens)."""
    return max(_MIN_BODY_BYTES, DEFAULT_BODY_BYTES_PER_TOKEN * int(max_model_len))


@dataclass
class ServerSettings:
    """Options of one server app.

    Attributes:
        served_model_names: names clients may pass as `model`; the first is reported by /v1/models.
        api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (compared in constant time).
        default_thinking: thinking mode of chat requests that do not choose one.
        drain_timeout_s: on shutdown, how long in-flight requests may run before they are aborted (s).
        retry_after_s: `Retry-After` header of 429 answers (s).
        manage_engine: start the engine in the app's lifespan and shut it down at exit.
        model_root: what /v1/models reports as `root` (the checkpoint path or preset).
        model_aliases: other names accepted as `model` but not listed (e.g. the path given to serve).
        max_request_bytes: largest accepted request body (bytes); larger ones get 413 before they are
            read in full. None: `default_max_request_bytes(max_model_len)`.
    """

    served_model_names: list[str] = field(default_factory=lambda: ["parity"])
    api_key: str | None = None
    default_thinking: bool = False
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    manage_engine: bool = True
    model_root: str | None = None
    model_aliases: list[str] = field(default_factory=list)
    max_request_bytes: int | None = None


def _now() -> int:
    return int(time.time())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI `usage` object (token counts)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], usage: Any = None,
              with_usage: bool = True) -> dict:
    """The OpenAI response / stream-chunk envelope shared by chat and text completions; `usage` is
    included when `with_usage` (always for whole responses, per `stream_options.include_usage` for chunks)."""
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if with_usage:
        out["usage"] = usage
    return out


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class _Choice:
    """Bookkeeping of one engine request (one `choices[i]`)."""

    index: int
    request_id: str
    prompt_len: int
    arrival_s: float
    agen: Any = None
    first: Any = None
    first_token_s: float | None = None
    num_tokens: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: Any = None
    error: str | None = None
    observed: bool = False


class OpenAIServer:
    """Request handling shared by the routes; one per app.

    Args:
        engine: an object implementing the AsyncEngine contract (parity.engine.AsyncEngine).
        settings: ServerSettings.
        chat_format: object with encode/parse/stream_parser (default: `ChatFormat`, DeepSeek-V4's).
        sampling_params_cls: SamplingParams class (default: `parity.engine.SamplingParams`).
    """

    def __init__(self, engine: Any, settings: ServerSettings, chat_format: Any = None,
                 sampling_params_cls: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self._chat_format = chat_format
        self._sp_cls = sampling_params_cls
        self.metrics = ServerMetrics(self._engine_stats)
        self.created = _now()

    # ---- engine facts -------------------------------------------------------------------------
    def _engine_stats(self) -> dict[str, Any]:
        return self.engine.stats()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        cfg = getattr(self.engine, "config", None)
        v = getattr(cfg, "vocab_size", None)
        return int(v if v is not None else self.tokenizer.vocab_size)

    @property
    def chat_format(self) -> Any:
        if self._chat_format is None:
            from parity.server.chat_format import ChatFormat

            self._chat_format = ChatFormat()
        return self._chat_format

    def sampling_params(self, kw: dict[str, Any]) -> Any:
        """Build and validate engine SamplingParams; engine RequestError -> 400 naming the parameter."""
        if self._sp_cls is None:
            from parity.engine import SamplingParams

            self._sp_cls = SamplingParams
        try:
            sp = self._sp_cls(**kw)
            validate = getattr(sp, "validate", None)
            if validate is not None:
                validate(self.vocab_size, self.max_model_len)
        except (RequestError, ValueError, TypeError) as e:
            msg = str(e)
            param = getattr(e, "param", None) or param_from_message(msg, _SAMPLING_NAMES)
            raise bad_request(msg, param=param, code="invalid_value") from None
        return sp

    # ---- common checks ------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        """Raises OpenAIError(401) unless the bearer token equals the API key (constant-time compare)."""
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8")):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, model: str | None) -> str:
        """The model name to report; raises 400 `model_not_found` for a name this server does not serve."""
        names = self.settings.served_model_names
        if model is None:
            return names[0]
        if model not in names and model not in self.settings.model_aliases:
            raise bad_request(f"The model '{model}' does not exist; this server serves {names[0]!r}.",
                              param="model", code="model_not_found")
        return model

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str,
                           prompt_param: str) -> int:
        """Output-token limit for a prompt of `prompt_len` tokens.

        Raises:
            OpenAIError(400): prompt of max_model_len tokens or more (`context_length_exceeded`),
                requested <= 0, or prompt + requested > max_model_len.
        """
        mml = self.max_model_len
        if prompt_len >= mml:
            raise bad_request(f"This model's maximum context length is {mml} tokens. However, your prompt is "
                              f"{prompt_len} tokens, which leaves no room for completion tokens.",
                              param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return mml - prompt_len
        if requested <= 0:
            raise bad_request(f"Invalid value for '{param}': {requested}; expected an integer >= 1",
                              param=param, code="invalid_value")
        if prompt_len + requested > mml:
            raise bad_request(f"This model's maximum context length is {mml} tokens. However, you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                              f"completion). Please reduce the prompt or '{param}'.",
                              param=param, code="context_length_exceeded")
        return requested

    def per_choice_params(self, kw: dict[str, Any], n: int) -> list[Any]:
        out = []
        for i in range(n):
            k = dict(kw)
            if k.get("seed") is not None:
                k["seed"] = int(k["seed"]) + i
            out.append(self.sampling_params(k))
        return out

    @property
    def max_request_bytes(self) -> int:
        """Largest accepted request body (bytes): the setting, else derived from max_model_len."""
        limit = self.settings.max_request_bytes
        return int(limit) if limit else default_max_request_bytes(self.max_model_len)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused once it exceeds `max_request_bytes` (checked on Content-Length first,
        then while reading, so an oversized body is never held in memory or parsed).

        Raises:
            OpenAIError(413, code "request_too_large").
        """
        limit = self.max_request_bytes

        def too_large(size: str) -> OpenAIError:
            return OpenAIError(413, f"Request body too large: {size} bytes; this server accepts at most {limit} "
                                    f"bytes (--max-request-bytes)", code="request_too_large")

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Upper bound of the characters one token decodes to (byte-level vocabulary: one char per byte,
        so the longest vocabulary entry bounds it); a fallback of 128 when the tokenizer cannot tell."""
        try:
            vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
            return max(len(k) for k in vocab) or _FALLBACK_MAX_TOKEN_CHARS
        except Exception:
            return _FALLBACK_MAX_TOKEN_CHARS

    async def tokenize(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text` with the tokenizer's defaults (V4: no BOS added, `add_bos_token: false` in
        the published tokenizer_config.json; chat prompts carry BOS as text).

        A text longer than max_model_len * `max_token_chars` characters cannot fit the context and is
        refused before tokenizing. Long texts are tokenized on a worker thread with `encode_batch`, which
        releases the GIL (plain `encode` of `tokenizers` holds it), so the event loop stays responsive.

        Raises:
            OpenAIError(400): no tokenizer loaded (token-ids-only server, code "tokenizer_unavailable"),
                or a text that is certainly longer than the context (code "context_length_exceeded").
        """
        tok = self.tokenizer
        if tok is None:
            raise bad_request(f"'{param}': this server runs without a tokenizer (--skip-tokenizer-init), so "
                              f"text prompts are not supported; send token ids as 'prompt' to /v1/completions",
                              param=param, code="tokenizer_unavailable")
        mml = self.max_model_len
        if len(text) > mml * self.max_token_chars:
            raise bad_request(f"This model's maximum context length is {mml} tokens. However, your prompt has "
                              f"{len(text)} characters, more than {mml} tokens can hold.",
                              param=param, code="context_length_exceeded")
        if len(text) > _THREAD_TOKENIZE_CHARS:
            batch = getattr(tok, "encode_batch", None)
            if batch is not None:
                return list((await asyncio.to_thread(batch, [text]))[0])
            return list(await asyncio.to_thread(tok.encode, text))
        return list(tok.encode(text))

    # ---- engine plumbing ----------------------------------------------------------------------
    def _abort(self, ch: _Choice) -> None:
        if not ch.finished:
            with contextlib.suppress(Exception):
                self.engine.abort(ch.request_id)

    async def _close(self, ch: _Choice) -> None:
        self._abort(ch)
        if ch.agen is not None:
            with contextlib.suppress(BaseException):
                await ch.agen.aclose()

    def _engine_error(self, e: BaseException) -> OpenAIError:
        if isinstance(e, OpenAIError):
            return e
        if any(c.__name__ == "EngineQueueFull" for c in type(e).__mro__) or getattr(e, "status", None) == 429:
            ra = str(self.settings.retry_after_s)
            return OpenAIError(429, f"The server's waiting queue is full; retry after {ra} s. ({e})",
                               code="queue_full", headers={"Retry-After": ra})
        msg = str(e)
        if "not running" in msg or "shutting down" in msg:
            return OpenAIError(503, f"The server is shutting down or the engine is not running: {msg}",
                               code="engine_unavailable", headers={"Retry-After": str(self.settings.retry_after_s)})
        if isinstance(e, (RequestError, ValueError)) and not msg.startswith("engine failed"):
            return bad_request(msg, param=getattr(e, "param", None) or param_from_message(msg, _SAMPLING_NAMES),
                               code="invalid_value")
        return OpenAIError(500, f"The engine failed while processing the request: {type(e).__name__}: {e}",
                           code="engine_error")

    async def _prime(self, ch: _Choice, prompt_ids: list[int], params: Any) -> None:
        """Submit one engine request and wait for its first delta (admission + first token)."""
        ch.agen = self.engine.generate(prompt_ids, params, ch.request_id)
        try:
            ch.first = await ch.agen.__anext__()
        except StopAsyncIteration:
            ch.first = None
            ch.finished = True
            ch.finish_reason = ch.finish_reason or "abort"

    async def _wait_disconnect(self, request: Request) -> None:
        """Returns when the client has disconnected (ASGI `http.disconnect`)."""
        while True:
            msg = await request.receive()
            if msg.get("type") == "http.disconnect":
                return

    async def _run_or_disconnect(self, request: Request, tasks: list[asyncio.Task]) -> bool:
        """Wait for every task, or for the client to go away.

        Returns:
            True when all tasks finished; False when the client disconnected first (the tasks are
            cancelled then). The first task exception is re-raised after cancelling the others.
        """
        watcher = asyncio.ensure_future(self._wait_disconnect(request))
        pending = set(tasks)
        try:
            while pending:
                done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return False
                for t in done:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is not None:
                        for o in pending:
                            o.cancel()
                        await asyncio.gather(*pending, return_exceptions=True)
                        raise t.exception()
            return True
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher

    def _apply_delta(self, ch: _Choice, d: Any) -> tuple[list[int], str]:
        """Fold one engine delta into `ch`; returns (new token ids, new text)."""
        ids = list(getattr(d, "new_token_ids", None) or [])
        text = getattr(d, "new_text", None) or ""
        if ids:
            if ch.first_token_s is None:
                ch.first_token_s = time.perf_counter()
            ch.num_tokens += len(ids)
            ch.token_ids.extend(ids)
            self.metrics.generation_tokens.inc(len(ids))
        if text:
            ch.text.append(text)
        lps = getattr(d, "logprobs", None)
        if lps:
            ch.logprobs.extend(lps)
        if getattr(d, "error", None):
            ch.error = str(d.error)
        if getattr(d, "finished", False):
            ch.finished = True
            ch.finish_reason = getattr(d, "finish_reason", None) or "stop"
            ch.stop_reason = getattr(d, "stop_reason", None)
            self._observe(ch)
        return ids, text

    def _fold_stream_delta(self, ch: _Choice, d: Any) -> tuple[list[int], str, str | None]:
        """Streaming: fold one item of the merged delta stream into `ch`.

        Returns (new token ids, new text, an SSE error event to send instead or None): an engine
        exception becomes its OpenAI error; a choice that finished with an engine error becomes a 500
        `engine_error` event."""
        if isinstance(d, BaseException):
            return [], "", _sse(self._engine_error(d).body())
        ids, text = self._apply_delta(ch, d)
        if ch.error and ch.finished:
            return ids, text, _sse(OpenAIError(500, f"The engine failed while generating: {ch.error}",
                                               code="engine_error").body())
        return ids, text, None

    def _observe(self, ch: _Choice) -> None:
        if not ch.observed:
            ch.observed = True
            self.metrics.observe_request(arrival_s=ch.arrival_s, first_token_s=ch.first_token_s,
                                         finish_s=time.perf_counter(), num_output_tokens=ch.num_tokens)

    async def _collect(self, ch: _Choice, prompt_ids: list[int], params: Any) -> None:
        """Run one engine request to its end (non-streaming)."""
        try:
            await self._prime(ch, prompt_ids, params)
            if ch.first is not None:
                self._apply_delta(ch, ch.first)
            if not ch.finished:
                async for d in ch.agen:
                    self._apply_delta(ch, d)
                    if ch.finished:
                        break
            if not ch.finished:
                ch.finished, ch.finish_reason = True, "abort"
        finally:
            if not ch.finished:
                await self._close(ch)

    def new_choices(self, rid: str, n: int, prompt_len: int, arrival_s: float, base: int = 0) -> list[_Choice]:
        return [_Choice(index=base + i, request_id=f"{rid}-{base + i}", prompt_len=prompt_len, arrival_s=arrival_s)
                for i in range(n)]

    async def run_all(self, request: Request, jobs: list[tuple[_Choice, list[int], Any]]) -> bool:
        """Non-streaming: run every (choice, prompt_ids, params) job; False if the client left."""
        for ch, ids, _ in jobs:
            self.metrics.prompt_tokens.inc(len(ids))
        tasks = [asyncio.ensure_future(self._collect(ch, ids, sp)) for ch, ids, sp in jobs]
        try:
            ok = await self._run_or_disconnect(request, tasks)
            failed = next((ch for ch, _, _ in jobs if ch.error), None)
            if failed is not None:
                raise OpenAIError(500, f"The engine failed while generating: {failed.error}", code="engine_error")
            return ok
        except BaseException as e:
            for ch, _, _ in jobs:
                await self._close(ch)
            if isinstance(e, Exception):
                raise self._engine_error(e) from None
            raise

    async def admit_all(self, request: Request, jobs: list[tuple[_Choice, list[int], Any]]) -> bool:
        """Streaming: submit every job and wait for each first delta; False if the client left."""
        for ch, ids, _ in jobs:
            self.metrics.prompt_tokens.inc(len(ids))
        tasks = [asyncio.ensure_future(self._prime(ch, ids, sp)) for ch, ids, sp in jobs]
        try:
            ok = await self._run_or_disconnect(request, tasks)
        except BaseException as e:
            for ch, _, _ in jobs:
                await self._close(ch)
            if isinstance(e, Exception):
                raise self._engine_error(e) from None
            raise
        if not ok:
            for ch, _, _ in jobs:
                await self._close(ch)
        return ok

    def merged_deltas(self, choices: list[_Choice]) -> "_Merger":
        """Streaming: an async iterator of (choice, delta) from every admitted choice as they come,
        starting with the first deltas; its `aclose()` aborts every unfinished engine request."""
        return _Merger(self, choices)

    # ---- logprobs -----------------------------------------------------------------------------
    def _token_str(self, tid: int) -> str:
        try:
            return self.tokenizer.decode([int(tid)], skip_special_tokens=False)
        except Exception:
            return ""

    @staticmethod
    def _lp_value(v: Any) -> float:
        if isinstance(v, (int, float)):
            return float(v)
        return float(getattr(v, "logprob", v))

    def _lp_entry(self, entry: Any, tid: int) -> tuple[float | None, list[tuple[int, float]]]:
        """(logprob of the sampled token, [(token id, logprob)] best first) from one engine entry.

        Accepted entry shapes: {token_id: float | obj.logprob}, [(token_id, logprob), ...], an object with
        `.logprob` and `.top_logprobs`, or a bare float (the sampled token's logprob).
        """
        if entry is None:
            return None, []
        if isinstance(entry, (int, float)):
            return float(entry), []
        if hasattr(entry, "logprob") and not isinstance(entry, dict):
            top = getattr(entry, "top_logprobs", None) or getattr(entry, "top", None) or {}
            _, pairs = self._lp_entry(top, tid)
            return float(entry.logprob), pairs
        if isinstance(entry, dict):
            pairs = [(int(k), self._lp_value(v)) for k, v in entry.items()]
        else:
            pairs = [(int(k), self._lp_value(v)) for k, v in entry]
        pairs.sort(key=lambda kv: -kv[1])
        own = next((lp for k, lp in pairs if k == tid), None)
        return own, pairs

    def chat_logprobs(self, token_ids: list[int], entries: list[Any], top_n: int) -> list[dict]:
        """OpenAI chat `logprobs.content` items for generated tokens."""
        out = []
        for tid, entry in zip(token_ids, entries):
            own, pairs = self._lp_entry(entry, tid)
            s = self._token_str(tid)
            tops = []
            for k, lp in pairs[:top_n]:
                ks = self._token_str(k)
                tops.append({"token": ks, "logprob": lp, "bytes": list(ks.encode("utf-8"))})
            out.append({"token": s, "logprob": own,
                        "bytes": list(s.encode("utf-8")), "top_logprobs": tops})
        return out

    def _text_piece(self, tid: int, skip_special_tokens: bool) -> str:
        """What token `tid` contributes to the response text: "" for a special token that
        `skip_special_tokens` drops, else its string."""
        if skip_special_tokens:
            try:
                return self.tokenizer.decode([int(tid)], skip_special_tokens=True)
            except Exception:
                return ""
        return self._token_str(tid)

    def completion_logprobs(self, token_ids: list[int], entries: list[Any], top_n: int,
                            offset0: int, skip_special_tokens: bool = True) -> dict[str, Any]:
        """OpenAI completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset).

        `tokens[i]` is what token i contributes to `text`, so `text_offset` (characters) indexes `text`:
        a special token dropped by `skip_special_tokens` is "" there (vLLM prints its string and so
        counts characters `text` lacks); `top_logprobs` keys stay the tokens' own strings.
        """
        tokens, lps, tops, offs = [], [], [], []
        off = offset0
        for tid, entry in zip(token_ids, entries):
            own, pairs = self._lp_entry(entry, tid)
            s = self._text_piece(tid, skip_special_tokens)
            tokens.append(s)
            lps.append(own)
            tops.append({self._token_str(k): lp for k, lp in pairs[:top_n]} if top_n else None)
            offs.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


class _Merger:
    """Merges the delta streams of several choices; one pump task per choice feeds a queue.

    Items are (choice, delta) or (choice, exception) when the engine failed for that choice.
    `aclose()` is idempotent: it cancels the pumps and aborts/closes every unfinished engine request.
    """

    _DONE = object()

    def __init__(self, srv: OpenAIServer, choices: list[_Choice]) -> None:
        self.srv = srv
        self.choices = choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] | None = None
        self.active = len(choices)
        self.closed = False

    async def _pump(self, ch: _Choice) -> None:
        q = self.queue
        try:
            if ch.first is not None:
                await q.put((ch, ch.first))
                if not getattr(ch.first, "finished", False):
                    async for d in ch.agen:
                        await q.put((ch, d))
                        if getattr(d, "finished", False):
                            break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine failure: surfaced in the stream as an error event
            await q.put((ch, e))
        finally:
            q.put_nowait((ch, self._DONE))

    def __aiter__(self) -> "_Merger":
        return self

    async def __anext__(self) -> tuple[_Choice, Any]:
        if self.closed:
            raise StopAsyncIteration
        if self.tasks is None:
            self.tasks = [asyncio.ensure_future(self._pump(ch)) for ch in self.choices]
        while self.active:
            ch, item = await self.queue.get()
            if item is self._DONE:
                self.active -= 1
                if not ch.finished:
                    ch.finished, ch.finish_reason = True, ch.finish_reason or "abort"
                    self.srv._observe(ch)
                continue
            return ch, item
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tasks:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for ch in self.choices:
            await self.srv._close(ch)


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` once the response ends, however it ends
    (finished, client disconnect, or cancelled before the body started)."""

    def __init__(self, content: Any, on_close: Callable[[], Any], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def build_app(engine: Any, settings: ServerSettings | None = None, *, chat_format: Any = None,
              sampling_params_cls: Any = None) -> FastAPI:
    """The FastAPI app serving `engine` with OpenAI's API.

    Args:
        engine: object implementing the AsyncEngine contract (start, shutdown, generate, abort, stats,
            tokenizer, config, max_model_len).
        settings: ServerSettings (served model names, API key, thinking default, drain timeout).
        chat_format: chat encoder/parser (default: DeepSeek-V4's, from parity.tokenizer).
        sampling_params_cls: SamplingParams class (default: parity.engine.SamplingParams).
    Returns:
        a FastAPI app; its lifespan starts the engine and, at shutdown, drains it for up to
        `settings.drain_timeout_s` seconds.
    """
    settings = settings or ServerSettings()
    srv = OpenAIServer(engine, settings, chat_format=chat_format, sampling_params_cls=sampling_params_cls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.manage_engine:
            await engine.start()
        await asyncio.to_thread(lambda: srv.max_token_chars)  # ~0.1 s vocabulary scan, off the request path
        try:
            yield
        finally:
            if settings.manage_engine:
                await engine.shutdown(drain_timeout_s=settings.drain_timeout_s)

    app = FastAPI(title="parity", description="OpenAI-compatible DeepSeek-V4 server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = srv

    def error_response(e: OpenAIError, endpoint: str | None = None) -> JSONResponse:
        if endpoint:
            srv.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"Unknown route {request.method} {request.url.path}",
               405: f"Method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(OpenAIError(e.status_code, msg).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> Response:
        """200 {"status": "ok"} while the engine runs; 503 when its loop has stopped or it reports an error."""
        if getattr(engine, "errored", False):
            return JSONResponse({"status": "error"}, status_code=503)
        if settings.manage_engine and getattr(engine, "running", True) is False:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": srv.created, "owned_by": "parity",
                "root": settings.model_root or name, "parent": None, "max_model_len": srv.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        srv.check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in settings.served_model_names]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        srv.check_auth(request)
        if model_id not in settings.served_model_names:
            raise OpenAIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    async def guarded(endpoint: str, request: Request, handler: Callable) -> Response:
        """Auth, error shaping and request accounting around a generation handler."""
        srv.metrics.in_flight.inc()
        streaming = False
        try:
            srv.check_auth(request)
            resp = await handler(request)
            if isinstance(resp, StreamingResponse):
                streaming = True  # the stream body decrements in_flight and counts the status
            elif resp is not None:
                srv.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
            return resp
        except OpenAIError as e:
            return error_response(e, endpoint)
        except ParityError as e:  # chat encoding errors and other named input errors
            return error_response(bad_request(str(e), param=getattr(e, "param", None)), endpoint)
        except Exception as e:  # a bug: answer 500 with the cause, keep serving, log the traceback
            log.exception("unhandled error in %s", endpoint)
            return error_response(OpenAIError(500, f"Internal server error: {type(e).__name__}: {e}"), endpoint)
        finally:
            if not streaming:
                srv.metrics.in_flight.dec()

    def stream_response(endpoint: str, body: AsyncIterator[str], merger: _Merger) -> StreamingResponse:
        state = {"status": "499", "done": False}

        async def wrapped():
            async for chunk in body:
                yield chunk
            state["status"] = "200"

        async def on_close() -> None:
            if state["done"]:
                return
            state["done"] = True
            await merger.aclose()
            srv.metrics.requests.labels(endpoint, state["status"]).inc()
            srv.metrics.in_flight.dec()

        return _SSEResponse(wrapped(), on_close, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- chat ---------------------------------------------------------------------------------
    async def chat_handler(request: Request) -> Response:
        arrival = time.perf_counter()
        req: P.ChatCompletionRequest = P.parse_body(await srv.read_body(request), P.ChatCompletionRequest)
        model = srv.check_model(req.model)
        P.unsupported_fields(req)
        P.check_n(req.n)
        thinking = P.thinking_enabled(req, settings.default_thinking)
        tools, tools_enabled = _chat_tools(req)
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= 20:
                raise bad_request(f"Invalid value for 'top_logprobs': {req.top_logprobs}; expected 0..20",
                                  param="top_logprobs", code="invalid_value")
            if not req.logprobs:
                raise bad_request("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        messages = [_message_dict(m, i) for i, m in enumerate(req.messages)]
        try:
            prompt = srv.chat_format.encode(messages, tools if tools_enabled else None, thinking,
                                            req.reasoning_effort)
        except (ParityError, ValueError, TypeError, KeyError) as e:
            msg = str(e)
            raise bad_request(msg, param=getattr(e, "param", None) or param_from_message(msg, ("reasoning_effort",)),
                              code="invalid_value") from None
        prompt_ids = await srv.tokenize(prompt, "messages")
        if req.max_completion_tokens is not None:
            mt, mt_name = req.max_completion_tokens, "max_completion_tokens"
        else:
            mt, mt_name = req.max_tokens, "max_tokens"
        max_tokens = srv.resolve_max_tokens(mt, len(prompt_ids), mt_name, "messages")
        kw = P.sampling_kwargs(req, max_tokens=max_tokens, logprobs=top_n, vocab_size=srv.vocab_size)
        params = srv.per_choice_params(kw, req.n)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        choices = srv.new_choices(rid, req.n, len(prompt_ids), arrival)
        jobs = [(ch, prompt_ids, sp) for ch, sp in zip(choices, params)]
        created = _now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")

        if not req.stream:
            if not await srv.run_all(request, jobs):
                return Response(status_code=499)
            out_choices = []
            for ch in choices:
                text = "".join(ch.text)
                content, reasoning, calls = srv.chat_format.parse(text, thinking, tools_enabled)
                finish = ch.finish_reason
                if calls and finish == "stop":
                    finish = "tool_calls"
                msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
                if reasoning is not None:
                    msg["reasoning_content"] = reasoning
                if calls:
                    msg["tool_calls"] = calls
                lp = ({"content": srv.chat_logprobs(ch.token_ids, ch.logprobs, top_n or 0)}
                      if top_n is not None else None)
                out_choices.append({"index": ch.index, "message": msg, "logprobs": lp, "finish_reason": finish,
                                    "stop_reason": ch.stop_reason})
            completion = sum(c.num_tokens for c in choices)
            return JSONResponse(_envelope(rid, "chat.completion", created, model, out_choices,
                                          _usage(len(prompt_ids), completion)))

        if not await srv.admit_all(request, jobs):
            return Response(status_code=499)

        merger = srv.merged_deltas(choices)

        async def body() -> AsyncIterator[str]:
            def chunk(choice_list: list[dict], usage: Any = None) -> str:
                return _sse(_envelope(rid, "chat.completion.chunk", created, model, choice_list, usage, include_usage))

            parsers = {ch.index: srv.chat_format.stream_parser(thinking, tools_enabled) for ch in choices}
            seen_calls: dict[int, dict[int, str]] = {ch.index: {} for ch in choices}
            pending_lp: dict[int, list[dict]] = {ch.index: [] for ch in choices}
            for ch in choices:
                yield chunk([{"index": ch.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])

            def delta_chunks(ch: _Choice, parsed: list[dict]) -> list[str]:
                out = []
                for item in parsed:
                    delta = _chat_delta(item, seen_calls[ch.index])
                    if delta is None:
                        continue
                    c = {"index": ch.index, "delta": delta, "logprobs": None, "finish_reason": None}
                    if pending_lp[ch.index]:
                        c["logprobs"] = {"content": pending_lp[ch.index]}
                        pending_lp[ch.index] = []
                    out.append(chunk([c]))
                return out

            async for ch, d in merger:
                ids, text, err = srv._fold_stream_delta(ch, d)
                if err is not None:
                    yield err
                    continue
                if top_n is not None and ids:
                    lps = getattr(d, "logprobs", None) or []
                    pending_lp[ch.index].extend(srv.chat_logprobs(ids, lps, top_n))
                for s in delta_chunks(ch, parsers[ch.index].feed(text) if text else []):
                    yield s
                if ch.finished:
                    for s in delta_chunks(ch, parsers[ch.index].finish()):
                        yield s
                    finish = ch.finish_reason
                    if seen_calls[ch.index] and finish == "stop":
                        finish = "tool_calls"
                    c = {"index": ch.index, "delta": {}, "logprobs": None, "finish_reason": finish}
                    if pending_lp[ch.index]:
                        c["logprobs"] = {"content": pending_lp[ch.index]}
                        pending_lp[ch.index] = []
                    yield chunk([c])
            if include_usage:
                completion = sum(c.num_tokens for c in choices)
                yield chunk([], {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                                 "total_tokens": len(prompt_ids) + completion})
            yield "data: [DONE]\n\n"

        return stream_response("chat", body(), merger)

    # ---- completions --------------------------------------------------------------------------
    async def completions_handler(request: Request) -> Response:
        """`POST /v1/completions`. With `echo`, `text` starts with the prompt; `logprobs` then still covers
        only the generated tokens (no prompt-token logprobs, unlike vLLM; see the module docstring)."""
        arrival = time.perf_counter()
        req: P.CompletionRequest = P.parse_body(await srv.read_body(request), P.CompletionRequest)
        model = srv.check_model(req.model)
        P.unsupported_fields(req)
        P.check_n(req.n)
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise bad_request(f"Invalid value for 'logprobs': {req.logprobs}; expected 0..5", param="logprobs",
                              code="invalid_value")
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        prompts = await _completion_prompts(srv, req.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs: list[tuple[_Choice, list[int], Any]] = []
        echo_text: dict[int, str] = {}
        for pi, (ptext, ids) in enumerate(prompts):
            pparam = "prompt" if len(prompts) == 1 else f"prompt.{pi}"
            max_tokens = srv.resolve_max_tokens(req.max_tokens, len(ids), "max_tokens", pparam)
            kw = P.sampling_kwargs(req, max_tokens=max_tokens, logprobs=req.logprobs, vocab_size=srv.vocab_size)
            params = srv.per_choice_params(kw, req.n)
            for ch, sp in zip(srv.new_choices(rid, req.n, len(ids), arrival, base=pi * req.n), params):
                jobs.append((ch, ids, sp))
                if req.echo:
                    if ptext is None and srv.tokenizer is None:
                        raise bad_request("'echo' of a token-id prompt needs a tokenizer; this server runs "
                                          "without one (--skip-tokenizer-init)", param="echo",
                                          code="tokenizer_unavailable")
                    echo_text[ch.index] = ptext if ptext is not None else srv.tokenizer.decode(ids)
        choices = [j[0] for j in jobs]
        # usage.prompt_tokens: each prompt once, however many choices (n) it has (as OpenAI and vLLM).
        prompt_total = sum(len(ids) for _, ids in prompts)
        created = _now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def lp_obj(ch: _Choice, ids: list[int], entries: list[Any], offset0: int) -> dict | None:
            if req.logprobs is None:
                return None
            return srv.completion_logprobs(ids, entries, req.logprobs, offset0, req.skip_special_tokens)

        if not req.stream:
            if not await srv.run_all(request, jobs):
                return Response(status_code=499)
            out = []
            for ch in choices:
                prefix = echo_text.get(ch.index, "")
                text = prefix + "".join(ch.text)
                out.append({"index": ch.index, "text": text,
                            "logprobs": lp_obj(ch, ch.token_ids, ch.logprobs, len(prefix)),
                            "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason})
            completion = sum(c.num_tokens for c in choices)
            return JSONResponse(_envelope(rid, "text_completion", created, model, out,
                                          _usage(prompt_total, completion)))

        if not await srv.admit_all(request, jobs):
            return Response(status_code=499)

        merger = srv.merged_deltas(choices)

        async def body() -> AsyncIterator[str]:
            def chunk(choice_list: list[dict], usage: Any = None) -> str:
                return _sse(_envelope(rid, "text_completion", created, model, choice_list, usage, include_usage))

            offsets = {ch.index: 0 for ch in choices}
            for ch in choices:
                if ch.index in echo_text:
                    offsets[ch.index] = len(echo_text[ch.index])
                    yield chunk([{"index": ch.index, "text": echo_text[ch.index], "logprobs": None,
                                  "finish_reason": None}])
            async for ch, d in merger:
                ids, text, err = srv._fold_stream_delta(ch, d)
                if err is not None:
                    yield err
                    continue
                if not text and not ids and not ch.finished:
                    continue
                lps = getattr(d, "logprobs", None) or []
                c = {"index": ch.index, "text": text, "logprobs": lp_obj(ch, ids, lps, offsets[ch.index]) if ids else None,
                     "finish_reason": ch.finish_reason if ch.finished else None}
                if ch.finished:
                    c["stop_reason"] = ch.stop_reason
                offsets[ch.index] += len(text)
                yield chunk([c])
            if include_usage:
                completion = sum(c.num_tokens for c in choices)
                yield chunk([], {"prompt_tokens": prompt_total, "completion_tokens": completion,
                                 "total_tokens": prompt_total + completion})
            yield "data: [DONE]\n\n"

        return stream_response("completions", body(), merger)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await guarded("chat", request, chat_handler)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await guarded("completions", request, completions_handler)

    return app


def _chat_tools(req: P.ChatCompletionRequest) -> tuple[list[dict] | None, bool]:
    """(tool definitions as dicts, whether tool calls are parsed) from `tools` / `tool_choice`.

    `tool_choice` "auto" (default with tools) and "none" (tools hidden from the prompt, as vLLM does) are
    supported; "required" and a named function need constrained decoding, which parity does not have:
    400 naming `tool_choice`.
    """
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if choice is None:
        return tools, bool(tools)
    if choice == "none":
        return None, False
    if choice == "auto":
        if not tools:
            raise bad_request("'tool_choice' is set but no 'tools' are given", param="tool_choice")
        return tools, True
    if choice == "required" or isinstance(choice, dict):
        raise bad_request("tool_choice 'required' or a named function is not supported by parity (it needs "
                          "constrained decoding); use 'auto' or 'none'", param="tool_choice",
                          code="unsupported_parameter")
    raise bad_request(f"Invalid value for 'tool_choice': {choice!r}; expected 'auto' or 'none'",
                      param="tool_choice", code="invalid_value")


def _message_dict(m: P.ChatMessage, index: int) -> dict[str, Any]:
    """An OpenAI message as the plain dict `encode_chat` takes; text parts are joined."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{index}].content[{j}]: only 'text' content parts are supported "
                                  f"(got type {part.type!r})", param=f"messages.{index}.content.{j}.type",
                                  code="unsupported_parameter")
            texts.append(part.text)
        content = "".join(texts)
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for tc in m.tool_calls:
            args = tc.function.arguments
            calls.append({"id": tc.id, "type": "function",
                          "function": {"name": tc.function.name,
                                       "arguments": args if isinstance(args, str) else json.dumps(args)}})
        d["tool_calls"] = calls
    return d


def _chat_delta(item: dict[str, Any], seen: dict[int, str]) -> dict[str, Any] | None:
    """An OpenAI chat `delta` from one streaming-parser item; `seen` maps tool-call index -> id."""
    if "content" in item:
        return {"content": item["content"]} if item["content"] else None
    if "reasoning_content" in item:
        return {"reasoning_content": item["reasoning_content"]} if item["reasoning_content"] else None
    if "tool_call" in item:
        tc = item["tool_call"]
        idx = int(tc.get("index", 0))
        entry: dict[str, Any] = {"index": idx}
        fn: dict[str, Any] = {}
        if idx not in seen:
            seen[idx] = tc.get("id") or ("call_" + uuid.uuid4().hex[:24])
            entry["id"] = seen[idx]
            entry["type"] = "function"
            fn["name"] = tc.get("name") or ""
        args = tc.get("arguments")
        if args:
            fn["arguments"] = args if isinstance(args, str) else json.dumps(args)
        elif "name" in fn:
            fn["arguments"] = ""
        if not fn:
            return None
        entry["function"] = fn
        return {"tool_calls": [entry]}
    return None


async def _completion_prompts(srv: OpenAIServer, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """[(prompt text or None, token ids)] for each prompt of a completions request.

    Strings are tokenized as the offline `LLM.generate` does (tokenizer defaults); token-id prompts are
    taken as given and checked against the vocabulary.

    Raises:
        OpenAIError(400) naming `prompt` (empty prompt, token id outside [0, vocab_size)).
    """
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("'prompt' must not be empty", param="prompt")
    out = []
    vocab = srv.vocab_size
    for i, it in enumerate(items):
        name = "prompt" if len(items) == 1 else f"prompt.{i}"
        if isinstance(it, str):
            if not it:
                raise bad_request(f"'{name}' must not be empty", param=name)
            out.append((it, await srv.tokenize(it, name)))
        else:
            if not it:
                raise bad_request(f"'{name}' must not be empty", param=name)
            bad = None
            if min(it) < 0 or max(it) >= vocab:  # C-speed scan first: token-id prompts can be long
                bad = next((t for t in it if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"'{name}' holds token id {bad}, outside [0, {vocab})", param=name,
                                  code="invalid_value")
            out.append((None, list(it)))
    return out
