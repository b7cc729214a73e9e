"""parity's C++ CPU ops for decode-sized row counts (weights streamed once), built on first use.

The sources are `parity/devices/csrc/int8_dot.cpp` (exact int8 x int8 -> int32 products),
`parity/devices/csrc/float_dot.cpp` (fp32 products over fp32 or bf16 weights) and
`parity/devices/csrc/row_argmax.cpp` (greedy argmax); `load()` compiles them once per machine with
`torch.utils.cpp_extension` (a C++ compiler and ninja, as inductor's CPU backend needs; ~17 s on AMD EPYC
Zen 3, 2 cores; cached in torch's extension directory, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``, then loaded in well under a second) and registers the torch ops with fakes
for tracing, so a compiled graph calls them as opaque ops:

- ``torch.ops.parity_native.float_linear(x [M, K] fp32, w [N, K] fp32 or bf16) -> fp32 [M, N]``: every
  product and sum in fp32 (bf16 widened exactly in registers), the weight read from memory once, row by row,
  each row against tiles of 2 activation rows with the activations cache-resident; each output's summation
  order is the same at every row count (batch-invariant). The decode LM head: inductor's
  broadcast-reduce over the 129,280 x 256 fp32 head read it at ~5 GB/s for 4 rows on AMD Zen 3 (26 ms of a
  44 ms step; docs/benchmarks.md "The float head on the C++ op"), as did MKL's sgemm.
  ``float_linear_rows(x, w, live int64 [1])``: the first ``live`` rows only, the rest zero (a compiled
  step's padded batch).
- ``torch.ops.parity_native.row_argmax(x [rows, n] fp32) -> int64 [rows]``: ``torch.argmax(x, -1)``'s
  indices in one sequential pass per row (`parity.devices.row_argmax`).

- ``torch.ops.parity_native.int8_gemm(xq [M, K] int8, wq [N, K] int8) -> int32 [M, N]``
- ``torch.ops.parity_native.int8_gathered_gemv(xq [R, K] int8, w [E, N, K] int8, ids [R] int64) -> int32
  [R, N]``: row r times expert ``ids[r]``'s matrix, read in place (the routed experts of a decode step).
- ``int8_linear(xq, x_scale [M], wq, w_scale [N]) -> fp32 [M, N]`` and ``int8_gathered_linear(xq, x_scale
  [R], w, w_scale [E, N], ids) -> fp32 [R, N]``: the same sums with the dequantizing rescale done as each is
  stored, ``float((double(sum) * double(x_scale[m])) * double(w_scale[n]))``, bit-identical to
  `parity.devices.int8_gemm.rescale_sums` to fp32, without the int32 [M, N] in memory and its separate
  float64 pass (the 129,280-row head at 8 rows: 2.9 vs 5.7 ms on 2 threads, benchmarks/decode_ops.py;
  docs/benchmarks.md "Greedy argmax and the fused INT8 rescale").

Both widen each int8 vector to int16 and multiply pairwise into int32 lanes (AVX2 ``vpmaddwd``: exact for
every int8 value, -128 included, for K < 131,072) in tiles of 4 weight rows x 2 activation rows (each widened
weight vector reused over the tile's rows), threads over output columns through torch's intra-op pool. It
exists because torch's own CPU INT8 GEMM (``torch._int_mm``) takes oneDNN's int8 kernels only on CPUs with
VNNI and otherwise runs a scalar loop (3-4 GOP/s on AMD Zen 3), and the widened fp32 GEMM reads and writes 4
bytes per weight (docs/benchmarks.md, "Low-precision weights on the CPU": the 129,280 x 256 int8 head at 8
rows, 1 thread, 6.3 ms here vs 19 ms).
On an x86 CPU with AVX-512 the build is ``avx512`` or ``avx512vnni`` (`cpu_isa`). With VNNI the INT8 tiles
run 32-lane (the fused ``vpdpwssd``; the same exact sums) where K is a multiple of 32: the 129,280 x 256 int8
head at 4-8 rows 1.17-1.22x the AVX2 build (AMD EPYC Zen 4, 1 thread, benchmarks/native_builds.py; the
gathered experts' result is not settled: docs/benchmarks.md "Zen 4 (AVX-512)"); without VNNI the AVX2
tiles. The float op keeps its eight-lane loops in every build (a sixteen-lane form was slower there) and
prefetches in AVX2 builds only. On an x86 CPU without AVX2 and on other
architectures the same loops build as plain C++.

A machine without a compiler, or a failing build, leaves `available()` False (logged once) and torch's
kernels (and the other INT8 kernels) in use; ``PARITY_NATIVE_KERNELS=0`` (or false / off / no) turns the ops
off without trying.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from parity.errors import first_line

log = logging.getLogger("parity.devices")

SOURCES = tuple(Path(__file__).parent / "csrc" / f for f in ("int8_dot.cpp", "float_dot.cpp", "row_argmax.cpp"))
#: Environment switch: "0" (or another of `OFF_VALUES`) keeps the C++ ops unloaded (torch's kernels serve,
#: and the other INT8 kernels of `parity.devices.int8_gemm`).
ENV_SWITCH = "PARITY_NATIVE_KERNELS"
#: The switch's earlier name (when the ops were INT8 only), still honoured.
OLD_ENV_SWITCH = "PARITY_NATIVE_INT8"

_state: dict[str, bool | str] = {}  # "ok": loaded; "isa": the build loaded; "why": why not
_lock = threading.Lock()


#: Environment override of the instruction set the ops are built for: one of `ISA_FLAGS`' names, at most what
#: this CPU has (e.g. ``avx2`` on an AVX-512 machine, to compare the two builds side by side).
ISA_SWITCH = "PARITY_NATIVE_ISA"
#: Compiler flags per instruction set, each including the one before it (a line from narrowest to widest: an
#: instruction set beside that line, like AVX-VNNI on AVX2 client CPUs, would need the order rethought).
#: ``avx512``: AVX-512 F/BW/VL/DQ (torch's "AVX512" capability); ``avx512vnni``: that plus AVX512-VNNI (the
#: int8 tiles' fused vpdpwssd).
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512vnni": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
}
#: The CPU features (torch.cpu.get_capabilities() names) each build needs, where torch reports them.
_ISA_FEATURES = {
    "generic": (),
    "avx2": ("avx2", "fma3"),
    "avx512": ("avx2", "fma3", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"),
    "avx512vnni": ("avx2", "fma3", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_vnni"),
}


def _widest_isa() -> str:
    """The widest build this CPU runs: torch's CPU capability ("AVX2", "AVX512"; it may be lowered by
    ``ATEN_CPU_CAPABILITY``), checked against the CPU's own feature flags where torch reports them
    (`torch.cpu.get_capabilities`, torch >= 2.6), which also say whether it has AVX512-VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        isa = "avx512vnni"
    elif capability == "AVX2":
        isa = "avx2"
    else:
        return "generic"
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    features = get_capabilities() if get_capabilities is not None else None
    order = list(ISA_FLAGS)
    if not isinstance(features, Mapping):  # no flags to read: VNNI from torch's own probe
        vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        return "avx512" if isa == "avx512vnni" and not vnni else isa
    while isa != "generic" and not all(features.get(f, False) for f in _ISA_FEATURES[isa]):
        isa = order[order.index(isa) - 1]
    return isa


