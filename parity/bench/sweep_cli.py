"""`parity bench sweep`: the command line of `parity.bench.sweep` (results, ``sweep.json`` and the report)."""

from __future__ import annotations

SWEEP_EPILOG = """example:
  parity bench sweep --base-url http://127.0.0.1:8000 --hardware 910c --num-devices 8 \\
      --concurrency 1,4,16,64,256 --isl-osl 1024/1024,8192/1024 --slo ttft_ms=2000,tpot_ms=50 --out-dir results/
writes results/<point>.json per point, results/sweep.json and results/report.html (+ .png)"""


def _float_list(v: str) -> list[float]:
    import argparse
    import math

    out = []
    for x in v.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            out.append(math.inf if x.lower() in ("inf", "infinity") else float(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated requests/s like 1,2,4,inf, got {v!r}") from None
    return out


def _conc_list(v: str) -> list[int]:
    import argparse

    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated concurrencies like 1,4,16, got {v!r}") from None


def _pairs(v: str) -> list[tuple[int, int]]:
    import argparse

    out = []
    for item in (x.strip() for x in v.split(",") if x.strip()):
        a, sep, b = item.partition("/")
        try:
            isl, osl = int(a), int(b)
        except ValueError:
            isl = osl = 0
        if not sep or isl < 1 or osl < 1:
            raise argparse.ArgumentTypeError(f"expected ISL/OSL pairs like 1024/128,8192/1024, got {item!r}")
        out.append((isl, osl))
    return out


def register_sweep(rsub, add_run_args, config_from_args) -> None:
    """Add `sweep` under `parity bench`, with the run flags `add_run_args` defines (`parity bench`'s, passed in
    by `parity.bench.bench_cli`) and `config_from_args` to turn them into a `BenchConfig`."""
    import argparse

    s = rsub.add_parser(
        "sweep",
        help="sweep concurrency / request rate (and ISL/OSL pairs) to the throughput-latency frontier",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    add_run_args(s)
    s.add_argument(
        "--concurrency",
        type=_conc_list,
        default=None,
        metavar="C1,C2,...",
        help="max-concurrency of each point (closed loop), e.g. 1,4,16,64",
    )
    s.add_argument(
        "--request-rate",
        dest="request_rates",
        type=_float_list,
        default=None,
        metavar="R1,R2,...",
        help="request rate of each point (req/s, 'inf' allowed); with --concurrency: every combination",
    )
    s.add_argument(
        "--isl-osl",
        type=_pairs,
        default=None,
        metavar="I/O,...",
        help="input/output token lengths, one sweep per pair (random or fixed --workload)",
    )
    s.add_argument(
        "--out-dir",
        required=True,
        metavar="DIR",
        help="directory for the per-point results, sweep.json and report.html",
    )
    s.add_argument("--no-report", action="store_true", help="do not write report.html / report.png")
    s.set_defaults(func=run_sweep_cmd, make_config=config_from_args)


def run_sweep_cmd(args) -> int:
    """`parity bench sweep`: 0 when every point completed at least one request, 1 otherwise."""
    from pathlib import Path

    from parity.bench.sweep import run_sweep

    args.request_rate = float("inf")  # per point, from the --request-rate list
    cfg = args.make_config(args)
    index = run_sweep(cfg, args.concurrency, args.request_rates, args.isl_osl, args.out_dir)
    for p in index["points"]:
        print(
            f"{p['file']:36s} {p['output_tok_s_per_device'] or 0:10,.1f} tok/s/device  "
            f"{p['tok_s_per_user'] or 0:8,.1f} tok/s/user  ({p['basis']})"
        )
    for pair, why in index["stopped"].items():
        print(f"sweep {pair} stopped {why}")
    if not args.no_report:
        from parity.bench.report import write_report

        files = [str(Path(args.out_dir) / p["file"]) for p in index["points"]]
        html = write_report(files, Path(args.out_dir) / "report.html")
        write_report(files, Path(args.out_dir) / "report.png")
        print(f"report written to {html}")
    return 0 if index["points"] and all(p["tok_s_per_user"] is not None for p in index["points"]) else 1
