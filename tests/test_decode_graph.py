"""The fixed-shape decode step (`parity.model.decode_graph`) equals the eager incremental forward: uncompiled
(its logic: padding to a bucket, window wrap, compressed entries completed in the step and across cache
blocks, all cache modes, bf16-stored weights under fp32 activations) and, in one slow test, compiled
through the engine's step path."""

from __future__ import annotations

import pytest
import torch
from test_model_helpers import make_decode_model, make_int8_decode_model

from parity.model.compressor import compress_step, compress_step_masked
from parity.model.decode_graph import DecodeGraph, unsupported_reason
from parity.model.fixed_step import lm_head_rows, moe_step


def _small_model(**over):
    m = make_decode_model(**over)
    m.cache_block_entries = 4  # CSA entries cross a block every 16 tokens, HCA every 64
    return m


def _run(model, prompt_lens, steps, kv="bf16", ix="bf16", batches=None):
    """Greedy tokens [steps + 1, B] and every step's logits: prefill, then decode steps (batch ``batches[s]``
    of the first sequences, default all)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g) for n in prompt_lens]
    states = [model.new_state(kv_cache_dtype=kv, indexer_dtype=ix) for _ in prompts]
    kw = {"kv_cache_dtype": kv, "indexer_dtype": ix}
    lg = model.forward_incremental(prompts, states, **kw)
    nxt = lg.argmax(-1)
    out, lgs = [nxt.tolist()], [lg]
    for s in range(steps):
        b = len(states) if batches is None else batches[s]
        cur = [int(t) for t in nxt[:b]] + [int(t) for t in torch.as_tensor(out[-1])[b:]]
        lg = model.forward_incremental([[t] for t in cur[:b]], states[:b], **kw)
        lgs.append(lg)
        nxt = torch.cat([lg.argmax(-1), torch.as_tensor(cur[b:], dtype=torch.long)])
        out.append(nxt.tolist())
    return out, lgs


def _assert_fixed_step_matches_eager(eager, fixed):
    """``fixed`` through the uncompiled fixed-shape step (buckets 1 and 4; batches of 3, then 1): the same
    greedy tokens as ``eager`` and fp32 logits within 1e-5 at every step."""
    fixed.decode_graph = DecodeGraph(fixed, "cpu", buckets=(1, 4), compile=False)
    batches = [3] * 10 + [1] * 4
    te, le = _run(eager, [13, 2, 16], len(batches), batches=batches)
    tf, lf = _run(fixed, [13, 2, 16], len(batches), batches=batches)
    assert fixed.decode_graph.steps == len(batches)
    assert te == tf
    for a, b in zip(le, lf, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_compress_step_masked_equals_compress_step():
    g = torch.Generator().manual_seed(0)
    for overlap, ratio, d in ((True, 4, 6), (False, 16, 6)):
        cw = (2 if overlap else 1) * d
        st = torch.randn(3, 2, (2 if overlap else 1) * ratio, cw, generator=g)
        kv, sc = torch.randn(3, cw, generator=g), torch.randn(3, cw, generator=g)
        pos = torch.tensor([ratio - 1, 5, 2 * ratio - 1])
        a, b = st.clone(), st.clone()
        emit, ent = compress_step(a[:, 0], a[:, 1], kv, sc, pos, ratio, overlap, d)
        mask, ent_m = compress_step_masked(b[:, 0], b[:, 1], kv, sc, pos, ratio, overlap, d)
        assert mask.nonzero().flatten().tolist() == emit.tolist()
        torch.testing.assert_close(ent_m[mask], ent, rtol=0, atol=0)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_moe_step_equals_moe_forward():
    m = _small_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g)
    ids = torch.randint(0, 512, (5,), generator=g)
    for layer in m.model.layers:
        torch.testing.assert_close(moe_step(layer.mlp, x, ids), layer.mlp(x, ids), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kv,ix", [("bf16", "bf16"), ("fp8", "fp4")])
def test_fixed_shape_step_equals_eager(kv, ix):
    eager, fixed = _small_model(), _small_model()
    assert unsupported_reason(fixed) is None
    fixed.decode_graph = DecodeGraph(fixed, "cpu", buckets=(1, 4), compile=False)
    # 3 sequences (padded to the bucket of 4) crossing window wraps, CSA / HCA completions and cache
    # blocks at different positions; then 1 sequence (bucket 1)
    batches = [3] * 14 + [1] * 6
    te, le = _run(eager, [13, 2, 16], len(batches), kv, ix, batches)
    tf, lf = _run(fixed, [13, 2, 16], len(batches), kv, ix, batches)
    assert fixed.decode_graph.steps == len(batches)
    assert te == tf
    for a, b in zip(le, lf, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_fixed_shape_step_equals_eager_with_bf16_stored_weights():
    """bf16-stored matrices (`WideningLinear`, `WideningExperts`, a bf16 LM head) under fp32 activations: the
    graph's step widens them in its reductions, so it equals the eager bf16-storage model."""
    from parity.model.fast_linear import WideningLinear
    from parity.model.weight_storage import WideningExperts, store_weights_

    eager, fixed = _small_model(), _small_model()
    for m in (eager, fixed):
        assert store_weights_(m) > 0
    assert type(fixed.lm_head) is WideningLinear and fixed.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(fixed.model.layers[1].mlp.experts, WideningExperts)
    assert fixed.dtype == torch.float32 and unsupported_reason(fixed) is None
    _assert_fixed_step_matches_eager(eager, fixed)


