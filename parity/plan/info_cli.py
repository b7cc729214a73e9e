"""`parity info MODEL [--context N] [--json]`: parameters, layer schedule and cache sizes (no torch)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, layer schedule and KV-cache bytes of a model")
    p.add_argument("model", nargs="?", default="tiny", help="preset name (tiny, v4-flash, v4-pro) or checkpoint dir")
    p.add_argument("--context", type=int, default=65536, help="context length N for the total cache size (tokens)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def _fmt_n(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_b(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def run(args) -> int:
    from parity.config import load_config
    from parity.errors import ConfigError
    from parity.shapes import model_info

    if args.context < 0:
        raise ConfigError(f"--context must be >= 0 tokens, got {args.context}")
    cfg = load_config(args.model)
    info = model_info(cfg, args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["params"]
    print(f"model            {info['model']}")
    print(f"parameters       {_fmt_n(p['total'])} ({p['total']:,}) without MTP; "
          f"{_fmt_n(p['total_with_mtp'])} ({p['total_with_mtp']:,}) with MTP")
    print(f"activated/token  {_fmt_n(p['activated_per_token'])} ({p['activated_per_token']:,})")
    print(f"  attention {_fmt_n(p['attention'])}, routed experts {_fmt_n(p['routed_experts'])}, "
          f"shared {_fmt_n(p['shared_experts'])}, router {_fmt_n(p['router'])}, "
          f"embedding {_fmt_n(p['embedding'])}, lm_head {_fmt_n(p['lm_head'])}, "
          f"norms+mHC {_fmt_n(p['other_norms_mhc'])}")
    sched = info["schedule"]
    print("schedule         " + " ".join(
        f"{r['layer']}:{r['attention']}/{r['moe']}{'(mtp)' if r['mtp'] else ''}" for r in sched))
    counts = {}
    for r in sched:
        if not r["mtp"]:
            counts[r["attention"]] = counts.get(r["attention"], 0) + 1
    print("                 " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    for dt, c in info["kv_cache"].items():
        print(f"cache {dt:4s}       {c['per_token_growth_bytes']:.1f} B per token of growth; "
              f"{_fmt_b(c['fixed_bytes'])} fixed (windows + compressor state); "
              f"{_fmt_b(c['total_bytes_at_context'])} per sequence at {info['context_tokens']:,} tokens")
    print(f"formula          {info['kv_cache_formula']}")
    return 0
