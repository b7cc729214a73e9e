"""Speed of the training planner: one `plan train` (target < 2 s on 2 CPU cores) in-process and as a CLI
command (the CLI figure includes Python start-up and `parity` imports), and the five-chip `compare train`.

Run: .venv/bin/python benchmarks/bench_plan_train.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _cli(args: list[str]) -> float:
    exe = Path(sys.executable).with_name("parity")
    t = time.perf_counter()
    subprocess.run([str(exe), *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    t0 = time.perf_counter()
    from parity.plan.train_search import plan_train
    from parity.plan.train_validate import report

    report()  # fits and leave-one-out used for provenance
    t_warm = time.perf_counter() - t0
    t = time.perf_counter()
    plan_train("v4-flash", "910c", 8192, "33T", 4096)
    t_flash = time.perf_counter() - t
    t = time.perf_counter()
    plan_train("v4-pro", "h800", 8192, "33T", 4096)
    t_pro = time.perf_counter() - t
    cli = _cli(
        [
            "plan",
            "train",
            "--model",
            "v4-flash",
            "--hardware",
            "910c",
            "--num-devices",
            "8192",
            "--tokens",
            "33T",
            "--seq-len",
            "4096",
        ]
    )
    cli_cmp = _cli(["compare", "train", "--hardware", "910b3,910c,h800,h100,b200"])
    print(f"imports + fit/LOO warm-up               {t_warm:6.2f} s")
    print(f"plan train v4-flash on 8192 x 910c      {t_flash:6.2f} s   target < 2 s")
    print(f"plan train v4-pro on 8192 x h800        {t_pro:6.2f} s")
    print(f"CLI parity plan train (wall)            {cli:6.2f} s")
    print(f"CLI parity compare train 5 chips (wall) {cli_cmp:6.2f} s")


if __name__ == "__main__":
    main()
