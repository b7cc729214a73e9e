"""The batched sampler against hand-computed expectations."""

import math

import pytest
import torch

from parity.devices import manual_seed
from parity.engine.sampler import SampleRequest, sample
from parity.engine.sampling_params import SamplingParams


def req(prompt=(), out=(), gen=None, eos=(), **kw):
    return SampleRequest(SamplingParams(**kw), list(prompt), list(out), gen, tuple(eos))


LOGITS = torch.tensor([[0.0, 2.0, 1.0, -1.0, 3.0, 0.5]])


def test_greedy_and_degenerate_filters_pick_argmax():
    for kw in (
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=1),
        dict(temperature=1.0, top_p=1e-6),
        dict(temperature=1.0, min_p=1.0),
    ):
        toks, _ = sample(LOGITS, [req(**kw)], manual_seed("cpu", 0))
        assert toks == [4], kw


def test_top_k_top_p_restrict_support():
    g = manual_seed("cpu", 0)
    seen_k, seen_p = set(), set()
    for _ in range(200):
        seen_k.update(sample(LOGITS, [req(temperature=1.0, top_k=2)], g)[0])
        # probs sorted: 4 (e^3), 1 (e^2), 2 (e^1)...; top_p=0.8 keeps {4, 1} (0.636 + 0.234 = 0.87 >= 0.8)
        seen_p.update(sample(LOGITS, [req(temperature=1.0, top_p=0.8)], g)[0])
    assert seen_k == {4, 1} and seen_p == {4, 1}


def test_min_p():
    g = manual_seed("cpu", 0)
    seen = set()
    for _ in range(200):
        # p(1)/p(4) = e^-1 = 0.37 >= 0.3 kept; p(2)/p(4) = e^-2 = 0.135 < 0.3 dropped
        seen.update(sample(LOGITS, [req(temperature=1.0, min_p=0.3)], g)[0])
    assert seen == {4, 1}


def test_penalties_hand_computed():
    # repetition 2 on seen token 4 (3.0 -> 1.5) makes token 1 (2.0) the argmax
    assert sample(LOGITS, [req(prompt=[4], temperature=0.0, repetition_penalty=2.0)])[0] == [1]
    # negative logits are multiplied: token 3 (-1 -> -2) stays low; seen positive 1 -> 1.0 ; argmax 4 unchanged
    assert sample(LOGITS, [req(prompt=[1, 3], temperature=0.0, repetition_penalty=2.0)])[0] == [4]
    # frequency 0.6 x 2 occurrences of 4 -> 1.8 < 2.0
    assert sample(LOGITS, [req(out=[4, 4], temperature=0.0, frequency_penalty=0.6)])[0] == [1]
    assert sample(LOGITS, [req(out=[4], temperature=0.0, frequency_penalty=0.6)])[0] == [4]
    # presence counts once: 3.0 - 1.5 = 1.5 < 2.0
    assert sample(LOGITS, [req(out=[4, 4, 4], temperature=0.0, presence_penalty=1.5)])[0] == [1]
    # presence / frequency only look at generated tokens, not the prompt
    assert sample(LOGITS, [req(prompt=[4, 4], temperature=0.0, presence_penalty=2.0)])[0] == [4]


def test_min_tokens_masks_eos_and_stop_ids():
    lg = torch.tensor([[0.0, 9.0, 8.0, 1.0]])
    assert sample(lg, [req(out=[], eos=[1], temperature=0.0, min_tokens=1)])[0] == [2]
    assert sample(lg, [req(out=[3], eos=[1], temperature=0.0, min_tokens=1)])[0] == [1]
    assert sample(lg, [req(out=[], eos=[1], temperature=0.0, min_tokens=2, stop_token_ids=[2])])[0] == [3]


def test_logprobs_raw_and_ranked():
    toks, lps = sample(LOGITS.repeat(2, 1), [req(temperature=0.0, logprobs=3), req(temperature=0.0)])
    ref = torch.log_softmax(LOGITS[0], -1)
    lp = lps[0]
    assert lps[1] is None and lp.token_id == 4 and lp.rank == 1
    assert math.isclose(lp.logprob, float(ref[4]), abs_tol=1e-6)
    assert [t for t, _ in lp.top] == [4, 1, 2]
    assert all(math.isclose(v, float(ref[t]), abs_tol=1e-6) for t, v in lp.top)
    # raw: temperature / penalties do not change reported logprobs
    _, lps2 = sample(LOGITS, [req(prompt=[4], temperature=0.0, repetition_penalty=3.0, logprobs=0)])
    assert lps2[0].token_id == 1 and lps2[0].rank == 2 and lps2[0].top == []
    assert math.isclose(lps2[0].logprob, float(ref[1]), abs_tol=1e-6)


def test_seeded_rows_independent_of_batch():
    torch.manual_seed(0)
    lg = torch.randn(4, 50)
    sp = dict(temperature=1.0, seed=5)
    alone = [sample(lg[2:3], [req(gen=manual_seed("cpu", 5), **sp)])[0][0] for _ in range(3)]
    assert len(set(alone)) == 1
    g = manual_seed("cpu", 5)
    mixed = sample(lg, [req(temperature=1.0), req(temperature=0.0), req(gen=g, **sp), req(temperature=0.7)])[0]
    assert mixed[2] == alone[0] and mixed[1] == int(lg[1].argmax())


def test_sampling_distribution_matches_softmax():
    g = manual_seed("cpu", 1)
    lg = torch.tensor([[1.0, 0.0, -1.0]])
    n = 3000
    reqs = [req(temperature=1.0)] * n
    toks, _ = sample(lg.expand(n, 3).contiguous(), reqs, g)
    freq = torch.bincount(torch.tensor(toks), minlength=3).float() / n
    assert torch.allclose(freq, torch.softmax(lg[0], -1), atol=0.03)


def test_stop_as_string_normalised():
    assert SamplingParams(stop="x").stop == ["x"]
    with pytest.raises(Exception, match="stop"):
        SamplingParams(stop=[""]).validate()


def test_seed_range_is_signed_64_bit_and_named():
    from parity.engine.sampling_params import SEED_MAX, SEED_MIN
    from parity.errors import RequestError

    SamplingParams(seed=SEED_MIN).validate()
    SamplingParams(seed=SEED_MAX).validate()
    for kw in ({"seed": 2**70}, {"seed": SEED_MIN - 1}, {"seed": SEED_MAX, "n": 2}):
        with pytest.raises(RequestError, match="'seed'.*signed 64-bit"):
            SamplingParams(**kw)  # the constructor checks the fields that need no model
        sp = SamplingParams()
        for k, v in kw.items():
            setattr(sp, k, v)
        with pytest.raises(RequestError, match="'seed'.*signed 64-bit"):
            sp.validate()  # and submission checks them again


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_constructor_refuses_bad_fields_as_value_errors(kw, name):
    """As vLLM's SamplingParams: a field wrong on its own fails where it is set, as a ValueError naming it."""
    with pytest.raises(ValueError, match=f"'{name}'"):
        SamplingParams(**kw)
