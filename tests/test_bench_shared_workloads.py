"""Workloads sharing context: prefix repetition, multi-turn replay, mooncake traces (offline, from files)."""

import json

import pytest

from parity.bench.client import build_payload
from parity.bench.shared_workloads import build_workload
from parity.errors import BenchError


def test_prefix_repetition_shares_prefixes(tok):
    reqs, notes = build_workload("prefix:num_prefixes=3,prefix_len=20,suffix_len=5,out=7", tok, 9, seed=1)
    assert len(reqs) == 9 and all(r.prompt_tokens == 25 and r.output_tokens == 7 for r in reqs)
    words = [r.prompt.split() for r in reqs]
    for i in range(9):
        assert words[i][:20] == words[i % 3][:20]  # same prefix every 3rd request
    assert words[0][:20] != words[1][:20] and len({tuple(w[20:]) for w in words}) == 9  # unique suffixes
    assert "3 shared prefixes of 20 tokens" in notes[0]
    with pytest.raises(BenchError, match="`prefix_len` must be an integer"):
        build_workload("prefix:num_prefixes=3,suffix_len=5,out=7", tok, 2)


def test_multiturn_replay_carries_history(tok, tmp_path):
    conv = [
        {
            "conversations": [
                {"from": "human", "value": "alpha bravo"},
                {"from": "gpt", "value": "charlie delta echo"},
                {"from": "human", "value": "golf"},
                {"from": "gpt", "value": "hotel"},
            ]
        },
        {"conversations": [{"from": "human", "value": "kilo lima"}, {"from": "gpt", "value": "mike"}]},
    ]
    p = tmp_path / "conv.json"
    p.write_text(json.dumps(conv))
    reqs, notes = build_workload(f"multiturn:{p}", tok, None)
    assert len(reqs) == 3 and "3 turns of 2 conversations" in notes[0]
    assert reqs[1].messages == [
        {"role": "user", "content": "alpha bravo"},
        {"role": "assistant", "content": "charlie delta echo"},
        {"role": "user", "content": "golf"},
    ]
    assert [r.output_tokens for r in reqs] == [3, 1, 1]
    body = build_payload("chat", "m", reqs[1])
    assert body["messages"] == reqs[1].messages
    assert len(build_workload(f"multiturn:{p},turns=1", tok, None)[0]) == 2
    p.write_text("{}")
    with pytest.raises(BenchError, match="must hold a JSON list"):
        build_workload(f"multiturn:{p}", tok, None)


def test_mooncake_trace_shares_hash_blocks(tok, tmp_path):
    lines = [
        {"timestamp": 1000, "input_length": 20, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 25, "output_length": 6, "hash_ids": [0, 1, 2]},
        {"timestamp": 3000, "input_length": 15, "output_length": 2, "hash_ids": [7, 8]},
    ]
    p = tmp_path / "mooncake.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    reqs, notes = build_workload(f"mooncake:{p},block=10", tok, None)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.0]
    assert [r.output_tokens for r in reqs] == [4, 6, 2]
    assert [r.prompt_tokens for r in reqs] == [20, 25, 15]
    w = [r.prompt.split() for r in reqs]
    assert w[0][:20] == w[1][:20]  # blocks 0 and 1 shared
    assert w[2][:10] != w[0][:10]
    assert "5 shared blocks of 10 tokens" in notes[0]
    p.write_text('{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": []}')
    with pytest.raises(BenchError, match="line 1: `input_length` must be an integer >= 1"):
        build_workload(f"mooncake:{p}", tok, None)
    with pytest.raises(BenchError, match="needs a file path"):
        build_workload("mooncake:", tok, None)
