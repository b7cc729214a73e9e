"""parity plan train: step-model physics, validation against published training runs (pinned), layout
search, CLI (text, JSON, compare plot, validate --train) and bad input -> one clear line, exit 2."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from parity.cli import main
from parity.errors import PlanError
from parity.plan.hardware import get_hardware
from parity.plan.train_model import TrainLayout, memory, step
from parity.plan.train_search import parse_tokens, plan_train
from parity.plan.train_shape import load_shape
from parity.plan.train_validate import report, runs

CONSTS = {"gemm_eff": 0.6, "link_eff": 0.6}


@pytest.fixture(scope="module")
def rep():
    return report()


# ------------------------------------------------------------------------------------------------ data
def test_published_runs_cover_both_vendors_with_sources():
    rs, sources = runs()
    vendors = {}
    for r in rs:
        vendors.setdefault(get_hardware(r.hardware).vendor, set()).add(r.source_id)
    assert len(vendors["nvidia"]) >= 2 and len(vendors["huawei"]) >= 2
    for s in sources.values():
        assert s["url"].startswith("https://") and s["where"].strip() and s["verified"].strip()
    dsv3 = next(r for r in rs if r.id == "dsv3-h800-pretrain")
    assert dsv3.layout.pp == 16 and dsv3.layout.ep == 64 and dsv3.layout.n_devices == 2048
    assert dsv3.layout.schedule == "dualpipe" and dsv3.layout.fp8 and dsv3.layout.zero == 1
    assert dsv3.value == pytest.approx(1e12 / (180_000 * 3600))
    assert 14.8e12 / (dsv3.value * 3600) == pytest.approx(2.664e6, rel=1e-3)  # the report's 2.664M GPU-hours


def test_validation_errors_are_pinned(rep):
    assert rep["mape"] <= 0.15
    assert rep["loo_mape"] <= 0.25
    assert rep["max_abs_error"] <= 0.20
    assert rep["loo_max_abs_error"] <= 0.26
    for fam in ("nvidia-hopper", "ascend"):
        assert rep["families"][fam]["mape"] <= 0.15 and rep["families"][fam]["loo_mape"] <= 0.25
        for k in ("gemm_eff", "link_eff"):
            assert 0 < rep["constants"][fam][k] <= 1


# ------------------------------------------------------------------------------------------------ physics
def test_flops_convention_and_mfu():
    s = load_shape("deepseek-v3")
    f = s.model_flops_per_token(4096)
    assert f["matmul"] == pytest.approx(6 * s.activated_params)
    assert 37e9 < s.activated_params < 40e9 and 670e9 < s.total_params < 700e9  # 37B + MTP, 671B + MTP
    assert s.model_flops_per_token(8192)["attention"] == pytest.approx(2 * f["attention"])
    hw = get_hardware("h800")
    r = step(s, hw, TrainLayout(n_devices=2048, pp=16, ep=64, schedule="dualpipe", fp8=True), 4096, 6.3e7, CONSTS)
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_chip"] * f["total"] / hw.peak("fp8"))
    assert r["mfu_bf16"] == pytest.approx(2 * r["mfu"], rel=1e-3)


def test_step_model_physics():
    s, hw = load_shape("v4-flash"), get_hardware("h800")
    base = TrainLayout(n_devices=1024, pp=8, ep=16, schedule="1f1b")
    r = step(s, hw, base, 4096, 6.7e7, CONSTS)
    # fewer micro-batches -> larger bubble; interleaving and DualPipe shrink it
    small = step(s, hw, base, 4096, 4.2e6, CONSTS)
    assert small["terms"]["bubble"] / small["terms"]["compute"] > r["terms"]["bubble"] / r["terms"]["compute"]
    inter = step(s, hw, replace(base, schedule="interleaved", vpp=2), 4096, 6.7e7, CONSTS)
    assert inter["terms"]["bubble"] < r["terms"]["bubble"]
    # full recompute costs compute but saves activation memory; ZeRO-3 shards weights
    full = replace(base, recompute="full")
    m = r["micro_batches"]
    assert step(s, hw, full, 4096, 6.7e7, CONSTS)["terms"]["compute"] > r["terms"]["compute"]
    assert memory(s, full, 4096, m)["activations"] < memory(s, base, 4096, m)["activations"]
    assert memory(s, replace(base, zero=3), 4096, m)["weights"] < memory(s, base, 4096, m)["weights"]
    # DualPipe hides EP traffic behind compute, 1F1B exposes it
    dual = step(s, hw, replace(base, schedule="dualpipe"), 4096, 6.7e7, CONSTS)
    assert dual["ep_overlapped"] and not r["ep_overlapped"]
    # more link efficiency never slows a step; FP8 GEMMs are faster on a chip with FP8
    assert step(s, hw, base, 4096, 6.7e7, {**CONSTS, "link_eff": 0.9})["step_s"] <= r["step_s"]
    assert step(s, hw, replace(base, fp8=True), 4096, 6.7e7, CONSTS)["terms"]["compute"] < r["terms"]["compute"]
    with pytest.raises(PlanError, match="EP3"):
        TrainLayout(n_devices=1024, pp=8, ep=3).validate(s)


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("hw", ["910c", "h800"])
def test_plan_train_fields_and_provenance(hw):
    r = plan_train("v4-flash", hw, 8192, "33T", 4096)
    assert r["tokens_per_s_per_chip"] > 0 and 0 < r["mfu"] < 1
    assert r["days"] == pytest.approx(33e12 / r["tokens_per_s_cluster"] / 86400)
    assert r["chip_hours"] == pytest.approx(8192 * r["days"] * 24)
    assert r["memory_gb_per_chip"] <= 0.9 * get_hardware(hw).hbm_gb
    assert r["provenance"].startswith("modeled:parity-train-1 (+-") and "LOO over" in r["provenance"]
    assert r["energy_mwh"] > 0
    assert (r["usd"] is None) == (get_hardware(hw).usd_per_hour is None)


def test_parse_tokens():
    assert parse_tokens("33T") == 33e12 and parse_tokens("14.8t") == pytest.approx(14.8e12)
    assert parse_tokens("500B") == 5e11 and parse_tokens("2e12") == 2e12
    for bad in ("0", "-1T", "lots"):
        with pytest.raises(PlanError, match="--tokens"):
            parse_tokens(bad)


def test_too_small_cluster_names_the_minimum_and_memory():
    with pytest.raises(PlanError) as e:
        plan_train("v4-pro", "h800", 16, "1T")
    msg = str(e.value)
    assert "needs at least" in msg and "chips" in msg and "memory" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_plan_train_text_json(capsys):
    assert (
        main(
            [
                "plan",
                "train",
                "--model",
                "v4-flash",
                "--hardware",
                "910c",
                "--num-devices",
                "8192",
                "--tokens",
                "33T",
                "--seq-len",
                "4096",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for k in (
        "tokens/s per chip",
        "MFU",
        "days to train",
        "chip-hours",
        "energy",
        "cost",
        "limiting resource",
        "modeled:parity-train-1",
    ):
        assert k in out
    assert main(["plan", "train", "--hardware", "h800", "--num-devices", "2048", "--tokens", "14.8T", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["usd"] == pytest.approx(r["chip_hours"] * 2.0)


def test_cli_compare_train_and_validate(tmp_path, capsys):
    png = tmp_path / "train.png"
    assert main(["compare", "train", "--hardware", "910b3,910c,h800,h100,b200", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert all(h in out for h in ("910b3", "910c", "h800", "h100", "b200")) and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["validate", "--train"]) == 0
    out = capsys.readouterr().out
    assert "leave-one-out MAPE" in out and "deepseek-v3-2024" in out and "pangu-ultra-moe-2025" in out
    assert main(["validate", "--train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loo_mape"] <= 0.25


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "train", "--hardware", "h9000"], "unknown hardware"),
        (["plan", "train", "--hardware", "h800", "--num-devices", "8"], "needs at least"),
        (["plan", "train", "--hardware", "h800", "--tokens", "0"], "--tokens"),
        (["plan", "train", "--hardware", "h800", "--num-devices", "0"], "--num-devices"),
        (["compare", "train", "--hardware", "h800", "--out", "x.html"], ".png"),
        (["plan", "train", "--hardware", "910c", "--pue", "nan"], "--pue must be a finite number >= 1"),
        (["compare", "train", "--hardware", "910c", "--pue", "inf"], "--pue must be a finite number >= 1"),
        (
            ["plan", "train", "--hardware", "910c", "--num-devices", "99999999999999"],
            "the cluster is too large for the global batch (each data-parallel replica needs at least one "
            "micro-batch of "
            "4,096 tokens",
        ),
    ],
)
def test_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("parity ")


def test_plan_train_is_torch_free():
    code = (
        "import sys; from parity.plan.train_search import plan_train; plan_train('v4-flash', '910c', 8192, '33T');"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
