"""Measured bench results in the planner: `parity validate --measured` and `parity plan --calibrate`, on
synthetic measurements generated from known constants (the fit must recover the constants the data determine
and report the others as not determined)."""

import json

import pytest

from parity.errors import PlanError
from parity.plan.calibrate import calibrate
from parity.plan.estimate import Setup, build
from parity.plan.hardware import family_of, get_hardware
from parity.plan.measured import MeasuredPoint, compare, load_measured, plan_preset, predict_point

TRUE = {"gemm_eff": 0.42, "attn_eff": 0.33, "hbm_eff": 0.66, "link_eff": 0.45}
#: (devices, ISL, OSL, concurrency) per chip. On 910c every prefill chunk (2,048 tokens, ascend-graph) is
#: host-bound, so gemm_eff shows only in decode at large batches (the last three points: 256-512 sequences per
#: device) and attn_eff nowhere. On H200 the 8,192-token chunks of long prompts are device-bound.
POINTS = {
    "910c": [
        (8, 1024, 1024, 8),
        (8, 1024, 1024, 256),
        (8, 8192, 1024, 64),
        (16, 32768, 256, 32),
        (8, 131072, 128, 8),
        (8, 2048, 2048, 2048),
        (16, 1024, 1024, 4096),
        (8, 512, 4096, 4096),
    ],
    "h200": [
        (8, 1024, 1024, 8),
        (8, 8192, 1024, 64),
        (16, 32768, 256, 32),
        (8, 131072, 128, 8),
        (8, 8192, 64, 512),
        (8, 2048, 2048, 2048),
    ],
}
SMALL_BATCH_910C = POINTS["910c"][:5]


def _setup(hw, n, isl, osl, conc):
    return Setup(model="v4-flash", hardware=hw, phase="serving", isl=isl, osl=osl, tp=1, dp=n, concurrency=float(conc))


def _synthetic_result(hw, n, isl, osl, conc, consts):
    """A bench result whose steady-state figures are the planner's prediction under `consts`."""
    f = predict_point(MeasuredPoint(id="x", file="", setup=_setup(hw, n, isl, osl, conc)), consts)
    return {
        "schema": "parity.bench.result",
        "version": 1,
        "config": {"max_concurrency": conc, "workload": f"fixed:in={isl},out={osl}"},
        "metadata": {"model": "deepseek-ai/DeepSeek-V4-Flash", "hardware": {"id": hw}, "num_devices": n},
        "summary": {"output_throughput_tok_s": 0.0, "tpot_ms": {"median": None}, "ttft_ms": {"median": None}},
        "steady_state": {
            "duration_s": 60.0,
            "mean_concurrency": float(conc),
            "output_tok_s_per_device": f["output_tok_s_per_device"],
            "tpot_ms_median": f["tpot_ms"],
            "ttft_ms_median": f["ttft_ms"],
        },
        "requests": [{"ok": True, "prompt_tokens": isl, "output_tokens": osl}],
    }


def _write(d, hw, points):
    for i, p in enumerate(points):
        (d / f"p{i}.json").write_text(json.dumps(_synthetic_result(hw, *p, TRUE)))
    (d / "sweep.json").write_text("{}")  # a sweep index is skipped
    return d


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("measured"), "910c", POINTS["910c"])


def test_plan_preset_from_served_name():
    assert plan_preset("deepseek-ai/DeepSeek-V4-Flash") == "v4-flash"
    assert plan_preset("DeepSeek-V4-Pro-W4A8") == "v4-pro"
    assert plan_preset("llama") is None


def test_validate_measured_errors_per_point(results_dir):
    pts = load_measured([results_dir])
    assert len(pts) == len(POINTS["910c"]) and pts[0].setup.dp == 8 and pts[0].basis == "steady state"
    rows = compare(pts, TRUE)  # predicted with the generating constants: zero error
    assert len(rows) == 3 * len(pts) and all(abs(r["error"]) < 1e-9 for r in rows)
    shipped = compare(pts)  # the shipped ascend constants differ from TRUE: nonzero errors
    assert max(abs(r["error"]) for r in shipped) > 0.05


def test_calibrate_recovers_known_constants(tmp_path):
    d = _write(tmp_path, "h200", POINTS["h200"])
    cal = calibrate([str(d)], "h200")
    c, shipped = cal["constants"], family_of(get_hardware("h200")).as_dict()
    for k in ("gemm_eff", "attn_eff", "hbm_eff"):
        assert cal["determined"][k] and c[k] == pytest.approx(TRUE[k], rel=0.01), k
    # communication hidden behind compute (two micro-batches) in every point: link_eff stays the shipped value
    assert not cal["determined"]["link_eff"] and c["link_eff"] == pytest.approx(shipped["link_eff"], rel=1e-9)
    assert cal["rms_log_error"] < 1e-3 and cal["label"].startswith(f"calibrated:{d}")


def test_ascend_prefill_chunks_are_host_bound():
    # a 2,048-token chunk fused with the decode batch takes max(host, device): the host's eager launch wins
    for p in POINTS["910c"]:
        mixed = build(_setup("910c", *p)).terms["mixed"].combine(TRUE)
        assert mixed["compute_s"] < mixed["host_s"] and mixed["step_s"] == pytest.approx(
            mixed["host_s"] + mixed["fixed_s"]
        ), p


