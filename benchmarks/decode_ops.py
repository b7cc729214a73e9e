"""Side by side, in one run: the per-step operations around the LM head of a CPU decode step.

1. Greedy argmax over the vocabulary: ``torch.argmax(logits, -1)`` vs `parity.devices.row_argmax`.
2. The int8 LM head (per-token int8 activations x int8 weight, fp32 logits): the C++ op's int32 sums then
   the float64 rescale as a separate pass (`int8_gemm` + `rescale_sums`) vs the C++ op that rescales as it
   stores (`native_kernels.int8_linear`); torch's ``_int_mm`` + rescale as the library baseline.
3. The float LM head (fp32 activations x fp32 or bf16 weight, fp32 math): inductor's broadcast-reduce
   ``sum(W[:, None, :] * x[None], -1)`` (the compiled step's formulation before the C++ op) and oneDNN's inner
   product (the eager one) vs the C++ op `native_kernels.float_linear`; checked equal to 1e-4 relative.

Shapes: the real 129,280-token vocabulary, hidden 256 (the benchmark miniature of benchmarks/vs_llamacpp.py),
batch 1, 4 and 8. Interleaved A B A B per shape and thread count; best and median of ``--rounds`` calls, in ms.
The int8 pairs are checked to give identical results before they are timed, the float ones to 1e-4.

Usage:
    .venv/bin/python benchmarks/decode_ops.py [--threads 1,2] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.devices import int8_gemm, native_kernels  # noqa: E402
from parity.devices.row_argmax import row_argmax  # noqa: E402

VOCAB, HIDDEN = 129_280, 256


def interleaved(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (best ms, median ms)} of ``rounds`` calls of each function, called in turn (A B A B)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t) * 1e3, statistics.median(t) * 1e3) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    native = native_kernels.load()
    g = torch.Generator().manual_seed(0)
    wq = torch.randint(-127, 128, (VOCAB, HIDDEN), dtype=torch.int8, generator=g)
    ws = torch.rand(VOCAB, generator=g) * 0.01
    wf = torch.randn(VOCAB, HIDDEN, generator=g)
    wb = wf.to(torch.bfloat16)
    torch._dynamo.config.recompile_limit = 64  # one graph per (rows, dtype, threads): not eager past 8
    reduce_head = torch.compile(lambda x, w: (w.to(x.dtype)[:, None, :] * x[None, :, :]).sum(-1).t(), dynamic=False)
    built = f"loaded ({native_kernels.loaded_isa()} build)" if native else "unavailable"
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, C++ ops {built}")
    print("| op | rows | threads | A | B | A best / median ms | B best / median ms | A / B (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for rows in (1, 4, 8):
            logits = torch.randn(rows, VOCAB, generator=g)
            assert torch.equal(row_argmax(logits), logits.argmax(-1))
            pairs = [
                ("argmax", "torch.argmax", "row_argmax", lambda x=logits: x.argmax(-1), lambda x=logits: row_argmax(x))
            ]
            xq = torch.randint(-127, 128, (rows, HIDDEN), dtype=torch.int8, generator=g)
            xs = torch.rand(rows, generator=g) * 0.05

            def int_mm(xq=xq, xs=xs):
                return int8_gemm.rescale_sums(torch._int_mm(xq, wq.t()), xs, ws[None, :], torch.float32)

            if native:

                def two_pass(xq=xq, xs=xs):
                    return int8_gemm.rescale_sums(native_kernels.int8_gemm(xq, wq), xs, ws[None, :], torch.float32)

                def fused(xq=xq, xs=xs):
                    return native_kernels.int8_linear(xq, xs, wq, ws)

                assert torch.equal(two_pass(), fused())
                pairs.append(("int8 head", "int8_gemm + rescale", "int8_linear", two_pass, fused))
                pairs.append(("int8 head", "_int_mm + rescale", "int8_linear", int_mm, fused))
                x = torch.randn(rows, HIDDEN, generator=g)
                for w, name in ((wf, "fp32 head"), (wb, "bf16 head")):
                    ref = x.double() @ w.double().t()
                    for fn in (reduce_head, native_kernels.float_linear):
                        err = (fn(x, w).double() - ref).abs().max() / ref.abs().max()
                        assert err < 1e-4, f"{name}: {fn} differs from the float64 sums by {err:.1e}"
                    pairs.append(
                        (
                            name,
                            "inductor reduce",
                            "float_linear",
                            lambda x=x, w=w: reduce_head(x, w),
                            lambda x=x, w=w: native_kernels.float_linear(x, w),
                        )
                    )
                pairs.append(
                    (
                        "fp32 head",
                        "oneDNN",
                        "float_linear",
                        lambda x=x: torch.ops.mkldnn._linear_pointwise(x, wf, None, "none", [], ""),
                        lambda x=x: native_kernels.float_linear(x, wf),
                    )
                )
            for op, a, b, fa, fb in pairs:
                t = interleaved({a: fa, b: fb}, args.rounds)
                (ba, ma), (bb, mb) = t[a], t[b]
                cells = [op, rows, threads, a, b, f"{ba:.3f} / {ma:.3f}", f"{bb:.3f} / {mb:.3f}", f"{ma / mb:.2f}"]
                print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
