"""`parity` command line: one entry point, sub-commands registered by each pillar.

Each pillar owns a module with `register(subparsers)` that adds its sub-commands and sets
`func=<callable(args) -> int>`. Those modules import heavy dependencies (torch, FastAPI) only inside
the command functions, so `parity --help` and `parity plan` stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from parity import __version__
from parity.errors import ParityError
from parity.plan.train_cli import TWO_WORD_COMMANDS

_COMMAND_WORDS = {name: " ".join(words) for words, name in TWO_WORD_COMMANDS.items()}

#: Modules that register sub-commands, in help order.
COMMAND_MODULES = (
    "parity.plan.info_cli",  # info
    "parity.server.serve_cli",  # serve, generate, chat
    "parity.checkpoint.export_cli",  # export-tiny
    "parity.bench.bench_cli",  # bench, bench report
    "parity.plan.plan_cli",  # plan, compare, validate
    "parity.plan.train_cli",  # plan train, compare train
    "parity.devices.doctor_cli",  # doctor
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


def innermost_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the most nested sub-command `argv` names (`bench report ...` -> the `report` parser),
    following the leading words that are sub-command names; `parser` when there is none."""
    for word in argv:
        if word.startswith("-"):
            break
        sub = subparser_of(parser, word)
        if sub is None:
            break
        parser = sub
    return parser


#: A value that argparse would take for a flag because it starts with "-": a negative number, possibly
#: with a unit suffix (`-5T`, `-3`, `-0.5`, `-inf`).
_NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--tokens -5T` -> `--tokens=-5T` for every flag of the sub-command that takes a value, so that
    argparse hands a negative value to the flag's own check ("--tokens must be positive") instead of
    failing with "expected one argument"."""
    actions = innermost_parser(parser, argv)._option_string_actions
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        action = actions.get(word)
        if (
            action is not None
            and action.nargs in (None, 1)
            and word.startswith("--")
            and i + 1 < len(argv)
            and _NEGATIVE_VALUE.match(argv[i + 1])
        ):
            out.append(f"{word}={argv[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def reject_unknown(
    parser: argparse.ArgumentParser, command: str | None, extras: list[str], argv: list[str] | None = None
) -> None:
    """Exit (status 2) with the (innermost, when `argv` is given) sub-command's usage and one line for the first
    unknown argument: the reason for an unsupported vLLM flag (parity.server.vllm_flags), or the closest known
    flag."""
    from parity.server.vllm_flags import VLLM_FLAGS, unknown_flag_message

    sub = innermost_parser(parser, argv) if argv is not None else (subparser_of(parser, command) or parser)
    first = next((x for x in extras if x.startswith("-")), extras[0])
    if not first.startswith("-"):
        sub.error(f"unrecognized argument {first!r}")
    known = sorted(set(sub._option_string_actions) | {f.name for f in VLLM_FLAGS if command == "serve"})
    sub.error(unknown_flag_message(first, [k for k in known if k.startswith("--")]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    argv_in = join_negative_values(parser, _two_word(words))
    args, extras = parser.parse_known_args(argv_in)
    if extras:
        reject_unknown(parser, getattr(args, "command", None), extras, argv_in)
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