def test_moe_step_equals_moe_forward_on_int8_experts():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g)
    ids = torch.randint(0, 512, (5,), generator=g)
    for bits in (8, 4):
        for layer in make_int8_decode_model(bits).model.layers:
            torch.testing.assert_close(moe_step(layer.mlp, x, ids), layer.mlp(x, ids), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bits,int8_head", [(8, True), (4, False)])
def test_fixed_shape_step_equals_eager_w8a8(bits, int8_head):
    """W8A8 / W4A8 models (`Int8Linear` incl. the grouped output projection, `Int8Experts` gathered with
    int32 sums; with ``--quantize-lm-head`` the int8 head, inside the step where this CPU's INT8 kernel is the
    C++ op, else in the step at 1 row and in the head graph above): the graph's step equals the eager INT8
    step."""
    from parity.checkpoint.conversion import quantize_lm_head
    from parity.model.int8_quant import Int8Experts, Int8Linear

    def model():
        m = make_int8_decode_model(bits)
        m.cache_block_entries = 4
        if int8_head:
            quantize_lm_head(m)
        return m

    eager, fixed = model(), model()
    assert isinstance(fixed.model.layers[1].self_attn.o_a_proj, Int8Linear)
    assert isinstance(fixed.model.layers[1].mlp.experts, Int8Experts)
    assert isinstance(fixed.lm_head, Int8Linear) == int8_head
    assert unsupported_reason(fixed) is None
    _assert_fixed_step_matches_eager(eager, fixed)


def test_lm_head_rows_keeps_fp32_activations_on_a_bf16_head():
    from parity.model.fixed_step import lm_head_rows

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 64, generator=g) * 0.1).bfloat16()
    x = torch.randn(2, 64, generator=g)
    ref = (x.double() @ w.double().T).float()
    torch.testing.assert_close(lm_head_rows(x, w), ref, rtol=0, atol=1e-5)
    compiled = torch.compile(lm_head_rows, backend="aot_eager")  # traces the in-graph (widening) reduction
    torch.testing.assert_close(compiled(x, w), ref, rtol=0, atol=1e-5)


