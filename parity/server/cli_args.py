"""Flags and helpers shared by `parity serve`, `generate` and `chat`: value parsers, engine and sampling flag
groups (names follow vLLM's CLI), the tokenizer/engine builders and the loading spinner."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.errors import ParityError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "t": 10**12,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """ "4GiB" / "512MB" / "1000000" -> bytes (int). Raises argparse.ArgumentTypeError on bad input."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        val = float(num)
    except ValueError:
        val = -1.0
    if unit not in _UNITS or val <= 0:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 4GiB or 512MB, got {text!r}")
    return int(val * _UNITS[unit])


def parse_port(text: str) -> int:
    """A TCP port number 1..65535 (int). Raises argparse.ArgumentTypeError otherwise."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number in 1..65535, got {text!r}")
    return port


def parse_nonneg_seconds(text: str) -> float:
    """A duration in seconds >= 0 (float). Raises argparse.ArgumentTypeError otherwise."""
    try:
        val = float(text)
    except ValueError:
        val = float("nan")
    if not val >= 0 or val == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return val


def parse_positive_seconds(text: str) -> float:
    """A duration in seconds > 0 (float). Raises argparse.ArgumentTypeError otherwise."""
    val = parse_nonneg_seconds(text)
    if val <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return val


def parse_positive_int(text: str) -> int:
    """An integer >= 1. Raises argparse.ArgumentTypeError otherwise."""
    try:
        val = int(text)
    except ValueError:
        val = 0
    if val < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return val


def parse_nonempty(text: str) -> str:
    """A string with at least one non-blank character. Raises argparse.ArgumentTypeError otherwise."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return str(text)


