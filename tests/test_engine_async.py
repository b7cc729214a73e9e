"""AsyncEngine: streaming, concurrency, abort on close, queue limit, shutdown (FakeModel, fast)."""

import asyncio
import time

import pytest

from parity.engine import AsyncEngine, EngineArgs, EngineQueueFull, SamplingParams
from parity.engine.testing import FakeModel, greedy_reference
from parity.errors import RequestError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [12, 13], [20] * 11]


def engine(**kw):
    kw.setdefault("cache_memory", 1 << 20)
    return AsyncEngine(EngineArgs(device="cpu", **kw), model=FakeModel(), tokenizer=None)


async def collect(eng, prompt, params, rid, started: asyncio.Event | None = None):
    """(token ids, deltas) of one request; sets `started` on its first delta (the request is running)."""
    ids, deltas = [], []
    async for d in eng.generate(prompt, params, rid):
        ids += d.new_token_ids
        deltas.append(d)
        if started is not None:
            started.set()
    return ids, deltas


async def wait_until(condition, timeout_s: float = 30.0) -> None:
    """Return once `condition()` is true (checked every ms); fail after `timeout_s` s (shared CI cores)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        await asyncio.sleep(0.001)


def test_concurrent_streams_match_reference():
    m = FakeModel()
    refs = [greedy_reference(m, p, 10) for p in PROMPTS]

    async def main():
        eng = engine()
        await eng.start()
        res = await asyncio.gather(*[collect(eng, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)])
        st = eng.stats()
        await eng.shutdown(1.0)
        return res, st

    res, st = asyncio.run(main())
    for (ids, deltas), ref, prompt in zip(res, refs, PROMPTS, strict=True):
        assert ids == ref
        assert deltas[-1].finished and deltas[-1].request_finished and deltas[-1].finish_reason == "length"
        m = deltas[-1].metrics
        assert m.first_token_time >= m.arrival_time and m.finished_time >= m.first_token_time
        assert deltas[-1].num_output_tokens == 10 and deltas[-1].num_prompt_tokens == len(prompt)
    assert st["cache_used_bytes"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0


def test_closing_the_stream_aborts_and_frees():
    async def main():
        eng = engine()
        await eng.start()
        long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
        agen = eng.generate(PROMPTS[0], long, "long")
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        # cancellation of a consumer task mid-stream aborts too
        started = asyncio.Event()
        task = asyncio.create_task(collect(eng, PROMPTS[1], long, "cancelled", started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: eng.stats()["num_running"] == 0 and eng.stats()["cache_used_bytes"] == 0)
        st = eng.stats()
        await eng.shutdown(0.5)
        return st

    st = asyncio.run(main())
    assert st["num_running"] == 0 and st["num_waiting"] == 0 and st["cache_used_bytes"] == 0


def _set(**fields) -> SamplingParams:
    """Default SamplingParams with ``fields`` set afterwards (the constructor would refuse bad values)."""
    sp = SamplingParams()
    for k, v in fields.items():
        setattr(sp, k, v)
    return sp


def test_bad_request_raises_and_others_continue():
    ref = greedy_reference(FakeModel(), PROMPTS[2], 10)

    async def main():
        eng = engine(max_model_len=64)
        await eng.start()
        good = asyncio.create_task(collect(eng, PROMPTS[2], GREEDY, "good"))
        errors = []
        for prompt, params in [
            ([], GREEDY),
            ([2] * 70, GREEDY),
            ([2], _set(top_p=0.0)),  # fields changed after construction: the engine checks them again
            ([2], _set(temperature=-1.0)),
            ([2], _set(max_tokens=0)),
            ([2], SamplingParams(stop_token_ids=[1000])),
        ]:
            with pytest.raises(RequestError) as ei:
                async for _ in eng.generate(prompt, params, None):
                    pass
            errors.append(str(ei.value))
        ids, _ = await good
        await eng.shutdown(1.0)
        return errors, ids

    errors, ids = asyncio.run(main())
    assert ids == ref
    names = ["prompt", "max_model_len", "top_p", "temperature", "max_tokens", "stop_token_ids"]
    for e, name in zip(errors, names, strict=True):
        assert name in e


def test_queue_full_and_shutdown():
    async def main():
        eng = engine(max_waiting=1, max_num_seqs=1)
        await eng.start()
        long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
        a_started = asyncio.Event()
        t1 = asyncio.create_task(collect(eng, PROMPTS[0], long, "a", a_started))
        await a_started.wait()  # a is running
        t2 = asyncio.create_task(collect(eng, PROMPTS[1], long, "b"))
        await wait_until(lambda: eng.stats()["num_waiting"] == 1)  # b is waiting (max_num_seqs 1)
        with pytest.raises(EngineQueueFull):
            async for _ in eng.generate(PROMPTS[2], long, "c"):
                pass
        await eng.shutdown(0.0)  # no drain: both aborted
        r1, r2 = await t1, await t2
        with pytest.raises(RequestError, match="not running"):
            async for _ in eng.generate(PROMPTS[2], long, "d"):
                pass
        return r1, r2, eng.stats()

    (i1, d1), (i2, d2), st = asyncio.run(main())
    assert d1[-1].finish_reason == "abort" and d2[-1].finish_reason == "abort"
    assert st["cache_used_bytes"] == 0


def test_n_completions_stream():
    async def main():
        eng = engine()
        await eng.start()
        sp = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
        out = {}
        last = None
        async for d in eng.generate(PROMPTS[0], sp, "n3"):
            out.setdefault(d.index, []).extend(d.new_token_ids)
            last = d
        await eng.shutdown(0.1)
        return out, last

    out, last = asyncio.run(main())
    assert sorted(out) == [0, 1, 2] and all(len(v) == 6 for v in out.values())
    assert last.request_finished


def test_abort_ends_the_stream_while_the_engine_is_inside_a_long_step():
    """A drain cut-off or a disconnect must not wait for the engine's current step (a long prefill, a step
    slowed by compiling): the stream ends at once with finish_reason "abort"."""
    import threading

    release = threading.Event()

    class SlowModel(FakeModel):
        def forward_incremental(self, tokens, states, all_logits: bool = False):
            release.wait(10)  # the step holds the engine thread until the test releases it
            return super().forward_incremental(tokens, states, all_logits)

    async def main():
        eng = AsyncEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=SlowModel(), tokenizer=None)
        await eng.start()
        agen = eng.generate([3, 4, 5], GREEDY, "slow")
        task = asyncio.ensure_future(agen.__anext__())
        await wait_until(lambda: eng.stats()["num_running"] == 1)
        t0 = time.monotonic()
        eng.abort("slow")
        d = await asyncio.wait_for(task, 5)
        waited = time.monotonic() - t0
        release.set()
        await eng.shutdown(5.0)
        return d, waited

    d, waited = asyncio.run(main())
    assert d.finished and d.request_finished and d.finish_reason == "abort"
    assert waited < 5
