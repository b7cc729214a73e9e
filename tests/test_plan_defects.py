"""parity.plan: one test per known planner defect (colocated MTP prefill work, attention-TP cache memory,
colocated TTFT, TP-cut TTFT, compare labelling and aliases, per-stack latency floor)."""

import pytest

from parity.cli import main
from parity.errors import PlanError
from parity.plan import serving_model as M
from parity.plan.arch import load_arch
from parity.plan.hardware import catalog, family_of, get_hardware
from parity.plan.search import Workload, plan

W = Workload(isl=4096, osl=1024, slo_ttft_ms=2000, slo_tpot_ms=50)


def _best_prefill_rate(model, hw_id):
    """Highest input tok/s per device any prefill deployment reaches (the ceiling of prefill work)."""
    arch, hw = load_arch(model), get_hardware(hw_id)
    c = family_of(hw).as_dict()
    best = 0.0
    for tp in (1, 2, 4, 8):
        for n in (8, 16, 32, 64):
            dep = M.Deployment(n_devices=n, attn_tp=tp, dense_format="int8", expert_format="fp4")
            for tok in (4096, 8192, 16384, 32768):
                best = max(best, M.prefill_point(arch, hw, dep, c, tok, 4096)["in_tok_s_per_device"])
    return best


def test_colocated_mtp_counts_all_prefill_work():
    # colocated serving cannot prefill faster than a prefill-only instance at its best batch
    r = plan("v4-flash", "910c", W)
    assert r["feasible"]
    assert r["input_tok_s_per_chip"] <= 1.05 * _best_prefill_rate("v4-flash", "910c")


@pytest.mark.parametrize("model", ["v4-flash", "v4-pro"])
def test_plans_never_exceed_hbm(model):
    arch = load_arch(model)
    ctx = 4096 + 1024
    for hw_id, hw in sorted(catalog().items()):
        for tp in (1, 2, 4, 8):
            dep = M.Deployment(n_devices=16, attn_tp=tp, dense_format="fp8", expert_format="fp4")
            if M.hbm_budget(arch, hw, dep) <= 0:
                continue  # weights alone do not fit: no plan uses this deployment
            b = M.max_batch(arch, hw, dep, ctx)
            need = M.weight_bytes_per_device(arch, dep)["total"] + b * tp * arch.cache_bytes_seq(ctx, dep.kv_dtype)
            assert need <= hw.hbm_gb * 1e9 * M.HBM_USABLE * (1 + 1e-9), (hw_id, tp)
        r = plan(model, hw_id, W)
        if r["feasible"]:
            d = r["decode"]
            dep = M.Deployment(
                n_devices=d["n_devices"],
                attn_tp=d["attn_tp"],
                dense_format=d["dense_format"],
                expert_format=d["expert_format"],
                kv_dtype=d["kv_dtype"],
            )
            need = M.weight_bytes_per_device(arch, dep)["total"] + d["batch_per_device"] * d[
                "attn_tp"
            ] * arch.cache_bytes_seq(ctx, d["kv_dtype"])
            assert need <= hw.hbm_gb * 1e9 * M.HBM_USABLE * (1 + 1e-9), hw_id


def test_colocated_ttft_at_small_batch_is_one_prefill():
    from parity.plan.estimate import Setup, estimate

    s = Setup(model="v4-flash", hardware="h200", isl=4096, osl=1024, tp=8, dp=1, concurrency=1)
    r = estimate(s)
    pre = estimate(Setup(model="v4-flash", hardware="h200", isl=4096, osl=1024, tp=8, dp=1, phase="prefill"))
    assert r["ttft_ms"] <= 1.5 * pre["ttft_ms"] and r["ttft_ms"] < 1000


def test_tensor_parallel_cuts_ttft_v4_pro_h20():
    r = plan("v4-pro", "h20", W)
    assert r["feasible"], r.get("reason")
    assert r["ttft_ms"] <= 2000


def test_compare_states_workload_and_frontier_mode(capsys):
    assert main(["compare", "--hardware", "910c,h200", "--isl", "2048", "--osl", "512"]) == 0
    out = capsys.readouterr().out
    assert "isl 2048" in out and "osl 512" in out and "TPOT 50" in out
    from parity.plan.report import compare

    res = compare("v4-flash", ["h200"], Workload(isl=2048, osl=512))
    modes = {p["mode"] for p in res["frontiers"]["h200"]}
    assert res["rows"][0]["mode"] in modes


