"""`parity serve / generate / chat`: flags, SIGTERM drain of a real server process, the chat loop."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams

from parity.server.app import ServerSettings, build_app
from parity.server.launcher import ThreadedServer, free_port
from parity.server.serve_cli import default_model_name, parse_bytes, register

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def build_parser() -> argparse.ArgumentParser:
    """Only the server's sub-commands (parity.cli.build_parser imports every pillar)."""
    p = argparse.ArgumentParser(prog="parity")
    register(p.add_subparsers(dest="command"))
    return p


def test_flags_parse():
    p = build_parser()
    a = p.parse_args(
        [
            "serve",
            "--port",
            "9001",
            "--api-key",
            "k",
            "--max-num-seqs",
            "8",
            "--cache-memory",
            "2GiB",
            "--served-model-name",
            "v4",
            "--drain-timeout",
            "5",
        ]
    )
    assert (
        a.model,
        a.port,
        a.api_key,
        a.max_num_seqs,
        a.cache_memory,
        a.served_model_name,
        a.drain_timeout,
        a.host,
    ) == (None, 9001, "k", 8, 2 << 30, "v4", 5.0, "127.0.0.1")
    a = p.parse_args(["generate", "tiny", "--prompt", "hi", "--temperature", "0.7", "--stop", "x", "--stop", "y"])
    assert (a.model, a.prompt, a.temperature, a.stop) == ("tiny", "hi", 0.7, ["x", "y"])
    a = p.parse_args(["chat", "--base-url", "http://127.0.0.1:1", "--thinking"])
    assert a.base_url and a.thinking and a.func.__name__ == "run_chat"
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1000") == 1000
    with pytest.raises(Exception, match="size in bytes"):
        parse_bytes("lots")
    assert default_model_name(None) == "tiny" and default_model_name("v4-flash") == "v4-flash"


def test_chat_loop_streams_reasoning_separately():
    from rich.console import Console

    from parity.errors import RequestError
    from parity.openai_client import first_model, stream_chat
    from parity.server.serve_cli import chat_loop

    eng = FakeEngine(step_s=0.0005)
    app = build_app(
        eng,
        ServerSettings(served_model_names=["tiny"], api_key="k"),
        chat_format=FakeChatFormat(),
        sampling_params_cls=FakeSamplingParams,
    )
    lines = iter(["what is 2+2?", "/think off", "/reset", "hello", "/exit"])
    buf = io.StringIO()
    args = build_parser().parse_args(["chat", "--thinking", "--system", "be brief", "--max-tokens", "64"])
    with ThreadedServer(app) as srv:
        rc = chat_loop(
            srv.base_url,
            "tiny",
            api_key="k",
            args=args,
            read=lambda _: next(lines),
            console=Console(file=buf, width=200, color_system=None),
        )
        assert first_model(srv.base_url + "/v1", "k") == "tiny"
        with pytest.raises(RequestError, match="401"):
            list(stream_chat(srv.base_url, {"messages": [{"role": "user", "content": "x"}]}, api_key="bad"))
    with pytest.raises(RequestError, match="cannot reach"):
        first_model(f"http://127.0.0.1:{free_port()}")
    out = buf.getvalue()
    assert rc == 0
    assert "thinking: Let me think about 2+2." in out and "assistant> The answer is 4." in out
    assert "(thinking off)" in out and "(conversation cleared)" in out and "Echo:" in out


def test_chat_loop_skips_a_line_that_is_not_utf8_and_carries_on():
    """Bytes that are not UTF-8 reach input() as lone surrogates (surrogateescape): one-line error, then on."""
    from rich.console import Console

    from parity.errors import RequestError
    from parity.openai_client import stream_chat
    from parity.server.serve_cli import chat_loop, run_chat

    eng = FakeEngine(step_s=0.0005)
    app = build_app(
        eng,
        ServerSettings(served_model_names=["tiny"]),
        chat_format=FakeChatFormat(),
        sampling_params_cls=FakeSamplingParams,
    )
    bad = b"\xff\xfe bad".decode("utf-8", "surrogateescape")
    lines = iter(["hi", bad, "again", "/exit"])
    buf = io.StringIO()
    args = build_parser().parse_args(["chat", "--max-tokens", "4"])
    with ThreadedServer(app) as srv:
        rc = chat_loop(
            srv.base_url,
            "tiny",
            api_key=None,
            args=args,
            read=lambda _: next(lines),
            console=Console(file=buf, width=200, color_system=None),
        )
        with pytest.raises(RequestError, match="not valid UTF-8"):
            list(stream_chat(srv.base_url, {"messages": [{"role": "user", "content": bad}]}))
    out = buf.getvalue()
    assert rc == 0 and "input is not valid UTF-8" in out and out.count("assistant> Echo") == 2, out
    with pytest.raises(RequestError, match="--system.*UTF-8"):
        run_chat(build_parser().parse_args(["chat", "--base-url", "http://127.0.0.1:1", "--system", bad]))


def test_sampling_seed_out_of_range_is_one_clear_error_before_loading():
    from parity.errors import RequestError
    from parity.server.serve_cli import run_chat, run_generate

    for argv in (
        ["generate", "--prompt", "Hi", "--sampling-seed", "99999999999999999999999"],
        ["chat", "--base-url", "http://127.0.0.1:1", "--sampling-seed", "-99999999999999999999999"],
    ):
        args = build_parser().parse_args(argv)
        with pytest.raises(RequestError, match="'seed'"):
            args.func(args)
    assert run_generate and run_chat


