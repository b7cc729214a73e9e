"""Measured bench results in the planner: `parity validate --measured` and `parity plan --calibrate`, on
synthetic measurements generated from known constants (the fit must recover them)."""

import json

import pytest

from parity.errors import PlanError
from parity.plan.calibrate import calibrate
from parity.plan.estimate import Setup
from parity.plan.hardware import family_of, get_hardware
from parity.plan.measured import MeasuredPoint, compare, load_measured, plan_preset, predict_point

TRUE = {"gemm_eff": 0.42, "attn_eff": 0.33, "hbm_eff": 0.66, "link_eff": 0.45}
POINTS = [(8, 1024, 1024, 8), (8, 1024, 1024, 256), (8, 8192, 1024, 64), (16, 32768, 256, 32),
          (32, 2048, 512, 2048), (8, 131072, 128, 8)]


def _synthetic_result(hw, n, isl, osl, conc, consts):
    """A bench result whose steady-state figures are the planner's prediction under `consts`."""
    s = Setup(model="v4-flash", hardware=hw, phase="serving", isl=isl, osl=osl, tp=1, dp=n, concurrency=float(conc))
    f = predict_point(MeasuredPoint(id="x", file="", setup=s), consts)
    return {"schema": "parity.bench.result", "version": 1,
            "config": {"max_concurrency": conc, "workload": f"fixed:in={isl},out={osl}"},
            "metadata": {"model": "deepseek-ai/DeepSeek-V4-Flash", "hardware": {"id": hw}, "num_devices": n},
            "summary": {"output_throughput_tok_s": 0.0, "tpot_ms": {"median": None}, "ttft_ms": {"median": None}},
            "steady_state": {"duration_s": 60.0, "mean_concurrency": float(conc),
                             "output_tok_s_per_device": f["output_tok_s_per_device"],
                             "tpot_ms_median": f["tpot_ms"], "ttft_ms_median": f["ttft_ms"]},
            "requests": [{"ok": True, "prompt_tokens": isl, "output_tokens": osl}]}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("measured")
    for i, (n, isl, osl, conc) in enumerate(POINTS):
        (d / f"p{i}.json").write_text(json.dumps(_synthetic_result("910c", n, isl, osl, conc, TRUE)))
    (d / "sweep.json").write_text("{}")  # a sweep index is skipped
    return d


def test_plan_preset_from_served_name():
    assert plan_preset("deepseek-ai/DeepSeek-V4-Flash") == "v4-flash"
    assert plan_preset("DeepSeek-V4-Pro-W4A8") == "v4-pro"
    assert plan_preset("llama") is None


def test_validate_measured_errors_per_point(results_dir):
    pts = load_measured([results_dir])
    assert len(pts) == len(POINTS) and pts[0].setup.dp == 8 and pts[0].basis == "steady state"
    rows = compare(pts, TRUE)  # predicted with the generating constants: zero error
    assert len(rows) == 3 * len(POINTS) and all(abs(r["error"]) < 1e-9 for r in rows)
    shipped = compare(pts)  # the shipped ascend constants differ from TRUE: nonzero errors
    assert max(abs(r["error"]) for r in shipped) > 0.05


def test_calibrate_recovers_known_constants(results_dir):
    cal = calibrate([str(results_dir)], "910c")
    c, shipped = cal["constants"], family_of(get_hardware("910c")).as_dict()
    for k in ("gemm_eff", "attn_eff", "hbm_eff"):
        assert cal["determined"][k] and c[k] == pytest.approx(TRUE[k], rel=0.01), k
    # communication hidden behind compute (two micro-batches) in every point: link_eff stays the shipped value
    assert not cal["determined"]["link_eff"] and c["link_eff"] == pytest.approx(shipped["link_eff"], rel=0.01)
    assert cal["rms_log_error"] < 1e-3 and cal["label"].startswith(f"calibrated:{results_dir}")


def test_measured_errors(tmp_path):
    r = _synthetic_result("910c", 8, 1024, 128, 8, TRUE)
    del r["metadata"]["hardware"]
    (tmp_path / "a.json").write_text(json.dumps(r))
    with pytest.raises(PlanError, match="declares no hardware"):
        load_measured([tmp_path])
    with pytest.raises(PlanError, match="does not exist"):
        load_measured([tmp_path / "nope"])
    d2 = tmp_path / "h"
    d2.mkdir()
    (d2 / "b.json").write_text(json.dumps(_synthetic_result("h200", 8, 1024, 128, 8, TRUE)))
    with pytest.raises(PlanError, match="no result measured on a ascend chip"):
        calibrate([str(d2)], "910c")


def test_cli_validate_measured_and_plan_calibrate(results_dir, capsys):
    from parity.cli import main

    assert main(["validate", "--measured", str(results_dir)]) == 0
    out = capsys.readouterr().out
    assert "p0" in out and "output_tok_s_per_device" in out and "mean |error|" in out
    rc = main(["plan", "--hardware", "910c", "--isl", "1024", "--osl", "1024", "--calibrate", str(results_dir),
               "--json"])
    assert rc in (0, 1)
    r = json.loads(capsys.readouterr().out)
    assert r["provenance"].startswith("calibrated:") and r["calibration"]["family"] == "ascend"
