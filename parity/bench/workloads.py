"""Workloads for `parity bench`: which prompts are sent, how long the answers are asked to be, and when.

``--workload SPEC`` forms (``KIND:key=value,key=value``; a first item without ``=`` is the file path):

- ``random:in=1024,out=128[,ratio=0.0][,convention=vllm|sglang]`` — lengths drawn per request, uniform
  over integers, with the range convention named explicitly because the two reference tools differ:

  * ``vllm`` (vLLM ``bench serve --random-range-ratio``; vllm/benchmarks/datasets.py ``RandomDataset``):
    ratio r in [0, 1); length in [floor(L*(1-r)), ceil(L*(1+r))], both ends included — symmetric around L.
    Output lengths are clamped to at least 1.
  * ``sglang`` (SGLang ``bench_serving --random-range-ratio``; python/sglang/bench_serving.py
    ``sample_random_requests``): ratio r in [0, 1]; length in [max(int(L*r), 1), L], both ends included —
    L is the maximum; r = 1 means fixed length L, r = 0 means anything from 1 to L.
    (Our output lower bound is clamped to 1 too, where SGLang allows int(L*r) = 0.)

  ratio defaults to 0 and convention to vllm, i.e. fixed lengths L unless asked otherwise.
- ``fixed:in=1024,out=128`` — every request exactly `in` prompt tokens and `out` output tokens.
- ``sharegpt:PATH[,out=N]`` — ShareGPT-format JSON (a list of ``{"conversations": [{"from": ..., "value": ...},
  ...]}``): prompt = first turn, output length = token count of the second turn (or ``out``). Entries with fewer
  than two turns are skipped. Requests are sampled in a seeded shuffle.
- ``trace:PATH`` — trace replay, JSONL: one object per line with ``arrival_s`` (seconds from trace start; or
  ``timestamp_ms``; a finite number >= 0, NaN/Infinity refused), ``input_len`` and ``output_len`` (integers >= 1
  tokens; aliases ``input_length``/``output_length``),
  optionally ``prompt`` (text, then counted with the tokenizer). Arrival times replace ``--request-rate``.

Random and fixed prompts are strings of random whole words taken from the tokenizer's own vocabulary, built so
that they encode to exactly the requested count (checked by encoding, adjusted if off); every request gets
different words, so no prefix is shared between requests (no prefix-cache hits). vLLM instead samples random token
ids; both give prompts of the asked token count with no shared prefix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.bench.tokenizer import BenchTokenizer
from parity.errors import BenchError

CONVENTIONS = ("vllm", "sglang")
KINDS = ("random", "fixed", "sharegpt", "trace", "prefix", "multiturn", "mooncake")
#: Kinds whose first item may be a file path.
FILE_KINDS = ("sharegpt", "trace", "multiturn", "mooncake")


@dataclass
class BenchRequest:
    """One request of a workload.

    Attributes:
        index: position in the workload (0-based).
        prompt: prompt text (sent as the user message for chat, as `prompt` for completions).
        prompt_tokens: tokens of `prompt` counted with the bench tokenizer (no special tokens, no chat template).
        output_tokens: requested output length in tokens (sent as max_tokens).
        arrival_s: trace replay send offset in s from the start of the run (None: from --request-rate).
        messages: chat messages to send instead of one user message holding `prompt` (multi-turn replay).
    """

    index: int
    prompt: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None
    messages: list | None = None


@dataclass
class WorkloadSpec:
    """A parsed ``--workload`` value."""

    kind: str
    input_len: int | None = None
    output_len: int | None = None
    ratio: float = 0.0
    convention: str = "vllm"
    path: str | None = None
    raw: str = ""
    extra: dict = field(default_factory=dict)


#: Longest synthetic prompt or output length a workload may ask for, in tokens: twice DeepSeek-V4's context
#: (max_position_embeddings 1,048,576, the model's config.json). A policy bound, not a model constant: the
#: bench builds every synthetic prompt in memory before the run, so a typo such as in=99999999 would take
#: tens of GB instead of failing.
MAX_SYNTHETIC_TOKENS = 2 * 1_048_576

#: The length keys that MAX_SYNTHETIC_TOKENS bounds.
_LENGTH_KEYS = frozenset({"in", "out", "prefix_len", "suffix_len"})


def _int_field(kv: dict, key: str, spec: str, minimum: int = 1) -> int:
    try:
        v = int(kv[key])
    except (KeyError, ValueError):
        raise BenchError(f"--workload {spec!r}: `{key}` must be an integer >= {minimum}") from None
    if v < minimum:
        raise BenchError(f"--workload {spec!r}: `{key}` must be an integer >= {minimum}, got {v}")
    if key in _LENGTH_KEYS and v > MAX_SYNTHETIC_TOKENS:
        raise BenchError(
            f"--workload {spec!r}: `{key}` must be at most {MAX_SYNTHETIC_TOKENS} tokens (twice DeepSeek-V4's "
            f"context), got {v}"
        )
    return v


def shortest_request_tokens(ws: WorkloadSpec) -> int | None:
    """The fewest tokens (prompt + output) any request of a synthetic workload has (None: a file workload,
    whose lengths are known only once it is read)."""
    if ws.kind == "fixed":
        return ws.input_len + ws.output_len
    if ws.kind == "random":
        return (
            length_range(ws.input_len, ws.ratio, ws.convention)[0]
            + length_range(ws.output_len, ws.ratio, ws.convention)[0]
        )
    if ws.kind == "prefix":
        return ws.extra["prefix_len"] + ws.extra["suffix_len"] + ws.output_len
    return None


def parse_workload(spec: str) -> WorkloadSpec:
    """Parse a ``--workload`` string (see module docstring).

    Raises:
        BenchError: unknown kind or key, missing or invalid value; the message names the key and what is expected.
    """
    spec = (spec or "").strip()
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise BenchError(
            f"--workload {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)} "
            "(e.g. random:in=1024,out=128,ratio=0.5,convention=vllm)"
        )
    kv: dict[str, str] = {}
    path = None
    for i, item in enumerate(x for x in rest.split(",") if x.strip()):
        if "=" not in item:
            if i == 0 and kind in FILE_KINDS:
                path = item.strip()
                continue
            raise BenchError(f"--workload {spec!r}: item {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = k.strip().lower()
        k = {"input": "in", "input_len": "in", "output": "out", "output_len": "out", "range_ratio": "ratio"}.get(k, k)
        kv[k] = v.strip()
    allowed = {
        "random": {"in", "out", "ratio", "convention"},
        "fixed": {"in", "out"},
        "sharegpt": {"path", "out"},
        "trace": {"path"},
        "prefix": {"num_prefixes", "prefix_len", "suffix_len", "out"},
        "multiturn": {"path", "out", "turns"},
        "mooncake": {"path", "block"},
    }[kind]
    unknown = set(kv) - allowed
    if unknown:
        raise BenchError(
            f"--workload {spec!r}: unknown key(s) {', '.join(sorted(unknown))} for {kind}; "
            f"expected {', '.join(sorted(allowed))}"
        )
    ws = WorkloadSpec(kind=kind, raw=spec)
    if kind in ("random", "fixed"):
        ws.input_len = _int_field(kv, "in", spec)
        ws.output_len = _int_field(kv, "out", spec)
    if kind == "random":
        ws.convention = kv.get("convention", "vllm").lower()
        if ws.convention not in CONVENTIONS:
            raise BenchError(
                f"--workload {spec!r}: convention must be one of {', '.join(CONVENTIONS)}, got {ws.convention!r}"
            )
        try:
            ws.ratio = float(kv.get("ratio", "0"))
        except ValueError:
            raise BenchError(f"--workload {spec!r}: ratio must be a number") from None
        if ws.convention == "vllm" and not 0.0 <= ws.ratio < 1.0:
            raise BenchError(f"--workload {spec!r}: ratio for convention=vllm must be in [0, 1), got {ws.ratio}")
        if ws.convention == "sglang" and not 0.0 <= ws.ratio <= 1.0:
            raise BenchError(f"--workload {spec!r}: ratio for convention=sglang must be in [0, 1], got {ws.ratio}")
    if kind == "prefix":
        ws.extra = {k: _int_field(kv, k, spec) for k in ("num_prefixes", "prefix_len", "suffix_len")}
        ws.output_len = _int_field(kv, "out", spec)
    if kind in ("multiturn", "mooncake"):
        ws.extra = {k: _int_field(kv, k, spec) for k in ("turns", "block") if k in kv}
    if kind in FILE_KINDS:
        ws.path = kv.get("path", path)
        if not ws.path:
            example = f"{kind}:data.json{'l' if kind in ('trace', 'mooncake') else ''}"
            raise BenchError(f"--workload {spec!r}: {kind} needs a file path, e.g. {example}")
        if "out" in kv:
            ws.output_len = _int_field(kv, "out", spec)
    return ws


def length_range(target: int, ratio: float, convention: str) -> tuple[int, int]:
    """Inclusive [low, high] token-length range for a random workload (see module docstring; low >= 1)."""
    if convention == "vllm":
        lo, hi = math.floor(target * (1 - ratio)), math.ceil(target * (1 + ratio))
    elif convention == "sglang":
        lo, hi = int(target * ratio), target
    else:
        raise BenchError(f"--workload: convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    lo = max(lo, 1)
    return lo, max(hi, lo)


def sample_lengths(target: int, ratio: float, convention: str, n: int, rng: np.random.Generator) -> list[int]:
    """`n` lengths uniform over the integers of `length_range(target, ratio, convention)`."""
    lo, hi = length_range(target, ratio, convention)
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


class PromptBuilder:
    """Builds prompts of an exact token count from whole vocabulary words.

    The word pool: token ids drawn at random (seeded), kept when the token decodes to a single alphabetic word
    that re-encodes, with a leading space, to exactly one token. A prompt of L tokens is L such words, each
    preceded by a space; its count is then checked by encoding and corrected by dropping/adding words.
    """

    def __init__(self, tokenizer: BenchTokenizer, seed: int = 0, pool_target: int = 512):
        self.tok = tokenizer
        rng = np.random.default_rng(seed + 7919)
        words: list[str] = []
        seen = set()
        vocab = max(1, tokenizer.vocab_size)
        for _ in range(40):
            for tid in rng.integers(0, vocab, size=1024):
                try:
                    w = tokenizer.decode([int(tid)]).strip()
                except Exception:  # noqa: BLE001 - some ids (specials) cannot be decoded alone
                    continue
                if w in seen or not re.fullmatch(r"[A-Za-z]{2,12}", w):
                    continue
                seen.add(w)
                if tokenizer.count(" " + w) == 1:
                    words.append(w)
            if len(words) >= pool_target:
                break
        if len(words) < 8:
            raise BenchError(f"tokenizer {tokenizer.name!r}: could not find whole-word tokens to build prompts from")
        self.words = words

    def build(self, n_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        """A prompt of `n_tokens` tokens (exact unless the tokenizer merges across spaces; the true count is returned).

        Returns:
            (text, token_count) with token_count counted by the tokenizer.
        """
        idx = rng.integers(0, len(self.words), size=max(n_tokens, 1))
        pieces = [" " + self.words[i] for i in idx[:n_tokens]]
        text = "".join(pieces)
        count = self.tok.count(text)
        for _ in range(16):
            if count == n_tokens:
                break
            if count > n_tokens and pieces:
                pieces.pop()
            else:
                pieces.append(" " + self.words[int(rng.integers(0, len(self.words)))])
            text = "".join(pieces)
            count = self.tok.count(text)
        return text, count


def missing_file_error(spec: str, path: Path) -> BenchError:
    """The error for a ``--workload`` file that is not a readable file: a directory, or nothing at ``path``."""
    if path.is_dir():
        return BenchError(f"--workload {spec!r}: {path} is a directory, not a file")
    return BenchError(f"--workload {spec!r}: file {path} not found")


def _load_sharegpt(path: Path, spec: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise missing_file_error(spec, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"--workload {spec!r}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise BenchError(f'--workload {spec!r}: {path} must hold a JSON list of {{"conversations": [...]}} entries')
    pairs = []
    for i, item in enumerate(data):
        conv = item.get("conversations", item.get("conversation")) if isinstance(item, dict) else None
        if not isinstance(conv, list):
            raise BenchError(f"--workload {spec!r}: {path} entry {i} has no `conversations` list")
        if len(conv) < 2:
            continue
        try:
            pairs.append((str(conv[0]["value"]), str(conv[1]["value"])))
        except (KeyError, TypeError):
            raise BenchError(f"--workload {spec!r}: {path} entry {i}: each turn needs a `value` field") from None
    if not pairs:
        raise BenchError(f"--workload {spec!r}: {path} has no conversation with at least two turns")
    return pairs


def jsonl_objects(path: Path, spec: str):
    """(line number, object) of every non-blank line of a JSON-lines workload file.

    Raises:
        BenchError: missing file, a line that is not valid JSON or not a JSON object (names the line).
    """
    if not path.is_file():
        raise missing_file_error(spec, path)
    for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"--workload {spec!r}: {path} line {ln} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise BenchError(f"--workload {spec!r}: {path} line {ln} must be a JSON object")
        yield ln, obj


def _load_trace(path: Path, spec: str) -> list[dict]:
    rows = []
    for ln, obj in jsonl_objects(path, spec):
        if "arrival_s" in obj:
            tkey, t = "arrival_s", obj["arrival_s"]
        elif "timestamp_ms" in obj:
            tkey, t = "timestamp_ms", obj["timestamp_ms"]
        else:
            raise BenchError(f"--workload {spec!r}: {path} line {ln} lacks `arrival_s` (seconds) or `timestamp_ms`")
        # json.loads accepts NaN / Infinity: an infinite arrival would make the run wait forever, NaN would
        # silently scramble the order, so both are refused here
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise BenchError(
                f"--workload {spec!r}: {path} line {ln}: `{tkey}` (arrival time) must be a finite "
                f"number >= 0, got {t!r}"
            )
        if tkey == "timestamp_ms":
            t = t / 1000.0
        row = {"arrival_s": float(t), "prompt": obj.get("prompt")}
        for key, aliases in (
            ("input_len", ("input_len", "input_length")),
            ("output_len", ("output_len", "output_length")),
        ):
            v = next((obj[a] for a in aliases if a in obj), None)
            if key == "input_len" and v is None and isinstance(row["prompt"], str):
                row[key] = None
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BenchError(f"--workload {spec!r}: {path} line {ln}: `{key}` must be an integer >= 1, got {v!r}")
            row[key] = v
        rows.append(row)
    if not rows:
        raise BenchError(
            f"--workload {spec!r}: {path} is empty; expected JSONL lines like "
            '{"arrival_s": 0.0, "input_len": 512, "output_len": 128}'
        )
    rows.sort(key=lambda r: r["arrival_s"])
    return rows


def build_requests(
    spec: WorkloadSpec | str, tokenizer: BenchTokenizer, num_prompts: int | None, seed: int = 0
) -> tuple[list[BenchRequest], list[str]]:
    """Materialise a workload.

    Args:
        spec: a `WorkloadSpec` or a ``--workload`` string.
        tokenizer: builds and counts prompts.
        num_prompts: number of requests (None: 1000 for random/fixed as vLLM's default, all entries of a file).
        seed: makes prompts, lengths and ShareGPT sampling reproducible.
    Returns:
        (requests, notes): notes are human-readable remarks to carry into the result (e.g. fewer entries than asked).
    Raises:
        BenchError: bad spec, unreadable / empty / malformed dataset file, num_prompts < 1.
    """
    ws = parse_workload(spec) if isinstance(spec, str) else spec
    if num_prompts is not None and num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if ws.kind in ("random", "fixed"):
        n = num_prompts or 1000
        if ws.kind == "fixed":
            ins, outs = [ws.input_len] * n, [ws.output_len] * n
        else:
            ins = sample_lengths(ws.input_len, ws.ratio, ws.convention, n, rng)
            outs = sample_lengths(ws.output_len, ws.ratio, ws.convention, n, rng)
            lo_i, hi_i = length_range(ws.input_len, ws.ratio, ws.convention)
            lo_o, hi_o = length_range(ws.output_len, ws.ratio, ws.convention)
            notes.append(
                f"random lengths ({ws.convention} range convention, ratio {ws.ratio:g}): input uniform in "
                f"[{lo_i}, {hi_i}], output uniform in [{lo_o}, {hi_o}] tokens"
            )
        pb = PromptBuilder(tokenizer, seed)
        reqs = []
        for i in range(n):
            text, cnt = pb.build(ins[i], rng)
            reqs.append(BenchRequest(i, text, cnt, outs[i]))
        off = sum(r.prompt_tokens != ins[i] for i, r in enumerate(reqs))
        if off:
            notes.append(f"{off} prompt(s) differ from the drawn input length (tokenizer merges); true counts recorded")
        return reqs, notes
    path = Path(ws.path)
    if ws.kind == "sharegpt":
        pairs = _load_sharegpt(path, ws.raw)
        order = rng.permutation(len(pairs))
        n = num_prompts or len(pairs)
        if n > len(pairs):
            notes.append(
                f"{path.name}: {len(pairs)} usable conversations, fewer than --num-prompts {n}; using {len(pairs)}"
            )
            n = len(pairs)
        reqs = []
        for i, j in enumerate(order[:n]):
            prompt, answer = pairs[int(j)]
            out = ws.output_len or max(1, tokenizer.count(answer))
            reqs.append(BenchRequest(i, prompt, tokenizer.count(prompt), out))
        return reqs, notes
    rows = _load_trace(path, ws.raw)
    n = num_prompts or len(rows)
    if n > len(rows):
        notes.append(f"{path.name}: {len(rows)} trace lines, fewer than --num-prompts {n}; using {len(rows)}")
        n = len(rows)
    t0 = rows[0]["arrival_s"]
    pb = None
    reqs = []
    for i, row in enumerate(rows[:n]):
        if isinstance(row["prompt"], str):
            text, cnt = row["prompt"], tokenizer.count(row["prompt"])
        else:
            pb = pb or PromptBuilder(tokenizer, seed)
            text, cnt = pb.build(row["input_len"], rng)
        reqs.append(BenchRequest(i, text, cnt, row["output_len"], arrival_s=row["arrival_s"] - t0))
    notes.append(
        "trace replay: requests sent at the trace's arrival times (relative to its first line); "
        "--request-rate and --burstiness are ignored"
    )
    return reqs, notes
