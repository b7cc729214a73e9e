"""Bad command lines get the sub-command's usage and one line naming what is wrong (exit 2), never a traceback."""

from __future__ import annotations

import pytest

from parity import cli


@pytest.mark.parametrize(
    "argv,usage,line",
    [
        (["validate", "--bogus"], "parity validate", "parity validate: error: unrecognized argument --bogus"),
        (["doctor", "--bogus"], "parity doctor", "parity doctor: error: unrecognized argument --bogus"),
        (
            ["bench", "report", "x.json", "--out", "r.html", "--bogus"],
            "parity bench report",
            "parity bench report: error: unrecognized argument --bogus",
        ),
        (
            ["plan", "train", "--hardware", "910c", "--tokens", "-5T"],
            None,  # the flag's own check, not argparse's
            "parity plan train: error: --tokens must be a positive number of tokens, got '-5T'",
        ),
    ],
)
def test_errors_name_the_sub_command_and_the_problem(capsys, argv, usage, line):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's error: usage, then one line
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(line), err
    assert (usage is None and len(err) == 1) or err[0].startswith(f"usage: {usage} "), err


@pytest.mark.parametrize(
    "flags,line",
    [
        (
            ["--temperature", "-1"],
            "parity generate: error: Invalid value for '--temperature': -1.0; expected a number in [0, 2]",
        ),
        (["--device", "nodev"], "parity generate: error: unknown device 'nodev'"),
        (
            ["--max-tokens", "99999999"],  # the default miniature's context: 65,536 tokens
            "parity generate: error: --max-tokens (99999999) leaves no room for the prompt within max_model_len "
            "(65536): expected at most 65535",
        ),
        (
            ["--max-tokens", "64", "--max-model-len", "64"],
            "parity generate: error: --max-tokens (64) leaves no room for the prompt within max_model_len (64)",
        ),
    ],
)
def test_generate_checks_flags_before_loading_the_model(capsys, flags, line):
    """--temperature has the server's range and wording; a bad --device, or a --max-tokens that leaves no room for a
    prompt, fails before the loading line (and so before any compile)."""
    try:
        rc = cli.main(["generate", "--prompt", "hi", *flags])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith(line) and not any("loading" in x for x in err), err


@pytest.mark.parametrize("command", [["serve", "--port", "8123"], ["chat"]])
@pytest.mark.parametrize(
    "device,line",
    [
        ("nodev", "unknown device 'nodev'"),
        ("npu", "device 'npu' is not available on this machine"),  # no torch_npu here
    ],
)
def test_serve_and_chat_check_the_device_before_loading(capsys, monkeypatch, command, device, line):
    """A bad --device is one line naming it, before the loading message, the port bind or any worker start."""
    from parity import devices
    from parity.server import cli_args, serve_cli

    if devices.is_available(device):
        pytest.skip(f"{device} is available here")

    def no_load(*a, **k):
        raise AssertionError("nothing may load or bind with a bad --device")

    monkeypatch.setattr(cli_args, "build_engine", no_load)
    monkeypatch.setattr(serve_cli, "build_engine", no_load)
    monkeypatch.setattr("parity.server.launcher.bind_socket", no_load)
    rc = cli.main([*command, "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"parity {command[0]}: error: "), err
    assert line in err[0] and "loading" not in err[0], err


@pytest.mark.parametrize("flags,seqs", [([], 1), (["--n", "3"], 3), (["--n", "3", "--max-num-seqs", "2"], 2)])
def test_generate_holds_at_most_its_completions_in_a_step(monkeypatch, flags, seqs):
    """One prompt's n completions are the most sequences a decode step of `parity generate` holds, so its engine
    is built with max_num_seqs = min(n, --max-num-seqs): the compiled step warms only the buckets up to n."""
    import parity.engine

    class Built(BaseException):
        pass

    def fake_llm(**kwargs):
        raise Built(kwargs["max_num_seqs"])

    monkeypatch.setattr(parity.engine, "LLM", fake_llm)
    with pytest.raises(Built) as got:
        cli.main(["generate", "--prompt", "hi", *flags])
    assert got.value.args == (seqs,)


def test_generate_keeps_the_engines_error_for_a_bad_max_num_seqs(capsys):
    """--max-num-seqs 0 is refused by name (not silently raised to the completions' count)."""
    try:
        rc = cli.main(["generate", "--prompt", "hi", "--max-num-seqs", "0"])
    except SystemExit as e:
        rc = e.code
    assert rc != 0 and "--max-num-seqs must be a positive integer, got 0" in capsys.readouterr().err
