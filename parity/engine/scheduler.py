"""Continuous-batching scheduler: FCFS, chunked prefill, preemption by free-and-recompute.

Every step (the policy of vLLM's v1 scheduler, vllm/v1/core/sched/scheduler.py, and nano-vllm's
engine/scheduler.py, re-derived here for V4's per-sequence caches):

1. Running sequences, oldest first, each get the tokens they still need (1 in decode, the rest of the
   prompt in prefill) within the step's token budget `max_num_batched_tokens`; a long prompt is cut into
   chunks over several steps (chunked prefill).
2. Before a sequence is scheduled the cache pool must be able to hold its new cache slots
   (`SequenceCache.demand` from the model's cache layout). If it cannot, the newest running sequence is
   preempted: its cache is freed and it goes back to the front of the waiting queue, to be recomputed
   (prompt + tokens generated so far) when memory allows.
3. Waiting sequences, oldest first, join while `max_num_seqs`, the token budget and the pool allow —
   no newcomer ever preempts a running sequence (FCFS). With a `PrefixCache`, a joining sequence first
   restores the longest cached chain of its tokens (never all of them: the last token is computed) and
   only the rest is scheduled; unpinned cached blocks are evicted before anything is preempted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from parity.engine.cache_pool import CachePool, LayoutEntry, SequenceCache, group_layout, merge_demand
from parity.engine.prefix_cache import PrefixCache
from parity.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: feed tokens [start, start + num_tokens)."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the end of the sequence's tokens (a token is sampled)."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """Decides which sequences run each step and with how many tokens.

    Args:
        pool: the CachePool (None = unlimited plain allocations, no preemption).
        layout: normalised cache layout of the model.
        max_num_seqs: most sequences in the running batch.
        max_num_batched_tokens: token budget per step (prefill chunks + decode tokens).
        new_state: callable(SequenceCache) -> model SequenceState.
        prefix_cache: the PrefixCache (None = prefix caching off).
    """

    def __init__(
        self,
        pool: CachePool | None,
        layout: list[LayoutEntry],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        new_state,
        device,
        prefix_cache: PrefixCache | None = None,
    ):
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.layout = layout
        self.groups = group_layout(layout)
        self._empty = SequenceCache(None)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.new_state = new_state
        self.device = device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue ops
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.free(seq)

    @staticmethod
    def free(seq: Sequence) -> None:
        """Drop a sequence's cache state (all its storage goes back to the pool)."""
        if seq.state is not None:
            free = getattr(seq.state, "free", None)
            if free is not None:
                free()
        if seq.cache is not None:
            seq.cache.free_all()
        seq.state = None
        seq.cache = None
        seq.num_computed = 0

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence and put it at the front of the waiting queue (recompute later)."""
        self.running.remove(seq)
        self.free(seq)
        seq.status = SeqStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        # keep the waiting queue in FCFS order
        items = list(self.waiting) + [seq]
        items.sort(key=lambda s: s.priority)
        self.waiting = deque(items)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step
    def _demand(self, seq: Sequence, n: int) -> dict[int, int]:
        if self.pool is None:
            return {}
        cache = seq.cache if seq.cache is not None else self._empty
        return cache.demand(self.groups, seq.num_computed + n)

    def _demand_fresh(self, num_tokens: int) -> dict[int, int]:
        """Slots a new sequence holding `num_tokens` tokens needs."""
        return {} if self.pool is None else self._empty.demand(self.groups, num_tokens)

    def _fits(self, demand: dict[int, int]) -> bool:
        """Whether the pool can serve `demand` now, evicting unpinned prefix-cache blocks (LRU) if needed."""
        if self.pool is None:
            return True
        while not self.pool.fits(demand):
            if self.prefix_cache is None or not self.prefix_cache.evict_one():
                return False
        return True

    def _lookup(self, seq: Sequence) -> list:
        """The pinned cached chain a joining sequence can restore (at most all but its last token)."""
        pc = self.prefix_cache
        if pc is None or seq.params.prompt_logprobs is not None:  # every prompt position's logits needed
            return []
        ids = seq.token_slice(0, seq.num_tokens)
        keys = pc.keys(seq.block_keys, ids, seq.num_tokens)
        return pc.lookup(keys, (seq.num_tokens - 1) // pc.block_tokens)

    def schedule(self) -> list[ScheduledSeq]:
        """Plan one step. Returns the scheduled sequences (running ones first, FCFS)."""
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        demand: dict[int, int] = {}
        self.running.sort(key=lambda s: s.priority)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                i += 1
                continue
            d = self._demand(seq, n)
            total = merge_demand(demand, d)
            preempted_self = False
            while not self._fits(total):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break
            demand = total
            out.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
            i += 1
        # newcomers (and preempted sequences, which sit at the front), FCFS, never preempting
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            chain = self._lookup(seq)
            hit = len(chain) * self.prefix_cache.block_tokens if chain else 0
            n = min(seq.num_tokens - hit, budget)
            total = merge_demand(demand, self._demand_fresh(hit + n))
            if chain and not self._fits(total):  # the hit itself may be what does not fit
                self.prefix_cache.release(chain)
                chain, hit = [], 0
                n = min(seq.num_tokens, budget)
                total = merge_demand(demand, self._demand_fresh(n))
            if not self._fits(total):
                if chain:
                    self.prefix_cache.release(chain)
                break
            self.waiting.popleft()
            demand = total
            seq.cache = SequenceCache(self.pool, self.device)
            seq.state = self.new_state(seq.cache)
            if self.prefix_cache is not None:
                try:
                    self.prefix_cache.restore(seq.state, chain)
                finally:
                    self.prefix_cache.release(chain)
                self.prefix_cache.queries += seq.num_tokens
                self.prefix_cache.hits += hit
            seq.num_computed = hit
            seq.status = SeqStatus.RUNNING
            m = seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = time.monotonic()
                m.num_cached_tokens = hit
            self.running.append(seq)
            out.append(ScheduledSeq(seq, hit, n))
            budget -= n
        return out
