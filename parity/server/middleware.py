"""Connection-level guards of the HTTP server: a Host-header check (against DNS rebinding), a request-body read
timeout (ASGI middleware), and an h11 protocol with a request-header read timeout (slow clients).

Every refusal is an OpenAI-shaped JSON error (see errors.py): 400 for a Host that is not allowed, 408 when the
headers or the body do not arrive in time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from parity.server.errors import OpenAIError


def _json_response_bytes(err: OpenAIError) -> bytes:
    return json.dumps(err.body()).encode("utf-8")


async def send_error(send: Any, err: OpenAIError) -> None:
    """Send `err` as a complete ASGI HTTP response (status, JSON body, `Connection: close`)."""
    body = _json_response_bytes(err)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether a Host header value (port stripped) matches one of `patterns`: "*" (any), an exact name, or
    "*.example.com" (any subdomain of example.com). Case-insensitive."""
    name = host.lower()
    if name.startswith("["):  # IPv6 literal "[::1]:8000"
        name = name[: name.find("]") + 1]
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    for p in patterns:
        p = p.lower()
        if p == "*" or p == name or (p.startswith("*.") and name.endswith(p[1:])):
            return True
    return False


class AllowedHostsMiddleware:
    """Refuse requests whose `Host` header is not in `allowed_hosts` (400), so that a web page whose name
    resolves to this machine (DNS rebinding) cannot reach the server.

    Args:
        app: the ASGI app. allowed_hosts: patterns as in `host_matches`.
    """

    def __init__(self, app: Any, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed_hosts = list(allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not host_matches(host, self.allowed_hosts):
                await send_error(
                    send,
                    OpenAIError(
                        400,
                        f"Host header {host!r} is not allowed; this server accepts "
                        f"{', '.join(self.allowed_hosts)} (--allowed-hosts)",
                        code="host_not_allowed",
                    ),
                )
                return
        await self.app(scope, receive, send)


def read_timeout_error(timeout_s: float, what: str) -> OpenAIError:
    """The 408 answer when the request `what` ("headers", "body") did not arrive within `timeout_s` s."""
    return OpenAIError(
        408,
        f"Request timeout: the request {what} did not arrive within {timeout_s:g} s (--request-read-timeout)",
        code="request_timeout",
        err_type="invalid_request_error",
    )


class RequestReadTimeoutMiddleware:
    """Bound the time a client may take to send the request body: `timeout_s` seconds from the end of the
    headers to the last body chunk. When it runs out, the app's pending `receive()` raises the 408
    OpenAIError (answered by the app's error handling).

    Args:
        app: the ASGI app. timeout_s: seconds (> 0).
    """

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = float(timeout_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        state = {"body_done": scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE")}

        async def timed_receive() -> dict:
            if state["body_done"]:
                return await receive()
            remaining = deadline - loop.time()
            try:
                msg = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                state["body_done"] = True
                raise read_timeout_error(self.timeout_s, "body") from None
            if msg.get("type") != "http.request" or not msg.get("more_body", False):
                state["body_done"] = True
            return msg

        await self.app(scope, timed_receive, send)


def h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    `header_timeout_s` seconds of the connection opening (or of the previous response ending) with a 408.

    Returns:
        an H11Protocol subclass, for `uvicorn.Config(http=...)`.
    """

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # closed, or the headers arrived
            if self.cycle is not None and not self.conn.trailing_data[0]:
                return  # idle between requests: the keep-alive timeout governs
            body = _json_response_bytes(read_timeout_error(header_timeout_s, "headers"))
            head = (
                f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode("latin-1")
            self.transport.write(head + body)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
