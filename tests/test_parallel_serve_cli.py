"""`parity serve -tp N` input checks made before any rank starts (fast: no process is spawned)."""

from __future__ import annotations

import pytest

from parity import cli
from parity.engine import worker


@pytest.fixture
def no_spawn(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("no worker may be spawned for a layout that cannot work")

    monkeypatch.setattr(worker, "launch_local", refuse)
    monkeypatch.setattr(worker, "join_torchrun", refuse)


@pytest.mark.parametrize("tp", ["3", "64"])
def test_layout_that_does_not_divide_the_model_is_one_line_before_spawning(no_spawn, capsys, tp):
    rc = cli.main(["serve", "tiny", "--device", "cpu", "-tp", tp])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert "num_attention_heads" in err[0] and f"tensor_parallel_size {tp}" in err[0]


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_nonpositive_distributed_timeout_is_one_line(no_spawn, capsys, value):
    rc = cli.main(["serve", "tiny", "--device", "cpu", "-tp", "2", f"--distributed-timeout={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--distributed-timeout must be a positive number of seconds" in err[0]


def test_rank_failure_marks_the_engine_failed_even_when_it_is_attached_later():
    from types import SimpleNamespace

    from parity.server.parallel_serve import ParallelServing

    class Engine:
        failure = None

        def mark_failed(self, e):
            self.failure = e

    exits = []
    model = SimpleNamespace(failed=None, close=lambda: None)
    serving = ParallelServing(model, None, exit=exits.append)
    serving.fail("rank 1 exited with code -9")
    late = Engine()
    serving.engine = late  # the failure came while the engine was being built
    assert "rank 1 exited with code -9" in str(late.failure)
