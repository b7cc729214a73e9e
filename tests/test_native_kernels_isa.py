"""The instruction set parity's C++ ops are built for (`native_kernels.cpu_isa`), its override, and the
fallback to a narrower build when a wide one fails."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from parity.devices import native_kernels

ALL_FEATURES = {f: True for feats in native_kernels._ISA_FEATURES.values() for f in feats}


@pytest.fixture
def x86(monkeypatch):
    """A pretend x86 CPU: returns a setter of torch's capability string and the CPU's feature flags."""
    monkeypatch.delenv(native_kernels.ISA_SWITCH, raising=False)
    monkeypatch.setattr(native_kernels.platform, "machine", lambda: "x86_64")

    def cpu(capability: str, features: dict | None = None):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(ALL_FEATURES if features is None else features))

    return cpu


def test_cpu_isa_is_a_known_build_and_names_the_extension(monkeypatch):
    monkeypatch.delenv(native_kernels.ISA_SWITCH, raising=False)
    isa = native_kernels.cpu_isa()
    assert isa in native_kernels.ISA_FLAGS
    name, flags = native_kernels._build_flags()
    assert name == f"parity_native_{isa}"
    assert set(native_kernels.ISA_FLAGS[isa]) <= set(flags)
    if native_kernels.available():
        assert native_kernels.loaded_isa() in native_kernels.ISA_FLAGS


def test_cpu_isa_follows_the_capability_and_the_feature_flags(x86, monkeypatch):
    no_vnni = {**ALL_FEATURES, "avx512_vnni": False}
    no_bw = {**ALL_FEATURES, "avx512_bw": False}
    for capability, features, isa in (
        ("AVX512", None, "avx512vnni"),
        ("AVX512", no_vnni, "avx512"),
        ("AVX512", no_bw, "avx2"),  # torch's capability says AVX-512, the CPU lacks part of it
        ("AVX2", None, "avx2"),
        ("AVX2", {"avx2": True}, "generic"),  # no FMA
        ("DEFAULT", None, "generic"),
        ("NO AVX", None, "generic"),
        ("", None, "generic"),
    ):
        x86(capability, features)
        assert native_kernels.cpu_isa() == isa, (capability, features)
    monkeypatch.setattr(native_kernels.platform, "machine", lambda: "aarch64")
    assert native_kernels.cpu_isa() == "generic"


def test_cpu_isa_override_lowers_and_rejects_bad_names(x86, monkeypatch):
    x86("AVX512")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "generic")
    assert native_kernels.cpu_isa() == "generic"
    assert native_kernels._build_flags() == ("parity_native_generic", ["-O3", "-fopenmp"])
    monkeypatch.setenv(native_kernels.ISA_SWITCH, " AVX2 ")
    assert native_kernels.cpu_isa() == "avx2"
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "   ")  # blank = unset
    assert native_kernels.cpu_isa() == "avx512vnni"
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx9")
    with pytest.raises(
        ValueError, match=r"PARITY_NATIVE_ISA='avx9': expected one of generic, avx2, avx512, avx512vnni"
    ):
        native_kernels.cpu_isa()
    x86("AVX2")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx512")
    with pytest.raises(ValueError, match="this CPU runs at most 'avx2' \\(torch's CPU capability 'AVX2'"):
        native_kernels.cpu_isa()


def test_load_with_a_bad_override_or_no_ninja_turns_the_ops_off_with_a_warning(monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.delenv(native_kernels.ENV_SWITCH, raising=False)
    monkeypatch.delenv(native_kernels.OLD_ENV_SWITCH, raising=False)

    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx9")
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        assert native_kernels.load() is False
    assert native_kernels.loaded_isa() is None
    assert "PARITY_NATIVE_ISA='avx9'" in caplog.text and "using torch's kernels" in caplog.text
    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.delenv(native_kernels.ISA_SWITCH)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        assert native_kernels.load() is False
    assert "ninja is not installed" in caplog.text
    monkeypatch.setattr(native_kernels, "_state", {})
    assert native_kernels.status() == "unavailable (ninja is not installed (pip install ninja))"


def test_a_failed_avx512_build_falls_back_to_avx2(monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.delenv(native_kernels.ENV_SWITCH, raising=False)
    monkeypatch.delenv(native_kernels.OLD_ENV_SWITCH, raising=False)

    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setattr(native_kernels, "cpu_isa", lambda: "avx512vnni")
    monkeypatch.setattr(native_kernels, "_register_fakes", lambda: None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(native_kernels.shutil, "which", lambda name: "/usr/bin/" + name)
    tried = []

    def fake_load(name, extra_cflags, **kw):
        tried.append(name)
        if "-mavx512f" in extra_cflags:
            raise RuntimeError("Error building extension: no such instruction: vpdpwssd")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        assert native_kernels.load() is True
    assert tried == ["parity_native_avx512vnni", "parity_native_avx2"]
    assert native_kernels.loaded_isa() == "avx2"
    assert "the avx512vnni build failed (RuntimeError: Error building extension" in caplog.text
    assert "trying avx2" in caplog.text
    # every build failing: off, with the last reason
    monkeypatch.setattr(native_kernels, "_state", {})

    def failing_load(name, **kw):
        raise RuntimeError(f"Error building extension '{name}'")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="parity.devices"):
        assert native_kernels.load() is False
    assert "Error building extension 'parity_native_avx2'" in caplog.text and native_kernels.loaded_isa() is None
    assert native_kernels.status() == "unavailable (the avx2 build failed: RuntimeError)"
    # an AVX2 build that fails is not retried as plain C++ (it would fail the same way)
    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setattr(native_kernels, "cpu_isa", lambda: "avx2")
    tried.clear()
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: tried.append(name) or failing_load(name))
    assert native_kernels.load() is False and tried == ["parity_native_avx2"]
    # the ops loaded but their fakes cannot be registered: off, not an exception out of load()
    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: None)

    def bad_fakes():
        raise RuntimeError("fake already registered")

    monkeypatch.setattr(native_kernels, "_register_fakes", bad_fakes)
    assert native_kernels.load() is False and "registering the fakes failed" in native_kernels.status()


_PROBE = """
import json, sys, torch
from parity.devices import native_kernels as nk
assert nk.load(), "the C++ ops did not load"
g = torch.Generator().manual_seed(0)
out = {"isa": nk.loaded_isa()}
for m, k in ((1, 256), (5, 288), (8, 48), (3, 1024), (2, 20)):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (13, k), dtype=torch.int8, generator=g)
    x, w = torch.randn(m, k, generator=g), torch.randn(37, k, generator=g)
    out[f"{m}x{k}"] = [nk.int8_gemm(xq, wq).tolist(), nk.float_linear(x, w).tolist(),
                       nk.float_linear(x, w.bfloat16()).tolist()]
