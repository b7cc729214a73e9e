"""Prefix cache: content-addressed blocks of prompt state in the engine's cache pool.

A block covers ``block_tokens`` tokens; its key chains a hash over token ids (vLLM's scheme: key_i =
H(key_{i-1}, tokens of block i), key_{-1} = H(salt)), the salt naming everything that changes the state
(model config, weights identity, dtype, kv_cache_dtype, indexer_dtype, block length). A block holds, per
layer, the state snapshot at its end (`parity.model.prefix_state.LayerBlock`), carved from the same
`CachePool` as running sequences.

A hit is copied into the new sequence's own cache (`restore_blocks`): running sequences never share
storage, so a block is pinned (reference count > 0) only while it is being read or extended, and every
unpinned block can be evicted. Eviction is least-recently-used among leaf blocks (no cached child): a
chain is only useful from its first block, so its tail goes first.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import struct

from parity.engine.cache_pool import CachePool, CachePoolExhausted, SequenceCache
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.prefix_state import block_tokens_for, clear_capture, restore_blocks, set_capture, snapshot_block


def chain_salt(*parts) -> bytes:
    """The root key: a hash of the reprs of everything that changes a block's content."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def block_keys(prev: bytes, token_ids: list[int], block_tokens: int, first_block: int, num_blocks: int) -> list[bytes]:
    """Keys of blocks first_block .. first_block + num_blocks - 1 of ``token_ids``, chained from ``prev``
    (the key of block first_block - 1, or the salt)."""
    out = []
    for i in range(first_block, first_block + num_blocks):
        toks = token_ids[i * block_tokens : (i + 1) * block_tokens]
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(struct.pack(f"<{len(toks)}q", *toks))
        prev = h.digest()
        out.append(prev)
    return out


class Block:
    """One cached block: its key, parent key, per-layer snapshot, owner allocator, LRU bookkeeping."""

    __slots__ = ("key", "parent", "layers", "owner", "refs", "children", "last_used", "nbytes")

    def __init__(self, key: bytes, parent: bytes | None, layers: list, owner: SequenceCache):
        self.key, self.parent, self.layers, self.owner = key, parent, layers, owner
        self.refs, self.children, self.last_used = 0, 0, 0
        self.nbytes = owner.nbytes


