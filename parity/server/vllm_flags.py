"""vLLM's `vllm serve` flags and what parity does with each: the one table users (and other parts of parity, as
they add flags) consult.

Status:
- "supported": parity has a flag of the same name and meaning.
- "mapped": accepted under vLLM's name; it sets the parity option named in `parity`, whose meaning differs as
  `note` says.
- "unsupported": refused with one line giving `note` (the reason, and what to use instead).

Flag names and meanings: vLLM's engine and server arguments, https://docs.vllm.ai/en/latest/cli/serve.html.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass

from parity.errors import RequestError


@dataclass(frozen=True)
class VllmFlag:
    """One vLLM flag: its status in parity, the parity flag it sets (supported/mapped), and a note."""

    name: str
    status: str
    parity: str | None = None
    note: str = ""


VLLM_FLAGS: tuple[VllmFlag, ...] = (
    VllmFlag("--model", "mapped", "MODEL", "the positional checkpoint directory or preset name"),
    VllmFlag("--served-model-name", "supported", "--served-model-name"),
    VllmFlag("--max-model-len", "supported", "--max-model-len"),
    VllmFlag("--max-num-seqs", "supported", "--max-num-seqs"),
    VllmFlag("--max-num-batched-tokens", "supported", "--max-num-batched-tokens"),
    VllmFlag("--kv-cache-dtype", "supported", "--kv-cache-dtype", "parity: bf16 or fp8"),
    VllmFlag("--dtype", "supported", "--dtype"),
    VllmFlag("--seed", "supported", "--seed"),
    VllmFlag("--host", "supported", "--host"),
    VllmFlag("--port", "supported", "--port"),
    VllmFlag("--api-key", "supported", "--api-key"),
    VllmFlag("--device", "supported", "--device"),
    VllmFlag("--skip-tokenizer-init", "supported", "--skip-tokenizer-init"),
    VllmFlag(
        "--gpu-memory-utilization",
        "mapped",
        "--cache-memory-fraction",
        "vLLM: share of the whole device memory for weights, activations and cache; parity: share of the "
        "memory left free after the weights load, for the cache pool",
    ),
    VllmFlag(
        "--tensor-parallel-size",
        "supported",
        "--tensor-parallel-size",
        "query heads, output groups, shared expert, embedding and LM head split; one worker process per device",
    ),
    VllmFlag(
        "--data-parallel-size",
        "supported",
        "--data-parallel-size",
        "attention data parallelism; with --enable-expert-parallel, EP = TP x DP",
    ),
    VllmFlag(
        "--enable-expert-parallel",
        "supported",
        "--enable-expert-parallel",
        "routed experts partitioned over the TP x DP ranks",
    ),
    VllmFlag(
        "--pipeline-parallel-size",
        "unsupported",
        None,
        "parity splits a model by tensor and expert parallelism only; use --tensor-parallel-size",
    ),
    VllmFlag(
        "--enable-prefix-caching",
        "supported",
        "--enable-prefix-caching",
        "on by default; 128-token blocks of V4's compressed state and sliding window",
    ),
    VllmFlag(
        "--enforce-eager",
        "supported",
        "--enforce-eager",
        "the compiled decode step is the default on the CPU (measured faster; a server compiles its batch "
        "buckets in the background, eager until each is warm); --enforce-eager runs eager",
    ),
    VllmFlag(
        "--quantization",
        "supported",
        "--quantization",
        "parity: auto | fp8 | fp4 (as published) | w8a8 | w4a8 (INT8 conversion) | bf16",
    ),
    VllmFlag("--trust-remote-code", "unsupported", None, "parity never runs code from a checkpoint"),
    VllmFlag(
        "--tokenizer",
        "unsupported",
        None,
        "parity reads tokenizer.json from the checkpoint directory; put the tokenizer there",
    ),
    VllmFlag(
        "--chat-template", "unsupported", None, "parity uses DeepSeek-V4's own chat encoding, not a Jinja template"
    ),
    VllmFlag("--speculative-config", "unsupported", None, "speculative decoding (MTP) is not available"),
    VllmFlag("--swap-space", "unsupported", None, "parity recomputes preempted sequences; it does not swap"),
    VllmFlag("--block-size", "unsupported", None, "parity's cache pool sets its own page size"),
    VllmFlag("--max-logprobs", "unsupported", None, "parity allows up to 20 logprobs per token, fixed"),
    VllmFlag("--disable-log-requests", "unsupported", None, "parity does not log request contents"),
    VllmFlag("--uvicorn-log-level", "unsupported", None, "use --log-level"),
)

#: The table by flag name.
BY_NAME: dict[str, VllmFlag] = {f.name: f for f in VLLM_FLAGS}


def add_mapped_flags(parser: argparse.ArgumentParser) -> None:
    """Add the vLLM spellings parity maps (`--model`, `--gpu-memory-utilization`) to a serve/generate/chat
    parser; `apply_mapped_flags` folds them into parity's own options after parsing."""
    g = parser.add_argument_group("vLLM spellings")
    g.add_argument("--model", dest="vllm_model", default=None, metavar="MODEL", help="same as the positional MODEL")
    g.add_argument(
        "--gpu-memory-utilization",
        dest="vllm_gpu_memory_utilization",
        type=float,
        default=None,
        metavar="FRACTION",
        help="sets --cache-memory-fraction: " + BY_NAME["--gpu-memory-utilization"].note,
    )


def apply_mapped_flags(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> None:
    """Fold the vLLM spellings into parity's options (in place).

    Raises:
        SystemExit(2) via `parser.error` (or RequestError, a ValueError, without a parser): MODEL given
            twice, differently; --gpu-memory-utilization outside (0, 1].
    """

    def fail(msg: str) -> None:
        if parser is not None:
            parser.error(msg)
        raise RequestError(msg)

    model = getattr(args, "vllm_model", None)
    if model is not None:
        if getattr(args, "model", None) not in (None, model):
            fail(f"the model is given twice: {args.model!r} and --model {model!r}; give one")
        args.model = model
    util = getattr(args, "vllm_gpu_memory_utilization", None)
    if util is not None:
        if not 0.0 < util <= 1.0:
            fail(f"--gpu-memory-utilization must be in (0, 1], got {util}")
        args.cache_memory_fraction = util


def unknown_flag_message(flag: str, known: list[str]) -> str:
    """One line for a flag the parser does not know: the table's reason for an unsupported vLLM flag, else
    the closest known flag (difflib), else a pointer to --help."""
    name = flag.split("=", 1)[0]
    entry = BY_NAME.get(name)
    if entry is not None and entry.status == "unsupported":
        return f"{name} (a vLLM flag) is not supported: {entry.note}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unrecognized argument {name}; did you mean {close[0]}?"
    return f"unrecognized argument {name} (see --help for the flags)"


def markdown_table() -> str:
    """The table as Markdown (for docs): flag | status | parity option | note."""
    rows = ["| vLLM flag | parity | option | note |", "|---|---|---|---|"]
    for f in VLLM_FLAGS:
        rows.append(f"| `{f.name}` | {f.status} | {f'`{f.parity}`' if f.parity else '-'} | {f.note} |")
    return "\n".join(rows)
