"""`parity plan train`, `parity compare train`, `parity validate --train` (torch-free; docs/plan.md, Training).

`parity.cli` maps the two-word commands `plan train` / `compare train` onto the sub-commands registered
here (`TWO_WORD_COMMANDS`); `parity validate --train` is dispatched by `parity.plan.plan_cli`.
"""

from __future__ import annotations

import argparse
import json

#: (first word, second word) -> registered sub-command name.
TWO_WORD_COMMANDS = {("plan", "train"): "plan-train", ("compare", "train"): "compare-train"}
EPILOG = "exit codes: 0 a layout was found, 2 bad input or a cluster too small to hold the model (one line)"


def _common(p) -> None:
    p.add_argument(
        "--model",
        default="v4-flash",
        help="preset (v4-flash, v4-pro), real-size checkpoint dir, or deepseek-v3 (default v4-flash)",
    )
    p.add_argument("--num-devices", type=int, default=8192, help="chips in the cluster (default 8192)")
    p.add_argument("--tokens", default="33T", help="training tokens, e.g. 33T, 14.8T, 500B (default 33T)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument(
        "--global-batch-tokens",
        default=None,
        help="tokens per optimizer step (default 16,384 x 4,096, about DeepSeek-V3's final batch)",
    )
    p.add_argument("--pue", type=float, default=1.2, help="data-centre PUE for the energy estimate (default 1.2)")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub) -> None:
    p = sub.add_parser(
        "plan-train",
        prog="parity plan train",
        epilog=EPILOG,
        description="fastest training layout of a model on a cluster: tokens/s per chip, MFU, days, "
        "chip-hours, energy, cost (modeled)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hardware", required=True, help="catalog id, e.g. 910c, h800 (see parity/data/hardware)")
    _common(p)
    p.set_defaults(func=run_plan_train)
    c = sub.add_parser(
        "compare-train",
        prog="parity compare train",
        epilog=EPILOG,
        description="training time, energy and cost of one model on several accelerators (table; "
        "--out writes a PNG bar chart)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--hardware", required=True, help="comma-separated catalog ids, e.g. 910b3,910c,h800,h100,b200")
    c.add_argument("--out", default=None, metavar="plot.png", help="write a bar chart (days, MWh) as PNG")
    _common(c)
    c.set_defaults(func=run_compare_train)


def _plan(args, hardware: str) -> dict:
    from parity.plan.train_search import plan_train

    return plan_train(
        args.model, hardware, args.num_devices, args.tokens, args.seq_len, args.global_batch_tokens, args.pue
    )


def _opt(v, fmt: str, none: str) -> str:
    return none if v is None else fmt.format(v)


def format_plan(r: dict) -> str:
    """Human-readable `parity plan train` result; every figure names its provenance."""
    lay = r["layout"]
    prov = r["provenance"]
    layout = (
        f"TP{lay['tp']} x PP{lay['pp']} x DP{r['dp']} (CP{lay['cp']}), EP{lay['ep']}, {lay['schedule']}"
        + (f" x{lay['vpp']}" if lay["schedule"] == "interleaved" else "")
        + f", micro-batch {lay['micro_batch']} x {r['seq_len']} tokens x {r['micro_batches']} per replica, "
        f"recompute {lay['recompute']}, ZeRO-{lay['zero']}, {r['compute_dtype'].upper()} GEMMs"
        + (", EP traffic overlapped" if r["ep_overlapped"] else "")
    )
    price = (
        f"${r['usd'] / 1e6:,.2f} M at ${r['usd_per_chip_hour']:g}/chip-hour (catalog: {r['price_source']})"
        if r["usd"] is not None
        else "n/a (no public price for this chip in the catalog)"
    )
    energy = (
        f"{r['energy_mwh']:,.0f} MWh ({r['energy_basis']})"
        if r["energy_mwh"] is not None
        else "n/a (no TDP in the catalog)"
    )
    lines = [
        f"{r['model']} on {r['n_devices']:,} x {r['hardware_name']} [{r['hardware']}, {r['hardware_status']}], "
        f"{r['tokens'] / 1e12:g}T tokens, seq {r['seq_len']}, global batch {r['global_batch_tokens']:,.0f} tokens",
        f"provenance of every figure below unless named: {prov}",
        f"layout                {layout}",
        f"tokens/s per chip     {r['tokens_per_s_per_chip']:,.0f}",
        f"tokens/s cluster      {r['tokens_per_s_cluster'] / 1e6:,.2f} M",
        f"MFU                   {r['mfu'] * 100:.1f}% ({r['mfu_convention']}); {r['mfu_bf16'] * 100:.1f}% of BF16 peak",
        f"step time             {r['step_s']:.2f} s",
        f"days to train         {r['days']:,.1f}",
        f"chip-hours            {r['chip_hours'] / 1e6:,.3f} M",
        f"energy                {energy}",
        f"cost                  {price}",
        f"memory per chip       {r['memory_gb_per_chip']:,.1f} GB of {r['hbm_gb']:,.0f} GB HBM (catalog)",
        f"limiting resource     {r['limiting_resource']}",
        "step parts (s)        " + ", ".join(f"{k} {v:.2f}" for k, v in r["terms_s"].items() if v > 0),
    ]
    return "\n".join(lines)


