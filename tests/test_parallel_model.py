"""Tensor / expert / data parallelism on CPU (gloo): the same logits and greedy tokens as one process."""

import pytest
import torch
import torch.multiprocessing as mp

from parity.config import load_preset
from parity.distributed import ParallelConfig
from parity.distributed.context import ParallelContext, free_port, init_parallel, shutdown_parallel
from parity.errors import ParallelError
from parity.model.build import build_model
from parity.model.deepseek_v4 import V4ForCausalLM
from parity.model.memory import estimate_weight_bytes
from parity.model.parallel_layers import parallelize_

#: Prompt lengths crossing the sliding window (32), CSA windows (4) and one HCA window (128) of "tiny".
LENGTHS = (133, 101)
DECODE = 5
TOL = 1e-5


def _miniature():
    """A random miniature with enough experts for EP=4 (4 experts per rank) and a small vocabulary."""
    return load_preset("tiny").replace(n_routed_experts=16, num_experts_per_tok=4, vocab_size=4096)


def _prompts(cfg, replica: int):
    g = torch.Generator().manual_seed(100 + replica)
    return [torch.randint(2, cfg.vocab_size, (n,), generator=g) for n in LENGTHS]


def _run(model, prompts):
    """Full-forward logits of the first prompt, then chunked prefill + greedy decode of both together."""
    full = model.forward_logits(prompts[0][None])[0]
    states = [model.new_state() for _ in prompts]
    model.forward_incremental([p[:70] for p in prompts], states)
    last = model.forward_incremental([p[70:] for p in prompts], states)
    steps, toks = [last], []
    for _ in range(DECODE):
        t = steps[-1].argmax(-1)
        toks.append(t)
        steps.append(model.forward_incremental([[int(x)] for x in t], states))
    return full, torch.stack(steps), torch.stack(toks)


def _rank(rank, layouts, cfg, ports, out):
    torch.set_num_threads(1)
    for i, pc in enumerate(layouts):
        if pc.world_size <= rank:
            continue
        ctx = init_parallel(pc, rank, "cpu", f"tcp://127.0.0.1:{ports[i]}", 60)
        model = build_model(cfg, seed=0, parallel=ctx)
        torch.save(_run(model, _prompts(cfg, ctx.dp_rank)), f"{out}/{i}-{rank}.pt")
        shutdown_parallel()


def _check(layouts, cfg, tmp_path):
    nprocs = max(pc.world_size for pc in layouts)
    ports = [free_port() for _ in layouts]
    mp.spawn(_rank, args=(layouts, cfg, ports, str(tmp_path)), nprocs=nprocs)
    ref = build_model(cfg, seed=0)
    refs = {}
    for i, pc in enumerate(layouts):
        for r in range(pc.world_size):
            d = r // pc.tp
            if d not in refs:
                refs[d] = _run(ref, _prompts(cfg, d))
            full, steps, toks = torch.load(tmp_path / f"{i}-{r}.pt")
            assert torch.equal(toks, refs[d][2]), (pc.describe(), r)
            assert (full - refs[d][0]).abs().max() < TOL, (pc.describe(), r)
            assert (steps - refs[d][1]).abs().max() < TOL, (pc.describe(), r)


def test_tp2_matches_one_process(tmp_path):
    """TP=2 (2 processes) on the small-vocabulary miniature: the quick check every run does."""
    _check([ParallelConfig(2)], _miniature(), tmp_path)


@pytest.mark.slow
def test_two_process_layouts_match_one_process(tmp_path):
    """TP=2, TP=2 + EP=2 and DP=2 + EP=2 (2 processes, the tiny preset)."""
    layouts = [ParallelConfig(2), ParallelConfig(2, 1, True), ParallelConfig(1, 2, True)]
    _check(layouts, load_preset("tiny"), tmp_path)


@pytest.mark.slow
def test_tp2_dp2_ep4_matches_one_process(tmp_path):
    """TP=2 x DP=2 with EP=4 (4 processes) on a miniature with 16 experts."""
    _check([ParallelConfig(2, 2, True)], _miniature(), tmp_path)


@pytest.mark.parametrize(
    "pc,match",
    [
        (ParallelConfig(8), "num_attention_heads"),
        (ParallelConfig(4), "o_groups"),
        (ParallelConfig(1, 3, True), "n_routed_experts"),
    ],
)
def test_layout_errors_name_the_field(pc, match):
    with pytest.raises(ParallelError, match=match):
        pc.validate(load_preset("tiny"))


def test_bad_sizes_rejected():
    with pytest.raises(ParallelError, match="tensor_parallel_size"):
        ParallelConfig(0)


@pytest.mark.parametrize("tp,dp,ep", [(1, 1, False), (2, 1, False), (2, 1, True), (2, 2, True)])
def test_weight_bytes_per_device_equal_the_model_part(tp, dp, ep):
    """`estimate_weight_bytes(tp=, ep=)` (the load-time check and `parity info`) equals one rank's tensors."""
    cfg = load_preset("tiny")
    pc = ParallelConfig(tp, dp, ep)
    with torch.device("meta"):
        model = V4ForCausalLM(cfg)
    parallelize_(model, ParallelContext(pc, rank=pc.world_size - 1, world_size=pc.world_size))
    model.to_dtype(torch.bfloat16)
    persistent = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert persistent == estimate_weight_bytes(cfg, "bfloat16", tp=pc.tp, ep=pc.ep)


@pytest.mark.parametrize(
    "argv,fits",
    [
        (["v4-flash", "--hardware", "910c", "--tensor-parallel-size", "8", "--enable-expert-parallel"], True),
        (["v4-flash", "--hardware", "h200", "--tensor-parallel-size", "8", "--enable-expert-parallel"], True),
        (["v4-pro", "--hardware", "h200", "-tp", "8", "-dp", "4", "--enable-expert-parallel"], True),
        (["v4-flash", "--hardware", "h200"], False),
    ],
)
def test_info_reports_per_device_bytes_from_the_load_check(argv, fits, capsys):
    from parity.cli import main
    from parity.config import load_config
    from parity.model.memory import device_fit
    from parity.plan.hardware import get_hardware

    assert main(["info", *argv]) == 0
    out = capsys.readouterr().out
    assert ("-> fits" in out) == fits and ("DOES NOT FIT" in out) == (not fits)
    tp = int(argv[argv.index("-tp") + 1]) if "-tp" in argv else (8 if "--tensor-parallel-size" in argv else 1)
    dp = int(argv[argv.index("-dp") + 1]) if "-dp" in argv else 1
    pc = ParallelConfig(tp, dp, "--enable-expert-parallel" in argv)
    cfg = load_config(argv[0])
    fit = device_fit(cfg, get_hardware(argv[2]).hbm_gb * 1e9, tp=pc.tp, ep=pc.ep)
    assert fit["fits"] == fits
    assert fit["weight_bytes"] == estimate_weight_bytes(cfg, "bfloat16", True, tp=pc.tp, ep=pc.ep)
    assert f"{fit['cache_tokens']:,} tokens" in out
