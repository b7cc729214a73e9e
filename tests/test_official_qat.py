"""Whole-model logits against DeepSeek's official inference code, with and without its quantization-aware
steps (FP8 e4m3 KV, Hadamard + FP4 indexer), on a small checkpoint (tests/data/v4-official-qat).

Pure math must agree to 1e-5 everywhere. With the quantization steps on, the official code and parity
apply the same roundings at the same points (docs/numerics.md, "The quantization-aware steps against
the official code"). A few window-KV values, however, lie a few fp32 ulps of their block maximum from an
FP8 rounding midpoint. Which way they round is decided by fp32 noise in either code: its GEMM shapes
depend on the prompt length and on the prefill or decode path. One such decision moves the logits by up
to 1.3e-2. The official logits of this checkpoint contain three of them, and they differ between the
official code's own prefills of different lengths. `official_ties` lists them with the direction the
official run took. The tests first check that each is a tie, then pin parity's rounding of exactly these
values to that direction, and then require agreement to 1e-4 at every position of every length.
Other values come that near a midpoint in parity's run on some CPUs only (its fp32 summation order
follows the CPU's kernels); `NOISE_TIES` lists them with the official direction, pinned where they are
near-ties in the run at hand.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).parent / "data" / "v4-official-qat"
PURE_TOL = 1e-5
QAT_TOL = 1e-4
#: a pinned value must lie this close (relative) to its FP8 rounding midpoint: fp32 noise, not a
#: different rounding rule, decides it.
TIE_BAND = 1e-6
FP8_MAX, FP8_BLOCK = 448.0, 64


def official_ties(S: int) -> list[tuple[int, int, int, str]]:
    """Rounding decisions of the official run of the first S prompt tokens at near-ties:
    (layer, position, non-RoPE channel of the window KV, "up" | "down" in magnitude).

    The official prefills of <= 40 tokens round layer 3 position 6 up, those of >= 65 tokens down; its
    other two near-ties went down in every run that contains them.
    """
    ties = []
    if S > 6:
        ties.append((3, 6, 62, "up" if S <= 40 else "down"))
    if S > 16:
        ties.append((3, 16, 13, "down"))
    if S > 131:
        ties.append((2, 131, 48, "down"))
    return ties


#: Further window-KV values that lie within fp32 noise of an FP8 rounding midpoint in parity's run on some
#: CPUs but not on others (found on an AVX2-only AMD EPYC Zen 2, relative margins 1.0e-7 and 1.7e-7; not
#: near enough to flip on the AVX-512 EPYC the list above was found on), as (layer, position, channel, the
#: official direction). The official direction was read off the official logits: the other one moves them
#: by up to 1.07 (layer 1, from position 88 on) and 2.8e-4 (layer 5, positions 39-46). `pinned` pins these
#: only where parity's value is within `TIE_BAND` of the midpoint (beyond it fp32 noise cannot flip it).
NOISE_TIES = ((1, 88, 15, "up"), (5, 39, 15, "up"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads (and suffer on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def golden():
    from parity.checkpoint.reader import from_pretrained

    model = from_pretrained(DATA)
    exp = load_file(DATA / "expected" / "official_logits.safetensors")
    lengths = sorted(int(k.split("_")[1][1:]) for k in exp if k.endswith("_qat1"))
    return model, exp["input_ids"], exp, lengths


def _fp8_neighbours(y: torch.Tensor) -> tuple[float, float]:
    """The two FP8 e4m3 magnitudes around |y| (|y| <= 448): (lower, upper)."""
    a = float(y.abs())
    e = max(torch.floor(torch.log2(torch.tensor(max(a, 2.0**-6)))).item(), -6.0)
    step = 2.0 ** (e - 3)
    lo = (a // step) * step
    return lo, lo + step


@contextlib.contextmanager
def pinned(model, ties, optional=NOISE_TIES):
    """Force the FP8 rounding direction of the listed window-KV values (positions counted from the
    first call: one sequence, any chunking). Hooks the output of each layer's ``kv_norm`` (its non-RoPE
    channels are exactly what the official code rounds), replacing the value by the chosen FP8 neighbour
    times its block scale, so the rounding that follows is exact. Each of ``ties`` must be a near-tie
    (else AssertionError) and is recorded in the yielded dict; each of ``optional`` is pinned only where it
    is one in this run (not recorded)."""
    seen = {}
    counters = {}

    def hook(layer):
        def f(mod, inp, out):
            p0 = counters.get(layer, 0)
            counters[layer] = p0 + out.shape[0]
            for k, (lay, pos, ch, way) in enumerate((*ties, *optional)):
                if lay != layer or not p0 <= pos < p0 + out.shape[0]:
                    continue
                required = k < len(ties)
                r = pos - p0
                b0 = ch // FP8_BLOCK * FP8_BLOCK
                blk = out[r, b0 : b0 + FP8_BLOCK].float()
                assert int(blk.abs().argmax()) != ch - b0, "a pinned value must not set its block scale"
                s = 2.0 ** torch.ceil(torch.log2(blk.abs().max().clamp_min(1e-4) / FP8_MAX)).item()
                y = out[r, ch].float() / s
                lo, hi = _fp8_neighbours(y)
                mid = (lo + hi) / 2
                margin = abs(float(y.abs()) - mid) * s / float(blk.abs().max())
                if not required and margin >= TIE_BAND:
                    continue
                assert margin < TIE_BAND, f"layer {lay} position {pos} channel {ch}: not a tie ({margin:.1e})"
                if required:
                    seen[(lay, pos, ch)] = margin
                out = out.clone()
                out[r, ch] = torch.sign(y) * (hi if way == "up" else lo) * s
            return out

        return f

    handles = [layer.self_attn.kv_norm.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Max abs logit difference per position: [S]."""
    return (out.reshape(ref.shape) - ref).abs().amax(-1).flatten()


