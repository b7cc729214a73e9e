"""The engine requests of one HTTP request: one `Choice` per `choices[i]`, run to the end or streamed merged.

`n` > 1 is served as n engine requests with the same prompt (seed + i for choice i when a seed is given),
batched together by the engine.

A request is admitted (first delta received, which surfaces a full waiting queue as 429 and engine
validation as 400) before the response starts, so errors are proper HTTP statuses rather than mid-stream
events. While waiting for that first delta, and for the whole of a non-streaming request, a watcher awaits
the ASGI `http.disconnect` message; once streaming, Starlette's StreamingResponse cancels the body on
disconnect. Either way every engine request of the HTTP request is aborted (`engine.abort`) and its
generator closed, which frees its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from parity.errors import RequestError
from parity.server.engine_client import EngineClient, EngineDelta
from parity.server.errors import SAMPLING_PARAM_NAMES, OpenAIError, bad_request, param_from_message
from parity.server.metrics import ServerMetrics
from parity.server.settings import ServerSettings
from parity.server.sse import sse_event


@dataclass
class Choice:
    """Bookkeeping of one engine request (one `choices[i]`); times are `time.perf_counter()` seconds."""

    index: int
    request_id: str
    prompt_len: int
    arrival_s: float
    agen: AsyncIterator[EngineDelta] | None = None
    first: EngineDelta | None = None
    first_token_s: float | None = None
    num_tokens: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None  # per prompt token (entry 0 None), when the request scores its prompt
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: Any = None
    error: str | None = None
    observed: bool = False
    cached_tokens: int = 0


#: One engine request to run: (its choice, prompt token ids, its SamplingParams).
Job = tuple[Choice, list[int], Any]


class ChoiceRunner:
    """Submits, folds, aborts and accounts the engine requests of HTTP requests; one per app.

    Args:
        engine: the EngineClient.
        metrics: ServerMetrics counting prompt/generation tokens and per-request latencies.
        settings: ServerSettings (`retry_after_s` of 429/503 answers).
    """

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, settings: ServerSettings) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.live: dict[str, Choice] = {}  # request_id -> running choice
        self.cut_off = False

    def cut_off_all(self) -> int:
        """The drain timeout ran out: abort every running choice; each answers 503 `server_shutting_down`
        (a JSON error, or an error chunk before `[DONE]`). Returns how many were aborted."""
        self.cut_off = True
        live = list(self.live.values())
        for ch in live:
            self._abort(ch)
        return len(live)

    def shutdown_error(self) -> OpenAIError:
        """503 for a request cut off by the end of the drain (or arriving while the server drains)."""
        return OpenAIError(
            503,
            "The server is shutting down: the request was aborted when the drain timeout "
            "(--drain-timeout) ran out; retry on another server or later",
            code="server_shutting_down",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    @staticmethod
    def new_choices(rid: str, n: int, prompt_len: int, arrival_s: float, base: int = 0) -> list[Choice]:
        """`n` choices with indices base..base+n-1 and engine request ids "<rid>-<index>"."""
        return [
            Choice(index=base + i, request_id=f"{rid}-{base + i}", prompt_len=prompt_len, arrival_s=arrival_s)
            for i in range(n)
        ]

    # ---- engine plumbing ----------------------------------------------------------------------
    def _abort(self, ch: Choice) -> None:
        if not ch.finished:
            with contextlib.suppress(Exception):
                self.engine.abort(ch.request_id)

    async def close(self, ch: Choice) -> None:
        """Abort `ch` unless it finished, and close its delta generator (frees its cache)."""
        self._abort(ch)
        self.live.pop(ch.request_id, None)
        if ch.agen is not None:
            with contextlib.suppress(BaseException):
                await ch.agen.aclose()

    def engine_error(self, e: BaseException) -> OpenAIError:
        """The OpenAI error for an engine exception: 429 `queue_full`, 503 `engine_unavailable`, 400 naming
        the parameter of an invalid request, else 500 `engine_error`."""
        if isinstance(e, OpenAIError):
            return e
        if any(c.__name__ == "EngineQueueFull" for c in type(e).__mro__) or getattr(e, "status", None) == 429:
            ra = str(self.settings.retry_after_s)
            return OpenAIError(
                429,
                f"The server's waiting queue is full; retry after {ra} s. ({e})",
                code="queue_full",
                headers={"Retry-After": ra},
            )
        msg = str(e)
        if "not running" in msg or "shutting down" in msg:
            return OpenAIError(
                503,
                f"The server is shutting down or the engine is not running: {msg}",
                code="engine_unavailable",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        if isinstance(e, (RequestError, ValueError)) and not msg.startswith("engine failed"):
            return bad_request(
                msg,
                param=getattr(e, "param", None) or param_from_message(msg, SAMPLING_PARAM_NAMES),
                code="invalid_value",
            )
        return OpenAIError(
            500, f"The engine failed while processing the request: {type(e).__name__}: {e}", code="engine_error"
        )

    async def _prime(self, ch: Choice, prompt_ids: list[int], params: Any) -> None:
        """Submit one engine request and wait for its first delta (admission + first token)."""
        self.live[ch.request_id] = ch
        ch.agen = self.engine.generate(prompt_ids, params, ch.request_id)
        try:
            ch.first = await ch.agen.__anext__()
        except StopAsyncIteration:
            ch.first = None
            ch.finished = True
            ch.finish_reason = ch.finish_reason or "abort"

    @staticmethod
    async def _wait_disconnect(request: Request) -> None:
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

    def _apply_delta(self, ch: Choice, d: EngineDelta) -> tuple[list[int], str]:
        """Fold one engine delta into `ch`; returns (new token ids, new text)."""
        ids = list(getattr(d, "new_token_ids", None) or [])
        text = getattr(d, "new_text", None) or ""
        ch.cached_tokens = max(ch.cached_tokens, int(getattr(d, "num_cached_tokens", 0) or 0))
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
        plps = getattr(d, "prompt_logprobs", None)
        if plps is not None:
            ch.prompt_logprobs = list(plps)
        if getattr(d, "error", None):
            ch.error = str(d.error)
        if getattr(d, "finished", False):
            self.live.pop(ch.request_id, None)
            ch.finished = True
            ch.finish_reason = getattr(d, "finish_reason", None) or "stop"
            ch.stop_reason = getattr(d, "stop_reason", None)
            self.observe(ch)
        return ids, text

    def fold_stream_delta(self, ch: Choice, d: EngineDelta | BaseException) -> tuple[list[int], str, str | None]:
        """Streaming: fold one item of the merged delta stream into `ch`.

        Returns (new token ids, new text, an SSE error event to send instead or None): an engine
        exception becomes its OpenAI error; a choice that finished with an engine error becomes a 500
        `engine_error` event."""
        if isinstance(d, BaseException):
            return [], "", sse_event(self.engine_error(d).body())
        ids, text = self._apply_delta(ch, d)
        if self.cut_off and ch.finished and ch.finish_reason == "abort":
            return ids, text, sse_event(self.shutdown_error().body())
        if ch.error and ch.finished:
            return (
                ids,
                text,
                sse_event(
                    OpenAIError(500, f"The engine failed while generating: {ch.error}", code="engine_error").body()
                ),
            )
        return ids, text, None

    def observe(self, ch: Choice) -> None:
        """Record `ch`'s latencies in the metrics, once."""
        if not ch.observed:
            ch.observed = True
            self.metrics.observe_request(
                arrival_s=ch.arrival_s,
                first_token_s=ch.first_token_s,
                finish_s=time.perf_counter(),
                num_output_tokens=ch.num_tokens,
            )

    async def _collect(self, ch: Choice, prompt_ids: list[int], params: Any) -> None:
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
                await self.close(ch)

    async def run_all(self, request: Request, jobs: list[Job]) -> bool:
        """Non-streaming: run every job to its end; False if the client left.

        Raises:
            OpenAIError: the engine refused or failed a job (see `engine_error`); every job is closed then.
        """
        for _ch, ids, _ in jobs:
            self.metrics.prompt_tokens.inc(len(ids))
        tasks = [asyncio.ensure_future(self._collect(ch, ids, sp)) for ch, ids, sp in jobs]
        try:
            ok = await self._run_or_disconnect(request, tasks)
            if self.cut_off and any(ch.finish_reason == "abort" for ch, _, _ in jobs):
                raise self.shutdown_error()
            failed = next((ch for ch, _, _ in jobs if ch.error), None)
            if failed is not None:
                raise OpenAIError(500, f"The engine failed while generating: {failed.error}", code="engine_error")
            return ok
        except BaseException as e:
            for ch, _, _ in jobs:
                await self.close(ch)
            if isinstance(e, Exception):
                raise self.engine_error(e) from None
            raise

    async def admit_all(self, request: Request, jobs: list[Job]) -> bool:
        """Streaming: submit every job and wait for each first delta; False if the client left.

        Raises:
            OpenAIError: the engine refused a job (429 queue full, 400 invalid, ...); every job is closed then.
        """
        for _ch, ids, _ in jobs:
            self.metrics.prompt_tokens.inc(len(ids))
        tasks = [asyncio.ensure_future(self._prime(ch, ids, sp)) for ch, ids, sp in jobs]
        try:
            ok = await self._run_or_disconnect(request, tasks)
        except BaseException as e:
            for ch, _, _ in jobs:
                await self.close(ch)
            if isinstance(e, Exception):
                raise self.engine_error(e) from None
            raise
        if not ok:
            for ch, _, _ in jobs:
                await self.close(ch)
        return ok

    def merged_deltas(self, choices: list[Choice]) -> ChoiceMerger:
        """Streaming: an async iterator of (choice, delta) from every admitted choice as they come,
        starting with the first deltas; its `aclose()` aborts every unfinished engine request."""
        return ChoiceMerger(self, choices)


class ChoiceMerger:
    """Merges the delta streams of several choices; one pump task per choice feeds a queue.

    Items are (choice, delta) or (choice, exception) when the engine failed for that choice.
    `aclose()` is idempotent: it cancels the pumps and aborts/closes every unfinished engine request.
    """

    _DONE = object()

    def __init__(self, runner: ChoiceRunner, choices: list[Choice]) -> None:
        self.runner = runner
        self.choices = choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] | None = None
        self.active = len(choices)
        self.closed = False

    async def _pump(self, ch: Choice) -> None:
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

    def __aiter__(self) -> ChoiceMerger:
        return self

    async def __anext__(self) -> tuple[Choice, EngineDelta | BaseException]:
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
                    self.runner.observe(ch)
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
            await self.runner.close(ch)
