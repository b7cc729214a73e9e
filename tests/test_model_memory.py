"""Weight-memory estimate and the refusal to build a model that cannot fit ."""

import sys

import pytest
import torch

from parity.config import load_preset
from parity.errors import DeviceError
from parity.model import memory


def _nbytes(model) -> int:
    """Bytes of every parameter and buffer (shared tensors once; the tiny RoPE tables left out)."""
    seen, n = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name or id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_equals_built_model_bytes(dtype):
    """What build_model allocates: the model (meta device here, for speed) cast with `to_dtype`."""
    from parity.model.deepseek_v4 import V4ForCausalLM

    cfg = load_preset("tiny")
    with torch.device("meta"):
        model = V4ForCausalLM(cfg).to_dtype(dtype)
    assert memory.estimate_weight_bytes(cfg, dtype, quantized=False) == _nbytes(model)


def test_estimate_equals_quantized_skeleton_bytes():
    """quantized=True matches the skeleton load_official fills (FP8 linears + scales, FP4 experts + scales,
    fp32 LM head / norms / mHC, dtype rest)."""
    from parity.checkpoint import official_reader
    from parity.checkpoint.layout import official_layout

    cfg = load_preset("tiny")
    lay = official_layout(cfg)
    m = official_reader._build_skeleton(cfg, torch.device("cpu"), torch.bfloat16, True, (128, 128), lay, False)
    assert memory.estimate_weight_bytes(cfg, "bf16", quantized=True) == _nbytes(m)
    assert memory.estimate_weight_bytes(cfg, "bf16", quantized=True, include_mtp=False) < _nbytes(m)


def test_estimate_of_the_published_models_is_torch_free_and_plausible():
    flash = load_preset("v4-flash")
    q = memory.estimate_weight_bytes(flash, "bfloat16", quantized=True) / 2**30
    assert 140 < q < 170  # the FP8/FP4 release is ~160 GB on disk (LM head here kept in fp32)
    bf16 = memory.estimate_weight_bytes(flash, "bfloat16") / 2**30
    assert 500 < bf16 < 600  # ~284B (+MTP) parameters x 2 bytes
    with pytest.raises(DeviceError, match="float8"):
        memory.estimate_weight_bytes(flash, "float8")


def test_refuses_v4_flash_with_a_clear_message(monkeypatch):
    from parity.model import build_model

    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    with pytest.raises(
        DeviceError,
        match=r"v4-flash needs ~\d+\.\d GiB in float32 on cpu, this device has "
        r"\d+\.\d GiB free.*PARITY_SKIP_MEMORY_CHECK=1",
    ):
        build_model(load_preset("v4-flash"))


def test_fake_small_device(monkeypatch):
    from parity import devices

    cfg = load_preset("tiny")
    need = memory.estimate_weight_bytes(cfg, "float32")
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(devices.core, "memory_info", lambda d: (need, 10 * need))  # fits, not with headroom
    with pytest.raises(DeviceError, match=r"tiny needs ~.* on cpu"):
        memory.check_fits(cfg, "cpu", torch.float32)
    assert memory.check_fits(cfg, "cpu", torch.float32, headroom=0.0) == need
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert memory.check_fits(cfg, "cpu", torch.float32) > need  # skipped: returns the requirement
    monkeypatch.delenv(memory.SKIP_ENV)
    monkeypatch.setattr(devices.core, "memory_info", lambda d: (0, 0))  # a backend without figures
    memory.check_fits(cfg, "cpu", torch.float32)


def test_cli_generate_and_export_refuse_cleanly(tmp_path, monkeypatch, capsys):
    from parity.cli import main

    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    assert main(["generate", "v4-flash", "--prompt", "Hi"]) == 2
    assert "v4-flash needs ~" in capsys.readouterr().err
    out = tmp_path / "pro"
    assert main(["export-tiny", str(out), "--preset", "v4-pro"]) == 2
    assert "v4-pro needs ~" in capsys.readouterr().err
    assert not out.exists()  # refused before creating anything


@pytest.mark.slow
def test_memory_module_imports_no_torch():
    import subprocess

    code = (
        "import sys; from parity.config import load_preset; from parity.model import memory; "
        "memory.estimate_weight_bytes(load_preset('v4-pro'), 'bf16', True); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
