"""`parity bench` checks the endpoint and the model before it times anything, and never overwrites a results
file silently."""

from __future__ import annotations

import time

import pytest
from test_server_fakes import FakeEngine, start_fake_server

from parity import cli
from parity.server.launcher import free_port


@pytest.fixture(scope="module")
def server():
    srv = start_fake_server(FakeEngine(step_s=0.001))
    yield srv
    srv.stop()


def bench(capsys, *argv: str) -> tuple[int, list[str], str]:
    t0 = time.perf_counter()
    rc = cli.main(["bench", "--no-progress", "--energy", "none", "--num-prompts", "50", *argv])
    assert time.perf_counter() - t0 < 10
    cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines(), cap.out


def test_dead_server_is_one_line(capsys):
    rc, err, out = bench(capsys, "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "tiny")
    assert rc == 2 and len(err) == 1 and "cannot reach the server" in err[0] and out == ""


def test_wrong_model_is_one_line_listing_the_served_ones(capsys, server):
    rc, err, out = bench(capsys, "--base-url", server.base_url, "--model", "gpt-9")
    assert rc == 2 and len(err) == 1 and "'gpt-9' is not served" in err[0] and "tiny" in err[0] and out == ""


def test_existing_results_file_is_not_overwritten(capsys, server, tmp_path):
    out_file = tmp_path / "results.json"
    out_file.write_text("precious")
    rc, err, _ = bench(capsys, "--base-url", server.base_url, "--model", "tiny", "--output", str(out_file))
    assert rc == 2 and "--overwrite" in err[-1] and out_file.read_text() == "precious"
    rc, _, _ = bench(
        capsys,
        "--base-url",
        server.base_url,
        "--model",
        "tiny",
        "--workload",
        "fixed:in=4,out=2",
        "--num-prompts",
        "2",
        "--output",
        str(out_file),
        "--overwrite",
    )
    assert rc == 0 and out_file.read_text() != "precious"


def test_output_path_is_checked_before_any_request(capsys, tmp_path):
    # a dead server: the --output error must come first, before any connection is tried
    dead = f"http://127.0.0.1:{free_port()}"
    for bad, why in ((tmp_path / "nope" / "x.json", "does not exist"), (tmp_path, "is a directory")):
        rc, err, out = bench(capsys, "--base-url", dead, "--model", "tiny", "--output", str(bad))
        assert rc == 2 and len(err) == 1 and err[0].startswith("parity bench: error: --output") and why in err[0], err


@pytest.mark.parametrize("body", [{"data": "tiny"}, {"data": [{"name": "tiny"}]}, ["tiny"]])
def test_a_model_list_that_is_not_one_is_one_clear_line_for_bench_and_chat(monkeypatch, capsys, body):
    import httpx

    from parity import openai_client
    from parity.errors import RequestError

    monkeypatch.setattr(httpx, "get", lambda url, **kw: httpx.Response(200, json=body))
    rc, err, out = bench(capsys, "--base-url", "http://127.0.0.1:9", "--model", "tiny")
    assert rc == 2 and len(err) == 1 and "did not answer a model list" in err[0] and out == ""
    with pytest.raises(RequestError, match="did not answer a model list"):
        openai_client.first_model("http://127.0.0.1:9")
