"""parity.model: DeepSeek-V4 math in plain PyTorch.

Public API (see docs/numerics.md):
    build_model(cfg, device="cpu", dtype=torch.float32, seed=None) -> V4ForCausalLM
    model.forward_logits(input_ids[B, S]) -> [B, S, vocab]
    model.new_state(allocator=None) -> SequenceState
    model.forward_incremental(tokens, states, all_logits=False)
    model.cache_layout(kv_cache_dtype="bf16", indexer_dtype=None) -> list[dict]

Checkpoints are read and written by `parity.checkpoint` (``parity.checkpoint.reader.from_pretrained``).
torch is imported on first use of these names, so that `import parity.model` stays cheap for the CLI.
"""

from __future__ import annotations

__all__ = ["build_model", "V4ForCausalLM", "SequenceState", "CacheAllocator", "TorchAllocator"]


def __getattr__(name):
    if name in ("build_model", "V4ForCausalLM"):
        from parity.model import build as _m

        return getattr(_m, name)
    if name in ("SequenceState", "CacheAllocator", "TorchAllocator"):
        from parity.model import cache_state as _c

        return getattr(_c, name)
    raise AttributeError(f"module 'parity.model' has no attribute {name!r}")
