"""`EngineClient`: what the HTTP server needs from an engine (`parity.engine.AsyncEngine` provides it).

The server only awaits the engine's async generators; the engine runs its model loop on its own thread,
so handlers never block the event loop on model compute.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from parity.engine import SamplingParams


class EngineDelta(Protocol):
    """One streamed update of one engine request (`parity.engine.StreamDelta` is one).

    The server reads each attribute with a default, so an engine may leave out those it never sets
    (`logprobs`, `stop_reason`, `error`).

    Attributes:
        new_token_ids: tokens generated since the previous delta.
        new_text: text released since the previous delta.
        finished: the request is done; `finish_reason` ("stop" | "length" | "abort") and `stop_reason`
            (the stop string or token id that ended it) say why.
        logprobs: one entry per new token when requested: {token_id: logprob}, [(token_id, logprob)],
            an object with `.logprob` and `.top_logprobs`, or a bare float.
        error: set when the engine failed the request.
    """

    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None


class EngineClient(Protocol):
    """The engine contract of `parity.server`.

    Attributes:
        tokenizer: the engine's tokenizer (`encode`, `decode`, `vocab_size`; optionally `encode_batch` and
            `backend.get_vocab`), or None on a token-ids-only server.
        max_model_len: longest sequence (prompt + output tokens) a request may reach.

    Optional attributes, read with a default: `config.vocab_size` (else `tokenizer.vocab_size`),
    `running` (False once the model loop stopped), `errored` (True after an engine failure).
    """

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int: ...

    async def start(self) -> None:
        """Start the model loop."""

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Let running requests finish for up to `drain_timeout_s` seconds, abort the rest, stop."""

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[EngineDelta]:
        """Stream the deltas of one request; the last one has `finished`.

        Raises (from the first `__anext__`): `EngineQueueFull` (or an error with `status` 429) when the
        waiting queue is full; `RequestError` / `ValueError` for an invalid request or an engine that is
        not running.
        """

    def abort(self, request_id: str) -> None:
        """Abort a request and free its cache; returns at once, thread-safe."""

    def stats(self) -> dict[str, Any]:
        """Gauges for /metrics: num_running, num_waiting, cache_used_bytes, cache_total_bytes, ..."""
