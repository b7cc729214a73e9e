"""`LLM.generate`'s prompt forms (vLLM-shaped), on the contract-shaped FakeModel (fast)."""

import pytest

from parity.engine import LLM, SamplingParams
from parity.engine.testing import FakeModel
from parity.errors import RequestError


class CharTokenizer:
    """One letter -> one id (a=26 ...); 0 (bos) and 1 (eos) are special."""

    eos_token_id = 1
    bos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 97 + 26 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (skip_special_tokens and i in (0, 1)) else chr(97 + i % 26) for i in ids)


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


@pytest.mark.parametrize("prompts,kw,match", [
    ({"prompt_ids": [1, 2]}, {}, "unsupported keys"),
    ({}, {}, "empty prompt dict"),
    ({"prompt": 5}, {}, "must be a string"),
    ({"prompt_token_ids": "123"}, {}, "must be a list of ints"),
    ([1, 2, 3], {}, r"'prompts\[0\]' must be a str or a prompt dict"),
    (42, {}, "'prompts' must be a str"),
    ("hi", {"prompt_token_ids": [1, 2]}, "both given"),
    (None, {}, "'prompts' is missing"),
    ({"prompt_token_ids": [2, 10**6]}, {}, "prompt_token_ids"),
])
def test_bad_prompt_shapes_are_named_and_nothing_runs(llm, prompts, kw, match):
    with pytest.raises(RequestError, match=match):
        llm.generate(prompts, SP, **kw)
    assert not llm.engine.has_unfinished()
