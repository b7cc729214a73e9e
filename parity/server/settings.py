"""Options of one server app (`ServerSettings`) and the default request-body limit."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Default request-body limit: this many bytes per token of max_model_len, and at least MIN_BODY_BYTES.
#: A prompt that fits the context is far smaller: ~4 UTF-8 bytes per token for ordinary text, ~9 for CJK
#: written with JSON `\\uXXXX` escapes (Python's json.dumps default), ~8 for a token-id list.
DEFAULT_BODY_BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 1 << 20

#: Default cap of engine sequences one request may start (prompts x n): the larger of this and
#: 4 x max_num_seqs (see `default_max_seqs_per_request`).
MIN_SEQS_PER_REQUEST = 256
#: Seconds an idle keep-alive connection stays open (uvicorn's and vLLM's default, 5 s).
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 5.0
#: Seconds a client may take to send the request headers, and again the body.
DEFAULT_REQUEST_READ_TIMEOUT_S = 30.0
#: Most concurrent connections + tasks; beyond it uvicorn answers 503 (its `limit_concurrency`).
DEFAULT_LIMIT_CONCURRENCY = 1024
#: Largest incomplete HTTP event (request line + headers) h11 buffers (bytes): h11's own default, 16 KiB.
H11_MAX_INCOMPLETE_EVENT_BYTES = 16 * 1024


def default_max_seqs_per_request(max_num_seqs: int) -> int:
    """Default cap of prompts x n per request: max(256, 4 * max_num_seqs) sequences."""
    return max(MIN_SEQS_PER_REQUEST, 4 * int(max_num_seqs))


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
        max_seqs_per_request: most engine sequences (prompts x n) one request may start; more get 400.
        allowed_hosts: accepted `Host` header names ("*" any, "*.example.com" subdomains); None: any.
        request_read_timeout_s: seconds a client may take to send the headers, and again the body (408).
        timeout_keep_alive_s: seconds an idle keep-alive connection stays open.
        limit_concurrency: most concurrent connections + tasks (uvicorn answers 503 beyond); None: no limit.
        drain_grace_s: after the drain timeout aborts what is left, seconds the answers may take to go out.
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
    max_seqs_per_request: int = MIN_SEQS_PER_REQUEST
    allowed_hosts: list[str] | None = None
    request_read_timeout_s: float = DEFAULT_REQUEST_READ_TIMEOUT_S
    timeout_keep_alive_s: float = DEFAULT_TIMEOUT_KEEP_ALIVE_S
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY
    drain_grace_s: float = 2.0
