"""Low-precision numerics (FP8 KV cache, FP4 indexer, shared-expert clamp) and the pinned cases where parity follows
DeepSeek's official inference code rather than transformers (docs/numerics.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_helpers import make_hf_model, save_hf

TOL = 1e-4

# head_dim 80 with a 16-wide RoPE part: the non-RoPE part is exactly one FP8 block of 64 (as on the real
# models, 448 = 7 x 64); index_head_dim 32 = one FP4 block.
Q8 = dict(head_dim=80, partial_rotary_factor=0.2, index_head_dim=32)


# ---------------------------------------------------------------- independent re-implementation
def _pow2_scale(amax: torch.Tensor, fmt_max: float, floor: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(floor) / fmt_max)))


def ref_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 in blocks of 64 with power-of-two scales, via torch's own float8 cast."""
    b = x.float().unflatten(-1, (-1, 64))
    s = _pow2_scale(b.abs().amax(-1, keepdim=True), 448.0, 1e-4)
    q = (b / s).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def ref_fp4(x: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 in blocks of 32: nearest grid value, ties to the even code (0, 1, 2, 4)."""
    b = x.float().unflatten(-1, (-1, 32))
    s = _pow2_scale(b.abs().amax(-1, keepdim=True), 6.0, 6 * 2.0**-126)
    v = (b / s).clamp(-6, 6)
    dist = (v.abs().unsqueeze(-1) - _GRID).abs() + 1e-7 * (torch.arange(8) % 2)
    q = _GRID[dist.argmin(-1)] * torch.sign(v)
    return (q * s).flatten(-2).to(x.dtype)


def ref_hadamard(x: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < x.shape[-1]:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return x @ (h / x.shape[-1] ** 0.5)


def hook_official_steps(hf) -> list:
    """Apply the official quantization-aware steps around transformers' pure math with hooks:
    FP8 on the non-RoPE part of window KV and compressed KV (rounding the non-RoPE channels commutes
    with RoPE, which only touches the last channels) and Hadamard + FP4 on indexer queries and keys."""
    nope = hf.config.head_dim - hf.config.qk_rope_head_dim
    handles = []

    def round_kv(mod, inp, out):
        return torch.cat([ref_fp8(out[..., :nope]), out[..., nope:]], dim=-1)

    def round_index(mod, args):
        q, kv, hidden = args
        return ref_fp4(ref_hadamard(q)), ref_fp4(ref_hadamard(kv)), hidden

    for layer in hf.model.layers:
        att = layer.self_attn
        handles.append(att.kv_norm.register_forward_hook(round_kv))
        if att.compressor is not None:
            handles.append(att.compressor.kv_norm.register_forward_hook(round_kv))
            if hasattr(att.compressor, "indexer"):
                handles.append(att.compressor.indexer.scorer.register_forward_pre_hook(round_index))
    return handles


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    from parity.checkpoint.reader import from_pretrained

    hf = make_hf_model(2, **Q8)
    d = save_hf(hf, tmp_path_factory.mktemp("q8"))
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        pure = hf(ids).logits
        hs = hook_official_steps(hf)
        try:
            official = hf(ids).logits
        finally:
            for h in hs:
                h.remove()
    return from_pretrained(d), ids, pure, official


def test_official_steps_match_independent_reimplementation(q8, one_thread):
    model, ids, pure, official = q8
    out = model.forward_logits(ids, kv_cache_dtype="fp8", indexer_dtype="fp4")
    assert (out - official).abs().max().item() <= TOL
    assert (model.forward_logits(ids) - pure).abs().max().item() <= TOL  # default stays the pure math
    assert (official - pure).abs().max().item() > 1e-2  # the steps do change the logits


def test_each_step_alone(q8, one_thread):
    model, ids, pure, _ = q8
    fp8 = model.forward_logits(ids, kv_cache_dtype="fp8")
    fp4 = model.forward_logits(ids, indexer_dtype="fp4")
    assert (fp8 - pure).abs().max().item() > 1e-3
    assert (fp4 - pure).abs().max().item() > 1e-3  # 12 CSA candidates > index_topk 3: choices change


@pytest.mark.parametrize("cuts", [list(range(49)), [0, 17, 18, 19, 33, 48]])
def test_incremental_official_steps(q8, cuts, one_thread):
    model, ids, _, _ = q8
    ref = model.forward_logits(ids, kv_cache_dtype="fp8", indexer_dtype="fp4")
    st = model.new_state(kv_cache_dtype="fp8", indexer_dtype="fp4")
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        outs += model.forward_incremental(
            [ids[0, a:b]], [st], all_logits=True, kv_cache_dtype="fp8", indexer_dtype="fp4"
        )[0]
    assert (torch.stack(outs) - ref[0, : cuts[-1]]).abs().max().item() <= TOL
    from parity.errors import RequestError

    with pytest.raises(RequestError, match="other numerics"):
        model.forward_incremental([[1]], [st])  # model defaults are bf16/bf16


def test_fp8_cache_halves_bytes(q8, one_thread):
    from parity.config import load_preset
    from parity.model.deepseek_v4 import V4ForCausalLM

    model = q8[0]
    b16, f8 = model.new_state(), model.new_state(kv_cache_dtype="fp8")
    assert f8.nbytes() < b16.nbytes()
    with torch.device("meta"):
        flash = V4ForCausalLM(load_preset("v4-flash")).to_dtype(torch.bfloat16)

    def per_token(kv):  # bytes per token of context growth, summed over layers
        lay = flash.cache_layout(kv)
        return sum(
            e["bytes"] / e["entries"] / e["tokens_per_entry"]
            for e in lay
            if e["component"] in ("compressed_kv", "index_keys")
        )

    win16 = [e for e in flash.cache_layout("bf16") if e["component"] == "window_kv"][0]
    win8 = [e for e in flash.cache_layout("fp8") if e["component"] == "window_kv"][0]
    assert win16["bytes"] == 128 * 1024 and win8["bytes"] == 128 * 584  # 512 bf16 vs 448 fp8 + 7 + 64 bf16 (+1)
    kv16 = sum(
        e["bytes"] / e["entries"] / e["tokens_per_entry"]
        for e in flash.cache_layout("bf16")
        if e["component"] == "compressed_kv"
    )
    kv8 = sum(
        e["bytes"] / e["entries"] / e["tokens_per_entry"]
        for e in flash.cache_layout("fp8")
        if e["component"] == "compressed_kv"
    )
    assert 0.55 < kv8 / kv16 < 0.6
    assert per_token("fp8") < 0.7 * per_token("bf16")


def test_fp4_index_keys_stored_packed(q8, one_thread):
    """indexer_dtype="fp4": indexer keys are cached as packed e2m1 codes + one UE8M0 byte per 32 values and
    read back as exactly the official rounded keys (bit for bit, so logits cannot move)."""
    from parity.config import load_preset
    from parity.model.deepseek_v4 import V4ForCausalLM
    from parity.model.numerics import IndexCodec, fp4_round, hadamard

    g = torch.Generator().manual_seed(3)
    for dt in (torch.float32, torch.bfloat16):
        for d in (16, 32, 128):  # a short padded block, one block, four blocks
            x = (torch.randn(300, d, generator=g) * torch.logspace(-6, 3, 300)[:, None]).to(dt)
            x[0] = 0.0
            x[1, ::3] = -0.0
            codec = IndexCodec(d, dt, fp4=True)
            h = hadamard(x)
            rows = codec.encode(h)
            assert rows.dtype == torch.uint8 and rows.shape == (300, -(-d // 2) + -(-d // 32))
            want = fp4_round(h)
            for got in (codec.decode(rows), codec.decode(codec.encode(want))):  # already-rounded keys too
                assert got.dtype == dt and torch.equal(got.float().view(torch.int32), want.float().view(torch.int32))
    model = q8[0]
    st16, st4 = model.new_state(kv_cache_dtype="fp8"), model.new_state(kv_cache_dtype="fp8", indexer_dtype="fp4")
    ids = q8[1][0]
    model.forward_incremental([ids], [st16], kv_cache_dtype="fp8")
    model.forward_incremental([ids], [st4], kv_cache_dtype="fp8", indexer_dtype="fp4")
    ik4, ik16 = (
        {e["layer"]: e["bytes"] for e in model.cache_layout("fp8", ix) if e["component"] == "index_keys"}
        for ix in ("fp4", "bf16")
    )
    blocks = {i: len(st4.layers[i].idx_blocks) for i in ik4}  # the layout's block bytes are what is allocated
    assert st16.nbytes() - st4.nbytes() == sum(blocks[i] * (ik16[i] - ik4[i]) for i in ik4) > 0
    with torch.device("meta"):
        flash = V4ForCausalLM(load_preset("v4-flash")).to_dtype(torch.bfloat16)
    ik = [e for e in flash.cache_layout("fp8", "fp4") if e["component"] == "index_keys"][0]
    assert ik["dtype"] == "uint8" and ik["bytes"] == 64 * 68  # 128 codes / 2 + 4 scales vs 256 in bf16

    def growth(kv, ix):  # bytes per token of context growth, summed over layers
        return sum(
            e["bytes"] / e["entries"] / e["tokens_per_entry"]
            for e in flash.cache_layout(kv, ix)
            if e["kind"] == "growing"
        )

    assert growth("bf16", "bf16") == 6880 and growth("fp8", "fp4") == 3514.25  # 1.96x the tokens


# ---------------------------------------------------------------- shared-expert clamp
def test_shared_expert_clamp(tmp_path, one_thread):
    from parity.checkpoint.reader import from_pretrained

    hf = make_hf_model(0)  # swiglu_limit 0.5: the clamp is active
    model = from_pretrained(save_hf(hf, tmp_path / "ck"))
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (model.forward_logits(ids) - ref).abs().max().item() <= TOL  # current official code = transformers
    for layer in model.model.layers:
        layer.mlp.shared_experts.clamp = False  # first V4-Flash release
    assert (model.forward_logits(ids) - ref).abs().max().item() > 1e-3


# ---------------------------------------------------------------- official vs transformers, pinned
def test_softmax_routing_weights_not_renormalised():
    """Official Gate: top-k weights are renormalised only for non-softmax scoring (transformers always
    renormalises)."""
    from parity.model.layers import Router

    torch.manual_seed(0)
    r = Router(8, 16, 2, 10, False, "softmax", 2.0)
    r.weight.data.normal_()
    x = torch.randn(5, 16)
    w, ids = r(x, torch.zeros(5, dtype=torch.long))
    probs = F.linear(x, r.weight).softmax(-1)
    assert torch.allclose(w, 2.0 * probs.gather(1, ids))
    assert (w.sum(-1) < 2.0 - 1e-3).all()
    r.scoring = "sqrtsoftplus"
    w, _ = r(x, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(w.sum(-1), torch.full((5,), 2.0))


def test_bf16_runs_official_precision(one_thread):
    """In a bf16 model the official code keeps the LM head, mHC, sinks, norms and position biases in fp32,
    computes the compressor, router and attention in fp32 and mixes the mHC residual in fp32, rounding
    once (transformers rounds post/comb to bf16 first)."""
    from parity.config import load_preset
    from parity.model import build_model
    from parity.model.layers import HyperConnection

    cfg = load_preset("tiny").replace(vocab_size=256)
    m = build_model(cfg, dtype=torch.bfloat16, seed=0)
    assert m.lm_head.weight.dtype == torch.float32
    layer = m.model.layers[1]
    assert layer.attn_hc.fn.dtype == torch.float32 and layer.self_attn.sinks.dtype == torch.float32
    assert layer.self_attn.q_a_proj.weight.dtype == torch.bfloat16
    x = torch.randn(3, cfg.hidden_size).to(torch.bfloat16)
    kv, sc = layer.self_attn.compressor.project(x, torch.arange(3))
    assert kv.dtype == sc.dtype == torch.float32
    out = torch.randn(3, cfg.hidden_size).to(torch.bfloat16)
    streams = torch.randn(3, cfg.hc_mult, cfg.hidden_size).to(torch.bfloat16)
    post = torch.rand(3, cfg.hc_mult)
    comb = torch.rand(3, cfg.hc_mult, cfg.hc_mult)
    y = HyperConnection.post(out, streams, post, comb)
    exact = post[..., None] * out.float()[:, None] + torch.einsum("tij,tid->tjd", comb, streams.float())
    assert torch.equal(y, exact.to(torch.bfloat16))
    logits = m.forward_logits(torch.tensor([[1, 2, 3, 4, 5]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
