"""`parity export-tiny DIR [--seed S] [--format F] [--overwrite]`: write the seeded random miniature in the
published layout (or, with ``--format msmodelslim-w8a8|msmodelslim-w4a8``, in Ascend's msModelSlim layout).

The checkpoint (FP8 e4m3 linears with 128x128 UE8M0 scales, FP4 e2m1 routed experts with 1x32 UE8M0
scales, sharded safetensors + index, legacy config.json, tokenizer files) is what
`parity.checkpoint.default_model.ensure_default_model` creates on first use; see `parity.checkpoint.writer`.
torch is imported only inside the command, so ``parity --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from parity.checkpoint.layout import INDEX_FILE
from parity.checkpoint.msmodelslim import FORMATS
from parity.errors import CheckpointError
from parity.seeds import SEED_MAX, SEED_MIN


def parse_seed(text: str) -> int:
    """An integer in [SEED_MIN, SEED_MAX] (`parity.seeds`). Raises argparse.ArgumentTypeError otherwise."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not SEED_MIN <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"{seed} is out of range; expected an integer in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)"
        )
    return seed


def register(sub) -> None:
    p = sub.add_parser("export-tiny", help="write the seeded random 'tiny' model in DeepSeek-V4's FP8/FP4 layout")
    p.add_argument("dir", help="output directory (created; an existing non-empty one only with --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing non-empty directory, replacing checkpoint files of the same names",
    )
    p.add_argument(
        "--seed",
        type=parse_seed,
        default=0,
        help=f"random seed in [{SEED_MIN}, {SEED_MAX}] (same seed, same bytes; default 0)",
    )
    p.add_argument("--preset", default="tiny", help="model preset to export (default: tiny)")
    p.add_argument(
        "--format",
        default="published",
        choices=["published", *FORMATS],
        help="published = DeepSeek's FP8/FP4 layout (default); msmodelslim-w8a8 / msmodelslim-w4a8 = "
        "Ascend msModelSlim W8A8_DYNAMIC (int4 W4A8_DYNAMIC experts) with quant_model_description.json",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from parity.checkpoint.msmodelslim_io import export_tiny_msmodelslim
    from parity.checkpoint.writer import export_tiny

    if not args.dir.strip():
        raise CheckpointError(f"export-tiny: the output directory is empty ({args.dir!r}); expected a directory path")
    out = Path(args.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export-tiny: {str(out)!r} exists and is not a directory; expected a directory path")
    try:
        non_empty = out.is_dir() and next(out.iterdir(), None) is not None
    except OSError as e:
        raise CheckpointError(
            f"export-tiny: cannot read the output directory {str(out)!r} ({e.strerror or e})"
        ) from None
    if non_empty and not args.overwrite:
        raise CheckpointError(
            f"export-tiny: {str(out)!r} exists and is not empty; pass --overwrite to write the "
            "checkpoint into it (files of the same names are replaced) or give a new directory"
        )
    con = Console(stderr=True, highlight=False)
    msg = f"export-tiny: building and quantizing the {args.preset!r} weights, then writing {out} ..."

    def write():
        if args.format == "published":
            return export_tiny(out, seed=args.seed, preset=args.preset)
        return export_tiny_msmodelslim(out, args.format, seed=args.seed, preset=args.preset)

    if con.is_terminal:
        with con.status(msg, spinner="dots"):
            d = write()
    else:
        print(msg, file=sys.stderr, flush=True)
        d = write()
    size = sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")
    shards = sum(1 for f in d.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {d} ({shards} shards, {size / 2**20:.1f} MiB of weights, seed {args.seed}); index {INDEX_FILE}")
    return 0
