"""Workloads whose requests share context: prefix repetition, multi-turn conversation replay, mooncake traces.

- ``prefix:num_prefixes=N,prefix_len=L,suffix_len=S,out=O`` — the prefix-caching benchmark's workload (vLLM
  ``bench serve --dataset-name prefix_repetition``): N shared prefixes of L tokens; request i = prefix i mod N +
  its own S-token suffix, O output tokens. A prefix cache can skip N*L of every N*(L+S) prompt tokens after the
  first round.
- ``multiturn:PATH[,turns=T][,out=O]`` — ShareGPT-format conversations replayed turn by turn: the request for user
  turn k carries the conversation so far (user and recorded assistant turns, as chat messages) and asks for the
  recorded answer's length (or O). A conversation's turns follow each other in the request order; at most T user
  turns per conversation. The recorded answers stand in for the generated ones, so requests do not wait on each
  other (each turn's prompt is known in advance).
- ``mooncake:PATH[,block=512]`` — Mooncake / AIPerf trace JSONL (kvcache-ai/Mooncake ``mooncake_trace.jsonl``):
  ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` (one id per block of `block` tokens,
  512 in the published traces). Requests sharing a hash id share that block's text, so prefix-cache hits in the
  trace are hits against the server; sent at the trace's times.

All offline: prompts are built from the tokenizer's whole words (`parity.bench.workloads.PromptBuilder`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from parity.bench.tokenizer import BenchTokenizer
from parity.bench.workloads import (
    BenchRequest,
    PromptBuilder,
    WorkloadSpec,
    build_requests,
    jsonl_objects,
    missing_file_error,
    parse_workload,
)
from parity.errors import BenchError

#: Tokens per hash block in the published Mooncake traces (kvcache-ai/Mooncake FAST25-release/traces README).
MOONCAKE_BLOCK = 512
SHARED_KINDS = ("prefix", "multiturn", "mooncake")


def build_workload(
    spec: WorkloadSpec | str, tokenizer: BenchTokenizer, num_prompts: int | None, seed: int = 0
) -> tuple[list[BenchRequest], list[str]]:
    """Every ``--workload`` kind: the shared-context ones here, the others via `build_requests`.

    Raises:
        BenchError: bad spec or file (the message names the line / field).
    """
    ws = parse_workload(spec) if isinstance(spec, str) else spec
    if ws.kind not in SHARED_KINDS:
        return build_requests(ws, tokenizer, num_prompts, seed)
    if num_prompts is not None and num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {num_prompts}")
    rng = np.random.default_rng(seed)
    pb = PromptBuilder(tokenizer, seed)
    if ws.kind == "prefix":
        return _prefix(ws, pb, num_prompts or 1000, rng)
    if ws.kind == "multiturn":
        return _multiturn(ws, tokenizer, num_prompts)
    return _mooncake(ws, pb, tokenizer, num_prompts, seed)


def _prefix(ws, pb, n, rng):
    e = ws.extra
    prefixes = [pb.build(e["prefix_len"], rng)[0] for _ in range(e["num_prefixes"])]
    reqs = []
    for i in range(n):
        text = prefixes[i % e["num_prefixes"]] + pb.build(e["suffix_len"], rng)[0]
        reqs.append(BenchRequest(i, text, pb.tok.count(text), ws.output_len))
    note = (
        f"prefix repetition: {e['num_prefixes']} shared prefixes of {e['prefix_len']} tokens, unique suffixes of "
        f"{e['suffix_len']} tokens, request i uses prefix i mod {e['num_prefixes']}"
    )
    return reqs, [note]


def _multiturn(ws, tok, num_prompts):
    path = Path(ws.path)
    if not path.is_file():
        raise missing_file_error(ws.raw, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"--workload {ws.raw!r}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise BenchError(f'--workload {ws.raw!r}: {path} must hold a JSON list of {{"conversations": [...]}}')
    max_turns = ws.extra.get("turns")
    reqs: list[BenchRequest] = []
    n_conv = 0
    for ci, item in enumerate(data):
        conv = item.get("conversations", item.get("conversation")) if isinstance(item, dict) else None
        if not isinstance(conv, list):
            raise BenchError(f"--workload {ws.raw!r}: {path} entry {ci} has no `conversations` list")
        msgs: list[dict] = []
        turns = 0
        for k in range(0, len(conv) - 1, 2):
            try:
                user, answer = str(conv[k]["value"]), str(conv[k + 1]["value"])
            except (KeyError, TypeError):
                raise BenchError(f"--workload {ws.raw!r}: {path} entry {ci}: each turn needs a `value`") from None
            msgs = [*msgs, {"role": "user", "content": user}]
            text = "\n".join(m["content"] for m in msgs)
            reqs.append(
                BenchRequest(
                    len(reqs), text, tok.count(text), ws.output_len or max(1, tok.count(answer)), messages=msgs
                )
            )
            msgs = [*msgs, {"role": "assistant", "content": answer}]
            turns += 1
            if (max_turns and turns >= max_turns) or (num_prompts and len(reqs) >= num_prompts):
                break
        n_conv += turns > 0
        if num_prompts and len(reqs) >= num_prompts:
            break
    if not reqs:
        raise BenchError(f"--workload {ws.raw!r}: {path} has no conversation with a user and an assistant turn")
    note = (
        f"multi-turn replay: {len(reqs)} turns of {n_conv} conversations, each turn carrying the conversation so "
        "far with the recorded assistant answers"
    )
    return reqs, [note]


def load_mooncake(path: Path, spec: str) -> list[dict]:
    """Rows {arrival_s, input_len, output_len, hash_ids} of a Mooncake trace, sorted by arrival.

    Raises:
        BenchError: missing file, bad JSON line, missing / invalid field (names the line).
    """
    rows = []
    for ln, obj in jsonl_objects(path, spec):
        t = obj.get("timestamp")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise BenchError(
                f"--workload {spec!r}: {path} line {ln}: `timestamp` (ms) must be a finite number >= 0, got {t!r}"
            )
        for key in ("input_length", "output_length"):
            v = obj.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BenchError(f"--workload {spec!r}: {path} line {ln}: `{key}` must be an integer >= 1, got {v!r}")
        h = obj.get("hash_ids", [])
        if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in h):
            raise BenchError(f"--workload {spec!r}: {path} line {ln}: `hash_ids` must be a list of integers")
        rows.append(
            {
                "arrival_s": t / 1000.0,
                "input_len": obj["input_length"],
                "output_len": obj["output_length"],
                "hash_ids": h,
            }
        )
    if not rows:
        raise BenchError(
            f"--workload {spec!r}: {path} is empty; expected JSONL lines like "
            '{"timestamp": 0, "input_length": 1024, "output_length": 64, "hash_ids": [0, 1]}'
        )
    rows.sort(key=lambda r: r["arrival_s"])
    return rows


def _mooncake(ws, pb, tok, num_prompts, seed):
    block = ws.extra.get("block", MOONCAKE_BLOCK)
    rows = load_mooncake(Path(ws.path), ws.raw)
    n = min(num_prompts or len(rows), len(rows))
    blocks: dict[int, str] = {}

    def block_text(h: int) -> str:
        if h not in blocks:  # one text per hash id, the same in every request that names it
            blocks[h] = pb.build(block, np.random.default_rng([seed, h]))[0]
        return blocks[h]

    t0 = rows[0]["arrival_s"]
    rng = np.random.default_rng(seed)
    reqs = []
    for i, row in enumerate(rows[:n]):
        text = "".join(block_text(h) for h in row["hash_ids"][: math.ceil(row["input_len"] / block)])
        have = len(row["hash_ids"][: math.ceil(row["input_len"] / block)]) * block
        if have < row["input_len"]:
            text += pb.build(row["input_len"] - have, rng)[0]
        elif have > row["input_len"]:  # the last block is partial: keep its first words
            words = text.split(" ")
            text = " ".join(words[: len(words) - (have - row["input_len"])])
        reqs.append(BenchRequest(i, text, tok.count(text), row["output_len"], arrival_s=row["arrival_s"] - t0))
    notes = [
        f"mooncake trace: {n} requests sent at the trace's times; prompts built from {len(blocks)} shared "
        f"blocks of {block} tokens (one text per hash id)"
    ]
    if num_prompts and num_prompts > len(rows):
        notes.append(f"{Path(ws.path).name}: {len(rows)} trace lines, fewer than --num-prompts {num_prompts}")
    return reqs, notes
