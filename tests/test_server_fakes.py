"""A small fake of the AsyncEngine contract (parity.engine) for fast server tests, plus its self-tests.

The fake "model" writes a scripted answer for each prompt, one byte-token per step, on its own thread,
with continuous batching (max_num_seqs), a bounded waiting queue (EngineQueueFull), per-request cache
bytes (freed on finish/abort), stop strings and UTF-8-safe incremental text. Tokens are bytes + 3
(0 = BOS, 1 = EOS, 2 = pad), so any text round-trips.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from parity.engine import SamplingParams
from parity.errors import RequestError


class EngineQueueFull(RequestError):
    """Same name as the engine's exception; the server maps it to 429."""


class FakeTokenizer:
    bos_token_id = 0
    eos_token_id = 1
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([0] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i >= 3:
                out.append(i - 3)
            elif not skip_special_tokens:
                out += {0: b"<bos>", 1: b"<eos>", 2: b"<pad>"}[i]
        return out.decode("utf-8", errors="replace")


@dataclass
class FakeConfig:
    vocab_size: int = 259


# the server's tests use the engine's own parameter object (one definition of the fields and their checks)
FakeSamplingParams = SamplingParams


@dataclass
class Delta:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    stop_reason: Any = None
    error: str | None = None
    prompt_logprobs: list | None = None


def _prompt_logprobs(r) -> list | None:
    """With `prompt_logprobs`, the first delta scores the prompt: token i gets -0.5 (a rival, token 7, -2.0)."""
    if r.pos != 1 or r.params.prompt_logprobs is None:
        return None
    return [None] + [{t: -0.5, 7: -2.0} for t in r.prompt[1:]]


def default_respond(prompt: str) -> str:
    """The fake model's answer to a prompt text (see FakeChatFormat.encode)."""
    if "<tools>" in prompt and "weather" in prompt and "<tool_result>" not in prompt:
        body = '<tool>get_weather|{"city": "Paris"}</tool>'
        return ("I should call the tool.</think>" + body) if prompt.endswith("<think>") else body
    if "<tool_result>" in prompt:
        return "It is sunny in Paris."
    if prompt.endswith("<think>"):
        return "Let me think about 2+2.</think>The answer is 4."
    tail = prompt[-12:].replace("<", "").replace(">", "")
    return f"Echo: {tail} — ünïcödé 你好 🙂. " * 8


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: FakeSamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    answer: list[int]
    pos: int = 0
    text: str = ""
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())
    done: bool = False


