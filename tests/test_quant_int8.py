"""No-FP8 devices and INT8 weights: capability table, the float8 guard, byte-exact FP8 codecs without
float8 dtypes, W8A8 / W4A8 modules against a dequantize-and-fake-quantize reference, msModelSlim
checkpoints, FP8 -> W8A8 conversion at load, weight bytes per format."""

import json

import pytest
import torch

from parity.checkpoint import writer
from parity.checkpoint.msmodelslim_io import export_msmodelslim, load_msmodelslim
from parity.checkpoint.official_reader import load_official
from parity.checkpoint.reader import from_pretrained
from parity.config import load_preset
from parity.devices import int8_gemm, native_kernels
from parity.devices.capability_table import NO_FP8_ENV, lookup
from parity.devices.fp8_guard import Float8TensorError, NoFloat8Mode
from parity.errors import CheckpointError, ConfigError
from parity.model import fp_formats as ff
from parity.model import int8_quant as iq
from parity.model.numerics import IndexCodec, KVCodec
from parity.weight_bytes import estimate_weight_bytes

SMALL = dict(vocab_size=512)


@pytest.fixture
def no_fp8(monkeypatch):
    monkeypatch.setenv(NO_FP8_ENV, "1")


# ---------------------------------------------------------------------------------- capabilities
def test_capability_table():
    assert not lookup("npu", "Ascend910B2").fp8 and lookup("npu", "Ascend910B2").int8
    c = lookup("npu", "Ascend910_9391")
    assert c.chip == "ascend-910c" and not c.fp8 and not c.float8_tensors
    assert lookup("npu", "Ascend950PR").fp8 and lookup("npu", "Ascend950PR").fp4
    assert lookup("cuda", "NVIDIA H200", 90).fp8 and not lookup("cuda", "NVIDIA H200", 90).fp4
    assert lookup("cuda", "NVIDIA B200", 100).fp4
    assert not lookup("cuda", "NVIDIA A100", 80).fp8
    cpu = lookup("cpu")
    assert cpu.float8_tensors and not cpu.fp8 and cpu.source


def test_no_fp8_env(no_fp8):
    from parity import devices

    caps = devices.capabilities("cpu")
    assert not caps.float8_tensors and not caps.fp8 and NO_FP8_ENV in caps.source
    assert "fp8" not in caps.weight_formats() and "w8a8" in caps.weight_formats()
    assert not ff.float8_tensors() and ff.scale_dtype() == torch.uint8


def test_guard_catches_factories_casts_and_views():
    with NoFloat8Mode():
        torch.ones(3) + 1
        for make in (
            lambda: torch.empty(2, dtype=torch.float8_e4m3fn),
            lambda: torch.ones(2).to(torch.float8_e5m2),
            lambda: torch.zeros(2, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        ):
            with pytest.raises(Float8TensorError):
                make()


# ------------------------------------------------------------------------------- byte-exact codecs
def test_e4m3_bytes_match_torch_cast():
    allv = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    fin = allv[torch.isfinite(allv)].sort().values
    mids = (fin[1:] + fin[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            fin,
            mids,
            torch.nextafter(mids, torch.tensor(1e9)),
            torch.nextafter(mids, torch.tensor(-1e9)),
            torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-20, 12, (100_000,), generator=g)),
            torch.tensor([0.0, -0.0, 448.0, 449.0, 465.0, 1e30, -1e30, float("nan"), float("inf"), 1e-40]),
        ]
    )
    ref = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ff.fp8_e4m3_encode_bytes(x), ref)
    table = ff._e4m3_table(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.nan_to_num(table, nan=9.0), torch.nan_to_num(allv, nan=9.0))
    assert torch.equal(torch.signbit(table), torch.signbit(allv))


def test_kv_and_indexer_codecs_bit_identical_without_float8(monkeypatch):
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(9, 96, generator=g) * 3
    idx = torch.randn(9, 64, generator=g)
    kc, ic = KVCodec(96, 32, torch.float32, True), IndexCodec(64, torch.float32, True)
    rows_ref, irows_ref = kc.encode(kv), ic.encode(idx)
    dec_ref, idec_ref = kc.decode(rows_ref), ic.decode(irows_ref)
    monkeypatch.setenv(NO_FP8_ENV, "1")
    with NoFloat8Mode():
        rows, irows = kc.encode(kv), ic.encode(idx)
        dec, idec = kc.decode(rows), ic.decode(irows)
    assert torch.equal(rows, rows_ref) and torch.equal(irows, irows_ref)
    assert torch.equal(dec, dec_ref) and torch.equal(idec, idec_ref)