def run_plan_train(args) -> int:
    """`parity plan train`: 0 with a layout; PlanError (exit 2) for bad input or a too-small cluster."""
    r = _plan(args, args.hardware)
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
    return 0


def _row(hw: str, args) -> dict:
    from parity.errors import PlanError

    try:
        return _plan(args, hw)
    except PlanError as e:
        if "cannot hold" not in str(e) and "no TP/PP/EP/CP layout" not in str(e):
            raise
        return {"hardware": hw, "error": str(e)}


def run_compare_train(args) -> int:
    """`parity compare train`: one plan per chip as a table (and a PNG with --out)."""
    from parity.errors import PlanError
    from parity.plan.report import dedupe_hardware

    names = [h.strip() for h in args.hardware.split(",") if h.strip()]
    if not names:
        raise PlanError("--hardware needs at least one catalog id")
    if args.out and not args.out.lower().endswith(".png"):
        raise PlanError(f"--out {args.out}: the training comparison is written as a PNG bar chart (.png)")
    names, notes = dedupe_hardware(names)
    rows = [_row(h, args) for h in names]
    if args.json:
        print(json.dumps({"rows": rows, "notes": notes}, indent=2))
    else:
        print(compare_table(rows) + "".join(f"\nnote: {n}" for n in notes))
    if args.out:
        _plot(rows, args.out)
        if not args.json:
            print(f"plot written to {args.out}")
    return 0


def compare_table(rows: list[dict]) -> str:
    """Text table of `parity compare train` rows (each row's provenance listed below it)."""
    head = (
        f"{'chip':8s} {'layout':30s} {'tok/s/chip':>10s} {'MFU':>6s} {'days':>7s} {'M chip-h':>9s} "
        f"{'MWh':>7s} {'$M':>7s}  limiting"
    )
    out, provs = [head], []
    for r in rows:
        if "error" in r:
            out.append(f"{r['hardware']:8s} {r['error']}")
            continue
        lay = r["layout"]
        lt = f"TP{lay['tp']} PP{lay['pp']} EP{lay['ep']} CP{lay['cp']} {lay['schedule']}"
        out.append(
            f"{r['hardware']:8s} {lt:30s} {r['tokens_per_s_per_chip']:10,.0f} {r['mfu'] * 100:5.1f}% "
            f"{r['days']:7,.1f} {r['chip_hours'] / 1e6:9,.3f} {_opt(r['energy_mwh'], '{:7,.0f}', '    n/a')} "
            f"{_opt(r['usd'] and r['usd'] / 1e6, '{:7,.2f}', '    n/a')}  {r['limiting_resource']}"
        )
        provs.append(f"{r['hardware']}: {r['provenance']}")
    return "\n".join(out + ["figures: " + "; ".join(provs)] if provs else out)


def _plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from parity.errors import PlanError

    ok = [r for r in rows if "error" not in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.bar([r["hardware"] for r in ok], [r["days"] for r in ok])
    a1.set_ylabel("days to train (modeled)")
    a2.bar([r["hardware"] for r in ok], [r["energy_mwh"] or 0 for r in ok])
    a2.set_ylabel("energy, MWh (modeled from TDP x PUE)")
    if ok:
        fig.suptitle(
            f"{ok[0]['model']}: {ok[0]['tokens'] / 1e12:g}T tokens on {ok[0]['n_devices']:,} chips", fontsize=10
        )
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise PlanError(f"--out {out}: cannot write the plot: {e}") from None
    finally:
        plt.close(fig)


def run_validate_train(args) -> int:
    """`parity validate --train`: every published training run, predicted vs published, LOO."""
    from parity.plan.train_validate import report

    r = report()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"predicted = modeled:{r['model_version']}; published = published:<source id> converted to tokens/s "
        "per chip (parity/data/published/training)"
    )
    print(
        f"{'entry':28s} {'chip':6s} {'chips':>6s} {'published':>10s} {'source id':21s} {'predicted':>10s} "
        f"{'error':>7s} {'LOO err':>7s} {'MFU':>6s}"
    )
    for x in r["rows"]:
        print(
            f"{x['id']:28s} {x['hardware']:6s} {x['n_devices']:6d} {x['published']:10,.0f} {x['source']:21s} "
            f"{x['predicted']:10,.0f} {x['error'] * 100:+6.1f}% {x['loo_error'] * 100:+6.1f}% {x['mfu'] * 100:5.1f}%"
        )
    print(
        f"MAPE {r['mape'] * 100:.1f}%, max |error| {r['max_abs_error'] * 100:.1f}%; leave-one-out MAPE "
        f"{r['loo_mape'] * 100:.1f}%, max {r['loo_max_abs_error'] * 100:.1f}%"
    )
    print("constants per hardware family (fitted on these runs; gemm_eff of dense peak, link_eff of link bandwidth):")
    for f, c in r["families"].items():
        print(
            f"  {f:14s} gemm_eff {c['gemm_eff']:.2f} link_eff {c['link_eff']:.2f}  ({c['entries']} entries, "
            f"MAPE {c['mape'] * 100:.1f}%, LOO {c['loo_mape'] * 100:.1f}%)"
        )
    print("sources: " + "; ".join(f"{k}: {v['url']}" for k, v in r["sources"].items()))
    return 0
