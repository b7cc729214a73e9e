"""`OpenAIServing`: the request skeleton every generation endpoint shares, written once.

`create()` runs the endpoint's checks (`prepare`), then either runs every choice to its end and answers one
JSON body, or admits every choice and answers a server-sent-event stream of the merged choices (the first
chunks, one or more chunks per engine delta, the usage chunk when `stream_options.include_usage`, `[DONE]`;
with `stream_options.continuous_usage_stats` every chunk carries the cumulative `usage`).
A client that disconnects before the answer starts gets status 499 (as nginx logs it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from parity.server import request_options as R
from parity.server.choices import Choice, ChoiceMerger, Job
from parity.server.engine_client import EngineDelta
from parity.server.sse import SSE_DONE, SSEResponse, sse_event
from parity.server.state import OpenAIServer


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI `usage` object (token counts; `prompt_tokens_details.cached_tokens`: prompt tokens served
    from the prefix cache)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(
    rid: str, obj: str, created: int, model: str, choices: list[dict], usage: Any = None, with_usage: bool = True
) -> dict:
    """The OpenAI response / stream-chunk envelope shared by chat and text completions; `usage` is
    included when `with_usage` (always for whole responses, per `stream_options.include_usage` for chunks)."""
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "system_fingerprint": None}
    if with_usage:
        out["usage"] = usage
    return out


@dataclass
class Generation:
    """One checked request, ready to run: its choices and what its envelope reports.

    Attributes:
        rid: response id; model: the reported model name; created: Unix time (s).
        choices / jobs: the engine requests (`jobs[i]` = (choices[i], prompt ids, SamplingParams)).
        prompt_tokens: `usage.prompt_tokens` (each prompt once, however many choices it has).
        stream: answer with server-sent events; include_usage: streams end with a usage chunk.
        continuous_usage: every stream chunk carries the cumulative `usage` so far
            (`stream_options.continuous_usage_stats`, vLLM's extension).
    """

    rid: str
    model: str
    created: int
    choices: list[Choice]
    jobs: list[Job]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool = False

    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict:
        """The OpenAI `usage` object of the request so far."""
        return usage(self.prompt_tokens, self.completion_tokens(), self.cached_tokens())

    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, each prompt once (the best of its choices)."""
        best: dict[int, int] = {}
        for ch, ids, _ in self.jobs:
            best[id(ids)] = max(best.get(id(ids), 0), ch.cached_tokens)
        return sum(best.values())


class OpenAIServing:
    """Base of one generation endpoint; subclasses fill in the hooks below.

    Class attributes:
        endpoint: label of the endpoint in the request metrics ("chat", "completions").
        request_cls: the pydantic model of the request body.
        response_object / chunk_object: the `object` field of a whole response / of a stream chunk.
    """

    endpoint: str
    request_cls: type[BaseModel]
    response_object: str
    chunk_object: str

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server

    def check_common(self, request: Any) -> str:
        """The checks every generation endpoint makes first: served model, unsupported fields, `n`.

        Returns:
            The served model name the request asked for.
        Raises:
            OpenAIError: 404 unknown model (`model_not_found`), 400 unsupported field or bad `n`.
        """
        model = self.server.check_model(request.model)
        R.unsupported_fields(request)
        R.check_n(request.n)
        R.check_vllm_extras(request)
        return model

    # ---- hooks --------------------------------------------------------------------------------
    async def prepare(self, request: Any, arrival_s: float) -> Generation:
        """Check `request` and build its choices; raises OpenAIError (400) naming a bad parameter."""
        raise NotImplementedError

    @staticmethod
    def response_id(prefix: str, request: Any) -> tuple[str, str]:
        """(response id, engine request id prefix): "<prefix>-<request_id>" when the client names the request
        (vLLM's `request_id`), else "<prefix>-<random hex>"; engine ids are always random, so two requests
        with the same `request_id` never collide in the engine."""
        internal = f"{prefix}-{uuid.uuid4().hex}"
        return (f"{prefix}-{request.request_id}" if request.request_id else internal), internal

    def full_choices(self, gen: Generation) -> list[dict]:
        """The `choices` of the whole response, once every choice has finished."""
        raise NotImplementedError

    def response_fields(self, gen: Generation) -> dict:
        """Top-level fields a whole response adds after `usage` (none by default)."""
        return {}

    def stream_start(self, gen: Generation) -> Iterable[str]:
        """SSE events sent before the first engine delta."""
        return ()

    def stream_delta(self, gen: Generation, ch: Choice, d: EngineDelta, ids: list[int], text: str) -> Iterable[str]:
        """SSE events for one engine delta `d` of choice `ch`, already folded into `ch` (`ids`, `text` new)."""
        raise NotImplementedError

    # ---- the skeleton -------------------------------------------------------------------------
    def chunk(self, gen: Generation, choices: list[dict], usage: Any = None) -> str:
        """One stream chunk as an SSE event; with `continuous_usage` it carries the usage so far."""
        if gen.continuous_usage and usage is None:
            usage = gen.usage()
        with_usage = gen.include_usage or gen.continuous_usage
        return sse_event(envelope(gen.rid, self.chunk_object, gen.created, gen.model, choices, usage, with_usage))

    async def create(self, request: Any, raw_request: Request, arrival_s: float | None = None) -> Response:
        """Answer one parsed request (`request_cls`): a JSONResponse, an SSE StreamingResponse, or 499.

        Args:
            request: the parsed body; raw_request: the HTTP request (disconnect watching);
            arrival_s: `time.perf_counter()` when the request arrived (default: now).
        Raises:
            OpenAIError: a bad parameter (400), a full queue (429), an engine not running (503) or failing (500).
        """
        gen = await self.prepare(request, time.perf_counter() if arrival_s is None else arrival_s)
        runner = self.server.runner
        if not gen.stream:
            if not await runner.run_all(raw_request, gen.jobs):
                return Response(status_code=499)
            body = envelope(gen.rid, self.response_object, gen.created, gen.model, self.full_choices(gen), gen.usage())
            return JSONResponse({**body, **self.response_fields(gen)})
        if not await runner.admit_all(raw_request, gen.jobs):
            return Response(status_code=499)
        merger = runner.merged_deltas(gen.choices)
        return self._stream_response(self._stream_body(gen, merger), merger)

    async def _stream_body(self, gen: Generation, merger: ChoiceMerger) -> AsyncIterator[str]:
        runner = self.server.runner
        for s in self.stream_start(gen):
            yield s
        async for ch, d in merger:
            ids, text, err = runner.fold_stream_delta(ch, d)
            if err is not None:
                yield err
                continue
            for s in self.stream_delta(gen, ch, d, ids, text):
                yield s
        if gen.include_usage:
            yield self.chunk(gen, [], gen.usage())
        yield SSE_DONE

    def _stream_response(self, body: AsyncIterator[str], merger: ChoiceMerger) -> StreamingResponse:
        """The SSE response; once it ends, however, its engine requests are closed and it is counted
        (200 when the body ran to `[DONE]`, else 499)."""
        metrics = self.server.metrics
        endpoint = self.endpoint
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
            metrics.requests.labels(endpoint, state["status"]).inc()
            metrics.in_flight.dec()

        return SSEResponse(wrapped(), on_close)
