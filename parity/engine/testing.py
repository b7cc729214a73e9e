"""A tiny deterministic stand-in for the V4 model that honours the model API contract.

`FakeModel` has no weights: the logits at position p are a fixed function of the sliding window of the
last `window` tokens and of "compressed entries" (sums of every `ratio` consecutive tokens), computed
from its cache exactly as `forward_logits` computes them from the whole sequence. It allocates
`window_kv` (fixed) and `compressed_kv` (growing, in blocks) through the CacheAllocator protocol, so
scheduler, cache-pool and preemption tests run in milliseconds. Not a model of anything.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class CharTokenizer:
    """id i -> one letter (a = 26, ...); 0 (bos) and 1 (eos) are special. For engine tests with FakeModel."""

    eos_token_id = 1
    bos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 97 + 26 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (skip_special_tokens and i in (0, 1)) else chr(97 + i % 26) for i in ids)


class _FakeState:
    def __init__(self, model: FakeModel, allocator):
        self.model = model
        self.alloc = allocator
        self.num_tokens = 0
        self.window = allocator.alloc(0, "window_kv", (model.window, 1), torch.float32)
        self.blocks: list[torch.Tensor] = []
        self.n_entries = 0
        self.partial = 0.0
        self._freed = False

    def nbytes(self) -> int:
        if self._freed:
            return 0
        return sum(t.numel() * t.element_size() for t in [self.window, *self.blocks])

    def free(self) -> None:
        if not self._freed:
            for t in [self.window, *self.blocks]:
                self.alloc.release(t)
            self.blocks = []
            self._freed = True

    def push(self, tok: int) -> None:
        m = self.model
        p = self.num_tokens
        self.window[p % m.window, 0] = float(tok)
        self.partial += tok
        if (p + 1) % m.ratio == 0:
            blk, off = divmod(self.n_entries, m.cache_block_entries)
            if blk >= len(self.blocks):
                self.blocks.append(self.alloc.alloc(0, "compressed_kv", (m.cache_block_entries, 1), torch.float32))
            self.blocks[blk][off, 0] = self.partial
            self.n_entries += 1
            self.partial = 0.0
        self.num_tokens += 1

    def summary(self) -> float:
        m = self.model
        p = self.num_tokens
        n = min(p, m.window)
        h = 0.0
        for j in range(n):
            pos = p - n + j
            h += float(self.window[pos % m.window, 0]) * (j + 1) * 0.37
        for e in range(self.n_entries):
            blk, off = divmod(e, m.cache_block_entries)
            h += float(self.blocks[blk][off, 0]) * 0.11
        return h + p * 0.013


class FakeModel:
    """Contract-shaped fake (see module docstring). vocab 97 by default; eos id 1."""

    def __init__(
        self,
        vocab_size: int = 97,
        window: int = 5,
        ratio: int = 3,
        block_entries: int = 2,
        max_len: int = 4096,
        device: str = "cpu",
    ):
        self.window, self.ratio, self.cache_block_entries = window, ratio, block_entries
        self.device = torch.device(device)
        self.config = SimpleNamespace(
            vocab_size=vocab_size, max_position_embeddings=max_len, eos_token_id=1, bos_token_id=0
        )
        self._freqs = torch.arange(vocab_size, dtype=torch.float64) * 0.7

    def parameters(self):
        return iter([torch.zeros(1, device=self.device)])

    def eval(self):
        return self

    def cache_layout(self, kv_cache_dtype: str = "bf16") -> list[dict]:
        return [
            {
                "layer": 0,
                "component": "window_kv",
                "shape": (self.window, 1),
                "dtype": torch.float32,
                "kind": "fixed",
                "ratio": 1,
            },
            {
                "layer": 0,
                "component": "compressed_kv",
                "shape": (self.cache_block_entries, 1),
                "dtype": torch.float32,
                "kind": "growing",
                "ratio": self.ratio,
                "block_entries": self.cache_block_entries,
            },
        ]

    def _logits(self, h: float) -> torch.Tensor:
        return (torch.sin(self._freqs + h) * 3.0).float()

    def new_state(self, allocator=None):
        if allocator is None:
            from parity.engine.cache_pool import SequenceCache

            allocator = SequenceCache(None, self.device)
        return _FakeState(self, allocator)

    def forward_incremental(self, tokens, states, all_logits: bool = False):
        outs = []
        for toks, st in zip(tokens, states, strict=False):
            toks = toks.tolist() if isinstance(toks, torch.Tensor) else list(toks)
            rows = []
            for t in toks:
                st.push(int(t))
                if all_logits:
                    rows.append(self._logits(st.summary()))
            outs.append(torch.stack(rows) if all_logits else self._logits(st.summary()))
        return outs if all_logits else torch.stack(outs)

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, S = input_ids.shape
        out = []
        for b in range(B):
            st = self.new_state()
            out.append(self.forward_incremental([input_ids[b]], [st], all_logits=True)[0])
            st.free()
        return torch.stack(out)


class ScriptedModel(FakeModel):
    """A FakeModel whose greedy output is a script: after a prompt, the best token at output position k is
    `respond(prompt ids)[k]`, then EOS (id 1); `runner_up` (when given) is the second best everywhere, so a
    banned best token (strict thinking's EOS ban) yields it. The margins make sampling at any
    temperature up to ~2 pick the best token (or the runner-up when the best is banned).

    The prompt is what the first forward call of a sequence reads (a prompt prefilled in one chunk, no
    preemption), which is how the engine runs short prompts. Logits: best 100, runner-up 50, others 0.
    """

    def __init__(self, respond, vocab_size: int, runner_up: int | None = None, **kw):
        super().__init__(vocab_size=vocab_size, **kw)
        self.respond = respond
        self.runner_up = runner_up
        self.vocab_size = vocab_size

    def new_state(self, allocator=None):
        st = super().new_state(allocator)
        st.history, st.answer, st.prompt_len = [], None, None
        return st

    def forward_incremental(self, tokens, states, all_logits: bool = False):
        if all_logits:
            raise NotImplementedError("ScriptedModel scores only the last position")
        rows = []
        for toks, st in zip(tokens, states, strict=True):
            toks = toks.tolist() if isinstance(toks, torch.Tensor) else list(toks)
            for t in toks:
                st.push(int(t))
            st.history.extend(int(t) for t in toks)
            if st.answer is None:
                st.prompt_len, st.answer = len(st.history), list(self.respond(list(st.history)))
            k = len(st.history) - st.prompt_len
            row = torch.zeros(self.vocab_size)
            if self.runner_up is not None:
                row[self.runner_up] = 50.0
            row[st.answer[k] if k < len(st.answer) else 1] = 100.0
            rows.append(row)
        return torch.stack(rows)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Repeated argmax of `model.forward_logits` on the growing sequence (the engine's ground truth)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        dev = next(iter(model.parameters())).device
        logits = model.forward_logits(torch.tensor([seq], device=dev))
        t = int(logits[0, -1].argmax())
        out.append(t)
        seq.append(t)
    return out


def drain_check(engine) -> None:
    """Assert an engine with no requests left holds nothing: no sequence holds cache, no prefix-cache
    block is pinned, and once the prefix cache is reset the pool is empty (no bytes, no live tensors).

    Raises:
        AssertionError: naming what is still held.
    """
    st = engine.stats()
    assert st["cache_used_bytes"] == 0, f"sequences still hold {st['cache_used_bytes']} bytes"
    pc = getattr(engine, "prefix_cache", None)
    if pc is not None:
        assert pc.num_pinned == 0, f"{pc.num_pinned} prefix-cache blocks still pinned"
        assert engine.reset_prefix_cache() and pc.nbytes == 0, (pc.nbytes, len(pc.blocks))
    if engine.pool is not None:
        assert engine.pool.used_bytes == 0, f"the pool still holds {engine.pool.used_bytes} bytes"
        assert engine.stats()["cache_live_tensors"] == 0


__all__ = ["FakeModel", "ScriptedModel", "drain_check", "greedy_reference"]
