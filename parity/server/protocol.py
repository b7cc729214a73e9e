"""Request bodies of the OpenAI-compatible API, validated strictly.

Field sets follow OpenAI's API reference for `POST /v1/chat/completions` and `POST /v1/completions`
(https://platform.openai.com/docs/api-reference), DeepSeek's API for thinking mode
(`reasoning_content` in messages/deltas, a `thinking` object {"type": "enabled" | "disabled"},
https://api-docs.deepseek.com/guides/thinking_mode), and vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `truncate_prompt_tokens`, `request_id`, `priority`, `chat_template_kwargs`), which
existing clients send through `extra_body`.

Validation is strict (JSON types are not coerced: `"0.5"` is not a number; integer fields accept an integral
float such as `4.0`, as vLLM does; null for an optional field means its default) and unknown top-level fields
are rejected with 400 "Unrecognized request argument supplied: NAME", as OpenAI does. Fields OpenAI
defines that parity cannot honour (`logit_bias`, `response_format` other than text, audio, ...) are
accepted when empty/default and rejected with a 400 naming them otherwise (see `unsupported_fields`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from parity.engine.sampling_params import SEED_MAX, SEED_MIN
from parity.server.errors import bad_request, pydantic_errors_to_openai

#: OpenAI's documented ranges (API reference): temperature [0, 2], top_p (0, 1], penalties [-2, 2],
#: chat `top_logprobs` [0, 20], completions `logprobs` [0, 5]. `n` is capped by parity (MAX_N).
MAX_N = 16
MAX_STOP = 16
#: `seed` range (SEED_MIN, SEED_MAX): a signed 64-bit integer, as vLLM's protocol; defined once, in
#: parity.seeds, shared with SamplingParams.validate.


def _integral_float(v: Any) -> Any:
    """4.0 -> 4 for integer fields (as vLLM accepts); anything else is left to strict validation."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


#: An integer field that also accepts an integral JSON float (4.0), never a string or a bool.
Int = Annotated[int, BeforeValidator(_integral_float)]


def _null_is_default(field: Any) -> bool:
    """Whether a JSON null for this pydantic field means its default: it is optional and its type has no
    None of its own (`max_tokens: int | None = 16` keeps null = no limit)."""
    return not field.is_required() and type(None) not in get_args(field.annotation)


class _NullIsDefault(BaseModel):
    """A body model where an explicit JSON null for an optional field means its default (`"n": null` is
    `n = 1`), as OpenAI's API marks these fields nullable and OpenAI and vLLM accept null; a null for a
    required field is still refused."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        nulls = [k for k, v in data.items() if v is None and k in fields and _null_is_default(fields[k])]
        return {k: v for k, v in data.items() if k not in nulls} if nulls else data


class _Strict(_NullIsDefault):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class FunctionDef(_NullIsDefault):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_NullIsDefault):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolCallFunction(_NullIsDefault):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_NullIsDefault):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_NullIsDefault):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_NullIsDefault):
    """One message. Extra keys a client echoes back from a previous response (`refusal`, `audio`,
    `annotations`, `function_call`) are ignored rather than rejected."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "latest_reminder"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ThinkingOption(_Strict):
    type: Literal["enabled", "disabled"]
    budget_tokens: Int | None = None


class _SamplingFields(_Strict):
    """Sampling fields shared by both endpoints (OpenAI names + vLLM extras)."""

    model: str | None = None
    n: Int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extras (sent with `extra_body` by the openai client)
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: Int | None = None
    # vLLM's request bookkeeping: `request_id` names the response (its id is "<prefix>-<request_id>");
    # `priority` other than 0 needs priority scheduling, which parity does not have (first come, first served)
    request_id: str | None = None
    priority: Int = 0


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    thinking: ThinkingOption | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's chat-template parameters: open the assistant turn / continue the last assistant message
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_tokens_as_token_ids: bool = False
    # accepted and ignored (bookkeeping fields of OpenAI's API)
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted only when empty (see unsupported_fields)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Int | None = 16  # OpenAI's documented default for /v1/completions
    logprobs: Int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = None
    # vLLM's: `token_id:N` logprob tokens; each choice's generated ids as `token_ids`
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False


def continuous_usage(req: Any) -> bool:
    """Whether every stream chunk carries the cumulative `usage` (`stream_options.continuous_usage_stats`,
    vLLM's extension; parity honours it with or without `include_usage`, which adds the final usage chunk)."""
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)


