"""Intra-op threads of a served engine: the CPU policy (a core kept for the front end) and AsyncEngine
applying it on its own thread only while it runs."""

import asyncio

import pytest
import torch

from parity.engine import AsyncEngine, EngineArgs, SamplingParams
from parity.engine.testing import FakeModel
from parity.server import engine_threads
from parity.server.engine_threads import intra_op_threads, serving_threads


@pytest.mark.parametrize(
    ("device", "torch_threads", "env", "expected"),
    [
        ("cpu", 2, {}, 1),
        ("cpu", 8, {}, 7),
        ("cpu", 1, {}, None),
        ("cpu", 4, {"OMP_NUM_THREADS": "4"}, None),
        ("cpu", 4, {"MKL_NUM_THREADS": "2"}, None),
        ("meta", 4, {}, None),
    ],
)
def test_serving_threads_keep_one_core_for_the_front_end_on_the_cpu(monkeypatch, device, torch_threads, env, expected):
    monkeypatch.setattr(engine_threads.torch, "get_num_threads", lambda: torch_threads)
    assert serving_threads(device, env) == expected


class ThreadRecordingModel(FakeModel):
    """FakeModel noting torch's intra-op thread count at each step."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward_incremental(self, tokens, states, **kw):
        self.seen.append(torch.get_num_threads())
        return super().forward_incremental(tokens, states, **kw)


def test_async_engine_runs_with_its_thread_count_and_restores_it():
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    model = ThreadRecordingModel()

    async def main():
        eng = AsyncEngine(
            EngineArgs(device="cpu", cache_memory=1 << 20), model=model, tokenizer=None, intra_op_threads=want
        )
        await eng.start()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        ids = [t for d in [d async for d in eng.generate([3, 4, 5], params, "r")] for t in d.new_token_ids]
        await eng.shutdown(1.0)
        return ids

    try:
        ids = asyncio.run(main())
        assert len(ids) == 4
        assert model.seen and set(model.seen) == {want}
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_one_step_of_many_streams_reaches_every_stream_in_order():
    """All of a step's deltas are handed over in one event-loop call; each stream still gets its own,
    in order, and the n choices of one request stay apart."""
    prompts = [[3 + i, 4, 5] for i in range(6)]

    async def main():
        eng = AsyncEngine(EngineArgs(device="cpu", cache_memory=1 << 20), model=FakeModel(), tokenizer=None)
        await eng.start()

        async def one(i):
            out: dict[int, list[int]] = {}
            params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2)
            async for d in eng.generate(prompts[i], params, f"r{i}"):
                out.setdefault(d.index, []).extend(d.new_token_ids)
            return out

        res = await asyncio.gather(*[one(i) for i in range(len(prompts))])
        await eng.shutdown(1.0)
        return res

    for out in asyncio.run(main()):
        assert sorted(out) == [0, 1] and all(len(v) == 5 for v in out.values())
        assert out[0] == out[1]  # greedy: both choices alike


def test_serving_threads_for_a_device_flag():
    from parity.errors import DeviceError
    from parity.server.cli_args import resolve_device_flag

    with pytest.raises(DeviceError, match="no-such-device"):  # `parity serve` stops on it before loading
        resolve_device_flag("no-such-device")
    assert serving_threads(resolve_device_flag("cpu")) == serving_threads("cpu")


@pytest.mark.parametrize("n", [None, 1])
def test_intra_op_threads_sets_and_restores(n):
    before = torch.get_num_threads()
    try:
        with intra_op_threads(n):
            assert torch.get_num_threads() == (before if n is None else n)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
