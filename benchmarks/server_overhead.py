"""How much the HTTP layer (parity.server) costs, with the model taken out of the picture.

The server runs in a subprocess (its own GIL, like a real deployment) over an *instant* engine that
implements the AsyncEngine contract and produces tokens with no compute, so everything measured is
FastAPI/uvicorn + request validation + chat encoding + tokenization + SSE framing + output parsing.
The real V4 tokenizer and chat format are used. The client (httpx, asyncio) runs in this process.

Measured:
1. sequential non-streaming chat requests (1 output token): latency per request (ms), p50/p90/p99;
2. C concurrent streaming chat requests of T tokens each: server SSE throughput (tokens/s, one token
   per chunk) and per-chunk server cost (µs).

Usage:
    .venv/bin/python benchmarks/server_overhead.py [--requests 300] [--streams 64] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class InstantEngine:
    """AsyncEngine contract, zero compute: answers `tokens` copies of one word token, then stops."""

    def __init__(self) -> None:
        from parity.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(None)
        self.config = type("C", (), {"vocab_size": 129280})()
        self.max_model_len = 65536
        self.word = self.tokenizer.encode(" hello")[0]

    async def start(self) -> None:
        pass

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        pass

    def stats(self) -> dict:
        return {"num_running": 0, "num_waiting": 0, "cache_used_bytes": 0, "cache_total_bytes": 1}

    def abort(self, request_id: str) -> None:
        pass

    async def generate(self, prompt_token_ids, params, request_id):
        from types import SimpleNamespace as NS

        n = params.max_tokens
        for i in range(n):
            last = i == n - 1
            yield NS(
                new_token_ids=[self.word],
                new_text=" hello",
                finished=last,
                finish_reason="length" if last else None,
                stop_reason=None,
                logprobs=None,
                error=None,
            )
            await asyncio.sleep(0)


def serve(port: int) -> None:
    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import serve_forever

    app = build_app(InstantEngine(), ServerSettings(served_model_names=["instant"]))
    serve_forever(app, "127.0.0.1", port, drain_timeout_s=1.0, log_level="warning")


async def client(base: str, n_requests: int, n_streams: int, n_tokens: int) -> dict:
    import httpx

    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Summarise the plot of Hamlet in one sentence."},
    ]
    out: dict = {}
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=n_streams + 4)) as c:
        body = {"model": "instant", "messages": msgs, "max_tokens": 1}
        for _ in range(20):  # warm-up
            (await c.post("/v1/chat/completions", json=body)).raise_for_status()
        lat = []
        for _ in range(n_requests):
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=body)
            lat.append((time.perf_counter() - t0) * 1e3)
            r.raise_for_status()
        lat.sort()
        out["latency_ms"] = {
            "p50": statistics.median(lat),
            "p90": lat[int(0.9 * len(lat))],
            "p99": lat[int(0.99 * len(lat))],
            "mean": statistics.fmean(lat),
        }

        async def stream() -> int:
            n = 0
            sb = {"model": "instant", "messages": msgs, "max_tokens": n_tokens, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=sb) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"content":" hello"' in line:
                        n += 1
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*[stream() for _ in range(n_streams)])
        dt = time.perf_counter() - t0
        total = sum(counts)
        assert total == n_streams * n_tokens, (total, n_streams * n_tokens)
        out["stream"] = {
            "streams": n_streams,
            "tokens_each": n_tokens,
            "seconds": dt,
            "tokens_per_s": total / dt,
            "us_per_chunk": dt / total * 1e6,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return 0
    import httpx

    from parity.server.launcher import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
        res = asyncio.run(client(base, a.requests, a.streams, a.tokens))
    finally:
        proc.terminate()
        proc.wait(10)
    lat, st = res["latency_ms"], res["stream"]
    print(
        f"non-streaming chat, 1 output token, {a.requests} sequential requests: "
        f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms (measured)"
    )
    print(
        f"streaming: {st['streams']} concurrent x {st['tokens_each']} tokens in {st['seconds']:.2f} s = "
        f"{st['tokens_per_s']:.0f} tokens/s, {st['us_per_chunk']:.1f} us per chunk (measured)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