# ------------------------------------------------------------------------------ W8A8 / W4A8 modules
def _reference_linear(xq, xs, wq, ws, out_dtype):
    """Dequantize both sides (values times their scales) and multiply them, in float64 so nothing is rounded
    before the one final rounding to `out_dtype`: the reference the INT8 kernels must match."""
    x, w = xq.double() * xs.double()[:, None], wq.double() * ws.double()[:, None]
    return (x @ w.t()).to(out_dtype)


@pytest.mark.parametrize("shape", [(1, 64, 32), (17, 60, 30), (3, 7, 5), (8, 2048, 6), (2, 1100, 4)])
def test_int8_gemm_kernels_agree(shape):
    """The C++ ops (K a multiple of 16 in AVX2 vectors, of 32 in the 32-lane
    vectors of AVX-512 VNNI builds, else the plain loops), int_mm, the widened fp32 GEMM,
    the reduction over words (run eager here: the same ops the compiled step fuses for gathered experts; int8
    read as int32 words or as bytes; fp32 sums, fp32 runs of 1024 in float64, int32) and the float64 dequant give
    the same exact sums, rescaled once."""
    m, k, n = shape
    g = torch.Generator().manual_seed(2)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    exact = ((xq.long() @ wq.long().t()).double() * xs.double()[:, None] * ws.double()[None, :]).float()
    # eager on the CPU: the fastest of the C++ ops, _int_mm and the widened fp32 GEMM, timed once per row regime
    assert int8_gemm.kernel_for(torch.device("cpu"), m, k, n) == int8_gemm.cpu_gemm_kernel(m)
    assert int8_gemm.cpu_gemm_kernel(m) in ("native", "int_mm", "fp32_gemm")
    unaligned = torch.empty(n * k + 1, dtype=torch.int8)[1:].view(n, k).copy_(wq)  # not readable as int32 words
    kernels = ("int_mm", "fp32_gemm", "reduction", "dequant") + (("native",) if native_kernels.available() else ())
    for kern in kernels:
        assert torch.equal(int8_gemm.int8_linear(xq, xs, wq, ws, torch.float32, kern), exact)
        assert torch.equal(int8_gemm.int8_linear(xq, xs, unaligned, ws, torch.float32, kern), exact)
    torch.testing.assert_close(_reference_linear(xq, xs, wq, ws, torch.float32), exact, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        int8_gemm.int8_linear(xq, xs, wq, ws, torch.float32, "nope")


def test_int4_packing_roundtrip_and_per_token_quant():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    p = iq.pack_int4_rows(q)
    assert p.shape == (3, 10) and p.dtype == torch.int8 and torch.equal(iq.unpack_int4_rows(p), q)
    x = torch.tensor([[0.0, 0.0], [1.0, -127.0]])
    xq, xs = iq.quantize_act_per_token(x)
    assert torch.equal(xq[0], torch.zeros(2, dtype=torch.int8)) and xs[1].item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def small_src():
    from parity.model import build_model

    return build_model(load_preset("tiny").replace(**SMALL), seed=1)


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory, small_src):
    d = tmp_path_factory.mktemp("pub") / "ckpt"
    writer.export_model(small_src, d, seed=1, shard_bytes=200_000, tokenizer=False)
    return d


@pytest.fixture(scope="module", params=["msmodelslim-w8a8", "msmodelslim-w4a8"])
def slim_dir(request, tmp_path_factory, small_src):
    d = tmp_path_factory.mktemp(request.param) / "ckpt"
    export_msmodelslim(small_src, d, request.param, shard_bytes=200_000, tokenizer=False)
    return d, request.param


IDS = torch.randint(0, 512, (1, 23), generator=torch.Generator().manual_seed(5))