def cpu_isa() -> str:
    """The widest of `ISA_FLAGS`' instruction sets this CPU runs (`_widest_isa`), lowered to
    ``$PARITY_NATIVE_ISA`` when that names a narrower one (surrounding blanks and case ignored; blank = unset).

    Raises:
        ValueError: ``$PARITY_NATIVE_ISA`` names no instruction set of `ISA_FLAGS`, or one wider than this
            CPU (as torch reports it) runs.
    """
    isa = _widest_isa()
    raw = os.environ.get(ISA_SWITCH, "")
    wanted = raw.strip().lower()
    if not wanted:
        return isa
    order = list(ISA_FLAGS)
    if wanted not in ISA_FLAGS:
        raise ValueError(f"{ISA_SWITCH}={raw!r}: expected one of {', '.join(order)}")
    if order.index(wanted) > order.index(isa):
        raise ValueError(
            f"{ISA_SWITCH}={raw!r}: this CPU runs at most {isa!r} (torch's CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()!r}, which ATEN_CPU_CAPABILITY may lower)"
        )
    return wanted


def _build_flags(isa: str | None = None) -> tuple[str, list[str]]:
    """(extension name, compiler flags) of the build for ``isa`` (default `cpu_isa()`): the name carries the
    instruction set it was built for, so a build cache shared by machines of different CPUs never hands one
    the other's binary."""
    isa = cpu_isa() if isa is None else isa
    return f"parity_native_{isa}", ["-O3", "-fopenmp", *ISA_FLAGS[isa]]


