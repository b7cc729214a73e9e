"""Stopping `parity serve` / `parity chat` while the decode buckets still compile in the background: the warm-up
stops before its next bucket, and a bucket still compiling is cut short with one line and the command's exit
status instead of an abort in the interpreter teardown (fake slow warm-ups: nothing compiles)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from parity.engine import model_runner
from parity.errors import RequestError
from parity.server import cli_args

ROOT = Path(__file__).resolve().parent.parent


class BlockingGraph:
    """A DecodeGraph double whose warm-up of each bucket waits for `release`."""

    def __init__(self) -> None:
        self.ready: set[int] = set()
        self.started: list[int] = []
        self.release = threading.Event()

    def warm_up(self, buckets):
        (b,) = buckets
        self.started.append(b)
        self.release.wait(30)
        self.ready.add(b)
        return {b: 0.0}


def _wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_the_warm_up_stops_before_its_next_bucket():
    graph = BlockingGraph()
    thread = model_runner.start_background_warm_up(graph, (1, 2, 4), 1)
    assert thread.name == "parity-compile" and thread.daemon
    _wait_for(lambda: graph.started == [1])
    assert model_runner.stop_background_warm_ups(wait_s=0.01) == [1]  # bucket 1 is compiling: not interruptible
    graph.release.set()
    thread.join(10)
    assert not thread.is_alive() and graph.started == [1] and graph.ready == {1}  # buckets 2 and 4 stay eager
    assert model_runner.stop_background_warm_ups() == [] and model_runner._BACKGROUND == []


@pytest.mark.parametrize(
    "outcome, rc, line",
    [
        (lambda: 0, 0, None),
        (lambda: (_ for _ in ()).throw(RequestError("bad")), 2, "parity serve: error: bad"),
        (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130, "interrupted"),
    ],
)
def test_a_command_ending_mid_compile_exits_at_once_with_its_status(monkeypatch, capsys, outcome, rc, line):
    exits = []

    class Exited(BaseException):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    graph = BlockingGraph()
    thread = model_runner.start_background_warm_up(graph, (1, 2), 1)
    try:
        _wait_for(lambda: graph.started == [1])
        command = cli_args.exits_past_background_compiles(lambda args: outcome())
        with pytest.raises(Exited):
            command(type("Args", (), {"command": "serve"})())
    finally:
        graph.release.set()
        thread.join(10)
    err = capsys.readouterr().err.strip().splitlines()
    assert exits == [rc]
    assert err[-1] == (
        "parity serve: the background compile of the decode step was cut short (batch bucket 1 was compiling); "
        "exiting without it"
    )
    assert err[:-1] == ([line] if line else [])
    assert graph.started == [1]


def test_a_command_ending_with_no_compile_running_returns_normally(monkeypatch):
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("no compile runs: no os._exit"))
    assert cli_args.exits_past_background_compiles(lambda args: 3)(None) == 3
    with pytest.raises(RequestError):
        cli_args.exits_past_background_compiles(lambda args: (_ for _ in ()).throw(RequestError("x")))(None)


@pytest.mark.slow
def test_local_chat_exits_cleanly_while_a_bucket_compiles(tmp_path):
    """`parity chat` (local miniature, compiled step) ended by /exit while bucket 1 "compiles" (a 60 s sleep):
    exit status 0 within seconds, the cut-short line, and no interpreter teardown (atexit does not run)."""
    script = tmp_path / "chat.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, sys, time
            from parity import cli
            from parity.model.decode_graph import DecodeGraph

            def slow_warm_up(self, buckets=None):
                time.sleep(60)
                return {}

            DecodeGraph.warm_up = slow_warm_up
            atexit.register(lambda: print("interpreter teardown ran", flush=True))
            sys.exit(cli.main(["chat", "--no-enforce-eager", "--device", "cpu", "--max-tokens", "2"]))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(script)], input="Hi\n/exit\n", capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - t0 < 55
    assert "the background compile of the decode step was cut short (batch bucket 1 was compiling)" in r.stderr
    assert "interpreter teardown ran" not in r.stdout and "assistant>" in r.stdout
