"""Cache manager: one preallocated pool for every sequence's DeepSeek-V4 cache state.

DeepSeek-V4 keeps, per sequence and layer (paper §2.3; docs/numerics.md, "Cache layout"):
a sliding-window KV ring buffer (fixed size), the compressor's partial state for the unfinished
window (fixed size), compressed KV entries (growing, one per `ratio` tokens) and, on CSA layers,
the lightning indexer's keys (growing). The model describes each component with
`model.cache_layout(kv_cache_dtype)` and asks for storage through the `CacheAllocator` protocol
(`alloc(layer, component, shape, dtype)` / `release(tensor)`); growing components come in blocks of
`model.cache_block_entries` entries.

`CachePool` preallocates one byte buffer on the device (a budget in bytes, or a fraction of the free
device memory from `parity.devices.memory_info`) and carves it into fixed-size pages of
`page_bytes` (the largest slot of the layout, aligned). A page serves one slot size class: a size class
whose slots are smaller than a page packs several slots into it (a slab allocator), so no allocation
ever needs contiguous pages and the pool never fragments beyond one partly used page per size class.
Capacity checks are exact: `fits(demand)` answers whether a set of new slots can be served now.

`SequenceCache` is the per-sequence allocator handed to `model.new_state(allocator=...)`: it counts the
exact bytes (prod(shape) * itemsize) its sequence holds and releases everything on `free_all()`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from parity.devices import memory_info
from parity.errors import RequestError

#: Byte alignment of every slot (covers any dtype's itemsize and typical DMA alignment of accelerators).
ALIGN_BYTES = 256


class CachePoolExhausted(RuntimeError):
    """Raised by `CachePool.alloc` when no slot is free; the engine preempts and recomputes."""


def _align(n: int, a: int = ALIGN_BYTES) -> int:
    return (n + a - 1) // a * a


def _dtype_of(v) -> torch.dtype:
    if isinstance(v, torch.dtype):
        return v
    name = str(v).removeprefix("torch.")
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "fp8": "float8_e4m3fn",
        "float8": "float8_e4m3fn",
        "e4m3": "float8_e4m3fn",
    }
    name = aliases.get(name, name)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"cache_layout: unknown dtype {v!r}")
    return dt


@dataclass(frozen=True)
class LayoutEntry:
    """One cache component of one layer, normalised from `model.cache_layout()`.

    Attributes:
        layer: layer index; component: "window_kv" | "compressor_state" | "compressed_kv" | "index_keys" | ...
        shape: shape of one slot (fixed) or one block (growing); dtype: its dtype.
        nbytes: bytes of one slot/block (prod(shape) * itemsize).
        growing: True for components that grow with the sequence (allocated block by block).
        ratio: tokens per entry of a growing component (compression ratio); 1 for fixed ones.
        block_entries: entries per block of a growing component.
        count: slots of this shape per sequence for fixed components.
    """

    layer: int
    component: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    growing: bool
    ratio: int
    block_entries: int
    count: int = 1

    def slots_for(self, num_tokens: int) -> int:
        """Slots (fixed) or blocks (growing) a sequence of `num_tokens` tokens holds at most."""
        if num_tokens <= 0:
            return 0
        if not self.growing:
            return self.count
        entries = math.ceil(num_tokens / max(1, self.ratio))
        return math.ceil(entries / max(1, self.block_entries))


def _get(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def normalize_layout(layout: list[dict], block_entries: int | None = None) -> list[LayoutEntry]:
    """Turn `model.cache_layout()` into LayoutEntry records.

    Accepted keys per dict: layer, component (or name), shape, dtype, bytes/nbytes, kind/growth
    ("fixed" | "growing") or growing (bool), ratio/tokens_per_entry, block_entries, count.
    Raises:
        ValueError: an entry lacks layer/component/shape/dtype.
    """
    out = []
    for d in layout:
        try:
            layer = int(_get(d, "layer"))
            comp = str(_get(d, "component", "name"))
            shape = tuple(int(x) for x in _get(d, "shape"))
            dtype = _dtype_of(_get(d, "dtype"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"cache_layout entry {d!r} is malformed: {e}") from None
        kind = _get(d, "kind", "growth", "type", "allocation")
        growing = bool(_get(d, "growing", default=str(kind).lower() == "growing"))
        ratio = int(_get(d, "ratio", "tokens_per_entry", "compress_ratio", default=1) or 1)
        be = int(_get(d, "block_entries", "entries_per_block", default=block_entries or (shape[0] if shape else 1)))
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        count = int(_get(d, "count", "slots", default=1))
        out.append(LayoutEntry(layer, comp, shape, dtype, nbytes, growing, ratio, be, count))
    return out


class _SizeClass:
    __slots__ = ("slot_bytes", "per_page", "free", "pages")

    def __init__(self, slot_bytes: int, page_bytes: int):
        self.slot_bytes = slot_bytes
        self.per_page = page_bytes // slot_bytes
        self.free: dict[int, list[int]] = {}  # page -> free slot indices (pages with >= 1 free slot)
        self.pages: dict[int, int] = {}  # page -> used slots

    @property
    def free_slots(self) -> int:
        return sum(len(v) for v in self.free.values())


class CachePool:
    """A preallocated device buffer carved into pages and slots (implements `CacheAllocator`).

    Args:
        total_bytes: pool budget in bytes (rounded down to whole pages).
        page_bytes: page size in bytes (>= the largest slot; aligned to 256).
        device: torch device of the buffer.
    Raises:
        RequestError: budget smaller than one page, larger than the device's free memory, or not
            allocatable (names `cache_memory`).
    """

    @staticmethod
    def check_budget(total_bytes: int, page_bytes: int, device: torch.device | str) -> int:
        """The bytes a pool of ``total_bytes`` with pages of ``page_bytes`` allocates on ``device`` (whole
        pages). Raises RequestError (naming `cache_memory`) when that is less than one page or more than the
        device's free memory; the engine calls it before compiling, so a wrong budget fails at once."""
        page = _align(int(page_bytes))
        pages = int(total_bytes) // page
        if pages < 1:
            raise RequestError(
                f"engine argument 'cache_memory' ({total_bytes} bytes) is smaller than one cache page "
                f"({page} bytes): expected at least {page}"
            )
        nbytes = pages * page
        device = torch.device(device)
        free, _ = memory_info(device)
        if free and nbytes > free:
            raise RequestError(
                f"engine argument 'cache_memory' ({nbytes} bytes) exceeds the free memory of "
                f"{device} ({free} bytes): expected at most {free}, e.g. a smaller --cache-memory"
            )
        return nbytes

    def __init__(self, total_bytes: int, page_bytes: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        nbytes = self.check_budget(total_bytes, page_bytes, self.device)
        self.page_bytes = _align(int(page_bytes))
        self.num_pages = nbytes // self.page_bytes
        try:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # allocator out of memory
            raise RequestError(
                f"engine argument 'cache_memory' ({nbytes} bytes) could not be allocated on "
                f"{self.device}: {str(e).splitlines()[0]}; expected a smaller --cache-memory"
            ) from None
        self._free_pages = list(range(self.num_pages - 1, -1, -1))
        self._classes: dict[int, _SizeClass] = {}
        self._live: dict[int, tuple[int, int, int, int]] = {}  # data_ptr -> (slot_bytes, page, slot, nbytes)
        self.used_bytes = 0  # exact bytes of live tensors

    # ------------------------------------------------------------------ capacity
    @property
    def total_bytes(self) -> int:
        """Pool capacity in bytes (whole pages)."""
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def reserved_bytes(self) -> int:
        """Bytes of pages currently given to some size class (>= used_bytes)."""
        return (self.num_pages - len(self._free_pages)) * self.page_bytes

    def _class(self, nbytes: int) -> _SizeClass:
        sb = _align(nbytes)
        if sb > self.page_bytes:
            raise CachePoolExhausted(f"cache slot of {nbytes} bytes exceeds the page size {self.page_bytes}")
        c = self._classes.get(sb)
        if c is None:
            c = self._classes[sb] = _SizeClass(sb, self.page_bytes)
        return c

    def fits(self, demand: dict[int, int]) -> bool:
        """Whether `demand` (slot bytes -> number of new slots) can be allocated right now."""
        pages = 0
        for nbytes, n in demand.items():
            if n <= 0:
                continue
            c = self._class(nbytes)
            extra = n - c.free_slots
            if extra > 0:
                pages += math.ceil(extra / c.per_page)
        return pages <= len(self._free_pages)

    def capacity_slots(self, nbytes: int) -> int:
        """Slots of this size the whole pool could hold if empty."""
        return self.num_pages * (self.page_bytes // _align(nbytes))

    # ------------------------------------------------------------------ CacheAllocator protocol
    def alloc(self, layer: int, component: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape`/`dtype` carved from the pool (uninitialised, like torch.empty).

        Raises:
            CachePoolExhausted: no free slot of that size and no free page.
        """
        shape = tuple(int(s) for s in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        c = self._class(max(nbytes, 1))
        if not c.free:
            if not self._free_pages:
                raise CachePoolExhausted(
                    f"cache pool exhausted: {self.total_bytes} bytes in {self.num_pages} pages all in use "
                    f"(layer {layer}, component {component!r}, {nbytes} bytes)"
                )
            page = self._free_pages.pop()
            c.free[page] = list(range(c.per_page - 1, -1, -1))
            c.pages[page] = 0
        page = next(iter(c.free))
        slots = c.free[page]
        slot = slots.pop()
        if not slots:
            del c.free[page]
        c.pages[page] += 1
        off = page * self.page_bytes + slot * c.slot_bytes
        t = self.buffer[off : off + nbytes].view(dtype).view(shape)
        self._live[t.data_ptr()] = (c.slot_bytes, page, slot, nbytes)
        self.used_bytes += nbytes
        return t

    def release(self, tensor: torch.Tensor) -> None:
        """Return a tensor obtained from `alloc` to the pool (unknown tensors are ignored)."""
        rec = self._live.pop(tensor.data_ptr(), None)
        if rec is None:
            return
        sb, page, slot, nbytes = rec
        c = self._classes[sb]
        c.free.setdefault(page, []).append(slot)
        c.pages[page] -= 1
        self.used_bytes -= nbytes
        if c.pages[page] == 0:
            del c.pages[page]
            del c.free[page]
            self._free_pages.append(page)

    def stats(self) -> dict:
        """Pool usage for metrics: bytes (exact), reserved page bytes, total, live tensors."""
        return {
            "cache_used_bytes": self.used_bytes,
            "cache_reserved_bytes": self.reserved_bytes,
            "cache_total_bytes": self.total_bytes,
            "cache_free_pages": len(self._free_pages),
            "cache_pages": self.num_pages,
            "cache_live_tensors": len(self._live),
        }


class SequenceCache:
    """Per-sequence `CacheAllocator` over a `CachePool` (or plain torch.empty when pool is None).

    Tracks what its sequence holds so that `nbytes` is exact and `free_all()` returns everything.
    """

    def __init__(self, pool: CachePool | None, device: torch.device | str = "cpu"):
        self.pool = pool
        self.device = torch.device(device)
        self.nbytes = 0
        self._held: dict[int, tuple[torch.Tensor, int, str]] = {}  # data_ptr -> (tensor, layer, component)
        self.counts: dict[tuple[int, str], int] = defaultdict(int)

    def alloc(self, layer: int, component: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.pool is not None:
            t = self.pool.alloc(layer, component, shape, dtype)
        else:
            t = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self._held[t.data_ptr()] = (t, int(layer), str(component))
        self.counts[(int(layer), str(component))] += 1
        self.nbytes += t.numel() * t.element_size()
        return t

    def release(self, tensor: torch.Tensor) -> None:
        rec = self._held.pop(tensor.data_ptr(), None)
        if rec is None:
            return
        t, layer, comp = rec
        self.counts[(layer, comp)] -= 1
        self.nbytes -= t.numel() * t.element_size()
        if self.pool is not None:
            self.pool.release(t)

    def free_all(self) -> None:
        """Release every tensor this sequence still holds."""
        for t, _, _ in list(self._held.values()):
            self.release(t)

    def demand(self, layout: list[LayoutEntry] | LayoutGroups, num_tokens_after: int) -> dict[int, int]:
        """New slots (slot bytes -> count) needed to hold `num_tokens_after` tokens, an upper bound.

        Fixed components count as needed while this sequence holds none of that (layer, component);
        growing ones as ceil(ceil(tokens / ratio) / block_entries) blocks minus those already held.
        `layout` may be pre-grouped with `group_layout` (the scheduler does, once).
        """
        groups = layout if isinstance(layout, LayoutGroups) else group_layout(layout)
        need: dict[int, int] = {}
        if num_tokens_after <= 0:
            return need
        counts = self.counts
        for key, fixed in groups.fixed:
            if counts.get(key, 0) == 0:
                for sb, c in fixed:
                    need[sb] = need.get(sb, 0) + c
        for key, e, sb in groups.growing:
            n = e.slots_for(num_tokens_after) - counts.get(key, 0)
            if n > 0:
                need[sb] = need.get(sb, 0) + n
        return need


class LayoutGroups:
    """A layout grouped per (layer, component) for fast demand estimates (see `group_layout`)."""

    def __init__(self, fixed, growing):
        self.fixed: list[tuple[tuple[int, str], list[tuple[int, int]]]] = fixed
        self.growing: list[tuple[tuple[int, str], LayoutEntry, int]] = growing


def group_layout(layout: list[LayoutEntry]) -> LayoutGroups:
    """Group layout entries: fixed (layer, component) groups with their (slot bytes, count), and growing
    entries with their aligned block bytes."""
    groups: dict[tuple[int, str], list[LayoutEntry]] = defaultdict(list)
    for e in layout:
        groups[(e.layer, e.component)].append(e)
    fixed, growing = [], []
    for key, entries in groups.items():
        if all(not e.growing for e in entries):
            fixed.append((key, [(_align(e.nbytes), e.count) for e in entries]))
        else:
            growing.extend((key, e, _align(e.nbytes)) for e in entries)
    return LayoutGroups(fixed, growing)


def merge_demand(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def bytes_per_sequence(layout: list[LayoutEntry], num_tokens: int) -> int:
    """Exact cache bytes a sequence of `num_tokens` tokens holds (fixed slots + growing blocks)."""
    return sum(e.nbytes * e.slots_for(num_tokens) for e in layout)
