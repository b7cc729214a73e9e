"""`DistributedModel`: the model API of `LLMEngine` over TP / DP / EP ranks (rank 0 drives, workers follow).

Rank 0 runs the scheduler and holds a `DistributedModel` in place of the model. Each
``forward_incremental`` first broadcasts the step (token ids, which sequences, which states are new or
freed) to every rank over the CPU control group, then every rank runs its model part on the sequences
of its DP replica; replica leaders send their logits to rank 0. Workers (`run_worker`) mirror rank 0's
sequence states with their own cache tensors (caches are replicated over TP: one KV head). A step that
fails in a collective (a dead or hung rank) marks the executor failed: every later step raises
`ParallelError` at once.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.distributed as dist

from parity.distributed.collectives import broadcast_object
from parity.distributed.context import ParallelContext
from parity.errors import ParallelError, RequestError

log = logging.getLogger("parity.executor")


def _is_freed(state) -> bool:
    try:
        state.check_usable()
    except RequestError:
        return True
    return False


def _as_list(t) -> list[int]:
    return t.tolist() if isinstance(t, torch.Tensor) else [int(x) for x in t]


class _Replica:
    """One rank's execution of a broadcast step (shared by rank 0 and the workers)."""

    def __init__(self, model, ctx: ParallelContext):
        self.model, self.ctx = model, ctx
        self.states: dict[int, object] = {}
        self.replica_of: dict[int, int] = {}

    def apply(self, msg: dict, own_states: dict | None = None):
        """Run one step message; returns this replica's (rows, logits) or None when it had no rows."""
        ctx = self.ctx
        for pid, replica, modes in msg["new"]:
            self.replica_of[pid] = replica
            if replica == ctx.dp_rank:
                if own_states is not None and pid in own_states:
                    self.states[pid] = own_states[pid]
                else:
                    self.states[pid] = self.model.new_state(**modes)
        for pid in msg["freed"]:  # after "new": a state may come and go between steps
            st = self.states.pop(pid, None)
            self.replica_of.pop(pid, None)
            if st is not None and own_states is None:
                st.free()
        rows = [j for j, pid in enumerate(msg["ids"]) if self.replica_of[pid] == ctx.dp_rank]
        kw = msg["kw"]
        if rows:
            logits = self.model.forward_incremental(
                [msg["tokens"][j] for j in rows],
                [self.states[msg["ids"][j]] for j in rows],
                all_logits=msg["all_logits"],
                **kw,
            )
            return rows, logits
        if ctx.dp > 1 and ctx.config.enable_expert_parallel:
            # The MoE layers of every replica exchange tokens: an idle replica still runs one token.
            scratch = self.model.new_state(**{k: v for k, v in kw.items() if k in ("kv_cache_dtype", "indexer_dtype")})
            try:
                self.model.forward_incremental([[0]], [scratch], **kw)
            finally:
                scratch.free()
        return None


def _gather_logits(ctx: ParallelContext, part, n: int, all_logits: bool, device):
    """Rank 0: every replica leader's (rows, logits) assembled in step order; other ranks: None."""
    mine = None
    if part is not None and ctx.tp_rank == 0:
        rows, lg = part
        mine = (rows, [t.cpu() for t in lg] if all_logits else lg.cpu())
    box = [None] * ctx.world_size if ctx.is_driver else None
    dist.gather_object(mine, box, dst=0, group=ctx.control_group)
    if not ctx.is_driver:
        return None
    out: list = [None] * n
    for item in box:
        if item is None:
            continue
        rows, lg = item
        for k, j in enumerate(rows):
            out[j] = lg[k]
    if all_logits:
        return [t.to(device) for t in out]
    return torch.stack(out).to(device)