def load() -> bool:
    """Build (first time on this machine) and load the ops; True when ``torch.ops.parity_native`` has them.
    Thread-safe, tried once per process; a failure is logged with its reason and returns False. An AVX-512
    build that fails (an old compiler or assembler without AVX-512 support) is retried as the AVX2 build;
    `loaded_isa` says which one loaded."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _try_load()
        return _state["ok"]


def loaded_isa() -> str | None:
    """The instruction set of the build loaded in this process (an `ISA_FLAGS` name), None before `load` or
    when it failed."""
    return _state.get("isa")


def available() -> bool:
    """Whether the C++ ops can be used in this process (builds them on the first call, see `load`).
    Inside a compiled region it only reports what an earlier eager call found (no build while tracing)."""
    if torch.compiler.is_compiling():
        return _state.get("ok", False)
    return load()


#: Values of `ENV_SWITCH` that turn the ops off (blanks and case ignored).
OFF_VALUES = ("0", "false", "off", "no")


def switched_off() -> bool:
    """Whether ``$PARITY_NATIVE_KERNELS`` (or its earlier name ``$PARITY_NATIVE_INT8``) turns the ops off."""
    return _off_reason() is not None


def _off_reason() -> str | None:
    """``"off (NAME=value)"`` of the switch that turns the ops off, else None."""
    name = ENV_SWITCH if ENV_SWITCH in os.environ else OLD_ENV_SWITCH
    value = os.environ.get(name, "1")
    return f"off ({name}={value.strip()})" if value.strip().lower() in OFF_VALUES else None


def _missing_tool() -> str | None:
    """What a build would lack (ninja, a C++ compiler), else None."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH (set CXX or install g++)"
    return None


def status() -> str:
    """One line on the C++ ops for logs and `parity doctor`, without building them: the build loaded in this
    process, why they are off or unavailable, or which build a first use would load."""
    if _state.get("ok"):
        return f"{_state['isa']} build loaded"
    if "ok" in _state:
        return _state.get("why", "unavailable")
    if (off := _off_reason()) is not None:
        return off
    try:
        isa = cpu_isa()
    except ValueError as e:
        return f"unavailable ({e})"
    missing = _missing_tool()
    return f"unavailable ({missing})" if missing else f"{isa} build (built or loaded on first use)"


def _try_load() -> bool:
    if (off := _off_reason()) is not None:
        log.info("C++ kernels %s", off)
        _state["why"] = off
        return False
    try:
        from torch.utils import cpp_extension

        isa = cpu_isa()
        if (missing := _missing_tool()) is not None:
            raise RuntimeError(missing)
    except Exception as e:  # noqa: BLE001 - a bad override, no ninja: the other kernels serve
        log.warning("C++ kernels unavailable (%s: %s); using torch's kernels", type(e).__name__, e)
        _state["why"] = f"unavailable ({e})"
        return False
    # the chosen build, then for an AVX-512 one the AVX2 build (an old compiler or assembler without AVX-512);
    # an AVX2 build that fails would fail as plain C++ too (a source, header or disk problem)
    candidates = [isa, "avx2"] if isa.startswith("avx512") else [isa]
    for i, cand in enumerate(candidates):
        name, flags = _build_flags(cand)
        t0 = time.perf_counter()
        try:
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in SOURCES],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - no compiler, a build error: a narrower build, or torch's kernels
            if i + 1 < len(candidates):
                log.warning("C++ kernels: the %s build failed (%s); trying %s", cand, first_line(e), candidates[i + 1])
                continue
            log.warning("C++ kernels unavailable (%s); using torch's kernels", first_line(e))
            _state["why"] = f"unavailable (the {cand} build failed: {type(e).__name__})"
            return False
        try:
            _register_fakes()
        except Exception as e:  # noqa: BLE001 - the ops loaded but cannot be traced: torch's kernels serve
            log.warning("C++ kernels unavailable (registering their fakes failed: %s)", first_line(e))
            _state["why"] = f"unavailable (registering the fakes failed: {type(e).__name__})"
            return False
        _state["isa"] = cand
        log.info("C++ kernels %s ready in %.1f s", name, time.perf_counter() - t0)
        return True
    return False


