"""One request cannot hurt another: out-of-range sampling fields are refused at validation, and a failure
attributable to one request inside a step (sampling, detokenizing, stop checks) fails that request alone."""

import asyncio

import pytest

from parity.engine import AsyncEngine, EngineArgs, LLMEngine, SamplingParams
from parity.engine.testing import FakeModel, greedy_reference
from parity.errors import RequestError

GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(repetition_penalty=3.5e38), "repetition_penalty"),
        (dict(repetition_penalty=1e-300), "repetition_penalty"),
        (dict(top_k=2**63), "top_k"),
        (dict(temperature=1e39), "temperature"),
        (dict(stop_token_ids=[2**70]), "stop_token_ids"),
        (dict(n=10**9), "n"),
    ],
)
def test_out_of_range_sampling_fields_are_refused(kw, name):
    with pytest.raises(RequestError, match=name):
        SamplingParams(**kw).validate()


class UncheckedParams(SamplingParams):
    """Parameters that skip validation, standing for any failure validation did not foresee: float32 cannot
    hold the repetition penalty below, so the sampler raises for this request."""

    def validate(self, *args, **kwargs) -> None:
        pass


def poisoned(**kw) -> UncheckedParams:
    return UncheckedParams(repetition_penalty=3.5e38, ignore_eos=True, max_tokens=6, **kw)


def _engine() -> LLMEngine:
    return LLMEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=FakeModel(), tokenizer=None)


def test_sampler_failure_fails_that_request_alone():
    eng = _engine()
    good = SamplingParams(**GREEDY)
    eng.add_request([3, 4, 5], good, "good")
    eng.add_request([3, 4, 5], poisoned(temperature=0.7, n=2), "bad")
    finals = {}
    for _ in range(50):
        for d in eng.step():
            if d.finished:
                finals.setdefault(d.request_id, []).append(d)
        if not eng.has_unfinished() and not eng._pending:
            break
    assert {d.index for d in finals["bad"]} == {0, 1}
    assert all(d.error and d.finish_reason == "abort" for d in finals["bad"])
    assert finals["bad"][-1].request_finished
    (g,) = finals["good"]
    assert g.error is None and g.finish_reason == "length"
    assert eng.stats()["num_running"] == 0


def test_detokenizer_failure_fails_that_request_alone():
    class Tok:
        eos_token_id = 1
        vocab_size = 97

        def encode(self, text):
            return [ord(c) % 90 + 3 for c in text]

        def decode(self, ids, skip_special_tokens=True):
            if any(i == -1 for i in ids):
                raise RuntimeError("cannot decode")
            return "".join(chr(97 + i % 26) for i in ids)

    eng = LLMEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=FakeModel(), tokenizer=Tok())
    eng.add_request([3, 4, 5], SamplingParams(**GREEDY), "good")
    eng.add_request([3, 4, 5], SamplingParams(**GREEDY), "bad")

    def broken(ids):
        raise RuntimeError("detokenizer exploded")

    eng.requests["bad"].seqs[0].detok.add = broken
    errors, texts = {}, {}
    for _ in range(50):
        for d in eng.step():
            texts[d.request_id] = texts.get(d.request_id, "") + d.new_text
            if d.finished:
                errors[d.request_id] = d.error
        if not eng.has_unfinished():
            break
    assert "detokenizer exploded" in errors["bad"]
    assert errors["good"] is None and len(texts["good"]) > 0


def test_async_engine_keeps_serving_next_to_a_failing_request():
    ref = greedy_reference(FakeModel(), [3, 4, 5], 6)

    async def main():
        eng = AsyncEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=FakeModel(), tokenizer=None)
        await eng.start()

        async def run(rid, params):
            ids, last = [], None
            async for d in eng.generate([3, 4, 5], params, rid):
                ids += d.new_token_ids
                last = d
            return ids, last

        good = asyncio.ensure_future(run("good", SamplingParams(**GREEDY)))
        bad = await run("bad", poisoned(temperature=0.5))
        g = await good
        again = await run("after", SamplingParams(**GREEDY))
        await eng.shutdown(1.0)
        return g, bad, again, eng._error

    g, bad, again, err = asyncio.run(main())
    assert err is None
    assert g[0] == ref and g[1].error is None
    assert bad[1].error and bad[1].finish_reason == "abort"
    assert again[0] == ref
