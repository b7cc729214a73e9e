"""parity's engine vs transformers' `generate`, side by side in one process, on one V4 miniature.

The miniature (~80M parameters: hidden 256, 6 layers, the real 129,280-token vocabulary; sliding, CSA and
HCA layers, hash and scored MoE) is initialised randomly by transformers 5.23 `DeepseekV4ForCausalLM`,
saved with `save_pretrained` and loaded by `parity.checkpoint.reader.from_pretrained`, so both run identical
weights.

For each batch size B: B prompts of P random tokens, N generated tokens each (greedy, EOS ignored).
- prefill tokens/s = B*P / prefill time. parity: `LLM.generate` arrival -> first token of the batch
  (one engine step when max_num_batched_tokens >= B*P); transformers: one `model(input_ids)` forward
  with a fresh cache, keeping only the last logits (as `generate` does).
- decode tokens/s = B*(N-1) / decode time. parity: first token -> last token (request metrics);
  transformers: `generate(max_new_tokens=N, min_new_tokens=N)` wall time minus its prefill forward.
Each measurement is the best of `--repeat` runs after one warm-up. Provenance of every figure: measured.

Usage:
    .venv/bin/python benchmarks/engine_throughput.py [--quick] [--batches 1,8,32] [--prompt-len 256]
        [--output-len 64] [--device auto] [--dtype float32|bfloat16] [--threads N] [--repeat 2] [--no-hf]

Targets: decode >= 2.5x transformers at batch 1 and >= 4x at batch 8 and 32; prefill >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity import devices  # noqa: E402
from parity.config import CSA, HASH_MOE, HCA, MOE, SLIDING, load_preset  # noqa: E402


def bench_config():
    """The ~80M-parameter miniature (hidden 256, 6 layers, real vocabulary)."""
    cfg = load_preset("tiny").replace(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        head_dim=64,
        qk_rope_head_dim=16,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        n_routed_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        index_n_heads=16,
        index_head_dim=32,
        index_topk=32,
        sliding_window=64,
        layer_types=[SLIDING, CSA, HCA, CSA, HCA, CSA],
        mlp_layer_types=[HASH_MOE] + [MOE] * 5,
        compress_rates={CSA: 4, HCA: 128},
        quantization_config=None,
        expert_dtype=None,
        num_nextn_predict_layers=0,
        torch_dtype="float32",
    )
    return cfg


def make_checkpoint(cfg, directory: Path, seed: int = 0):
    """Random transformers model saved to `directory`; returns it (eval mode)."""
    import transformers.utils.logging as hf_logging
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf_logging.set_verbosity_error()
    d = cfg.to_dict()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    torch.manual_seed(seed)
    m = DeepseekV4ForCausalLM(DeepseekV4Config(**d)).eval()
    with torch.no_grad():
        # Positive indexer head weights (and 16 heads): an entry then scores exactly 0 only when every
        # head's ReLU is 0, so exact top-k ties, whose order torch.topk leaves unspecified (parity breaks
        # them by position, docs/numerics.md), stay improbable and both engines pick the same entries.
        for k, v in m.state_dict().items():
            if k.endswith("scorer.weights_proj.weight"):
                v.abs_()
    m.save_pretrained(str(directory))
    return m


def timed(fn, dev) -> float:
    devices.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    devices.synchronize(dev)
    return time.perf_counter() - t0


def run_parity(llm, prompts, n_out: int):
    from parity.engine import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    t0 = time.monotonic()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    first = max(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
    return first - t0, last - first, [o.outputs[0].token_ids for o in outs]


def run_hf(model, ids, n_out: int, dev):
    with torch.inference_mode():
        t_pre = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), dev)
        res = {}

        def gen():
            res["out"] = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_out,
                min_new_tokens=n_out,
                do_sample=False,
                pad_token_id=0,
            )

        t_gen = timed(gen, dev)
    return t_pre, max(t_gen - t_pre, 1e-9), res["out"][:, ids.shape[1] :].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batches 1,8; 64-token prompts; 16 output tokens")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (accelerator default)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="parity only")
    ap.add_argument("--profile", action="store_true", help="cProfile one parity decode run per batch size")
    ap.add_argument("--json", default=None, help="write results to this file")
    a = ap.parse_args()
    if a.quick:
        a.batches, a.prompt_len, a.output_len, a.repeat = "1,8", 64, 16, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = devices.resolve(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    cfg = bench_config()

    from parity.checkpoint.reader import from_pretrained
    from parity.engine import LLM

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(cfg, Path(tmp))
        model = from_pretrained(tmp, device=dev, dtype=dtype)
    n_params = sum(p.numel() for p in hf.parameters())
    hf = None if a.no_hf else hf.to(device=dev, dtype=dtype)
    batches = [int(b) for b in a.batches.split(",")]
    print(
        f"# engine_throughput: {n_params / 1e6:.1f}M params, device {dev} ({devices.describe(dev).name}), "
        f"{dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}"
    )
    print(f"# prompts {a.prompt_len} tokens, {a.output_len} output tokens, greedy; best of {a.repeat}; measured")
    g = torch.Generator().manual_seed(0)
    rows = []
    hdr = (
        f"{'batch':>5} | {'prefill parity':>15} {'prefill HF':>12} {'ratio':>6} | {'decode parity':>14} "
        f"{'decode HF':>10} {'ratio':>6} | {'same tokens':>11}"
    )
    print(hdr)
    print("-" * len(hdr))
    for B in batches:
        ids = torch.randint(2, cfg.vocab_size, (B, a.prompt_len), generator=g)
        prompts = ids.tolist()
        llm = LLM(
            model_obj=model,
            tokenizer=None,
            max_num_seqs=max(B, 1),
            max_num_batched_tokens=max(2048, B * a.prompt_len),
            cache_memory=1 << 30,
        )
        run_parity(llm, prompts[:1], 2)  # warm-up
        best_p = (float("inf"), float("inf"))
        p_out = None
        for _ in range(a.repeat):
            tp, td, p_out = run_parity(llm, prompts, a.output_len)
            best_p = (min(best_p[0], tp), min(best_p[1], td))
        if a.profile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            run_parity(llm, prompts, a.output_len)
            pr.disable()
            print(f"## profile, parity, batch {B}")
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        row = {
            "batch": B,
            "prefill_parity_tok_s": B * a.prompt_len / best_p[0],
            "decode_parity_tok_s": B * (a.output_len - 1) / best_p[1],
        }
        if hf is not None:
            hid = ids.to(dev)
            run_hf(hf, hid[:1, :8], 2, dev)  # warm-up
            best_h = (float("inf"), float("inf"))
            h_out = None
            for _ in range(a.repeat):
                tp, td, h_out = run_hf(hf, hid, a.output_len, dev)
                best_h = (min(best_h[0], tp), min(best_h[1], td))
            row["prefill_hf_tok_s"] = B * a.prompt_len / best_h[0]
            row["decode_hf_tok_s"] = B * (a.output_len - 1) / best_h[1]
            row["prefill_ratio"] = row["prefill_parity_tok_s"] / row["prefill_hf_tok_s"]
            row["decode_ratio"] = row["decode_parity_tok_s"] / row["decode_hf_tok_s"]
            same = sum(x == y for x, y in zip(p_out, h_out, strict=False))
            row["same_outputs"] = f"{same}/{B}"
        rows.append(row)
        f = lambda k, w, row=row: f"{row[k]:>{w},.0f}" if k in row else f"{'-':>{w}}"  # noqa: E731
        r = lambda k, row=row: f"{row[k]:>5.2f}x" if k in row else f"{'-':>6}"  # noqa: E731
        print(
            f"{B:>5} | {f('prefill_parity_tok_s', 15)} {f('prefill_hf_tok_s', 12)} {r('prefill_ratio')} | "
            f"{f('decode_parity_tok_s', 14)} {f('decode_hf_tok_s', 10)} {r('decode_ratio')} | "
            f"{row.get('same_outputs', '-'):>11}",
            flush=True,
        )
    print("# tokens/s; ratio = parity / transformers; 'same tokens' = sequences with identical greedy outputs")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