def test_pure_math_matches_official_every_length(golden):
    model, ids, exp, lengths = golden
    with torch.no_grad():
        for S in lengths:
            err = _err(model.forward_logits(ids[:, :S]), exp[f"prefill_S{S}_qat0"])
            assert err.max().item() <= PURE_TOL, (S, err.max().item())


def test_quantized_prefill_matches_official_every_length(golden):
    model, ids, exp, lengths = golden
    with torch.no_grad():
        for S in lengths:
            with pinned(model, official_ties(S)) as seen:
                out = model.forward_logits(ids[:, :S], kv_cache_dtype="fp8", indexer_dtype="fp4")
            assert len(seen) == len(official_ties(S)), S
            err = _err(out, exp[f"prefill_S{S}_qat1"])
            assert err.max().item() <= QAT_TOL, (S, err.argmax().item(), err.max().item())


def test_quantized_prefill_without_ties_needs_no_pinning(golden):
    """Before the first near-tie (position 6) both codes agree with nothing pinned."""
    model, ids, exp, lengths = golden
    with torch.no_grad():
        for S in (s for s in lengths if s <= 6):
            out = model.forward_logits(ids[:, :S], kv_cache_dtype="fp8", indexer_dtype="fp4")
            assert _err(out, exp[f"prefill_S{S}_qat1"]).max().item() <= QAT_TOL, S


def test_one_tie_moves_the_official_logits(golden):
    """The official code disagrees with itself across prompt lengths only through these decisions."""
    _, _, exp, _ = golden
    short, long_ = exp["prefill_S40_qat1"][0], exp["prefill_S160_qat1"][0, :40]
    err = (short - long_).abs().amax(-1)
    assert err[:6].max().item() <= PURE_TOL and err[6].item() > 1e-3
    assert _err(exp["prefill_S40_qat0"], exp["prefill_S160_qat0"][:, :40]).max().item() <= PURE_TOL


