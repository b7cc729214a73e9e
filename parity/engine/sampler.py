"""Batched sampler: one call turns the logits of every sequence in a step into next tokens.

Order of operations (as in vLLM's v1 sampler, vllm/v1/sample/sampler.py, and HF's logits processors):
raw log-probabilities for `logprobs` (before any processing, vLLM's default "raw_logprobs") ->
min_tokens masking of EOS/stop ids and of banned ids (strict thinking) -> repetition penalty (CTRL,
arXiv:1909.05858 §4.1: divide positive logits, multiply negative ones, for every token seen in prompt or
output) -> frequency and presence
penalties (OpenAI API: `logit -= count * frequency + (count > 0) * presence` over generated tokens) ->
greedy argmax, or temperature -> top_k -> top_p -> min_p -> draw.

Drawing uses the exponential-race identity argmax(p_i / E_i), E_i ~ Exp(1) (equivalent to drawing from
p), so each seeded request consumes its own `torch.Generator` (from `parity.devices.manual_seed`) with
exactly one vocabulary-sized draw per token, independent of the batch it shares.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from parity.devices.row_argmax import row_argmax
from parity.engine.sampling_params import SamplingParams


@dataclass
class TokenLogprobs:
    """Log-probabilities of one generated token (natural log, raw model distribution).

    Attributes:
        token_id: the generated token; logprob: its log-probability; rank: 1-based rank in the vocabulary.
        top: the N most likely tokens as (token_id, logprob), best first (N = SamplingParams.logprobs).
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class SampleRequest:
    """What the sampler needs to know about one row of the logits.

    Attributes:
        params: the request's SamplingParams.
        prompt_ids: prompt token ids (for the repetition penalty).
        output_ids: generated token ids so far (penalties, min_tokens).
        generator: per-request torch.Generator (seeded requests) or None.
        eos_ids: token ids that count as EOS for min_tokens masking.
        banned_ids: token ids that cannot be sampled this step (strict thinking: the EOS ids while the
            reasoning block is open).
    """

    params: SamplingParams
    prompt_ids: Seq[int]
    output_ids: Seq[int]
    generator: torch.Generator | None
    eos_ids: Seq[int] = ()
    banned_ids: Seq[int] = ()


def _apply_penalties(logits: torch.Tensor, rows: list[int], reqs: list[SampleRequest]) -> None:
    """In place on `logits` [B, V] for the listed rows."""
    dev = logits.device
    vocab = logits.shape[1]
    sub = logits[rows]  # [b, V]
    b = len(rows)
    counts = torch.zeros(b, vocab, device=dev, dtype=logits.dtype)
    seen = torch.zeros(b, vocab, device=dev, dtype=torch.bool)
    rep = torch.ones(b, 1, device=dev, dtype=logits.dtype)
    freq = torch.zeros(b, 1, device=dev, dtype=logits.dtype)
    pres = torch.zeros(b, 1, device=dev, dtype=logits.dtype)
    for j, r in enumerate(reqs):
        p = r.params
        if r.output_ids:
            out = torch.as_tensor(list(r.output_ids), device=dev, dtype=torch.long)
            counts[j].index_add_(0, out, torch.ones(out.numel(), device=dev, dtype=logits.dtype))
        if p.repetition_penalty != 1.0:
            ids = list(r.prompt_ids) + list(r.output_ids)
            if ids:
                seen[j, torch.as_tensor(ids, device=dev, dtype=torch.long)] = True
        rep[j, 0] = p.repetition_penalty
        freq[j, 0] = p.frequency_penalty
        pres[j, 0] = p.presence_penalty
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    sub = sub - counts * freq - (counts > 0).to(sub.dtype) * pres
    logits[rows] = sub


