"""A model's CPU weights moved onto transparent huge pages (2 MiB pages, Linux).

Decode on the CPU streams every weight from memory once per step. On 4 KiB pages a 132 MB LM head spans
~32,000 pages: the page walks and the hardware prefetcher stopping at each page boundary cost bandwidth.
Measured on AMD EPYC Zen 4 (1 / 2 threads, ``parity_native::float_linear`` over the benchmark miniature's
129,280 x 256 fp32 head, medians of 3 rounds): 5.38-5.75 / 3.78-4.58 ms on 4 KiB pages vs 3.75 / 3.07-3.18 ms
on 2 MiB pages once the pages settled (docs/benchmarks.md, "Zen 4: weights on huge pages").

torch's CPU allocator advises huge pages only when ``THP_MEM_ALLOC_ENABLE=1`` is set before its first
allocation (c10 ``alloc_cpu``), which a library cannot arrange. So `place_on_huge_pages` copies a module's CPU
parameters and buffers, after loading, into one private anonymous mapping advised ``MADV_HUGEPAGE``
(Linux ``madvise(2)``; the kernel's ``/sys/kernel/mm/transparent_hugepage/enabled`` must be ``always`` or
``madvise``). Each tensor keeps its own storage (``torch.frombuffer`` over its slice of the mapping): no two
weights appear to share memory, saving a state dict writes each tensor's own bytes, and the mapping is
unmapped once the last of them is freed. Tensors that shared a storage still share one. The new storages
cannot be resized (weights are not). Tensor subclasses and pinned tensors stay where they are.

``PARITY_HUGE_PAGES=0`` (or false / off / no) leaves the weights where they are.
"""

from __future__ import annotations

import logging
import mmap
import os
import time

import torch

log = logging.getLogger("parity.devices")

#: The environment variable that turns the placement off ("0", "false", "off", "no").
SWITCH_ENV = "PARITY_HUGE_PAGES"
#: x86-64 and arm64 (4 KiB base pages) transparent huge page size in bytes
#: (/sys/kernel/mm/transparent_hugepage/hpage_pmd_size where present).
HUGE_PAGE_BYTES = 2 << 20
#: Each storage's start in the mapping is aligned to this many bytes (a cache line; inductor's kernels
#: take a tensor as aligned at 16 bytes).
STORAGE_ALIGN = 64
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_THP_PAGE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"; the bracketed word of ``path``),
    None where the file is missing or unreadable (not Linux, no THP)."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_page_bytes(path: str = _THP_PAGE) -> int:
    """The transparent huge page size in bytes (``path``), `HUGE_PAGE_BYTES` where unreadable."""
    try:
        n = int(open(path).read().strip())
    except (OSError, ValueError):
        return HUGE_PAGE_BYTES
    return n if n > 0 else HUGE_PAGE_BYTES


def switched_off() -> bool:
    """Whether `SWITCH_ENV` turns the placement off."""
    from parity.devices.native_kernels import OFF_VALUES

    return os.environ.get(SWITCH_ENV, "").strip().lower() in OFF_VALUES


def unavailable_reason() -> str | None:
    """None where weights can be placed on huge pages, else why not (a phrase)."""
    if switched_off():
        return f"{SWITCH_ENV} turns it off"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this system has no madvise(MADV_HUGEPAGE)"
    mode = thp_mode()
    if mode is None:
        return "the kernel has no transparent huge pages"
    if mode == "never":
        return "the kernel's transparent huge pages are off (never)"
    return None


