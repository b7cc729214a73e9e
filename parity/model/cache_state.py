"""Per-sequence cache state of DeepSeek-V4 and its pluggable storage.

Per sequence and main layer (docs/numerics.md, "Cache layout"):

- ``window_kv`` (fixed): ring buffer ``[sliding_window, head_dim]``; token at position t lives in slot
  ``t % sliding_window``.
- ``compressor_state`` (fixed, CSA/HCA layers): the unfinished compression window, fp32
  ``[2, coff * ratio, coff * (head_dim + index_head_dim if CSA)]``: plane 0 = projected kv inputs,
  plane 1 = gate scores (+ learned position bias). For CSA (overlapping windows, coff = 2) rows
  ``[:ratio]`` hold the previous *complete* window and rows ``[ratio:]`` the current one; for HCA
  (coff = 1) rows ``[:ratio]`` are the current window. Columns ``[:coff*head_dim]`` belong to the
  attention compressor, the rest to the indexer's compressor (official ``Compressor.kv_state`` /
  ``score_state``).
- ``compressed_kv`` (growing, CSA/HCA): one entry per ``ratio`` tokens, allocated in blocks of
  ``block_entries`` entries ``[block_entries, head_dim]``.
- ``index_keys`` (growing, CSA only): the indexer's compressed keys ``[block_entries, index_head_dim]``
  in the model dtype, or packed FP4 rows ``[block_entries, index_head_dim / 2 + index_head_dim / 32]``
  uint8 with ``indexer_dtype="fp4"`` (see `parity.model.numerics.IndexCodec`).

Storage comes from a `CacheAllocator` so the engine can carve it out of a preallocated pool.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from parity.errors import RequestError


@runtime_checkable
class CacheAllocator(Protocol):
    """Where cache tensors come from. ``alloc`` returns a tensor of exactly ``shape``/``dtype`` on the
    model's device (contents may be uninitialised); ``release`` takes back a tensor ``alloc`` gave."""

    def alloc(self, layer: int, component: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def release(self, tensor: torch.Tensor) -> None: ...


class TorchAllocator:
    """Default allocator: plain ``torch.empty`` on a device; ``release`` drops the reference."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def alloc(self, layer: int, component: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def release(self, tensor: torch.Tensor) -> None:
        return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LayerCache:
    """Cache of one sequence in one layer (see module docstring). Internal to `parity.model`."""

    __slots__ = (
        "layer",
        "ratio",
        "window",
        "comp_state",
        "comp_blocks",
        "idx_blocks",
        "n_entries",
        "_alloc",
        "block_entries",
        "head_dim",
        "index_head_dim",
        "codec",
        "icodec",
        "capture_every",
        "capture_at",
        "captured",
    )

    def __init__(
        self,
        layer: int,
        ratio: int,
        window: int,
        head_dim: int,
        index_head_dim: int,
        csa: bool,
        block_entries: int,
        codec,
        icodec,
        alloc: CacheAllocator,
    ):
        """codec: a `parity.model.numerics.KVCodec` (how window / compressed KV rows are stored);
        icodec: a `parity.model.numerics.IndexCodec` (how indexer keys are stored)."""
        self.layer, self.ratio, self._alloc = layer, ratio, alloc
        self.block_entries, self.head_dim, self.index_head_dim = block_entries, head_dim, index_head_dim
        self.codec, self.icodec = codec, icodec
        width, sdtype = codec.storage
        self.window = alloc.alloc(layer, "window_kv", (window, width), sdtype)
        self.window.zero_()  # unwritten slots are masked, but must not hold NaN/inf bytes (0 * NaN = NaN)
        self.comp_state = None
        self.comp_blocks: list[torch.Tensor] = []
        self.idx_blocks: list[torch.Tensor] | None = [] if csa else None
        self.n_entries = 0
        # prefix-block ends whose rows the next chunk keeps aside (`parity.model.prefix_state.capture_chunk`)
        self.capture_every, self.capture_at, self.captured = 0, frozenset(), {}
        if ratio:
            coff = 2 if csa else 1
            width = coff * (head_dim + (index_head_dim if csa else 0))
            self.comp_state = alloc.alloc(layer, "compressor_state", (2, coff * ratio, width), torch.float32)
            self.comp_state[0].zero_()
            self.comp_state[1].fill_(float("-inf"))

    # ------------------------------------------------------------------ window
    def window_read(self, start: int, end: int) -> torch.Tensor:
        """KV of positions [start, end) (all inside the window) -> [end - start, head_dim]."""
        w = self.window.shape[0]
        if end <= start:
            return self.codec.decode(self.window[:0])
        idx = torch.arange(start, end, device=self.window.device) % w
        return self.codec.decode(self.window.index_select(0, idx))

    def window_write(self, pos: int, kv: torch.Tensor) -> None:
        """Store kv [n, head_dim] of positions pos .. pos + n - 1 (only the last `window` are kept)."""
        w = self.window.shape[0]
        n = kv.shape[0]
        if n > w:
            kv, pos = kv[n - w :], pos + n - w
            n = w
        idx = torch.arange(pos, pos + n, device=self.window.device) % w
        self.window.index_copy_(0, idx, self.codec.encode(kv))

    # ------------------------------------------------------------------ compressed entries
    def _append(self, blocks: list[torch.Tensor], component: str, entries: torch.Tensor, start: int) -> None:
        """entries: already in storage form [m, width]."""
        b = self.block_entries
        n = entries.shape[0]
        i = 0
        while i < n:
            e = start + i
            blk, off = divmod(e, b)
            while blk >= len(blocks):
                blocks.append(self._alloc.alloc(self.layer, component, (b, entries.shape[1]), entries.dtype))
            take = min(b - off, n - i)
            blocks[blk][off : off + take] = entries[i : i + take]
            i += take

    def append_entries(self, kv: torch.Tensor, index_keys: torch.Tensor | None) -> None:
        """Append new compressed entries kv [m, head_dim] (and index keys [m, index_head_dim] on CSA, in
        the form `IndexCodec.encode` takes: Hadamard-rotated, not yet FP4-rounded, with the FP4 indexer)."""
        m = kv.shape[0]
        if m == 0:
            return
        self._append(self.comp_blocks, "compressed_kv", self.codec.encode(kv), self.n_entries)
        if self.idx_blocks is not None and index_keys is not None:
            self._append(self.idx_blocks, "index_keys", self.icodec.encode(index_keys), self.n_entries)
        self.n_entries += m

    @staticmethod
    def _rows(blocks: list[torch.Tensor], n: int) -> torch.Tensor:
        """The first n rows of consecutive blocks: a view while they fit in the first block, else a copy.
        (Callers only read the result.)"""
        if n <= blocks[0].shape[0]:
            return blocks[0][:n]
        return torch.cat(blocks, dim=0)[:n]

    def entries(self) -> torch.Tensor:
        """All compressed entries so far, [n_entries, head_dim] (read-only: may be a view of the cache)."""
        if not self.comp_blocks:
            return self.codec.decode(self.window[:0])
        return self.codec.decode(self._rows(self.comp_blocks, self.n_entries))

    def index_keys(self) -> torch.Tensor:
        """All indexer keys so far, [n_entries, index_head_dim] in the model dtype (decoded; read-only:
        may be a view of the cache)."""
        if not self.idx_blocks:
            return torch.empty((0, self.index_head_dim), dtype=self.icodec.dtype, device=self.window.device)
        return self.icodec.decode(self._rows(self.idx_blocks, self.n_entries))

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> list[torch.Tensor]:
        out = [self.window]
        if self.comp_state is not None:
            out.append(self.comp_state)
        out += self.comp_blocks
        if self.idx_blocks:
            out += self.idx_blocks
        return out

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors())

    def free(self) -> None:
        for t in self.tensors():
            self._alloc.release(t)
        self.window = self.comp_state = None
        self.comp_blocks, self.idx_blocks = [], None


class SequenceState:
    """Cache state of one sequence across all layers. Created by ``model.new_state()``, advanced by
    ``model.forward_incremental``.

    Attributes:
        num_tokens: tokens consumed so far (= the position of the next token).
    """

    def __init__(self, layers: list[LayerCache], allocator: CacheAllocator):
        self.layers = layers
        self.allocator = allocator
        self.num_tokens = 0
        self.kv_fp8 = False
        self.index_fp4 = False
        self._freed = False

    def nbytes(self) -> int:
        """Bytes of cache memory this state holds right now (fixed + allocated growing blocks)."""
        return 0 if self._freed else sum(lc.nbytes() for lc in self.layers)

    def free(self) -> None:
        """Return all storage to the allocator; the state is unusable afterwards (idempotent)."""
        if not self._freed:
            for lc in self.layers:
                lc.free()
            self._freed = True

    def check_usable(self) -> None:
        if self._freed:
            raise RequestError("states: a SequenceState was used after free()")