class PrefixCache:
    """Content-addressed prefix blocks with reference counts and leaf-first LRU eviction.

    Args:
        pool: the engine's CachePool (None: blocks are plain device tensors, never evicted for memory).
        block_tokens: tokens per block (`parity.model.prefix_state.block_tokens_for`).
        salt: the root key (`chain_salt`).
        device: where blocks live without a pool.

    Counters (tokens, as vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``): ``queries`` = tokens of
    the sequences looked up, ``hits`` = tokens restored from the cache; ``evictions`` = blocks evicted.
    """

    def __init__(self, pool: CachePool | None, block_tokens: int, salt: bytes, device="cpu"):
        self.pool, self.block_tokens, self.salt, self.device = pool, block_tokens, salt, device
        self.blocks: dict[bytes, Block] = {}
        self._lru: list[tuple[int, bytes]] = []  # heap of (last_used, key); stale entries skipped
        self._clock = itertools.count(1)
        self.queries = self.hits = self.evictions = 0
        self.nbytes = 0

    # ------------------------------------------------------------------ keys
    def keys(self, known: list[bytes], token_ids: list[int], num_tokens: int) -> list[bytes]:
        """``known`` extended to the keys of every full block of ``token_ids[:num_tokens]`` (in place)."""
        n = num_tokens // self.block_tokens
        if n > len(known):
            prev = known[-1] if known else self.salt
            known.extend(block_keys(prev, token_ids, self.block_tokens, len(known), n - len(known)))
        return known

    # ------------------------------------------------------------------ LRU
    def _touch(self, blk: Block) -> None:
        blk.last_used = next(self._clock)
        if blk.refs == 0 and blk.children == 0:
            heapq.heappush(self._lru, (blk.last_used, blk.key))

    def evict_one(self) -> bool:
        """Drop the least recently used unpinned leaf block. Returns False when none can go."""
        while self._lru:
            t, key = heapq.heappop(self._lru)
            blk = self.blocks.get(key)
            if blk is None or blk.last_used != t or blk.refs or blk.children:
                continue
            self._drop(blk)
            self.evictions += 1
            return True
        return False

    def _drop(self, blk: Block) -> None:
        del self.blocks[blk.key]
        blk.owner.free_all()
        self.nbytes -= blk.nbytes
        parent = self.blocks.get(blk.parent) if blk.parent is not None else None
        if parent is not None:
            parent.children -= 1
            if parent.children == 0 and parent.refs == 0:
                heapq.heappush(self._lru, (parent.last_used, parent.key))

    def clear(self) -> int:
        """Drop every unpinned block (leaves first). Returns the number dropped."""
        n = 0
        while self.evict_one():
            n += 1
        return n

    @property
    def num_pinned(self) -> int:
        return sum(1 for b in self.blocks.values() if b.refs)

    # ------------------------------------------------------------------ lookup / restore
    def lookup(self, keys: list[bytes], max_blocks: int) -> list[Block]:
        """The longest cached chain among the first ``max_blocks`` keys, pinned (call `release`)."""
        chain = []
        for key in keys[: max(0, max_blocks)]:
            blk = self.blocks.get(key)
            if blk is None:
                break
            chain.append(blk)
        for blk in chain:
            blk.refs += 1
        return chain

    def release(self, chain: list[Block]) -> None:
        for blk in chain:
            blk.refs -= 1
            self._touch(blk)

    def restore(self, state, chain: list[Block]) -> int:
        """Copy a pinned chain into a fresh model state; returns the tokens restored."""
        if chain:
            restore_blocks(state, [b.layers for b in chain], self.block_tokens)
        return len(chain) * self.block_tokens

    # ------------------------------------------------------------------ insert
    def insert(self, state, keys: list[bytes], ends: list[int]) -> int:
        """Snapshot the blocks ending at ``ends`` (ascending multiples of block_tokens, each the state's
        position or captured by its step) into the cache; keys[b // block_tokens - 1] is the key of the
        block ending at b. A block is only added after its parent (a chain is useful from its start);
        when the pool is full, unpinned blocks are evicted, and when that is not enough the rest is
        skipped. Returns the number of blocks added."""
        added = 0
        L = self.block_tokens
        for b in ends:
            i = b // L - 1
            key = keys[i]
            if key in self.blocks:
                self._touch(self.blocks[key])
                continue
            parent = self.blocks.get(keys[i - 1]) if i > 0 else None
            if i > 0 and parent is None:
                break
            if parent is not None:
                parent.refs += 1  # not evicted to make room for its child
            blk = None
            try:
                blk = self._new_block(state, b, key, parent)
            finally:
                if parent is not None:
                    parent.refs -= 1
            if parent is not None:
                if blk is not None:
                    parent.children += 1
                self._touch(parent)  # its LRU entry may have been dropped while pinned
            if blk is None:
                break
            self.blocks[key] = blk
            self.nbytes += blk.nbytes
            self._touch(blk)
            added += 1
        return added

    def _new_block(self, state, b: int, key: bytes, parent: Block | None) -> Block | None:
        while True:
            owner = SequenceCache(self.pool, self.device)
            try:
                layers = snapshot_block(state, b, self.block_tokens, owner)
            except CachePoolExhausted:
                owner.free_all()
                if not self.evict_one():
                    return None
                continue
            except ValueError:  # that end's rows were not kept by the step
                owner.free_all()
                return None
            return Block(key, parent.key if parent is not None else None, layers, owner)

    # ------------------------------------------------------------------ one engine step
    def plan_step(self, seq, start: int, num_tokens: int) -> list[int] | None:
        """Before a step feeds tokens [start, start + num_tokens) of `seq`: the block ends it crosses
        (None if none), with the interior ends not cached yet marked for capture in its state."""
        L = self.block_tokens
        end = start + num_tokens
        first = (start // L + 1) * L
        if first > end:
            return None
        ends = list(range(first, end + 1, L))
        keys = self.keys(seq.block_keys, seq.token_slice(0, end), end)
        interior = [b for b in ends if b < end and keys[b // L - 1] not in self.blocks]
        if interior:
            set_capture(seq.state, interior, L)
        return ends

    def commit_step(self, seq, ends: list[int]) -> None:
        """After the step: add the blocks planned by `plan_step`, then drop the captured rows."""
        try:
            self.insert(seq.state, seq.block_keys, ends)
        finally:
            clear_capture(seq.state)

    def abandon_step(self, seq) -> None:
        """The step failed: drop whatever it captured."""
        if seq.state is not None:
            clear_capture(seq.state)

    def stats(self) -> dict:
        """Counters and sizes for metrics (tokens; bytes)."""
        return {
            "prefix_cache_queries_total": self.queries,
            "prefix_cache_hits_total": self.hits,
            "prefix_cache_blocks": len(self.blocks),
            "prefix_cache_bytes": self.nbytes,
            "prefix_cache_evictions_total": self.evictions,
        }


def engine_prefix_cache(engine, args, model_dir) -> PrefixCache | None:
    """The `PrefixCache` of an `LLMEngine` (its model, config, pool, dtype, cache modes, device) when
    ``args.enable_prefix_caching``, the model snapshots its state (V4) and there is a pool, else None. Its
    salt names the model (config, checkpoint or preset + seed), dtype, cache dtypes and block length."""
    model = engine.model
    if not (args.enable_prefix_caching and isinstance(model, V4ForCausalLM) and engine.pool is not None):
        return None
    block = block_tokens_for(engine.config, args.prefix_block_tokens, engine.max_model_len)
    kv = engine._kv_kw.get("kv_cache_dtype", model.kv_cache_dtype)
    salt = chain_salt(
        repr(engine.config),
        str(model_dir or args.model),
        args.seed,
        id(model),
        str(engine.dtype),
        kv,
        model.indexer_dtype,
        block,
    )
    return PrefixCache(engine.pool, block, salt, engine.device)