def _drain_script(port: int, drain_s: float) -> str:
    return textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_server_fakes import FakeChatFormat, FakeEngine, FakeSamplingParams
        from parity.server.app import ServerSettings, build_app
        from parity.server.launcher import serve_forever
        eng = FakeEngine(step_s=0.005, max_model_len=100_000)
        app = build_app(eng, ServerSettings(drain_timeout_s={drain_s}), chat_format=FakeChatFormat(),
                        sampling_params_cls=FakeSamplingParams)
        rc = serve_forever(app, "127.0.0.1", {port}, drain_timeout_s={drain_s}, log_level="warning")
        print("EXIT", rc, "shutdown", eng.shutdown_called, "left", eng.stats()["cache_used_bytes"], flush=True)
        sys.exit(rc)
    """)


def _spawn(tmp_path: Path, drain_s: float):
    port = free_port()
    script = tmp_path / f"serve_{port}.py"
    script.write_text(_drain_script(port, drain_s))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc, base: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/health", timeout=0.5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)


def _stream_in_thread(base: str, max_tokens: int, out: dict) -> threading.Thread:
    started = threading.Event()

    def run():
        lines = []
        try:
            with httpx.stream(
                "POST",
                base + "/v1/completions",
                timeout=30,
                json={"prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True},
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        started.set()
        except httpx.HTTPError as e:
            out["error"] = repr(e)
        finally:
            started.set()
            out["lines"] = lines

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    return t


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits_cleanly_and_aborts_past_the_timeout(tmp_path):
    """Two server processes (started together to overlap their start-up): one with a 10 s drain limit and a
    request that needs ~0.3 s more (it completes), one with 0.3 s and a request that would need 25 s (it is
    cut off with an OpenAI error chunk and [DONE]). Both exit with status 0, engine shut down, cache empty."""
    procs = {}
    try:
        procs["drain"] = _spawn(tmp_path, drain_s=10.0)
        procs["cut"] = _spawn(tmp_path, drain_s=0.3)
        bases = {k: _wait_up(*v) for k, v in procs.items()}
        results = {"drain": {}, "cut": {}}
        threads = {
            "drain": _stream_in_thread(bases["drain"], 60, results["drain"]),
            "cut": _stream_in_thread(bases["cut"], 5000, results["cut"]),
        }
        t0 = time.monotonic()
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, (proc, _) in procs.items():
            rc = proc.wait(20)
            threads[name].join(10)
            log = proc.stdout.read()
            assert rc == 0, log
            assert "EXIT 0 shutdown True left 0" in log, log
        assert time.monotonic() - t0 < 10
        lines = results["drain"]["lines"]
        assert lines[-1] == "data: [DONE]", results["drain"]
        assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"
        cut = results["cut"]["lines"]  # cut off by the drain timeout: an error chunk, then [DONE]
        assert cut[-1] == "data: [DONE]", results["cut"]
        assert json.loads(cut[-2][5:])["error"]["code"] == "server_shutting_down"
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_ctrl_c_drains_with_a_message_then_a_second_exits_at_once_without_traceback(tmp_path):
    proc, base = _spawn(tmp_path, drain_s=30.0)
    try:
        _wait_up(proc, base)
        out: dict = {}
        t = _stream_in_thread(base, 5000, out)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # draining, not gone
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(10)
        log = proc.stdout.read()
        t.join(5)
        assert time.monotonic() - t0 < 5
        assert "draining 1 in-flight request" in log and "Ctrl-C again" in log, log
        assert "stopping now" in log and "Traceback" not in log, log
        assert rc == 0, log
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("extra", [[], ["--chat"]])
def test_generate_non_utf8_prompt_is_one_clear_error_before_loading(extra):
    from parity.errors import RequestError

    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # how Python decodes non-UTF-8 argv
    args = build_parser().parse_args(["generate", "--prompt", bad, "--max-tokens", "2", *extra])
    with pytest.raises(RequestError, match="^--prompt: the prompt is not valid UTF-8$"):
        args.func(args)


def test_chat_think_command_takes_on_or_off_only():
    from rich.console import Console

    from parity.server.serve_cli import chat_loop

    lines = iter(["/think maybe", "/think", "/think on", "/think", "/think OFF", "/think on off", "/help", "/exit"])
    buf = io.StringIO()
    args = build_parser().parse_args(["chat", "--max-tokens", "4"])
    rc = chat_loop(
        "http://127.0.0.1:1",
        "tiny",
        api_key=None,
        args=args,
        read=lambda _: next(lines),
        console=Console(file=buf, width=200, color_system=None),
    )
    out = buf.getvalue().splitlines()[1:]  # after the banner; no request is sent
    assert rc == 0 and out[0] == out[5] == "error: usage: /think on|off (/think alone shows whether thinking is on)"
    assert out[1:5] == ["(thinking off)", "(thinking on)", "(thinking on)", "(thinking off)"]
    assert "/think on|off (thinking mode; /think alone shows it)" in out[6]