def parse_api_key(text: str) -> str:
    """An API key (`--api-key`): not empty, since an empty key would mean no authentication at all. Raises
    argparse.ArgumentTypeError for an empty or blank value."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("the key is empty; to use no authentication, pass no --api-key")
    return str(text)


def api_key_from(args_key: str | None, env: dict | None = None) -> str | None:
    """The bearer token a command uses: ``--api-key``, else the environment's ``PARITY_API_KEY``, else None
    (no authentication). Raises ParityError when ``PARITY_API_KEY`` is set but empty or blank (as an empty
    ``--api-key``: it would silently mean no authentication)."""
    if args_key:
        return args_key
    value = (os.environ if env is None else env).get("PARITY_API_KEY")
    if value is not None and not value.strip():
        raise ParityError("PARITY_API_KEY is set but empty; to use no authentication, unset it")
    return value or None


def is_utf8(text: str) -> bool:
    """False when `text` holds lone surrogates: how Python decodes bytes that are not valid UTF-8 from
    stdin/argv (errors="surrogateescape"); such a string can be neither tokenized nor sent as JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_checkpoint_tokenizer(model: str | None, skip: bool = False) -> Any:
    """The tokenizer of a checkpoint directory, loaded before the model so that a broken
    `tokenizer.json` stops the command at once with one line naming the file.

    Args:
        model: the model argument (checkpoint directory, preset name or None for the miniature).
        skip: token-ids-only mode (`--skip-tokenizer-init`): load no tokenizer.
    Returns:
        the tokenizer for a directory; None when `skip`; "auto" (the engine's default: the bundled
        DeepSeek-V4 vocabulary) for presets and the miniature.
    Raises:
        CheckpointError: the directory's tokenizer.json is missing or unreadable (parity.tokenizer).
    """
    if skip:
        return None
    if model is None or not Path(model).expanduser().is_dir():
        return "auto"
    from parity.errors import CheckpointError
    from parity.tokenizer import load_tokenizer

    try:
        return load_tokenizer(Path(model).expanduser())
    except CheckpointError as e:
        raise CheckpointError(f"{e} (pass --skip-tokenizer-init to serve token-id prompts only)") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by serve / generate / chat (names follow vLLM's CLI)."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="auto (npu > cuda > xpu > mps > cpu), cpu, cuda, npu, ...")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: per device)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in the running batch")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens (prompt + output)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    g.add_argument("--cache-memory", type=parse_bytes, default=None, help="cache pool size, e.g. 4GiB")
    g.add_argument(
        "--cache-memory-fraction",
        type=float,
        default=0.5,
        help="share of free device memory for the cache pool (when --cache-memory is not given)",
    )
    g.add_argument(
        "--max-waiting", type=int, default=256, help="most waiting sequences (prompts x n); more get HTTP 429"
    )
    g.add_argument("--kv-cache-dtype", default=None, choices=["bf16", "fp8"], help="cache precision")
    g.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=["auto", "fp8", "fp4", "w8a8", "w4a8", "bf16"],
        help="how FP8/FP4 published weights are held: as published (fp8/fp4), converted to INT8 "
        "W8A8 / W4A8, or dequantized (bf16); auto = as published, W8A8 on chips without FP8",
    )
    g.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="with --quantization w8a8 / w4a8: the LM head in int8 too (per output channel, per-token int8 "
        "activations, fp32 logits; llama.cpp Q8_0 does the same; msModelSlim keeps it float)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of random weights and unseeded sampling")
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the cached state of shared prompt prefixes (default: on)",
    )
    g.add_argument(
        "--prefix-block-tokens",
        type=int,
        default=None,
        help="tokens per prefix-cache block (default: lcm of the compression ratios, 128 for V4)",
    )
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model eagerly (--no-enforce-eager: the compiled decode step; default: per device)",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    """Sampling flags (SamplingParams fields)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineArgs keyword arguments from parsed flags."""
    return dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        cache_memory=args.cache_memory,
        cache_memory_fraction=args.cache_memory_fraction,
        max_waiting=args.max_waiting,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=args.seed,
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_block_tokens=args.prefix_block_tokens,
        enforce_eager=args.enforce_eager,
    )


#: The flag that sets each EngineArgs field (`engine_kwargs`), so that an engine error names what was typed.
ENGINE_FLAGS = {
    "model": "MODEL",
    "device": "--device",
    "dtype": "--dtype",
    "max_num_seqs": "--max-num-seqs",
    "max_model_len": "--max-model-len",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "cache_memory": "--cache-memory",
    "cache_memory_fraction": "--cache-memory-fraction",
    "max_waiting": "--max-waiting",
    "kv_cache_dtype": "--kv-cache-dtype",
    "seed": "--seed",
    "quantization": "--quantization",
    "quantize_lm_head": "--quantize-lm-head",
    "enable_prefix_caching": "--enable-prefix-caching",
    "prefix_block_tokens": "--prefix-block-tokens",
    "enforce_eager": "--enforce-eager",
}

_FLAG_AND_FIELD = re.compile(r"(--[a-z-]+) \(engine argument '(\w+)'\)")
_FIELD = re.compile(r"engine argument '(\w+)'")


def flag_message(message: str) -> str:
    """An engine error with each "engine argument 'max_num_seqs'" written as its flag (`ENGINE_FLAGS`):
    "--max-num-seqs must be a positive integer, got 0"."""
    message = _FLAG_AND_FIELD.sub(lambda m: m.group(1), message)
    return _FIELD.sub(lambda m: ENGINE_FLAGS.get(m.group(1), m.group(0)), message)


@contextlib.contextmanager
def engine_flag_errors():
    """Re-raise a RequestError from building an engine with its message naming flags (`flag_message`)."""
    from parity.errors import RequestError

    try:
        yield
    except RequestError as e:
        message = flag_message(str(e))
        if message == str(e):
            raise
        raise RequestError(message) from None


def check_engine_flags(args: argparse.Namespace, device: Any) -> None:
    """Check the engine flags before anything loads (the model's config.json or preset only): the EngineArgs
    checks, --dtype on `device`, and --max-model-len / --prefix-block-tokens against the model's config (when
    it can be read; else loading the model reports it).

    Raises:
        RequestError: a bad engine flag; the message names the flag (`flag_message`).
    """
    from parity.checkpoint.default_model import ensure_default_model
    from parity.config import load_config
    from parity.engine import EngineArgs
    from parity.engine.model_loading import check_preset_quantization, resolve_dtype
    from parity.errors import ConfigError, RequestError
    from parity.model.prefix_state import block_tokens_for

    with engine_flag_errors():
        EngineArgs(**engine_kwargs(args)).validate()
        resolve_dtype(args.dtype, device)
        if args.model is not None and not Path(str(args.model)).expanduser().is_dir():
            check_preset_quantization(args.model, args.quantization)
        try:
            config = load_config(ensure_default_model() if args.model is None else args.model)
        except ConfigError:  # reported where the model loads, after the tokenizer check
            return
        limit = int(config.max_position_embeddings)
        if args.max_model_len is not None and args.max_model_len > limit:
            raise RequestError(
                f"--max-model-len ({args.max_model_len}) exceeds the model's max_position_embeddings ({limit})"
            )
        if args.enable_prefix_caching:
            block_tokens_for(config, args.prefix_block_tokens, args.max_model_len or limit)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams keyword arguments from parsed flags."""
    return dict(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def default_model_name(model: str | None) -> str:
    """The name a model is served under: "tiny" for the bundled default miniature, a directory's base name,
    else the preset name."""
    if model is None:
        return "tiny"
    p = Path(model)
    return p.name if p.is_dir() else str(model)


def build_engine(args: argparse.Namespace, model=None):
    """An AsyncEngine for the parsed flags (loads the tokenizer, then the model unless ``model`` is given:
    e.g. rank 0's `parity.engine.executor.DistributedModel`).

    Raises:
        CheckpointError: a checkpoint directory's tokenizer.json is broken (unless --skip-tokenizer-init).
        RequestError: a bad engine flag (named, `flag_message`).
    """
    from parity.engine import AsyncEngine, EngineArgs

    tokenizer = load_checkpoint_tokenizer(args.model, getattr(args, "skip_tokenizer_init", False))
    with engine_flag_errors():
        return AsyncEngine(
            EngineArgs(**engine_kwargs(args), warm_up_in_background=True),  # a server answers while it compiles
            model=model,
            **({} if tokenizer == "auto" else {"tokenizer": tokenizer}),
        )


def resolve_device_flag(spec: str | None) -> Any:
    """The torch.device a ``--device`` value names, resolved before anything loads, so that a bad device is
    one line naming it before any loading message (`parity.devices.resolve`).

    Raises:
        DeviceError: an unknown device type, one not available here, or an index beyond this machine's devices.
    """
    from parity import devices

    return devices.resolve(spec)


def loading(message: str) -> Any:
    """A context manager showing `message` with a spinner while a model loads (rich; one plain line when
    stderr is not a terminal)."""
    from rich.console import Console

    con = Console(stderr=True, highlight=False)
    if not con.is_terminal:
        print(f"{message} ...", file=sys.stderr, flush=True)
        return contextlib.nullcontext()
    return con.status(f"{message} ...", spinner="dots")


def exits_past_background_compiles(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command that may start an engine compiling its decode buckets in the background (`parity serve`,
    `parity chat`): when it ends (returns or raises), the warm-up is asked to stop before its next bucket
    (`parity.engine.model_runner.stop_background_warm_ups`); if a bucket is still compiling, one line says the
    compile was cut short, stdout/stderr and the log are flushed and the process exits at once with the
    command's status (`os._exit`; an error is printed first as `parity.cli.main` prints it), skipping the
    interpreter teardown that aborts (SIGABRT) while a thread is inside inductor's C++ code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            rc = command(args)
        except BaseException as exc:
            compiling = _stop_background_compiles()
            if not compiling:
                raise
            rc = _report(args, exc)
        else:
            compiling = _stop_background_compiles()
            if not compiling:
                return rc
        bucket = compiling[0]
        print(
            f"parity {args.command}: the background compile of the decode step was cut short"
            f"{f' (batch bucket {bucket} was compiling)' if bucket is not None else ''}; exiting without it",
            file=sys.stderr,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))

    return run


def _stop_background_compiles() -> list[int | None]:
    """The buckets still compiling after asking every background warm-up to stop; none when no engine was
    built in this process (the engine modules, and torch, are then not imported at all)."""
    runner = sys.modules.get("parity.engine.model_runner")
    return runner.stop_background_warm_ups() if runner is not None else []


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    """Print `exc` as `parity.cli.main` does and return the exit status it would: 2 for a ParityError, 130
    for Ctrl-C, a SystemExit's code, 1 (with the traceback) for anything else."""
    from parity.errors import ParityError

    if isinstance(exc, ParityError):
        print(f"parity {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    traceback.print_exception(exc)
    return 1