class FakeEngine:
    """Implements `parity.server.engine_client.EngineClient` (the AsyncEngine contract the server uses)."""

    def __init__(
        self,
        *,
        max_model_len: int = 512,
        max_num_seqs: int = 8,
        max_waiting: int = 64,
        step_s: float = 0.002,
        respond=default_respond,
        bytes_per_token: int = 100,
        cache_total_bytes: int = 10_000_000,
        first_token_delay_s: float = 0.0,
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.config = FakeConfig()
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.step_s = step_s
        self.respond = respond
        self.bytes_per_token = bytes_per_token
        self.cache_total_bytes = cache_total_bytes
        self.first_token_delay_s = first_token_delay_s
        self._lock = threading.Lock()
        self._waiting: list[_Req] = []
        self._running: dict[str, _Req] = {}
        self._aborted: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = False
        self.shutdown_called = False
        self.aborts: list[str] = []
        self.seen_params: list[FakeSamplingParams] = []
        self.seen_prompts: list[list[int]] = []

    # -- lifecycle
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-engine")
        self._thread.start()
        self.started = True

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self.shutdown_called = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running and not self._waiting:
                    break
            await asyncio.sleep(0.01)
        with self._lock:
            for r in list(self._running.values()) + self._waiting:
                self._finish(r, "abort")
            self._waiting.clear()
            self._running.clear()
        self._stop.set()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 5)

    # -- stats
    def stats(self) -> dict[str, Any]:
        with self._lock:
            used = sum((len(r.prompt) + r.pos) * self.bytes_per_token for r in self._running.values())
            return {
                "num_running": len(self._running),
                "num_waiting": len(self._waiting),
                "cache_used_bytes": used,
                "cache_total_bytes": self.cache_total_bytes,
            }

    # -- requests
    def abort(self, request_id: str) -> None:
        with self._lock:
            self.aborts.append(request_id)
            r = self._running.pop(request_id, None)
            if r is None:
                for w in self._waiting:
                    if w.rid == request_id:
                        r = w
                        self._waiting.remove(w)
                        break
            if r is not None:
                self._finish(r, "abort")

    async def generate(self, prompt_token_ids: list[int], params: FakeSamplingParams, request_id: str):
        if not prompt_token_ids:
            raise RequestError("prompt_token_ids must not be empty")
        params.validate(self.config.vocab_size, self.max_model_len)
        self.seen_params.append(params)
        self.seen_prompts.append(list(prompt_token_ids))
        loop = asyncio.get_running_loop()
        prompt_text = self.tokenizer.decode(prompt_token_ids)
        answer = self.tokenizer.encode(self.respond(prompt_text))
        r = _Req(request_id, list(prompt_token_ids), params, loop, asyncio.Queue(), answer)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise EngineQueueFull(f"waiting queue full ({self.max_waiting} requests)")
            self._waiting.append(r)
        finished = False
        try:
            while True:
                d = await r.queue.get()
                yield d
                if d.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    # -- model thread
    def _finish(self, r: _Req, reason: str, stop_reason: Any = None) -> None:
        if r.done:
            return
        r.done = True
        d = Delta(r.rid, [], "", True, reason, None, stop_reason)
        r.loop.call_soon_threadsafe(r.queue.put_nowait, d)

    def _loop(self) -> None:
        while not self._stop.is_set():
            time.sleep(self.step_s)
            with self._lock:
                while self._waiting and len(self._running) < self.max_num_seqs:
                    w = self._waiting.pop(0)
                    self._running[w.rid] = w
                reqs = list(self._running.values())
            if reqs and self.first_token_delay_s and any(r.pos == 0 for r in reqs):
                time.sleep(self.first_token_delay_s)
            for r in reqs:
                with self._lock:
                    if r.done or r.rid not in self._running:
                        continue
                    self._step(r)

    def _step(self, r: _Req) -> None:
        p = r.params
        if r.pos >= len(r.answer):
            tok = 1  # EOS
        else:
            tok = r.answer[r.pos]
        r.pos += 1
        if r.pos == 3 and b"FAIL" in bytes(t - 3 for t in r.prompt if t >= 3):
            self._running.pop(r.rid, None)
            r.done = True
            d = Delta(r.rid, [], "", True, "abort", None, None, "model step failed: boom")
            r.loop.call_soon_threadsafe(r.queue.put_nowait, d)
            return
        if tok == 1 and not p.ignore_eos:
            self._running.pop(r.rid, None)
            r.done = True
            d = Delta(r.rid, [tok], "", True, "stop", [{1: -0.01, 5: -4.7}] if p.logprobs is not None else None)
            d.prompt_logprobs = _prompt_logprobs(r)
            r.loop.call_soon_threadsafe(r.queue.put_nowait, d)
            return
        text = r.decoder.decode(bytes([tok - 3])) if tok >= 3 else ""
        finished, reason, stop_reason = False, None, None
        if p.stop:
            full = r.text + text
            hit = [(full.find(s), s) for s in p.stop if s in full]
            if hit:
                at, s = min(hit)
                text = full[: at + (len(s) if p.include_stop_str_in_output else 0)][len(r.text) :]
                finished, reason, stop_reason = True, "stop", s
        r.text += text
        if not finished and (r.pos >= p.max_tokens or len(r.prompt) + r.pos >= self.max_model_len):
            finished, reason = True, "length"
        lp = [{tok: -0.25, (tok % 250) + 4: -1.6, 7: -3.0}] if p.logprobs is not None else None
        if finished:
            self._running.pop(r.rid, None)
            r.done = True
        d = Delta(r.rid, [tok], text, finished, reason, lp, stop_reason, prompt_logprobs=_prompt_logprobs(r))
        r.loop.call_soon_threadsafe(r.queue.put_nowait, d)


# ---- fake chat format ------------------------------------------------------------------------------
_TOOL_RE = re.compile(r"<tool>(.*?)\|(.*?)</tool>", re.S)


class FakeChatFormat:
    """Toy chat format: `<role>content` turns, `<tools>json`, `<assistant>`, then `<think>` in thinking
    mode; the answer is `reasoning</think>content` and tool calls are `<tool>name|{json}</tool>`."""

    def encode(self, messages, tools, thinking, reasoning_effort, **template_kw):
        out = []
        if tools:
            out.append("<tools>" + json.dumps(tools))
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise RequestError(f"messages[{i}].role: unknown role {m['role']!r}")
            if m["role"] == "tool":
                out.append(f"<tool_result>{m.get('content')}")
            else:
                out.append(f"<{m['role']}>{m.get('content') or ''}")
                for tc in m.get("tool_calls") or []:
                    out.append(f"<tool>{tc['function']['name']}|{tc['function']['arguments']}</tool>")
        out.append("<assistant>")
        if thinking:
            out.append("<think>")
        return "".join(out)

    def parse(self, text, thinking, tools_enabled=True, **parse_kw):
        reasoning = None
        if thinking:
            reasoning, sep, text = text.partition("</think>")
            if not sep:
                reasoning, text = reasoning, ""
        if not tools_enabled:
            return text, reasoning, []
        calls = [
            {"id": f"call_{i}", "type": "function", "function": {"name": m.group(1), "arguments": m.group(2)}}
            for i, m in enumerate(_TOOL_RE.finditer(text))
        ]
        content = _TOOL_RE.sub("", text)
        return content, reasoning, calls

    def stream_parser(self, thinking, tools_enabled, **parse_kw):
        return FakeStreamParser(thinking, tools_enabled)


