"""Loading float checkpoints (transformers-saved, official names): sharded layouts, both naming schemes,
MTP weights optional, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_helpers import save_hf

from parity.checkpoint.reader import from_pretrained
from parity.errors import CheckpointError, ConfigError, RequestError


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint(hf_small, tmp_path, one_thread):
    _, hf = hf_small
    d = save_hf(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert (Path(d) / "model.safetensors.index.json").is_file()
    assert len(list(Path(d).glob("*.safetensors"))) > 2
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (from_pretrained(d).forward_logits(ids) - ref).abs().max().item() <= 1e-4


def _rewrite(d: Path, fn) -> None:
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def test_missing_tensors(hf_small, tmp_path):
    d = _copy(hf_small[0], tmp_path / "ck")

    def drop(sd):
        del sd["model.layers.1.attn.wq_a.weight"]
        del sd["model.layers.2.ffn.experts.3.w2.weight"]

    _rewrite(d, drop)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d)
    msg = str(e.value)
    assert "2 missing tensors" in msg
    assert "model.layers.1.self_attn.q_a_proj.weight" in msg and "down_proj (expert 3:w2)" in msg


def test_unexpected_tensors(hf_small, tmp_path):
    d = _copy(hf_small[0], tmp_path / "ck")
    _rewrite(
        d,
        lambda sd: sd.update(
            {"model.layers.0.attn.bogus.weight": torch.zeros(2), "model.layers.9.attn.wq_a.weight": torch.zeros(2)}
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"2 unexpected tensors: model.layers.0.attn.bogus.weight, "
        r"model.layers.9.attn.wq_a.weight",
    ):
        from_pretrained(d)


def test_wrong_shape(hf_small, tmp_path):
    d = _copy(hf_small[0], tmp_path / "ck")
    _rewrite(d, lambda sd: sd.update({"model.layers.0.attn.wkv.weight": torch.zeros(32, 31)}))
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.attn.wkv.weight' has shape \[32, 31\]: "
        r"expected \[32, 32\]",
    ):
        from_pretrained(d)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        from_pretrained(tmp_path / "cfgonly")


def _official_mtp_tensors(model) -> dict[str, torch.Tensor]:
    """The MTP weights of `model` under the official release names (``mtp.0.attn.wq_a.weight`` ...)."""
    inv = {
        "self_attn": "attn",
        "mlp": "ffn",
        "q_a_proj": "wq_a",
        "q_b_proj": "wq_b",
        "kv_proj": "wkv",
        "gate_proj": "wgate",
        "o_a_proj": "wo_a",
        "o_b_proj": "wo_b",
        "q_a_norm": "q_norm",
        "sinks": "attn_sink",
        "position_bias": "ape",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = {}
    inter = model.config.moe_intermediate_size
    for k, v in model.state_dict().items():
        if not k.startswith("model.mtp."):
            continue
        k = k[len("model.") :]
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")].replace("mlp", "ffn")
            for e in range(v.shape[0]):
                out[f"{base}{e}.w1.weight"] = v[e, :inter].clone()
                out[f"{base}{e}.w3.weight"] = v[e, inter:].clone()
            continue
        if k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")].replace("mlp", "ffn")
            for e in range(v.shape[0]):
                out[f"{base}{e}.w2.weight"] = v[e].clone()
            continue
        k = k.replace("attn_hc.", "hc_attn_").replace("ffn_hc.", "hc_ffn_").replace("hc_head.hc_", "hc_head_")
        k = k.replace("shared_experts.gate_proj", "shared_experts.w1").replace(
            "shared_experts.up_proj", "shared_experts.w3"
        )
        k = k.replace("shared_experts.down_proj", "shared_experts.w2").replace("e_score_correction_bias", "bias")
        k = k.replace("indexer.scorer.weights_proj", "indexer.weights_proj")
        k = k.replace("compressor.indexer.q_b_proj", "indexer.wq_b")
        k = k.replace("compressor.indexer.", "indexer.compressor.")
        k = ".".join(inv.get(p, p) for p in k.split("."))
        out[k] = v.clone()
    return out


def test_mtp_optional_and_loaded(hf_small, tmp_path, one_thread):
    from parity.model import build_model

    d = Path(hf_small[0])
    # transformers never saves MTP: the loaded model has none and says so clearly
    m = from_pretrained(d)
    assert len(m.model.mtp) == 0
    with pytest.raises(RequestError, match="has 0 MTP layers"):
        m.mtp_logits(torch.zeros(1, 2, 4, 32), torch.zeros(1, 2, dtype=torch.long))
    # add official-named MTP weights in an extra shard (+ index)
    ref = build_model(m.config, seed=7)
    ck = _copy(str(d), tmp_path / "withmtp")
    mtp = _official_mtp_tensors(ref)
    assert "mtp.0.attn.wq_a.weight" in mtp and "mtp.0.e_proj.weight" in mtp and "mtp.0.hc_head_fn" in mtp
    save_file(mtp, str(ck / "mtp.safetensors"))
    from safetensors import safe_open

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        wm = {k: "model.safetensors" for k in f.keys()}
    wm.update({k: "mtp.safetensors" for k in mtp})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    m2 = from_pretrained(ck)
    assert len(m2.model.mtp) == 1
    sd2, sdr = m2.state_dict(), ref.state_dict()
    for k in sdr:
        if k.startswith("model.mtp."):
            assert torch.equal(sd2[k], sdr[k]), k
    # MTP forward (official MTPBlock): shapes, causality (position t ignores later tokens)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    logits, hidden = m2.forward_logits(ids, return_hidden=True)
    assert hidden.shape == (1, 20, 4, 32)
    nxt = torch.roll(ids, -1, dims=1)
    out = m2.mtp_logits(hidden, nxt)
    assert out.shape == (1, 20, 64) and torch.isfinite(out).all()
    out_short = m2.mtp_logits(hidden[:, :12], nxt[:, :12])
    assert (out_short - out[:, :12]).abs().max().item() <= 1e-5
    # a partial MTP set is an error, not silently dropped
    mtp.pop("mtp.0.e_proj.weight")
    save_file(mtp, str(ck / "mtp.safetensors"))
    wm.pop("mtp.0.e_proj.weight")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"1 missing tensors: model.mtp.0.e_proj.weight"):
        from_pretrained(ck)


def test_corrupt_and_missing_shards(hf_small, tmp_path):
    d = _copy(hf_small[0], tmp_path / "bad")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no \\*.safetensors file"):
        from_pretrained(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard 'gone.safetensors' .* does not exist"):
        from_pretrained(d)
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable index"):
        from_pretrained(d)


def test_mtp_matches_transformers_block_oracle(hf_small, one_thread):
    """MTP = official MTPBlock. Oracle: a 1-layer transformers model whose layer, hc_head and norm hold the
    MTP weights, fed (through a pre-hook) x = e_proj(enorm(embed(t+1))) + h_proj(hnorm(h_t)) computed here
    with plain torch ops."""
    from test_model_helpers import make_hf_model

    from parity.config import load_config
    from parity.model import build_model

    cfg = load_config(hf_small[0]).replace(mtp_compress_ratios=[4])
    model = build_model(cfg, seed=3)
    mtp = model.model.mtp[0]
    assert mtp.layer_type == "compressed_sparse_attention"
    oracle = make_hf_model(0, num_hidden_layers=1, layer_types=["compressed_sparse_attention"], mlp_layer_types=["moe"])
    sd = {}
    for k, v in mtp.state_dict().items():
        if k.startswith("hc_head."):
            sd["model." + k] = v
        elif k == "norm.weight":
            sd["model.norm.weight"] = v
        elif k.split(".")[0] not in ("e_proj", "h_proj", "enorm", "hnorm"):
            sd["model.layers.0." + k] = v
    sd["lm_head.weight"] = model.lm_head.weight
    sd["model.embed_tokens.weight"] = model.model.embed_tokens.weight
    missing, unexpected = oracle.load_state_dict(sd, strict=False)
    assert not unexpected and not missing

    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(8))
    _, hidden = model.forward_logits(ids, return_hidden=True)
    nxt = torch.roll(ids, -1, dims=1)
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    e = rms(model.model.embed_tokens.weight[nxt], mtp.enorm.weight)
    x = (e @ mtp.e_proj.weight.T)[:, :, None] + rms(hidden, mtp.hnorm.weight) @ mtp.h_proj.weight.T
    oracle.model.layers[0].register_forward_pre_hook(lambda mod, args: (x.detach(),) + tuple(args[1:]))
    with torch.no_grad():
        ref = oracle(input_ids=nxt).logits
    out = model.mtp_logits(hidden, nxt)
    assert (out - ref).abs().max().item() <= 1e-4
