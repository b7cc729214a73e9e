"""`parity bench` (run a benchmark against an OpenAI-compatible endpoint) and `parity bench report`.

Heavy imports (httpx, numpy, matplotlib, rich) happen inside the command functions.
"""

from __future__ import annotations

import math
from pathlib import Path

EPILOG = """workloads (--workload):
  random:in=1024,out=128,ratio=0.5,convention=vllm   lengths uniform in [floor(L(1-r)), ceil(L(1+r))]
  random:in=1024,out=128,ratio=0.5,convention=sglang lengths uniform in [max(int(L*r),1), L]
  fixed:in=1024,out=128                               exact lengths
  sharegpt:PATH[,out=N]                               ShareGPT JSON (first turn = prompt)
  trace:PATH                                          JSONL {"arrival_s","input_len","output_len"}
  prefix:num_prefixes=N,prefix_len=L,suffix_len=S,out=O   N shared prefixes + unique suffixes (prefix caching)
  multiturn:PATH[,turns=T][,out=N]                    ShareGPT conversations replayed turn by turn with history
  mooncake:PATH[,block=512]                           Mooncake/AIPerf trace JSONL (timestamp, lengths, hash_ids)
sweep:   parity bench sweep --concurrency 1,4,16 --isl-osl 1024/128 --out-dir results/ ...
report:  parity bench report run1.json run2.json --out report.html   (or .png)
"""


def _rate(v: str) -> float:
    import argparse

    if v.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        r = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of requests/s or 'inf', got {v!r}") from None
    if not r > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or 'inf', got {v!r}")
    return r


def _int_list(v: str) -> list[int]:
    import argparse

    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated device indices like 0,1, got {v!r}") from None


def register(sub) -> None:
    """Add `bench` (with its `report` sub-command) to the parity CLI."""
    import argparse

    p = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible endpoint (latency, throughput, goodput, energy)",
        description="Drive an OpenAI-compatible server (parity, vLLM, SGLang, MindIE, ...) with a "
        "workload and report TTFT/TPOT/ITL/E2EL, throughput, goodput and energy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_args(p)
    p.add_argument("--output", default=None, metavar="results.json", help="write the versioned JSON result here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (default: refuse)")
    p.set_defaults(func=run)
    rsub = p.add_subparsers(dest="bench_command", metavar="{report,sweep}")
    r = rsub.add_parser("report", help="HTML/PNG report (latency CDFs, throughput vs latency) from result files")
    r.add_argument(
        "results",
        nargs="+",
        metavar="results.json",
        help="result files, directories of them, or a sweep's sweep.json (its point files)",
    )
    r.add_argument("--out", required=True, metavar="report.html", help="output file, .html or .png")
    r.set_defaults(func=run_report)
    from parity.bench.sweep_cli import register_sweep

    register_sweep(rsub, add_run_args, config_from_args)


def add_run_args(p) -> None:
    """The flags of one run (shared by `parity bench` and `parity bench sweep`)."""
    p.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument(
        "--model",
        default=None,
        help="model name to put in each request (default: the first model the server lists at "
        "GET /v1/models, asked with --api-key)",
    )
    p.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions (default chat)",
    )
    p.add_argument(
        "--workload",
        default="random:in=1024,out=128",
        metavar="SPEC",
        help="random|fixed|sharegpt|trace|prefix|multiturn|mooncake spec, see below (default random:in=1024,out=128)",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        metavar="N",
        help="requests to send (default 1000 for random/fixed, all entries of a file)",
    )
    p.add_argument(
        "--request-rate",
        type=_rate,
        default=math.inf,
        metavar="R",
        help="mean requests/s (gamma arrivals) or 'inf' to send all at once (default inf)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        metavar="B",
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 steadier (default 1)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=None, metavar="C", help="cap on requests in flight (default: unbounded)"
    )
    p.add_argument("--warmup", type=int, default=0, metavar="N", help="warm-up requests before the measured run")
    p.add_argument(
        "--slo",
        default=None,
        metavar="ttft_ms=..,tpot_ms=..",
        help="SLOs for goodput: comma-separated key=value pairs, keys ttft_ms, tpot_ms, e2el_ms "
        "(milliseconds); an empty value or empty item is an error",
    )
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (vLLM/SGLang extension)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrivals (default 0)")
    p.add_argument(
        "--energy",
        default="auto",
        metavar="auto|none|nvml,npu-smi,rapl,dcmi",
        help="energy meters of this machine: auto (accelerator meter + CPU RAPL when readable), none, "
        "or a comma list (default auto)",
    )
    p.add_argument(
        "--energy-devices",
        type=_int_list,
        default=None,
        metavar="0,1",
        help="accelerator indices to meter (default all)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer.json to build/count prompts (default parity's DeepSeek-V4 tokenizer)",
    )
    p.add_argument("--api-key", default=None, help="bearer token (default $OPENAI_API_KEY if set)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="total time in s one request may take, from sending it to the end of its stream; a slower one "
        "counts as failed (timeout) (default 600)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0)")
    p.add_argument(
        "--no-continuous-usage",
        action="store_true",
        help="do not ask for usage in every chunk (for servers rejecting stream_options.continuous_usage_stats)",
    )
    p.add_argument(
        "--client-workers",
        type=int,
        default=1,
        metavar="N",
        help="client processes sharing the load (default 1; raise it when the client's CPU is the limit)",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the check that the server answers GET /v1/models and serves --model",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--hardware",
        default=None,
        metavar="ID",
        help="the server's accelerator, a catalog id or alias (910c, h200, ...; see parity/data/hardware), "
        "recorded in the metadata for per-device and modeled figures",
    )
    p.add_argument(
        "--num-devices",
        type=int,
        default=None,
        metavar="N",
        help="accelerators serving the endpoint (per-device figures divide by it; default 1)",
    )
    p.add_argument(
        "--idle-baseline",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds of idle power read before the run and subtracted from the steady-state energy "
        "(default 5; 0 = none; only when a meter is readable)",
    )
    p.add_argument(
        "--plan-model",
        default=None,
        metavar="PRESET",
        help="the planner's preset for the served model (v4-flash, v4-pro) for modeled-vs-measured "
        "figures (default: guessed from the model name)",
    )