@pytest.mark.parametrize("S, qat", [(160, True), (40, True), (65, False)])
def test_token_by_token_decode_reproduces_official_prefill(golden, S, qat):
    """The official decode path rounds the same values at the same points as its prefill, so decoding
    the prompt one token at a time gives the prefill logits of every prefix (ties pinned as above)."""
    model, ids, exp, _ = golden
    kw = dict(kv_cache_dtype="fp8", indexer_dtype="fp4") if qat else dict(kv_cache_dtype="bf16", indexer_dtype="bf16")
    st = model.new_state(**kw)
    outs = []
    with torch.no_grad(), pinned(model, official_ties(S) if qat else [], optional=NOISE_TIES if qat else ()):
        for t in range(S):
            outs.append(model.forward_incremental([ids[0, t : t + 1]], [st], **kw)[0])
    err = _err(torch.stack(outs), exp[f"prefill_S{S}_qat{int(qat)}"])
    assert err.max().item() <= (QAT_TOL if qat else PURE_TOL), (err.argmax().item(), err.max().item())


def test_chunked_prefill_reproduces_official_prefill(golden):
    model, ids, exp, _ = golden
    kw = dict(kv_cache_dtype="fp8", indexer_dtype="fp4")
    st = model.new_state(**kw)
    outs = []
    cuts = [0, 5, 6, 7, 16, 17, 33, 64, 65, 100, 130]
    with torch.no_grad(), pinned(model, official_ties(130)):
        for a, b in itertools.pairwise(cuts):
            outs += model.forward_incremental([ids[0, a:b]], [st], all_logits=True, **kw)[0]
    err = _err(torch.stack(outs), exp["prefill_S130_qat1"])
    assert err.max().item() <= QAT_TOL, (err.argmax().item(), err.max().item())


def test_engine_batched_chunked_preempted_equal_forward_logits():
    """The engine under the official numerics (fp8 KV cache, fp4 indexer keys): greedy outputs alone,
    batched, with chunked prefill and after preemption are the same tokens, each the argmax of
    `forward_logits` (same numerics) on its prefix."""
    from parity.checkpoint.reader import from_pretrained
    from parity.engine import LLM, CachePoolExhausted, SamplingParams

    model = from_pretrained(DATA, kv_cache_dtype="fp8", indexer_dtype="fp4")
    model.cache_block_entries = 1  # caches grow block by block during decode: preemption happens there
    ids = load_file(DATA / "expected" / "official_logits.safetensors")["input_ids"][0].tolist()
    prompts = [ids[:37], ids[40:61], ids[100:150]]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(**kw):
        kw.setdefault("cache_memory", 64 << 20)
        llm = LLM(model_obj=model, tokenizer=None, device="cpu", **kw)
        out = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy)]
        return out

    batched = run()
    alone = [
        LLM(model_obj=model, tokenizer=None, device="cpu", cache_memory=64 << 20)
        .generate(prompt_token_ids=[p], sampling_params=greedy)[0]
        .outputs[0]
        .token_ids
        for p in prompts
    ]
    assert alone == batched
    assert run(max_num_batched_tokens=11) == batched
    eng = LLM(model_obj=model, tokenizer=None, device="cpu", cache_memory=1 << 20).engine
    reqs = [eng.add_request(p, greedy.clone()) for p in prompts]
    eng.step()  # all three prefilled, then every free page taken: decode must preempt
    eng.reset_prefix_cache()  # the prefix blocks cached so far would give pages back instead
    hog = []
    with contextlib.suppress(CachePoolExhausted):
        while True:
            hog.append(eng.pool.alloc(0, "hog", (eng.pool.page_bytes,), torch.uint8))
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["num_preemptions"] > 0
    assert [r.output().outputs[0].token_ids for r in reqs] == batched
    with torch.no_grad():
        for p, out in zip(prompts, batched, strict=True):
            logits = model.forward_logits(torch.tensor([p + out[:-1]]), kv_cache_dtype="fp8", indexer_dtype="fp4")[
                0, len(p) - 1 :
            ]
            best = logits.argmax(-1)
            gap = (logits.gather(1, best[:, None]) - logits.gather(1, torch.tensor(out)[:, None])).flatten()
            assert (gap <= QAT_TOL).all(), gap
