"""The instruction set parity's C++ ops are built for (`native_kernels.cpu_isa`) and its override."""

import pytest
import torch

from parity.devices import native_kernels


def test_cpu_isa_is_a_known_build_and_names_the_extension(monkeypatch):
    monkeypatch.delenv(native_kernels.ISA_SWITCH, raising=False)
    isa = native_kernels.cpu_isa()
    assert isa in native_kernels.ISA_FLAGS
    name, flags = native_kernels._build_flags()
    assert name == f"parity_native_{isa}"
    assert set(native_kernels.ISA_FLAGS[isa]) <= set(flags)


def test_cpu_isa_override_lowers_and_rejects_bad_names(monkeypatch):
    monkeypatch.delenv(native_kernels.ISA_SWITCH, raising=False)
    widest = native_kernels.cpu_isa()
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "generic")
    assert native_kernels.cpu_isa() == "generic"
    assert native_kernels._build_flags() == ("parity_native_generic", ["-O3", "-fopenmp"])
    monkeypatch.setenv(native_kernels.ISA_SWITCH, f" {widest.upper()} ")
    assert native_kernels.cpu_isa() == widest
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx9")
    with pytest.raises(ValueError, match=r"PARITY_NATIVE_ISA='avx9': expected one of generic, avx2"):
        native_kernels.cpu_isa()


def test_cpu_isa_follows_the_cpu_and_refuses_wider_builds(monkeypatch):
    monkeypatch.delenv(native_kernels.ISA_SWITCH, raising=False)
    monkeypatch.setattr(native_kernels.platform, "machine", lambda: "x86_64")
    for capability, vnni, isa in (("AVX2", True, "avx2"), ("AVX512", False, "avx512"), ("AVX512", True, "avx512vnni")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v, raising=False)
        assert native_kernels.cpu_isa() == isa
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert native_kernels.cpu_isa() == "generic"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx512")
    with pytest.raises(ValueError, match="this CPU runs at most 'avx2'"):
        native_kernels.cpu_isa()
    monkeypatch.setattr(native_kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setenv(native_kernels.ISA_SWITCH, "avx2")
    with pytest.raises(ValueError, match="this CPU runs at most 'generic'"):
        native_kernels.cpu_isa()