def parse_body(raw: bytes, model_cls: type[BaseModel]) -> Any:
    """Parse and validate a JSON request body.

    Args:
        raw: the HTTP body bytes.
        model_cls: ChatCompletionRequest or CompletionRequest.
    Returns:
        the validated pydantic object.
    Raises:
        OpenAIError(400): malformed JSON, a body that is not an object, a wrong type, an unknown field.
    """
    import json

    from pydantic import ValidationError

    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request(
            f"The JSON body of your request is nested too deeply (at most {MAX_JSON_DEPTH} levels are accepted).",
            code="invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    _check_tree(obj, check_strings=_SURROGATE_ESCAPE.search(raw) is not None)
    try:
        return model_cls.model_validate(obj, strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if (
            model_cls is CompletionRequest
            and errors
            and errors[0].get("loc", ())[:1] == ("prompt",)
            and errors[0].get("type") != "missing"
            and not any(x.get("type") == "extra_forbidden" for x in errors)
        ):
            raise bad_request(
                "Invalid value for 'prompt': must be a string, a list of strings, a list of token ids "
                f"(integers) or a list of such lists (got {_json_kind(obj['prompt'])})",
                param="prompt",
                code="invalid_type",
            ) from None
        raise pydantic_errors_to_openai(errors) from None


_JSON_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's terms: "a number", "a list holding a string and an integer", ..."""
    if not isinstance(value, list):
        return _JSON_NAMES.get(type(value), type(value).__name__)
    kinds = list(dict.fromkeys(_JSON_NAMES.get(type(v), type(v).__name__) for v in value))
    if not kinds:
        return "an empty list"
    return "a list holding " + " and ".join(kinds[:3]) + ("..." if len(kinds) > 3 else "")


#: Deepest JSON nesting accepted in a request body (levels); a body nested deeper gets 400.
MAX_JSON_DEPTH = 64

#: A JSON escape of a UTF-16 surrogate (`\ud800`..`\udfff`): the only way a body that is valid UTF-8
#: can decode to a str holding a lone surrogate, which no tokenizer accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_SCALARS = frozenset({int, float, bool, type(None)})


def _check_tree(obj: Any, check_strings: bool) -> None:
    """Reject a parsed body nested deeper than MAX_JSON_DEPTH and, when `check_strings`, any string (key or
    value) that is not valid Unicode (a lone surrogate such as "\\ud800").

    Raises:
        OpenAIError(400) naming the path of the offending value (e.g. "messages.0.content").
    """
    stack: list[tuple[Any, tuple, int]] = [(obj, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if check_strings:
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError as e:
                    where = ".".join(map(str, path)) or None
                    raise bad_request(
                        f"Invalid value for '{where}': the string holds a lone UTF-16 surrogate "
                        f"({node[e.start]!r} at character {e.start}); strings must be valid Unicode",
                        param=where,
                        code="invalid_value",
                    ) from None
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            where = ".".join(map(str, path)) or None
            raise bad_request(
                f"The JSON body of your request is nested too deeply at '{where}' (at most "
                f"{MAX_JSON_DEPTH} levels are accepted).",
                param=where,
                code="invalid_json",
            )
        if isinstance(node, dict):
            for k, v in node.items():
                if check_strings:
                    stack.append((k, path + (k,), depth + 1))
                stack.append((v, path + (k,), depth + 1))
        elif not _SCALARS.issuperset(map(type, node)):  # C-speed skip of number lists (token-id prompts)
            stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(node) if isinstance(v, (str, dict, list)))


def unsupported_fields(req: Any) -> None:
    """Reject OpenAI fields parity accepts syntactically but cannot honour.

    Raises:
        OpenAIError(400) naming the field.
    """
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by parity", param="logit_bias", code="unsupported_parameter")
    if isinstance(req, ChatCompletionRequest):
        rf = req.response_format
        if rf is not None and rf.get("type", "text") != "text":
            raise bad_request(
                f"response_format type {rf.get('type')!r} is not supported; only 'text'",
                param="response_format",
                code="unsupported_parameter",
            )
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
        if v is None:
            return
        if v != v or v < lo or v > hi or (lo_open and v == lo):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise bad_request(
                f"Invalid value for '{name}': {v!r}; expected a number in {interval}", param=name, code="invalid_value"
            )

    rng("temperature", req.temperature, 0.0, 2.0)
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
    return kw


def check_vllm_extras(req: Any) -> None:
    """Check vLLM's request fields `priority` (0 only) and `truncate_prompt_tokens` (-1 or >= 1).

    Raises:
        OpenAIError(400) naming the field.
    """
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
