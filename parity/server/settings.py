"""Options of one server app (`ServerSettings`) and the default request-body limit."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Default request-body limit: this many bytes per token of max_model_len, and at least MIN_BODY_BYTES.
#: A prompt that fits the context is far smaller: ~4 UTF-8 bytes per token for ordinary text, ~9 for CJK
#: written with JSON `\\uXXXX` escapes (Python's json.dumps default), ~8 for a token-id list.
DEFAULT_BODY_BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    """Default limit of an HTTP request body (bytes): max(1 MiB, 32 bytes * max_model_len tokens)."""
    return max(MIN_BODY_BYTES, DEFAULT_BODY_BYTES_PER_TOKEN * int(max_model_len))


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
        strict_thinking: thinking-mode chat bans the EOS id until the reasoning block closes
            (`--enable-strict-thinking`).
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
    strict_thinking: bool = False