class FakeStreamParser:
    def __init__(self, thinking: bool, tools_enabled: bool) -> None:
        self.mode = "reasoning" if thinking else "content"
        self.tools = tools_enabled
        self.buf = ""
        self.ncalls = 0

    def _hold(self, tag: str) -> int:
        """Length of a suffix of buf that may start `tag`."""
        for k in range(min(len(tag) - 1, len(self.buf)), 0, -1):
            if tag.startswith(self.buf[-k:]):
                return k
        return 0

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out: list[dict] = []
        while True:
            if self.mode == "reasoning":
                i = self.buf.find("</think>")
                if i >= 0:
                    if i:
                        out.append({"reasoning_content": self.buf[:i]})
                    self.buf = self.buf[i + len("</think>") :]
                    self.mode = "content"
                    continue
                k = self._hold("</think>")
                if len(self.buf) > k:
                    out.append({"reasoning_content": self.buf[: len(self.buf) - k]})
                    self.buf = self.buf[len(self.buf) - k :]
                return out
            if self.mode == "content":
                i = self.buf.find("<tool>") if self.tools else -1
                if i >= 0:
                    if i:
                        out.append({"content": self.buf[:i]})
                    self.buf = self.buf[i:]
                    self.mode = "tool"
                    continue
                k = self._hold("<tool>") if self.tools else 0
                if len(self.buf) > k:
                    out.append({"content": self.buf[: len(self.buf) - k]})
                    self.buf = self.buf[len(self.buf) - k :]
                return out
            m = _TOOL_RE.match(self.buf)
            if not m:
                return out
            out.append(
                {"tool_call": {"index": self.ncalls, "id": f"call_{self.ncalls}", "name": m.group(1), "arguments": ""}}
            )
            out.append({"tool_call": {"index": self.ncalls, "arguments": m.group(2)}})
            self.ncalls += 1
            self.buf = self.buf[m.end() :]
            self.mode = "content"

    def finish(self, finish_reason=None) -> list[dict]:
        rest, self.buf = self.buf, ""
        if not rest:
            return []
        return [{"reasoning_content": rest}] if self.mode == "reasoning" else [{"content": rest}]


# ---- self-tests ----------------------------------------------------------------------------------
def test_fake_stream_parser_matches_whole_parse():
    fmt = FakeChatFormat()
    text = 'Let me think.</think>Hi <tool>f|{"a": 1}</tool> bye'
    whole = fmt.parse(text, True)
    for split in range(len(text) + 1):
        p = fmt.stream_parser(True, True)
        items = p.feed(text[:split]) + p.feed(text[split:]) + p.finish()
        reasoning = "".join(i.get("reasoning_content", "") for i in items)
        content = "".join(i.get("content", "") for i in items)
        assert reasoning == whole[1] and content == whole[0], split
        assert [i["tool_call"]["name"] for i in items if "tool_call" in i and "name" in i["tool_call"]] == ["f"]


def test_fake_engine_generates_and_frees_cache():
    async def main():
        eng = FakeEngine(step_s=0.0005)
        await eng.start()
        ids = eng.tokenizer.encode("<user>hi<assistant>")
        text = ""
        async for d in eng.generate(ids, FakeSamplingParams(max_tokens=8), "r1"):
            text += d.new_text
        assert d.finished and d.finish_reason == "length" and text == default_respond("<user>hi<assistant>")[:8]
        assert eng.stats()["cache_used_bytes"] == 0
        await eng.shutdown(0.1)

    asyncio.run(main())


def start_fake_server(engine: FakeEngine, **settings: Any):
    """A `ThreadedServer` (127.0.0.1, drain 1 s) running the parity app over ``engine`` with the fake chat
    format and sampling params; ``settings``: ServerSettings fields (served model names default ["tiny"])."""
    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import ThreadedServer

    settings.setdefault("served_model_names", ["tiny"])
    app = build_app(
        engine, ServerSettings(**settings), chat_format=FakeChatFormat(), sampling_params_cls=FakeSamplingParams
    )
    return ThreadedServer(app, drain_timeout_s=1.0).start()
