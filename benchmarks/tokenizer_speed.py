"""Tokenizer-pillar speed: load, encode, streaming detokenization, chat encoding, output parsing.

Side by side in one run:
* tokenizer load: cold (parse tokenizer.json) vs cached (``load_tokenizer`` again);
* streaming detokenization per token: ``IncrementalDetokenizer`` (bytes + incremental UTF-8 decoder,
  O(1)/token) vs the usual re-decode-a-window method (decode ids[prefix:] and ids[prefix:read] each step,
  hold back a trailing U+FFFD) - the method parity's engine used before this module;
* ``StreamingOutputParser`` fed token-sized deltas vs one ``parse_output`` of the whole text;
* ``encode_chat`` + ``encode`` of a 20-turn conversation with tools.

Targets: per-token streaming work (detokenize + parse) under 20 us, i.e. < 1% of a decode step
of even a fast engine (2 ms/token); load cached < 1 ms.

Run: ``.venv/bin/python benchmarks/tokenizer_speed.py``
"""

from __future__ import annotations

import json
import platform
import time

from parity.tokenizer import IncrementalDetokenizer, StreamingOutputParser, encode_chat, load_tokenizer, parse_output
from parity.tokenizer.tokenizer import _BY_CONTENT, _load_cached


def best(fn, repeat=5):
    """Best wall time of ``repeat`` runs (s)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class WindowDetokenizer:
    """Baseline: re-decode a window of ids each step; never release a trailing U+FFFD."""

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def add(self, ids):
        self.ids.extend(ids)
        head = self.tok.decode(self.ids[self.prefix : self.read])
        full = self.tok.decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") or len(full) <= len(head):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(head) :]


def main() -> None:
    _load_cached.cache_clear()
    _BY_CONTENT.clear()
    t0 = time.perf_counter()
    tok = load_tokenizer(None)
    cold_s = time.perf_counter() - t0
    cached_s = best(lambda: load_tokenizer(None), 50)

    text = "DeepSeek-V4 深度求索 supports a million-token context 🚀. def f(x): return x**2  # 平方\n" * 400
    ids = tok.encode(text)
    enc_s = best(lambda: tok.encode(text))

    def run_incr():
        d = IncrementalDetokenizer(tok)
        return "".join(d.add([i]) for i in ids) + d.flush()

    def run_window():
        d = WindowDetokenizer(tok)
        return "".join(d.add([i]) for i in ids)

    assert run_incr() == text and run_window() == text
    incr_s, window_s = best(run_incr, 3), best(run_window, 3)

    out = (
        "Let me think about the weather.</think>Checking.\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">' + "Paris 巴黎 " * 200 + "</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )
    out_ids = tok.encode(out)
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    chunks = [d.add([i]) for i in out_ids]

    def run_stream():
        p = StreamingOutputParser(thinking=True, tools_enabled=True)
        n = 0
        for c in chunks:
            n += len(p.feed(c))
        return n + len(p.finish())

    stream_s = best(run_stream)
    whole_s = best(lambda: parse_output(out, thinking=True))

    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{k}",
                "description": "does things",
                "parameters": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        }
        for k in range(8)
    ]
    msgs = [{"role": "system", "content": "You are helpful."}]
    for k in range(10):
        msgs += [
            {"role": "user", "content": f"question {k} " * 20},
            {"role": "assistant", "content": f"answer {k} " * 30, "reasoning_content": "r " * 30},
        ]
    msgs.append({"role": "user", "content": "last"})
    chat_s = best(lambda: tok.encode(encode_chat(msgs, tools=tools, thinking=True)))
    n_prompt = len(tok.encode(encode_chat(msgs, tools=tools, thinking=True)))

    res = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "tokenizer_load_cold_ms": round(cold_s * 1e3, 1),
        "tokenizer_load_cached_us": round(cached_s * 1e6, 1),
        "encode_tok_s": round(len(ids) / enc_s),
        "detok_incremental_us_per_token": round(incr_s / len(ids) * 1e6, 2),
        "detok_window_redecode_us_per_token": round(window_s / len(ids) * 1e6, 2),
        "detok_speedup_x": round(window_s / incr_s, 1),
        "stream_parse_us_per_token": round(stream_s / len(out_ids) * 1e6, 2),
        "whole_parse_us_per_token": round(whole_s / len(out_ids) * 1e6, 2),
        "chat_encode_plus_tokenize_ms": round(chat_s * 1e3, 2),
        "chat_prompt_tokens": n_prompt,
        "provenance": "measured",
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
