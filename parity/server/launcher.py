"""Running the app under uvicorn: in the foreground with a signal-driven drain, or on a background thread.

First SIGINT / SIGTERM: the server stops accepting connections and says how many requests are in flight; they
may finish for up to `drain_timeout_s`; then whatever still runs is aborted and answered with an OpenAI-shaped
503 (a JSON error, or an error chunk and `[DONE]`), and the engine shuts down; exit status 0. A second SIGINT
exits at once. Connection limits (keep-alive, header/body read timeouts, concurrency) come from the app's
ServerSettings.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from parity.errors import ParityError
from parity.server.middleware import h11_protocol
from parity.server.settings import H11_MAX_INCOMPLETE_EVENT_BYTES, ServerSettings


class PortInUseError(ParityError):
    """The TCP address to serve on is taken (or not allowed)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, bound now (before any model loads).

    Raises:
        PortInUseError: the address is in use, not permitted, or the host cannot be resolved.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortInUseError(f"cannot serve on {host}:{port}: host {host!r} does not resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is already in use; stop the other server or pass --port with a free port"
            ) from None
        raise PortInUseError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def http_url(host: str, port: int) -> str:
    """The http:// URL of host:port, an IPv6 address in brackets (RFC 3986 section 3.2.2):
    ("::1", 8202) -> "http://[::1]:8202"."""
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


def _settings_of(app: Any) -> ServerSettings:
    srv = getattr(getattr(app, "state", None), "server", None)
    return getattr(srv, "settings", None) or ServerSettings()


class _Server(uvicorn.Server):
    """uvicorn.Server that drains on the first SIGINT/SIGTERM (saying how many requests are in flight), exits
    at once on a second SIGINT, and, unlike uvicorn's default, does not re-raise the signal afterwards (so a
    drained shutdown exits with status 0).

    Args:
        config: uvicorn.Config; app: the parity app (its `state.server` drains); name: message prefix;
        on_ready: called once the server accepts connections.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        app: Any = None,
        name: str = "parity serve",
        on_ready: Callable[[_Server], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.parity_app = app
        self.name = name
        self.on_ready = on_ready

    def begin_drain(self) -> int:
        """Start draining the app (see `OpenAIServer.begin_drain`) and stop the server; returns the number of
        requests in flight."""
        srv = getattr(getattr(self.parity_app, "state", None), "server", None)
        count = srv.begin_drain() if srv is not None else 0
        self.should_exit = True
        return count

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                print(f"{self.name}: stopping now", file=sys.stderr, flush=True)
                # uvicorn cancels the open requests and the lifespan: expected now, so not logged as errors
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
                self.force_exit = True
            return
        count = self.begin_drain()
        drain = _settings_of(self.parity_app).drain_timeout_s
        print(
            f"{self.name}: shutting down; draining {count} in-flight request{'s' if count != 1 else ''} "
            f"for up to {drain:g} s (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self)


def make_config(app: Any, host: str, port: int, *, drain_timeout_s: float, log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings for parity: h11 with a request-header read timeout, uvicorn's access log at debug/info
    only, keep-alive timeout and concurrency limit from the app's ServerSettings, and a graceful-shutdown
    limit of the drain timeout plus `drain_grace_s` (so the 503 answers of aborted requests go out)."""
    st = _settings_of(app)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=drain_timeout_s + st.drain_grace_s,
        access_log=log_level in ("debug", "info"),
        http=h11_protocol(st.request_read_timeout_s) if st.request_read_timeout_s else "h11",
        timeout_keep_alive=st.timeout_keep_alive_s,
        limit_concurrency=st.limit_concurrency,
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES,
    )


def serve_forever(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    drain_timeout_s: float = 30.0,
    log_level: str = "info",
    sock: socket.socket | None = None,
    on_ready: Callable[[Any], None] | None = None,
) -> int:
    """Serve `app` until SIGTERM/SIGINT, then drain for up to `drain_timeout_s` seconds.

    Args:
        sock: an already bound listening socket (see `bind_socket`), else uvicorn binds host:port.
        on_ready: called with the server once it accepts connections.
    Returns:
        0 after a clean shutdown; 1 when the server could not start (e.g. the port is taken).
    """
    server = _Server(
        make_config(app, host, port, drain_timeout_s=drain_timeout_s, log_level=log_level), app, on_ready=on_ready
    )
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # a SIGINT outside the serving loop (start-up, or after the drain)
        pass
    return 0 if server.started else 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn on a background thread (tests, `parity chat` with a local model).

    Usage::

        with ThreadedServer(app) as srv:
            httpx.get(srv.base_url + "/health")

    Args:
        app: the ASGI app.
        host: bind address (loopback by default).
        port: TCP port; 0 picks a free one.
        drain_timeout_s: graceful shutdown limit (s).
        start_timeout_s: how long `start()` waits for the server (and the engine in its lifespan) (s).
    Raises (start):
        RuntimeError: the server did not come up within `start_timeout_s`.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        drain_timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        log_level: str = "warning",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.server = _Server(
            make_config(app, self.host, self.port, drain_timeout_s=drain_timeout_s, log_level=log_level), app
        )
        self.start_timeout_s = start_timeout_s
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return http_url(self.host, self.port)

    def start(self) -> ThreadedServer:
        self.thread = threading.Thread(target=self.server.run, name="parity-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"parity server on {self.base_url} failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"parity server on {self.base_url} did not start in {self.start_timeout_s} s")
            time.sleep(0.02)
        return self

    def drain(self) -> int:
        """Begin the shutdown as a first SIGTERM does (drain, then abort); returns the in-flight count."""
        return self.server.begin_drain()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.begin_drain()
        if self.thread is not None:
            self.thread.join(timeout_s)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