def test_msmodelslim_loads_without_float8_and_matches_fake_quant_reference(slim_dir, no_fp8, monkeypatch):
    d, fmt = slim_dir
    with NoFloat8Mode():
        m = from_pretrained(d)
        logits = m.forward_logits(IDS, "fp8", "fp4")
    assert m.weight_format == fmt.rpartition("-")[2]
    q = m.model.layers[0].self_attn.q_a_proj
    assert isinstance(q, iq.Int8Linear) and q.weight.dtype == torch.int8
    ex = m.model.layers[0].mlp.experts
    assert isinstance(ex, iq.Int8Experts) and ex.bits == (4 if fmt.endswith("w4a8") else 8)
    monkeypatch.setattr(iq, "int8_linear", lambda xq, xs, wq, ws, dt: _reference_linear(xq, xs, wq, ws, dt))
    ref = m.forward_logits(IDS, "fp8", "fp4")
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_msmodelslim_bad_input(slim_dir, tmp_path):
    import shutil

    d, _ = slim_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    desc = json.loads((bad / "quant_model_description.json").read_text())
    desc["layers.0.attn.wq_a.weight"] = "W8A16"
    (bad / "quant_model_description.json").write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wq_a\.weight.*W8A16"):
        load_msmodelslim(bad)
    desc["layers.0.attn.wq_a.weight"] = "W8A8_DYNAMIC"
    desc["group_size"] = 64
    (bad / "quant_model_description.json").write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match="group_size"):
        load_msmodelslim(bad)
    with pytest.raises(CheckpointError, match="msModelSlim"):
        from_pretrained(d, quantization="fp8")


def test_published_layout_without_float8_is_bit_identical(published_dir, no_fp8, monkeypatch):
    monkeypatch.delenv(NO_FP8_ENV)
    ref = load_official(published_dir, progress=False, quantization="fp8").forward_logits(IDS, "fp8", "fp4")
    monkeypatch.setenv(NO_FP8_ENV, "1")
    with NoFloat8Mode():
        m = load_official(published_dir, progress=False, quantization="fp8")
        got = m.forward_logits(IDS, "fp8", "fp4")
    assert m.model.layers[0].self_attn.q_a_proj.qweight.dtype == torch.uint8
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_published_layout_converts_to_w8a8_by_default_without_float8(published_dir, no_fp8, caplog):
    with NoFloat8Mode(), caplog.at_level("INFO", logger="parity.checkpoint"):
        m = load_official(published_dir, progress=False)
        logits = m.forward_logits(IDS, "fp8", "fp4")
    assert m.weight_format == "w8a8" and "converted" in caplog.text and "MiB" in caplog.text
    assert isinstance(m.model.layers[0].self_attn.q_a_proj, iq.Int8Linear)
    assert torch.isfinite(logits).all()
    with pytest.raises(ConfigError, match="--quantization"):
        load_official(published_dir, progress=False, quantization="int3")


# ------------------------------------------------------------------------------------ weight bytes
def test_w8a8_weight_bytes_about_one_byte_per_linear_weight(slim_dir):
    d, fmt = slim_dir
    m = load_msmodelslim(d)
    mods = [x for x in m.modules() if isinstance(x, (iq.Int8Linear, iq.Int8Experts))]
    n_weights = sum(
        x.weight.numel() if isinstance(x, iq.Int8Linear) else x.n_experts * 3 * x.hidden * x.inter for x in mods
    )
    per_weight = iq.int8_nbytes(m) / n_weights
    assert (1.0 if fmt.endswith("w8a8") else 0.5) < per_weight < 1.1  # int8 + per-row scales; int4 experts
    actual = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    est = estimate_weight_bytes(m.config, "float32", weights=m.weight_format)
    assert abs(est - actual) / actual < 0.03  # estimate = what the loaded model holds, within a few %


def test_weight_bytes_per_format():
    cfg = load_preset("v4-flash")
    b = {w: estimate_weight_bytes(cfg, "bfloat16", weights=w) for w in ("bf16", "fp8", "fp4", "w8a8", "w4a8")}
    assert b["fp4"] == estimate_weight_bytes(cfg, "bfloat16", quantized=True)
    assert b["bf16"] == estimate_weight_bytes(cfg, "bfloat16")
    assert b["w4a8"] < b["w8a8"] < b["bf16"] and b["fp4"] < b["fp8"] < b["bf16"]
    with pytest.raises(ConfigError):
        estimate_weight_bytes(cfg, weights="int3")


