"""Parallel loading of the published FP8/FP4 layout (gloo, CPU): each rank reads its slices of the quantized
weights and scales; the same greedy tokens and logits as one process; per-device bytes as estimated."""

import pytest
import torch
import torch.multiprocessing as mp
from test_parallel_model import TOL, _prompts, _run

from parity.checkpoint import official_reader
from parity.checkpoint.conversion import convert_published
from parity.checkpoint.layout import block_size, official_layout
from parity.checkpoint.reader import from_pretrained
from parity.checkpoint.writer import export_model
from parity.config import load_preset
from parity.distributed import ParallelConfig
from parity.distributed.context import ParallelContext, free_port, init_parallel, shutdown_parallel
from parity.errors import ParallelError
from parity.model.build import build_model
from parity.weight_bytes import estimate_weight_bytes


def _miniature():
    """The tiny preset with every TP=2 split of an FP8 linear on its 128x128 scale blocks (o_lora_rank 128:
    ``o_a_proj`` rows / ``o_b_proj`` columns 2 x 128; shared expert 256 = 2 x 128) and a small vocabulary.
    The tiny preset itself splits them at 32 (`test_tiny_split_off_the_scale_blocks_is_refused`)."""
    return load_preset("tiny").replace(o_lora_rank=128, moe_intermediate_size=256, vocab_size=4096)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    out = tmp_path_factory.mktemp("published")
    export_model(build_model(_miniature(), seed=0), out, tokenizer=False)
    return out


def _rank(rank, layouts, path, ports, out):
    torch.set_num_threads(1)
    for i, (pc, quantization) in enumerate(layouts):
        ctx = init_parallel(pc, rank, "cpu", f"tcp://127.0.0.1:{ports[i]}", 60)
        model = from_pretrained(path, quantization=quantization, parallel=ctx)
        torch.save(_run(model, _prompts(model.config, ctx.dp_rank)), f"{out}/{i}-{rank}.pt")
        shutdown_parallel()


@pytest.mark.slow
def test_published_layout_tp2_and_ep2_match_one_process(published, tmp_path):
    """TP=2 and TP=2 + EP=2 kept quantized (FP8 linears, FP4 experts), TP=2 dequantized at load (bf16):
    the tokens and logits of one process. TP=2 converted to W8A8 quantizes each rank's part on its own
    (row-parallel shards: per-channel scales of their columns), so it is held to the W8A8 error only."""
    layouts = [
        (ParallelConfig(2), None),
        (ParallelConfig(2, 1, True), None),
        (ParallelConfig(2), "bf16"),
        (ParallelConfig(2), "w8a8"),
    ]
    ports = [free_port() for _ in layouts]
    mp.spawn(_rank, args=(layouts, str(published), ports, str(tmp_path)), nprocs=2)
    refs = {}
    for i, (pc, quantization) in enumerate(layouts):
        if quantization not in refs:
            ref = from_pretrained(published, quantization=quantization)
            refs[quantization] = _run(ref, _prompts(ref.config, 0))
        want = refs[quantization]
        for r in range(pc.world_size):
            full, steps, toks = torch.load(tmp_path / f"{i}-{r}.pt")
            if quantization == "w8a8":
                w8a8_error = (want[0] - refs[None][0]).abs().max()
                assert (full - refs[None][0]).abs().max() < 2 * w8a8_error, r
                continue
            assert torch.equal(toks, want[2]), (pc.describe(), quantization, r)
            assert (full - want[0]).abs().max() < TOL, (pc.describe(), quantization, r)
            assert (steps - want[1]).abs().max() < TOL, (pc.describe(), quantization, r)


def _skeleton(cfg, pc, rank, quantized, dtype=torch.bfloat16):
    ctx = ParallelContext(pc, rank=rank, world_size=pc.world_size)
    return official_reader._build_skeleton(
        cfg, torch.device("meta"), dtype, quantized, block_size(cfg), official_layout(cfg), False, ctx
    )


@pytest.mark.parametrize("tp,dp,ep", [(1, 1, False), (2, 1, False), (2, 1, True), (2, 2, True), (1, 2, True)])
@pytest.mark.parametrize("weights", ["fp4", "bf16", "w8a8", "w4a8"])
def test_weight_bytes_per_device_equal_the_quantized_part(tp, dp, ep, weights):
    """`estimate_weight_bytes(tp=, ep=, weights=)` equals what one rank of the published-layout load holds
    (FP8 weights + 128x128 scales, FP4 experts + 1x32 scales; dequantized; or converted at load)."""
    cfg = _miniature()
    pc = ParallelConfig(tp, dp, ep)
    model = _skeleton(cfg, pc, pc.world_size - 1, weights != "bf16")
    convert_published(model, weights)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held == estimate_weight_bytes(cfg, "bfloat16", weights=weights, tp=pc.tp, ep=pc.ep)


def test_rank_part_shapes_follow_the_split():
    """TP=2 rank 1: q_b_proj rows / o_b_proj columns halved with their scales; FP4 experts split along the
    intermediate dimension (packed bytes and 1x32 scales); under EP whole experts, half of them."""
    cfg = _miniature()
    m = _skeleton(cfg, ParallelConfig(2), 1, True)
    att = m.model.layers[0].self_attn
    assert tuple(att.q_b_proj.qweight.shape) == (128, 64) and tuple(att.q_b_proj.scale.shape) == (1, 1)
    assert tuple(att.o_b_proj.qweight.shape) == (128, 128) and att.o_b_proj.in_features == 128
    ex = m.model.layers[0].mlp.experts
    assert tuple(ex.gate_up_qweight.shape) == (8, 256, 64) and tuple(ex.down_qweight.shape) == (8, 128, 64)
    assert tuple(ex.down_scale.shape) == (8, 128, 4) and ex.inter == 128
    ep = _skeleton(cfg, ParallelConfig(2, 1, True), 1, True).model.layers[0].mlp.experts
    assert tuple(ep.gate_up_qweight.shape) == (4, 512, 64) and ep.n_experts == 4


def test_tiny_split_off_the_scale_blocks_is_refused():
    """The tiny preset's o_a_proj has 64 rows: TP=2 would split its FP8 128-row scale block."""
    with pytest.raises(ParallelError, match=r"o_a_proj\.weight.*128-value boundary") as e:
        _skeleton(load_preset("tiny"), ParallelConfig(2), 1, True)
    assert "`parity serve tiny -tp 2`" in str(e.value)  # what to do instead
    assert "multiples of 128 x the tensor-parallel size" in str(e.value)


def test_v4_flash_tp8_ep_splits_on_scale_blocks_and_bytes_match():
    """The headline layout: V4-Flash in its published layout, TP=8 with EP=8, splits every FP8 / FP4 tensor
    on its scale blocks; one rank holds exactly the estimated bytes (meta device: nothing allocated)."""
    cfg = load_preset("v4-flash")
    pc = ParallelConfig(8, 1, True)
    model = _skeleton(cfg, pc, 7, True)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held == estimate_weight_bytes(cfg, "bfloat16", weights="fp4", tp=8, ep=8)
