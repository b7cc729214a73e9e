"""Prefix caching on the real V4 model: a hit + suffix prefill equals a cold prefill (greedy tokens equal,
logprobs within 1e-5, fp32), `cached_tokens` accounting, eviction, and the pool drained after requests.

Config: the `tiny` preset with CSA ratio 4 and HCA ratio 16, so prefix blocks are 16 tokens (the lcm of the
ratios) and prompts of 16-80 tokens cross several block ends; sliding_window 40 makes hits of 16 and 32
tokens shorter than the window and hits of 48+ longer (the fp8 model uses window 8 < one block). Growing
cache blocks of 3 entries do not line up with prefix blocks.

Cold references run with caching off. With the fp32 bf16-mode cache a different chunking only moves
logits by GEMM rounding (~1e-7); with the FP8 KV cache / FP4 indexer such noise can flip a near-tie
rounding, so those tests use chunks of one block (max_num_batched_tokens = 16) in both runs: the hit run
then computes exactly the chunks the cold run computes after the hit point.
"""

import pytest
import torch

from parity.config import CSA, HCA, load_preset
from parity.engine import LLM, EngineArgs, LLMEngine, SamplingParams
from parity.engine.prefix_cache import PrefixCache, chain_salt
from parity.engine.testing import drain_check
from parity.errors import RequestError

pytest.importorskip("parity.model.deepseek_v4")
from parity.model import build_model  # noqa: E402

L = 16
SP = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(window: int):
    cfg = load_preset("tiny").replace(sliding_window=window, compress_rates={CSA: 4, HCA: 16}, index_topk=2)
    m = build_model(cfg, device="cpu", dtype=torch.float32, seed=0)
    m.cache_block_entries = 3
    return m


@pytest.fixture(scope="module")
def model():
    return tiny(40)


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 129280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make(model, **kw):
    kw.setdefault("cache_memory", 64 << 20)
    return LLM(model_obj=model, tokenizer=None, **kw)


def results(outs):
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs], o.num_cached_tokens) for o in outs]


def assert_same(got, ref, tol=1e-5):
    for (t1, l1, _), (t2, l2, _) in zip(got, ref, strict=True):
        assert t1 == t2
        assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) <= tol


def test_same_prompt_twice_and_never_the_whole_prompt(model):
    on, off = make(model), make(model, enable_prefix_caching=False)
    for n in (50, 48, 17):  # 48 = three whole blocks: only 32 may come from the cache
        p = rand_ids(n, n)
        ref = results(off.generate(prompt_token_ids=[p], sampling_params=SP))
        first = results(on.generate(prompt_token_ids=[p], sampling_params=SP))
        second = results(on.generate(prompt_token_ids=[p], sampling_params=SP))
        assert first[0][2] == 0 and ref[0][2] == 0
        assert second[0][2] == (n - 1) // L * L and second[0][2] < n
        assert_same(first, ref)
        assert_same(second, ref)
        assert on.engine.stats()["cache_used_bytes"] == 0 and on.engine.prefix_cache.num_pinned == 0
    st = on.engine.stats()
    assert st["prefix_cache_hits_total"] == 48 + 32 + 16 and st["prefix_cache_queries_total"] == 2 * (50 + 48 + 17)
    assert "prefix_cache_hits_total" not in off.engine.stats()
    drain_check(on.engine)