def _register_fakes() -> None:  # once: `_try_load` runs once per process
    @torch.library.register_fake("parity_native::float_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("parity_native::float_linear_rows")
    def _(x: torch.Tensor, w: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("parity_native::row_argmax")
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0],), dtype=torch.long)

    @torch.library.register_fake("parity_native::int8_gemm")
    def _(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("parity_native::int8_gathered_gemv")
    def _(xq: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], w.shape[1]), dtype=torch.int32)

    @torch.library.register_fake("parity_native::int8_linear")
    def _(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("parity_native::int8_gathered_linear")
    def _(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, ids: torch.Tensor):
        return xq.new_empty((xq.shape[0], w.shape[1]), dtype=torch.float32)


def int8_gemm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """int8 xq [M, K] x int8 wq [N, K] -> the exact int32 sums [M, N] (CPU tensors; `available()` must be
    True). Raises RuntimeError naming the operand on a wrong dtype, rank, device or K."""
    return torch.ops.parity_native.int8_gemm(xq, wq)


def int8_gathered_gemv(xq: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row r of int8 xq [R, K] times int8 w[ids[r]] ([E, N, K] read in place) -> exact int32 sums [R, N].
    Raises RuntimeError on an expert id outside [0, E) or mismatched shapes."""
    return torch.ops.parity_native.int8_gathered_gemv(xq, w, ids)


def int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """int8 xq [M, K] (per-row fp32 x_scale [M]) x int8 wq [N, K] (per-row fp32 w_scale [N]) -> fp32 [M, N],
    the exact int32 sums rescaled in float64 and rounded once (as `int8_gemm` then
    `parity.devices.int8_gemm.rescale_sums` to fp32). Raises RuntimeError naming the operand on a wrong dtype,
    shape or K."""
    return torch.ops.parity_native.int8_linear(xq, x_scale, wq, w_scale)


def int8_gathered_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """`int8_gathered_gemv` rescaled as stored: row r -> fp32 sums[r, n] * x_scale[r] * w_scale[ids[r], n]
    (x_scale [R], w_scale [E, N]; float64 products rounded once) -> fp32 [R, N]. Raises RuntimeError as
    `int8_gathered_gemv`, and on scales of the wrong dtype or shape."""
    return torch.ops.parity_native.int8_gathered_linear(xq, x_scale, w, w_scale, ids)


def loaded() -> bool:
    """Whether the ops are loaded in this process already (never builds or loads them, unlike `available`)."""
    return _state.get("ok", False)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """The index of each row's first largest value of fp32 x [rows, n] (n >= 1; NaN the largest, the first
    NaN wins) -> int64 [rows], as ``torch.argmax(x, dim=-1)``, in one sequential pass per row. CPU tensors;
    the ops must be loaded. Raises RuntimeError naming what is wrong (dtype, rank, device, an empty row)."""
    return torch.ops.parity_native.row_argmax(x)


def float_linear(x: torch.Tensor, w: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x [M, K] x weight w [N, K] (fp32 or bf16, widened exactly) -> fp32 [M, N], all in fp32: equal to
    ``F.linear(x, w.float())`` up to summation order. ``live``: an int64 tensor of one value r (a compiled
    step's input, so the graph does not specialise on it): only rows < r are computed, the others are zero
    (a padded batch's scratch rows; r is clamped to [0, M]). CPU tensors; `available()` must be True. Raises
    RuntimeError naming the operand on a wrong dtype, rank, device or K, or a ``live`` that is not one int64
    CPU value."""
    if live is None:
        return torch.ops.parity_native.float_linear(x, w)
    return torch.ops.parity_native.float_linear_rows(x, w, live)