def _filter(logits: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p for sampled rows. logits [b, V] -> filtered logits [b, V]."""
    dev = logits.device
    b, vocab = logits.shape
    temp = torch.tensor([r.params.temperature for r in reqs], device=dev, dtype=logits.dtype).unsqueeze(1)
    logits = logits / temp
    ks = [r.params.top_k if r.params.top_k > 0 else vocab for r in reqs]
    ps = [r.params.top_p for r in reqs]
    need_k = any(k < vocab for k in ks)
    need_p = any(p < 1.0 for p in ps)
    if need_k or need_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if need_k:
            pos = torch.arange(vocab, device=dev).unsqueeze(0)
            mask |= pos >= torch.tensor(ks, device=dev).unsqueeze(1)
        if need_p:
            probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
            mask |= before > torch.tensor(ps, device=dev, dtype=probs.dtype).unsqueeze(1)
        mask[:, 0] = False  # always keep the best token
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    mins = [r.params.min_p for r in reqs]
    if any(m > 0 for m in mins):
        probs = torch.softmax(logits, dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * torch.tensor(mins, device=dev, dtype=probs.dtype).unsqueeze(1)
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, reqs: list[SampleRequest], generator: torch.Generator | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Choose the next token of each row.

    Args:
        logits: FloatTensor[B, V], raw model logits of each sequence's last position (any float dtype).
        reqs: B SampleRequest, one per row.
        generator: engine-wide generator for unseeded sampled rows (None = torch default).
    Returns:
        (token ids: list of B ints, logprobs: list of B TokenLogprobs or None where not requested).
    """
    B, vocab = logits.shape
    if B != len(reqs):
        raise ValueError(f"sample: {B} logits rows but {len(reqs)} requests")
    logits = logits.float()
    dev = logits.device

    # raw logprobs (before any processing)
    lp_rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    raw_lp = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None

    processed = logits
    # min_tokens: EOS and stop ids are impossible until min_tokens tokens exist
    mt_rows, mt_cols = [], []
    for i, r in enumerate(reqs):
        p = r.params
        if p.min_tokens and len(r.output_ids) < p.min_tokens:
            ids = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                ids.update(r.eos_ids)
            for t in ids:
                mt_rows.append(i)
                mt_cols.append(t)
        for t in r.banned_ids:
            mt_rows.append(i)
            mt_cols.append(t)
    if mt_rows or any(r.params.uses_penalties for r in reqs):
        processed = logits.clone()
    if mt_rows:
        processed[torch.tensor(mt_rows, device=dev), torch.tensor(mt_cols, device=dev)] = float("-inf")
    pen_rows = [i for i, r in enumerate(reqs) if r.params.uses_penalties]
    if pen_rows:
        _apply_penalties(processed, pen_rows, [reqs[i] for i in pen_rows])

    tokens = torch.empty(B, dtype=torch.long, device=dev)
    greedy_rows = [i for i, r in enumerate(reqs) if r.params.greedy]
    sample_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if len(greedy_rows) == B:
        tokens = row_argmax(processed)
    else:
        if greedy_rows:
            gi = torch.tensor(greedy_rows, device=dev)
            tokens[gi] = row_argmax(processed[gi])
        si = torch.tensor(sample_rows, device=dev)
        sreqs = [reqs[i] for i in sample_rows]
        probs = torch.softmax(_filter(processed[si], sreqs), dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, r in enumerate(sreqs) if r.generator is None]
        if unseeded:
            uj = torch.tensor(unseeded, device=dev)
            noise[uj] = torch.empty(len(unseeded), vocab, device=dev).exponential_(generator=generator)
        for j, r in enumerate(sreqs):
            if r.generator is not None:
                noise[j].exponential_(generator=r.generator)
        tokens[si] = row_argmax(probs / noise)

    token_list = tokens.tolist()
    out_lp: list[TokenLogprobs | None] = [None] * B
    if lp_rows:
        assert raw_lp is not None
        chosen = token_logprobs(
            raw_lp, [token_list[i] for i in lp_rows], [reqs[i].params.logprobs or 0 for i in lp_rows]
        )
        for i, entry in zip(lp_rows, chosen, strict=True):
            out_lp[i] = entry
    return token_list, out_lp


def token_logprobs(logprobs: torch.Tensor, ids: list[int], n_tops: list[int]) -> list[TokenLogprobs]:
    """The entries of given tokens in rows of log-probabilities.

    Args:
        logprobs: FloatTensor[L, V] of log-probabilities (log_softmax of raw logits).
        ids: the L tokens, one per row; n_tops: how many most likely tokens to list per row (0: none).
    Returns:
        L TokenLogprobs: each token's log-probability, its 1-based rank and its row's top ``n_tops[k]``.
    """
    sel = torch.tensor(ids, device=logprobs.device, dtype=torch.long)
    own = logprobs.gather(1, sel[:, None])[:, 0]
    ranks = ((logprobs > own[:, None]).sum(dim=-1) + 1).tolist()
    m = max(n_tops, default=0)
    top_v, top_i = [], []
    if m > 0:
        values, indices = logprobs.topk(m, dim=-1)
        top_v, top_i = values.tolist(), indices.tolist()
    return [
        TokenLogprobs(t, v, int(ranks[k]), list(zip(top_i[k][:n], top_v[k][:n], strict=True)) if n > 0 else [])
        for k, (t, v, n) in enumerate(zip(ids, own.tolist(), n_tops, strict=True))
    ]


def score_prompt_chunk(out: list, prompt_ids, start: int, rows: torch.Tensor, n_top: int) -> None:
    """Fill `out[p + 1]` with the TokenLogprobs of prompt token p + 1 after each position p of a prefill
    chunk starting at `start` (rows: FloatTensor[chunk tokens, V]); a recomputed chunk overwrites."""
    k = min(rows.shape[0], len(prompt_ids) - 1 - start)  # positions whose next token is a prompt token
    if k > 0:
        lp = torch.log_softmax(rows[:k].float(), dim=-1)
        out[start + 1 : start + 1 + k] = token_logprobs(lp, list(prompt_ids[start + 1 : start + 1 + k]), [n_top] * k)
