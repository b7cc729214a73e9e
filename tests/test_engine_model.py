"""The engine on the real V4 model (small-ratio miniature): greedy outputs equal repeated argmax of
`forward_logits` alone, batched, with chunked prefill and after preemption; caches return to zero.

Config: the `tiny` preset with sliding_window 8, CSA ratio 4, HCA ratio 16 and index_topk 2, so prompts of
21-50 tokens plus 16 generated tokens cross the window, many CSA and several HCA boundaries, and the
indexer has more candidates than index_topk.
"""

import pytest
import torch

from parity.config import CSA, HCA, load_preset
from parity.engine import LLM, SamplingParams
from parity.engine.testing import drain_check

pytest.importorskip("parity.model.deepseek_v4")
from parity.model import build_model  # noqa: E402

N_OUT = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_OUT, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads and suffer badly on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    cfg = load_preset("tiny").replace(sliding_window=8, compress_rates={CSA: 4, HCA: 16}, index_topk=2)
    m = build_model(cfg, device="cpu", dtype=torch.float32, seed=0)
    m.cache_block_entries = 1  # one entry per growing block: caches grow during decode (preemption happens there)
    return m


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 129280, (n,), generator=g).tolist() for n in (37, 21, 50)]


def check_greedy(model, prompt, out):
    """Teacher-forced check: every generated token is the argmax of forward_logits on its prefix
    (equivalent to repeated argmax on the growing sequence); ties closer than 1e-4 are accepted."""
    seq = torch.tensor([prompt + out[:-1]])
    logits = model.forward_logits(seq)[0, len(prompt) - 1 :]
    for i, t in enumerate(out):
        row = logits[i]
        best = int(row.argmax())
        assert t == best or float(row[best] - row[t]) < 1e-4, (i, t, best)


def make(model, **kw):
    kw.setdefault("cache_memory", 64 << 20)
    return LLM(model_obj=model, tokenizer=None, **kw)


@pytest.fixture(scope="module")
def batched(model, prompts):
    llm = make(model)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    drain_check(llm.engine)
    return [o.outputs[0].token_ids for o in outs]


def test_batched_equals_forward_logits_argmax(model, prompts, batched):
    for p, o in zip(prompts, batched, strict=False):
        assert len(o) == N_OUT
        check_greedy(model, p, o)


def test_alone_and_chunked_prefill_identical(model, prompts, batched):
    alone = make(model).generate(prompt_token_ids=[prompts[2]], sampling_params=GREEDY)[0].outputs[0].token_ids
    assert alone == batched[2]
    chunked = make(model, max_num_batched_tokens=11).generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.outputs[0].token_ids for o in chunked] == batched


def test_preemption_identical_and_cache_returns_to_zero(model, prompts, batched):
    from parity.engine import CachePoolExhausted

    eng = make(model, cache_memory=4 << 20).engine
    pool = eng.pool
    reqs = [eng.add_request(p, GREEDY.clone()) for p in prompts]
    eng.step()  # all three prefilled in one step
    assert eng.scheduler.num_running == 3
    eng.reset_prefix_cache()  # the blocks cached so far would give the hog's pages back
    hog = []  # memory pressure: take every free page
    while True:
        try:
            hog.append(pool.alloc(0, "hog", (pool.page_bytes,), torch.uint8))
        except CachePoolExhausted:
            break
    assert pool.free_pages == 0
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    assert st["num_preemptions"] > 0
    assert [r.output().outputs[0].token_ids for r in reqs] == batched
    assert pool.used_bytes == len(hog) * pool.page_bytes + eng.prefix_cache.nbytes
    for t in hog:
        pool.release(t)
    drain_check(eng)
    assert eng.stats()["cache_reserved_bytes"] == 0


