"""Engine scheduling, cache accounting, stopping and bad input, on the contract-shaped FakeModel (fast)."""

import pytest
import torch

from parity.engine import LLM, CachePool, CachePoolExhausted, EngineArgs, LLMEngine, SamplingParams
from parity.engine.cache_pool import SequenceCache, normalize_layout
from parity.engine.testing import CharTokenizer, FakeModel, greedy_reference
from parity.errors import RequestError

PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [12, 13], [20] * 17, [40, 41, 42, 43, 44]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return FakeModel()


@pytest.fixture(scope="module")
def refs(model):
    return [greedy_reference(model, p, 14) for p in PROMPTS]


def make(model, **kw):
    kw.setdefault("cache_memory", 1 << 20)
    return LLM(model_obj=model, tokenizer=kw.pop("tokenizer", None), device="cpu", **kw)


def test_greedy_alone_batched_chunked_preempted_equal_reference(model, refs):
    alone = [make(model).generate(prompt_token_ids=[p], sampling_params=GREEDY)[0] for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in alone] == refs
    batched = make(model).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in batched] == refs
    chunked = make(model, max_num_batched_tokens=3).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in chunked] == refs
    # a pool of 12 slots (window 1 slot + growing blocks per sequence) forces preemption
    small = make(model, cache_memory=12 * 256)
    out = small.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in out] == refs
    st = small.engine.stats()
    assert st["num_preemptions"] > 0 and st["cache_used_bytes"] == 0 and st["cache_live_tensors"] == 0
    assert sum(o.metrics.num_preemptions for o in out) == st["num_preemptions"]
    assert st["prompt_tokens_total"] == sum(map(len, PROMPTS)) and st["generation_tokens_total"] == 14 * len(PROMPTS)


def test_max_num_seqs_and_cache_accounting(model):
    llm = make(model, max_num_seqs=2)
    eng = llm.engine
    for p in PROMPTS:
        eng.add_request(p, GREEDY.clone())
    peak = 0
    while eng.has_unfinished():
        eng.step()
        assert eng.scheduler.num_running <= 2
        held = sum(s.cache.nbytes for s in eng.scheduler.running)
        held_model = sum(s.state.nbytes() for s in eng.scheduler.running)
        assert eng.pool.used_bytes == held == held_model
        peak = max(peak, held)
    assert peak > 0 and eng.pool.used_bytes == 0 and eng.pool.free_pages == eng.pool.num_pages


def test_abort_frees_cache(model):
    eng = make(model).engine
    r1 = eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    r2 = eng.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.pool.used_bytes > 0
    assert eng.abort(r1.request_id)
    deltas = eng.step()
    ab = [d for d in deltas if d.request_id == r1.request_id]
    assert ab and ab[-1].finish_reason == "abort" and ab[-1].request_finished
    while eng.has_unfinished():
        eng.step()
    assert r2.output().outputs[0].finish_reason == "length"
    assert eng.pool.used_bytes == 0 and eng.stats()["cache_live_tensors"] == 0
    assert not eng.abort(r1.request_id)


def test_pool_slab_exact():
    pool = CachePool(4 * 1024, 1024, "cpu")
    a = pool.alloc(0, "x", (256,), torch.float32)  # 1024 B: one page
    b = [pool.alloc(0, "y", (32,), torch.float32) for _ in range(4)]  # 128 B -> 256 B slots, 4 per page
    assert pool.used_bytes == 1024 + 4 * 128 and pool.free_pages == 2
    assert pool.fits({256: 8}) and not pool.fits({256: 9}) and not pool.fits({1024: 3})
    c = pool.alloc(1, "x", (256,), torch.float32)
    d = pool.alloc(1, "x", (256,), torch.float32)
    with pytest.raises(CachePoolExhausted):
        pool.alloc(2, "x", (256,), torch.float32)
    a.fill_(1.0)
    for t in b:
        t.fill_(2.0)
    assert float(a.sum()) == 256.0  # slots never overlap
    for t in [a, *b, c, d]:
        pool.release(t)
    assert pool.used_bytes == 0 and pool.free_pages == 4


