"""The only place in parity that knows about cuda / npu / xpu / mps / cpu.

Everything else asks this package for a `torch.device`, a distributed backend, dtype support, memory
figures or a synchronisation point, so the same code runs unchanged on CPU, NVIDIA (`cuda`), Ascend
(`npu`, via the optional `torch_npu` plug-in) and any other `torch.accelerator` backend.

The implementation lives in `parity.devices.core`; names are resolved lazily here so that importing
`parity.devices` (e.g. for energy meters or the CLI) does not import torch.
"""

from __future__ import annotations

AUTO_ORDER = ("npu", "cuda", "xpu", "mps", "cpu")
KNOWN_TYPES = AUTO_ORDER
#: torch.distributed backend per device type (HCCL: Ascend's collective library, via torch_npu;
#: XCCL: Intel's, torch >= 2.8; gloo on CPU).
DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo"}

#: Attention backend (a name registered in `parity.model.attention_backends`) per device type. Every
#: device runs the torch reference today; a fused sparse-attention kernel for a device registers its own
#: backend there and is named here.
ATTENTION_BACKEND = {"cpu": "torch", "cuda": "torch", "npu": "torch", "xpu": "torch", "mps": "torch"}

#: torch.compile (backend, mode) of the compiled decode step per device type: inductor (C++/OpenMP kernels on
#: the CPU, Triton on GPUs), with CUDA graphs ("reduce-overhead") on NVIDIA; on Ascend the graph mode of
#: torch_npu ("torchair": `torchair.get_npu_backend`, imported only on an npu).
COMPILE_BACKEND = {
    "cpu": ("inductor", None),
    "cuda": ("inductor", "reduce-overhead"),
    "npu": ("torchair", None),
    "xpu": ("inductor", None),
    "mps": ("inductor", None),
}

#: Whether the engine runs the compiled decode step unless told ``enforce_eager``, per device type: only where
#: it is measured faster than eager (docs/benchmarks.md, "Decode on the CPU": 2.3x at batch 1, 1.4x at 8).
COMPILE_BY_DEFAULT = {"cpu": True, "cuda": False, "npu": False, "xpu": False, "mps": False}

_LAZY = (
    "is_available",
    "resolve",
    "device_count",
    "dist_backend",
    "supported_dtypes",
    "has_fp8",
    "synchronize",
    "memory_info",
    "empty_cache",
    "manual_seed",
    "DeviceInfo",
    "describe",
    "capabilities",
    "float8_tensors",
    "compiler",
)

__all__ = [
    "AUTO_ORDER",
    "KNOWN_TYPES",
    "DIST_BACKEND",
    "ATTENTION_BACKEND",
    "COMPILE_BACKEND",
    "COMPILE_BY_DEFAULT",
    "attention_backend",
    "compile_backend",
    "compile_by_default",
    *_LAZY,
]


def attention_backend(device) -> str:
    """Name of the attention backend for ``device`` (a ``torch.device``, "cuda:1", "cpu", ...).

    Device types without an entry in `ATTENTION_BACKEND` get "torch" (the reference, any device).
    """
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    return ATTENTION_BACKEND.get(kind, "torch")


def _kind(device) -> str:
    return getattr(device, "type", None) or str(device).split(":", 1)[0]


def compile_backend(device) -> tuple[str, str | None]:
    """(torch.compile backend name, mode or None) for ``device``; unknown device types get inductor."""
    return COMPILE_BACKEND.get(_kind(device), ("inductor", None))


def compile_by_default(device) -> bool:
    """Whether the compiled decode step is the default on ``device`` (see `COMPILE_BY_DEFAULT`)."""
    return COMPILE_BY_DEFAULT.get(_kind(device), False)


def __getattr__(name):
    if name in _LAZY:
        from parity.devices import core

        return getattr(core, name)
    raise AttributeError(f"module 'parity.devices' has no attribute {name!r}")
