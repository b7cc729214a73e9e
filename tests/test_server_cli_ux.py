"""The command line as a new user meets it: a taken port is found before loading, "ready" only once serving,
vLLM flags (mapped, unsupported with a reason, typos with a suggestion, the sub-command's usage), Ctrl-C in
`parity chat`, `parity generate`'s timing and streaming, `parity doctor` units, `python -m parity`."""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from test_server_fakes import FakeEngine

from parity import cli
from parity.server import serve_cli
from parity.server.launcher import free_port
from parity.server.vllm_flags import BY_NAME, VLLM_FLAGS, apply_mapped_flags, markdown_table

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity")
    serve_cli.register(p.add_subparsers(dest="command"))
    return p


# ----------------------------------------------------------------------------- start-up
def test_port_in_use_is_one_line_before_the_model_loads(monkeypatch, capsys):
    def no_load(args, model=None):
        raise AssertionError("the model must not load when the port is taken")

    monkeypatch.setattr(serve_cli, "build_engine", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        rc = cli.main(["serve", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and time.perf_counter() - t0 < 5
    assert err[-1].startswith("parity serve: error: port") and "in use" in err[-1]
    assert not any("ready:" in line for line in err)


def _ready_line(monkeypatch, capsys, argv, while_ready=None) -> str:
    """Run `parity serve` (a fake engine) with `argv` until ready; returns the ready line.
    `while_ready(host, port)` runs on a thread once ready, before the server is stopped."""
    fake = FakeEngine(step_s=0.001)
    fake.engine = SimpleNamespace(device="cpu")
    monkeypatch.setattr(serve_cli, "build_engine", lambda args, model=None: fake)
    import parity.server.launcher as launcher

    real = launcher.serve_forever
    seen = {}

    def serve(app, host, port, *, on_ready: Any, **kw):
        def ready(server):
            on_ready(server)
            seen["ready_line"] = capsys.readouterr().err

            def check():
                try:
                    if while_ready is not None:
                        while_ready(host, port)
                finally:
                    server.should_exit = True

            threading.Thread(target=check, daemon=True).start()

        return real(app, host, port, on_ready=ready, **kw)

    monkeypatch.setattr(launcher, "serve_forever", serve)
    args = parser().parse_args(["serve", *argv, "--log-level", "warning", "--drain-timeout", "0"])
    assert args.func(args) == 0
    return seen["ready_line"].strip().splitlines()[-1]


def test_ready_is_printed_once_serving_with_the_device(monkeypatch, capsys):
    seen = {}

    def health(host, port):
        seen["health"] = httpx.get(f"http://{host}:{port}/health", timeout=5).status_code

    port = free_port()
    line = _ready_line(monkeypatch, capsys, ["--port", str(port)], health)
    assert line.startswith("parity serve: ready: model 'tiny' on cpu") and f":{port}/v1" in line
    assert seen["health"] == 200


def _ipv6_loopback_port() -> int | None:
    """A free port on ::1, or None where this machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            return int(s.getsockname()[1])
    except OSError:
        return None


def test_urls_bracket_ipv6_hosts():
    from parity.server.launcher import http_url

    assert http_url("::1", 8202) == "http://[::1]:8202"
    assert http_url("127.0.0.1", 8202) == "http://127.0.0.1:8202"
    assert http_url("localhost", 80) == "http://localhost:80"


def test_ready_line_brackets_an_ipv6_host(monkeypatch, capsys):
    port = _ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback here")
    line = _ready_line(monkeypatch, capsys, ["--host", "::1", "--port", str(port)])
    assert line.endswith(f"at http://[::1]:{port}/v1")


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_empty_api_key_is_refused_before_anything_loads(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--api-key", ""])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert last == (
        f"parity {command}: error: argument --api-key: the key is empty; to use no authentication, pass no --api-key"
    )


def test_an_empty_parity_api_key_variable_is_refused():
    from parity.errors import ParityError
    from parity.server.cli_args import api_key_from

    with pytest.raises(ParityError, match="PARITY_API_KEY is set but empty"):
        api_key_from(None, {"PARITY_API_KEY": "  "})
    assert api_key_from(None, {}) is None
    assert api_key_from(None, {"PARITY_API_KEY": "k"}) == "k" and api_key_from("a", {"PARITY_API_KEY": ""}) == "a"


# ----------------------------------------------------------------------------- vLLM flags
def test_unsupported_vllm_flag_is_one_line_with_the_reason_and_the_serve_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--pipeline-parallel-size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: parity serve")
    last = err.strip().splitlines()[-1]
    assert last.startswith("parity serve: error: --pipeline-parallel-size (a vLLM flag) is not supported: ")


def test_typo_gets_the_closest_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--max-nun-seqs", "4"])
    err = capsys.readouterr().err
    assert "usage: parity serve" in err and "did you mean --max-num-seqs?" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "x", "--temprature", "0.5"])
    assert "did you mean --temperature?" in capsys.readouterr().err


def test_mapped_vllm_flags():
    a = parser().parse_args(
        [
            "serve",
            "--model",
            "v4-flash",
            "--gpu-memory-utilization",
            "0.8",
            "--max-model-len",
            "4096",
            "--served-model-name",
            "v4",
        ]
    )
    apply_mapped_flags(a)
    assert (a.model, a.cache_memory_fraction, a.max_model_len, a.served_model_name) == ("v4-flash", 0.8, 4096, "v4")
    a = parser().parse_args(["serve", "a", "--model", "b"])
    with pytest.raises(ValueError, match="given twice"):
        apply_mapped_flags(a)


def test_flag_table_agrees_with_the_serve_parser():
    serve = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    flags = set(serve._option_string_actions)
    for f in VLLM_FLAGS:
        assert f.status in ("supported", "mapped", "unsupported"), f
        if f.status == "supported":
            assert f.name in flags and f.parity == f.name, f
        elif f.status == "mapped":
            assert f.name in flags and f.note, f
        else:
            assert f.name not in flags and f.note, f
    for name in (
        "--model",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--served-model-name",
        "--tensor-parallel-size",
        "--enable-prefix-caching",
        "--enforce-eager",
        "--quantization",
    ):
        assert name in BY_NAME
    assert "| `--enforce-eager` | supported |" in markdown_table()


# ----------------------------------------------------------------------------- chat Ctrl-C
def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(monkeypatch):
    from rich.console import Console

    import parity.openai_client as oc

    calls = []

    def fake_stream(base_url, payload, api_key=None):
        calls.append([dict(m) for m in payload["messages"]])
        yield oc.Piece("content", "Once upon", None) if len(calls) == 1 else oc.Piece("content", "Sure.", None)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(oc, "stream_chat", fake_stream)
    lines = iter(["tell me a story", "shorter please"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    buf = io.StringIO()
    args = parser().parse_args(["chat", "--base-url", "http://x"])
    rc = serve_cli.chat_loop(
        "http://x", "tiny", api_key=None, args=args, read=read, console=Console(file=buf, width=200)
    )
    assert rc == 0 and "reply stopped" in buf.getvalue()
    assert calls[1] == [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "Once upon"},
        {"role": "user", "content": "shorter please"},
    ]


@pytest.mark.parametrize("model_args", [["/nonexistent/model"], ["--model", "nope"]])
def test_chat_refuses_a_local_model_with_base_url(monkeypatch, capsys, model_args):
    import parity.openai_client as oc

    def no_network(*a, **k):
        raise AssertionError("no request may be sent")

    monkeypatch.setattr(oc, "first_model", no_network)
    monkeypatch.setattr(oc, "stream_chat", no_network)
    rc = cli.main(["chat", *model_args, "--base-url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"parity chat: error: the local model {model_args[-1]!r} (MODEL or --model) has no ")
    assert "effect with --base-url" in err[0] and "--model-name NAME" in err[0]


# ----------------------------------------------------------------------------- generate, doctor, -m
def test_generate_streams_and_reports_load_and_decode_apart():
    from parity.engine import EngineArgs, LLMEngine, SamplingParams
    from parity.engine.testing import CharTokenizer, FakeModel

    eng = LLMEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=FakeModel(), tokenizer=CharTokenizer())
    echo = io.StringIO()
    out, first = serve_cli.generate_streaming(
        eng, [26, 27], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), echo=echo
    )
    assert echo.getvalue() == out.outputs[0].text and len(out.outputs[0].token_ids) == 8
    assert first is not None and first >= 0
    line = serve_cli.timing_line(12.5, 2, 8, 1.0, 0.2)
    assert "model loaded in 12.50 s" in line and "first token after 0.20 s" in line
    assert "decode 8.8 tokens/s" in line and "measured" not in line
    # a compiled decode step's share of the start-up is named apart from the load
    line = serve_cli.timing_line(12.5, 2, 8, 1.0, 0.2, compile_s=10.0)
    assert "model loaded in 2.50 s, decode step compiled in 10.00 s" in line


def test_generate_says_it_compiles_before_the_first_token():
    import torch

    cpu = torch.device("cpu")
    compiling = serve_cli.generate_loading_line(None, cpu, enforce_eager=False)
    assert compiling.startswith("parity generate: loading the default miniature on cpu, then compiling")
    assert "--enforce-eager skips it" in compiling and "minutes" in compiling
    assert "compiling" not in serve_cli.generate_loading_line("m", cpu, enforce_eager=True)


def test_doctor_prints_human_units(capsys):
    from parity.devices import doctor_cli

    assert doctor_cli.human_bytes(25275990016) == "23.5 GiB"
    doctor_cli.run(SimpleNamespace(json=False))
    out = capsys.readouterr().out
    assert "None" not in out and "total_memory_bytes" not in out
    assert "device memory" in out and ("GiB" in out or "MiB" in out or "-" in out)


def test_python_dash_m_parity_works():
    r = subprocess.run(
        [sys.executable, "-m", "parity", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("parity "), r.stderr


def test_setup_script_shows_its_steps():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q" not in text and text.count("step ") >= 3


def test_docs_server_md_holds_the_current_flag_table():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text(encoding="utf-8")
    assert markdown_table() in doc, "regenerate the table in docs/server.md from parity.server.vllm_flags"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["serve", "--model", "tiny", "/tmp/elsewhere"], "given twice"),
    ],
)
def test_bad_mapped_vllm_flag_is_one_line(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]


def test_chat_checks_model_name_against_the_server_before_the_session(monkeypatch, capsys):
    """`parity chat --base-url URL --model-name NAME` with a NAME the server does not list is one line naming
    what it serves, before any prompt is read (as parity bench checks --model)."""
    import parity.openai_client as oc
    from parity.server import chat_cli

    monkeypatch.setattr(oc, "served_models", lambda base_url, api_key=None, timeout_s=10.0: ["tiny"])

    def no_session(*a, **k):
        raise AssertionError("the session must not start")

    monkeypatch.setattr(chat_cli, "chat_loop", no_session)
    rc = cli.main(["chat", "--base-url", "http://127.0.0.1:9", "--model-name", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "parity chat: error: --model-name 'nope' is not served at http://127.0.0.1:9; it serves: tiny"
    ], err
