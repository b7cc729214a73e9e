"""`parity estimate --num-devices`: the instance size sets the data-parallel degree."""

import pytest

from parity.cli import main


def test_num_devices_sets_data_parallel_size(capsys):
    assert main(["estimate", "--model", "v4-flash", "--hardware", "h200", "--num-devices", "8",
                 "--tensor-parallel-size", "4", "--phase", "decode", "--batch-per-device", "8"]) == 0
    assert "TP4 x DP2 = 8 devices" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--num-devices", "7", "--tensor-parallel-size", "8"],
                                   ["--num-devices", "8", "--tensor-parallel-size", "2", "--data-parallel-size", "2"]])
def test_num_devices_inconsistent_with_the_layout_is_one_line(flags, capsys):
    rc = main(["estimate", "--model", "v4-flash", "--hardware", "h200", "--phase", "decode",
               "--batch-per-device", "8", *flags])
    assert rc == 2 and "--num-devices" in capsys.readouterr().err