def test_calibrate_ascend_reports_undetermined_constants(results_dir):
    cal = calibrate([str(results_dir)], "910c")
    c, shipped = cal["constants"], family_of(get_hardware("910c")).as_dict()
    for k in ("gemm_eff", "hbm_eff"):
        # attn_eff cannot move the data, so its offset from TRUE leaks into these by ~1%
        assert cal["determined"][k] and c[k] == pytest.approx(TRUE[k], rel=0.02), k
    for k in ("attn_eff", "link_eff"):
        assert not cal["determined"][k] and c[k] == pytest.approx(shipped[k], rel=1e-9), k
    assert cal["rms_log_error"] < 1e-3


def test_calibrate_small_batches_leave_gemm_undetermined(tmp_path):
    # below ~256 sequences per device a 910c decode step is bound by HBM, and every prefill chunk by the host
    cal = calibrate([str(_write(tmp_path, "910c", SMALL_BATCH_910C))], "910c")
    shipped = family_of(get_hardware("910c")).as_dict()
    assert cal["determined"]["hbm_eff"] and cal["constants"]["hbm_eff"] == pytest.approx(TRUE["hbm_eff"], rel=0.02)
    for k in ("gemm_eff", "attn_eff", "link_eff"):
        assert not cal["determined"][k] and cal["constants"][k] == pytest.approx(shipped[k], rel=1e-9), k


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
    rc = main(
        ["plan", "--hardware", "910c", "--isl", "1024", "--osl", "1024", "--calibrate", str(results_dir), "--json"]
    )
    assert rc in (0, 1)
    r = json.loads(capsys.readouterr().out)
    assert r["provenance"].startswith("calibrated:") and r["calibration"]["family"] == "ascend"


@pytest.mark.parametrize("tp, needle", [("0", "--measured-tp must be a positive integer"), ("3", "--measured-tp 3")])
def test_validate_measured_tp_errors_name_the_flag(results_dir, capsys, tp, needle):
    from parity.cli import main

    assert main(["validate", "--measured", str(results_dir), "--model", "v4-flash", "--measured-tp", tp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_plan_refuses_a_measured_tp_below_one_without_calibrate_too(capsys):
    from parity.cli import main

    assert main(["plan", "--hardware", "910c", "--measured-tp", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--measured-tp must be a positive integer" in err[0], err


def test_compare_help_names_no_calibrate_flag(capsys):
    from parity.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--calibrate" not in capsys.readouterr().out


def test_plan_calibrate_model_names_the_preset_of_results_that_record_none(tmp_path, capsys):
    from parity.cli import main

    for i, p in enumerate(SMALL_BATCH_910C):
        r = _synthetic_result("910c", *p, TRUE)
        r["metadata"]["model"] = "my-finetune"  # a served name that is no planner preset
        (tmp_path / f"p{i}.json").write_text(json.dumps(r))
    base = ["plan", "--hardware", "910c", "--isl", "1024", "--osl", "1024", "--calibrate", str(tmp_path), "--json"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "pass --model v4-flash|v4-pro" in err and "--plan-model" in err
    assert main([*base, "--model", "v4-flash"]) in (0, 1)  # the hint works
    r = json.loads(capsys.readouterr().out)
    assert r["calibration"]["points"] and r["provenance"].startswith("calibrated:")


def _result_file(d, served, plan_model=None, name="h.json"):
    r = _synthetic_result("h200", *POINTS["h200"][0], TRUE)
    r["metadata"].update(model=served, plan_model=plan_model)
    (d / name).write_text(json.dumps(r))
    return d / name


@pytest.mark.parametrize(
    "served, plan_model, model",
    [("tiny", "v4-flash", None), ("tiny", None, "v4-flash"), ("deepseek-ai/DeepSeek-V4-Pro", "v4-flash", None)],
)
def test_results_of_another_served_model_are_refused(tmp_path, capsys, served, plan_model, model):
    from parity.cli import main

    _result_file(tmp_path, served, plan_model)
    with pytest.raises(PlanError, match=r"result h\.json: served model .* not the planner model 'v4-flash'"):
        load_measured([tmp_path], model=model)
    extra = ["--model", model] if model else []
    for cmd in (
        ["validate", "--measured", str(tmp_path)],
        ["plan", "--hardware", "h200", "--calibrate", str(tmp_path)],
    ):
        assert main([*cmd, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "h.json" in err[0] and repr(served) in err[0] and "'v4-flash'" in err[0], err


def test_unknown_served_name_is_taken_as_the_plan_model(tmp_path):
    _result_file(tmp_path, "my-finetune", "v4-flash")
    (pt,) = load_measured([tmp_path])
    assert pt.setup.model == "v4-flash"


def test_calibration_that_determines_nothing_is_not_labelled_calibrated(tmp_path, capsys):
    from parity.cli import main

    r = _synthetic_result("h200", 1, 1024, 16, 1, TRUE)  # prefill of 1,024 tokens: TTFT moves no constant
    ttft = r["steady_state"]["ttft_ms_median"]
    r["steady_state"] = {"duration_s": 0}
    r["summary"]["ttft_ms"]["median"] = ttft
    (tmp_path / "one.json").write_text(json.dumps(r))
    cal = calibrate([str(tmp_path)], "h200")
    assert not any(cal["determined"].values()) and cal["label"] is None
    assert cal["constants"] == family_of(get_hardware("h200")).as_dict()
    base = ["plan", "--hardware", "h200", "--isl", "1024", "--osl", "1024", "--calibrate", str(tmp_path)]
    assert main([*base, "--json"]) in (0, 1)
    r = json.loads(capsys.readouterr().out)
    assert r["provenance"].startswith("modeled:") and "calibrated" not in json.dumps(r["provenance_by_figure"])
    assert main(base) in (0, 1)
    out = capsys.readouterr().out
    assert "calibrated:" not in out and "determined no constant" in out
