"""`LLMEngine`: the synchronous core — admit requests, run steps, emit deltas.

One `step()` = one scheduler plan + one batched `model.forward_incremental` over every scheduled
sequence's new tokens (prefill chunks and decode tokens together) + one batched `sample` over the
sequences whose chunk reached their end. Not thread-safe: `LLM` drives it directly, `AsyncEngine`
from its own thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import torch

from parity import devices
from parity.engine.args import EngineArgs
from parity.engine.cache_pool import CachePool, CachePoolExhausted, SequenceCache, _align, normalize_layout
from parity.engine.model_loading import load_model, load_tokenizer_for, resolve_dtype
from parity.engine.model_runner import prepare_step_path, step_path_stats
from parity.engine.outputs import StreamDelta
from parity.engine.prefix_cache import engine_prefix_cache
from parity.engine.sampler import SampleRequest, sample, score_prompt_chunk
from parity.engine.sampling_params import SamplingParams
from parity.engine.scheduler import Scheduler
from parity.engine.sequence import Request, SeqStatus, Sequence, make_detokenizer
from parity.errors import CheckpointError, ParallelError, RequestError
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.prefix_state import block_tokens_for

log = logging.getLogger("parity.engine")


class EngineQueueFull(RequestError):
    """`max_waiting` sequences are already waiting for admission (HTTP 429 upstream)."""


class LLMEngine:
    """The synchronous engine.

    Args:
        args: EngineArgs.
        model: an already built model (skips loading; tests and benchmarks); its device/dtype win.
        tokenizer: a tokenizer object (encode/decode); default: parity.tokenizer for the checkpoint.
    Raises:
        RequestError: invalid engine arguments (names the argument).
    """

    def __init__(self, args: EngineArgs | None = None, model=None, tokenizer="auto"):
        self.args = args = args or EngineArgs()
        args.validate()
        model_dir = None
        if model is None:
            self.device = devices.resolve(args.device)
            self.dtype = resolve_dtype(args.dtype, self.device)
            model, model_dir = load_model(
                args.model,
                self.device,
                self.dtype,
                args.seed,
                args.quantization,
                quantize_lm_head=args.quantize_lm_head,
            )
        else:
            p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            dev = getattr(model, "device", None) or (p.device if p is not None else devices.resolve(args.device))
            self.device = torch.device(dev)
            dt = getattr(model, "dtype", None)
            self.dtype = dt if isinstance(dt, torch.dtype) else (p.dtype if p is not None else torch.float32)
        self.model = model
        self.config = model.config
        if hasattr(model, "eval"):
            model.eval()
        limit = int(self.config.max_position_embeddings)
        self.max_model_len = int(args.max_model_len or limit)
        if self.max_model_len > limit:
            raise RequestError(
                f"engine argument 'max_model_len' ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        # ---- cache pool: its page size and an explicit budget checked before compiling, allocated after
        kv = args.kv_cache_dtype if args.kv_cache_dtype not in (None, "auto") else None
        self._kv_kw = {"kv_cache_dtype": kv} if kv else {}
        layout_fn = getattr(model, "cache_layout", None)
        raw = []
        if layout_fn is not None:
            raw = layout_fn(kv_cache_dtype=kv) if kv else layout_fn(getattr(model, "kv_cache_dtype", "bf16"))
        self.layout = normalize_layout(raw, getattr(model, "cache_block_entries", None))
        page = max((_align(e.nbytes) for e in self.layout), default=0)
        if self.layout and args.enable_prefix_caching and isinstance(model, V4ForCausalLM):
            # a prefix block's compressed rows ([block / ratio, width]) must fit in one page too
            block = block_tokens_for(self.config, args.prefix_block_tokens, self.max_model_len)
            page = max(
                [page] + [_align(e.nbytes * (block // e.ratio) // e.block_entries) for e in self.layout if e.growing]
            )
        if self.layout and args.cache_memory is not None:
            CachePool.check_budget(int(args.cache_memory), page, self.device)
        self.tokenizer = load_tokenizer_for(model_dir) if tokenizer == "auto" else tokenizer
        self.vocab_size = int(self.config.vocab_size)
        tok_vocab = getattr(self.tokenizer, "vocab_size", None)
        if isinstance(tok_vocab, int) and tok_vocab > self.vocab_size:
            where = f"checkpoint {str(model_dir)!r}" if model_dir is not None else "the model"
            raise CheckpointError(
                f"{where} has vocab_size {self.vocab_size} but its tokenizer has {tok_vocab} tokens (with no "
                f"tokenizer.json in a checkpoint, parity uses the bundled DeepSeek-V4 tokenizer); put the model's "
                f"own tokenizer.json in the checkpoint directory, or serve token ids only (--skip-tokenizer-init)"
            )
        eos = self.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos_ids)

        self.step_path = prepare_step_path(
            model, self.device, args.enforce_eager, args.warm_up_in_background, args.max_num_seqs
        )
        if self.layout:
            budget = args.cache_memory
            if budget is None:
                free, _ = devices.memory_info(self.device)
                budget = free * args.cache_memory_fraction
            self.pool: CachePool | None = CachePool(int(budget), page, self.device)
        else:
            self.pool = None

        def new_state(cache: SequenceCache):
            return model.new_state(allocator=cache, **self._kv_kw)

        self.prefix_cache = engine_prefix_cache(self, args, model_dir)
        self.scheduler = Scheduler(
            self.pool,
            self.layout,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            new_state,
            self.device,
            self.prefix_cache,
        )
        self.generator = devices.manual_seed(self.device, args.seed)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._pending: list[StreamDelta] = []

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block that no request is reading (vLLM's ``reset_prefix_cache``).
        Returns True when the cache is empty afterwards (or there is none)."""
        if self.prefix_cache is None:
            return True
        self.prefix_cache.clear()
        return not self.prefix_cache.blocks

    # ------------------------------------------------------------------ requests
    def pages_needed(self, num_tokens: int) -> int:
        """Pool pages one sequence of `num_tokens` tokens needs at most (0 without a pool)."""
        if self.pool is None:
            return 0
        d = SequenceCache(None).demand(self.layout, num_tokens)
        return sum(math.ceil(n / (self.pool.page_bytes // sb)) for sb, n in d.items())

    def token_capacity(self, limit: int | None = None) -> int:
        """Most tokens one sequence can hold in the empty pool (binary search on `pages_needed`),
        capped at `limit` (default max_model_len). Without a pool: the limit."""
        hi = int(limit or self.max_model_len)
        if self.pool is None or self.pages_needed(hi) <= self.pool.num_pages:
            return hi
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.pages_needed(mid) <= self.pool.num_pages:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _fits_empty_pool(self, num_tokens: int) -> bool:
        return self.pool is None or self.pages_needed(num_tokens) <= self.pool.num_pages

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("parameter 'prompt': text prompts need a tokenizer; pass prompt_token_ids instead")
        return list(self.tokenizer.encode(prompt))

    def add_request(
        self,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
        arrival_time: float | None = None,
        enforce_queue_limit: bool = True,
    ) -> Request:
        """Validate and queue a request.

        Args:
            prompt_token_ids: token ids (or None with `prompt` text, tokenized here).
            params: SamplingParams (default SamplingParams()).
            request_id: unique id (default: a counter); prompt: the text, kept for outputs.
            arrival_time: time.monotonic() of arrival (default now).
            enforce_queue_limit: apply max_waiting (the offline LLM queues everything).
        Returns:
            the Request (its sequences are waiting).
        Raises:
            RequestError: empty prompt, token ids out of range, prompt too long for max_model_len,
                invalid sampling parameters, duplicate request_id, request larger than the cache pool;
                EngineQueueFull when max_waiting sequences already wait.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"parameter 'sampling_params' must be a SamplingParams, got {type(params).__name__}")
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("parameter 'prompt' is missing: give a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise RequestError(f"parameter 'prompt' must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.encode(prompt)
        if isinstance(prompt_token_ids, torch.Tensor):
            prompt_token_ids = prompt_token_ids.tolist()
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise RequestError(
                f"parameter 'prompt_token_ids' must be a list of ints, got {type(prompt_token_ids).__name__}"
            )
        if len(prompt_token_ids) == 0:
            raise RequestError("parameter 'prompt' is empty: expected at least one token")
        ids = list(prompt_token_ids)

        def ok(t) -> bool:
            return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size

        if not all(ok(t) for t in ids):
            bad = next(t for t in ids if not ok(t))
            raise RequestError(
                f"parameter 'prompt_token_ids' contains {bad!r}: expected ints in [0, {self.vocab_size})"
            )
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"parameter 'prompt' has {len(ids)} tokens: expected fewer than max_model_len "
                f"({self.max_model_len}) to leave room for output"
            )
        params.validate(self.vocab_size, self.max_model_len, len(ids))
        if params.stop and self.tokenizer is None:
            raise RequestError("sampling parameter 'stop' needs a tokenizer; use stop_token_ids instead")
        # sequences queued but bound for a free running slot at the next step are not really waiting
        sched = self.scheduler
        free_slots = max(0, sched.max_num_seqs - sched.num_running)
        if enforce_queue_limit and max(0, sched.num_waiting + params.n - free_slots) > self.args.max_waiting:
            raise EngineQueueFull(
                f"request queue is full: {max(0, sched.num_waiting - free_slots)} sequences waiting, "
                f"{params.n} more would exceed max_waiting = {self.args.max_waiting} sequences; retry later"
            )
        total = len(ids) + (params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids))
        if not self._fits_empty_pool(min(total, self.max_model_len)):
            raise RequestError(
                f"sampling parameter 'max_tokens': prompt + max_tokens ({total} tokens) needs more "
                f"cache than the whole pool ({self.pool.total_bytes if self.pool else 0} bytes)"
            )
        if request_id is None:
            request_id = f"req-{next(self._req_ids)}"
        request_id = str(request_id)
        if request_id in self.requests:
            raise RequestError(f"parameter 'request_id' {request_id!r} is already in use")
        req = Request(request_id, prompt, ids, params, arrival_time)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = devices.manual_seed(self.device, params.seed + i)
            seq = Sequence(
                next(self._seq_ids), req, i, gen, make_detokenizer(self.tokenizer, params.skip_special_tokens)
            )
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request now (finish_reason "abort"), free its cache. Returns False if unknown/finished."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        now = time.monotonic()
        for seq in req.seqs:
            if seq.finished:
                continue
            self.scheduler.remove(seq)
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = "abort"
        req.metrics.finished_time = now
        for seq in req.seqs:
            d = seq.delta()
            if d is not None:
                self._pending.append(d)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        req = seq.request
        if req.finished:
            req.metrics.finished_time = time.monotonic()
            self.requests.pop(req.request_id, None)

    def _fail_request(self, req: Request, err: Exception) -> None:
        """Finish every sequence of `req` with finish_reason "abort" and `error` set (frees its cache)."""
        req.error = f"{type(err).__name__}: {err}"
        for seq in req.seqs:
            if not seq.finished:
                seq.error = req.error
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
        req.metrics.finished_time = time.monotonic()
        self.requests.pop(req.request_id, None)

    def _fail_batch(self, scheduled, err: Exception) -> None:
        """A step failed: abort its requests with the error (others keep running)."""
        for s in scheduled:
            self._fail_request(s.seq.request, err)

    def _sample_isolated(self, logits: torch.Tensor, reqs: list[SampleRequest]):
        """`sample` over every row; when the batched call raises, each row is sampled alone so that only
        the rows whose own parameters fail are lost.

        Args:
            logits: FloatTensor[b, V]; reqs: b SampleRequest.
        Returns:
            (tokens: b ints or None, logprobs: b TokenLogprobs or None, errors: b Exception or None).
        """
        try:
            toks, lps = sample(logits, reqs, self.generator)
            return toks, lps, [None] * len(reqs)
        except Exception:
            log.warning("batched sampling failed; sampling %d rows one by one", len(reqs))
        toks, lps, errs = [], [], []
        for j, r in enumerate(reqs):
            try:
                t, lp = sample(logits[j : j + 1], [r], self.generator)
                toks.append(t[0])
                lps.append(lp[0])
                errs.append(None)
            except Exception as e:  # attributable to this request alone
                toks.append(None)
                lps.append(None)
                errs.append(e)
        return toks, lps, errs

    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Run one step. Returns the deltas of every sequence that produced output or finished."""
        deltas, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return deltas
        tokens = [s.seq.token_slice(s.start, s.start + s.num_tokens) for s in scheduled]
        states = [s.seq.state for s in scheduled]
        pc = self.prefix_cache
        plans = [pc.plan_step(s.seq, s.start, s.num_tokens) for s in scheduled] if pc is not None else []
        # prompt scoring: every new prompt position's logits, for the sequences that ask and are in prefill
        scoring = [s.seq.params.prompt_logprobs is not None and s.start < len(s.seq.prompt_ids) for s in scheduled]
        try:
            if any(scoring):
                rows_logits = self.model.forward_incremental(tokens, states, all_logits=True, **self._kv_kw)
                for s, rows, scores in zip(scheduled, rows_logits, scoring, strict=True):
                    if scores:
                        q = s.seq
                        score_prompt_chunk(q.prompt_logprobs, q.prompt_ids, s.start, rows, q.params.prompt_logprobs)
                logits = torch.stack([r[-1] for r in rows_logits])
            else:
                logits = self.model.forward_incremental(tokens, states, **self._kv_kw)
        except CachePoolExhausted:
            self._abandon(scheduled)
            # the layout under-estimated: recompute every sequence of this step later
            log.warning("cache pool exhausted inside a step; preempting %d sequences", len(scheduled))
            for s in scheduled:
                if s.seq.status == SeqStatus.RUNNING:
                    self.scheduler.preempt(s.seq)
            return deltas
        except Exception as e:  # a failing step fails its requests, never the engine
            if isinstance(e, ParallelError):  # a dead or hung rank: expected, its message names it
                log.error("model step failed: %s", e)
            else:
                log.exception("model step failed")
            self._abandon(scheduled)
            self._fail_batch(scheduled, e)
            for s in scheduled:
                d = s.seq.delta()
                if d is not None:
                    deltas.append(d)
            return deltas
        self.num_steps += 1
        for s, ends in zip(scheduled, plans, strict=True) if pc is not None else ():
            if ends:
                pc.commit_step(s.seq, ends)
        rows, reqs = [], []
        for i, s in enumerate(scheduled):
            s.seq.num_computed = s.start + s.num_tokens
            n_prompt = len(s.seq.prompt_ids)
            if not s.seq.output_ids and s.start < n_prompt <= s.start + s.num_tokens:
                self.num_prompt_tokens += n_prompt  # prompt fully read (recomputation not counted)
            if s.completes:
                rows.append(i)
                q = s.seq
                banned = (
                    tuple(self.eos_ids)
                    if q.params.strict_thinking and q.in_reasoning and not q.params.ignore_eos
                    else ()
                )
                reqs.append(
                    SampleRequest(q.params, q.prompt_ids, q.output_ids, q.generator, tuple(self.eos_ids), banned)
                )
        if not rows:
            return deltas
        sel = logits if len(rows) == len(scheduled) else logits[torch.tensor(rows, device=logits.device)]
        toks, lps, errs = self._sample_isolated(sel, reqs)
        now = time.monotonic()
        for j, i in enumerate(rows):
            seq = scheduled[i].seq
            if seq.finished:  # a sibling choice failed this request earlier in this loop
                continue
            if errs[j] is not None:
                log.warning("request %s failed in sampling: %s", seq.request.request_id, errs[j])
                self._fail_request(seq.request, errs[j])
                continue
            m = seq.request.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.num_generation_tokens += 1
            self.num_generation_tokens += 1
            try:  # detokenizing and stop checks: a failure is this request's alone
                seq.append(toks[j], lps[j], self.eos_ids, self.max_model_len)
            except Exception as e:
                log.warning("request %s failed after sampling: %s", seq.request.request_id, e)
                self._fail_request(seq.request, e)
                continue
            if seq.finish_reason is not None:
                self._finish(seq)
        seen: set[int] = set()
        for i in rows:
            for seq in scheduled[i].seq.request.seqs:
                if seq.seq_id in seen or not (seq is scheduled[i].seq or seq.error is not None):
                    continue
                seen.add(seq.seq_id)
                d = seq.delta()
                if d is not None:
                    deltas.append(d)
        return deltas

    def _abandon(self, scheduled) -> None:
        """A step failed: drop the rows its prefix-cache plan captured."""
        if self.prefix_cache is not None:
            for s in scheduled:
                self.prefix_cache.abandon_step(s.seq)

    def stats(self) -> dict:
        """Engine state for metrics: running/waiting counts, cache pool bytes (``cache_used_bytes``: held
        by sequences; ``prefix_cache_bytes``: cached prefix blocks, evictable), token counters,
        prefix-cache queries/hits (tokens), and on the compiled step path the batch buckets warm
        (``compiled_buckets_ready``) of those it compiles (``compiled_buckets_total``)."""
        out = {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
        }
        out.update(step_path_stats(self.step_path, self.model))
        if self.pool is not None:
            out.update(self.pool.stats())
        if self.prefix_cache is not None:
            out.update(self.prefix_cache.stats())
            out["cache_used_bytes"] -= self.prefix_cache.nbytes
        else:
            used = sum(s.cache.nbytes for s in self.scheduler.running if s.cache is not None)
            out.update({"cache_used_bytes": used, "cache_total_bytes": 0})
        return out