def test_quantization_flag_reaches_engine_and_info(published_dir, capsys):
    import argparse

    from parity.cli import main
    from parity.engine.args import EngineArgs
    from parity.errors import RequestError
    from parity.server.serve_cli import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args(["--quantization", "w8a8"]).quantization == "w8a8"
    with pytest.raises(RequestError, match="quantization"):
        EngineArgs(quantization="int3").validate()
    from parity.engine.llm import LLM

    llm = LLM(str(published_dir), device="cpu", quantization="w8a8", tokenizer=None, cache_memory=1 << 24)
    assert llm.engine.model.weight_format == "w8a8"
    assert main(["info", "tiny", "--weights", "w8a8"]) == 0
    assert "weights w8a8" in capsys.readouterr().out


def test_int8_lm_head_flag_conversion_and_error_bound(published_dir):
    """``--quantize-lm-head``: refused without w8a8 / w4a8; the head becomes an `Int8Linear` and its logits
    stay within the worst-case rounding bound of the float head's: with x rounded to a step of s_x = amax(x)
    / 127 (error <= s_x / 2 per element) and row n of W to s_n = amax(W[n]) / 127, |q(x).q(W[n]) - x.W[n]| <=
    s_x / 2 * sum|W[n]| + s_n / 2 * sum|x| + K * s_x * s_n / 4 (measured here: max error 9e-3, an eighth of
    the largest bound; no logit above a fifth of its own bound, as the rounding errors partly cancel)."""
    import argparse

    from parity.engine.args import EngineArgs
    from parity.engine.model_loading import load_model
    from parity.errors import RequestError
    from parity.server.cli_args import engine_kwargs
    from parity.server.serve_cli import add_engine_args

    for q in (None, "auto", "bf16", "fp8"):
        with pytest.raises(RequestError, match=r"--quantize-lm-head.*--quantization w8a8 or w4a8"):
            EngineArgs(quantize_lm_head=True, quantization=q).validate()
    EngineArgs(quantize_lm_head=True, quantization="w4a8").validate()
    p = argparse.ArgumentParser()
    add_engine_args(p)
    p.add_argument("--model")
    assert engine_kwargs(p.parse_args(["-q", "w8a8", "--quantize-lm-head"]))["quantize_lm_head"] is True
    assert engine_kwargs(p.parse_args([]))["quantize_lm_head"] is False
    cpu = torch.device("cpu")
    with pytest.raises(RequestError, match="--quantize-lm-head"):
        load_model(str(published_dir), cpu, torch.float32, quantization="bf16", quantize_lm_head=True)
    ref_m, _ = load_model(str(published_dir), cpu, torch.float32, quantization="w8a8")
    m, _ = load_model(str(published_dir), cpu, torch.float32, quantization="w8a8", quantize_lm_head=True)
    head = m.lm_head
    assert isinstance(head, iq.Int8Linear) and head.weight.dtype == torch.int8
    seen = []
    head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    got, ref = m.forward_logits(IDS)[0], ref_m.forward_logits(IDS)[0]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    x, w = seen[0].reshape(-1, head.in_features).double(), ref_m.lm_head.weight.detach().double()
    sx = x.abs().amax(-1, keepdim=True) / 127  # [T, 1]
    sw = w.abs().amax(-1)[None, :] / 127  # [1, vocab]
    bound = sx / 2 * w.abs().sum(-1)[None, :] + sw / 2 * x.abs().sum(-1, keepdim=True) + x.shape[1] * sx * sw / 4
    err = (got.double() - ref.double()).abs()
    assert (err <= bound + 1e-5).all()
    assert 0 < err.max() < 0.5 * bound.max()


