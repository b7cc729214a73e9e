"""`parity chat`: an interactive terminal chat with a running server or a local model."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from parity.errors import RequestError
from parity.server.cli_args import (
    api_key_from,
    build_engine,
    check_engine_flags,
    default_model_name,
    exits_past_background_compiles,
    is_utf8,
    resolve_device_flag,
    sampling_kwargs,
)
from parity.server.vllm_flags import apply_mapped_flags

_HELP = "commands: /think on|off (thinking mode; /think alone shows it), /reset (forget the conversation), /exit"
_THINK_USAGE = "usage: /think on|off (/think alone shows whether thinking is on)"


def chat_loop(
    base_url: str, model: str, *, api_key: str | None, args: argparse.Namespace, read=input, console=None
) -> int:
    """The interactive loop: read a line, stream the answer (reasoning shown dim), keep the history.

    Args:
        base_url: server root. model: model name to request. api_key: bearer token or None.
        args: parsed flags (sampling, --system, --thinking).
        read: line reader (input; tests pass their own). console: a rich Console (default: stdout).
    Returns:
        0 on /exit or end of input.
    """
    from rich.console import Console

    from parity.openai_client import stream_chat

    con = console or Console(highlight=False)
    thinking = bool(args.thinking)
    history: list[dict[str, Any]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    con.print(f"parity chat with [bold]{model}[/] at {base_url}  ({_HELP})")
    sk = sampling_kwargs(args)
    body_sampling = {
        k: v
        for k, v in dict(
            max_tokens=sk["max_tokens"],
            temperature=sk["temperature"],
            top_p=sk["top_p"],
            presence_penalty=sk["presence_penalty"],
            frequency_penalty=sk["frequency_penalty"],
            seed=sk["seed"],
            stop=sk["stop"],
        ).items()
        if v is not None
    }
    extra = {
        k: v
        for k, v in dict(
            top_k=sk["top_k"],
            min_p=sk["min_p"],
            repetition_penalty=sk["repetition_penalty"],
            min_tokens=sk["min_tokens"],
            ignore_eos=sk["ignore_eos"],
        ).items()
    }
    if read is input and hasattr(sys.stdin, "reconfigure"):
        # Undecodable input bytes become lone surrogates (caught below per line) instead of an exception
        # that would lose the rest of the buffered input.
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            con.print()
            return 0
        except UnicodeDecodeError:
            con.print("[red]error:[/] input is not valid UTF-8; line ignored")
            continue
        line = line.strip()
        if not line:
            continue
        if not is_utf8(line):
            con.print("[red]error:[/] input is not valid UTF-8; line ignored")
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = [m for m in history if m["role"] == "system"]
            con.print("[dim](conversation cleared)[/]")
            continue
        words = line.split()
        if words[0] == "/think":
            if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("on", "off")):
                con.print(f"[red]error:[/] {_THINK_USAGE}")
                continue
            if len(words) == 2:
                thinking = words[1].lower() == "on"
            con.print(f"[dim](thinking {'on' if thinking else 'off'})[/]")
            continue
        if line.startswith("/"):
            con.print(f"[dim]{_HELP}[/]")
            continue
        history.append({"role": "user", "content": line})
        payload = dict(
            model=model,
            messages=history,
            thinking={"type": "enabled" if thinking else "disabled"},
            **body_sampling,
            **extra,
        )
        reasoning, content, usage, in_reasoning = [], [], None, False
        t0 = time.perf_counter()
        stream = stream_chat(base_url, payload, api_key=api_key)
        interrupted = False
        try:
            for piece in stream:
                if piece.kind == "reasoning":
                    if not in_reasoning:
                        con.print("[dim italic]thinking: [/]", end="")
                        in_reasoning = True
                    con.print(piece.text, style="dim italic", end="", markup=False)
                    reasoning.append(piece.text)
                elif piece.kind == "content":
                    if in_reasoning:
                        con.print()
                        in_reasoning = False
                    if not content:
                        con.print("[bold]assistant>[/] ", end="")
                    con.print(piece.text, end="", markup=False)
                    content.append(piece.text)
                elif piece.kind == "tool_call":
                    con.print(piece.text, style="cyan", end="", markup=False)
                elif piece.kind == "usage":
                    usage = piece.data
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on
            interrupted = True
        except RequestError as e:
            con.print(f"\n[red]error:[/] {e}", markup=True)
            history.pop()
            continue
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()  # ends the HTTP stream: the server aborts the request
        dt = time.perf_counter() - t0
        con.print()
        if interrupted:
            con.print("[dim](reply stopped; the conversation is kept)[/]")
            if not content and not reasoning:
                history.pop()
                continue
        if usage:
            con.print(f"[dim]({usage.get('completion_tokens', 0)} tokens in {dt:.2f} s)[/]")
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
        history.append(msg)


@exits_past_background_compiles
def run_chat(args: argparse.Namespace) -> int:
    """`parity chat`: with --base-url, chat with that server's model (--model-name, default its first); else load
    the local model (MODEL) behind a private loopback server and chat with it.

    Raises:
        RequestError: bad sampling or engine flags, a --system prompt that is not UTF-8, or a local model
            (MODEL or --model) given with --base-url.
        DeviceError: a bad --device (local model).
    """
    from parity.engine.sampling_params import SamplingParams
    from parity.openai_client import first_model, served_models

    apply_mapped_flags(args)
    SamplingParams(**sampling_kwargs(args)).validate()  # bad sampling flags: one clear error, up front
    if args.system is not None and not is_utf8(args.system):
        raise RequestError("--system: the system prompt is not valid UTF-8")
    api_key = api_key_from(args.api_key)
    if args.base_url and args.model is not None:
        raise RequestError(
            f"the local model {args.model!r} (MODEL or --model) has no effect with --base-url, which chats with "
            "a model the server serves; pass --model-name NAME to choose it (default: the server's first)"
        )
    if args.base_url:
        if args.model_name:  # checked before the session starts, as parity bench checks --model
            served = served_models(args.base_url, api_key)
            if served and args.model_name not in served:
                raise RequestError(
                    f"--model-name {args.model_name!r} is not served at {args.base_url}; it serves: {', '.join(served)}"
                )
        model = args.model_name or first_model(args.base_url, api_key)
        return chat_loop(args.base_url, model, api_key=api_key, args=args)
    # Local model: a private server on a free loopback port, so local and remote chats share one path.
    import secrets

    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import ThreadedServer

    device = resolve_device_flag(args.device)  # a bad device or engine flag fails before the loading line
    check_engine_flags(args, device)
    print(f"parity chat: loading {args.model or 'the default miniature'} on {device} ...", file=sys.stderr)
    engine = build_engine(args)
    name = default_model_name(args.model)
    key = secrets.token_hex(16)
    app = build_app(engine, ServerSettings(served_model_names=[name], api_key=key, drain_timeout_s=1.0))
    with ThreadedServer(app, drain_timeout_s=1.0) as srv:
        return chat_loop(srv.base_url, name, api_key=key, args=args)