def test_shared_prefix_of_every_length_then_other_suffixes(model):
    """Shared prefixes of 16..47 tokens (every residue mod 4 and mod the block) and a few of 48+ (hits
    longer than the window), each followed by different suffixes, batched."""
    lengths = list(range(L, 3 * L)) + [48, 53, 63, 64, 70]
    prefixes = [rand_ids(k, 100 + k) for k in lengths]
    donors = [p + rand_ids(5, 1) for p in prefixes]
    askers = [p + rand_ids(3, 2) for p in prefixes]
    on, off = make(model), make(model, enable_prefix_caching=False)
    on.generate(prompt_token_ids=donors, sampling_params=SP)
    got = results(on.generate(prompt_token_ids=askers, sampling_params=SP))
    ref = results(off.generate(prompt_token_ids=askers, sampling_params=SP))
    assert [c for _, _, c in got] == [k // L * L for k in lengths]
    assert_same(got, ref)
    drain_check(on.engine)


def test_concurrent_requests_sharing_a_prefix(model):
    prefix = rand_ids(37, 7)
    prompts = [prefix + rand_ids(4 + i, 20 + i) for i in range(4)]
    ref = results(make(model, enable_prefix_caching=False).generate(prompt_token_ids=prompts, sampling_params=SP))
    eng = make(model).engine
    reqs = [eng.add_request(prompts[0], SP.clone())]
    eng.step()  # the first prompt's blocks are cached now
    reqs += [eng.add_request(p, SP.clone()) for p in prompts[1:3]]
    eng.step()
    reqs.append(eng.add_request(prompts[3], SP.clone()))  # joins while the others decode
    while eng.has_unfinished():
        eng.step()
    got = results([r.output() for r in reqs])
    assert [c for _, _, c in got] == [0, 32, 32, 32]
    assert_same(got, ref)
    drain_check(eng)


def test_after_eviction(model):
    prompts = [rand_ids(60, 40 + i) for i in range(4)]
    ref = results(make(model, enable_prefix_caching=False).generate(prompt_token_ids=prompts, sampling_params=SP))
    probe = make(model).engine
    pages = probe.pages_needed(64) + 12  # room for one sequence and a few cached blocks
    llm = make(model, cache_memory=pages * probe.pool.page_bytes)
    eng = llm.engine
    for p, r in zip(prompts, ref, strict=True):  # each request evicts blocks of the previous ones
        assert_same(results(llm.generate(prompt_token_ids=[p], sampling_params=SP)), [r])
        assert eng.stats()["cache_used_bytes"] == 0 and eng.prefix_cache.num_pinned == 0
    assert eng.prefix_cache.evictions > 0
    got = results(llm.generate(prompt_token_ids=prompts, sampling_params=SP))  # all at once
    assert_same(got, ref)
    llm.generate(prompt_token_ids=[prompts[3]], sampling_params=SP)
    again = results(llm.generate(prompt_token_ids=[prompts[3]], sampling_params=SP))
    assert again[0][2] == 48
    assert_same(again, ref[3:])
    drain_check(eng)


def test_preemption_evicts_cached_blocks_first_and_recomputes_exactly():
    from parity.engine import CachePoolExhausted

    model = tiny(40)
    model.cache_block_entries = 1  # caches grow during decode: preemption happens there
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    prompts = [rand_ids(60, 50 + i) for i in range(3)]
    ref = results(make(model, enable_prefix_caching=False).generate(prompt_token_ids=prompts, sampling_params=sp))
    for reset in (False, True):
        eng = make(model, cache_memory=4 << 20).engine
        reqs = [eng.add_request(p, sp.clone()) for p in prompts]
        eng.step()
        assert eng.prefix_cache.blocks
        if reset:  # nothing left to evict: running sequences are preempted
            eng.reset_prefix_cache()
        hog = []  # memory pressure: take every free page
        while True:
            try:
                hog.append(eng.pool.alloc(0, "hog", (eng.pool.page_bytes,), torch.uint8))
            except CachePoolExhausted:
                break
        while eng.has_unfinished():
            eng.step()
        st = eng.stats()
        if reset:
            assert st["num_preemptions"] > 0
        else:  # the cached blocks made room: nobody was preempted
            assert st["num_preemptions"] == 0 and st["prefix_cache_evictions_total"] > 0
        assert_same(results([r.output() for r in reqs]), ref)
        for t in hog:
            eng.pool.release(t)
        drain_check(eng)


def test_fp8_kv_cache_and_fp4_indexer_window_shorter_than_a_block():
    m = tiny(8)
    m.indexer_dtype = "fp4"
    kw = dict(kv_cache_dtype="fp8", max_num_batched_tokens=L)
    on, off = make(m, **kw), make(m, enable_prefix_caching=False, **kw)
    prefix = rand_ids(45, 3)
    prompts = [prefix + rand_ids(6, 4), prefix + rand_ids(2, 5), prefix[:33]]
    for p in prompts:
        ref = results(off.generate(prompt_token_ids=[p], sampling_params=SP))
        got = results(on.generate(prompt_token_ids=[p], sampling_params=SP))
        assert_same(got, ref)
    assert [c for _, _, c in results(on.generate(prompt_token_ids=prompts, sampling_params=SP))] == [48, 32, 32]
    drain_check(on.engine)


def test_chunked_prefill_across_block_ends(model):
    """Chunks of 7 tokens straddle block ends (the step keeps the interior ends' rows aside)."""
    prefix = rand_ids(50, 9)
    prompts = [prefix + rand_ids(3, 10), prefix + rand_ids(9, 11)]
    on, off = make(model, max_num_batched_tokens=7), make(model, max_num_batched_tokens=7, enable_prefix_caching=False)
    ref = results(off.generate(prompt_token_ids=prompts, sampling_params=SP))
    first = results(on.generate(prompt_token_ids=prompts[:1], sampling_params=SP))
    second = results(on.generate(prompt_token_ids=prompts[1:], sampling_params=SP))
    assert first[0][2] == 0 and second[0][2] == 48
    assert_same(first + second, ref)
    drain_check(on.engine)


def test_block_length_is_validated_and_configurable(model):
    with pytest.raises(RequestError, match="prefix_block_tokens"):
        make(model, prefix_block_tokens=24)
    with pytest.raises(RequestError, match=r"'prefix_block_tokens' is 1280000000: expected at most max_model_len"):
        make(model, prefix_block_tokens=1_280_000_000)  # blamed on this flag, not on cache_memory
    llm = make(model, prefix_block_tokens=32)
    p = rand_ids(70, 12)
    llm.generate(prompt_token_ids=[p], sampling_params=SP)
    assert llm.generate(prompt_token_ids=[p], sampling_params=SP)[0].num_cached_tokens == 64
    with pytest.raises(RequestError, match="enable_prefix_caching"):
        EngineArgs(enable_prefix_caching="yes").validate()


def test_lru_evicts_leaves_first_and_never_pinned_blocks(model):
    eng = LLMEngine(EngineArgs(device="cpu", cache_memory=16 << 20), model=model, tokenizer=None)
    pc: PrefixCache = eng.prefix_cache
    assert pc.block_tokens == L and pc.salt == eng.prefix_cache.salt
    a, b = rand_ids(49, 30), rand_ids(33, 31)
    for p in (a, b):
        eng.add_request(p, SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
    ka, kb = pc.keys([], a, 48), pc.keys([], b, 32)
    assert all(k in pc.blocks for k in ka + kb) and len(pc.blocks) == 5
    chain = pc.lookup(kb, 2)  # pin b's chain
    assert pc.evict_one() and ka[2] not in pc.blocks  # a's tail (a leaf, least recently used) goes first
    assert pc.evict_one() and ka[1] not in pc.blocks
    assert pc.evict_one() and ka[0] not in pc.blocks
    assert not pc.evict_one() and all(k in pc.blocks for k in kb)
    pc.release(chain)
    assert pc.clear() == 2 and not pc.blocks
    # keys chain over the whole prefix and the salt
    assert pc.keys([], a[:16] + b[16:], 32)[0] == ka[0] and pc.keys([], a[:16] + b[16:], 32)[1] != ka[1]
    other = PrefixCache(None, L, chain_salt("another model"))
    assert other.keys([], a, 16) != ka[:1]
    drain_check(eng)