def test_abort_mid_decode_frees_everything(model, prompts):
    eng = make(model).engine
    reqs = [eng.add_request(p, GREEDY.clone()) for p in prompts]
    for _ in range(3):
        eng.step()
    held = eng.pool.used_bytes - eng.prefix_cache.nbytes
    assert held == sum(s.state.nbytes() for s in eng.scheduler.running) > 0
    for r in reqs:
        eng.abort(r.request_id)
    eng.step()
    assert not eng.has_unfinished()
    drain_check(eng)


def test_default_model_text_prompts_stop_strings_and_fp8_batching():
    """LLM() with no model: the bundled miniature (official layout: fp8 KV cache, fp4 indexer) and the
    V4 tokenizer. Batched == alone under fp8; a stop string spanning tokens ends the text before it."""
    llm = LLM(device="cpu", cache_memory=64 << 20)
    eng = llm.engine
    assert eng.tokenizer is not None and eng.tokenizer.eos_token_id == 1
    prompts = ["Hello, my name is", "The capital of France is a city where"]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    both = llm.generate(prompts, sp)
    alone = llm.generate(prompts[1], sp)[0]
    assert alone.outputs[0].token_ids == both[1].outputs[0].token_ids
    assert both[0].prompt_token_ids == eng.tokenizer.encode(prompts[0])
    out = both[1].outputs[0]
    assert out.text == eng.tokenizer.decode(out.token_ids)
    # a stop string made of the end of token 2 and the start of token 3
    pieces = [eng.tokenizer.decode([t]) for t in out.token_ids]
    k = next(i for i in range(2, 9) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][:1]
    expect = out.text[: out.text.find(stop)]
    res = llm.generate(prompts[1], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop]))[0]
    assert res.outputs[0].text == expect and res.outputs[0].finish_reason == "stop"
    assert res.outputs[0].stop_reason == stop
    assert eng.stats()["cache_used_bytes"] == 0


def test_fp8_cache_holds_about_twice_the_tokens():
    """FP8 cache: the pool is sized from the chosen cache dtypes; a bf16 model's fp8 cache (1-byte non-RoPE
    values + block scales) with the fp4 indexer (keys packed as e2m1 codes + UE8M0 scales) fits about twice
    as many tokens in the same budget; fp8 KV alone (indexer keys in bf16) somewhat fewer."""
    from parity.engine import EngineArgs, LLMEngine

    cfg = load_preset("tiny").replace(vocab_size=512, sliding_window=8, compress_rates={CSA: 4, HCA: 16}, index_topk=2)
    m = build_model(cfg, device="cpu", dtype=torch.bfloat16, seed=0)
    caps, growth = {}, {}
    for kv, ix in (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp4")):
        m.indexer_dtype = ix  # the engine follows the model's indexer mode (layout and states alike)
        eng = LLMEngine(
            EngineArgs(device="cpu", cache_memory=2 << 20, kv_cache_dtype=kv, max_model_len=65536),
            model=m,
            tokenizer=None,
        )
        caps[kv, ix] = eng.token_capacity()
        assert 0 < caps[kv, ix] < 65536
        growth[kv, ix] = sum(e.nbytes / e.block_entries / e.ratio for e in eng.layout if e.growing)
    m.indexer_dtype = "bf16"
    base = caps["bf16", "bf16"]
    assert 1.5 < caps["fp8", "bf16"] / base < 1.8, caps
    # per CSA entry: KV 128 -> 82 bytes, index key 64 -> 16 + 1 bytes; bytes per token of growth 104 -> 54.625
    assert growth["bf16", "bf16"] == 104 and growth["fp8", "fp4"] == 54.625, growth
    assert 1.9 < caps["fp8", "fp4"] / base < 2.5, caps


def test_seeded_sampling_reproducible_in_any_batch(model, prompts):
    sp = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=8, seed=11, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    alone = make(model).generate(prompt_token_ids=[prompts[0]], sampling_params=sp)[0].outputs[0].token_ids
    mixed = make(model, max_num_batched_tokens=13).generate(
        prompt_token_ids=[prompts[1], prompts[0]], sampling_params=[other, sp]
    )
    assert mixed[1].outputs[0].token_ids == alone
