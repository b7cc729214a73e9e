"""Bad engine flags of `parity serve` / `generate` / `chat` are one line naming the flag, before the port is
bound or any loading message."""

from __future__ import annotations

import pytest

from parity import cli
from parity.server import chat_cli, cli_args, serve_cli
from parity.server.cli_args import ENGINE_FLAGS, engine_kwargs, flag_message

BAD_FLAGS = [
    (["--max-num-seqs", "0"], "--max-num-seqs must be a positive integer, got 0"),
    (["--max-model-len", "0"], "--max-model-len must be a positive integer, got 0"),
    (["--max-waiting", "0"], "--max-waiting must be a positive integer, got 0"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be a positive integer, got 0"),
    (["--cache-memory-fraction", "2"], "--cache-memory-fraction must be in (0, 1], got 2.0"),
    (["--dtype", "int8"], "--dtype is 'int8': expected one of "),
    (["--prefix-block-tokens", "7"], "--prefix-block-tokens is 7: expected a positive multiple of every "),
    (["--max-model-len", "100000000"], "--max-model-len (100000000) exceeds the model's max_position_embeddings"),
    (["--quantize-lm-head"], "--quantize-lm-head needs --quantization w8a8 or w4a8, got auto"),
    (["tiny", "--quantization", "w8a8"], "--quantization 'w8a8' needs a checkpoint directory; preset 'tiny' is "),
]


def _no_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("nothing may load or bind before the engine flags are checked")

    for mod in (serve_cli, chat_cli):
        monkeypatch.setattr(mod, "build_engine", fail)
    monkeypatch.setattr(serve_cli, "load_checkpoint_tokenizer", fail)
    import parity.server.launcher as launcher

    monkeypatch.setattr(launcher, "bind_socket", fail)


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_serve_names_the_flag_before_binding_or_loading(monkeypatch, capsys, flags, message):
    _no_loading(monkeypatch)
    rc = cli.main(["serve", "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"parity serve: error: {message}")


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_generate_and_chat_name_the_flag_before_loading(monkeypatch, capsys, command):
    _no_loading(monkeypatch)
    rc = cli.main([*command, "--device", "cpu", "--max-num-seqs", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"parity {command[0]}: error: --max-num-seqs must be a positive integer, got 0"]


def test_every_engine_field_has_its_flag_and_messages_are_rewritten():
    args = serve_cli_args()
    assert set(ENGINE_FLAGS) == set(engine_kwargs(args))
    assert flag_message("engine argument 'cache_memory' (1024 bytes) is smaller than one cache page") == (
        "--cache-memory (1024 bytes) is smaller than one cache page"
    )
    assert flag_message("--quantize-lm-head (engine argument 'quantize_lm_head') needs w8a8") == (
        "--quantize-lm-head needs w8a8"
    )
    assert flag_message("engine argument 'unknown_field' x") == "engine argument 'unknown_field' x"


def test_an_engine_error_after_loading_names_the_flag():
    from parity.errors import RequestError

    with pytest.raises(RequestError, match=r"^--cache-memory \(1024 bytes\) is smaller than one cache page"):
        with cli_args.engine_flag_errors():
            raise RequestError("engine argument 'cache_memory' (1024 bytes) is smaller than one cache page")


def serve_cli_args():
    import argparse

    p = argparse.ArgumentParser(prog="parity")
    serve_cli.register(p.add_subparsers(dest="command"))
    return p.parse_args(["serve"])
