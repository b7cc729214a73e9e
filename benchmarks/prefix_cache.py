"""Prefix caching: a shared system prompt + short questions, TTFT and prefill work with caching on vs off.

Workload: one system prompt of `--system-len` random tokens (2,048) shared by `--questions` requests, each
followed by its own `--question-len` random tokens (64), `--output-len` generated tokens (greedy, EOS
ignored). Requests run one after another through the offline engine (`LLMEngine`), so each TTFT is one
request's prefill alone: arrival -> first token (`RequestMetrics.ttft_s`).

Reported per mode: median and mean TTFT over the requests after the first (the first one fills the cache
and is reported separately), prefill tokens computed (prompt tokens - `num_cached_tokens`, summed), and
the hit rate = prefix-cache hits / queries (tokens, the engine's counters). The greedy tokens of both
modes are compared. Provenance of every figure: measured.

Usage:
    .venv/bin/python benchmarks/prefix_cache.py [--preset tiny] [--device cpu] [--dtype float32]
        [--system-len 2048] [--question-len 64] [--questions 16] [--output-len 4] [--threads N]
        [--block-tokens N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity.config import load_preset  # noqa: E402
from parity.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402
from parity.model import build_model  # noqa: E402


def run_mode(model, prompts: list[list[int]], args, enable: bool) -> dict:
    eng = LLMEngine(
        EngineArgs(
            device=args.device,
            cache_memory=args.cache_memory,
            enable_prefix_caching=enable,
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefix_block_tokens=args.block_tokens,
        ),
        model=model,
        tokenizer=None,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    ttft, computed, tokens = [], 0, []
    for p in prompts:
        req = eng.add_request(p, sp.clone())
        while eng.has_unfinished():
            eng.step()
        m = req.metrics
        ttft.append(m.ttft_s)
        computed += len(p) - m.num_cached_tokens
        tokens.append(req.output().outputs[0].token_ids)
    st = eng.stats()
    warm = ttft[1:] or ttft
    queries = st.get("prefix_cache_queries_total", 0)
    return {
        "prefix_caching": enable,
        "ttft_first_s": ttft[0],
        "ttft_median_s": statistics.median(warm),
        "ttft_mean_s": statistics.fmean(warm),
        "prefill_tokens_computed": computed,
        "prompt_tokens": sum(map(len, prompts)),
        "hit_rate": (st.get("prefix_cache_hits_total", 0) / queries) if queries else 0.0,
        "tokens": tokens,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (random weights, seed 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--cache-memory", type=int, default=1 << 30, help="cache pool bytes")
    ap.add_argument("--block-tokens", type=int, default=None, help="prefix block length (default: from config)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(load_preset(args.preset), device=args.device, dtype=getattr(torch, args.dtype), seed=0)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    system = torch.randint(2, V, (args.system_len,), generator=g).tolist()
    prompts = [system + torch.randint(2, V, (args.question_len,), generator=g).tolist() for _ in range(args.questions)]
    off = run_mode(model, prompts, args, False)
    on = run_mode(model, prompts, args, True)
    same = on.pop("tokens") == off.pop("tokens")
    res = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "system_len": args.system_len,
        "question_len": args.question_len,
        "questions": args.questions,
        "output_len": args.output_len,
        "greedy_tokens_equal": same,
        "off": off,
        "on": on,
        "ttft_speedup": off["ttft_median_s"] / on["ttft_median_s"],
    }
    print(
        f"{'mode':<6} {'TTFT first (ms)':>16} {'TTFT median (ms)':>17} {'TTFT mean (ms)':>15} "
        f"{'prefill tokens':>15} {'hit rate':>9}"
    )
    for name, r in (("off", off), ("on", on)):
        print(
            f"{name:<6} {r['ttft_first_s'] * 1e3:16.1f} {r['ttft_median_s'] * 1e3:17.1f} "
            f"{r['ttft_mean_s'] * 1e3:15.1f} {r['prefill_tokens_computed']:>8}/{r['prompt_tokens']:<6} "
            f"{r['hit_rate']:9.3f}"
        )
    print(f"median TTFT speedup {res['ttft_speedup']:.2f}x; greedy tokens equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
