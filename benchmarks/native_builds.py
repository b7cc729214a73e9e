"""Side by side, in one run: parity's C++ CPU ops built for each instruction set this CPU runs.

`parity.devices.native_kernels` builds its ops for the widest instruction set of the CPU (``generic``,
``avx2``, ``avx512``, ``avx512vnni``; `native_kernels.cpu_isa`). This script times every build this CPU
runs from ``avx2`` up (or the ones given with ``--isas``) on the decode shapes of the benchmark miniature
(benchmarks/vs_llamacpp.py): the LM head 129,280 x 256 at 1, 4 and 8 rows as fp32 and bf16
(`float_linear`) and as int8 with the fused rescale (`int8_linear`), and the gathered W8A8 routed experts
(`int8_gathered_linear`, 48 rows over 64 experts of 512 x 256). Each build runs in a process of its own
(all register the same op names), the processes interleaved A B, B A, ... for ``--rounds`` rounds; each
process prints the median of 15 calls per op (ms); the table gives the median over rounds per build and
the ratio of each build to the first (> 1: the first is slower). The int8 sums are exact on every build
and the AVX2 and AVX-512 builds' float products share one summation order, so the processes' outputs are
compared bit for bit too (the generic build sums in order: its float outputs differ).

Usage:
    .venv/bin/python benchmarks/native_builds.py [--isas avx2,avx512vnni] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity.devices import native_kernels  # noqa: E402

VOCAB, HIDDEN = 129_280, 256
EXPERTS, EXPERT_ROWS, GATHERED_ROWS = 64, 512, 48

_WORKER = """
import hashlib, json, statistics, sys, time, torch
from parity.devices import native_kernels as nk
torch.set_num_threads(int(sys.argv[1]))
assert nk.load(), "the C++ ops did not load"
VOCAB, HIDDEN, E, NE, R = map(int, sys.argv[2:7])
g = torch.Generator().manual_seed(0)
w = torch.randn(VOCAB, HIDDEN, generator=g); wb = w.bfloat16()
wq = torch.randint(-127, 128, (VOCAB, HIDDEN), generator=g, dtype=torch.int8); ws = torch.rand(VOCAB, generator=g) + 0.5
we = torch.randint(-127, 128, (E, NE, HIDDEN), generator=g, dtype=torch.int8); wes = torch.rand(E, NE, generator=g)
times, digest = {}, hashlib.sha256()
def timed(name, fn, n=15):
    digest.update(fn().numpy().tobytes())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    times[name] = statistics.median(ts) * 1e3
for m in (1, 4, 8):
    x = torch.randn(m, HIDDEN, generator=g)
    xq = torch.randint(-127, 128, (m, HIDDEN), generator=g, dtype=torch.int8); xs = torch.rand(m, generator=g)
    timed(f"fp32 head, {m} row(s)", lambda: nk.float_linear(x, w))
    timed(f"bf16 head, {m} row(s)", lambda: nk.float_linear(x, wb))
    timed(f"int8 head, {m} row(s)", lambda: nk.int8_linear(xq, xs, wq, ws))
xr = torch.randint(-127, 128, (R, HIDDEN), generator=g, dtype=torch.int8)
xrs, ids = torch.rand(R, generator=g), torch.randint(0, E, (R,), generator=g)
timed(f"gathered W8A8 experts, {R} rows", lambda: nk.int8_gathered_linear(xr, xrs, we, wes, ids), n=50)
print(json.dumps({"isa": nk.loaded_isa(), "times": times, "digest": digest.hexdigest()}))
"""


def run_build(isa: str, threads: int) -> dict:
    """One worker process with ``PARITY_NATIVE_ISA=isa``: its times (ms) and the digest of its outputs.
    Raises SystemExit with the worker's error when it fails."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, native_kernels.ISA_SWITCH: isa, "PYTHONPATH": path}
    shapes = [str(v) for v in (VOCAB, HIDDEN, EXPERTS, EXPERT_ROWS, GATHERED_ROWS)]
    cmd = [sys.executable, "-c", _WORKER, str(threads), *shapes]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the {isa} build's worker failed:\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if out["isa"] != isa:
        raise SystemExit(f"asked for the {isa} build, the worker loaded {out['isa']} (a failed build fell back)")
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main() -> int:
    order = list(native_kernels.ISA_FLAGS)
    widest = native_kernels._widest_isa()  # the CPU's own, whatever $PARITY_NATIVE_ISA says (set per worker)
    runs_here = order[: order.index(widest) + 1]
    default = runs_here[runs_here.index("avx2") :] if "avx2" in runs_here else runs_here
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--isas",
        default=",".join(default),
        help=f"comma-separated builds, the first the baseline (this CPU runs {', '.join(runs_here)}; "
        f"default {','.join(default)})",
    )
    ap.add_argument("--threads", type=_positive, default=1, help="torch intra-op threads of each worker")
    ap.add_argument("--rounds", type=_positive, default=3, help="interleaved rounds (>= 1)")
    a = ap.parse_args()
    isas = list(dict.fromkeys(i.strip().lower() for i in a.isas.split(",") if i.strip()))  # in order, once each
    for isa in isas:
        if isa not in runs_here:
            ap.error(f"--isas: {isa!r} is not a build this CPU runs ({', '.join(runs_here)})")
    if len(isas) < 2:
        ap.error(f"--isas: need two different builds or more to compare; this CPU runs {', '.join(runs_here)}")
    runs: dict[str, list[dict]] = {isa: [] for isa in isas}
    for r in range(a.rounds):
        for isa in isas if r % 2 == 0 else isas[::-1]:  # A B, B A, ...
            runs[isa].append(run_build(isa, a.threads))
        print(f"# round {r + 1}/{a.rounds} done", flush=True)
    digests = {isa: {run["digest"] for run in rs} for isa, rs in runs.items()}
    same = len(set().union(*digests.values())) == 1
    print(
        f"# torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, widest build "
        f"{widest}, {a.threads} thread(s), medians over {a.rounds} interleaved rounds of per-process medians (ms); "
        f"outputs {'bit-identical across builds' if same else 'DIFFER across builds'}"
    )
    base = isas[0]
    print("| op | " + " | ".join(isas) + " | " + " | ".join(f"{base} / {i}" for i in isas[1:]) + " |")
    print("|---" * (2 * len(isas)) + "|")
    for op in runs[base][0]["times"]:
        med = {isa: statistics.median(run["times"][op] for run in runs[isa]) for isa in isas}
        ratios = " | ".join(f"{med[base] / med[i]:.2f}" for i in isas[1:])
        print(f"| {op} | " + " | ".join(f"{med[i]:.2f}" for i in isas) + f" | {ratios} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
