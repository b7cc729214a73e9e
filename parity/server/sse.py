"""Server-sent events framing as OpenAI streams it: `data: <json>\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

#: The event that ends every stream.
SSE_DONE = "data: [DONE]\n\n"

#: Headers of every event-stream answer (no caching, no proxy buffering).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(obj: Any) -> str:
    """One SSE event carrying `obj` as compact JSON (UTF-8 kept as is, not `\\u` escaped)."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` StreamingResponse that always runs `on_close` once the response ends, however
    it ends (finished, client disconnect, or cancelled before the body started)."""

    def __init__(self, content: Any, on_close: Callable[[], Awaitable[None]], **kw: Any) -> None:
        kw.setdefault("media_type", "text/event-stream")
        kw.setdefault("headers", SSE_HEADERS)
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
