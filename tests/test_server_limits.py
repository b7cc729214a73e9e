"""Server robustness against hostile or odd input: body size limit (413), event
loop stays responsive while a long prompt is tokenized, lone surrogates and deep JSON (400), seed range,
token-ids-only servers, completions logprobs offsets with special tokens, CLI flag validation, cache
budget larger than memory."""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import time

import httpx
import pytest
from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams

from parity.errors import CheckpointError, RequestError
from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer, free_port
from parity.server.logprobs import completion_logprobs
from parity.server.serve_cli import load_checkpoint_tokenizer, register
from parity.server.settings import default_max_request_bytes
from parity.server.state import OpenAIServer

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
JSON = {"Content-Type": "application/json"}


def start(engine: FakeEngine, **settings) -> ThreadedServer:
    settings.setdefault("served_model_names", ["tiny"])
    app = build_app(
        engine, ServerSettings(**settings), chat_format=FakeChatFormat(), sampling_params_cls=FakeSamplingParams
    )
    return ThreadedServer(app, drain_timeout_s=1.0).start()


@pytest.fixture(scope="module")
def server():
    srv = start(FakeEngine(step_s=0.001), max_request_bytes=100_000)
    yield srv
    srv.stop()


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


# ----------------------------------------------------------------------------- request-body limit
def test_body_over_limit_is_413_by_header_and_while_streaming(server):
    big = b'{"prompt": "' + b"a" * 200_000 + b'"}'
    e = err(httpx.post(server.base_url + CMPL, content=big, headers=JSON), 413)
    assert e["code"] == "request_too_large" and "100000" in e["message"]

    def chunks():  # no Content-Length: chunked transfer, refused while reading
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * 4096
        yield b'"}'

    e = err(httpx.post(server.base_url + CMPL, content=chunks(), headers=JSON), 413)
    assert e["code"] == "request_too_large"
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = httpx.post(server.base_url + CMPL, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ Content-Encoding of request bodies
def test_gzip_bodies_are_decoded_like_plain_ones(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "seed": 3}).encode()
    plain = httpx.post(server.base_url + CMPL, content=body, headers=JSON)
    assert plain.status_code == 200, plain.text
    for coding in ("gzip", "x-gzip", "GZIP", "identity, gzip"):
        r = httpx.post(
            server.base_url + CMPL, content=gzip.compress(body), headers={**JSON, "Content-Encoding": coding}
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    twice = gzip.compress(gzip.compress(body))
    r = httpx.post(server.base_url + CMPL, content=twice, headers={**JSON, "Content-Encoding": "gzip, gzip"})
    assert r.status_code == 200, r.text


def test_other_content_encodings_get_415_naming_them(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    for coding in ("br", "deflate", "gzip, zstd"):
        r = httpx.post(server.base_url + CMPL, content=body, headers={**JSON, "Content-Encoding": coding})
        e = err(r, 415)
        assert e["code"] == "unsupported_content_encoding" and repr(coding.split(", ")[-1]) in e["message"]
        assert r.headers["accept-encoding"] == "gzip"


def test_corrupt_gzip_is_a_400_and_a_gzip_bomb_a_413(server):
    good = gzip.compress(json.dumps({"prompt": "hi", "max_tokens": 1}).encode())
    flipped = good[:12] + bytes([good[12] ^ 0xFF]) + good[13:]
    for raw in (b"not gzip at all", good[: len(good) // 2], flipped, good + b"junk"):
        e = err(httpx.post(server.base_url + CMPL, content=raw, headers={**JSON, "Content-Encoding": "gzip"}), 400)
        assert e["code"] == "invalid_content_encoding" and "gzip" in e["message"]
    bomb = gzip.compress(b'{"prompt": "' + b"a" * 5_000_000 + b'"}')  # ~5 KB on the wire, 5 MB decoded
    e = err(httpx.post(server.base_url + CMPL, content=bomb, headers={**JSON, "Content-Encoding": "gzip"}), 413)
    assert e["code"] == "request_too_large" and "decompressed" in e["message"] and "100000" in e["message"]
    r = httpx.post(server.base_url + CMPL, json={"prompt": "hi", "max_tokens": 2})  # the server is unharmed
    assert r.status_code == 200, r.text


def test_default_body_limit_follows_max_model_len():
    assert default_max_request_bytes(4096) == 1 << 20
    assert default_max_request_bytes(1_000_000) == 32_000_000
    srv = OpenAIServer(FakeEngine(max_model_len=100_000), ServerSettings())
    assert srv.max_request_bytes == 3_200_000


def test_text_longer_than_context_can_hold_is_refused_before_tokenizing(server):
    # fake engine: max_model_len 512; no tokenizer backend -> 128 characters per token at most
    e = err(httpx.post(server.base_url + CMPL, json={"prompt": "a" * (512 * 128 + 1)}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "prompt"
    e = err(httpx.post(server.base_url + CHAT, json={"messages": [{"role": "user", "content": "a" * 70_000}]}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"


def test_health_answers_while_a_long_prompt_is_tokenized():
    """The real V4 tokenizer holds the GIL in `encode`; the server tokenizes with `encode_batch` on a worker
    thread, which releases it, so /health answers at once meanwhile."""
    from parity.tokenizer import load_tokenizer

    eng = FakeEngine(max_model_len=200_000)
    eng.tokenizer = load_tokenizer(None)
    srv = start(eng, max_request_bytes=8 << 20)
    try:
        text = "hello world " * 200_000  # 2.4 MB, ~400k tokens: ~1.3 s to tokenize, > max_model_len
        res = {}
        t = threading.Thread(
            target=lambda: res.update(r=httpx.post(srv.base_url + CMPL, json={"prompt": text}, timeout=60))
        )
        t.start()
        # server and client share this process (and its GIL): a stall shows as a long gap between polls
        worst_s, last = 0.0, time.perf_counter()
        while t.is_alive():
            assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
            now = time.perf_counter()
            worst_s, last = max(worst_s, now - last), now
            time.sleep(0.02)
        assert err(res["r"], 400)["code"] == "context_length_exceeded"
        assert worst_s < 0.6, worst_s  # ~1.7 s when tokenizing holds the GIL
    finally:
        srv.stop()


# ------------------------------------------------------------------ lone surrogates and deep JSON
@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"messages":[{"role":"user","content":"\\ud800"}]}', "messages.0.content"),
        (b'{"prompt":"ok \\udfff"}', "prompt"),
        (b'{"prompt":"x","stop":["\\ud83d"]}', "stop.0"),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(server, raw, param):
    path = CHAT if b"messages" in raw else CMPL
    e = err(httpx.post(server.base_url + path, content=raw, headers=JSON), 400)
    assert e["param"] == param and "surrogate" in e["message"]


def test_surrogate_pair_escape_is_fine(server):
    r = httpx.post(server.base_url + CMPL, content=b'{"prompt":"smile \\ud83d\\ude00","max_tokens":2}', headers=JSON)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [15_000, 100])
def test_deeply_nested_json_is_400(server, depth):
    raw = b'{"prompt":"x","user":' + b"[" * depth + b"]" * depth + b"}"
    e = err(httpx.post(server.base_url + CMPL, content=raw, headers=JSON), 400)
    assert e["code"] == "invalid_json" and "nested too deeply" in e["message"]
    tools = b'[{"type":"function","function":{"name":"f","parameters":' + b'{"a":' * depth + b"1" + b"}" * depth
    raw = b'{"messages":[{"role":"user","content":"x"}],"tools":' + tools + b"}}]}"
    assert err(httpx.post(server.base_url + CHAT, content=raw, headers=JSON), 400)["code"] == "invalid_json"


# ------------------------------------------------------------------------------------- seed range
@pytest.mark.parametrize("seed,n", [(99999999999999999999999, 1), (-(2**63) - 1, 1), (2**63 - 1, 2)])
def test_seed_out_of_range_names_seed(server, seed, n):
    e = err(httpx.post(server.base_url + CMPL, json={"prompt": "x", "seed": seed, "n": n}), 400)
    assert e["param"] == "seed" and e["code"] == "invalid_value" and str(2**63 - n) in e["message"]


def test_seed_at_range_ends_is_accepted(server):
    for seed in (2**63 - 1, -(2**63)):
        r = httpx.post(server.base_url + CMPL, json={"prompt": "x", "seed": seed, "max_tokens": 2})
        assert r.status_code == 200, r.text


# -------------------------------------------------------------------------- token-ids-only server
def test_token_ids_only_server_answers_text_requests_with_400():
    eng = FakeEngine()
    eng.tokenizer = None
    srv = start(eng)
    try:
        e = err(httpx.post(srv.base_url + CHAT, json={"messages": [{"role": "user", "content": "hi"}]}), 400)
        assert e["code"] == "tokenizer_unavailable" and e["param"] == "messages"
        e = err(httpx.post(srv.base_url + CMPL, json={"prompt": "hi"}), 400)
        assert e["code"] == "tokenizer_unavailable" and e["param"] == "prompt"
        e = err(httpx.post(srv.base_url + CMPL, json={"prompt": [5, 6], "echo": True}), 400)
        assert e["param"] == "echo"
        e = err(httpx.post(srv.base_url + CMPL, json={"prompt": [1.5, 2]}), 400)  # not token ids
        assert e["param"] == "prompt" and "a list of token ids (integers)" in e["message"]
        assert "got a list holding a number and an integer" in e["message"]
    finally:
        srv.stop()


def test_broken_tokenizer_json_stops_serve_and_generate_before_loading(tmp_path, capsys):
    from parity.cli import main

    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint_tokenizer(str(tmp_path))
    assert load_checkpoint_tokenizer(str(tmp_path), skip=True) is None
    assert load_checkpoint_tokenizer(None) == "auto"
    for cmd in (["serve", str(tmp_path), "--port", str(free_port())], ["generate", str(tmp_path), "--prompt", "Hi"]):
        assert main(cmd) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert "tokenizer.json" in lines[-1] and "error" in lines[-1] and "Traceback" not in "".join(lines)


# ------------------------------------------------------------------- completions logprobs offsets
def test_completion_logprobs_offsets_match_text_with_special_tokens():
    srv = OpenAIServer(FakeEngine(), ServerSettings())
    ids = [1, 3 + ord("h"), 3 + ord("i")]  # EOS-like special token first (fake: "<eos>" unless skipped)
    entries = [{i: -0.5} for i in ids]
    lp = completion_logprobs(srv.tokenizer, ids, entries, 1, 0, skip_special_tokens=True)
    text = srv.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "hi" and lp["tokens"] == ["<eos>", "h", "i"] and lp["text_offset"] == [0, 0, 1]
    assert all(text[o : o + len(t)] == t for t, o in zip(lp["tokens"][1:], lp["text_offset"][1:], strict=False))
    assert lp["top_logprobs"][0] == {"<eos>": -0.5}
    lp = completion_logprobs(srv.tokenizer, ids, entries, 1, 3, skip_special_tokens=False)
    assert lp["tokens"] == ["<eos>", "h", "i"] and lp["text_offset"] == [3, 8, 9]


class _BytesTokenizer:
    """Token i is `pieces[i]` (raw bytes, possibly part of a character)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def token_bytes(self, tid: int) -> bytes:
        return self.pieces[tid]

    def is_special(self, tid: int) -> bool:
        return False


@pytest.mark.parametrize(
    "pieces,text,offsets",
    [
        ([b"\xe0\xb2\xb0\xe0\xb3\x8d\xe0\xb2", b" Citations"], "\u0cb0\u0ccd\ufffd Citations", [0, 3]),
        ([b"\xe8", b"\xb5", b"\x8b", b"!"], "\u8d4b!", [0, 0, 0, 1]),  # one character over three tokens
        ([b"\xf0\x9f", b"A"], "\ufffdA", [0, 1]),  # a cut 4-byte character: one U+FFFD
        ([b"\xed", b"\xa0", b"\x9f", b"a"], "\ufffd\ufffd\ufffda", [0, 1, 2, 3]),  # a surrogate: 3 invalid bytes
        ([b"a\xe8", b"\xb5\x8b", b"\x80"], "a\u8d4b\ufffd", [0, 1, 2]),  # a stray continuation byte
    ],
)
def test_text_offset_is_the_character_a_tokens_first_byte_is_part_of(pieces, text, offsets):
    """Offsets into the text decoded with replacement (each invalid sequence one U+FFFD), split token by token
    and over two deltas sharing one decoder, as a stream does."""
    from parity.server.logprobs import text_decoder

    tok = _BytesTokenizer(pieces)
    assert b"".join(pieces).decode("utf-8", errors="replace") == text
    ids = list(range(len(pieces)))
    assert completion_logprobs(tok, ids, [None] * len(ids), 0, 0)["text_offset"] == offsets
    dec, released, got = text_decoder(), text_decoder(), []
    sent = 0  # characters of text sent in earlier deltas
    for part in (ids[:1], ids[1:]):
        got += completion_logprobs(tok, part, [None] * len(part), 0, sent, decoder=dec)["text_offset"]
        sent += len(released.decode(b"".join(pieces[i] for i in part)))
    assert got == offsets


def test_logprobs_name_special_tokens_of_the_real_tokenizer_by_their_own_string():
    """Placeholder/BOS tokens keep their own strings in `tokens` and as `top_logprobs` keys (as vLLM)."""
    from parity.server.logprobs import chat_logprobs
    from parity.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = [128380, 128480, 129166]
    entries = [{i: -1.0 - k for k, i in enumerate(ids)} for _ in ids]
    lp = completion_logprobs(tok, ids, entries, 3, 0, skip_special_tokens=True)
    names = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert lp["tokens"] == names and all(n for n in names) and len(set(names)) == 3
    assert list(lp["top_logprobs"][0]) == names
    assert [c["token"] for c in chat_logprobs(tok, ids, entries, 3)] == names


# --------------------------------------------------------------------- CLI flags and cache budget
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity")
    register(p.add_subparsers(dest="command"))
    return p


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--port", "-1"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--drain-timeout", "-1"], "--drain-timeout"),
        (["serve", "--drain-timeout", "nan"], "--drain-timeout"),
        (["serve", "--served-model-name", ""], "--served-model-name"),
        (["serve", "--max-request-bytes", "0"], "--max-request-bytes"),
        (["generate", "--prompt", ""], "--prompt"),
    ],
)
def test_bad_flags_are_refused_before_loading(argv, flag, capsys):
    with pytest.raises(SystemExit) as ei:
        _parser().parse_args(argv)
    assert ei.value.code == 2
    assert flag in capsys.readouterr().err


def test_good_new_flags_parse():
    a = _parser().parse_args(
        ["serve", "--port", "65535", "--drain-timeout", "0", "--max-request-bytes", "8MiB", "--skip-tokenizer-init"]
    )
    assert (a.port, a.drain_timeout, a.max_request_bytes, a.skip_tokenizer_init) == (65535, 0.0, 8 << 20, True)


def test_cache_memory_beyond_free_memory_is_a_named_error():
    from parity.engine.cache_pool import CachePool

    with pytest.raises(RequestError, match="cache_memory.*free memory"):
        CachePool(10 * 2**40, 1 << 20, "cpu")
