"""Small-batch latency terms of the serving model: V4 layer latency, TP all-reduces, colocated TPOT."""

import pytest

from parity.plan import serving_model as M
from parity.plan.arch import load_arch
from parity.plan.estimate import colocated
from parity.plan.hardware import get_hardware, stacks


def test_v4_layer_replays_more_latency_than_an_mla_layer():
    st = stacks()["cuda-graphs"]
    assert st.layer_latency("v4") > st.layer_latency("mla") > 0
    assert st.v4_source.strip() and st.allreduce_source.strip()


def test_allreduce_latency_grows_with_tp_and_is_zero_alone():
    st = stacks()["cuda-graphs"]
    assert st.allreduce_latency(1) == 0
    assert 0 < st.allreduce_latency(2) <= st.allreduce_latency(4) < st.allreduce_latency(8)
    assert st.allreduce_latency(16) == st.allreduce_latency(8)


def test_attention_tp_pays_two_allreduces_per_layer():
    arch, hw = load_arch("v4-flash"), get_hardware("h200")
    tp1 = M.step_terms(arch, hw, M.Deployment(n_devices=4, attn_tp=1), "decode", 1, 8192, 1)
    tp4 = M.step_terms(arch, hw, M.Deployment(n_devices=4, attn_tp=4), "decode", 1, 8192, 1)
    layers = len(arch.layers)
    st = stacks()["cuda-graphs"]
    assert tp4.fixed_s - tp1.fixed_s == pytest.approx(2 * layers * st.allreduce_latency(4))


def test_single_user_tpot_carries_no_prefill():
    # one user: its own prefill chunks are its TTFT, its decode steps carry no chunk
    r = colocated(t_dec=0.01, t_mix=0.4, tps=2.0, concurrency=1, dp=1, osl=1000, n_chunks=2)
    assert r["tpot_ms"] == pytest.approx(0.01 / 2.0 * 1e3)
    assert r["ttft_ms"] == pytest.approx(800)
    # more users: the others' chunks stretch a user's decode steps
    assert colocated(0.01, 0.4, 2.0, 16, 1, 1000, 2)["tpot_ms"] > r["tpot_ms"]


def test_eager_host_time_follows_the_host_cpu():
    st = stacks()["cuda-graphs"]
    assert get_hardware("gb300").host_cpu == "grace" and get_hardware("h200").host_cpu == "x86"
    assert st.eager_host("grace") > st.eager_host("x86") == st.eager_layer_host_s > 0
    assert st.eager_host("unrecorded") == st.eager_layer_host_s


def test_e2e_per_user_is_osl_over_the_whole_request():
    from parity.plan.estimate import Setup, estimate

    r = estimate(
        Setup(model="v4-flash", hardware="h200", phase="serving", isl=8192, osl=1024, tp=4, dp=1, concurrency=4)
    )
    whole_s = (r["ttft_ms"] + 1024 * r["tpot_ms"]) / 1e3
    assert r["e2e_tok_s_per_user"] == pytest.approx(1024 / whole_s)
    assert r["e2e_tok_s_per_user"] < r["output_tok_s_per_user"]
