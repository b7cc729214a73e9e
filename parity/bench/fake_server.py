"""A scripted OpenAI-compatible SSE server with exactly known timings, for testing and calibrating `parity bench`.

Every request is answered on its own thread (`http.server.ThreadingHTTPServer`, HTTP/1.1 keep-alive, chunked
transfer encoding) following a `Script`: first token ``ttft_s`` after the request was read, then one chunk every
``itl_s``, each carrying ``tokens_per_chunk`` tokens, until ``max_tokens`` tokens are out (EOS is never emitted,
so ``ignore_eos`` is implied). Chunk times are scheduled from the request's arrival (absolute deadlines, slept
with `time.sleep`, no drift), so a client should measure TTFT = ttft_s, ITL = itl_s / tokens_per_chunk per token,
TPOT = (ceil(n / k) - 1) * itl_s / (n - 1), up to network and scheduling jitter (tens of microseconds on loopback).

Fault injection (by 1-based request number): ``fail_every`` answers HTTP ``fail_status``; ``malformed_every``
sends a non-JSON event mid-stream; ``drop_every`` closes the connection mid-stream.

Command line (used by benchmarks/bench_client_overhead.py)::

    python -m parity.bench.fake_server --port 0 --ttft-ms 50 --itl-ms 10   # prints "READY http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@dataclass
class Script:
    """What the fake server does for each request (times in s).

    Attributes:
        ttft_s: delay from reading the request to the first token chunk.
        itl_s: delay between token chunks.
        tokens_per_chunk: tokens carried by each chunk (> 1 mimics speculative decoding).
        default_max_tokens: output length when the request has no max_tokens.
        word: text of one token.
        usage: "continuous" (running usage in every chunk, if the client asks), "final" (only the last chunk),
            "none" (never).
        role_chunk: chat only, send an assistant-role chunk with empty content right away (as vLLM does).
        fail_every, fail_status: every Nth request is answered with that HTTP status (0 = never).
        malformed_every: every Nth request gets a non-JSON event after its first token (0 = never).
        drop_every: every Nth request's connection is closed after its first token (0 = never).
    """

    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    default_max_tokens: int = 16
    word: str = " tok"
    usage: str = "continuous"
    role_chunk: bool = True
    fail_every: int = 0
    fail_status: int = 500
    malformed_every: int = 0
    drop_every: int = 0
    log: list = field(default_factory=list)


@dataclass
class Plan:
    """The scripted answer to one request.

    Attributes:
        status: HTTP status.
        error: JSON body for a non-200 status.
        events: (offset_s from request arrival, SSE event bytes) in send order.
        drop: close the connection (mid-stream) after the last event instead of ending the stream.
    """

    status: int = 200
    error: dict | None = None
    events: list = field(default_factory=list)
    drop: bool = False


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def plan_response(sc: Script, path: str, raw_body: bytes, num: int) -> Plan:
    """What the script answers to request number `num` (1-based) at `path` with body `raw_body`."""
    path = path.rstrip("/")
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return Plan(404, {"error": {"message": f"no route {path}"}})
    try:
        body = json.loads(raw_body)
    except json.JSONDecodeError:
        return Plan(400, {"error": {"message": "body is not JSON"}})
    if sc.fail_every and num % sc.fail_every == 0:
        return Plan(sc.fail_status, {"error": {"message": f"scripted failure of request {num}"}})
    chat = path.endswith("chat/completions")
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or sc.default_max_tokens)
    so = body.get("stream_options") or {}
    continuous = sc.usage == "continuous" and bool(so.get("continuous_usage_stats"))
    final_usage = sc.usage != "none" and bool(so.get("include_usage"))
    prompt = body.get("prompt") if not chat else " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    pt = len(str(prompt).split())
    base = {
        "id": f"cmpl-{num}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
    }

    def usage(ct: int) -> dict:
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    plan = Plan()
    if chat and sc.role_chunk:
        ev = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        if continuous:
            ev["usage"] = usage(0)
        plan.events.append((0.0, _sse(ev)))
    sent = j = 0
    t = 0.0
    while sent < n:
        k = min(sc.tokens_per_chunk, n - sent)
        t = sc.ttft_s + j * sc.itl_s
        sent += k
        fin = "length" if sent >= n else None
        choice = (
            {"index": 0, "delta": {"content": sc.word * k}, "finish_reason": fin}
            if chat
            else {"index": 0, "text": sc.word * k, "finish_reason": fin}
        )
        ev = {**base, "choices": [choice]}
        if continuous:
            ev["usage"] = usage(sent)
        plan.events.append((t, _sse(ev)))
        j += 1
        if j == 1 and sc.malformed_every and num % sc.malformed_every == 0:
            plan.events.append((t, b"data: {this is not json\n\n"))
        if j == 1 and sc.drop_every and num % sc.drop_every == 0:
            plan.drop = True
            return plan
    if final_usage:
        plan.events.append((t, _sse({**base, "choices": [], "usage": usage(sent)})))
    plan.events.append((t, _sse(b"[DONE]")))
    return plan


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "parity-fake-sse/1"
    # TCP_NODELAY, as uvicorn and other servers set it: without it Nagle's algorithm holds each small SSE write
    # until the previous one is ACKed, and the client's delayed ACK (up to 40 ms on Linux) bunches the tokens.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # silence per-request logging
        pass

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/_log":  # per-request server-side times (perf_counter, s) for calibration
            srv: FakeServer = self.server.owner  # type: ignore[attr-defined]
            with srv.lock:
                self._send_json(200, {"log": list(srv.script.log)})
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def parse_request(self) -> bool:
        self._t_arrival = time.perf_counter()  # request line just read: the earliest point a request is "in"
        return super().parse_request()

    def do_POST(self) -> None:
        t_arrival = getattr(self, "_t_arrival", None) or time.perf_counter()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv: FakeServer = self.server.owner  # type: ignore[attr-defined]
        with srv.lock:
            srv.count += 1
            num = srv.count
            srv._arrived.notify_all()
        plan = plan_response(srv.script, self.path, raw, num)
        if plan.status != 200:
            self._send_json(plan.status, plan.error or {})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent_at = []
        try:
            for off, data in plan.events:
                dt = t_arrival + off - time.perf_counter()
                if dt > 0:
                    time.sleep(dt)
                self._chunk(data)
                sent_at.append(time.perf_counter() - t_arrival)  # offset from arrival, s
            if plan.drop:
                self.wfile.write(b"5\r\ndata:")  # a truncated chunk, then close
                self.wfile.flush()
                self.close_connection = True
                return
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        with srv.lock:
            srv.script.log.append(
                {"num": num, "id": self.headers.get("X-Request-Id"), "arrival_s": t_arrival, "sent_at_s": sent_at}
            )


class VirtualClock:
    """A clock that only moves when told: `perf_counter()` returns `now` (s). Tests patch `time.perf_counter`
    with it so that measured times equal scripted times exactly."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def perf_counter(self) -> float:
        return self.now


