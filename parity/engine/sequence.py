"""Requests and sequences: the engine's bookkeeping of who has what tokens, text and cache.

A `Request` (one prompt, one SamplingParams) owns `n` `Sequence`s, one per completion. A sequence's
cache state (the model's `SequenceState` over a `SequenceCache`) can be dropped at any time
(preemption) and rebuilt by recomputing prompt + generated tokens: generation then continues exactly
where it stopped (same tokens under greedy; seeded sampling keeps its generator).
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from parity.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamDelta
from parity.engine.sampler import TokenLogprobs
from parity.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class _FallbackDetokenizer:
    """Incremental detokenizer over any tokenizer with `decode(ids, skip_special_tokens)`.

    Re-decodes a short tail of tokens and never releases a trailing U+FFFD (an unfinished UTF-8
    character split across tokens). Used when parity.tokenizer has no IncrementalDetokenizer.
    """

    def __init__(self, tok, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new


def make_detokenizer(tokenizer, skip_special_tokens: bool):
    """parity.tokenizer.IncrementalDetokenizer when available, else the fallback above; None without tokenizer."""
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "token_bytes") and hasattr(tokenizer, "special_ids"):
        try:
            from parity.tokenizer import IncrementalDetokenizer  # type: ignore[attr-defined]
        except ImportError:
            pass
        else:
            return IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return _FallbackDetokenizer(tokenizer, skip_special_tokens)


class Sequence:
    """One completion being generated.

    Attributes:
        seq_id: engine-unique int; index: completion index within its request.
        prompt_ids / output_ids: token ids; num_computed: tokens already in the cache state.
        state: the model's SequenceState (None while waiting/preempted); cache: its SequenceCache.
        text: detokenized output so far (stop string excluded once matched, unless
            include_stop_str_in_output); sent_text: chars streamed.
    """

    def __init__(self, seq_id: int, request: Request, index: int, generator: torch.Generator | None, detokenizer: Any):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params = request.params
        self.prompt_ids = request.prompt_ids
        self.output_ids: list[int] = []
        self.generator = generator
        self.detok = detokenizer
        self.status = SeqStatus.WAITING
        self.state = None
        self.cache = None
        self.num_computed = 0
        self.block_keys: list[bytes] = []  # prefix-cache keys of its full blocks so far (`PrefixCache.keys`)
        self.text = ""
        self.sent_text = 0
        self.sent_tokens = 0
        self.logprobs: list[TokenLogprobs] | None = [] if self.params.logprobs is not None else None
        self.sent_logprobs = 0
        # TokenLogprobs of prompt token i given tokens < i (entry 0: None), filled during prefill
        want_prompt = self.params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] * len(self.prompt_ids) if want_prompt else None
        self.sent_prompt_logprobs = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.final_sent = False  # the delta with finished=True was produced
        # inside the reasoning block the prompt opened (until params.reasoning_end_token_id is sampled);
        # answer_start: where the answer starts in `text` (stop strings match from there), None before
        self.in_reasoning = self.params.reasoning_end_token_id is not None
        self.answer_start: int | None = None if self.in_reasoning else 0

    # ------------------------------------------------------------------ tokens
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return list(self.prompt_ids[start:end])
        if start >= p:
            return self.output_ids[start - p : end - p]
        return list(self.prompt_ids[start:]) + self.output_ids[: end - p]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def priority(self) -> tuple[float, int]:
        """FCFS key: earlier arrival first, then completion index."""
        return (self.request.metrics.arrival_time, self.seq_id)

    # ------------------------------------------------------------------ generation
    def append(self, token: int, lp: TokenLogprobs | None, eos_ids: frozenset[int], max_model_len: int) -> None:
        """Record a generated token and decide whether the sequence stops (sets finish_reason)."""
        p = self.params
        self.output_ids.append(token)
        if self.logprobs is not None and lp is not None:
            self.logprobs.append(lp)
        n_out = len(self.output_ids)
        closes_reasoning = self.in_reasoning and token == p.reasoning_end_token_id
        if closes_reasoning:
            self.in_reasoning = False
        may_stop = n_out >= p.min_tokens
        if may_stop and not p.ignore_eos and token in eos_ids:
            self.finish_reason, self.stop_reason = "stop", None
            self._flush()
            return
        if may_stop and p.stop_token_ids and token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
            self._flush()
            return
        if self.detok is not None:
            new = self.detok.add([token])
            if new:
                prev = len(self.text)
                self.text += new
            if closes_reasoning:
                self.answer_start = len(self.text)
            if new:
                if p.stop and may_stop and self.answer_start is not None:
                    start = max(self.answer_start, prev - p.max_stop_len + 1)
                    best = None
                    for s in p.stop:
                        k = self.text.find(s, start)
                        if k >= 0 and (best is None or k < best[0]):
                            best = (k, s)
                    if best is not None:
                        keep = len(best[1]) if p.include_stop_str_in_output else 0
                        self.text = self.text[: best[0] + keep]
                        self.finish_reason, self.stop_reason = "stop", best[1]
                        return
        max_tokens = p.max_tokens if p.max_tokens is not None else max_model_len
        if n_out >= max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason, self.stop_reason = "length", None
            self._flush()

    def _flush(self) -> None:
        """End of text: release what the detokenizer held back (an unfinished character -> U+FFFD)."""
        flush = getattr(self.detok, "flush", None)
        if flush is not None:
            self.text += flush()

    def delta(self) -> StreamDelta | None:
        """What is new since the last delta (None when nothing). Holds back a possible stop-string prefix."""
        done = self.finish_reason is not None
        upto = len(self.text)
        if not done and self.params.stop:
            upto = max(self.sent_text, len(self.text) - self.params.max_stop_len + 1)
        new_text = self.text[self.sent_text : upto]
        new_ids = self.output_ids[self.sent_tokens :]
        if not new_ids and not new_text and not done:
            return None
        lps = None
        if self.logprobs is not None:
            lps = self.logprobs[self.sent_logprobs :]
            self.sent_logprobs = len(self.logprobs)
        plps = None
        if self.prompt_logprobs is not None and not self.sent_prompt_logprobs:
            plps, self.sent_prompt_logprobs = list(self.prompt_logprobs), True
        self.sent_text = upto
        self.sent_tokens = len(self.output_ids)
        r = self.request
        if done:
            self.final_sent = True
        return StreamDelta(
            request_id=r.request_id,
            index=self.index,
            new_token_ids=list(new_ids),
            new_text=new_text,
            finished=done,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            request_finished=done and all(s.final_sent for s in r.seqs),
            logprobs=lps,
            prompt_logprobs=plps,
            num_prompt_tokens=len(self.prompt_ids),
            num_output_tokens=len(self.output_ids),
            metrics=r.metrics,
            error=self.error,
            num_cached_tokens=r.metrics.num_cached_tokens,
            prompt_token_ids=r.prompt_ids,
        )

    def completion(self) -> CompletionOutput:
        cum = None
        if self.logprobs is not None:
            cum = float(sum(lp.logprob for lp in self.logprobs))
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            cumulative_logprob=cum,
        )


class Request:
    """One prompt with its SamplingParams and its n sequences."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.metrics = RequestMetrics(
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            num_prompt_tokens=len(self.prompt_ids),
        )
        self.seqs: list[Sequence] = []
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """The RequestOutput of every completion so far; prompt logprobs (when asked) from the first
        sequence, as every sequence scores the same prompt."""
        plps = self.seqs[0].prompt_logprobs if self.seqs else None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_ids),
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            prompt_logprobs=list(plps) if plps is not None else None,
        )
