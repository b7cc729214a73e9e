"""Per-step metadata of the flat token batch, built once per forward step and shared by every layer.

A step runs several sequences at once: their new tokens are concatenated into one flat batch of T rows,
``segments`` says which rows belong to which sequence. `DecodeBatch` precomputes, from host-side
positions, what the batched decode path of every layer needs (no device-to-host sync in the layers).
"""

from __future__ import annotations

import torch

from parity.model.layers import Rotary


class StepContext:
    """What every layer needs about the flat token batch of one step (built once, shared by all layers).

    Attributes:
        positions: LongTensor[T] absolute position of each new token.
        token_ids: LongTensor[T].
        segments: list of (start, n, first_position) per sequence, in batch order.
        cos_sin: {"main": (cos, sin), "compress": (cos, sin)} each [T, rope_dim // 2] fp32.
        rotary: {"main": Rotary, "compress": Rotary}: the same angles as rotation tables.
        kv_fp8: apply the official FP8 rounding to KV; index_fp4: the official Hadamard + FP4 indexer
            simulation (`parity.model.numerics`).
    """

    def __init__(self, positions, token_ids, segments, cos_sin, kv_fp8=False, index_fp4=False):
        self.positions, self.token_ids, self.segments, self.cos_sin = positions, token_ids, segments, cos_sin
        self.kv_fp8, self.index_fp4 = kv_fp8, index_fp4
        self.rotary = {k: Rotary(c, s) for k, (c, s) in cos_sin.items()}
        self._decode: dict = {}

    def decode_batch(self, window: int) -> DecodeBatch | None:
        """The step's one-token sequences as a `DecodeBatch` (None if there are none); built on the
        first call and reused by every later layer of the step."""
        if window not in self._decode:
            single = [i for i, seg in enumerate(self.segments) if seg[1] == 1]
            self._decode[window] = DecodeBatch(self, single, window) if single else None
        return self._decode[window]


class DecodeBatch:
    """Per-step metadata of the sequences that add exactly one token, shared by all layers (they
    all see the same positions): row indices, positions, ring-buffer slots, the window mask, and per
    compression ratio the sequences whose token completes a window and the entry-visibility masks.
    Everything is derived from host-side positions, so the layers need no ``.tolist()`` / ``nonzero``.

    Attributes:
        single: indices into ``ctx.segments``; k = len(single).
        rows: LongTensor[k] flat token rows, or None when every token of the step is one (rows = 0..k-1).
        pos: list[int] positions; P: LongTensor[k] the same; slots: list[int] ``pos % window``.
        allowed: BoolTensor[k, window]: ring slot j holds a visible key (position
            ``p - ((p - j) mod window)`` >= 0).
    """

    def __init__(self, ctx: StepContext, single: list[int], window: int):
        dev = ctx.positions.device
        self.single, self.k, self.window = single, len(single), window
        segs = ctx.segments
        self.pos = [segs[i][2] for i in single]
        if self.k == len(ctx.token_ids):
            self.rows = None
            self.P = ctx.positions
        else:
            self.rows = torch.tensor([segs[i][0] for i in single], device=dev)
            self.P = torch.tensor(self.pos, device=dev)
        self.slots = [p % window for p in self.pos]
        P = self.P[:, None]
        self.allowed = (P - (P - torch.arange(window, device=dev)[None, :]) % window) >= 0
        self._emit: dict = {}
        self._vis: dict = {}

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows of the one-token sequences ([k, ...])."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def emit(self, ratio: int) -> tuple[list[int], torch.Tensor]:
        """Sequences (indices into 0..k-1, list and LongTensor) whose new token completes a window."""
        if ratio not in self._emit:
            e = [i for i, p in enumerate(self.pos) if (p + 1) % ratio == 0]
            self._emit[ratio] = (e, torch.tensor(e, dtype=torch.long, device=self.P.device))
        return self._emit[ratio]

    def visible(self, ratio: int, n: int) -> torch.Tensor:
        """BoolTensor[k, n]: compressed entry w is visible to sequence i (``w < (p_i + 1) // ratio``)."""
        key = (ratio, n)
        if key not in self._vis:
            self._vis[key] = torch.arange(n, device=self.P.device)[None, :] < ((self.P + 1) // ratio)[:, None]
        return self._vis[key]