def test_project_widens_a_bf16_stored_linear_under_compile():
    from parity.model.fast_linear import WideningLinear
    from parity.model.layers import project

    lin = torch.nn.Linear(64, 40, bias=False)
    lin.weight.data = lin.weight.data.bfloat16()
    lin.__class__ = WideningLinear
    x = torch.randn(3, 64)
    ref = (x.double() @ lin.weight.double().T).float()
    torch.testing.assert_close(project(lin, x), ref, rtol=0, atol=1e-5)
    out = torch.compile(project, backend="aot_eager")(lin, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_quantized_or_sharded_models_stay_eager():
    from torch import nn

    m = _small_model()

    class OtherLinear(nn.Linear):
        pass

    m.model.layers[0].self_attn.q_a_proj = OtherLinear(64, m.config.q_lora_rank, bias=False)
    assert "q_a_proj" in unsupported_reason(m)
    from parity.model.quant import QuantLinear

    fp8 = make_int8_decode_model()  # INT8 layers run in the graph, FP8 ones (as published) do not
    assert unsupported_reason(fp8) is None
    fp8.model.layers[2].self_attn.kv_proj = QuantLinear.from_float(torch.randn(fp8.config.head_dim, 64))
    assert "layers.2.self_attn.kv_proj is QuantLinear" in unsupported_reason(fp8)


def test_larger_batches_and_chunks_are_not_taken():
    m = _small_model()
    graph = DecodeGraph(m, "cpu", buckets=(1, 2), compile=False)
    assert graph.accepts([(0, 1, 5), (1, 1, 3)], False, False)
    assert not graph.accepts([(0, 1, 5), (1, 1, 3), (2, 1, 4)], False, False)
    assert not graph.accepts([(0, 2, 5)], False, False)
    assert DecodeGraph(m, "cpu", buckets=(1, 2)).accepts([(0, 1, 5)], True, True)  # every cache mode


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_compiled_step_matches_eager_with_fp8_kv_and_fp4_index_keys():
    """The release's cache modes (FP8 e4m3 KV rows, FP4 indexer keys) compiled: same greedy tokens, logits
    within 1e-5 of the eager step."""
    eager, compiled = _small_model(), _small_model()
    compiled.decode_graph = DecodeGraph(compiled, "cpu", buckets=(4,))
    te, le = _run(eager, [13, 2, 16], 12, kv="fp8", ix="fp4")
    tc, lc = _run(compiled, [13, 2, 16], 12, kv="fp8", ix="fp4")
    assert compiled.decode_graph.steps == 12
    assert te == tc
    for a, b in zip(le, lc, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_compiled_step_matches_eager(monkeypatch):
    """The engine's compiled path: same greedy tokens, logits within 1e-5 (fp32, "highest" matmul precision)."""
    from parity.engine import model_runner

    assert torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(model_runner, "WARM_BUCKETS", (4,))
    eager, compiled = _small_model(), _small_model()
    sp = model_runner.prepare_step_path(compiled, torch.device("cpu"), enforce_eager=False)
    assert sp.path == "compiled" and sp.backend == "inductor" and sp.compile_s > 0
    assert isinstance(compiled.decode_graph, DecodeGraph)
    batches = [3] * 12  # bucket 4 (one compile: the suite's budget), padded with a scratch sequence
    te, le = _run(eager, [13, 2, 16], len(batches), batches=batches)
    tc, lc = _run(compiled, [13, 2, 16], len(batches), batches=batches)
    assert compiled.decode_graph.steps == len(batches)
    assert te == tc
    for a, b in zip(le, lc, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_multi_thread_graphs_run_kernels_serially_with_the_head_apart(monkeypatch):
    """On more than one CPU thread the step's graph asks for serial kernels; on every thread count the one-row
    head is a graph of its own (the same logits as the eager model)."""
    from parity.model import decode_graph

    asked = []

    def fake_compiler(device, whole_model=False, serial_kernels=False):
        asked.append((whole_model, serial_kernels))
        return lambda fn: fn  # run uncompiled: the routing is what is tested

    monkeypatch.setattr(decode_graph.devices, "compiler", fake_compiler)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m = _small_model()
        graph = m.decode_graph = DecodeGraph(m, "cpu", buckets=(1, 2))
        step, head_one, head_rows = graph._compiled()
        assert head_one is not None and asked[:2] == [(True, True), (True, False)]
        two, lg_two = _run(m, [13], 6)
        torch.set_num_threads(1)
        asked.clear()
        assert graph._compiled()[1] is not None and asked[:2] == [(True, False), (True, False)]
        ref = _small_model()
        one, lg_one = _run(m, [13], 6)
        base, lg_base = _run(ref, [13], 6)
    finally:
        torch.set_num_threads(n)
    assert two == one == base
    for a, b in zip(lg_base, lg_two, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def _record_head_path(monkeypatch):
    """Run `DecodeGraph` uncompiled (the routing is what is tested) and record where each step's LM head ran:
    returns (the row counts of every separate head call, every step's ``head`` flag)."""
    from parity.model import decode_graph

    monkeypatch.setattr(
        decode_graph.devices, "compiler", lambda device, whole_model=False, serial_kernels=False: lambda fn: fn
    )
    heads, in_step = [], []
    real_step = decode_graph.decode_step

    def step(*args):
        in_step.append(args[9])  # decode_step's ``head``
        return real_step(*args)

    monkeypatch.setattr(decode_graph, "decode_step", step)
    monkeypatch.setattr(decode_graph, "lm_head_rows", lambda *a: heads.append(len(a[0])) or lm_head_rows(*a))
    return heads, in_step


@pytest.mark.parametrize("pick", ["native", "int_mm"])
def test_int8_head_on_the_cpp_op_runs_inside_the_step(monkeypatch, pick):
    """An int8 LM head whose CPU kernel is the C++ op runs inside the step's graph at every bucket (padded
    ones included: their scratch rows dropped), so no head graph is called; another pick keeps the int8 head
    in its graph of its own at every bucket. Logits and tokens equal the eager model's either way."""
    from parity.checkpoint.conversion import quantize_lm_head
    from parity.devices import native_kernels
    from parity.model import decode_graph

    if pick == "native" and not native_kernels.available():
        pytest.skip("no C++ compiler here: the C++ INT8 ops are unavailable (logged)")
    monkeypatch.setattr(decode_graph.int8_gemm, "_cpu_choice", {"decode": pick, "prefill": pick})
    heads, in_step = _record_head_path(monkeypatch)

    def model():
        m = make_int8_decode_model(8)
        m.cache_block_entries = 4
        quantize_lm_head(m)
        return m

    eager, fixed = model(), model()
    fixed.decode_graph = DecodeGraph(fixed, "cpu", buckets=(1, 4))
    batches = [3] * 4 + [1] * 2
    te, le = _run(eager, [13, 2, 16], len(batches), batches=batches)
    tf, lf = _run(fixed, [13, 2, 16], len(batches), batches=batches)
    assert te == tf
    for a, b in zip(le, lf, strict=True):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    if pick == "native":
        assert in_step == [True] * len(batches) and heads == []
    else:
        assert in_step == [False] * len(batches) and heads == [3] * 4 + [1] * 2


def test_head_layout_is_chosen_per_bucket_and_follows_the_weight(monkeypatch):
    """A bucket whose timing favours the [hidden, vocab] copy of the head runs it (same tokens and logits as
    eager), the other bucket keeps the stored layout, and a head weight changed in place drops the copy."""
    from parity.model import decode_graph, head_layout

    monkeypatch.setattr(decode_graph.devices, "compiler", lambda device, **kw: lambda fn: fn)
    monkeypatch.setattr(head_layout, "choose", lambda rows_fn, weight_t, batch: (batch == 1, 2e-3, 1e-3))
    m = _small_model()
    graph = m.decode_graph = DecodeGraph(m, "cpu", buckets=(1, 2))
    graph.warm_up()
    n = torch.get_num_threads()
    assert graph.head_columns == {(n, 1)} and graph._head_copy() is not None
    ref = _small_model()
    for batches in ([1] * 5, [2] * 5):
        got, lg = _run(m, [13, 7][: batches[0]], len(batches), batches=batches)
        want, lw = _run(ref, [13, 7][: batches[0]], len(batches), batches=batches)
        assert got == want
        for a, b in zip(lw, lg, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    with torch.no_grad():
        m.lm_head.weight.mul_(2.0)
        ref.lm_head.weight.mul_(2.0)
    got, lg = _run(m, [13], 3)
    want, lw = _run(ref, [13], 3)
    assert graph._head_copy() is None and not graph.head_columns
    assert got == want
    for a, b in zip(lw, lg, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_float_head_inside_the_step_computes_only_the_batch_rows(monkeypatch):
    """Batches of 5 and 6 in bucket 8 (three and two scratch rows): the head inside the step is given the
    batch's row count, computes those rows only (the op's scratch rows are zero) and the logits and tokens
    equal the eager model's."""
    from parity.devices import native_kernels
    from parity.model import decode_graph, fast_linear

    if not native_kernels.available():
        pytest.skip("no C++ compiler here: the C++ ops are unavailable (logged)")
    heads, in_step = _record_head_path(monkeypatch)
    lives, outs = [], []
    real = decode_graph.decode_step

    def step(*args):
        out = real(*args)
        lives.append(int(args[10]))
        outs.append(out[0])
        return out

    monkeypatch.setattr(decode_graph, "decode_step", step)
    vocab = fast_linear.ONEDNN_MIN_WEIGHT_BYTES // (64 * 4)
    eager, fixed = _small_model(vocab_size=vocab), _small_model(vocab_size=vocab)
    fixed.decode_graph = DecodeGraph(fixed, "cpu", buckets=(1, 8))
    batches = [6] * 2 + [5] * 3
    prompts = [13, 2, 16, 5, 9, 11]
    te, le = _run(eager, prompts, len(batches), batches=batches)
    tf, lf = _run(fixed, prompts, len(batches), batches=batches)
    assert te == tf
    for a, b in zip(le, lf, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert lives == batches and heads == [] and all(in_step)
    for n, out in zip(lives, outs, strict=True):
        assert out.shape[0] == 8 and not out[n:].any()  # the scratch rows: not computed, zero


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_float_head_on_the_cpp_op_runs_inside_the_step(monkeypatch, stored):
    """A float LM head that `fast_linear.native_linear` takes (fp32 model, an fp32 or bf16-stored head of
    >= 4 MiB, <= 16 rows) runs inside the step's graph on the C++ op at every bucket, so no head graph is
    called and warm-up does not time its layout; tokens and logits equal the eager model's. The decision is
    made once per (threads, bucket). Above 16 rows, or with the op off, the head keeps its graph of its own."""
    from parity.devices import native_kernels
    from parity.model import fast_linear, head_layout
    from parity.model.weight_storage import store_weights_

    if not native_kernels.available():
        pytest.skip("no C++ compiler here: the C++ ops are unavailable (logged)")
    heads, in_step = _record_head_path(monkeypatch)
    width = 4 if stored == "fp32" else 2
    vocab = fast_linear.ONEDNN_MIN_WEIGHT_BYTES // (64 * width)  # a 4 MiB head at hidden 64
    eager, fixed = _small_model(vocab_size=vocab), _small_model(vocab_size=vocab)
    if stored == "bf16":
        for m in (eager, fixed):
            assert store_weights_(m) > 0
        assert fixed.lm_head.weight.dtype == torch.bfloat16
    graph = fixed.decode_graph = DecodeGraph(fixed, "cpu", buckets=(1, 2, 4))
    monkeypatch.setattr(head_layout, "choose", lambda *a: pytest.fail("a head inside the step is not timed"))
    graph.warm_up((1, 4))
    heads.clear()
    in_step.clear()
    batches = [3] * 4 + [1] * 2
    te, le = _run(eager, [13, 2, 16], len(batches), batches=batches)
    tf, lf = _run(fixed, [13, 2, 16], len(batches), batches=batches)
    assert te == tf
    for a, b in zip(le, lf, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert in_step == [True] * len(batches) and heads == []
    # every bucket up to the op's row limit takes it (padded rows are not computed: the batch's rows go in)
    wide = DecodeGraph(fixed, "cpu", buckets=(1, 2, 4, 8, 16, 32))
    assert all(wide._head_in_step(b) for b in (1, 2, 4, 8, 16)) and not wide._head_in_step(32)
    monkeypatch.setattr(native_kernels, "available", lambda: False)
    assert graph._head_in_step(4)  # decided once: no switch (and recompile) mid-run
    assert not DecodeGraph(fixed, "cpu", buckets=(1, 4))._head_in_step(4)
