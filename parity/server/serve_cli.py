"""`parity serve`, `parity generate`, `parity chat` (registered by parity/cli.py).

Heavy libraries (torch, FastAPI, uvicorn, httpx) are imported inside the command functions only, so
`parity --help` stays fast. Shared flags live in cli_args.py, the chat loop in chat_cli.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from parity.errors import RequestError
from parity.server.chat_cli import chat_loop, run_chat
from parity.server.cli_args import (
    add_engine_args,
    add_sampling_args,
    api_key_from,
    build_engine,
    check_engine_flags,
    default_model_name,
    engine_flag_errors,
    engine_kwargs,
    exits_past_background_compiles,
    is_utf8,
    load_checkpoint_tokenizer,
    loading,
    parse_api_key,
    parse_bytes,
    parse_nonempty,
    parse_nonneg_seconds,
    parse_port,
    parse_positive_int,
    parse_positive_seconds,
    resolve_device_flag,
    sampling_kwargs,
)
from parity.server.parallel_serve import add_parallel_args
from parity.server.vllm_flags import add_mapped_flags, apply_mapped_flags

__all__ = [
    "build_engine",
    "chat_loop",
    "default_model_name",
    "load_checkpoint_tokenizer",
    "parse_bytes",
    "register",
    "run_chat",
    "run_generate",
    "run_serve",
]


def register(subparsers: Any) -> None:
    """Add `serve`, `generate` and `chat` to the `parity` command line."""
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (default: the bundled miniature)",
        description="Serve a DeepSeek-V4 model with OpenAI's API: /v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics.",
    )
    s.add_argument(
        "model", nargs="?", default=None, help="checkpoint directory or preset name (default: the bundled miniature)"
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=parse_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    s.add_argument(
        "--api-key",
        type=parse_api_key,
        default=None,
        help="require this bearer token, not empty (default: env PARITY_API_KEY; neither: no authentication)",
    )
    s.add_argument(
        "--served-model-name", type=parse_nonempty, default=None, help="model name clients use (default: derived)"
    )
    s.add_argument(
        "--default-thinking", action="store_true", help="thinking mode for chat requests that do not choose one"
    )
    s.add_argument(
        "--drain-timeout",
        type=parse_nonneg_seconds,
        default=30.0,
        help="on SIGTERM, seconds (>= 0) in-flight requests may finish before they are aborted",
    )
    s.add_argument(
        "--max-request-bytes",
        type=parse_bytes,
        default=None,
        help="largest request body, e.g. 8MiB; larger ones get HTTP 413 "
        "(default: max(1 MiB, 32 bytes per token of max_model_len))",
    )
    s.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="load no tokenizer: only /v1/completions with token-id prompts works; text prompts "
        "get HTTP 400 (for a checkpoint without a usable tokenizer.json)",
    )
    s.add_argument(
        "--enable-strict-thinking",
        action="store_true",
        help="thinking-mode chat: the EOS token cannot be sampled until the reasoning block closes "
        "(</think>), so an answer never ends inside it (off for requests with ignore_eos)",
    )
    s.add_argument(
        "--max-seqs-per-request",
        type=parse_positive_int,
        default=None,
        help="most sequences (prompts x n) one request may start; more get HTTP 400 "
        "(default: max(256, 4 x --max-num-seqs))",
    )
    s.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="accept only these Host headers (e.g. localhost 127.0.0.1 '*.example.com'), against "
        "DNS rebinding; others get HTTP 400 (default: any)",
    )
    s.add_argument(
        "--request-read-timeout",
        type=parse_positive_seconds,
        default=30.0,
        help="seconds a client may take to send the request headers, and again the body; "
        "slower ones get HTTP 408 (default 30)",
    )
    s.add_argument(
        "--timeout-keep-alive",
        type=parse_positive_seconds,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default 5)",
    )
    s.add_argument(
        "--limit-concurrency",
        type=parse_positive_int,
        default=1024,
        help="most open connections + requests; beyond it new requests get HTTP 503 (default 1024)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(s)
    add_mapped_flags(s)
    add_parallel_args(s)
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
    add_mapped_flags(g)
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser("chat", help="interactive terminal chat (local model or --base-url)")
    c.add_argument("model", nargs="?", default=None, help="checkpoint directory or preset (default: miniature)")
    c.add_argument("--base-url", default=None, help="chat with a running server instead, e.g. http://host:8000")
    c.add_argument(
        "--api-key", type=parse_api_key, default=None, help="bearer token for --base-url (default: env PARITY_API_KEY)"
    )
    c.add_argument("--model-name", default=None, help="model name to request (default: the server's first)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--thinking", action="store_true", help="start in thinking mode (/think off to leave it)")
    add_sampling_args(c, max_tokens=256)
    add_engine_args(c)
    add_mapped_flags(c)
    c.set_defaults(func=run_chat)


# ---------------------------------------------------------------------------------------------- serve
@exits_past_background_compiles
def run_serve(args: argparse.Namespace) -> int:
    """Bind the port, load the model (one process, or rank 0 of a TP / DP / EP group it starts), serve until
    SIGTERM/SIGINT (see parity.server.launcher).

    Raises:
        DeviceError: a bad --device, RequestError: a bad engine flag (both found before anything loads or
            starts); PortInUseError: the port is taken (found before the model loads).
    """
    from parity.server.parallel_serve import parallel_config

    device = resolve_device_flag(args.device)
    apply_mapped_flags(args)
    check_engine_flags(args, device)  # a bad engine flag is one line naming it, before the port or the model
    config = parallel_config(args)
    if config.world_size == 1:
        return _serve(args, device)
    from parity.server.parallel_serve import start_parallel

    serving = start_parallel(args, config)
    if serving is None:  # a torchrun worker rank: rank 0 has stopped it
        return 0
    try:
        return _serve(args, device, serving)
    finally:
        serving.close()


def _serve(args: argparse.Namespace, device: Any, serving=None) -> int:
    """Serve in this process on `device` (the resolved --device); on the CPU, one process, the engine keeps a
    core for the HTTP front end (`parity.server.engine_threads`)."""
    from parity.server.engine_threads import intra_op_threads, serving_threads

    threads = serving_threads(device) if serving is None else None
    with intra_op_threads(threads):
        return _serve_engine(args, device, serving, threads)


def _serve_engine(args: argparse.Namespace, device: Any, serving, threads: int | None) -> int:
    from parity.server.app import ServerSettings, build_app
    from parity.server.chat_format import ChatFormat
    from parity.server.launcher import bind_socket, http_url, serve_forever
    from parity.server.settings import default_max_seqs_per_request
    from parity.tokenizer.encoding import load_encoding

    apply_mapped_flags(args)
    api_key = api_key_from(args.api_key)
    name = args.served_model_name or default_model_name(args.model)
    sock = bind_socket(args.host, args.port)  # a taken port is reported before minutes of loading
    try:
        t0 = time.perf_counter()
        with loading(f"parity serve: loading {args.model or 'the default miniature'} on {device}"):
            engine = build_engine(args, serving.model if serving is not None else None)
        if serving is not None:
            serving.engine = engine
        if threads is not None and getattr(getattr(engine, "engine", None), "device", None) is not None:
            engine.intra_op_threads = threads
        load_s = time.perf_counter() - t0
        settings = ServerSettings(
            served_model_names=[name],
            api_key=api_key,
            default_thinking=args.default_thinking,
            drain_timeout_s=args.drain_timeout,
            model_root=args.model or name,
            model_aliases=[args.model] if args.model and args.model != name else [],
            max_request_bytes=args.max_request_bytes,
            max_seqs_per_request=args.max_seqs_per_request or default_max_seqs_per_request(args.max_num_seqs),
            allowed_hosts=args.allowed_hosts,
            request_read_timeout_s=args.request_read_timeout,
            timeout_keep_alive_s=args.timeout_keep_alive,
            limit_concurrency=args.limit_concurrency,
            strict_thinking=args.enable_strict_thinking,
        )
        app = build_app(engine, settings, chat_format=ChatFormat(load_encoding(args.model)))
    except BaseException:
        sock.close()
        raise
    device = getattr(getattr(engine, "engine", None), "device", device)

    sp = getattr(getattr(engine, "engine", None), "step_path", None)
    path = (
        ""
        if sp is None
        else f", {sp.path} step"
        + (
            ""
            if sp.path != "compiled"
            else f" ({sp.backend}, batch buckets compiling in the background; eager until each is warm)"
            if sp.background
            else f" ({sp.backend}, compiled in {sp.compile_s:.1f} s)"
        )
    )

    threads = getattr(engine, "intra_op_threads", None)
    if threads is not None:
        path += f", {threads} intra-op thread{'s' if threads > 1 else ''} (a core kept for the HTTP front end)"

    def ready(_server: Any) -> None:
        print(
            f"parity serve: ready: model '{name}' on {device}{path} (max_model_len {engine.max_model_len}, "
            f"loaded in {load_s:.1f} s) at {http_url(args.host, args.port)}/v1"
            f"{' (API key required)' if api_key else ''}",
            file=sys.stderr,
            flush=True,
        )

    return serve_forever(
        app,
        args.host,
        args.port,
        drain_timeout_s=args.drain_timeout,
        log_level=args.log_level,
        sock=sock,
        on_ready=ready,
    )


# ---------------------------------------------------------------------------------------------- generate
def _check_max_tokens_fit(sp, args: argparse.Namespace) -> None:
    """Refuse a --max-tokens that leaves no room for a prompt in the context (the checkpoint's config.json or
    preset, or --max-model-len) before the model loads and its decode step compiles (minutes). Raises
    RequestError naming the flag; ConfigError for a model that names no config."""
    from parity.config import load_config

    limit = getattr(args, "max_model_len", None) or load_config(args.model or "tiny").max_position_embeddings
    if sp.max_tokens is not None and sp.max_tokens >= limit:
        raise RequestError(
            f"--max-tokens ({sp.max_tokens}) leaves no room for the prompt within max_model_len ({limit}): "
            f"expected at most {limit - 1}"
        )


def run_generate(args: argparse.Namespace) -> int:
    """Load the model, generate, print the text (streamed as it is generated for one plain completion) and
    a timing line that keeps the load time apart from the generation rate (tokens/s after the first token)."""
    import json

    from parity.engine import LLM, SamplingParams

    apply_mapped_flags(args)
    if not is_utf8(args.prompt):
        raise RequestError("--prompt: the prompt is not valid UTF-8")
    chat = args.chat or args.thinking
    from parity.server.request_options import TEMPERATURE_RANGE, range_error

    msg = range_error("--temperature", args.temperature, *TEMPERATURE_RANGE)  # the server's range and wording
    if msg is not None:
        raise RequestError(msg)
    sp = SamplingParams(n=args.n, logprobs=args.logprobs, **sampling_kwargs(args))
    sp.validate()  # fail fast (e.g. --sampling-seed out of range), before the model loads
    device = resolve_device_flag(args.device)  # a bad device or engine flag fails before the loading line
    check_engine_flags(args, device)
    tokenizer = load_checkpoint_tokenizer(args.model)
    _check_max_tokens_fit(sp, args)
    t_load = time.perf_counter()
    kwargs = engine_kwargs(args)
    # one prompt's n completions are the most sequences a step holds: the compiled step warms only the batch
    # buckets up to n (one bucket for n = 1, not all five; each is minutes cold on a small CPU)
    if kwargs["max_num_seqs"] >= 1:  # a bad value stays for the engine's own error
        kwargs["max_num_seqs"] = min(kwargs["max_num_seqs"], args.n)
    with loading(generate_loading_line(args.model, device, args.enforce_eager)), engine_flag_errors():
        llm = LLM(**kwargs, **({} if tokenizer == "auto" else {"tokenizer": tokenizer}))
    load_s = time.perf_counter() - t_load
    compile_s = llm.engine.step_path.compile_s
    sp.validate(llm.config.vocab_size, llm.engine.max_model_len)
    tok = llm.tokenizer
    if tok is None:
        from parity.errors import CheckpointError

        raise CheckpointError(
            "no tokenizer could be loaded for this model, and --prompt is text; check the checkpoint's tokenizer.json"
        )
    if chat:
        from parity.tokenizer import encode_chat

        prompt = encode_chat([{"role": "user", "content": args.prompt}], thinking=args.thinking)
    else:
        prompt = args.prompt
    ids = tok.encode(prompt)
    stream = args.n == 1 and not args.json and not chat
    t0 = time.perf_counter()
    out, first_token_s = generate_streaming(llm.engine, ids, sp, echo=sys.stdout if stream else None)
    dt = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for c in out.outputs)
    if args.json:
        res = {"prompt": args.prompt, "prompt_tokens": len(ids), "outputs": []}
        for c in out.outputs:
            item: dict[str, Any] = {
                "index": c.index,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
            }
            if c.logprobs:
                item["logprobs"] = [
                    {"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in c.logprobs
                ]
            if chat:
                from parity.tokenizer import parse_output

                p = parse_output(c.text, thinking=args.thinking, finish_reason=c.finish_reason)
                item.update(content=p.content, reasoning_content=p.reasoning_content, tool_calls=p.tool_calls)
            res["outputs"].append(item)
        print(json.dumps(res, ensure_ascii=False, indent=1))
    elif stream:
        print()
    else:
        for c in out.outputs:
            if len(out.outputs) > 1:
                print(f"--- completion {c.index} ({c.finish_reason})")
            if chat:
                from parity.tokenizer import parse_output

                p = parse_output(c.text, thinking=args.thinking, finish_reason=c.finish_reason)
                if p.reasoning_content:
                    print(f"[reasoning]\n{p.reasoning_content}\n[answer]")
                print(p.content)
            else:
                print(c.text)
    print(timing_line(load_s, len(ids), n_out, dt, first_token_s, compile_s), file=sys.stderr)
    return 0


def generate_loading_line(model: str | None, device, enforce_eager: bool | None) -> str:
    """The line `parity generate` shows while it starts: what loads on which device, and, where the engine
    will compile its decode step before the first token (`parity.engine.model_runner.wants_eager`), that it
    compiles and how long that takes, so minutes of compiling are not read as a hang."""
    from parity.engine.model_runner import COMPILE_WAIT, wants_eager

    line = f"parity generate: loading {model or 'the default miniature'} on {device}"
    if not wants_eager(enforce_eager, device):
        line += f", then compiling its decode step ({COMPILE_WAIT}; --enforce-eager skips it)"
    return line


def timing_line(
    load_s: float,
    prompt_tokens: int,
    output_tokens: int,
    total_s: float,
    first_token_s: float | None,
    compile_s: float = 0.0,
) -> str:
    """The `parity generate` summary: load time (s; the compiled decode step's share, ``compile_s``, named
    when there is one), then prefill (time to first token, s) and the decode rate (tokens/s over the tokens
    after the first), each apart, so a cold start is never read as speed."""
    loaded = f"model loaded in {load_s:.2f} s"
    if compile_s > 0:
        loaded = f"model loaded in {load_s - compile_s:.2f} s, decode step compiled in {compile_s:.2f} s"
    parts = [loaded, f"{prompt_tokens} prompt tokens"]
    if first_token_s is not None:
        parts.append(f"first token after {first_token_s:.2f} s")
    if output_tokens > 1 and first_token_s is not None and total_s > first_token_s:
        parts.append(
            f"{output_tokens} tokens in {total_s:.2f} s, decode "
            f"{(output_tokens - 1) / (total_s - first_token_s):.1f} tokens/s"
        )
    else:
        parts.append(f"{output_tokens} tokens in {total_s:.2f} s")
    return "[" + ", ".join(parts) + "]"


def generate_streaming(engine: Any, prompt_ids: list[int], params: Any, echo: Any = None) -> tuple[Any, float | None]:
    """Run one request on an LLMEngine, writing completion 0's text to `echo` as it is released.

    Returns:
        (the RequestOutput, seconds from the start to the first generated token or None).
    """
    t0 = time.perf_counter()
    req = engine.add_request(prompt_ids, params.clone(), enforce_queue_limit=False)
    first: float | None = None
    while engine.has_unfinished() or engine._pending:
        for d in engine.step():
            if d.request_id != req.request_id:
                continue
            if d.new_token_ids and first is None:
                first = time.perf_counter() - t0
            if echo is not None and d.index == 0 and d.new_text:
                echo.write(d.new_text)
                echo.flush()
    return req.output(), first
