"""The published layout table: tensor names, dtypes and shapes of the release, and the name mapping
derived from it (official / transformers original format -> parity's parameter names)."""

import math

import pytest
import torch

from parity.checkpoint import layout
from parity.checkpoint.layout import canonical_name
from parity.config import load_preset
from parity.errors import CheckpointError


def test_layout_matches_release_listing_v4_flash():
    lay = layout.official_layout(load_preset("v4-flash"))
    want = {  # (dtype, shape) as in the V4-Flash safetensors headers
        "layers.0.attn.wq_a.weight": ("F8_E4M3", (1024, 4096)),
        "layers.0.attn.wq_a.scale": ("F8_E8M0", (8, 32)),
        "layers.2.attn.indexer.wq_b.weight": ("F8_E4M3", (8192, 1024)),
        "layers.2.attn.indexer.wq_b.scale": ("F8_E8M0", (64, 8)),
        "layers.2.attn.compressor.wkv.weight": ("BF16", (1024, 4096)),
        "layers.2.attn.indexer.weights_proj.weight": ("BF16", (64, 4096)),
        "layers.0.ffn.experts.0.w1.weight": ("I8", (2048, 2048)),
        "layers.0.ffn.experts.0.w1.scale": ("F8_E8M0", (2048, 128)),
        "layers.0.ffn.experts.0.w2.weight": ("I8", (4096, 1024)),
        "layers.0.ffn.experts.0.w2.scale": ("F8_E8M0", (4096, 64)),
        "layers.0.ffn.shared_experts.w1.weight": ("F8_E4M3", (2048, 4096)),
        "layers.0.ffn.shared_experts.w1.scale": ("F8_E8M0", (16, 32)),
        "layers.0.ffn.gate.tid2eid": ("I64", (129280, 6)),
        "layers.5.ffn.gate.bias": ("F32", (256,)),
        "layers.0.attn.attn_sink": ("F32", (64,)),
        "embed.weight": ("BF16", (129280, 4096)),
        "head.weight": ("BF16", (129280, 4096)),
        "mtp.0.e_proj.scale": ("F8_E8M0", (32, 32)),
    }
    for name, (dt, shape) in want.items():
        assert (lay[name].dtype, lay[name].shape) == (dt, shape), name
    assert "layers.0.attn.compressor.wkv.weight" not in lay  # layer 0 is sliding-only in V4-Flash
    # parameter count without MTP: 284B, the published V4-Flash size (FP4 bytes hold 2 weights)
    n = sum(
        math.prod(s.shape) * (2 if s.role == layout.FP4 else 1)
        for s in lay.values()
        if not s.mtp and s.role not in (layout.FP8_SCALE, layout.FP4_SCALE)
    )
    assert round(n / 1e9) == 284


def test_layout_targets_are_the_model_names():
    """Every official tensor maps onto a tensor of parity's model (= transformers' DeepseekV4ForCausalLM
    names, plus ``model.mtp.N``) and agrees with the plain loader's renaming of official names."""
    from parity.model.deepseek_v4 import V4ForCausalLM

    cfg = load_preset("tiny")
    with torch.device("meta"):
        names = set(V4ForCausalLM(cfg).state_dict())
    lay = layout.official_layout(cfg)
    suffix = {
        layout.PLAIN: "",
        layout.FP8: ".weight",
        layout.FP8_SCALE: ".weight",
        layout.FP4: ".gate_up_proj",
        layout.FP4_SCALE: ".down_proj",
    }
    for spec in lay.values():
        assert spec.target + suffix[spec.role] in names, spec.name
        if spec.role in (layout.PLAIN, layout.FP8):
            assert canonical_name(spec.name) == spec.target + suffix[spec.role], spec.name
    covered = {s.target + suffix[s.role] for s in lay.values() if s.role in (layout.PLAIN, layout.FP8)}
    covered |= {s.target + p for s in lay.values() if s.role == layout.FP4 for p in (".gate_up_proj", ".down_proj")}
    assert names - covered == set()  # nothing the model holds is left out
    assert (
        layout.official_to_hf_name("layers.1.attn.indexer.compressor.ape", cfg)
        == "model.layers.1.self_attn.compressor.indexer.position_bias"
    )
    with pytest.raises(CheckpointError, match="not part"):
        layout.official_to_hf_name("layers.0.attn.bogus", cfg)


def test_canonical_names():
    assert canonical_name("head.weight") == "lm_head.weight"
    assert canonical_name("embed.weight") == "model.embed_tokens.weight"
    assert canonical_name("hc_head_fn") == "model.hc_head.hc_fn"
    assert (
        canonical_name("layers.3.attn.indexer.compressor.norm.weight")
        == "model.layers.3.self_attn.compressor.indexer.kv_norm.weight"
    )
    assert (
        canonical_name("model.layers.1.attn.indexer.weights_proj.weight")
        == "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"
    )
    assert canonical_name("layers.1.attn.compressor.ape") == "model.layers.1.self_attn.compressor.position_bias"
    assert canonical_name("layers.0.ffn.gate.bias") == "model.layers.0.mlp.gate.e_score_correction_bias"
    assert canonical_name("layers.0.ffn.shared_experts.w3.weight") == "model.layers.0.mlp.shared_experts.up_proj.weight"
    assert canonical_name("layers.0.hc_ffn_scale") == "model.layers.0.ffn_hc.scale"
    assert canonical_name("mtp.0.norm.weight") == "model.mtp.0.norm.weight"
    assert canonical_name("mtp.0.hc_head_base") == "model.mtp.0.hc_head.hc_base"
    assert canonical_name("mtp.0.attn.wq_a.weight") == "model.mtp.0.self_attn.q_a_proj.weight"
    # already canonical names pass through
    for k in (
        "model.layers.0.self_attn.kv_norm.weight",
        "model.layers.2.mlp.experts.gate_up_proj",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert canonical_name(k) == k


def test_routed_expert_names_map_to_per_expert_slots():
    """Per-expert official / original-format names map onto one pseudo-name per expert and part, which the
    float reader packs into ``gate_up_proj`` (w1, w3) / ``down_proj`` (w2)."""
    lay = layout.official_layout(load_preset("tiny"))
    for spec in lay.values():
        if spec.role == layout.FP4:
            e, part = spec.expert
            want = f"{spec.target}.{e}.{part}.weight"
            assert canonical_name(spec.name) == want and canonical_name("model." + spec.name) == want, spec.name


def test_model_package_does_not_import_checkpoint():
    """Layering: parity.checkpoint builds and fills parity.model's classes, never the other way round."""
    import subprocess
    import sys

    code = (
        "import pkgutil, importlib, sys, parity.model as m\n"
        "for i in pkgutil.iter_modules(m.__path__): importlib.import_module('parity.model.' + i.name)\n"
        "bad = sorted(k for k in sys.modules if k.startswith('parity.checkpoint'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
