"""Prompt scoring (SamplingParams.prompt_logprobs): each prompt token's log-probability given the tokens before
it, the same whether the prompt is prefilled in one chunk or several, or repeated with the prefix cache on."""

from __future__ import annotations

import pytest
import torch

from parity.engine import LLM, SamplingParams
from parity.errors import RequestError

IDS = [19923, 2058, 14, 566, 344, 260, 1950, 19923, 2058, 14]


def score(llm: LLM, request_id: str) -> list:
    eng = llm.engine
    eng.add_request(IDS, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2), request_id=request_id)
    firsts = []
    while eng.has_unfinished():
        firsts += [d.prompt_logprobs for d in eng.step() if d.prompt_logprobs is not None]
    assert len(firsts) == 1  # sent once, with the first delta
    return firsts[0]


@pytest.fixture(scope="module")
def engines():
    one = LLM(device="cpu", max_model_len=64, cache_memory=16 << 20, enable_prefix_caching=True)
    chunked = LLM(
        device="cpu",
        model_obj=one.engine.model,
        max_model_len=64,
        cache_memory=16 << 20,
        enable_prefix_caching=True,
        max_num_batched_tokens=4,
    )
    return one, chunked


def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before(engines):
    one, chunked = engines
    got = score(one, "a")
    ref = torch.log_softmax(one.engine.model.forward_logits(torch.tensor([IDS]))[0].float(), -1)
    assert got[0] is None and len(got) == len(IDS)
    for i in range(1, len(IDS)):
        e = got[i]
        assert e.token_id == IDS[i] and len(e.top) == 2 and e.top[0][1] >= e.top[1][1]
        assert abs(e.logprob - ref[i - 1, IDS[i]].item()) < 0.05  # position i-1 predicts token i
        assert e.rank >= 1
    again = score(one, "b")  # the prefix cache holds this prompt now: still every position scored
    chunks = score(chunked, "c")  # prefill in chunks of 4 tokens
    for other in (again, chunks):
        assert [(e.token_id, round(e.logprob, 4)) for e in other[1:]] == [
            (e.token_id, round(e.logprob, 4)) for e in got[1:]
        ]


def test_prompt_logprobs_range_is_checked():
    with pytest.raises(RequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1).validate()


def test_offline_generate_returns_prompt_logprobs_as_the_stream_does(engines):
    one, _ = engines
    streamed = score(one, "d")
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, n=2)
    out, text_out = one.generate(
        [{"prompt_token_ids": IDS}, {"prompt": "Hello there"}], [sp, SamplingParams(max_tokens=1, prompt_logprobs=0)]
    )
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(IDS) and got[0] is None
    for e, ref in zip(got[1:], streamed[1:], strict=True):  # batched with other rows: equal up to rounding
        assert e.token_id == ref.token_id and len(e.top) == 2 and e.rank >= 1
        assert abs(e.logprob - ref.logprob) < 1e-3
    tp = text_out.prompt_logprobs  # a text prompt: its tokens scored, no alternatives with prompt_logprobs=0
    assert len(tp) == len(text_out.prompt_token_ids) and tp[0] is None
    assert [e.token_id for e in tp[1:]] == text_out.prompt_token_ids[1:] and all(e.top == [] for e in tp[1:])
    (plain,) = one.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=1))
    assert plain.prompt_logprobs is None  # not asked for
