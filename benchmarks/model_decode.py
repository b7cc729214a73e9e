"""parity.model speed: prefill tokens/s and decode step time of a randomly initialised model.

Usage:
    .venv/bin/python benchmarks/model_decode.py [--preset tiny] [--device auto] [--dtype float32]
        [--prompt 512] [--steps 32] [--batch 1,8] [--kv-cache-dtype bf16] [--threads N]

Prints one line per measurement (provenance: measured). Targets (tiny preset, 2 CPU cores):
decode step at batch 1 under 50 ms; incremental decode never recomputes the prefix, so the step time
stays flat as the context grows (compare the first and last decode steps).
"""

from __future__ import annotations

import argparse
import time

import torch

from parity import devices
from parity.config import load_config
from parity.model import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"])
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.preset)
    dev = devices.resolve(a.device)
    model = build_model(cfg, device=dev, dtype=getattr(torch, a.dtype), seed=0)
    model.kv_cache_dtype = a.kv_cache_dtype
    g = torch.Generator().manual_seed(0)
    print(f"model {a.preset} on {dev} ({a.dtype}, kv {a.kv_cache_dtype}, {torch.get_num_threads()} threads)")
    for bs in [int(x) for x in a.batch.split(",")]:
        states = [model.new_state() for _ in range(bs)]
        prompts = [torch.randint(0, cfg.vocab_size, (a.prompt,), generator=g) for _ in range(bs)]
        devices.synchronize(dev)
        t0 = time.perf_counter()
        logits = model.forward_incremental(prompts, states)
        devices.synchronize(dev)
        t_prefill = time.perf_counter() - t0
        nxt = logits.argmax(-1)
        step_s = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            logits = model.forward_incremental([[int(t)] for t in nxt], states)
            nxt = logits.argmax(-1)
            devices.synchronize(dev)
            step_s.append(time.perf_counter() - t0)
        med = sorted(step_s)[len(step_s) // 2]
        cache_mib = sum(s.nbytes() for s in states) / 2**20
        print(
            f"batch {bs}: prefill {bs * a.prompt} tokens in {t_prefill:.2f} s = {bs * a.prompt / t_prefill:,.0f} "
            f"tokens/s; decode step median {med * 1e3:.1f} ms (first {step_s[0] * 1e3:.1f}, last "
            f"{step_s[-1] * 1e3:.1f}) = {bs / med:,.0f} tokens/s; cache {cache_mib:.1f} MiB  [measured]"
        )
        for s in states:
            s.free()


if __name__ == "__main__":
    main()
