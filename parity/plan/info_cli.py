"""`parity info MODEL [--context N] [--json]`: parameters, layer schedule and cache sizes (no torch)."""

from __future__ import annotations

import json

#: Context of the total cache size when --context is not given (tokens; capped at the model's limit).
DEFAULT_CONTEXT = 65536


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, layer schedule and KV-cache bytes of a model")
    p.add_argument("model", nargs="?", default="tiny", help="preset name (tiny, v4-flash, v4-pro) or checkpoint dir")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="context length N for the total cache size (tokens; default 65536, at most the model's "
        "max_position_embeddings)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--weights",
        default=None,
        choices=["published", "bf16", "fp8", "fp4", "w8a8", "w4a8"],
        help="also report the weight bytes in this format (published = fp4 = the release: FP8 linears "
        "+ FP4 experts); with --hardware, the per-device weights are counted in it (default: "
        "published)",
    )
    g = p.add_argument_group("per-device memory (with --hardware)")
    g.add_argument("--hardware", default=None, help="device (910c, h200, b200, ...): per-device bytes and fit")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="TP ranks per replica")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, help="DP replicas (EP = TP x DP)")
    g.add_argument("--enable-expert-parallel", action="store_true", help="partition routed experts over ranks")
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

    if args.context is not None and args.context < 0:
        raise ConfigError(f"--context must be >= 0 tokens, got {args.context}")
    cfg = load_config(args.model)
    limit = cfg.max_position_embeddings
    if args.context is None:
        args.context = min(DEFAULT_CONTEXT, limit)
    elif args.context > limit:
        raise ConfigError(
            f"--context {args.context:,} exceeds the context of {cfg.source or args.model}: {limit:,} tokens "
            f"(max_position_embeddings)"
        )
    device = _device_layout(cfg, args)  # every flag checked before anything is printed
    info = model_info(cfg, args.context)
    weights = getattr(args, "weights", None)
    if weights:
        from parity.weight_bytes import estimate_weight_bytes

        fmt = "fp4" if weights == "published" else weights
        info["weights"] = {"format": weights, "bytes": estimate_weight_bytes(cfg, "bfloat16", weights=fmt)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["params"]
    print(f"model            {info['model']}")
    print(
        f"parameters       {_fmt_n(p['total'])} ({p['total']:,}) without MTP; "
        f"{_fmt_n(p['total_with_mtp'])} ({p['total_with_mtp']:,}) with MTP"
    )
    print(f"activated/token  {_fmt_n(p['activated_per_token'])} ({p['activated_per_token']:,})")
    print(
        f"  attention {_fmt_n(p['attention'])}, routed experts {_fmt_n(p['routed_experts'])}, "
        f"shared {_fmt_n(p['shared_experts'])}, router {_fmt_n(p['router'])}, "
        f"embedding {_fmt_n(p['embedding'])}, lm_head {_fmt_n(p['lm_head'])}, "
        f"norms+mHC {_fmt_n(p['other_norms_mhc'])}"
    )
    sched = info["schedule"]
    print(
        "schedule         "
        + " ".join(f"{r['layer']}:{r['attention']}/{r['moe']}{'(mtp)' if r['mtp'] else ''}" for r in sched)
    )
    counts = {}
    for r in sched:
        if not r["mtp"]:
            counts[r["attention"]] = counts.get(r["attention"], 0) + 1
    print("                 " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    for dt, c in info["kv_cache"].items():
        print(
            f"cache {dt:4s}       {c['per_token_growth_bytes']:.1f} B per token of growth; "
            f"{_fmt_b(c['fixed_bytes'])} once the {cfg.sliding_window}-token sliding windows are full "
            f"(windows + compressor state); "
            f"{_fmt_b(c['total_bytes_at_context'])} per sequence at {info['context_tokens']:,} tokens"
        )
    print(f"formula          {info['kv_cache_formula']}")
    if weights:
        print(f"weights {weights:8s} {_fmt_b(info['weights']['bytes'])} (other tensors bf16 / fp32)")
    if device is not None:
        _print_device(cfg, args, *device)
    return 0


def _device_layout(cfg, args):
    """(ParallelConfig, Hardware) of the layout flags, or None without --hardware.

    Raises:
        ParallelError: a size below 1 or a layout that does not divide the model (field named).
        PlanError: unknown --hardware.
    """
    from parity.distributed.config import ParallelConfig
    from parity.plan.hardware import get_hardware

    pc = ParallelConfig(
        getattr(args, "tensor_parallel_size", 1),
        getattr(args, "data_parallel_size", 1),
        bool(getattr(args, "enable_expert_parallel", False)),
    )
    pc.validate(cfg)
    hardware = getattr(args, "hardware", None)
    return None if not hardware else (pc, get_hardware(hardware))


def _print_device(cfg, args, pc, hw) -> None:
    """Per-device weights, cache room and fit of a TP / DP / EP layout (`parity.model.memory.device_fit`)."""
    from parity.weight_bytes import device_fit

    fmt = "fp4" if args.weights in (None, "published") else args.weights
    quant = fmt != "bf16"
    fit = device_fit(cfg, hw.hbm_gb * 1e9, tp=pc.tp, ep=pc.ep, weights=fmt, cache_dtype="fp8" if quant else "bf16")
    print(f"layout           {pc.describe()} on {pc.world_size} x {hw.name} ({_fmt_b(fit['hbm_bytes'])} each)")
    print(
        f"weights/device   {_fmt_b(fit['weight_bytes'])} ({'FP8/FP4 release' if fmt == 'fp4' else fmt}); "
        f"{_fmt_b(fit['required_bytes'])} with headroom -> {'fits' if fit['fits'] else 'DOES NOT FIT'}"
    )
    print(f"cache/device     {_fmt_b(fit['cache_bytes'])} left: {fit['cache_tokens']:,} tokens of context")
