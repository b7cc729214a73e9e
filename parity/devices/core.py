"""Device layer implementation (imports torch); see `parity.devices` for the public face."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from parity.devices import AUTO_ORDER, DIST_BACKEND, KNOWN_TYPES  # noqa: F401  (single definition)
from parity.devices.capability_table import lookup
from parity.errors import DeviceError

_npu_loaded: bool | None = None


def _load_torch_npu() -> bool:
    """Import `torch_npu` if it is installed (it registers the `npu` device). Never raises."""
    global _npu_loaded
    if _npu_loaded is None:
        _npu_loaded = False
        if importlib.util.find_spec("torch_npu") is not None:
            try:
                import torch_npu  # noqa: F401

                _npu_loaded = True
            except Exception:  # a broken CANN install must not stop CPU use
                _npu_loaded = False
    return _npu_loaded


def is_available(device_type: str) -> bool:
    """Whether a device type can be used in this process."""
    if device_type == "cpu":
        return True
    if device_type == "npu":
        if not _load_torch_npu():
            return False
        npu = getattr(torch, "npu", None)
        return bool(npu is not None and npu.is_available())
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        cur = acc.current_accelerator()
        if cur is not None and cur.type == device_type:
            return True
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "xpu":
        return bool(getattr(torch, "xpu", None) and torch.xpu.is_available())
    if device_type == "mps":
        return bool(torch.backends.mps.is_available())
    return False


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device request into a `torch.device`.

    Args:
        spec: "auto" (npu > cuda > xpu > mps > cpu), a type ("cpu", "cuda", "npu", "xpu", "mps"),
            a type with index ("cuda:1"), a `torch.device`, or None (same as "auto").
    Returns:
        torch.device with an explicit index for accelerators.
    Raises:
        DeviceError: unknown device type, the device is not available here, a non-numeric or negative
            index, or an index beyond this machine's devices (any index but 0 for "cpu").
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec).strip().lower()
    if spec == "auto":
        for t in AUTO_ORDER:
            if is_available(t):
                return resolve(t)
        return torch.device("cpu")
    dtype_part, _, index = spec.partition(":")
    if dtype_part not in KNOWN_TYPES:
        raise DeviceError(f"unknown device {spec!r}: expected one of auto, {', '.join(KNOWN_TYPES)} (optionally ':N')")
    if not is_available(dtype_part):
        avail = [t for t in KNOWN_TYPES if is_available(t)]
        raise DeviceError(f"device {spec!r} is not available on this machine; available: {', '.join(avail)}")
    if index and not (index.isascii() and index.isdigit()):
        raise DeviceError(f"device index in {spec!r} must be a non-negative integer")
    idx = int(index) if index else 0
    if dtype_part == "cpu":
        if idx != 0:
            raise DeviceError(f"device {spec!r} is not on this machine: the CPU is one device, cpu (or cpu:0)")
        return torch.device("cpu")
    count = device_count(dtype_part)
    if count is not None and idx >= count:
        raise DeviceError(
            f"device {spec!r} is not on this machine: it has {count} {dtype_part} device"
            f"{'s' if count != 1 else ''} ({dtype_part}:0 to {dtype_part}:{count - 1})"
        )
    return torch.device(dtype_part, idx)


def device_count(device_type: str) -> int | None:
    """How many devices of `device_type` this process sees (1 for "cpu"); None when its torch module does
    not say (no `device_count`)."""
    if device_type == "cpu":
        return 1
    count = getattr(getattr(torch, device_type, None), "device_count", None)
    if count is None:
        return None
    try:
        return int(count())
    except Exception:  # a driver that cannot be queried: leave the check to the first use
        return None


def dist_backend(device: torch.device | str) -> str:
    """torch.distributed backend name for a device: cpu->gloo, cuda->nccl, npu->hccl, xpu->xccl."""
    t = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    if t not in DIST_BACKEND:
        raise DeviceError(f"no distributed backend known for device type {t!r}")
    return DIST_BACKEND[t]


def _probe_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        (a @ a).sum().item()
        return True
    except Exception:
        return False


def supported_dtypes(device: torch.device | str) -> list[torch.dtype]:
    """Floating dtypes that can run a matmul on `device` (probed with a 2x2 matmul)."""
    device = resolve(device) if isinstance(device, str) else device
    cands = [torch.float32, torch.bfloat16, torch.float16]
    return [d for d in cands if _probe_dtype(device, d)]


def has_fp8(device: torch.device | str) -> bool:
    """Whether the device has a native FP8 e4m3 matmul (`torch._scaled_mm`): NVIDIA sm_89+ only.

    Ascend 910B/910C have no FP8 units (W8A8 INT8 instead); CPU dequantizes FP8 in software.
    """
    device = resolve(device) if isinstance(device, str) else device
    if device.type != "cuda" or not capabilities(device).fp8:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


def capabilities(device: torch.device | str = "auto"):
    """Number formats `device` supports (`parity.devices.capability_table.Capabilities`: fp8, float8_tensors,
    fp4, int8, bf16, the table entry and its source), from its name / compute capability and
    `parity/data/devices/capabilities.toml`; ``PARITY_DEVICE_NO_FP8=1`` turns FP8 off everywhere.

    Raises:
        DeviceError: unknown or unavailable device (`resolve`); unreadable capability table.
    """
    dev = resolve(device) if isinstance(device, str) else device
    sm = None
    name = ""
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        sm = major * 10 + minor
    if dev.type != "cpu":
        mod = getattr(torch, dev.type, None)
        try:
            name = mod.get_device_name(dev) if mod is not None and hasattr(mod, "get_device_name") else ""
        except Exception:
            name = ""
    return lookup(dev.type, name, sm)


def float8_tensors(device: torch.device | str = "auto") -> bool:
    """Whether float8 tensors may be created on `device` (False on Ascend 910B/910C and under
    ``PARITY_DEVICE_NO_FP8=1``: FP8 data is then kept as uint8 bytes)."""
    return capabilities(device).float8_tensors


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on `device` (no-op on CPU). Used for timing."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize(device)


def memory_info(device: torch.device | str) -> tuple[int, int]:
    """(free_bytes, total_bytes) of device memory. On CPU: available and total system RAM."""
    device = torch.device(device)
    if device.type == "cpu":
        try:
            info = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    k, v = line.split(":", 1)
                    info[k] = int(v.split()[0]) * 1024
            return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)
        except OSError:
            return 0, 0
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "mem_get_info"):
        free, total = mod.mem_get_info(device)
        return int(free), int(total)
    return 0, 0


def empty_cache(device: torch.device | str) -> None:
    """Release cached allocator blocks on accelerators (no-op on CPU)."""
    device = torch.device(device)
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


def manual_seed(device: torch.device | str, seed: int) -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed` (per-request sampling)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


@dataclass(frozen=True)
class DeviceInfo:
    type: str
    index: int | None
    name: str
    dist_backend: str
    total_memory_bytes: int
    dtypes: tuple[str, ...]


def describe(device: torch.device | str = "auto") -> DeviceInfo:
    """A summary of a device for `parity doctor` / `parity info` / bench environment records."""
    dev = resolve(device) if isinstance(device, str) else device
    name = "cpu"
    if dev.type != "cpu":
        mod = getattr(torch, dev.type, None)
        if mod is not None and hasattr(mod, "get_device_name"):
            try:
                name = mod.get_device_name(dev)
            except Exception:
                name = dev.type
    else:
        import platform

        name = platform.processor() or platform.machine()
    return DeviceInfo(
        type=dev.type,
        index=dev.index,
        name=name,
        dist_backend=DIST_BACKEND.get(dev.type, "gloo"),
        total_memory_bytes=memory_info(dev)[1],
        dtypes=tuple(str(d).removeprefix("torch.") for d in supported_dtypes(dev)),
    )


#: Graphs dynamo may keep per compiled region (its default is 8): one region (RMSNorm) sees several static
#: widths x (one token, many, empty); past the limit dynamo warns and runs the region eager.
RECOMPILE_LIMIT = 64


def compiler(device: torch.device | str, whole_model: bool = False, serial_kernels: bool = False):
    """A function ``fn -> compiled fn`` that applies ``torch.compile`` with the backend and mode
    `parity.devices.compile_backend` names for ``device``, with symbolic shapes (``dynamic=True``: one graph
    for every size of a dimension, plus one where it is 1). On an npu the backend is torch_npu's graph mode
    (``torchair.get_npu_backend()``).

    ``whole_model=True`` (the whole decode step, `parity.model.decode_graph`): static shapes except the
    dimensions the caller marks (``torch._dynamo.mark_dynamic``); no guards on nn.Module attributes
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: checking them costs ~2 ms per call of a
    whole-model graph, so the compiled function must only ever see modules that do not change after
    compiling); its own set of compiled entries (``isolate_recompiles``), so two compiled functions of the
    same code never share a graph; and on the CPU inductor's C++ wrapper.

    ``serial_kernels=True`` (with ``whole_model``, CPU only): inductor's own kernels run on one thread
    (``cpp.threads = 1``: no OpenMP region per kernel) while the ATen calls inside the graph (matmuls) keep
    torch's intra-op threads. A decode step is a few hundred small fused kernels; on 2 threads each one's
    fork/join and barriers cost more than the split gains (measured: the 6-layer benchmark miniature's
    batch-8 step 16.7 -> 13.8 ms at 2 threads, docs/benchmarks.md "Decode on the CPU"), so the
    multi-threaded decode step keeps its parallel work in a separate graph (`parity.model.decode_graph`).

    Raises:
        DeviceError: the device needs a backend that is not installed (torchair on npu).
    """
    from parity.devices import compile_backend

    device = torch.device(device)
    name, mode = compile_backend(device)
    backend = name
    if name == "torchair":
        if importlib.util.find_spec("torchair") is None:
            raise DeviceError(
                "the compiled step on npu needs torch_npu's graph mode (package 'torchair'); "
                "install torch_npu with torchair or run with --enforce-eager"
            )
        import torchair

        backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())

    dyn = torch._dynamo.config
    if name == "inductor":
        _load_inductor_store_prim()
    if device.type == "cpu":
        # parity's C++ ops are taken inside a graph only when loaded before it is traced (no build while
        # tracing; `native_kernels.available`): load them now (built once per machine; a failure is logged)
        from parity.devices import native_kernels

        native_kernels.load()  # `materialized` reads it inside the traced code (no import while tracing)

    def compile_fn(fn):
        if not whole_model:
            compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=True, fullgraph=False)
        else:
            # torch.compile takes a mode or options, not both: the mode's inductor options go in with the filter
            options = dict(torch._inductor.list_mode_options(mode)) if mode and name == "inductor" else {}
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            if name == "inductor" and device.type == "cpu":
                # C++ wrapper: the graph's ~300 tensor views and ~100 kernel launches per call without
                # Python (measured -0.45 ms of a 6.9 ms batch-1 step; docs/benchmarks.md)
                options["cpp_wrapper"] = True
                if serial_kernels:
                    options["cpp.threads"] = 1
            compiled = torch.compile(
                fn,
                backend=backend,
                mode=None if name == "inductor" else mode,
                options=options,
                dynamic=None,
                fullgraph=False,
                recompile_limit=RECOMPILE_LIMIT,
                isolate_recompiles=True,
            )

        @functools.wraps(fn)
        def call(*args, **kwargs):
            # dynamo's config overrides are per thread (ContextVars): the limit is raised in the thread
            # that runs the region (the server's engine thread), not only in the one that compiled it
            if not torch.compiler.is_compiling() and dyn.recompile_limit < RECOMPILE_LIMIT:
                dyn.recompile_limit = RECOMPILE_LIMIT
            return compiled(*args, **kwargs)

        return call

    compile_fn.backend_name, compile_fn.mode = name, mode
    return compile_fn


#: inductor's ``prims.inductor_force_stride_order`` (lowered to a stored buffer) once `compiler` has set up an
#: inductor compile; None before, or on a torch without the prim
_store_prim = None


def _load_inductor_store_prim() -> None:
    global _store_prim
    if _store_prim is None:
        try:
            import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

            _store_prim = torch.ops.prims.inductor_force_stride_order.default
        except (ImportError, AttributeError, RuntimeError):
            _store_prim = None


def materialized(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, stored once where inductor compiles the code: a hint for a value that later loops read
    many times each (a per-token quantized activation broadcast over every output row of a GEMV, a new cache
    row compared against every stored row). Inductor inlines an unstored elementwise producer into each
    consumer's loop, so such a value is recomputed at every element it is read at (measured: the gathered
    W8A8 experts of the benchmark miniature recomputed each token's activation quantization for each of their
    768 output rows; docs/benchmarks.md). Outside a compiled region, where the compile backend is not inductor
    (`parity.devices.COMPILE_BACKEND`), or on a torch without inductor's prim, ``x`` is returned as it is;
    never changes a value."""
    from parity.devices import compile_backend

    if _store_prim is None or not torch.compiler.is_compiling() or compile_backend(x.device)[0] != "inductor":
        return x
    return _store_prim(x, x.stride())
