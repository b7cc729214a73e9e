"""parity.model vs transformers 5.23 DeepseekV4ForCausalLM in float32 (logits and greedy outputs)."""

from __future__ import annotations

import pytest
import torch
from test_model_helpers import make_hf_model, save_hf

TOL = 1e-4


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_logits_match_transformers(hf_small, parity_small, one_thread):
    """Sequences of 50 tokens: cross the window (8), many CSA (4) and HCA (16) boundaries, and give
    up to 12 CSA candidates for index_topk = 3; sliding/CSA/HCA layers, hash + scored MoE."""
    _, hf = hf_small
    ids = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(3))
    ref = _hf_logits(hf, ids)
    out = parity_small.forward_logits(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= TOL


def test_parameter_names_equal_transformers(hf_small, parity_small):
    _, hf = hf_small
    ours = {k for k in parity_small.state_dict() if ".mtp." not in k}
    assert ours == set(hf.state_dict())


def test_indexer_topk_matters(hf_small, parity_small, one_thread):
    """Sanity check that the test above exercises top-k: selecting every entry changes the logits."""
    ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(3))
    base = parity_small.forward_logits(ids)
    idx = [
        layer.self_attn.compressor.indexer
        for layer in parity_small.model.layers
        if layer.self_attn.compressor is not None and layer.self_attn.compressor.indexer is not None
    ]
    old = [i.topk for i in idx]
    try:
        for i in idx:
            i.topk = 1000
        assert (parity_small.forward_logits(ids) - base).abs().max().item() > 1e-3
    finally:
        for i, k in zip(idx, old, strict=False):
            i.topk = k


@pytest.mark.parametrize(
    "overrides",
    [
        # HCA-first schedule (V4-Pro style), sigmoid-free sqrtsoftplus, short window, plain RoPE, 2 hash layers
        dict(
            layer_types=[
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "sliding_attention",
                "heavily_compressed_attention",
            ],
            mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
            sliding_window=5,
            index_topk=2,
            rope_parameters=None,
            routed_scaling_factor=2.5,
        ),
    ],
)
def test_logits_match_transformers_variant(tmp_path, overrides, one_thread):
    from parity.checkpoint.reader import from_pretrained

    hf = make_hf_model(1, **overrides)
    d = save_hf(hf, tmp_path / "ck", save_original_format=False)  # transformers' own names this time
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(5))
    out = from_pretrained(d).forward_logits(ids)
    assert (out - _hf_logits(hf, ids)).abs().max().item() <= TOL
