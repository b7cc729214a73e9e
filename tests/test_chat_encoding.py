"""Chat encoding variants: trailing system turns, vLLM's template flags, the reference encoder's extra roles,
reasoning-effort tiers read from a checkpoint, and the strict-thinking EOS ban in the sampler."""

from __future__ import annotations

import json

import pytest
import torch
from test_chat_server import PROMPTS, call, start_server

from parity.checkpoint.writer import write_chat_encoding
from parity.engine.sampler import SampleRequest, sample
from parity.engine.sampling_params import SamplingParams
from parity.errors import CheckpointError, RequestError
from parity.server.chat_format import ChatFormat
from parity.tokenizer import ChatError, encode_chat, special
from parity.tokenizer.encoding import REASONING_EFFORT_MAX_PREFIX, load_encoding

BOS, EOS, U, A = special.BOS, special.EOS, special.USER, special.ASSISTANT
CHAT, THINK = A + special.THINK_END, A + special.THINK_START


def test_trailing_system_message_gets_the_transition():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Reminder: be brief."},
    ]
    assert encode_chat(msgs) == f"{BOS}S{U}HiReminder: be brief.{CHAT}"
    assert encode_chat(msgs, thinking=True).endswith(f"Reminder: be brief.{THINK}")
    assert encode_chat(msgs, add_generation_prompt=False) == f"{BOS}S{U}HiReminder: be brief."
    mid = [
        {"role": "user", "content": "q"},
        {"role": "system", "content": "m"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    assert encode_chat(mid) == f"{BOS}{U}qm{CHAT}a{EOS}{U}q2{CHAT}"


def test_generation_prompt_and_continue_final_message():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]
    assert encode_chat(msgs) == f"{BOS}{U}q{CHAT}The answer is{EOS}{CHAT}"
    assert encode_chat(msgs, add_generation_prompt=False) == f"{BOS}{U}q{CHAT}The answer is{EOS}"
    assert encode_chat(msgs, add_generation_prompt=False, continue_final_message=True) == (
        f"{BOS}{U}q{CHAT}The answer is"
    )
    thinking = [msgs[0], {"role": "assistant", "content": "", "reasoning_content": "Let me"}]
    assert encode_chat(thinking, thinking=True, add_generation_prompt=False, continue_final_message=True) == (
        f"{BOS}{U}q{THINK}Let me"
    )
    thinking[1]["content"] = "It is"
    assert encode_chat(thinking, thinking=True, add_generation_prompt=False, continue_final_message=True) == (
        f"{BOS}{U}q{THINK}Let me</think>It is"
    )
    with pytest.raises(ChatError, match="^continue_final_message:") as ei:
        encode_chat(msgs, continue_final_message=True)
    assert ei.value.param == "continue_final_message"
    with pytest.raises(ChatError, match=r"^messages\[0\]\.role: continue_final_message"):
        encode_chat(msgs[:1], add_generation_prompt=False, continue_final_message=True)


def test_reference_roles_developer_and_latest_reminder():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "developer", "content": "D"},
        {"role": "latest_reminder", "content": "2026-08-01"},
    ]
    assert encode_chat(msgs, thinking=True) == f"{BOS}S{U}D{THINK}{special.LATEST_REMINDER}2026-08-01"
    assert encode_chat([{"role": "user", "content": "q"}, {"role": "developer", "content": "D"}]) == (
        f"{BOS}{U}q{U}D{CHAT}"
    )


@pytest.fixture()
def variant_dir(tmp_path):
    write_chat_encoding(
        tmp_path, {"low": None, "high": "Think hard.\n\n", "max": "Think hardest.\n\n"}, source="test variant"
    )
    return tmp_path


def test_reasoning_effort_tiers_from_the_checkpoint(variant_dir):
    enc = load_encoding(variant_dir)
    assert enc.reasoning_efforts == {"low": "", "high": "Think hard.\n\n", "max": "Think hardest.\n\n"}
    msgs = [{"role": "user", "content": "q"}]
    assert encode_chat(msgs, thinking=True, reasoning_effort="high", encoding=enc) == f"{BOS}Think hard.\n\n{U}q{THINK}"
    assert encode_chat(msgs, thinking=True, reasoning_effort="low", encoding=enc) == f"{BOS}{U}q{THINK}"
    with pytest.raises(ChatError, match="^reasoning_effort: 'medium' is not supported by this model") as ei:
        encode_chat(msgs, thinking=True, reasoning_effort="medium", encoding=enc)
    assert ei.value.param == "reasoning_effort"
    # no file: the published table (only "max" adds text)
    assert load_encoding(variant_dir / "absent").reasoning_efforts["max"] == REASONING_EFFORT_MAX_PREFIX
    assert encode_chat(msgs, thinking=True, reasoning_effort="max").startswith(BOS + REASONING_EFFORT_MAX_PREFIX)
    (variant_dir / "chat_encoding.json").write_text(json.dumps({"reasoning_efforts": {"high": 3}}))
    with pytest.raises(CheckpointError, match="chat_encoding.json: 'reasoning_efforts'"):
        load_encoding(variant_dir)


def test_reasoning_effort_tiers_over_http(variant_dir):
    srv, _ = start_server(chat_format=ChatFormat(load_encoding(variant_dir)))
    try:
        body = {
            "messages": [{"role": "user", "content": "q [case:default]"}],
            "thinking": {"type": "enabled"},
            "max_tokens": 5,
        }
        res = call(srv, "/v1/chat/completions", {**body, "reasoning_effort": "high"})
        assert res["status"] == 200 and PROMPTS[-1].startswith(BOS + "Think hard.")
        res = call(srv, "/v1/chat/completions", {**body, "reasoning_effort": "medium"})
        assert res["status"] == 400 and res["error"]["param"] == "reasoning_effort", res
        res = call(
            srv,
            "/v1/chat/completions",
            {**body, "messages": body["messages"] + [{"role": "latest_reminder", "content": "Today is Monday."}]},
        )
        assert res["status"] == 200 and PROMPTS[-1].endswith(f"{THINK}{special.LATEST_REMINDER}Today is Monday.")
    finally:
        srv.stop()


def test_sampler_bans_exactly_the_given_ids():
    logits = torch.zeros(2, 10)
    logits[:, 1] = 9.0  # EOS best
    logits[:, 4] = 5.0
    p = SamplingParams(temperature=0.0)
    toks, _ = sample(
        logits, [SampleRequest(p, [], [], None, (1,), banned_ids=(1,)), SampleRequest(p, [], [], None, (1,))]
    )
    assert toks == [4, 1]
    with pytest.raises(RequestError, match="'strict_thinking' needs 'reasoning_end_token_id'"):
        SamplingParams(strict_thinking=True).validate(10)
    with pytest.raises(RequestError, match="'reasoning_end_token_id'"):
        SamplingParams(reasoning_end_token_id=10).validate(10)
