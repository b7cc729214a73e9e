"""Request-body content codings (`Content-Encoding`, RFC 9110 section 8.4): gzip bodies are decoded, unknown
codings refused.

gzip (and its alias x-gzip, RFC 9110 section 8.4.1.3) and identity are accepted, in any listed order; any
other coding gets a 415 naming it, with `Accept-Encoding: gzip` (RFC 9110 section 15.5.16). A body that is not
valid gzip gets a 400; one that decodes to more than the body limit gets a 413 while decoding (a small
compressed body cannot expand unbounded in memory).
"""

from __future__ import annotations

import gzip
import io
import zlib

from parity.server.errors import OpenAIError

#: Content codings this server decodes ("identity" is no coding at all).
GZIP_CODINGS = ("gzip", "x-gzip")
ACCEPTED_CODINGS = (*GZIP_CODINGS, "identity")


def content_codings(header: str) -> list[str]:
    """The codings of a `Content-Encoding` header value, in the order they were applied (lower case).

    Raises:
        OpenAIError(415, code "unsupported_content_encoding"): a coding other than gzip / x-gzip / identity.
    """
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    unknown = [c for c in codings if c not in ACCEPTED_CODINGS]
    if unknown:
        raise OpenAIError(
            415,
            f"Unsupported Content-Encoding {unknown[0]!r}: request bodies may be sent plain or with "
            f"'Content-Encoding: gzip'",
            code="unsupported_content_encoding",
            headers={"Accept-Encoding": "gzip"},
        )
    return codings


def decode_body(body: bytes, codings: list[str], limit: int) -> bytes:
    """`body` with its content codings undone (the last applied first).

    Args:
        body: the body as received (bytes). codings: from `content_codings`. limit: most bytes the decoded
            body may have (the server's --max-request-bytes).
    Returns:
        the decoded body (bytes).
    Raises:
        OpenAIError(400, code "invalid_content_encoding"): the body is not valid gzip (bad header, corrupt
            or truncated data); OpenAIError(413, code "request_too_large"): it decodes to more than `limit`.
    """
    for coding in reversed(codings):
        if coding not in GZIP_CODINGS:
            continue
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
                decoded = f.read(limit + 1)  # bounded: decompresses at most limit + 1 bytes
        except (OSError, EOFError, zlib.error) as e:
            raise OpenAIError(
                400,
                f"Request body is not valid gzip (Content-Encoding: {coding}): {e}",
                code="invalid_content_encoding",
            ) from None
        if len(decoded) > limit:
            raise OpenAIError(
                413,
                f"Request body too large: more than {limit} bytes once decompressed; this server accepts at "
                f"most {limit} bytes (--max-request-bytes)",
                code="request_too_large",
            )
        body = decoded
    return body
