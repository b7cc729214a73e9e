"""Speed of the cost model: one `plan` (target < 2 s) and the six-chip `compare` (target < 10 s) on 2 CPU
cores, in-process and as CLI commands (the CLI figure includes Python start-up and `parity` imports).

Run: .venv/bin/python benchmarks/bench_plan.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cli(args: list[str]) -> float:
    exe = Path(sys.executable).with_name("parity")
    t = time.perf_counter()
    subprocess.run([str(exe), *args], check=False, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    t0 = time.perf_counter()
    from parity.plan.report import compare
    from parity.plan.search import Workload, plan
    from parity.plan.validate import report

    w = Workload(isl=4096, osl=1024, slo_ttft_ms=2000, slo_tpot_ms=50, target_qps=10)
    report()  # warm: validation summary used for provenance
    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    plan("v4-flash", "910c", w)
    t_plan = time.perf_counter() - t
    t = time.perf_counter()
    plan("v4-pro", "gb300", w)
    t_plan_pro = time.perf_counter() - t
    hw = "910b3,910c,h20,h800,h200,b200".split(",")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        compare("v4-flash", hw, w, out=str(Path(d) / "r.html"))
        t_cmp = time.perf_counter() - t
        cli_plan = _cli(
            [
                "plan",
                "--model",
                "v4-flash",
                "--hardware",
                "910c",
                "--isl",
                "4096",
                "--osl",
                "1024",
                "--slo-ttft-ms",
                "2000",
                "--slo-tpot-ms",
                "50",
            ]
        )
        cli_cmp = _cli(["compare", "--model", "v4-flash", "--hardware", ",".join(hw), "--out", str(Path(d) / "c.html")])
    print(f"imports + validation warm-up     {t_import:6.2f} s")
    print(f"plan v4-flash on 910c (in-proc)  {t_plan:6.2f} s   target < 2 s")
    print(f"plan v4-pro on gb300 (in-proc)   {t_plan_pro:6.2f} s")
    print(f"compare 6 chips + HTML (in-proc) {t_cmp:6.2f} s   target < 10 s")
    print(f"CLI parity plan (wall)           {cli_plan:6.2f} s")
    print(f"CLI parity compare 6 chips (wall){cli_cmp:6.2f} s")


if __name__ == "__main__":
    main()
