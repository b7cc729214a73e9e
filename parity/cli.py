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


def subparser_of(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    """The sub-command parser registered as `command`, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def reject_unknown(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> None:
    """Exit (status 2) with the sub-command's usage and one line for the first unknown argument: the reason
    for an unsupported vLLM flag (parity.server.vllm_flags), or the closest known flag."""
    from parity.server.vllm_flags import VLLM_FLAGS, unknown_flag_message

    sub = subparser_of(parser, command) or parser
    first = next((x for x in extras if x.startswith("-")), extras[0])
    if not first.startswith("-"):
        sub.error(f"unrecognized argument {first!r}")
    known = sorted(set(sub._option_string_actions) | {f.name for f in VLLM_FLAGS if command == "serve"})
    sub.error(unknown_flag_message(first, [k for k in known if k.startswith("--")]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(_two_word(words))
    if extras:
        reject_unknown(parser, getattr(args, "command", None), extras)
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
