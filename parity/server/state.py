"""`OpenAIServer`: the state of one server app (engine, settings, metrics, runner) and the input checks
every endpoint shares (auth, model name, body size, tokenization, output-token limit, sampling parameters).

Hostile input cannot stall the event loop: bodies over `max_request_bytes` get 413 before they are read in
full, a text longer than max_model_len tokens can hold is refused before tokenizing, and long texts are
tokenized with `encode_batch` on a worker thread (it releases the GIL; `tokenizers`' `encode` does not).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request

from parity.errors import RequestError
from parity.server.body_encoding import content_codings, decode_body
from parity.server.choices import ChoiceRunner
from parity.server.engine_client import EngineClient
from parity.server.errors import SAMPLING_PARAM_NAMES, OpenAIError, bad_request, param_from_message
from parity.server.metrics import ServerMetrics
from parity.server.settings import ServerSettings, default_max_request_bytes

#: Prompts longer than this (characters) are tokenized on a worker thread.
THREAD_TOKENIZE_CHARS = 8192

#: Upper bound of characters per token when the tokenizer cannot tell (DeepSeek-V4's longest token
#: is 128 characters); a text longer than max_model_len * this cannot fit the context.
FALLBACK_MAX_TOKEN_CHARS = 128


class OpenAIServer:
    """State and input checks shared by the routes; one per app.

    Args:
        engine: the EngineClient (parity.engine.AsyncEngine or a test fake).
        settings: ServerSettings.
        chat_format: object with encode/parse/stream_parser (default: `ChatFormat`, DeepSeek-V4's).
        sampling_params_cls: SamplingParams class (default: `parity.engine.SamplingParams`).
    """

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerSettings,
        chat_format: Any = None,
        sampling_params_cls: Callable[..., Any] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._chat_format = chat_format
        self._sp_cls = sampling_params_cls
        self.metrics = ServerMetrics(self._engine_stats)
        self.runner = ChoiceRunner(engine, self.metrics, settings)
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving event loop (set by the lifespan)
        self.draining = False

    # ---- shutdown -----------------------------------------------------------------------------
    def begin_drain(self) -> int:
        """Stop taking generation requests (503) and, after `drain_timeout_s`, abort what still runs so
        that each request ends with an OpenAI-shaped 503 (see `ChoiceRunner.cut_off_all`). Thread-safe,
        idempotent. Returns the number of generation requests in flight now."""
        count = self.metrics.in_flight_count()
        if self.draining:
            return count
        self.draining = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            timeout = max(0.0, float(self.settings.drain_timeout_s))
            loop.call_soon_threadsafe(lambda: loop.call_later(timeout, self.runner.cut_off_all))
        return count

    def check_accepting(self) -> None:
        """Raises OpenAIError(503 `server_shutting_down`) while the server drains."""
        if self.draining:
            raise OpenAIError(
                503,
                "The server is shutting down and takes no new requests; retry later",
                code="server_shutting_down",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

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
            from parity.server.chat_format import ChatFormat  # loads the V4 chat encoder only when used

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
            param = getattr(e, "param", None) or param_from_message(msg, SAMPLING_PARAM_NAMES)
            raise bad_request(msg, param=param, code="invalid_value") from None
        return sp

    def per_choice_params(self, kw: dict[str, Any], n: int) -> list[Any]:
        """SamplingParams of choices 0..n-1: `kw`, with seed + i for choice i when a seed is given."""
        out = []
        for i in range(n):
            k = dict(kw)
            if k.get("seed") is not None:
                k["seed"] = int(k["seed"]) + i
            out.append(self.sampling_params(k))
        return out

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
        """The model name to report; raises OpenAIError(404 `model_not_found`) for a name this server does not
        serve (the status OpenAI and vLLM answer)."""
        names = self.settings.served_model_names
        if model is None:
            return names[0]
        if model not in names and model not in self.settings.model_aliases:
            raise OpenAIError(
                404,
                f"The model '{model}' does not exist; this server serves {names[0]!r}.",
                param="model",
                code="model_not_found",
            )
        return model

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        """Output-token limit for a prompt of `prompt_len` tokens.

        Raises:
            OpenAIError(400): prompt of max_model_len tokens or more (`context_length_exceeded`),
                requested <= 0, or prompt + requested > max_model_len.
        """
        mml = self.max_model_len
        if prompt_len >= mml:
            raise bad_request(
                f"This model's maximum context length is {mml} tokens. However, your prompt is "
                f"{prompt_len} tokens, which leaves no room for completion tokens.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return mml - prompt_len
        if requested <= 0:
            raise bad_request(
                f"Invalid value for '{param}': {requested}; expected an integer >= 1", param=param, code="invalid_value"
            )
        if prompt_len + requested > mml:
            raise bad_request(
                f"This model's maximum context length is {mml} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                f"completion). Please reduce the prompt or '{param}'.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    @staticmethod
    def check_content_type(request: Request) -> None:
        """Raises OpenAIError(415) unless the body is declared JSON (`application/json`, any parameters, or a
        `+json` type). A browser page may send `text/plain` or form bodies to any host without asking it
        (CORS "simple requests"); refusing them keeps a local server out of such cross-site use."""
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            return
        shown = f"'{ctype}'" if ctype else "none"
        raise OpenAIError(
            415,
            f"Unsupported Content-Type {shown}: request bodies must be JSON, sent with "
            f"'Content-Type: application/json'",
            code="unsupported_media_type",
        )

    def queue_capacity(self) -> tuple[int, int] | None:
        """(max_num_seqs, max_waiting) of the engine (its `args`, else its own attributes), or None when it
        does not say: the most sequences one request can have running and waiting at once."""
        src = getattr(self.engine, "args", self.engine)
        running, waiting = getattr(src, "max_num_seqs", None), getattr(src, "max_waiting", None)
        if isinstance(running, int) and isinstance(waiting, int):
            return running, waiting
        return None

    def check_num_seqs(self, num_prompts: int, n: int) -> None:
        """Refuse a request whose sequences (prompts x n) can never be admitted.

        Raises:
            OpenAIError(400 `too_many_sequences`): prompts x n exceeds `max_seqs_per_request`, or exceeds
                max_num_seqs + max_waiting (on an idle engine at most max_num_seqs run and max_waiting wait,
                so the engine's queue would refuse it with a 429 however long the client retried).
        """
        seqs = num_prompts * n
        param = "n" if num_prompts == 1 else "prompt"
        limit = int(self.settings.max_seqs_per_request)
        if seqs > limit:
            raise bad_request(
                f"Too many sequences in one request: {num_prompts} prompt(s) x n={n} = "
                f"{seqs}; this server accepts at most {limit} per request "
                f"(--max-seqs-per-request)",
                param=param,
                code="too_many_sequences",
            )
        cap = self.queue_capacity()
        if cap is not None and seqs > cap[0] + cap[1]:
            raise bad_request(
                f"Too many sequences in one request: {num_prompts} prompt(s) x n={n} = {seqs}, more than "
                f"this server can ever queue: max_waiting ({cap[1]}) sequences waiting + max_num_seqs "
                f"({cap[0]}) running = {cap[0] + cap[1]} (--max-waiting, --max-num-seqs)",
                param=param,
                code="too_many_sequences",
            )

    @property
    def max_request_bytes(self) -> int:
        """Largest accepted request body (bytes): the setting, else derived from max_model_len."""
        limit = self.settings.max_request_bytes
        return int(limit) if limit else default_max_request_bytes(self.max_model_len)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused once it exceeds `max_request_bytes` (checked on Content-Length first,
        then while reading, so an oversized body is never held in memory or parsed); a gzip body
        (`Content-Encoding: gzip`) is decompressed on a worker thread, within the same limit.

        Raises:
            OpenAIError(413, code "request_too_large"); 415 for a content coding other than gzip and 400 for
            a body that is not valid gzip (`parity.server.body_encoding`).
        """
        limit = self.max_request_bytes
        codings = content_codings(request.headers.get("content-encoding", ""))

        def too_large(size: str) -> OpenAIError:
            return OpenAIError(
                413,
                f"Request body too large: {size} bytes; this server accepts at most {limit} "
                f"bytes (--max-request-bytes)",
                code="request_too_large",
            )

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit}")
            chunks.append(chunk)
        body = b"".join(chunks)
        if any(c != "identity" for c in codings):
            body = await asyncio.to_thread(decode_body, body, codings, limit)
        return body

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Upper bound of the characters one token decodes to (byte-level vocabulary: one char per byte,
        so the longest vocabulary entry bounds it); a fallback of 128 when the tokenizer cannot tell."""
        try:
            vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
            return max(len(k) for k in vocab) or FALLBACK_MAX_TOKEN_CHARS
        except Exception:
            return FALLBACK_MAX_TOKEN_CHARS

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
            raise bad_request(
                f"'{param}': this server runs without a tokenizer (--skip-tokenizer-init), so "
                f"text prompts are not supported; send token ids as 'prompt' to /v1/completions",
                param=param,
                code="tokenizer_unavailable",
            )
        mml = self.max_model_len
        if len(text) > mml * self.max_token_chars:
            raise bad_request(
                f"This model's maximum context length is {mml} tokens. However, your prompt has "
                f"{len(text)} characters, more than {mml} tokens can hold.",
                param=param,
                code="context_length_exceeded",
            )
        if len(text) > THREAD_TOKENIZE_CHARS:
            batch = getattr(tok, "encode_batch", None)
            if batch is not None:
                return list((await asyncio.to_thread(batch, [text]))[0])
            return list(await asyncio.to_thread(tok.encode, text))
        return list(tok.encode(text))

    async def tokenize_many(self, texts: list[str], params: list[str]) -> list[list[int]]:
        """Token ids of each text, like `tokenize`; all of them on one worker thread (`encode_batch` when the
        tokenizer has it), so that many prompts never hold the event loop.

        Raises:
            OpenAIError(400): as `tokenize`, naming the offending `params[i]`.
        """
        if len(texts) == 1:
            return [await self.tokenize(texts[0], params[0])]
        tok = self.tokenizer
        if tok is None or not texts:
            return [await self.tokenize(t, p) for t, p in zip(texts, params, strict=True)]
        mml = self.max_model_len
        for t, p in zip(texts, params, strict=True):
            if len(t) > mml * self.max_token_chars:
                raise bad_request(
                    f"This model's maximum context length is {mml} tokens. However, '{p}' has "
                    f"{len(t)} characters, more than {mml} tokens can hold.",
                    param=p,
                    code="context_length_exceeded",
                )
        batch = getattr(tok, "encode_batch", None)

        def run() -> list[list[int]]:
            if batch is not None:
                return [list(ids) for ids in batch(texts)]
            return [list(tok.encode(t)) for t in texts]

        return await asyncio.to_thread(run)
