"""Request bodies of the OpenAI-compatible API, validated strictly.

Field sets follow OpenAI's API reference for `POST /v1/chat/completions` and `POST /v1/completions`
(https://platform.openai.com/docs/api-reference), DeepSeek's API for thinking mode
(`reasoning_content` in messages/deltas, a `thinking` object {"type": "enabled" | "disabled"},
https://api-docs.deepseek.com/guides/thinking_mode), and vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `truncate_prompt_tokens`, `request_id`, `priority`, `prompt_logprobs`,
`chat_template_kwargs`, and, at their defaults only, `spaces_between_special_tokens`, `use_beam_search`,
`length_penalty`), which existing clients send through `extra_body`.

Validation is strict (JSON types are not coerced: `"0.5"` is not a number; integer fields accept an integral
float such as `4.0`, as vLLM does; null for an optional field means its default) and unknown top-level fields
are rejected with 400 "Unrecognized request argument supplied: NAME", as OpenAI does. Fields OpenAI
defines that parity cannot honour (`logit_bias`, `response_format` other than text, audio, ...) and
vLLM's constrained decoding (`bad_words`, `allowed_token_ids`, `guided_*`, `structured_outputs`) are
accepted when empty/default and rejected with a 400 naming them otherwise (`request_options.unsupported_fields`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from parity.server.errors import bad_request, pydantic_errors_to_openai


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
    """One message. A key OpenAI does not define on messages gets 400 `unrecognized_argument`, as an
    unknown top-level field; the keys a client echoes back from a previous response (`refusal`, `audio`,
    `annotations`, `function_call`: OpenAI's assistant message) are accepted and ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "latest_reminder"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: Any = None
    audio: Any = None
    annotations: Any = None
    function_call: Any = None


class ThinkingOption(_Strict):
    """``thinking`` (Anthropic-style): whether the model reasons first; ``budget_tokens`` is accepted for
    compatibility (a positive token count) and does not cap the reasoning (the V4 chat template has no budget)."""

    type: Literal["enabled", "disabled"]
    budget_tokens: Int | None = Field(default=None, ge=1)


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
    # vLLM's: the top-N logprobs of each prompt token (SamplingParams.prompt_logprobs)
    prompt_logprobs: Int | None = None
    # vLLM's fields accepted at their defaults only (request_options.check_vllm_extras)
    spaces_between_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's constrained decoding, which parity does not have: accepted only when empty (unsupported_fields)
    bad_words: Any = None
    allowed_token_ids: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None
    response_format: dict[str, Any] | None = None


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