def status() -> str:
    """Where a CPU engine's weights go, for `parity doctor`: "2 MiB transparent huge pages (THP madvise)" or
    "4 KiB pages (<why not>)"."""
    reason = unavailable_reason()
    if reason is not None:
        return f"4 KiB pages ({reason})"
    return f"{huge_page_bytes() >> 20} MiB transparent huge pages (THP {thp_mode()})"


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's distinct dense CPU parameters and buffers (each tensor object once; plain tensors and
    Parameters only, not pinned)."""
    seen, out = set(), []
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in seen or type(t) not in (torch.Tensor, torch.nn.Parameter):
            continue
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.is_pinned():
            continue
        seen.add(id(t))
        if t.untyped_storage().nbytes() > 0:
            out.append(t)
    return out


def advised_mapping(nbytes: int, huge: bool = True) -> tuple[mmap.mmap, int]:
    """(a private anonymous mapping, the offset in it of a huge-page boundary) with ``nbytes`` from that offset
    advised ``MADV_HUGEPAGE`` (``huge``) or ``MADV_NOHUGEPAGE``. Private: copy-on-write across fork (shared
    anonymous memory is shmem, whose huge pages follow another switch); one spare huge page for the alignment.

    Raises:
        OSError / ValueError: the kernel refused the mapping or the advice.
    """
    page = huge_page_bytes()
    size = _align(max(nbytes, 1), page)
    mapping = mmap.mmap(-1, size + page, flags=mmap.MAP_PRIVATE)
    lead = (-torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()) % page
    mapping.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE, lead, size)
    return mapping, lead


def _on(storage, t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's dtype, shape, strides and storage offset on ``storage``."""
    return torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride())


def place_on_huge_pages(module: torch.nn.Module) -> int:
    """Move ``module``'s CPU parameters and buffers onto transparent huge pages, in place (each tensor object
    keeps its identity, shape, strides and values; ``.data`` points at the new memory).

    Returns:
        The bytes placed (0: nothing moved, because `unavailable_reason` names why, the module has no CPU
        weights, or the kernel refused the mapping or the advice, which is logged; the weights then stay where
        they were). Storages are moved one by one (peak memory: the weights plus one storage); a copy that
        fails is logged and ends the move there: the storages moved keep their new memory, the rest their old.
    """
    reason = unavailable_reason()
    tensors = _weights(module)
    if reason is not None or not tensors:
        if reason is not None:
            log.info("weights stay on base pages: %s", reason)
        return 0
    groups: dict[int, list[torch.Tensor]] = {}  # storage address -> the tensors on it
    for t in tensors:
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    # two storages may start at one address with different lengths (views of one buffer): the longest
    sizes = {ptr: max(t.untyped_storage().nbytes() for t in ts) for ptr, ts in groups.items()}
    offsets, total = {}, 0
    for ptr, n in sizes.items():
        offsets[ptr] = total
        total = _align(total + n, STORAGE_ALIGN)
    t0 = time.perf_counter()
    try:
        mapping, lead = advised_mapping(total)
    except (OSError, ValueError) as e:
        log.warning("weights stay on base pages: the kernel refused a %d-byte huge-page mapping (%s)", total, e)
        return 0
    placed = 0
    try:
        with torch.no_grad():
            for ptr, ts in groups.items():  # storage by storage: each old one is freed as soon as it is copied
                n = sizes[ptr]
                dst = torch.frombuffer(mapping, dtype=torch.uint8, count=n, offset=lead + offsets[ptr])
                longest = max(ts, key=lambda t: t.untyped_storage().nbytes())
                dst.copy_(torch.empty(0, dtype=torch.uint8).set_(longest.untyped_storage()))
                storage = dst.untyped_storage()
                new = [_on(storage, t) for t in ts]  # all made before any tensor changes
                for t, moved in zip(ts, new, strict=True):
                    t.data = moved
                placed += n
    except Exception as e:  # noqa: BLE001 - an odd tensor must not stop loading: the rest stay put
        log.warning(
            "weights partly on base pages: moving them failed after %d bytes (%s: %s)", placed, type(e).__name__, e
        )
        return placed
    log.info(
        "weights on transparent huge pages: %d tensors, %.1f MB in %.2f s",
        len(tensors),
        total / 1e6,
        time.perf_counter() - t0,
    )
    return total