def test_sequence_cache_demand_matches_allocation(model):
    layout = normalize_layout(model.cache_layout(), model.cache_block_entries)
    for n in (1, 2, 3, 5, 6, 7, 13):
        sc = SequenceCache(None)
        st = model.new_state(sc)
        model.forward_incremental([list(range(2, 2 + n))], [st])
        need = SequenceCache(None).demand(layout, n)
        assert sum(need.values()) >= len(sc._held)  # an upper bound of what the model allocated
        st.free()
        assert sc.nbytes == 0


def test_stop_strings_stop_ids_min_tokens_eos(model):
    tok = CharTokenizer()
    llm = make(model, tokenizer=tok)
    base = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=GREEDY)[0].outputs[0]
    text = base.text
    assert len(text) == 14
    stop = text[4:7]  # spans three tokens
    first = text.find(stop)
    out = llm.generate(
        prompt_token_ids=[PROMPTS[0]],
        sampling_params=SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[stop, "zzzzzz"]),
    )[0].outputs[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    keep = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=keep)[0].outputs[0]
    assert out.text == text[: first + len(stop)] and out.stop_reason == stop
    # stop token id: included in token_ids, generation ends there
    sid = base.token_ids[5]
    k = base.token_ids.index(sid)
    out = llm.generate(
        prompt_token_ids=[PROMPTS[0]],
        sampling_params=SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop_token_ids=[sid]),
    )[0].outputs[0]
    assert out.token_ids == base.token_ids[: k + 1] and out.stop_reason == sid and out.finish_reason == "stop"
    # min_tokens masks stop ids
    out = llm.generate(
        prompt_token_ids=[PROMPTS[0]],
        sampling_params=SamplingParams(temperature=0, max_tokens=14, min_tokens=14, stop_token_ids=[sid]),
    )[0].outputs[0]
    assert len(out.token_ids) == 14 and sid not in out.token_ids and out.finish_reason == "length"
    # eos (id 1) stops unless ignore_eos
    p = PROMPTS[1]
    ref = greedy_reference(model, p, 14)
    assert 1 in ref
    out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(temperature=0, max_tokens=14))[0]
    c = out.outputs[0]
    assert c.token_ids == ref[: ref.index(1) + 1] and c.finish_reason == "stop" and c.stop_reason is None


def test_streaming_text_holds_back_stop_prefix(model):
    tok = CharTokenizer()
    eng = make(model, tokenizer=tok).engine
    base = (
        LLM(model_obj=model, tokenizer=tok, device="cpu", cache_memory=1 << 20)
        .generate(prompt_token_ids=[PROMPTS[2]], sampling_params=GREEDY)[0]
        .outputs[0]
        .text
    )
    stop = base[6:9]
    req = eng.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[stop]))
    streamed = ""
    while eng.has_unfinished():
        for d in eng.step():
            streamed += d.new_text
            assert stop not in streamed
    assert streamed == req.output().outputs[0].text == base[: base.find(stop)]


def test_seeded_sampling_reproducible(model):
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=12, seed=1234, ignore_eos=True)
    a = make(model).generate(prompt_token_ids=[PROMPTS[0]], sampling_params=sp)[0].outputs[0].token_ids
    b = make(model, max_num_batched_tokens=4).generate(
        prompt_token_ids=PROMPTS,
        sampling_params=[
            SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
            sp,
            SamplingParams(temperature=0.5, max_tokens=12, seed=7, ignore_eos=True),
            sp,
        ],
    )
    assert b[1].outputs[0].token_ids != a or True  # different prompt
    c = make(model, max_num_batched_tokens=4).generate(
        prompt_token_ids=[PROMPTS[1], PROMPTS[0]], sampling_params=[sp, sp]
    )
    assert c[1].outputs[0].token_ids == a
    d = make(model, cache_memory=12 * 256).generate(prompt_token_ids=PROMPTS[:1] * 3, sampling_params=sp)
    assert all(o.outputs[0].token_ids == a for o in d)
    other = make(model).generate(
        prompt_token_ids=[PROMPTS[0]],
        sampling_params=SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=12, seed=99, ignore_eos=True),
    )
    assert other[0].outputs[0].token_ids != a
    n2 = make(model).generate(
        prompt_token_ids=[PROMPTS[0]],
        sampling_params=SamplingParams(
            n=2, temperature=0.9, top_p=0.9, top_k=20, max_tokens=12, seed=1234, ignore_eos=True
        ),
    )[0]
    assert [c.index for c in n2.outputs] == [0, 1] and n2.outputs[0].token_ids == a


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(stop_token_ids=[97]), "stop_token_ids"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(logprobs=-1), "logprobs"),
        (dict(n=0), "n"),
        (dict(min_tokens=20, max_tokens=5), "min_tokens"),
        (dict(max_tokens=200), "max_tokens"),
    ],
)
def test_bad_sampling_params(model, kwargs, param):
    eng = make(model, max_model_len=64).engine
    with pytest.raises(RequestError, match=param):
        eng.add_request([2, 3], SamplingParams(**kwargs))
    assert eng.scheduler.num_waiting == 0


