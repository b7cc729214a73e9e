"""`parity` command line: one entry point, sub-commands registered by each pillar.

Each pillar owns a module with `register(subparsers)` that adds its sub-commands and sets
`func=<callable(args) -> int>`. Those modules import heavy dependencies (torch, FastAPI) only inside
the command functions, so `parity --help` and `parity plan` stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from parity import __version__
from parity.errors import ParityError
from parity.plan.train_cli import TWO_WORD_COMMANDS

_COMMAND_WORDS = {name: " ".join(words) for words, name in TWO_WORD_COMMANDS.items()}

#: Modules that register sub-commands, in help order.
COMMAND_MODULES = (
    "parity.plan.info_cli",     # info
    "parity.server.serve_cli",        # serve, generate, chat
    "parity.checkpoint.export_cli",    # export-tiny
    "parity.bench.bench_cli",         # bench, bench report
    "parity.plan.plan_cli",          # plan, compare, validate
    "parity.plan.train_cli",         # plan train, compare train
    "parity.devices.doctor_cli",       # doctor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parity",
        description="DeepSeek-V4 on any accelerator: run it, measure it, plan it.",
    )
    parser.add_argument("--version", action="version", version=f"parity {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # pillar not built yet
                continue
            raise
        mod.register(sub)
    return parser


def _two_word(argv: list[str]) -> list[str]:
    """`plan train ...` -> `plan-train ...` (parity.plan.train_cli.TWO_WORD_COMMANDS)."""
    if len(argv) >= 2 and (argv[0], argv[1]) in TWO_WORD_COMMANDS:
        return [TWO_WORD_COMMANDS[argv[0], argv[1]], *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_two_word(words))
    args.command_line = ["parity", *words]  # recorded by commands that write results (parity bench)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except ParityError as e:
        print(f"parity {_COMMAND_WORDS.get(args.command, args.command)}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