print(json.dumps(out))
"""


def _probe(isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != native_kernels.ISA_SWITCH}
    if isa is not None:
        env[native_kernels.ISA_SWITCH] = isa
    run = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_avx512_and_avx2_builds_give_the_same_bits():
    """An AVX-512 build's int8 sums (32-lane tiles with VNNI) and float products (the same eight-lane loops) equal the
    AVX2 build's bit for bit (each build in a process of its own: both register the same op names)."""
    if not native_kernels.cpu_isa().startswith("avx512") or not native_kernels.available():
        pytest.skip("needs a CPU with AVX-512 and the C++ ops")
    wide, avx2 = _probe(None), _probe("avx2")
    assert wide.pop("isa").startswith("avx512") and avx2.pop("isa") == "avx2"
    assert wide == avx2


@pytest.mark.slow
def test_the_widest_x86_build_compiles_on_narrower_cpus():
    """The sources compile with the widest build's flags (its code paths include the narrower ones') on an x86
    machine with a C++ compiler whose CPU runs a narrower build (a syntax-and-types pass, nothing loaded: an
    AVX-512 binary must not run on an AVX2 CPU); where the CPU runs the widest, the real build compiles it."""
    import platform
    import shutil

    from torch.utils import cpp_extension

    isa = list(native_kernels.ISA_FLAGS)[-1]
    compiler = os.environ.get("CXX", "c++")
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which(compiler) is None:
        pytest.skip("needs an x86 machine with a C++ compiler")
    if native_kernels.cpu_isa() == isa:
        pytest.skip(f"this CPU builds {isa} itself (the other tests load it)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    for src in native_kernels.SOURCES:
        cmd = [compiler, "-fsyntax-only", "-std=c++20", *native_kernels._build_flags(isa)[1], *includes, str(src)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{isa} {src.name}:\n{run.stderr[-3000:]}"


def test_the_off_switch_and_the_status_line(monkeypatch):
    monkeypatch.delenv(native_kernels.OLD_ENV_SWITCH, raising=False)
    for value, off in (("0", True), (" False ", True), ("off", True), ("NO", True), ("1", False), ("", False)):
        monkeypatch.setenv(native_kernels.ENV_SWITCH, value)
        assert native_kernels.switched_off() is off, value
    monkeypatch.setattr(native_kernels, "_state", {})
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "0")
    assert native_kernels.status() == "off (PARITY_NATIVE_KERNELS=0)"
    monkeypatch.delenv(native_kernels.ENV_SWITCH)
    monkeypatch.setenv(native_kernels.OLD_ENV_SWITCH, " Off ")
    assert native_kernels.status() == "off (PARITY_NATIVE_INT8=Off)"
    monkeypatch.delenv(native_kernels.OLD_ENV_SWITCH)
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "1")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx9")
    assert native_kernels.status().startswith("unavailable (PARITY_NATIVE_ISA='avx9'")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "generic")
    assert native_kernels.status() == "generic build (built or loaded on first use)"
    monkeypatch.setattr(native_kernels, "_state", {"ok": True, "isa": "avx2"})
    assert native_kernels.status() == "avx2 build loaded"
    monkeypatch.setattr(native_kernels, "_state", {"ok": False, "why": "unavailable (the generic build failed: X)"})
    assert native_kernels.status() == "unavailable (the generic build failed: X)"
