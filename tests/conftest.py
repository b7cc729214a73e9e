"""Fixtures shared by several test modules.

Model fixtures build the SMALL DeepSeek-V4 checkpoint of `test_model_helpers` once per session; torch and
transformers are imported inside them, so test modules that do not use them stay light.
The suite runs eager (``PARITY_ENFORCE_EAGER=1``, inherited by the servers it spawns): compiling a decode
step takes a minute or more per batch bucket; tests that want the compiled step ask for it.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PARITY_ENFORCE_EAGER", "1")


@pytest.fixture(scope="session")
def hf_small(tmp_path_factory):
    """(checkpoint_dir, transformers_model) of the SMALL config, saved in transformers' default format."""
    from test_model_helpers import make_hf_model, save_hf

    m = make_hf_model(0)
    d = tmp_path_factory.mktemp("v4small")
    return save_hf(m, d), m


@pytest.fixture(scope="session")
def parity_small(hf_small):
    """parity's model loaded from the `hf_small` checkpoint."""
    from parity.checkpoint.reader import from_pretrained

    return from_pretrained(hf_small[0])


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (tiny models are faster so; CI has 2 shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def word_tokenizer_json(tmp_path_factory):
    """Factory ``make(words) -> Path`` of a word-level tokenizer.json: id 0 is "[UNK]", word i has id i + 1, and
    text is split on whitespace and punctuation (so " tok" is exactly one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def make(words: list[str]):
        t = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
        t.save(str(path))
        return path

    return make


#: Vocabulary of the bench tests' word-level tokenizer; the scripted servers stream " tok" (one token).
BENCH_WORDS = (
    "tok alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango"
).split()


@pytest.fixture(scope="session")
def bench_tokenizer_json(word_tokenizer_json):
    """Factory ``make(n=None) -> Path``: a word-level tokenizer.json of the first ``n`` bench words (None: all)."""
    return lambda n=None: word_tokenizer_json(BENCH_WORDS[:n])


@pytest.fixture(scope="session")
def tok(bench_tokenizer_json):
    """The bench tokenizer over all of `BENCH_WORDS` (test modules may override it with a smaller vocabulary)."""
    from parity.bench.tokenizer import load_bench_tokenizer

    return load_bench_tokenizer(bench_tokenizer_json())
