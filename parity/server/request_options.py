"""What a validated request body asks for: the checks of its values (ranges, unsupported fields, vLLM's extras)
and the SamplingParams keyword arguments of its choices."""

from __future__ import annotations

from typing import Any

from parity.engine.sampling_params import MAX_LOGPROBS, SEED_MAX, SEED_MIN
from parity.server.errors import bad_request
from parity.server.protocol import ChatCompletionRequest

#: OpenAI's documented ranges (API reference): temperature [0, 2], top_p (0, 1], penalties [-2, 2],
#: chat `top_logprobs` [0, 20]; completions `logprobs` is [0, MAX_LOGPROBS] as vLLM's (its `max_logprobs`
#: default, 20; OpenAI documents 5), the same limit as SamplingParams. `n` is capped by parity (MAX_N).
MAX_N = 16
MAX_STOP = 16
#: `seed` range (SEED_MIN, SEED_MAX): a signed 64-bit integer, as vLLM's protocol; defined once, in
#: parity.seeds, shared with SamplingParams.validate.


def continuous_usage(req: Any) -> bool:
    """Whether every stream chunk carries the cumulative `usage` (`stream_options.continuous_usage_stats`,
    vLLM's extension; parity honours it with or without `include_usage`, which adds the final usage chunk)."""
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)


#: vLLM's request fields that constrain decoding (vLLM's protocol.py, SamplingParams.bad_words /
#: allowed_token_ids, guided decoding): accepted when null or empty, else refused.
CONSTRAINED_DECODING_FIELDS = (
    "bad_words",
    "allowed_token_ids",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
)


