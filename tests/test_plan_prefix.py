"""Prefix-cache hits in `parity plan`: only a prompt's uncached tokens are prefilled."""

import pytest

from parity.errors import PlanError
from parity.plan import serving_model as M
from parity.plan.arch import load_arch
from parity.plan.hardware import family_of, get_hardware
from parity.plan.search import Workload, colocated_point, plan


def test_colocated_chunks_only_the_uncached_tokens():
    arch, hw = load_arch("v4-flash"), get_hardware("h200")
    dep = M.Deployment(n_devices=8, attn_tp=1, expert_format="fp4", kv_dtype="fp8")
    c = family_of(hw).as_dict()
    cold = colocated_point(arch, hw, dep, c, 16, Workload(isl=65536, osl=400), 65736)
    warm = colocated_point(arch, hw, dep, c, 16, Workload(isl=65536, osl=400, prefix_hit_rate=0.9), 65736)
    assert warm["ttft"] < cold["ttft"] / 3 and warm["out"] > cold["out"]


def test_plan_with_prefix_hits_serves_more_and_names_them():
    w = Workload(isl=32768, osl=512, slo_ttft_ms=5000, slo_tpot_ms=50)
    cold = plan("v4-flash", "h200", w)
    warm = plan("v4-flash", "h200", Workload(isl=32768, osl=512, slo_ttft_ms=5000, slo_tpot_ms=50, prefix_hit_rate=0.8))
    assert warm["output_tok_s_per_chip"] > cold["output_tok_s_per_chip"]
    assert warm["workload"]["prefix_hit_rate"] == 0.8


def test_prefix_hit_rate_out_of_range_is_refused():
    with pytest.raises(PlanError, match="--prefix-hit-rate"):
        plan("v4-flash", "h200", Workload(isl=4096, osl=128, prefix_hit_rate=1.0))
