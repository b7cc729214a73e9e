"""Snapshots of a sequence's V4 cache state at prefix-block ends, and restoring a state from them.

A prefix block covers ``block_tokens`` consecutive tokens ``[b - L, b)`` (``b`` a multiple of ``L``, and ``L``
a multiple of every compression ratio, so a block holds whole compression windows). Per layer it keeps what
the state at position ``b`` needs beyond earlier blocks (`LayerBlock`):

- ``window``: the stored sliding-window KV rows of positions ``[b - m, b)``, ``m = min(sliding_window, L)``
  (a window longer than a block is rebuilt from the last ``ceil(sliding_window / L)`` blocks of a hit);
- ``entries`` / ``index``: the block's ``L / ratio`` compressed KV rows and (CSA) indexer-key rows, in
  storage form (bytes copied, never re-encoded: an FP8 / FP4 cache restores bit for bit);
- ``state`` (CSA only): compressor-state rows ``[:ratio]`` of both planes at ``b`` = the projected inputs
  and gate scores of the last complete window, which the overlapping compressor reads for the next window.
  At a block end no window is unfinished, so every other compressor row is written before it is read
  (`parity.model.compressor`): HCA layers and rows ``[ratio:]`` need nothing.

A step may cross several block ends inside one prefill chunk, where the ring buffer and the compressor
state are overwritten before the step ends: `capture_chunk` (called by the attention's chunk path) copies
the rows of those interior ends aside first; ends reached at the end of a step are read from the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parity.config import CSA, HCA
from parity.errors import RequestError
from parity.model.cache_state import LayerCache, SequenceState


@dataclass
class LayerBlock:
    """One layer's share of a prefix block (see module docstring). Tensors are in storage form:
    window [m, kv width], entries [L / ratio, kv width], index [L / ratio, index width], state fp32
    [2, ratio, state width]; None where the layer has no such component."""

    window: torch.Tensor
    entries: torch.Tensor | None = None
    index: torch.Tensor | None = None
    state: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.window, self.entries, self.index, self.state) if t is not None]


def block_tokens_for(cfg, block_tokens: int | None = None, max_model_len: int | None = None) -> int:
    """Prefix-block length in tokens: ``block_tokens`` if given, else the least common multiple of the
    layers' compression ratios (128 = the HCA ratio for DeepSeek-V4, paper §2.3.2).

    Raises:
        RequestError: ``block_tokens`` is not a positive multiple of every compression ratio in use, or is
            longer than ``max_model_len`` (tokens; no sequence could fill one block).
    """
    ratios = sorted({int(cfg.compress_rates[t]) for t in cfg.layer_types if t in (CSA, HCA)})
    need = math.lcm(*ratios) if ratios else 1
    if block_tokens is None:
        return need
    if not isinstance(block_tokens, int) or isinstance(block_tokens, bool) or block_tokens < 1 or block_tokens % need:
        raise RequestError(
            f"engine argument 'prefix_block_tokens' is {block_tokens!r}: expected a positive multiple "
            f"of every compression ratio in use {ratios} (e.g. {need})"
        )
    if max_model_len is not None and block_tokens > max_model_len:
        raise RequestError(
            f"engine argument 'prefix_block_tokens' is {block_tokens}: expected at most max_model_len "
            f"({max_model_len}), a multiple of {need} (e.g. {need})"
        )
    return block_tokens


def _window_rows(lc: LayerCache, start: int, end: int) -> torch.Tensor:
    """Stored ring rows of positions [start, end) (all still in the ring)."""
    w = lc.window.shape[0]
    idx = torch.arange(start, end, device=lc.window.device) % w
    return lc.window.index_select(0, idx)


def capture_chunk(lc: LayerCache, p: int, kv: torch.Tensor, comp: tuple | None, index: tuple | None) -> None:
    """Copy aside, for every block end ``b`` in ``lc.capture_at`` with p < b < p + n, the window rows and
    (CSA) compressor-state rows the state holds at ``b``. Call before the chunk updates the cache.

    kv: [n, head_dim] the chunk's window keys (as `LayerCache.window_write` takes them); comp / index:
    (kv, score) fp32 [n, coff * d] projected inputs of the attention / indexer compressor, or None.
    Results land in ``lc.captured[b] = (window rows, state rows or None)``.
    """
    n = kv.shape[0]
    ends = [b for b in lc.capture_at if p < b < p + n]
    if not ends:
        return
    w = lc.window.shape[0]
    m = min(w, lc.capture_every)
    enc = lc.codec.encode(kv)
    csa = lc.idx_blocks is not None and comp is not None
    for b in ends:
        lo = b - m
        parts = []
        if lo < p:
            parts.append(_window_rows(lc, lo, p))
        parts.append(enc[max(lo, p) - p : b - p])
        state = None
        if csa:
            r = lc.ratio
            r0 = p % r  # rows of the window containing p already in the state
            planes = []
            for plane, (a, c) in enumerate(((comp[0], index[0]), (comp[1], index[1]))):
                rows = torch.cat([a, c], dim=1)[: b - p]
                if b - r < p:
                    rows = torch.cat([lc.comp_state[plane, r : r + r0], rows], dim=0)
                planes.append(rows[-r:])
            state = torch.stack(planes).clone()
        lc.captured[b] = (torch.cat(parts, dim=0).clone(), state)


def set_capture(state: SequenceState, ends, block_tokens: int) -> None:
    """Ask the next step to keep the rows of these interior block ends (`capture_chunk`)."""
    ends = frozenset(ends)
    for lc in state.layers:
        lc.capture_every, lc.capture_at = block_tokens, ends


def clear_capture(state: SequenceState) -> None:
    for lc in state.layers:
        lc.capture_at, lc.captured = frozenset(), {}


def _stored_rows(blocks: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Storage rows [start, end) of consecutive growing blocks."""
    b = blocks[0].shape[0]
    parts = []
    e = start
    while e < end:
        blk, off = divmod(e, b)
        take = min(b - off, end - e)
        parts.append(blocks[blk][off : off + take])
        e += take
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def snapshot_block(state: SequenceState, b: int, block_tokens: int, alloc) -> list[LayerBlock]:
    """Copy the prefix block ending at ``b`` out of ``state`` into tensors from ``alloc`` (a
    `CacheAllocator`; component names "prefix_window", "prefix_entries", "prefix_index", "prefix_state").

    ``b`` is either the state's position (``state.num_tokens``) or an interior end captured by the step
    (`capture_chunk`). Raises whatever ``alloc.alloc`` raises (e.g. the pool's exhaustion); tensors
    already allocated are then the caller's to release (they are in ``alloc``'s books).
    Raises:
        ValueError: ``b`` is neither the state's position nor captured.
    """
    L = block_tokens
    out = []
    for lc in state.layers:
        got = lc.captured.get(b)
        if got is None and b != state.num_tokens:
            raise ValueError(f"prefix block end {b}: not captured and not the state's position {state.num_tokens}")
        m = min(lc.window.shape[0], L)
        win_src = got[0] if got is not None else _window_rows(lc, b - m, b)
        win = alloc.alloc(lc.layer, "prefix_window", tuple(win_src.shape), win_src.dtype)
        win.copy_(win_src)
        blk = LayerBlock(win)
        out.append(blk)
        if lc.ratio:
            lo, hi = (b - L) // lc.ratio, b // lc.ratio
            src = _stored_rows(lc.comp_blocks, lo, hi)
            blk.entries = alloc.alloc(lc.layer, "prefix_entries", tuple(src.shape), src.dtype)
            blk.entries.copy_(src)
            if lc.idx_blocks is not None:
                src = _stored_rows(lc.idx_blocks, lo, hi)
                blk.index = alloc.alloc(lc.layer, "prefix_index", tuple(src.shape), src.dtype)
                blk.index.copy_(src)
                st_src = got[1] if got is not None else lc.comp_state[:, : lc.ratio]
                blk.state = alloc.alloc(lc.layer, "prefix_state", tuple(st_src.shape), st_src.dtype)
                blk.state.copy_(st_src)
    return out