def unsupported_fields(req: Any) -> None:
    """Reject OpenAI fields parity accepts syntactically but cannot honour.

    Raises:
        OpenAIError(400) naming the field.
    """
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by parity", param="logit_bias", code="unsupported_parameter")
    rf = req.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise bad_request(
            f"response_format type {rf.get('type')!r} is not supported; only 'text'",
            param="response_format",
            code="unsupported_parameter",
        )
    for name in CONSTRAINED_DECODING_FIELDS:
        if getattr(req, name) not in (None, "", [], {}):
            raise bad_request(
                f"'{name}' is not supported by parity (it needs constrained decoding)",
                param=name,
                code="unsupported_parameter",
            )
    if isinstance(req, ChatCompletionRequest):
        if req.modalities is not None and any(m != "text" for m in req.modalities):
            raise bad_request("only the 'text' modality is supported", param="modalities", code="unsupported_parameter")
        for name in ("audio", "prediction", "web_search_options", "functions", "function_call"):
            if getattr(req, name):
                hint = "; use 'tools' instead" if name.startswith("function") else ""
                raise bad_request(
                    f"'{name}' is not supported by parity{hint}", param=name, code="unsupported_parameter"
                )
    else:
        if req.suffix:
            raise bad_request("'suffix' is not supported by parity", param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(
                "'best_of' other than n is not supported by parity", param="best_of", code="unsupported_parameter"
            )


#: Accepted `temperature` range, OpenAI's documented [0, 2] (API reference); the CLI's --temperature too.
TEMPERATURE_RANGE = (0.0, 2.0)


def range_error(name: str, v: float | None, lo: float, hi: float, lo_open: bool = False) -> str | None:
    """The one-line message for a number `v` outside [lo, hi] (or (lo, hi] with `lo_open`, NaN included);
    None when `v` is None or inside."""
    if v is None or not (v != v or v < lo or v > hi or (lo_open and v == lo)):
        return None
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return f"Invalid value for '{name}': {v!r}; expected a number in {interval}"


def sampling_kwargs(req: Any, *, max_tokens: int, logprobs: int | None, vocab_size: int) -> dict[str, Any]:
    """SamplingParams keyword arguments for one choice of a validated request.

    Ranges are checked here (before the engine) so that the 400 names the OpenAI parameter:
    temperature in [0, 2], top_p in (0, 1], presence/frequency penalty in [-2, 2] (OpenAI API reference),
    top_k == -1, 0 or >= 1, min_p in [0, 1], repetition_penalty > 0, min_tokens in [0, max_tokens],
    stop at most MAX_STOP non-empty strings, stop_token_ids in [0, vocab_size), seed + n - 1 within
    [SEED_MIN, SEED_MAX] (signed 64-bit).

    Args:
        req: ChatCompletionRequest or CompletionRequest.
        max_tokens: resolved output-token limit (tokens, > 0).
        logprobs: top-N logprobs to return per token, or None.
        vocab_size: model vocabulary size (tokens).
    Returns:
        dict with n=1 (the server fans `n` out into separate engine requests).
    Raises:
        OpenAIError(400) naming the parameter.
    """

    def rng(name: str, v: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
        msg = range_error(name, v, lo, hi, lo_open)
        if msg is not None:
            raise bad_request(msg, param=name, code="invalid_value")

    rng("temperature", req.temperature, *TEMPERATURE_RANGE)
    rng("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    rng("presence_penalty", req.presence_penalty, -2.0, 2.0)
    rng("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    rng("min_p", req.min_p, 0.0, 1.0)
    if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX - (req.n - 1):
        raise bad_request(
            f"Invalid value for 'seed': {req.seed}; expected an integer in [{SEED_MIN}, "
            f"{SEED_MAX - (req.n - 1)}] (a signed 64-bit integer; choice i uses seed + i)",
            param="seed",
            code="invalid_value",
        )
    if req.top_k is not None and req.top_k < -1:
        raise bad_request(
            f"Invalid value for 'top_k': {req.top_k}; expected -1 or 0 (off) or >= 1",
            param="top_k",
            code="invalid_value",
        )
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise bad_request(
            f"Invalid value for 'repetition_penalty': {req.repetition_penalty}; expected > 0",
            param="repetition_penalty",
            code="invalid_value",
        )
    if req.min_tokens < 0 or req.min_tokens > max_tokens:
        raise bad_request(
            f"Invalid value for 'min_tokens': {req.min_tokens}; expected 0 <= min_tokens <= max_tokens ({max_tokens})",
            param="min_tokens",
            code="invalid_value",
        )
    stop: list[str] | None
    if req.stop is None:
        stop = None
    else:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stop) > MAX_STOP:
            raise bad_request(
                f"Invalid value for 'stop': {len(stop)} strings; expected at most {MAX_STOP}",
                param="stop",
                code="invalid_value",
            )
        if "" in stop:
            where = "stop" if isinstance(req.stop, str) else f"stop.{stop.index('')}"
            raise bad_request(
                f"Invalid value for '{where}': empty stop strings are not allowed (an empty string would match "
                "at once); leave it out",
                param=where,
                code="invalid_value",
            )
        stop = stop or None
    if req.stop_token_ids:
        for t in req.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise bad_request(
                    f"Invalid value for 'stop_token_ids': {t} is not a token id in [0, {vocab_size})",
                    param="stop_token_ids",
                    code="invalid_value",
                )
    kw: dict[str, Any] = dict(
        n=1,
        max_tokens=int(max_tokens),
        min_tokens=int(req.min_tokens),
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=-1 if req.top_k is None else int(req.top_k),
        min_p=0.0 if req.min_p is None else float(req.min_p),
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids) if req.stop_token_ids else None,
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        skip_special_tokens=bool(req.skip_special_tokens),
    )
    if req.include_stop_str_in_output:
        kw["include_stop_str_in_output"] = True
    if req.prompt_logprobs is not None:
        kw["prompt_logprobs"] = int(req.prompt_logprobs)
    return kw


def check_vllm_extras(req: Any) -> None:
    """Check vLLM's request fields `priority` (0 only), `truncate_prompt_tokens` (-1 or >= 1),
    `prompt_logprobs` ([0, MAX_LOGPROBS], not with `stream`, as vLLM), and the ones accepted at their vLLM
    defaults only: `spaces_between_special_tokens` true, `use_beam_search` false, `length_penalty` 1.0.

    Raises:
        OpenAIError(400) naming the field.
    """
    for name, default, why in DEFAULT_ONLY_FIELDS:
        if getattr(req, name) != default:
            raise bad_request(
                f"Invalid value for '{name}': {_json(getattr(req, name))} is not supported by parity ({why}); "
                f"only {_json(default)} is accepted",
                param=name,
                code="unsupported_parameter",
            )
    check_logprobs("prompt_logprobs", req.prompt_logprobs)
    if req.prompt_logprobs and req.stream:  # vLLM refuses N > 0 with stream and accepts 0
        raise bad_request(
            "'prompt_logprobs' > 0 is not available when 'stream' is true (as vLLM)",
            param="prompt_logprobs",
            code="invalid_value",
        )
    if req.priority != 0:
        raise bad_request(
            f"Invalid value for 'priority': {req.priority}; parity schedules first come, first served "
            "(no priority scheduling), so only 0 is accepted",
            param="priority",
            code="unsupported_parameter",
        )
    k = req.truncate_prompt_tokens
    if k is not None and k != -1 and k < 1:
        raise bad_request(
            f"Invalid value for 'truncate_prompt_tokens': {k}; expected -1 (the context length) or an integer >= 1",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )


#: vLLM request fields parity accepts at vLLM's default only: (name, default, why another value is refused).
DEFAULT_ONLY_FIELDS = (
    ("spaces_between_special_tokens", True, "its detokenizer has no such switch"),
    ("use_beam_search", False, "parity has no beam search"),
    ("length_penalty", 1.0, "it applies to beam search, which parity does not have"),
)


def _json(v: Any) -> str:
    """A Python default as its JSON literal (True -> true)."""
    return str(v).lower() if isinstance(v, bool) else repr(v)


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """The last `k` prompt tokens (vLLM's `truncate_prompt_tokens`: -1 means max_model_len; None keeps all).

    Raises:
        OpenAIError(400): `k` larger than max_model_len.
    """
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    if k > max_model_len:
        raise bad_request(
            f"Invalid value for 'truncate_prompt_tokens': {k}; expected at most max_model_len ({max_model_len})",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    return ids[-k:] if len(ids) > k else ids


def check_logprobs(name: str, v: int | None) -> None:
    """Raises OpenAIError(400) naming `name` unless `v` is None or in [0, MAX_LOGPROBS] (top-N logprobs per
    token: chat `top_logprobs`, completions `logprobs` and `prompt_logprobs`)."""
    if v is not None and not 0 <= v <= MAX_LOGPROBS:
        raise bad_request(
            f"Invalid value for '{name}': {v}; expected an integer in [0, {MAX_LOGPROBS}]",
            param=name,
            code="invalid_value",
        )


def check_n(n: int) -> None:
    """Raises OpenAIError(400) unless 1 <= n <= MAX_N."""
    if n < 1 or n > MAX_N:
        raise bad_request(f"Invalid value for 'n': {n}; expected 1 <= n <= {MAX_N}", param="n", code="invalid_value")


def thinking_enabled(req: ChatCompletionRequest, default: bool) -> bool:
    """Whether thinking mode is on for a chat request.

    Sources: DeepSeek's `thinking: {"type": "enabled" | "disabled"}` and `chat_template_kwargs:
    {"thinking": bool}` (or vLLM's spelling `enable_thinking`); when none is given, `default`. Sources
    given together must agree.

    Raises:
        OpenAIError(400) when `chat_template_kwargs.thinking` (or `.enable_thinking`) is not a boolean,
            or when two given sources disagree (the message names both fields).
    """
    chosen: list[tuple[str, bool]] = []
    if req.thinking is not None:
        chosen.append(("thinking.type", req.thinking.type == "enabled"))
    kw = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            v = kw[key]
            if not isinstance(v, bool):
                raise bad_request(
                    f"Invalid value for 'chat_template_kwargs.{key}': expected a boolean",
                    param=f"chat_template_kwargs.{key}",
                    code="invalid_type",
                )
            chosen.append((f"chat_template_kwargs.{key}", v))
    if not chosen:
        return default
    (name0, v0), *rest = chosen
    for name, v in rest:
        if v != v0:
            raise bad_request(
                f"Conflicting thinking mode: '{name0}' turns thinking {'on' if v0 else 'off'} but "
                f"'{name}' turns it {'on' if v else 'off'}; give one of them, or make them agree",
                param=name,
                code="invalid_value",
            )
    return v0
