"""OpenAI-shaped HTTP errors for the parity server.

Every error the server answers with has the body OpenAI's API uses
(https://platform.openai.com/docs/guides/error-codes, and the `error` object the `openai` Python client
parses into `openai.APIStatusError.body`)::

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Status codes follow OpenAI: 400 invalid request (bad JSON, wrong types, unknown fields, out-of-range
values, context too long), 401 bad/missing API key, 404 unknown model or route, 429 the waiting queue
is full (with a `Retry-After` header, seconds), 500 an engine failure, 503 while shutting down.
"""

from __future__ import annotations

import re
from typing import Any

#: OpenAI error `type` per HTTP status (as the OpenAI API answers them).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def printable(text: str | None) -> str | None:
    """`text` with lone UTF-16 surrogates (from JSON escapes such as "\\ud800") written as `\\udXXX`, so that
    it can be encoded as UTF-8 in a response."""
    if text is None:
        return None
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class OpenAIError(Exception):
    """An error the HTTP layer turns into an OpenAI-shaped JSON body.

    Args:
        status: HTTP status code (400, 401, 404, 429, 500, 503).
        message: human-readable text naming the offending parameter and the expected value.
        param: the request field at fault (dotted path, e.g. "messages.0.content"), or None.
        code: short machine-readable code (e.g. "context_length_exceeded"), or None.
        headers: extra response headers (e.g. {"Retry-After": "1"} on 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        err_type: str | None = None,
    ) -> None:
        message, param = printable(message), printable(param)
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.err_type = err_type or ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


#: SamplingParams field names, used to name the parameter of an engine RequestError without `.param`.
SAMPLING_PARAM_NAMES = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop_token_ids",
    "stop",
    "logprobs",
    "n",
)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 `invalid_request_error` naming `param`."""
    return OpenAIError(400, message, param=param, code=code)


def param_from_message(message: str, candidates: tuple[str, ...]) -> str | None:
    """Best-effort: the parameter an error message names, as a dotted path.

    Recognised forms (parity's error-message conventions, see parity/errors.py): a leading path such as
    `messages[2].content: ...` -> "messages.2.content"; a quoted name `'top_p'` that is one of
    `candidates`; else the longest candidate that appears in the text. Callers prefer an error's
    `param` attribute when it has one.
    """
    m = re.match(r"\s*([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*)\s*:", message)
    if m and ("[" in m.group(1) or m.group(1) in candidates):
        return re.sub(r"\[(\d+)\]", r".\1", m.group(1))
    for q in re.findall(r"'([A-Za-z_]\w*)'", message):
        if q in candidates:
            return q
    low = message.lower()
    for name in sorted(candidates, key=len, reverse=True):
        if name in low:
            return name
    return None


_PYDANTIC_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after"}


def loc_to_param(loc: tuple | list) -> str | None:
    """Dotted parameter path from a pydantic error location, without pydantic's union-member tags
    (e.g. ("stop", "list[str]", 0) -> "stop.0")."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and (p in _PYDANTIC_TAGS or any(c in p for c in "[]()-'\"") or p[:1].isupper()):
            continue
        parts.append(str(p))
    return ".".join(parts) or None


def pydantic_errors_to_openai(errors: list[dict[str, Any]]) -> OpenAIError:
    """Turn pydantic's `ValidationError.errors()` into one 400 error naming the first bad field.

    Unknown fields (pydantic `extra_forbidden`) get OpenAI's wording "Unrecognized request argument
    supplied: NAME"; type errors say which type was expected. For a field of several types (`stop`: a
    string or a list of strings) given a list or an object, the error inside that value is the one named
    (`"stop": [1]` -> 'stop.0'), as the value's own shape picks the type it meant.
    """
    if not errors:
        return bad_request("invalid request body")
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    first = unknown[0] if unknown else errors[0]
    param = loc_to_param(first.get("loc", ()))
    if not unknown and param is not None and isinstance(first.get("input"), (list, dict)):
        inside = [e for e in errors if (loc_to_param(e.get("loc", ())) or "").startswith(param + ".")]
        if inside:
            first = max(inside, key=lambda e: (loc_to_param(e.get("loc", ())) or "").count("."))
            param = loc_to_param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        names = ", ".join(loc_to_param(e.get("loc", ())) or "?" for e in unknown)
        return bad_request(
            f"Unrecognized request argument supplied: {names}", param=param, code="unrecognized_argument"
        )
    msg = first.get("msg", "invalid value")
    got = first.get("input", None)
    if first.get("type") == "missing":
        return bad_request(f"'{param}' is a required property", param=param, code="missing_required_parameter")
    got_txt = ""
    if got is not None and not isinstance(got, (dict, list)):
        got_txt = f" (got {got!r})"
    elif got is not None:
        got_txt = f" (got a {type(got).__name__})"
    return bad_request(
        f"Invalid value for '{param}': {msg}{got_txt}",
        param=param,
        code="invalid_type"
        if "type" in first.get("type", "") or "parsing" in first.get("type", "")
        else "invalid_value",
    )
