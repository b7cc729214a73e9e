"""`parity plan`, `parity estimate`, `parity compare`, `parity validate` (torch-free; see docs/plan.md)."""

from __future__ import annotations

import json
import math

PLAN_EPILOG = """exit codes: 0 a deployment meets the SLOs, 1 none does (the reason names the limiting resource),
            2 bad input (one-line error)"""
COMPARE_EPILOG = """exit codes: 0 at least one chip meets the SLOs, 1 no chip does (the table and the report are
            still written), 2 bad input (one-line error)"""


def register(sub) -> None:
    import argparse

    p = sub.add_parser(
        "plan",
        help="best deployment of a model on one accelerator under TTFT/TPOT SLOs (modeled)",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _workload_args(p)
    p.add_argument("--hardware", required=True, help="catalog id, e.g. 910c, h800, gb200 (see parity/data/hardware)")
    p.add_argument("--target-qps", type=float, default=None, help="load to size the deployment for (requests/s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--calibrate",
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="opt-in: refit the hardware family's constants on these parity bench results (files or "
        "directories) first; figures are labelled calibrated:<results>",
    )
    _measured_setup_args(p)
    p.set_defaults(func=run_plan)

    c = sub.add_parser(
        "compare",
        help="compare accelerators: table + Pareto frontier (HTML report)",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _workload_args(c, calibrate=False)
    c.add_argument("--hardware", required=True, help="comma-separated catalog ids, e.g. 910b3,910c,h20,h800,h200,b200")
    c.add_argument(
        "--out",
        default=None,
        metavar="report.html|plot.png",
        help="write the report here: .html = table + frontier plot, .png = frontier plot only",
    )
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=run_compare)

    e = sub.add_parser(
        "estimate",
        help="figures of one fixed deployment (no search; modeled, with per-class error)",
        epilog="exit codes: 0 ok, 2 bad input (one-line error)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _estimate_args(e)
    e.set_defaults(func=run_estimate)

    v = sub.add_parser("validate", help="model vs every published measurement: errors, MAPE, leave-one-out")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.add_argument("--fit", action="store_true", help="also print the constants a fresh fit would choose")
    v.add_argument("--train", action="store_true", help="validate the training model on published training runs")
    v.add_argument(
        "--measured",
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="parity bench result files or directories: the planner's prediction for each measured "
        "point next to the measurement",
    )
    v.add_argument(
        "--model", default=None, help="with --measured: planner preset of the served model (default: from each result)"
    )
    _measured_setup_args(v)
    v.set_defaults(func=run_validate)


def _measured_setup_args(p) -> None:
    """Deployment flags a bench result does not record (used by --measured and --calibrate)."""
    from parity.plan.estimate import QUANTIZATION

    p.add_argument(
        "--measured-tp",
        type=int,
        default=1,
        metavar="TP",
        help="with --measured/--calibrate: attention TP of the measured deployment (default 1)",
    )
    p.add_argument(
        "--measured-quantization",
        choices=tuple(QUANTIZATION),
        default="fp4",
        help="with --measured/--calibrate: weight quantization of the measured deployment (default fp4)",
    )


#: Planner model of `parity plan` / `compare` without --model.
DEFAULT_PLAN_MODEL = "v4-flash"


def _workload_args(p, calibrate: bool = True) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="preset (v4-flash, v4-pro), checkpoint dir of a real-size config, or deepseek-v3/r1 "
        f"(default {DEFAULT_PLAN_MODEL}; miniatures such as the tiny test preset are refused)"
        + ("; with --calibrate, also the planner preset of results that record none" if calibrate else ""),
    )
    p.add_argument("--isl", type=int, default=4096, help="input length (tokens)")
    p.add_argument("--osl", type=int, default=1024, help="output length (tokens)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="time-to-first-token SLO (ms)")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="time-per-output-token SLO (ms)")
    p.add_argument(
        "--prefix-hit-rate", type=float, default=0.0, help="fraction of prompt tokens in the prefix cache ([0, 1))"
    )


def _on_off(v: str) -> bool:
    import argparse

    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")
    return v == "on"


def _mtp(v: str) -> int:
    import argparse

    if v == "off":
        return 0
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"expected off or a number of draft tokens, got {v!r}")
    return int(v)


def _estimate_args(p) -> None:
    from parity.plan.estimate import MAX_NUM_BATCHED_TOKENS, PHASES, QUANTIZATION

    p.add_argument(
        "--model", default="v4-flash", help="preset (v4-flash, v4-pro), real-size checkpoint dir, or deepseek-v3/r1"
    )
    p.add_argument("--hardware", required=True, help="catalog id or alias, e.g. 950pr, h200, gb300")
    p.add_argument(
        "--phase",
        choices=PHASES,
        default="serving",
        help="prefill instance, decode instance, or end-to-end serving (default)",
    )
    p.add_argument("--isl", type=int, default=4096, help="input length (tokens)")
    p.add_argument("--osl", type=int, default=1024, help="output length (tokens)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="attention TP degree")
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=None,
        help="attention DP degree (devices = TP x DP; default: --num-devices / TP, else 8)",
    )
    p.add_argument(
        "--num-devices",
        type=int,
        default=None,
        help="devices of the instance (sets --data-parallel-size = devices / TP)",
    )
    p.add_argument("--expert-parallel-size", type=int, default=0, help="EP degree; must equal TP x DP (default)")
    p.add_argument("--batch-per-device", type=float, default=None, help="decode sequences per device (> 0)")
    p.add_argument(
        "--concurrency",
        type=float,
        default=None,
        help="sequences in flight over the instance (> 0; 1 = single-stream latency)",
    )
    p.add_argument(
        "--tokens-per-device",
        type=float,
        default=None,
        help="prefill tokens per device per step (> 0; default: one prompt per TP group)",
    )
    p.add_argument(
        "--decode-context", type=float, default=None, help="decode KV length in tokens (> 0; default isl + osl/2)"
    )
    p.add_argument("--mtp", type=_mtp, default=0, help="off or K MTP draft tokens per step")
    p.add_argument(
        "--mtp-acceptance",
        type=float,
        default=0.0,
        help="acceptance rate per draft (<= 1) or expected accepted length per step (> 1)",
    )
    p.add_argument(
        "--quantization",
        choices=list(QUANTIZATION),
        default="fp4",
        help="weights: fp4 = V4's native FP4 experts + FP8 (default), w4a8, w8a8, fp8, bf16",
    )
    p.add_argument("--kv-cache-dtype", choices=["bf16", "fp8", "int8"], default="bf16", help="cache format")
    p.add_argument("--prefix-hit-rate", type=float, default=0.0, help="fraction of prompt tokens in the prefix cache")
    p.add_argument("--eplb", choices=["perfect", "default"], default="default", help="expert load balance")
    p.add_argument("--tbo", type=_on_off, default=True, help="two-batch overlap on|off")
    p.add_argument("--disagg", type=_on_off, default=False, help="disaggregated prefill/decode on|off")
    p.add_argument("--prefill-devices", type=int, default=0, help="prefill pool devices (with --disagg on)")
    p.add_argument("--decode-devices", type=int, default=0, help="decode pool devices (with --disagg on)")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert replicas (EPLB)")
    p.add_argument("--stack", default="", help="software stack: cuda-graphs, ascend-graph, eager (default by vendor)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=MAX_NUM_BATCHED_TOKENS,
        help="token budget per step: prefill chunk size (0 = the stack's default)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def setup_from_args(args):
    """`Setup` from parsed `parity estimate` arguments."""
    from parity.errors import PlanError
    from parity.plan.estimate import Setup

    tp, dp, n = args.tensor_parallel_size, args.data_parallel_size, args.num_devices
    given = {}
    for name in ("batch_per_device", "concurrency", "tokens_per_device", "decode_context"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):  # left out = derived; given = a real amount
            raise PlanError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v:g}")
        given[name] = v or 0.0
    if n is not None:
        if n < 1 or tp < 1 or n % tp:
            raise PlanError(f"--num-devices {n} must be a positive multiple of --tensor-parallel-size {tp}")
        if dp is not None and dp * tp != n:
            raise PlanError(
                f"--num-devices {n} != --tensor-parallel-size {tp} x --data-parallel-size {dp}; give two of the three"
            )
        dp = n // tp
    return Setup(
        model=args.model,
        hardware=args.hardware,
        phase=args.phase,
        isl=args.isl,
        osl=args.osl,
        tp=tp,
        dp=8 if dp is None else dp,
        ep=args.expert_parallel_size,
        **given,
        mtp=args.mtp,
        mtp_acceptance=args.mtp_acceptance,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        prefix_hit_rate=args.prefix_hit_rate,
        eplb=args.eplb,
        tbo=args.tbo,
        disagg=args.disagg,
        prefill_devices=args.prefill_devices,
        decode_devices=args.decode_devices,
        redundant_experts=args.redundant_experts,
        stack=args.stack,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def run_estimate(args) -> int:
    """`parity estimate`: every figure of one fixed deployment, each with its setup class's error."""
    from parity.plan.estimate import METRICS, estimate
    from parity.plan.hardware import get_hardware
    from parity.plan.validate import error_label, generation

    s = setup_from_args(args)
    r = estimate(s)
    fam, gen = get_hardware(s.hardware).family, generation(s.model)
    phase_of = {
        "ttft_ms": "prefill" if s.phase != "serving" or s.disagg else "serving",
        "input_tok_s_per_device": "prefill" if s.phase == "prefill" else s.phase,
    }
    r["provenance"] = {
        m: error_label(fam, phase_of.get(m, "decode" if s.phase != "serving" or s.disagg else "serving"), gen)
        for m in METRICS
        if m in r
    }
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"{s.model} on {s.hardware}: phase {s.phase}, isl {s.isl}, osl {s.osl}, TP{s.tp} x DP{s.dp} = "
        f"{s.n_devices} devices (EP{s.n_devices}), {s.quantization}, cache {s.kv_cache_dtype}, "
        f"MTP {s.mtp or 'off'}, prefix hits {s.prefix_hit_rate:g}"
    )
    for m, label in METRICS.items():
        if m in r:
            print(f"{label:36s} {r[m]:12,.2f}   {r['provenance'][m]}")
    for w in r.get("warnings", []):
        print(f"warning: {w}")
    return 0


def _workload(args):
    from parity.plan.search import Workload

    return Workload(
        isl=args.isl,
        osl=args.osl,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        target_qps=getattr(args, "target_qps", None),
        prefix_hit_rate=getattr(args, "prefix_hit_rate", 0.0),
    )


def _f(v, fmt="{:,.0f}", none="n/a"):
    return none if v is None else fmt.format(v)


def format_plan(r: dict) -> str:
    """Human-readable `parity plan` result (every figure labelled with its provenance)."""
    w = r["workload"]
    head = (
        f"{r['model']} on {r['hardware_name']} [{r['hardware']}, {r['hardware_status']}]  "
        f"isl {w['isl']}, osl {w['osl']}, prefix hits {w.get('prefix_hit_rate', 0):g}, "
        f"SLO TTFT {w['slo_ttft_ms']:g} ms, TPOT {w['slo_tpot_ms']:g} ms"
    )
    if not r["feasible"]:
        return f"{head}\n{r['reason']}\nprovenance: {r['provenance']}"
    d, p = r["decode"], r["prefill"]
    pf = r["provenance_by_figure"]
    lines = [head, f"mode                  {r['mode']}"]
    if r["mode"] == "disaggregated":
        lines.append(
            f"prefill instance      {p['n_devices']} devices, attention TP{p['attn_tp']} x DP{p['attn_dp']}, "
            f"EP{p['ep']}, {p['tokens_per_device']:,.0f} tokens per device per batch, weights "
            f"{p['dense_format']}/experts {p['expert_format']}, cache {p['kv_dtype']}"
        )
    lines.append(
        f"decode instance       {d['n_devices']} devices, attention TP{d['attn_tp']} x DP{d['attn_dp']}, "
        f"EP{d['ep']}, batch {d['batch_per_device']} per device, weights {d['dense_format']}/experts "
        f"{d['expert_format']}, cache {d['kv_dtype']}, MTP {d['mtp']}"
        + (f" (acceptance {d['mtp_acceptance']:.2f})" if d["mtp"] else "")
    )
    if r["mode"] == "colocated":
        lines.append(
            f"                      + prefill chunk of {p['tokens_per_device']:,.0f} tokens per device per step"
        )
    lines += [
        f"input tok/s per chip  {_f(r['input_tok_s_per_chip'])}  {pf['output_tok_s_per_chip']}",
        f"output tok/s per chip {_f(r['output_tok_s_per_chip'])}  {pf['output_tok_s_per_chip']}",
        f"TTFT                  {r['ttft_ms']:,.0f} ms  {pf['ttft_ms']}",
        f"TPOT                  {r['tpot_ms']:.1f} ms ({r['tok_s_per_user']:.1f} tok/s per user)  {pf['tpot_ms']}",
        f"tokens per joule      {_f(r['tokens_per_joule'], '{:.2f}')} ({r['tokens_per_joule_basis']})",
        f"$ per M output tokens {_f(r['usd_per_m_output_tokens'], '{:.3f}', 'n/a (no public price)')}",
    ]
    if "chips_for_target" in r:
        c = r["chips_for_target"]
        parts = ", ".join(f"{k} {v}" for k, v in c.items())
        lines.append(f"chips for {w['target_qps']:g} req/s   {parts}")
    return "\n".join(lines)


def run_plan(args) -> int:
    """`parity plan`: 0 when a deployment meets the SLOs, 1 when none does."""
    from parity.plan.measured import check_measured_tp
    from parity.plan.search import plan

    check_measured_tp(args.measured_tp)  # with or without --calibrate: a bad value is a mistake either way

    consts = None
    if args.calibrate:
        from parity.plan.calibrate import calibrate

        cal = calibrate(
            args.calibrate,
            args.hardware,
            default_model=args.model,
            tp=args.measured_tp,
            quantization=args.measured_quantization,
        )
        consts = cal["constants"] if cal["label"] else None
    r = plan(args.model or DEFAULT_PLAN_MODEL, args.hardware, _workload(args), consts=consts)
    if args.calibrate:
        r["calibration"] = cal
    if args.calibrate and cal["label"]:
        r["provenance"] = cal["label"]
        if "provenance_by_figure" in r:
            r["provenance_by_figure"] = dict.fromkeys(r["provenance_by_figure"], cal["label"])
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
    if args.calibrate and not args.json:
        print(_calibration_line(cal, args.calibrate))
    return 0 if r["feasible"] else 1


def _calibration_line(cal: dict, paths: list[str]) -> str:
    """One line on what `parity plan --calibrate` fitted (or that the measurements determined nothing)."""
    if not cal["label"]:
        return (
            f"calibration: the {len(cal['points'])} measured point(s) in {' '.join(map(str, paths))} determined "
            f"no constant; figures use the shipped {cal['family']} constants (modeled)"
        )
    return (
        "calibrated constants ("
        + ", ".join(
            f"{k} {v:.3f}{'' if cal['determined'][k] else ' (not determined by the data: shipped value)'}"
            for k, v in cal["constants"].items()
        )
        + f"); rms log error {cal['rms_log_error']:.3f}"
    )


def run_compare(args) -> int:
    """`parity compare`: 0 when some chip meets the SLOs, 1 when none does (table/report still written)."""
    from parity.errors import PlanError
    from parity.plan.report import compare

    names = [h.strip() for h in args.hardware.split(",") if h.strip()]
    if not names:
        raise PlanError("--hardware needs at least one catalog id")
    res = compare(args.model or DEFAULT_PLAN_MODEL, names, _workload(args), out=args.out)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(res["table_text"])
        if args.out:
            print(f"report written to {args.out}")
    return 0 if res["any_feasible"] else 1


def run_validate(args) -> int:
    if args.measured:
        return run_validate_measured(args)
    if args.train:
        from parity.plan.train_cli import run_validate_train

        return run_validate_train(args)
    from parity.plan.validate import fit_all, published, report

    r = report(loo=True)
    if args.fit:
        r["fitted_constants"] = fit_all(published()[0])
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"predicted = modeled:{r['model_version']}; published = published:<source id>; throughputs per device")
    print(
        f"{'entry':32s} {'class':28s} {'metric':24s} {'published':>10s} {'predicted':>10s} {'error':>7s} "
        f"{'LOO err':>7s}"
    )
    for x in r["rows"]:
        loo = f"{x['loo_error'] * 100:+6.1f}%" if "loo_error" in x else "    n/a"
        flag = "" if x["validate"] else "  (shown, not validated)"
        print(
            f"{x['id']:32s} {x['class']:28s} {x['metric']:24s} {x['published']:10,.1f} {x['predicted']:10,.1f} "
            f"{x['error'] * 100:+6.1f}% {loo}{flag}"
        )
    print(
        f"MAPE {r['mape'] * 100:.1f}%, max |error| {r['max_abs_error'] * 100:.1f}%; "
        f"leave-one-out MAPE {r['loo_mape'] * 100:.1f}%, max {r['loo_max_abs_error'] * 100:.1f}%"
    )
    print("leave-one-out error per setup class (hardware family / phase / model generation):")
    for c, v in r["classes"].items():
        print(f"  {c:32s} {v['n']:2d} entries  LOO MAPE {v['loo_mape'] * 100:5.1f}%  max {v['loo_max'] * 100:5.1f}%")
    print("sources: " + "; ".join(f"{k}: {v['url']}" for k, v in r["sources"].items()))
    print("calibration constants per hardware family (fractions of peak; parity/data/hardware/families.toml):")
    for f, c in r["constants"].items():
        print(
            f"  {f:17s} gemm {c['gemm_eff']:.2f} attn {c['attn_eff']:.2f} hbm {c['hbm_eff']:.2f} "
            f"link {c['link_eff']:.2f}"
        )
    if args.fit:
        print("fresh fit (not applied):")
        for f, c in r["fitted_constants"].items():
            print(f"  {f:17s} " + " ".join(f"{k} {v:.3f}" for k, v in c.items()))
    return 0


def run_validate_measured(args) -> int:
    """`parity validate --measured RESULTS`: prediction vs measurement per point and metric; returns 0."""
    from parity.plan.measured import compare, load_measured

    pts = load_measured(args.measured, model=args.model, tp=args.measured_tp, quantization=args.measured_quantization)
    rows = compare(pts)
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print(
        "predicted = modeled with the shipped family constants; measured = parity bench (steady state where "
        "the result has one)"
    )
    print(
        f"{'point':28s} {'hardware':10s} {'isl/osl':>12s} {'conc':>7s} {'metric':24s} {'measured':>10s} "
        f"{'predicted':>10s} {'error':>7s}"
    )
    for r in rows:
        print(
            f"{r['id']:28s} {r['n_devices']:>3d}x{r['hardware']:6s} {r['isl']:>6d}/{r['osl']:<5d} "
            f"{r['concurrency']:7.1f} {r['metric']:24s} {r['measured']:10,.2f} {r['predicted']:10,.2f} "
            f"{r['error'] * 100:+6.1f}%"
        )
    if rows:
        print(f"mean |error| {sum(abs(r['error']) for r in rows) / len(rows) * 100:.1f}% over {len(rows)} figures")
    return 0