def test_unknown_hardware_lists_aliases_and_910b_alias():
    with pytest.raises(PlanError, match="h100-sxm"):
        get_hardware("h10")
    assert get_hardware("910b").id.startswith("910b")


def test_latency_floor_is_per_stack():
    from parity.plan.hardware import stacks

    st = stacks()
    assert {"cuda-graphs", "ascend-graph", "eager"} <= set(st)
    assert all(s.source.strip() for s in st.values())
    assert st["cuda-graphs"].layer_latency_s < st["ascend-graph"].layer_latency_s
    assert st["cuda-graphs"].layer_latency_s < st["eager"].layer_latency_s
    v4 = load_arch("v4-flash")
    c = family_of(get_hardware("950pr")).as_dict()
    dep = M.Deployment(n_devices=8, dense_format="fp8", expert_format="fp4", overlap=False)
    # CANN reference on 8 x 950PR: 19.6 ms per step at one sequence per chip (CANN 950PR published entry)
    step = M.decode_point(v4, get_hardware("950pr"), dep, c, 1, 8192)["step_s"]
    assert 0.7 * 19.6e-3 < step < 1.3 * 19.6e-3


def test_eager_prefill_is_host_bound_at_one_prompt_and_hidden_at_large_batches():
    # CUDA graphs capture decode only: a prefill step takes max(host launches, device time)
    from parity.plan.hardware import stacks

    host = stacks()["cuda-graphs"].eager_layer_host_s
    assert host > 0 and stacks()["cuda-graphs"].eager_source.strip()
    v4 = load_arch("v4-flash")
    hw = get_hardware("h200")
    c = family_of(hw).as_dict()
    dep = M.Deployment(n_devices=4, attn_tp=4, expert_format="fp4")
    one = M.step_terms(v4, hw, dep, "prefill", 2048, 8192, 0.25).combine(c)
    assert one["step_s"] >= len(v4.layers) * host
    big = M.step_terms(v4, hw, M.Deployment(n_devices=32), "prefill", 65536, 4096, 16).combine(c)
    assert big["compute_s"] > big["host_s"]
    assert big["step_s"] <= max(big["compute_s"], big["comm_s"]) + big["fixed_s"] + 1e-9
    dec = M.step_terms(v4, hw, dep, "decode", 1, 8192, 1).combine(c)
    assert dec["host_s"] == 0  # decode is graph-captured


def test_fp4_weights_compute_in_bf16_without_fp4_math():
    # W4A16 (Marlin) on Hopper; native FP4 on Blackwell; INT4 weights with INT8 activations (W4A8)
    assert get_hardware("h200").weight_compute_dtype("fp4") == "bf16"
    assert get_hardware("gb300").weight_compute_dtype("fp4") == "fp4"
    assert get_hardware("910c").weight_compute_dtype("int4") == "int8"
    assert get_hardware("h200").weight_compute_dtype("fp8") == "fp8"


# ------------------------------------------------------------------------------------- chunked prefill
def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    from parity.plan.estimate import Setup, estimate

    base = dict(model="v4-flash", hardware="950pr", phase="prefill", isl=65536, tp=1, dp=4)
    one = estimate(Setup(**base, max_num_batched_tokens=65536))
    chunked = estimate(Setup(**base, max_num_batched_tokens=2048))
    assert one["prefill_steps"] == 1 and chunked["prefill_steps"] == 32
    # each chunk re-reads the weights and pays the floor and host launch again: never faster
    assert chunked["ttft_ms"] > 1.5 * one["ttft_ms"]
    # the stack's default budget applies when none is given (ascend-graph: vLLM-Ascend's 2048)
    assert estimate(Setup(**base))["ttft_ms"] == pytest.approx(chunked["ttft_ms"])
    with pytest.raises(PlanError, match="max-num-batched-tokens"):
        Setup(**base, max_num_batched_tokens=-1).validate()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "--hardware", "h200", "--isl", "10000000"], "the prompt (--isl 10,000,000 tokens) exceeds"),
        (["compare", "--hardware", "h200,b200", "--isl", "10000000"], "the prompt (--isl 10,000,000 tokens) exceeds"),
        (
            ["estimate", "--hardware", "h200", "--isl", "1000000", "--osl", "100000", "--concurrency", "1"],
            "--isl 1,000,000 + --osl 100,000 = 1,100,000 tokens exceed",
        ),
    ],
)
def test_sequence_over_the_model_context_is_an_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "1,048,576 tokens (max_position_embeddings)" in err[0], err
