"""The attention-backend seam: what a V4 attention layer hands its backend, and the backend registry.

The layer gathers, for every query, the keys it attends to (K = V, one shared head): its sliding window
and, on compressed layers, the compressed entries (all visible ones on HCA, the indexer's top-k on CSA).
A backend turns that into ``softmax([q.k * scale ..., sink]) @ kv`` per head (official
``inference/model.py`` ``sparse_attn``). Backends register under a name; `parity.devices.attention_backend`
names the one to use on a device, so a fused device kernel plugs in here without touching the layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from parity.errors import ConfigError


@dataclass
class DecodeKeys:
    """Keys of the k sequences that add exactly one token this step, batched over them.

    Attributes:
        rows: LongTensor[k] rows of the flat step batch holding their queries; None when every row is one.
        window: [k, W, D] each sequence's window ring buffer (slot ``p % W`` holds position p).
        window_valid: BoolTensor[k, W] ring slot holds a visible key.
        entries: [k, E, D] compressed entries (zero padded past a sequence's count) or None.
        entry_valid: BoolTensor[k, E] entry visible to the query (``w < (p + 1) // ratio``) or None.
        topk: LongTensor[k, K] on CSA layers, the indexer's selection (indices into ``entries``; only
            these entries are attended, invalid ones per ``entry_valid``); None: all entries attended.
    """

    rows: torch.Tensor | None
    window: torch.Tensor
    window_valid: torch.Tensor
    entries: torch.Tensor | None = None
    entry_valid: torch.Tensor | None = None
    topk: torch.Tensor | None = None


@dataclass
class ChunkKeys:
    """Keys of one sequence that adds n > 1 tokens (a prefill chunk) at positions pos .. pos + n - 1.

    Attributes:
        start, n, pos: the chunk's rows [start, start + n) of the step batch and its first position.
        old: [o, D] window keys of positions [pos - o, pos), o = min(pos, W - 1).
        new: [n, D] the chunk's own keys.
        entries: [E, D] the sequence's compressed entries (this chunk's included) or None; entry w covers
            positions [w * ratio, (w + 1) * ratio) and is visible to position t iff ``w < (t + 1) // ratio``.
        ratio: compression ratio (0 on sliding layers).
        topk: LongTensor[n, K] on CSA layers, the indexer's selection per query (indices into
            ``entries``, K = min(index_topk, E)); None: all visible entries attended.
    """

    start: int
    n: int
    pos: int
    old: torch.Tensor
    new: torch.Tensor
    entries: torch.Tensor | None = None
    ratio: int = 0
    topk: torch.Tensor | None = None


@dataclass
class AttentionBatch:
    """Everything a backend attends over in one layer and step: decode sequences batched, chunks each."""

    decode: DecodeKeys | None = None
    chunks: list[ChunkKeys] = field(default_factory=list)


class AttentionBackend(ABC):
    """Sink attention of one layer. Subclasses set ``name`` and register with `register_backend`.

    Args:
        window: the layer's sliding window W (tokens).
    """

    name: str = ""

    def __init__(self, window: int):
        self.window = window

    @abstractmethod
    def forward(self, q: torch.Tensor, batch: AttentionBatch, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """q [T, H, D] (RoPE'd queries of the step), sink fp32 [H] (learned per-head logit, zero value),
        scale (``head_dim^-0.5``) -> attention output [T, H, D] in q's dtype."""


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def create_backend(name: str, window: int) -> AttentionBackend:
    """A new backend instance of the registered ``name``.

    Raises:
        ConfigError: no backend registered under ``name``.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"attention backend is {name!r}: expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](window)