def restore_blocks(state: SequenceState, chain: list[list[LayerBlock]], block_tokens: int) -> None:
    """Make a fresh state (position 0) hold the prefix ``chain`` (blocks 0 .. k-1, each a list of
    `LayerBlock` per layer): afterwards it equals the state that computed those k * block_tokens tokens.

    Raises:
        ValueError: the state is not fresh, or the chain's layer count differs from the state's.
    """
    if state.num_tokens != 0:
        raise ValueError(f"restore_blocks needs a fresh state, this one is at position {state.num_tokens}")
    if not chain:
        return
    if any(len(blk) != len(state.layers) for blk in chain):
        raise ValueError(f"a prefix block has other than the state's {len(state.layers)} layers")
    L, k = block_tokens, len(chain)
    h = k * L
    for i, lc in enumerate(state.layers):
        w = lc.window.shape[0]
        m = min(w, L)
        first = max(0, k - math.ceil(w / m))
        rows = torch.cat([chain[j][i].window for j in range(first, k)], dim=0)
        pos0 = h - rows.shape[0]
        if rows.shape[0] > w:
            rows, pos0 = rows[-w:], h - w
        idx = torch.arange(pos0, h, device=lc.window.device) % w
        lc.window.index_copy_(0, idx, rows)
        if lc.ratio:
            lc._append(lc.comp_blocks, "compressed_kv", torch.cat([blk[i].entries for blk in chain]), 0)
            if lc.idx_blocks is not None:
                lc._append(lc.idx_blocks, "index_keys", torch.cat([blk[i].index for blk in chain]), 0)
                lc.comp_state[:, : lc.ratio].copy_(chain[-1][i].state)
            lc.n_entries = h // lc.ratio
    state.num_tokens = h
