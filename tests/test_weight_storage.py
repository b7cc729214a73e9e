"""bf16-stored weights under fp32 activations (`parity.model.weight_storage`, `fast_linear.widening_linear`):
the CPU default for the published FP8/FP4 layout and for bf16 float checkpoints."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import parity.model.fast_linear as fl
from parity.checkpoint import writer
from parity.checkpoint.official_reader import load_official
from parity.checkpoint.reader import from_pretrained
from parity.config import load_preset
from parity.model import build_model
from parity.model.layers import Experts
from parity.model.weight_storage import WideningExperts, store_weights_, weight_bytes_by_dtype

SMALL = dict(vocab_size=512)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny-architecture checkpoint in the published FP8/FP4 layout (512-token vocabulary)."""
    d = tmp_path_factory.mktemp("release") / "ckpt"
    writer.export_model(build_model(load_preset("tiny").replace(**SMALL), seed=2), d, seed=2, tokenizer=False)
    return d


def _decode_logits(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of an incremental prefill of 2 sequences and `steps` greedy decode steps, [steps + 1, 2, V]."""
    states = [model.new_state() for _ in range(2)]
    try:
        out = [model.forward_incremental([prompt[0], prompt[1]], states)]
        for _ in range(steps):
            out.append(model.forward_incremental([[int(t)] for t in out[-1].argmax(-1)], states))
    finally:
        for st in states:
            st.free()
    return torch.stack(out)


def test_release_on_cpu_is_held_in_bf16_without_fp32_copies(release_dir):
    from parity.model.quant import FP4Experts, QuantLinear

    m = from_pretrained(release_dir)  # CPU default: bf16 storage, fp32 compute
    ref = load_official(release_dir, quantized=False, progress=False)  # dequantized to fp32
    assert m.weight_format == "bf16" and m.dtype == torch.float32
    assert not any(isinstance(x, (QuantLinear, FP4Experts)) for x in m.modules())
    linears = [x for x in m.modules() if isinstance(x, fl.WideningLinear)]
    assert linears and all(x.weight.dtype == torch.bfloat16 for x in linears)
    assert m.lm_head.weight.dtype == torch.bfloat16
    experts = [x for x in m.modules() if isinstance(x, Experts)]
    assert experts and all(isinstance(x, WideningExperts) for x in experts)
    assert all(x.gate_up_proj.dtype == x.down_proj.dtype == torch.bfloat16 for x in experts)
    # the only fp32 matrices left: the embedding (rows gathered), mHC mixers and position biases
    kept = ("model.embed_tokens.weight", "_hc.fn", "hc_head.hc_fn", "position_bias")
    fp32 = [n for n, t in list(m.named_parameters()) + list(m.named_buffers()) if t.dtype == torch.float32]
    assert all(n.endswith(kept) for n in fp32 if dict(m.named_parameters()).get(n, torch.zeros(1)).dim() >= 2)
    bf, rf = weight_bytes_by_dtype(m), weight_bytes_by_dtype(ref)
    assert sum(bf.values()) < 0.75 * sum(rf.values()) and bf["bfloat16"] > bf.get("float32", 0) / 4
    # the bf16 values are the fp32 dequantization exactly
    torch.testing.assert_close(m.lm_head.weight.float(), ref.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(experts[0].gate_up_proj.float(), ref.model.layers[0].mlp.experts.gate_up_proj)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    for mode in ("fp8", "bf16"):
        m.kv_cache_dtype = ref.kv_cache_dtype = mode
        m.indexer_dtype = ref.indexer_dtype = "fp4" if mode == "fp8" else "bf16"
        torch.testing.assert_close(m.forward_logits(ids), ref.forward_logits(ids), rtol=0, atol=1e-5)
    # decode steps take the fused routed-expert kernel (few token-expert pairs)
    torch.testing.assert_close(_decode_logits(m, ids, 3), _decode_logits(ref, ids, 3), rtol=0, atol=1e-5)


def test_quantization_names_still_choose_the_storage(release_dir):
    from parity.model.quant import QuantLinear

    fp8 = from_pretrained(release_dir, quantization="fp8")
    assert isinstance(fp8.model.layers[0].self_attn.q_a_proj, QuantLinear) and fp8.weight_format == "fp8"
    plain = load_official(release_dir, quantized=False, progress=False)
    assert plain.lm_head.weight.dtype == torch.float32 and type(plain.lm_head) is torch.nn.Linear


def test_bf16_float_checkpoint_keeps_bf16_weights(tmp_path):
    cfg = load_preset("tiny").replace(**SMALL)
    src = build_model(cfg, seed=4)
    src.to_dtype(torch.bfloat16)
    d = tmp_path / "bf16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_legacy_dict()))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(d / "model.safetensors"))
    m = from_pretrained(d)  # fp32 compute on the CPU; the bf16 tensors stay bf16, the fp32 head fp32
    assert m.dtype == torch.float32 and m.lm_head.weight.dtype == torch.float32
    assert m.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert from_pretrained(d, quantization="bf16").lm_head.weight.dtype == torch.bfloat16
    ref = build_model(cfg, seed=4)
    ref.to_dtype(torch.bfloat16)
    ref.to_dtype(torch.float32)  # the same bf16 values held in fp32
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.forward_logits(ids), ref.forward_logits(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [64, 4096])  # 32 KiB: one upcast; 2 MiB bf16: the compiled reduction
def test_widening_linear_is_fp32_math(n):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, 256, generator=g) * 0.02).bfloat16()
    for rows in (1, 8, 40):
        x = torch.randn(rows, 256, generator=g)
        ref = (x.double() @ w.double().T).float()
        out = fl.decode_linear(x, w)
        assert out.dtype == torch.float32 and out.shape == (rows, n)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    x3 = torch.randn(2, 3, 256, generator=g)
    torch.testing.assert_close(fl.widening_linear(x3, w), F.linear(x3, w.float()), rtol=0, atol=1e-5)


def test_widening_formulations_under_compile_match():
    w = (torch.randn(1000, 64) * 0.1).bfloat16()
    x = torch.randn(3, 64)
    fn = torch.compile(fl.decode_linear, backend="aot_eager")  # traces the in-graph formulation
    torch.testing.assert_close(fn(x, w), F.linear(x, w.float()), rtol=0, atol=1e-5)


def test_store_weights_rejects_a_wide_dtype():
    with pytest.raises(ValueError, match="weight storage dtype"):
        store_weights_(torch.nn.Linear(2, 2, bias=False), torch.float32)
