"""`AsyncEngine`: the engine on its own thread, streamed to asyncio callers (the server's interface).

The model loop runs on a dedicated thread, so the event loop never waits for model compute.
Callers talk to it through a command queue (add / abort), executed by the engine thread between steps;
deltas come back through one `asyncio.Queue` per request, all of a step's deltas in one
`loop.call_soon_threadsafe` per event loop (one wake-up of the loop per step, not per token).
Closing or cancelling the `generate` async generator aborts the request and frees its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from parity.engine.args import EngineArgs
from parity.engine.llm_engine import EngineQueueFull, LLMEngine
from parity.engine.outputs import StreamDelta
from parity.engine.sampling_params import SamplingParams
from parity.errors import RequestError

log = logging.getLogger("parity.engine")

#: Seconds the idle engine thread sleeps between checks for commands (it is woken at once on a command).
IDLE_POLL_S = 0.05


class AsyncEngine:
    """Asyncio front of `LLMEngine` (model loaded in the constructor).

    Args:
        args: EngineArgs (default EngineArgs()).
        model / tokenizer: optional prebuilt objects (tests), as for LLMEngine.
        intra_op_threads: torch intra-op threads of the engine thread while it runs (None = leave the
            process setting; the previous value is restored when the thread stops).
    Attributes:
        tokenizer, config (ModelConfig), max_model_len (tokens), engine (the LLMEngine),
        intra_op_threads (settable before `start`).
    """

    def __init__(
        self, args: EngineArgs | None = None, model=None, tokenizer="auto", intra_op_threads: int | None = None
    ):
        self.engine = LLMEngine(args or EngineArgs(), model=model, tokenizer=tokenizer)
        self.args = self.engine.args
        self.intra_op_threads = intra_op_threads
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = False
        self._error: BaseException | None = None
        self._failure: BaseException | None = None  # unrecoverable (mark_failed)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def errored(self) -> bool:
        """True once `mark_failed` was called (``/health`` answers 503)."""
        return self._failure is not None

    def mark_failed(self, error: BaseException) -> None:
        """Record a failure found outside the engine thread (a dead rank): `errored` from now on and new
        requests refused; in-flight ones fail at their next step. Thread-safe."""
        if self._failure is None:
            self._failure = error
        self._accepting = False

    def stats(self) -> dict:
        """num_running, num_waiting, cache_used_bytes, cache_total_bytes, token counters, ..."""
        return self.engine.stats()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self.running:
            return
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="parity-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting requests, let in-flight ones finish for up to `drain_timeout_s` seconds,
        abort the rest, and stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while self._streams and time.monotonic() < deadline and self.running:
            await asyncio.sleep(0.02)
        for rid in list(self._streams):
            self.abort(rid)
        if self._streams and self.running:
            t_end = time.monotonic() + 2.0
            while self._streams and time.monotonic() < t_end:
                await asyncio.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._thread = None

    # ------------------------------------------------------------------ engine thread
    def _post(self, fn: Callable[[], Any]) -> None:
        self._cmds.put(fn)
        self._wake.set()

    def _dispatch(self, deltas: list[StreamDelta]) -> None:
        """Hand a step's deltas to their streams: one thread-safe call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for d in deltas:
            s = self._streams.get(d.request_id)
            if s is not None:
                by_loop.setdefault(s[0], []).append((s[1], d))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass

    def _loop(self) -> None:
        saved = None
        if self.intra_op_threads is not None:
            saved = torch.get_num_threads()
            torch.set_num_threads(self.intra_op_threads)
        try:
            self._run()
        finally:
            if saved is not None:
                torch.set_num_threads(saved)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            try:
                while True:
                    try:
                        fn = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    fn()
                if eng.has_unfinished() or eng._pending:
                    self._dispatch(eng.step())
                else:
                    self._wake.wait(IDLE_POLL_S)
                    self._wake.clear()
            except BaseException as e:  # never die silently: fail every open stream
                log.exception("engine loop failed")
                self._error = e
                for rid, (loop, q) in list(self._streams.items()):
                    try:
                        loop.call_soon_threadsafe(q.put_nowait, e)
                    except RuntimeError:
                        pass
                    try:
                        eng.abort(rid)
                    except Exception:
                        pass
                eng._pending.clear()

    # ------------------------------------------------------------------ requests
    async def _call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def run():
            try:
                res = fn()
            except BaseException as e:
                err = e
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))
            else:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))

        self._post(run)
        return await fut

    async def generate(
        self,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Stream the deltas of one request.

        Args:
            prompt_token_ids: prompt ids (or None with `prompt` text); params: SamplingParams;
            request_id: unique id (default: generated).
        Yields:
            StreamDelta per completion per step that produced output; the last one has request_finished.
        Raises:
            RequestError: invalid request (named parameter), engine not started / shutting down;
            EngineQueueFull: max_waiting requests already waiting.
        """
        if self._failure is not None:
            raise RequestError(f"engine is not running: {self._failure}")
        if not self._accepting or not self.running:
            raise RequestError("engine is not running (not started or shutting down): retry later")
        loop = asyncio.get_running_loop()
        if request_id is None:
            request_id = f"areq-{id(object())}-{time.monotonic_ns()}"
        request_id = str(request_id)
        if request_id in self._streams:
            raise RequestError(f"parameter 'request_id' {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        arrival = time.monotonic()
        params = (params or SamplingParams()).clone()
        try:
            await self._call(
                lambda: self.engine.add_request(
                    prompt_token_ids, params, request_id, prompt=prompt, arrival_time=arrival
                )
            )
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        last: StreamDelta | None = None
        try:
            while True:
                d = await q.get()
                if d is _ABORTED:  # `abort` ends the stream now, not when the engine's current step ends
                    d = _aborted_delta(request_id, last)
                if isinstance(d, BaseException):
                    raise RequestError(f"engine failed: {d}")
                last = d
                if d.request_finished:
                    finished = True
                yield d
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on ("engine is not running": HTTP 503); in-flight ones continue."""
        self._accepting = False

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once): its stream ends at once with finish_reason "abort"
        (also while the engine thread is inside a long step); its cache is freed by the engine thread."""
        rid = str(request_id)
        stream = self._streams.get(rid)
        if stream is not None:
            loop, q = stream
            with contextlib.suppress(RuntimeError):  # the stream's loop is already closed
                loop.call_soon_threadsafe(q.put_nowait, _ABORTED)

        def run():
            self.engine.abort(rid)

        self._post(run)


#: Queued by `AsyncEngine.abort`: the stream ends with an "abort" delta without waiting for the engine thread.
_ABORTED = object()


def _aborted_delta(request_id: str, last: StreamDelta | None) -> StreamDelta:
    """The final "abort" delta of a stream ended by `AsyncEngine.abort` (counts and metrics as of ``last``)."""
    return StreamDelta(
        request_id=request_id,
        index=last.index if last is not None else 0,
        new_token_ids=[],
        new_text="",
        finished=True,
        finish_reason="abort",
        stop_reason=None,
        request_finished=True,
        logprobs=None,
        num_prompt_tokens=last.num_prompt_tokens if last is not None else 0,
        num_output_tokens=last.num_output_tokens if last is not None else 0,
        metrics=last.metrics if last is not None else None,
    )


def _deliver(items: list[tuple[asyncio.Queue, StreamDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


__all__ = ["AsyncEngine", "EngineQueueFull"]