class _ScriptedStream(httpx.AsyncByteStream):
    def __init__(self, clock: VirtualClock, start: float, plan: Plan):
        self.clock, self.start, self.plan = clock, start, plan

    async def __aiter__(self):
        for off, data in self.plan.events:
            self.clock.now = max(self.clock.now, self.start + off)
            yield data
        if self.plan.drop:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class ScriptedTransport(httpx.AsyncBaseTransport):
    """An httpx async transport answering from a `Script` with no network and no sleeping: each event is
    delivered with the virtual clock set to arrival + its scripted offset. Exact for requests that run one at a
    time (``max_concurrency=1``); the clock never moves backwards.

    Use as ``run_requests(..., transport=ScriptedTransport(script, clock))`` with `time.perf_counter` patched
    to ``clock.perf_counter``.
    """

    def __init__(self, script: Script, clock: VirtualClock):
        self.script, self.clock, self.count = script, clock, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        plan = plan_response(self.script, request.url.path, await request.aread(), self.count)
        if plan.status != 200:
            return httpx.Response(plan.status, json=plan.error or {})
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_ScriptedStream(self.clock, self.clock.now, plan)
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: 256+ concurrent clients must not see SYN drops
    allow_reuse_address = True


class FakeServer:
    """Run a scripted server on 127.0.0.1 in a background thread.

    Usage::

        with FakeServer(Script(ttft_s=0.05, itl_s=0.01)) as srv:
            srv.base_url  # "http://127.0.0.1:PORT"

    Attributes:
        count: requests answered so far (completions/chat only).
    """

    def __init__(self, script: Script | None = None, port: int = 0):
        self.script = script or Script()
        self.lock = threading.Lock()
        self._arrived = threading.Condition(self.lock)
        self.count = 0
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> FakeServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="parity-fake-sse", daemon=True
        )
        self._thread.start()
        return self

    def wait_for_requests(self, n: int, timeout_s: float) -> bool:
        """Block until `count` >= `n` (True) or `timeout_s` s have passed (False)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.count >= n, timeout_s)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.bench.fake_server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--usage", choices=("continuous", "final", "none"), default="continuous")
    a = p.parse_args(argv)
    srv = FakeServer(
        Script(ttft_s=a.ttft_ms / 1e3, itl_s=a.itl_ms / 1e3, tokens_per_chunk=a.tokens_per_chunk, usage=a.usage),
        port=a.port,
    )
    print(f"READY {srv.base_url}", flush=True)
    try:
        srv._httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
