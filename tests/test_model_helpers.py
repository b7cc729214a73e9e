"""Shared helpers of the model tests (no tests here): small random DeepseekV4 checkpoints written by
transformers 5.23 (the test-only oracle), with non-trivial values everywhere (sinks, position biases,
router biases, tid2eid, norms). The fixtures built on them live in conftest.py."""

from __future__ import annotations

import torch

#: A small V4 covering every layer kind: sliding, CSA (ratio 4 + indexer), HCA (ratio 16), hash and
#: scored MoE, YaRN on the compressed layers. index_n_heads=16 makes exact-zero indexer scores
#: (all heads relu 0, ties) improbable.
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=32,
    q_lora_rank=16,
    o_groups=2,
    o_lora_rank=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    index_n_heads=16,
    index_head_dim=16,
    index_topk=3,
    sliding_window=8,
    swiglu_limit=0.5,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    partial_rotary_factor=0.25,
    max_position_embeddings=128,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)


def make_hf_model(seed: int = 0, **overrides):
    """A transformers DeepseekV4ForCausalLM with random non-trivial weights (eval mode, fp32)."""
    import transformers.utils.logging as hf_logging
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_logging.set_verbosity_error()
    kw = dict(SMALL)
    kw.update(overrides)
    cfg = DeepseekV4Config(**kw)
    torch.manual_seed(seed)
    m = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if k.endswith("tid2eid"):
                E, K = cfg.n_routed_experts, v.shape[1]
                v.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(v.shape[0])]))
            elif k.endswith("norm.weight") or k.endswith("scale"):
                v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * (0.5 if v.dim() < 2 else 0.2))
            if k.endswith("scorer.weights_proj.weight"):
                # Positive head weights: an indexer score is then 0 only when every head's relu is 0, so
                # top-k ties (left unspecified by torch.topk in transformers) stay improbable.
                v.abs_()
    return m


def save_hf(model, path, **kw) -> str:
    model.save_pretrained(str(path), **kw)
    return str(path)


def make_decode_model(**overrides):
    """A 3-layer parity model, one layer of each attention kind (sliding / CSA ratio 4 / HCA ratio 16, window
    8), fp32 weights, no MTP, for the decode-step tests (eager vs the fixed-shape / compiled step)."""
    from parity.config import CSA, HASH_MOE, HCA, MOE, SLIDING, load_preset
    from parity.model import build_model

    overrides = {"vocab_size": 512, **overrides}
    cfg = load_preset("tiny").replace(
        hidden_size=64,
        num_hidden_layers=3,
        layer_types=[SLIDING, CSA, HCA],
        mlp_layer_types=[HASH_MOE, MOE, MOE],
        compress_rates={CSA: 4, HCA: 16},
        sliding_window=8,
        num_nextn_predict_layers=0,
        quantization_config=None,
        expert_dtype=None,
        torch_dtype="float32",
        **overrides,
    )
    return build_model(cfg, seed=0)


def make_int8_decode_model(bits: int = 8, **overrides):
    """`make_decode_model` as ``--quantization w8a8`` (bits 8) / ``w4a8`` (bits 4) holds it: every linear the
    release stores in FP8 (`parity.checkpoint.layout.TABLE`) as an `Int8Linear`, the routed experts as
    `Int8Experts` of `bits`; the rest (router, compressor and indexer projections, LM head) float."""
    from parity.checkpoint import layout
    from parity.model.int8_quant import Int8Experts, Int8Linear
    from parity.model.layers import Experts

    m = make_decode_model(**overrides)
    fp8 = {r.module for r in layout.TABLE if r.scope == layout.BLOCK and r.kind == layout.FP8}
    for i, layer in enumerate(m.model.layers):
        for name in sorted(fp8):
            parent, _, leaf = name.rpartition(".")
            try:
                owner = layer.get_submodule(parent)
            except AttributeError:  # e.g. the indexer of a layer without one
                continue
            lin = getattr(owner, leaf, None)
            if isinstance(lin, torch.nn.Linear):
                setattr(owner, leaf, Int8Linear.from_float(lin.weight.detach()))
        ex = layer.mlp.experts
        assert isinstance(ex, Experts), f"layer {i}: {type(ex).__name__}"
        layer.mlp.experts = Int8Experts.from_float(ex.gate_up_proj.detach(), ex.down_proj.detach(), ex.limit, bits)
    return m
