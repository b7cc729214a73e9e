"""`parity serve`, `parity generate`, `parity chat` (registered by parity/cli.py).

Heavy libraries (torch, FastAPI, uvicorn, httpx) are imported inside the command functions only, so
`parity --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from parity.errors import RequestError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """"4GiB" / "512MB" / "1000000" -> bytes (int). Raises argparse.ArgumentTypeError on bad input."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
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


def parse_nonempty(text: str) -> str:
    """A string with at least one non-blank character. Raises argparse.ArgumentTypeError otherwise."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {text!r}")
    return str(text)


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
    g.add_argument("--cache-memory-fraction", type=float, default=0.5,
                   help="share of free device memory for the cache pool (when --cache-memory is not given)")
    g.add_argument("--max-waiting", type=int, default=256, help="most waiting requests; more get HTTP 429")
    g.add_argument("--kv-cache-dtype", default=None, choices=["bf16", "fp8"], help="cache precision")
    g.add_argument("--seed", type=int, default=0, help="seed of random weights and unseeded sampling")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model eagerly (--no-enforce-eager: compiled step; default: per device)")


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
    return dict(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                cache_memory=args.cache_memory, cache_memory_fraction=args.cache_memory_fraction,
                max_waiting=args.max_waiting, kv_cache_dtype=args.kv_cache_dtype, seed=args.seed,
                enforce_eager=args.enforce_eager)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SamplingParams keyword arguments from parsed flags."""
    return dict(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def default_model_name(model: str | None) -> str:
    """The name a model is served under: "tiny" for the bundled default miniature, a directory's base name,
    else the preset name."""
    if model is None:
        return "tiny"
    p = Path(model)
    return p.name if p.is_dir() else str(model)


def register(subparsers: Any) -> None:
    """Add `serve`, `generate` and `chat` to the `parity` command line."""
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (default: the bundled miniature)",
                              description="Serve a DeepSeek-V4 model with OpenAI's API: /v1/chat/completions, "
                                          "/v1/completions, /v1/models, /health, /metrics.")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or preset name (default: the bundled miniature)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=parse_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    s.add_argument("--api-key", default=None, help="require this bearer token (default: env PARITY_API_KEY)")
    s.add_argument("--served-model-name", type=parse_nonempty, default=None,
                   help="model name clients use (default: derived)")
    s.add_argument("--default-thinking", action="store_true",
                   help="thinking mode for chat requests that do not choose one")
    s.add_argument("--drain-timeout", type=parse_nonneg_seconds, default=30.0,
                   help="on SIGTERM, seconds (>= 0) in-flight requests may finish before they are aborted")
    s.add_argument("--max-request-bytes", type=parse_bytes, default=None,
                   help="largest request body, e.g. 8MiB; larger ones get HTTP 413 "
                        "(default: max(1 MiB, 32 bytes per token of max_model_len))")
    s.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: only /v1/completions with token-id prompts works; text prompts "
                        "get HTTP 400 (for a checkpoint without a usable tokenizer.json)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(s)
    s.set_defaults(func=run_serve)

    g = subparsers.add_parser("generate", help="one-shot generation with the offline engine")
    g.add_argument("model", nargs="?", default=None, help="checkpoint directory or preset (default: miniature)")
    g.add_argument("--prompt", required=True, type=parse_nonempty, help="prompt text (not empty)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat format)")
    g.add_argument("--thinking", action="store_true", help="chat in thinking mode (implies --chat)")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--logprobs", type=int, default=None, help="top-N logprobs per token (printed with --json)")
    g.add_argument("--json", action="store_true", help="print the outputs as JSON")
    add_sampling_args(g)
    add_engine_args(g)
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="interactive terminal chat (local model or --base-url)")
    c.add_argument("model", nargs="?", default=None, help="checkpoint directory or preset (default: miniature)")
    c.add_argument("--base-url", default=None, help="chat with a running server instead, e.g. http://host:8000")
    c.add_argument("--api-key", default=None, help="bearer token for --base-url (default: env PARITY_API_KEY)")
    c.add_argument("--model-name", default=None, help="model name to request (default: the server's first)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--thinking", action="store_true", help="start in thinking mode (/think off to leave it)")
    add_sampling_args(c, max_tokens=256)
    add_engine_args(c)
    c.set_defaults(func=run_chat)