class DistributedModel:
    """Rank 0's stand-in for the model (same ``new_state`` / ``forward_incremental`` / ``cache_layout``
    API; other attributes come from rank 0's model part). `close` stops the workers."""

    def __init__(self, model, ctx: ParallelContext):
        self._model, self._ctx = model, ctx
        self._replica = _Replica(model, ctx)
        self._ids = itertools.count()
        self._live: dict[int, object] = {}  # pid -> rank 0's state
        self._pid: dict[int, int] = {}  # id(state) -> pid
        self._new: list[tuple[int, int, dict]] = []
        self._load = [0] * ctx.dp
        self.failed: BaseException | None = None
        #: Called with a message naming the failure when a step fails in a collective.
        self.on_failure = None
        #: Called after a collective failed: a message naming the rank that failed, or None when unknown
        #: (rank 0's watchdog of the spawned workers knows which process exited; gloo's text does not).
        self.failure_cause = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def parallel(self) -> ParallelContext:
        return self._ctx

    def new_state(self, allocator=None, kv_cache_dtype: str | None = None, indexer_dtype: str | None = None):
        """A sequence state on rank 0 (from ``allocator``: the engine's pool accounting) and, at the next
        step, its mirror on the ranks of the DP replica it is assigned to (the least loaded)."""
        st = self._model.new_state(allocator=allocator, kv_cache_dtype=kv_cache_dtype, indexer_dtype=indexer_dtype)
        pid = next(self._ids)
        replica = min(range(self._ctx.dp), key=lambda d: self._load[d])
        self._load[replica] += 1
        self._live[pid] = st
        self._pid[id(st)] = pid
        modes = {"kv_cache_dtype": kv_cache_dtype, "indexer_dtype": indexer_dtype}
        self._new.append((pid, replica, modes))
        return st

    def _collect_freed(self) -> list[int]:
        freed = [pid for pid, st in self._live.items() if _is_freed(st)]
        for pid in freed:
            st = self._live.pop(pid)
            self._pid.pop(id(st), None)
            replica = self._replica.replica_of.get(pid)
            self._load[replica if replica is not None else self._new_replica(pid)] -= 1
        return freed

    def _new_replica(self, pid: int) -> int:
        return next(r for p, r, _ in self._new if p == pid)

    def forward_incremental(
        self,
        tokens,
        states,
        all_logits: bool = False,
        kv_cache_dtype: str | None = None,
        indexer_dtype: str | None = None,
    ):
        """As `V4ForCausalLM.forward_incremental`, over every rank.

        Raises:
            ParallelError: a rank failed (now or in an earlier step).
            RequestError: invalid input (checked on every rank alike).
        """
        if self.failed is not None:
            raise ParallelError(f"the parallel engine has failed: {self.failed}") from None
        ids = []
        for st in states:
            if id(st) not in self._pid:
                raise RequestError("states: a SequenceState not created by this engine's new_state")
            ids.append(self._pid[id(st)])
        kw = {k: v for k, v in (("kv_cache_dtype", kv_cache_dtype), ("indexer_dtype", indexer_dtype)) if v}
        msg = {
            "op": "step",
            "tokens": [_as_list(t) for t in tokens],
            "ids": ids,
            "new": self._new,
            "freed": self._collect_freed(),
            "all_logits": all_logits,
            "kw": kw,
        }
        self._new = []
        try:
            broadcast_object(msg, self._ctx.control_group)
            rejected = None
            try:
                part = self._replica.apply(msg, own_states=self._live)
            except RequestError as e:  # every rank rejects the step alike; the gather below still runs
                rejected, part = e, None
            if self._ctx.dp > 1:
                out = _gather_logits(self._ctx, part, len(ids), all_logits, self._model.device)
            if rejected is not None:
                raise rejected
            if self._ctx.dp == 1:
                out = part[1]
        except (RuntimeError, dist.DistError) as e:
            raise self._collective_failed(e) from None
        for j, (t, st) in enumerate(zip(msg["tokens"], states, strict=True)):
            if self._replica.replica_of[ids[j]] != self._ctx.dp_rank:
                st.num_tokens += len(t)  # run by another replica: keep rank 0's bookkeeping in step
        return out

    def _collective_failed(self, e: BaseException) -> ParallelError:
        """Mark the executor failed after a collective raised ``e``; the error names the failed rank when
        it is known (an earlier `failed` set by the watchdog, or `failure_cause`), else gloo's text."""
        if self.failed is None:
            cause = self.failure_cause() if self.failure_cause is not None else None
            self.failed = ParallelError(cause or f"a parallel step failed in a collective (a rank died or hung): {e}")
        if self.on_failure is not None:
            self.on_failure(str(self.failed))
        return ParallelError(f"a parallel step failed: {self.failed}")

    def forward_logits(self, *a, **k):
        raise ParallelError("forward_logits is not available on a parallel engine: use forward_incremental")

    def close(self) -> None:
        """Tell every worker to exit (best effort when one has failed)."""
        if self.failed is None:
            try:
                broadcast_object({"op": "stop"}, self._ctx.control_group)
            except (RuntimeError, dist.DistError) as e:
                log.warning("could not stop the workers: %s", e)


def run_worker(model, ctx: ParallelContext) -> None:
    """A worker rank's loop: run every step rank 0 broadcasts until it says stop.

    Returns on "stop"; raises ParallelError when rank 0 is gone (a collective fails or times out).
    """
    replica = _Replica(model, ctx)
    while True:
        try:
            msg = broadcast_object(None, ctx.control_group)
        except (RuntimeError, dist.DistError) as e:
            raise ParallelError(f"rank {ctx.rank}: lost rank 0 ({e})") from None
        if msg["op"] == "stop":
            return
        try:
            part = replica.apply(msg)
        except RequestError as e:  # rank 0 raises the same error to its caller
            log.debug("rank %d: step rejected: %s", ctx.rank, e)
            part = None
        except (RuntimeError, dist.DistError) as e:
            raise ParallelError(f"rank {ctx.rank}: a step failed in a collective: {e}") from None
        if ctx.dp > 1:
            _gather_logits(ctx, part, len(msg["ids"]), msg["all_logits"], model.device)
