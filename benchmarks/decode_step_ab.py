"""A/B of parity decode-step variants on the vs_llamacpp miniature, interleaved in one process.

Variants (each its own copy of the same seeded weights and its own cache states, after a 256-token
prefill per sequence): "mkl-head" (eager, LM head through ``F.linear``), "eager" (eager, LM head through
`parity.model.fast_linear`), "regions" (`parity.model.compiled` regions), "graph" (the whole decode step
compiled per batch bucket, `parity.model.decode_graph`: the engine's compiled path), "graph-parallel" (the
same with inductor's OpenMP kernels on every thread count and the one-row head in the step's graph, in the
stored layout: no timed choice of the head's layout, `parity.model.head_layout`),
"graph-reduce-proj" (the same with every projection as an in-graph broadcast-reduce, none as an ATen
GEMM). Steps alternate between the variants (A B C A B C ...), so machine load hits all alike; reported:
median and best wall time and process CPU time per step (on a shared machine the CPU time of a 1-thread
run is the steadier figure), the aten op count of one step (torch.profiler) and whether all variants
produced the same greedy tokens.
Provenance of every figure: measured.

Usage:
    .venv/bin/python benchmarks/decode_step_ab.py [--threads 1] [--batches 1,8] [--steps 40]
        [--variants eager,graph,graph-parallel,graph-reduce-proj]
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

from vs_llamacpp import miniature_config  # noqa: E402

import parity.model.fast_linear as fl  # noqa: E402
from parity import devices  # noqa: E402
from parity.model import build_model  # noqa: E402
from parity.model.compiled import compile_regions, warm_up  # noqa: E402
from parity.model.decode_graph import DecodeGraph  # noqa: E402
from parity.model.fixed_step import decode_step, lm_head_rows  # noqa: E402

ONEDNN_DEFAULT = fl.ONEDNN_MIN_WEIGHT_BYTES


def _threshold(variant: str) -> int:
    """`fast_linear.ONEDNN_MIN_WEIGHT_BYTES` while ``variant`` runs: "mkl-head" keeps every eager weight on
    MKL; "graph-reduce-proj" (traced with 0) takes the in-graph broadcast-reduce for every projection."""
    return {"mkl-head": 1 << 62, "graph-reduce-proj": 0}.get(variant, ONEDNN_DEFAULT)


class ParallelKernelsGraph(DecodeGraph):
    """The compiled step with inductor's OpenMP kernels at every thread count and the one-row head inside
    the step's graph (`DecodeGraph` on more than one thread: serial kernels, the head a graph of its own
    unless it runs on one of parity's C++ ops inside the step, `DecodeGraph._head_in_step`, inherited here)."""

    def _compiled(self) -> tuple:
        n = torch.get_num_threads()
        if n not in self._graphs:
            self._graphs[n] = (
                devices.compiler(self.device, whole_model=True)(decode_step),
                None,
                devices.compiler(self.device)(lm_head_rows),
            )
        return self._graphs[n]


def _ops(model, nxt, states) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        model.forward_incremental([[int(t)] for t in nxt], states)
    return sum(k.count for k in p.key_averages())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per variant")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--variants", default="eager,graph")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; threads {a.threads}")
    cfg = miniature_config()
    names = a.variants.split(",")
    models = {n: build_model(cfg, seed=0) for n in names}
    if "regions" in models:
        compile_regions(models["regions"], devices.compiler("cpu"))
        print(f"# compiled regions: warm-up (compile or inductor-cache load) {warm_up(models['regions']):.1f} s")
    for n in (n for n in names if n.startswith("graph")):
        kind = ParallelKernelsGraph if n == "graph-parallel" else DecodeGraph
        graph = models[n].decode_graph = kind(models[n], "cpu")
        fl.ONEDNN_MIN_WEIGHT_BYTES = 0 if n == "graph-reduce-proj" else ONEDNN_DEFAULT
        times = graph.warm_up(tuple(sorted({graph.bucket(int(b)) for b in a.batches.split(",")})))
        fl.ONEDNN_MIN_WEIGHT_BYTES = ONEDNN_DEFAULT
        print(f"# decode graph {n}: warm-up (compile or inductor-cache load) per bucket, s: {times}")
        if graph.head_columns:
            print(
                f"# decode graph {n}: LM head through the [hidden, vocab] copy (timed faster) for (threads, bucket) "
                f"{sorted(graph.head_columns)}"
            )
    g = torch.Generator().manual_seed(0)
    for B in (int(b) for b in a.batches.split(",")):
        prompts = [torch.randint(0, cfg.vocab_size, (a.prompt,), generator=g) for _ in range(B)]
        states, nxt, toks, res = {}, {}, {}, {n: [] for n in names}
        for n, m in models.items():
            states[n] = [m.new_state() for _ in range(B)]
            nxt[n] = m.forward_incremental(prompts, states[n]).argmax(-1)
            toks[n] = [nxt[n]]
        for _ in range(a.steps):
            for n, m in models.items():
                fl.ONEDNN_MIN_WEIGHT_BYTES = _threshold(n)
                t0, c0 = time.perf_counter(), time.process_time()
                nxt[n] = m.forward_incremental([[int(t)] for t in nxt[n]], states[n]).argmax(-1)
                res[n].append((time.perf_counter() - t0, time.process_time() - c0))
                toks[n].append(nxt[n])
        same = all(torch.equal(torch.stack(toks[n]), torch.stack(toks[names[0]])) for n in names)
        for n, m in models.items():
            fl.ONEDNN_MIN_WEIGHT_BYTES = _threshold(n)
            w = [x[0] * 1e3 for x in res[n][1:]]
            c = [x[1] * 1e3 for x in res[n][1:]]
            print(
                f"batch {B} threads {a.threads} {n:9s}: wall median {statistics.median(w):6.1f} best {min(w):6.1f} ms"
                f" | cpu median {statistics.median(c):6.1f} best {min(c):6.1f} ms | "
                f"{_ops(m, nxt[n], states[n])} aten ops/step",
                flush=True,
            )
            for st in states[n]:
                st.free()
        fl.ONEDNN_MIN_WEIGHT_BYTES = ONEDNN_DEFAULT
        print(f"batch {B}: same greedy tokens in all variants: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