def test_bad_prompts_do_not_disturb_others(model, refs):
    eng = make(model, max_model_len=40).engine
    good = eng.add_request(PROMPTS[0], GREEDY.clone())
    eng.step()
    with pytest.raises(RequestError, match="prompt"):
        eng.add_request([], GREEDY.clone())
    with pytest.raises(RequestError, match="max_model_len"):
        eng.add_request(list(range(2, 42)), GREEDY.clone())
    with pytest.raises(RequestError, match="prompt_token_ids"):
        eng.add_request([2, 97], GREEDY.clone())
    with pytest.raises(RequestError, match="tokenizer"):
        eng.add_request(None, GREEDY.clone(), prompt="hello")
    with pytest.raises(RequestError, match="request_id"):
        eng.add_request([2], GREEDY.clone(), request_id=good.request_id)
    while eng.has_unfinished():
        eng.step()
    assert good.output().outputs[0].token_ids == refs[0]
    llm = make(model, max_model_len=40)
    with pytest.raises(RequestError, match="prompt 1"):
        llm.generate(prompt_token_ids=[[2, 3], []], sampling_params=GREEDY)
    assert llm.engine.pool.used_bytes == 0 and not llm.engine.has_unfinished()


def test_bad_engine_args(model):
    with pytest.raises(RequestError, match="max_num_seqs"):
        make(model, max_num_seqs=0)
    with pytest.raises(RequestError, match="cache_memory"):
        make(model, cache_memory=10)
    with pytest.raises(RequestError, match="unknown engine argument 'max_seqs'"):
        LLM(model_obj=model, max_seqs=3)
    with pytest.raises(RequestError, match="max_model_len"):
        make(model, max_model_len=10**9)
    # a request that can never fit the pool is refused up front
    eng = make(model, cache_memory=3 * 256).engine
    with pytest.raises(RequestError, match="max_tokens"):
        eng.add_request([2, 3, 4], SamplingParams(max_tokens=100))


def test_queue_full(model):
    from parity.engine import EngineQueueFull

    eng = LLMEngine(
        EngineArgs(device="cpu", cache_memory=1 << 20, max_waiting=2, max_num_seqs=1), model=model, tokenizer=None
    )
    eng.add_request([2], GREEDY.clone())  # takes the free running slot at the next step: not waiting
    eng.add_request([3], GREEDY.clone())
    eng.add_request([4], GREEDY.clone())
    with pytest.raises(EngineQueueFull, match="2 sequences waiting, 1 more would exceed max_waiting = 2 sequences"):
        eng.add_request([5], GREEDY.clone())
    assert isinstance(EngineQueueFull("x"), RequestError)


def test_queue_limit_counts_only_truly_waiting(model):
    """max_num_seqs 1, max_waiting 1: a second request sent before the first is scheduled is the only
    one really waiting, so it is accepted; a third is refused."""
    from parity.engine import EngineQueueFull

    eng = LLMEngine(
        EngineArgs(device="cpu", cache_memory=1 << 20, max_waiting=1, max_num_seqs=1), model=model, tokenizer=None
    )
    eng.add_request([2], GREEDY.clone())
    eng.add_request([3], GREEDY.clone())
    with pytest.raises(EngineQueueFull):
        eng.add_request([4], GREEDY.clone())


def test_logprobs_end_to_end(model, refs):
    out = (
        make(model)
        .generate(
            prompt_token_ids=[PROMPTS[0]],
            sampling_params=SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=2),
        )[0]
        .outputs[0]
    )
    assert out.token_ids == refs[0] and len(out.logprobs) == 14
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(lp.rank == 1 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in out.logprobs)
    assert abs(out.cumulative_logprob - sum(lp.logprob for lp in out.logprobs)) < 1e-9
