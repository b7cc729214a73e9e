"""`LLM.generate`'s prompt forms (vLLM-shaped), on the contract-shaped FakeModel (fast)."""

import pytest

from parity.engine import LLM, SamplingParams
from parity.engine.testing import CharTokenizer, FakeModel
from parity.errors import RequestError

SP = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(model_obj=FakeModel(), tokenizer=CharTokenizer(), device="cpu", cache_memory=1 << 20)


def test_prompt_dicts_like_vllm(llm):
    ref = llm.generate(prompt_token_ids=[[2, 3, 4]], sampling_params=SP)[0]
    one = llm.generate({"prompt_token_ids": [2, 3, 4]}, SP)
    assert len(one) == 1 and one[0].prompt_token_ids == [2, 3, 4]
    assert one[0].outputs[0].token_ids == ref.outputs[0].token_ids
    text = llm.generate("abc", SP)[0]
    outs = llm.generate([{"prompt": "abc"}, {"prompt_token_ids": [2, 3, 4]}, "abc"], SP)
    assert [o.prompt_token_ids for o in outs] == [[26, 27, 28], [2, 3, 4], [26, 27, 28]]
    assert outs[0].prompt == "abc" and outs[0].outputs[0].token_ids == text.outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.parametrize(
    "prompts,kw,match",
    [
        ({"prompt_ids": [1, 2]}, {}, "unsupported keys"),
        ({}, {}, "empty prompt dict"),
        ({"prompt": 5}, {}, "must be a string"),
        ({"prompt_token_ids": "123"}, {}, "must be a list of ints"),
        ([1, 2, 3], {}, r"'prompts\[0\]' must be a str or a prompt dict"),
        (42, {}, "'prompts' must be a str"),
        ("hi", {"prompt_token_ids": [1, 2]}, "both given"),
        (None, {}, "'prompts' is missing"),
        ({"prompt_token_ids": [2, 10**6]}, {}, "prompt_token_ids"),
    ],
)
def test_bad_prompt_shapes_are_named_and_nothing_runs(llm, prompts, kw, match):
    with pytest.raises(RequestError, match=match):
        llm.generate(prompts, SP, **kw)
    assert not llm.engine.has_unfinished()


# ---- LLM.chat (vLLM's offline chat) on the bundled default miniature with its real V4 tokenizer
@pytest.fixture(scope="module")
def tiny():
    return LLM(device="cpu")


def test_chat_encodes_generates_and_parses_like_the_server(tiny):
    from parity.tokenizer import encode_chat, parse_output

    conv = [{"role": "user", "content": "Hello"}]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    (out,) = tiny.chat(conv, sp)
    prompt = encode_chat(conv)
    assert out.prompt == prompt and out.prompt_token_ids == tiny.tokenizer.encode(prompt)
    ref = tiny.generate(prompt, sp)[0].outputs[0]
    c = out.outputs[0]
    assert c.token_ids == ref.token_ids and c.text == ref.text
    assert c.message == {"role": "assistant", "content": parse_output(c.text, False).content}
    assert ref.message is None  # generate leaves it unset

    # a batch, thinking mode, tools, one SamplingParams per conversation
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    outs = tiny.chat(
        [conv, conv + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]],
        [sp, SamplingParams(temperature=0.0, max_tokens=2)],
        tools=tools,
        thinking=True,
        reasoning_effort="max",
    )
    assert len(outs) == 2 and len(outs[1].outputs[0].token_ids) == 2
    assert outs[0].prompt == encode_chat(conv, tools=tools, thinking=True, reasoning_effort="max")
    for o in outs:
        m = o.outputs[0].message
        assert m["role"] == "assistant" and isinstance(m["reasoning_content"], str)


@pytest.mark.parametrize(
    "messages, kw, match",
    [
        ([{"role": "robot", "content": "x"}], {}, r"^messages\[0\]\.role: unknown role"),
        ([[{"role": "user", "content": "x"}], [{"role": "user", "content": 5}]], {}, r"^messages\[1\]\[0\]\.content"),
        ([[]], {}, r"^messages\[0\]: expected a non-empty list"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "extreme"}, r"^reasoning_effort"),
        ([{"role": "tool", "content": "r"}], {}, r"^messages\[0\]\.role: a 'tool' message"),
    ],
)
def test_chat_bad_input_is_a_named_request_error(tiny, messages, kw, match):
    with pytest.raises(RequestError, match=match):
        tiny.chat(messages, SamplingParams(max_tokens=2), **kw)
    assert not tiny.engine.has_unfinished()


def test_tokenizer_larger_than_model_vocab_is_a_clear_checkpoint_error():
    """A checkpoint without tokenizer.json whose vocabulary is smaller than the bundled V4 tokenizer's
    (found by a new-user test: ids out of range per request) is refused once, at start-up."""
    import pytest

    from parity.config import load_preset
    from parity.engine import LLM
    from parity.errors import CheckpointError
    from parity.model import build_model

    cfg = load_preset("tiny").replace(vocab_size=1024)
    model = build_model(cfg, seed=0)
    with pytest.raises(CheckpointError, match=r"vocab_size 1024 but its tokenizer has 129280 tokens"):
        LLM(model_obj=model)
