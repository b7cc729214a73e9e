"""Running the app under uvicorn: in the foreground with a SIGTERM drain, or on a background thread.

SIGTERM / SIGINT (first one): uvicorn stops accepting connections and waits for in-flight requests (streams
included) for up to `drain_timeout_s` (uvicorn's `timeout_graceful_shutdown`); then the app's lifespan
shuts the engine down, which aborts whatever is still running, and the process exits with status 0.
A second SIGINT forces an immediate exit (uvicorn's behaviour).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn.Server that handles SIGTERM/SIGINT itself and, unlike uvicorn's default, does not
    re-raise the signal after the graceful shutdown (so a drained SIGTERM exits with status 0)."""

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


def make_config(app: Any, host: str, port: int, *, drain_timeout_s: float,
                log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings for parity: h11, no uvicorn access log at `warning`, graceful drain timeout (s)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=drain_timeout_s, access_log=log_level in ("debug", "info"),
                          http="h11")


def serve_forever(app: Any, host: str = "127.0.0.1", port: int = 8000, *, drain_timeout_s: float = 30.0,
                  log_level: str = "info") -> int:
    """Serve `app` until SIGTERM/SIGINT, then drain for up to `drain_timeout_s` seconds.

    Returns:
        0 after a clean shutdown; 1 when the server could not start (e.g. the port is taken).
    """
    server = _Server(make_config(app, host, port, drain_timeout_s=drain_timeout_s, log_level=log_level))
    server.run()
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

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, drain_timeout_s: float = 5.0,
                 start_timeout_s: float = 120.0, log_level: str = "warning") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.server = _Server(make_config(app, self.host, self.port, drain_timeout_s=drain_timeout_s,
                                          log_level=log_level))
        self.start_timeout_s = start_timeout_s
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
