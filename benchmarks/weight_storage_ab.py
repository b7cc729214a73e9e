"""Decode step time by weight storage on the CPU: the release miniature held as fp32-dequantized weights,
bf16-stored (the CPU default, `parity.model.weight_storage`), FP8/FP4 as published (dequantized per
step, ``--quantization fp8``) and converted to W8A8 (``--quantization w8a8``: int8 weights, activations
quantized per token), interleaved step by step in one process.

The miniature is benchmarks/vs_llamacpp.py's (written there, or here if absent). Each variant prefills
``--batch`` random 64-token prompts, then decode steps alternate between the variants (A B C, C B A, ...);
the medians of the process CPU time per step are printed (robust to a shared machine), with the weight
bytes each variant holds and its max |logit difference| to the fp32 variant on the first step.
Provenance of every figure: measured.

Usage:
    .venv/bin/python benchmarks/weight_storage_ab.py [--threads 1] [--batch 1,8] [--steps 16]
        [--work /tmp/vs_llamacpp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_llamacpp import dequantized, write_release  # noqa: E402

from parity.checkpoint.reader import from_pretrained  # noqa: E402
from parity.model.weight_storage import describe_storage  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs_llamacpp"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = str(write_release(a.work / "mini-release"))
    models = {
        "fp32": dequantized(from_pretrained(ckpt, quantization="fp8")),
        "bf16-stored": from_pretrained(ckpt),
        "fp8 as published": from_pretrained(ckpt, quantization="fp8"),
        "w8a8": from_pretrained(ckpt, quantization="w8a8"),  # int8 kernels of parity.devices.int8_gemm
    }
    for m in models.values():
        m.kv_cache_dtype, m.indexer_dtype = "bf16", "bf16"
    print(f"# weight_storage_ab: torch {torch.__version__}, {a.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    for name, m in models.items():
        print(f"# {name}: {describe_storage(m)}")
    for batch in (int(b) for b in a.batch.split(",")):
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 129280, (64,), generator=g) for _ in range(batch)]
        states, nxt, times, first = {}, {}, {n: [] for n in models}, {}
        for name, m in models.items():
            states[name] = [m.new_state() for _ in range(batch)]
            first[name] = m.forward_incremental(prompts, states[name])
            nxt[name] = first[name].argmax(-1)
            m.forward_incremental([[int(t)] for t in nxt[name]], states[name])  # build lazy kernels
        names = list(models)
        for step in range(a.steps):
            for name in names if step % 2 == 0 else names[::-1]:
                t0 = time.process_time()
                logits = models[name].forward_incremental([[int(t)] for t in nxt[name]], states[name])
                times[name].append(time.process_time() - t0)
                nxt[name] = logits.argmax(-1)
        for name in names:
            err = (first[name] - first["fp32"]).abs().max().item()
            print(
                f"batch {batch}: {name:17s} decode step CPU time median {statistics.median(times[name]) * 1e3:6.2f} ms"
                f"  ({batch / statistics.median(times[name]):6.0f} tokens/s)  logits vs fp32 {err:.1e}"
            )
        for st in states.values():
            for s in st:
                s.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
