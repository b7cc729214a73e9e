"""`parity estimate --num-devices`: the instance size sets the data-parallel degree."""

import pytest

from parity.cli import main


def test_num_devices_sets_data_parallel_size(capsys):
    assert (
        main(
            [
                "estimate",
                "--model",
                "v4-flash",
                "--hardware",
                "h200",
                "--num-devices",
                "8",
                "--tensor-parallel-size",
                "4",
                "--phase",
                "decode",
                "--batch-per-device",
                "8",
            ]
        )
        == 0
    )
    assert "TP4 x DP2 = 8 devices" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-devices", "7", "--tensor-parallel-size", "8"],
        ["--num-devices", "8", "--tensor-parallel-size", "2", "--data-parallel-size", "2"],
    ],
)
def test_num_devices_inconsistent_with_the_layout_is_one_line(flags, capsys):
    rc = main(
        [
            "estimate",
            "--model",
            "v4-flash",
            "--hardware",
            "h200",
            "--phase",
            "decode",
            "--batch-per-device",
            "8",
            *flags,
        ]
    )
    assert rc == 2 and "--num-devices" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,needle",
    [
        (
            ["--batch-per-device", "64", "--tensor-parallel-size", "99999999999"],
            "--tensor-parallel-size 99999999999: model field 'num_attention_heads' is 64, not divisible",
        ),
        (["--batch-per-device", "8", "--tensor-parallel-size", "16"], "'o_groups' is 8, not divisible"),
        (["--batch-per-device", "8", "--data-parallel-size", "9999"], "use at most 256 devices"),
        (
            ["--batch-per-device", "8", "--redundant-experts", "-3"],
            "--redundant-experts must be an integer >= 0, got -3",
        ),
        (["--phase", "prefill", "--tokens-per-device", "0"], "--tokens-per-device must be a finite number > 0, got 0"),
        (["--batch-per-device", "0"], "--batch-per-device must be a finite number > 0, got 0"),
        (["--batch-per-device", "nan"], "--batch-per-device must be a finite number > 0, got nan"),
        (["--batch-per-device", "8", "--mtp", "1", "--mtp-acceptance", "inf"], "--mtp-acceptance must be a finite"),
    ],
)
def test_estimate_refuses_impossible_inputs_in_one_line(flags, needle, capsys):
    assert main(["estimate", "--hardware", "h200", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_estimate_warns_when_the_batch_caches_do_not_fit(capsys):
    assert main(["estimate", "--hardware", "h200", "--batch-per-device", "10000000"]) == 0
    out = capsys.readouterr().out
    assert "warning: the caches of 10,000,000 sequences per device at 5,120 tokens need" in out
    assert "at most 1,871 sequences per device fit" in out
    assert main(["estimate", "--hardware", "h200", "--batch-per-device", "64"]) == 0
    assert "warning" not in capsys.readouterr().out