def run(args) -> int:
    """`parity bench`: returns 0 on success, 1 when no request completed, 130 when interrupted (results saved)."""
    from parity.bench.result import check_output_path
    from parity.bench.runner import run_bench
    from parity.bench.workloads import parse_workload, shortest_request_tokens
    from parity.errors import BenchError

    cfg = config_from_args(args)
    if args.output:
        check_output_path(args.output)  # before any request: a run is not lost to a typo in the path
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise BenchError(f"--output {args.output} exists; pass --overwrite to replace it, or choose another file")
    cfg.validate(need_model=False)  # bad flags first: no network for a typo
    ws = parse_workload(cfg.workload)
    if cfg.model and not args.no_preflight:
        limit = preflight(cfg.base_url, cfg.model, cfg.auth_headers(), min(cfg.timeout_s, 10.0))
        need = shortest_request_tokens(ws)
        if limit is not None and need is not None and need > limit:
            raise BenchError(
                f"--workload {cfg.workload!r}: every request needs at least {need} tokens (prompt + output), "
                f"more than the max_model_len {limit} that the server reports for --model {cfg.model!r}"
            )
    result = run_bench(cfg)
    from parity.bench.result import render_table

    render_table(result)
    if args.output:
        print(f"results written to {args.output}")
    if result.get("interrupted"):
        return 130
    return 0 if result["summary"]["completed"] > 0 else 1


def config_from_args(args):
    """`BenchConfig` from parsed `add_run_args` flags.

    Raises:
        BenchError: --base-url missing.
    """
    import sys

    from parity.bench.run_config import BenchConfig
    from parity.errors import BenchError

    if not args.base_url:
        raise BenchError("--base-url is required, e.g. --base-url http://127.0.0.1:8000")
    return BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        workload=args.workload,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        slo=args.slo,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        energy=args.energy,
        energy_devices=args.energy_devices,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        timeout_s=args.timeout,
        temperature=args.temperature,
        continuous_usage=not args.no_continuous_usage,
        output=getattr(args, "output", None),
        progress=not args.no_progress,
        client_workers=args.client_workers,
        hardware=args.hardware,
        num_devices=args.num_devices,
        idle_baseline_s=args.idle_baseline if args.energy.strip().lower() != "none" else 0.0,
        plan_model=args.plan_model,
        command_line=getattr(args, "command_line", None) or ["parity", *sys.argv[1:]],
    )


def preflight(base_url: str, model: str, headers: dict, timeout_s: float = 10.0) -> int | None:
    """Check, before any request is timed, that the server answers `GET /v1/models` and lists `model`.

    A server without that route (404/405) is given the benefit of the doubt.

    Returns:
        the ``max_model_len`` (tokens) the server lists for `model` (vLLM and parity do), else None.

    Raises:
        BenchError: the server is unreachable or times out, answers another HTTP error (e.g. 401 for a wrong
            key) or something that is not a model list (`openai_client.model_entries`), or does not list
            `model` (the message lists what it serves).
    """
    from parity import openai_client
    from parity.errors import BenchError

    entries = openai_client.model_entries(base_url, headers, timeout_s, BenchError)
    if entries is None:
        return None
    listed = {str(m["id"]): m for m in entries}
    if listed and model not in listed:
        raise BenchError(f"--model {model!r} is not served at {base_url}; it serves: {', '.join(listed)}")
    limit = listed[model].get("max_model_len") if model in listed else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def run_report(args) -> int:
    """`parity bench report`: write the HTML/PNG report; returns 0."""
    from parity.bench.report import write_report

    out = write_report(args.results, args.out)
    print(f"report written to {out}")
    return 0
