"""ModelConfig: parsing of modern and legacy config.json forms, presets, round trip, errors."""

import json

import pytest

from parity.config import CSA, HCA, SLIDING, ModelConfig, load_config, load_preset
from parity.errors import ConfigError


def test_v4_flash_preset_values():
    c = load_preset("v4-flash")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == (4096, 43, 64, 512)
    assert (c.qk_rope_head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank) == (64, 1024, 8, 1024)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (256, 6, 1, 2048)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.sliding_window) == (64, 128, 512, 128)
    assert (c.hc_mult, c.hc_sinkhorn_iters, c.num_hash_layers, c.routed_scaling_factor) == (4, 20, 3, 1.5)
    assert c.compress_ratios == [0, 0] + [4, 128] * 20 + [4]
    assert c.vocab_size == 129280 and c.num_nextn_predict_layers == 1
    assert c.rope_params(SLIDING) == {"theta": 10000.0, "scaling": None}
    comp = c.rope_params(CSA)
    assert comp["theta"] == 160000.0 and comp["scaling"]["factor"] == 16
    assert comp["scaling"]["original_max_position_embeddings"] == 65536


def test_v4_pro_preset_values():
    c = load_preset("v4-pro")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (7168, 61, 128, 1536)
    assert (c.o_groups, c.n_routed_experts, c.moe_intermediate_size, c.index_topk) == (16, 384, 3072, 1024)
    assert c.routed_scaling_factor == 2.5
    assert c.compress_ratios == [128, 128] + [4, 128] * 29 + [4]


def test_tiny_has_every_layer_kind():
    c = load_preset("tiny")
    assert {SLIDING, CSA, HCA} <= set(c.layer_types)
    assert {"hash_moe", "moe"} <= set(c.mlp_layer_types)
    assert c.vocab_size == 129280 and c.num_nextn_predict_layers >= 1


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "tiny"])
def test_round_trip_and_transformers_accepts(name):
    transformers = pytest.importorskip("transformers")
    c = load_preset(name)
    d = c.to_dict()
    assert ModelConfig.from_dict(d).to_dict() == d
    assert ModelConfig.from_dict(c.to_legacy_dict()).to_dict() == d
    t = transformers.DeepseekV4Config(**d)
    assert t.layer_types == c.layer_types and t.mlp_layer_types == c.mlp_layer_types
    assert t.qk_rope_head_dim == c.qk_rope_head_dim
    assert t.rope_parameters["compress"]["rope_theta"] == c.compress_rope_theta


def test_legacy_small_ratios_and_unknown_keys_kept(tmp_path):
    d = load_preset("tiny").to_legacy_dict()
    d["compress_rate_hca"] = 16
    d["compress_ratios"] = [0, 4, 16, 4, 0]
    d["some_future_key"] = {"x": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = load_config(tmp_path)
    assert c.compress_ratios == [0, 4, 16, 4]
    assert c.layer_types == [SLIDING, CSA, HCA, CSA]
    assert c.to_dict()["some_future_key"] == {"x": 1}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"num_hidden_layers": "four"}, "num_hidden_layers"),
        ({"compress_ratios": [0, 4, 7, 4, 0]}, "compress_ratios[2]"),
        ({"o_groups": 3}, "o_groups"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"num_key_value_heads": 4}, "num_key_value_heads"),
        (
            {"rope_scaling": {"type": "yarn", "factor": -2, "original_max_position_embeddings": 10}},
            "rope_scaling.factor",
        ),
    ],
)
def test_bad_config_names_field(change, field):
    d = load_preset("tiny").to_legacy_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(d)


def test_missing_model_type_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ConfigError, match="did you mean v4-flash"):
        load_config("v4-flsh")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