@pytest.mark.parametrize("k", [256, 2048, 1100])
def test_exact_int8_rows_equal_the_integer_dot_products(k):
    """fp32 sums (K <= 1040), fp32 runs of 1024 summed in float64 (K = 2048), int32 (K = 1100): all exact,
    at the extreme values too (every product 127 * 127)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (3, 5, k), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (3, k), generator=g, dtype=torch.int8)
    w[0], x[0] = 127, 127
    ref = (w.long() * x.long()[:, None, :]).sum(-1)
    got = iq.exact_int8_rows(w, x)
    assert torch.equal(got.long(), ref) and (got.double() == ref.double()).all()


def test_int8_words_view_and_fallbacks():
    w = torch.randint(-127, 128, (6, 16), dtype=torch.int8)
    words = int8_gemm.int8_words(w)
    assert words.dtype == torch.int32 and words.shape == (6, 4)
    x = torch.randint(-127, 128, (6, 16), dtype=torch.int8)
    ref = (w.long() * x.long()).sum(-1)
    assert torch.equal(int8_gemm.exact_int8_sums(words, x).long(), ref)
    wide = torch.randint(-127, 128, (6, 32), dtype=torch.int8)
    for odd in (w[:, :15], torch.empty(6 * 16 + 1, dtype=torch.int8)[1:].view(6, 16), wide[:, ::2]):
        assert int8_gemm.int8_words(odd) is odd  # K % 4, alignment, layout: read as bytes


@pytest.mark.parametrize("k", [1024, 1036, 2048])
def test_int8_kernels_stay_exact_with_minus_128_weights(k):
    """A weight read from a file may hold -128: products up to 128 * 127, still exact in every kernel."""
    wq = torch.full((3, k), -128, dtype=torch.int8)
    xq = torch.full((2, k), -127, dtype=torch.int8)
    xs, ws = torch.ones(2), torch.ones(3)
    exact = (xq.long() @ wq.long().t()).double().float()
    for kern in ("int_mm", "fp32_gemm", "reduction", "dequant") + (("native",) if native_kernels.available() else ()):
        assert torch.equal(int8_gemm.int8_linear(xq, xs, wq, ws, torch.float32, kern), exact), kern


def test_compiled_int8_products_are_one_graph_and_exact(monkeypatch):
    """Traced for the CPU (aot_eager: the graph inductor would get, without its compile time): the decode
    rows take this CPU's kernel (the C++ op, or where _int_mm lost the timing the widened fp32 GEMM, each one
    opaque op), the gathered experts the C++ op or the reduction over int32 words, with no graph break
    (fullgraph) and the exact integer sums of the eager kernels."""
    g = torch.Generator().manual_seed(4)
    lin = iq.Int8Linear.from_float(torch.randn(48, 64, generator=g))
    x = torch.randn(3, 64, generator=g)
    calls = []
    gemm = int8_gemm.exact_int8_gemm

    def counted(xq, wq):
        calls.append(tuple(xq.shape))
        return gemm(xq, wq)

    monkeypatch.setattr(int8_gemm, "exact_int8_gemm", counted)
    picks = [("fp32_gemm", 1, True), ("fp32_gemm", 3, True), ("int_mm", 1, False)]
    if native_kernels.available():
        picks.append(("native", 3, False))
    for pick, rows, widened in picks:
        monkeypatch.setattr(int8_gemm, "_cpu_choice", {"decode": pick, "prefill": pick})
        want = lin(x[:rows])  # eager: this CPU's own timed pick
        calls.clear()
        compiled = torch.compile(lambda t: lin(t), backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x[:rows]), want)
        assert bool(calls) == widened
        torch._dynamo.reset()
    for k in (64, 1036):  # the op's declared result (fp32; float64 past one exact fp32 run) is what it returns
        xq, wq = torch.ones(2, k, dtype=torch.int8), torch.ones(3, k, dtype=torch.int8)
        got = torch.compile(torch.ops.parity.exact_int8_gemm, backend="aot_eager", fullgraph=True)(xq, wq)
        assert got.dtype == int8_gemm.exact_int8_gemm(xq, wq).dtype and torch.equal(got, torch.full((2, 3), k).to(got))
        torch._dynamo.reset()
    ex = iq.Int8Experts.from_float(torch.randn(4, 2 * 32, 64, generator=g), torch.randn(4, 64, 32, generator=g), 7.0)
    ids = torch.tensor([[0, 3], [2, 3], [1, 1]])
    wts = torch.rand(3, 2, generator=g)
    for kernel in ("reduction", "native") if native_kernels.available() else ("reduction",):
        monkeypatch.setattr(iq, "gathered_int8_kernel", lambda device, kernel=kernel: kernel)
        got = torch.compile(ex.gathered_forward, backend="aot_eager", fullgraph=True)(x, ids, wts)
        torch.testing.assert_close(got, ex.forward(x, ids, wts), rtol=0, atol=1e-6)
        torch._dynamo.reset()


def test_widened_gemm_blocks_reuse_one_buffer_and_stay_exact(monkeypatch):
    """The fp32 GEMM over many widened blocks (several row blocks, two fp32 runs along K) gives the exact
    integer sums, and every block comes from one reused per-thread buffer (no fresh tensor per block)."""
    import threading

    from parity.devices import widening

    monkeypatch.setattr(widening, "WIDEN_BLOCK_ELEMS", 3000)
    g = torch.Generator().manual_seed(9)
    xq = torch.randint(-127, 128, (3, 1100), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (37, 1100), dtype=torch.int8, generator=g)
    want = xq.double() @ wq.double().t()
    assert torch.equal(int8_gemm.exact_int8_gemm(xq, wq), want)
    ptrs = {block.data_ptr() for _, block in widening.widened_blocks(wq, torch.float32)}
    assert len(ptrs) == 1 and widening.scratch(8, torch.float32, torch.device("cpu")).data_ptr() in ptrs
    other = []  # another thread gets its own buffer
    cpu = torch.device("cpu")
    t = threading.Thread(target=lambda: other.append(widening.scratch(8, torch.float32, cpu).data_ptr()))
    t.start()
    t.join()
    assert other[0] not in ptrs


def test_native_kernels_ops_exact_and_checked():
    """The C++ ops give the exact integer sums (AVX2 tiles of 4 weight rows x 2 activation rows and their
    remainders, K a multiple of 16 or not; in AVX-512 VNNI builds 32-lane tiles where K is a multiple of 32 and
    the 16-lane ones where it is only one of 16; -128 on both sides), and their fused-rescale forms the float64
    rescale of `rescale_sums` bit for bit; gathered rows read their own expert and its scales, and bad
    operands raise an error naming the op and the problem."""
    if not native_kernels.available():
        pytest.skip("no C++ compiler here: the C++ INT8 ops are unavailable (logged)")
    g = torch.Generator().manual_seed(11)
    for m, k, n in ((1, 256, 37), (5, 272, 9), (8, 48, 64), (3, 20, 3), (16, 1024, 5)):
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        got = native_kernels.int8_gemm(xq, wq)
        assert got.dtype == torch.int32 and torch.equal(got.long(), xq.long() @ wq.long().t()), (m, k, n)
        xs, ws = torch.rand(m, generator=g) * 0.03, torch.rand(n, generator=g) * 0.01
        fused = native_kernels.int8_linear(xq, xs, wq, ws)
        assert fused.dtype == torch.float32
        assert torch.equal(fused, int8_gemm.rescale_sums(got, xs, ws[None, :], torch.float32)), (m, k, n)
    w = torch.randint(-128, 128, (4, 33, 64), dtype=torch.int8, generator=g)
    xq = torch.randint(-128, 128, (6, 64), dtype=torch.int8, generator=g)
    ids = torch.tensor([3, 0, 3, 1, 2, 2])
    want = torch.einsum("rnk,rk->rn", w[ids].long(), xq.long())
    assert torch.equal(native_kernels.int8_gathered_gemv(xq, w, ids).long(), want)
    xs, ws = torch.rand(6, generator=g), torch.rand(4, 33, generator=g)
    fused = native_kernels.int8_gathered_linear(xq, xs, w, ws, ids)
    assert torch.equal(fused, int8_gemm.rescale_sums(want.int(), xs, ws[ids], torch.float32))
    with pytest.raises(RuntimeError, match="w_scale must have shape \\[4, 33\\]"):
        native_kernels.int8_gathered_linear(xq, xs, w, ws[:, :32], ids)
    with pytest.raises(RuntimeError, match="x_scale must be a CPU torch.float32 tensor, got torch.float64"):
        native_kernels.int8_linear(xq, xs.double(), w[0], ws[0])
    with pytest.raises(RuntimeError, match="x_scale must have shape \\[6\\]"):
        native_kernels.int8_linear(xq, xs[:5], w[0], ws[0])
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        native_kernels.int8_gathered_gemv(xq, w, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(RuntimeError, match="integer expert ids"):
        native_kernels.int8_gathered_gemv(xq, w, ids.float())
    with pytest.raises(RuntimeError, match=r"xq \(the activations\) must be torch.int8, got torch.float32"):
        native_kernels.int8_gemm(xq.float(), w[0])
    with pytest.raises(RuntimeError, match="K mismatch"):
        native_kernels.int8_gemm(xq, w[0, :, :32])
