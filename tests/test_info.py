"""`parity info`: parameter counts (exact vs transformers), cache formula, CLI, no torch import."""

import json
import subprocess
import sys

import pytest

from parity.cli import main
from parity.config import load_preset
from parity.shapes import cache_size, count_params, index_key_bytes, vector_bytes


def test_v4_flash_total_is_284b_and_pro_about_1_6t():
    flash = count_params(load_preset("v4-flash"))
    assert abs(flash.total / 284e9 - 1) < 0.01
    assert flash.total_with_mtp > flash.total
    assert 12e9 < flash.activated_per_token < 14e9  # release notes: 13B activated
    pro = count_params(load_preset("v4-pro"))
    assert abs(pro.total / 1.6e12 - 1) < 0.03
    assert 47e9 < pro.activated_per_token < 51e9  # release notes: 49B activated


def test_count_matches_transformers_exactly():
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = load_preset("tiny").replace(
        vocab_size=512,
        hidden_size=64,
        moe_intermediate_size=32,
        q_lora_rank=32,
        o_lora_rank=16,
        index_head_dim=16,
        index_n_heads=2,
        head_dim=32,
        qk_rope_head_dim=8,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_dict()))
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total


def test_fp8_cache_bytes_follow_official_layout():
    # 448 non-RoPE e4m3 bytes + 7 UE8M0 scales + 64 bf16 RoPE dims
    assert vector_bytes(512, 64, "fp8") == 448 + 7 + 128
    assert vector_bytes(512, 64, "bf16") == 1024
    cfg = load_preset("v4-flash")
    bf16, fp8 = cache_size(cfg, "bf16"), cache_size(cfg, "fp8")
    # 21 CSA layers: (1024 + 256)/4 each; 20 HCA layers: 1024/128 each
    assert bf16.per_token_growth_bytes == pytest.approx(21 * 1280 / 4 + 20 * 1024 / 128)
    assert fp8.per_token_growth_bytes < 0.65 * bf16.per_token_growth_bytes
    n = 1 << 20
    assert bf16.total_bytes(n) == pytest.approx(bf16.fixed_bytes + n * bf16.per_token_growth_bytes, rel=1e-3)
    assert bf16.total_bytes(0) == sum(lay["state_bytes"] for lay in bf16.layers)


def test_fp8_cache_stores_indexer_keys_as_fp4():
    # fp8 mode = the official numerics: indexer keys packed as FP4 e2m1 (64 bytes) + 4 UE8M0 scales,
    # as the engine's cache layout stores them (parity.model.numerics.IndexCodec)
    assert index_key_bytes(128, "fp8") == 64 + 4 and index_key_bytes(128, "bf16") == 256
    fp8 = cache_size(load_preset("v4-flash"), "fp8")
    assert fp8.per_token_growth_bytes == pytest.approx(21 * (583 + 68) / 4 + 20 * 583 / 128)


def test_info_cli_json_and_errors(capsys):
    assert main(["info", "v4-flash", "--context", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == count_params(load_preset("v4-flash")).total
    assert out["kv_cache"]["fp8"]["total_bytes_at_context"] < out["kv_cache"]["bf16"]["total_bytes_at_context"]
    assert len(out["schedule"]) == 44
    assert main(["info", "v4-flsh"]) == 2
    assert "did you mean v4-flash" in capsys.readouterr().err
    assert main(["info", "tiny", "--context", "-1"]) == 2
    assert "--context" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_package_does_not_import_torch():
    code = (
        "import sys, argparse, parity.plan, parity.shapes, parity.plan.info_cli, parity.plan.plan_cli, "
        "parity.plan.serving_model, parity.plan.validate, parity.plan.search, parity.plan.report\n"
        "parity.plan.info_cli.run(argparse.Namespace(model='v4-pro', context=4096, json=True))\n"
        "from parity.plan.search import plan, Workload\n"
        "assert plan('v4-flash', 'h800', Workload(isl=1024, osl=256))['feasible']\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_info_reads_a_checkpoint_directory(tmp_path, capsys):
    cfg = load_preset("tiny")
    cfg.save(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == count_params(cfg).total
    assert main(["info", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["-tp", "3", "--hardware", "910c"], "num_attention_heads"),
        (["-tp", "0", "--hardware", "910c"], "tensor_parallel_size must be a positive integer"),
        (["--hardware", "nonsense"], "unknown hardware 'nonsense'"),
    ],
)
def test_info_checks_layout_flags_before_printing_the_report(capsys, flags, needle):
    assert main(["info", "v4-flash", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing of the report before the error
    assert needle in err and len(err.strip().splitlines()) == 1


def test_info_context_is_bounded_by_the_model_and_the_cache_wording_is_consistent(capsys):
    assert main(["info", "v4-flash", "--context", "99999999999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1,048,576 tokens (max_position_embeddings)" in err[0], err
    assert main(["info", "v4-flash", "--context", "1048576", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_tokens"] == 1048576
    assert main(["info", "v4-flash", "--context", "0"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cache bf16"))
    # the bounded part is reached once the windows fill, so it may exceed the total at 0 tokens
    assert "fixed" not in line and "once the 128-token sliding windows are full" in line, line
    assert "per sequence at 0 tokens" in line


def test_info_default_context_is_capped_at_the_model_limit(tmp_path, capsys):
    cfg = load_preset("tiny")
    cfg.max_position_embeddings = 4096
    cfg.save(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_tokens"] == 4096