# ---------------------------------------------------------------------------------------------- serve
def build_engine(args: argparse.Namespace):
    """An AsyncEngine for the parsed flags (loads the tokenizer, then the model).

    Raises:
        CheckpointError: a checkpoint directory's tokenizer.json is broken (unless --skip-tokenizer-init).
    """
    from parity.engine import AsyncEngine, EngineArgs

    tokenizer = load_checkpoint_tokenizer(args.model, getattr(args, "skip_tokenizer_init", False))
    return AsyncEngine(EngineArgs(**engine_kwargs(args)), **({} if tokenizer == "auto" else {"tokenizer": tokenizer}))


def run_serve(args: argparse.Namespace) -> int:
    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import serve_forever

    api_key = args.api_key or os.environ.get("PARITY_API_KEY") or None
    name = args.served_model_name or default_model_name(args.model)
    print(f"parity serve: loading {args.model or 'the default miniature'} on {args.device} ...", file=sys.stderr)
    t0 = time.perf_counter()
    engine = build_engine(args)
    print(f"parity serve: model '{name}' ready in {time.perf_counter() - t0:.1f} s "
          f"(max_model_len {engine.max_model_len}); http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr)
    sp = engine.engine.step_path
    print(f"parity serve: step path {sp.path} on {sp.device}"
          + (f" ({sp.backend}, compiled in {sp.compile_s:.1f} s)" if sp.path == "compiled" else ""), file=sys.stderr)
    settings = ServerSettings(served_model_names=[name], api_key=api_key, default_thinking=args.default_thinking,
                              drain_timeout_s=args.drain_timeout, model_root=args.model or name,
                              model_aliases=[args.model] if args.model and args.model != name else [],
                              max_request_bytes=args.max_request_bytes)
    app = build_app(engine, settings)
    return serve_forever(app, args.host, args.port, drain_timeout_s=args.drain_timeout, log_level=args.log_level)


# ---------------------------------------------------------------------------------------------- generate
def run_generate(args: argparse.Namespace) -> int:
    import json

    from parity.engine import LLM, SamplingParams

    chat = args.chat or args.thinking
    sp = SamplingParams(n=args.n, logprobs=args.logprobs, **sampling_kwargs(args))
    sp.validate()  # fail fast (e.g. --sampling-seed out of range), before the model loads
    tokenizer = load_checkpoint_tokenizer(args.model)
    llm = LLM(**engine_kwargs(args), **({} if tokenizer == "auto" else {"tokenizer": tokenizer}))
    sp.validate(llm.config.vocab_size, llm.engine.max_model_len)
    tok = llm.tokenizer
    if tok is None:
        from parity.errors import CheckpointError

        raise CheckpointError("no tokenizer could be loaded for this model, and --prompt is text; "
                              "check the checkpoint's tokenizer.json")
    if chat:
        from parity.tokenizer import encode_chat

        prompt = encode_chat([{"role": "user", "content": args.prompt}], thinking=args.thinking)
    else:
        prompt = args.prompt
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    out = llm.generate(prompt_token_ids=ids, sampling_params=sp)[0]
    dt = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for c in out.outputs)
    if args.json:
        res = {"prompt": args.prompt, "prompt_tokens": len(ids), "outputs": []}
        for c in out.outputs:
            item: dict[str, Any] = {"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                    "finish_reason": c.finish_reason}
            if c.logprobs:
                item["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}
                                    for lp in c.logprobs]
            if chat:
                from parity.tokenizer import parse_output

                p = parse_output(c.text, thinking=args.thinking)
                item.update(content=p.content, reasoning_content=p.reasoning_content, tool_calls=p.tool_calls)
            res["outputs"].append(item)
        print(json.dumps(res, ensure_ascii=False, indent=1))
    else:
        for c in out.outputs:
            if len(out.outputs) > 1:
                print(f"--- completion {c.index} ({c.finish_reason})")
            if chat:
                from parity.tokenizer import parse_output

                p = parse_output(c.text, thinking=args.thinking)
                if p.reasoning_content:
                    print(f"[reasoning]\n{p.reasoning_content}\n[answer]")
                print(p.content)
            else:
                print(c.text)
    print(f"[{len(ids)} prompt tokens, {n_out} generated in {dt:.2f} s, "
          f"{n_out / dt if dt > 0 else 0:.1f} tokens/s, measured]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- chat
def _is_utf8(text: str) -> bool:
    """False when `text` holds lone surrogates: how Python decodes bytes that are not valid UTF-8 from
    stdin/argv (errors="surrogateescape"); such a string cannot be sent as JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_HELP = "commands: /think on|off (thinking mode), /reset (forget the conversation), /exit"


def chat_loop(base_url: str, model: str, *, api_key: str | None, args: argparse.Namespace,
              read=input, console=None) -> int:
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
    body_sampling = {k: v for k, v in dict(max_tokens=sk["max_tokens"], temperature=sk["temperature"],
                                            top_p=sk["top_p"], presence_penalty=sk["presence_penalty"],
                                            frequency_penalty=sk["frequency_penalty"], seed=sk["seed"],
                                            stop=sk["stop"]).items() if v is not None}
    extra = {k: v for k, v in dict(top_k=sk["top_k"], min_p=sk["min_p"],
                                   repetition_penalty=sk["repetition_penalty"], min_tokens=sk["min_tokens"],
                                   ignore_eos=sk["ignore_eos"]).items()}
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
        if not _is_utf8(line):
            con.print("[red]error:[/] input is not valid UTF-8; line ignored")
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = [m for m in history if m["role"] == "system"]
            con.print("[dim](conversation cleared)[/]")
            continue
        if line.startswith("/think"):
            thinking = not line.endswith("off")
            con.print(f"[dim](thinking {'on' if thinking else 'off'})[/]")
            continue
        if line.startswith("/"):
            con.print(f"[dim]{_HELP}[/]")
            continue
        history.append({"role": "user", "content": line})
        payload = dict(model=model, messages=history, thinking={"type": "enabled" if thinking else "disabled"},
                       **body_sampling, **extra)
        reasoning, content, usage, in_reasoning = [], [], None, False
        t0 = time.perf_counter()
        try:
            for piece in stream_chat(base_url, payload, api_key=api_key):
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
        except RequestError as e:
            con.print(f"\n[red]error:[/] {e}", markup=True)
            history.pop()
            continue
        dt = time.perf_counter() - t0
        con.print()
        if usage:
            con.print(f"[dim]({usage.get('completion_tokens', 0)} tokens in {dt:.2f} s)[/]")
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
        history.append(msg)


def run_chat(args: argparse.Namespace) -> int:
    from parity.engine.sampling_params import SamplingParams
    from parity.openai_client import first_model

    SamplingParams(**sampling_kwargs(args)).validate()  # bad sampling flags: one clear error, up front
    if args.system is not None and not _is_utf8(args.system):
        raise RequestError("--system: the system prompt is not valid UTF-8")
    api_key = args.api_key or os.environ.get("PARITY_API_KEY") or None
    if args.base_url:
        model = args.model_name or first_model(args.base_url, api_key)
        return chat_loop(args.base_url, model, api_key=api_key, args=args)
    # Local model: a private server on a free loopback port, so local and remote chats share one path.
    import secrets

    from parity.server.app import ServerSettings, build_app
    from parity.server.launcher import ThreadedServer

    print(f"parity chat: loading {args.model or 'the default miniature'} ...", file=sys.stderr)
    engine = build_engine(args)
    name = default_model_name(args.model)
    key = secrets.token_hex(16)
    app = build_app(engine, ServerSettings(served_model_names=[name], api_key=key, drain_timeout_s=1.0))
    with ThreadedServer(app, drain_timeout_s=1.0) as srv:
        return chat_loop(srv.base_url, name, api_key=key, args=args)
