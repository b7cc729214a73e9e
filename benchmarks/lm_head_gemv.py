"""Decode GEMV/small-GEMM formulations on this device: ``F.linear`` (MKL), ``x @ W^T`` with W stored
transposed, oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) and, with ``--compiled``,
`parity.model.fast_linear.decode_linear` under torch.compile (inductor's reduction, or parity's C++ op
`native_kernels.float_linear` for large weights where it is built), for the LM head
(vocabulary x hidden) and the decode step's small projections, at 1 and 8 rows; with ``--bf16`` also a
bf16-stored weight under fp32 activations (`parity.model.fast_linear.widening_linear`, eager: the compiled
widening reduction for large weights, a transient upcast for small ones; and the whole-weight upcast +
``F.linear`` for comparison), the error then against the fp64 product of the bf16 values; with ``--fp8``
an FP8 e4m3 weight with 128x128 UE8M0-style block scales decoded in the loop by a compiled reduction
(the alternative to bf16 storage: half its bytes).

Each line: median and best of ``--repeat`` calls (wall), the weight read rate (GB/s) and the max abs
difference to an fp64 reference. Compare with benchmarks/read_bandwidth.py. The machine may be shared:
run several times, read medians. Provenance of every figure: measured.

Usage:
    .venv/bin/python benchmarks/lm_head_gemv.py [--threads 1,2] [--vocab 129280] [--hidden 256] [--repeat 30]
        [--compiled] [--bf16] [--fp8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.model.fast_linear import decode_linear  # noqa: E402


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2], ts[0]


def _fp8_reduction(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 @ (q [N, K] e4m3 * scale [N/128, K/128] per 128x128 tile)^T, decoded as loaded."""
    n, k = q.shape
    w = (q.float().view(n // 128, 128, k // 128, 128) * scale[:, None, :, None]).view(n, k)
    return (w[:, None, :] * x[None]).sum(-1).t()


fp8_loop = torch.compile(_fp8_reduction, dynamic=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--compiled", action="store_true", help="also the compiled decode_linear (compiles once)")
    ap.add_argument("--bf16", action="store_true", help="also bf16-stored weights with fp32 activations")
    ap.add_argument("--fp8", action="store_true", help="also FP8 e4m3 + block scales decoded in a compiled loop")
    a = ap.parse_args()
    compiled = None
    if a.compiled:
        # as in the model's compiled head: the weight (a parameter) static, several rows symbolic, 1 row specialised
        compiled = torch.compile(decode_linear, dynamic=None)
    shapes = [(a.vocab, a.hidden), (512, 256), (128, 256)]
    g = torch.Generator().manual_seed(0)
    for nt in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(nt)
        for n, k in shapes:
            w = torch.randn(n, k, generator=g) * 0.02
            wt = w.t().contiguous()
            for rows in (1, 8):
                x = torch.randn(rows, k, generator=g)
                if rows > 1:
                    torch._dynamo.mark_dynamic(x, 0)
                ref = (x.double() @ w.double().T).float()
                cands = {
                    "F.linear (MKL)": lambda x=x, w=w: F.linear(x, w),
                    "x @ W^T stored": lambda x=x, wt=wt: x @ wt,
                    "oneDNN": lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                }
                if compiled is not None:
                    cands["compiled"] = lambda x=x, w=w: compiled(x, w)
                refs = dict.fromkeys(cands, (ref, w.nbytes))
                if a.bf16:
                    wb = w.bfloat16()
                    ref_b = ((x.double() @ wb.double().T).float(), wb.nbytes)
                    cands["bf16 widening"] = lambda x=x, wb=wb: decode_linear(x, wb)
                    cands["bf16 upcast+MKL"] = lambda x=x, wb=wb: F.linear(x, wb.float())
                    refs.update({"bf16 widening": ref_b, "bf16 upcast+MKL": ref_b})
                if a.fp8 and n % 128 == 0 and k % 128 == 0:
                    q = (w * 64).to(torch.float8_e4m3fn)
                    sc = torch.full((n // 128, k // 128), 1 / 64)
                    ref_q = (x.double() @ (q.double() / 64).T).float()
                    cands["fp8 in-loop"] = lambda x=x, q=q, sc=sc: fp8_loop(x, q, sc)
                    refs["fp8 in-loop"] = (ref_q, q.nbytes + sc.numel())
                for name, fn in cands.items():
                    med, best = _time(fn, a.repeat)
                    r, nbytes = refs[name]
                    err = (fn() - r).abs().max().item()
                    print(
                        f"threads {nt} W {n}x{k} rows {rows}: {name:16s} median {med * 1e3:8.3f} ms "
                        f"best {best * 1e3:8.3f} ms = {nbytes / best / 1e9:5.1f} GB/s  err {err:.1e}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
