"""Logprobs of generated tokens shaped as OpenAI's chat (`logprobs.content`) and completions objects.

Accepted engine entry shapes (one per generated token): {token_id: float | obj.logprob},
[(token_id, logprob), ...], an object with `.logprob` and `.top_logprobs`, or a bare float (the sampled
token's logprob). Logprobs are natural-log probabilities.

Token strings: a token whose bytes are valid UTF-8 is that text; a byte-level token holding part of a
multi-byte character is written ``bytes:\\xe8`` (OpenAI's notation) and its `bytes` are the raw bytes;
without a tokenizer (token-ids-only server) or with `return_tokens_as_token_ids`, tokens are
``token_id:123`` (vLLM's notation), so distinct tokens never share a `top_logprobs` key.
"""

from __future__ import annotations

import codecs
from typing import Any


def token_bytes(tokenizer: Any, tid: int) -> bytes | None:
    """The raw bytes of token `tid` (special tokens: their text); None when the tokenizer cannot tell."""
    if tokenizer is None:
        return None
    tb = getattr(tokenizer, "token_bytes", None)
    try:
        if tb is not None:
            return bytes(tb(int(tid)))
        return tokenizer.decode([int(tid)], skip_special_tokens=False).encode("utf-8")
    except Exception:
        return None


def token_str(tokenizer: Any, tid: int, as_ids: bool = False) -> str:
    """The string of token `tid` (see the module docstring for the notations)."""
    b = None if as_ids else token_bytes(tokenizer, tid)
    if b is None:
        return f"token_id:{int(tid)}"
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _lp_value(v: Any) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    return float(getattr(v, "logprob", v))


def lp_entry(entry: Any, tid: int) -> tuple[float | None, list[tuple[int, float]]]:
    """(logprob of the sampled token `tid`, [(token id, logprob)] best first) from one engine entry."""
    if entry is None:
        return None, []
    if isinstance(entry, (int, float)):
        return float(entry), []
    if hasattr(entry, "logprob") and not isinstance(entry, dict):
        top = getattr(entry, "top_logprobs", None) or getattr(entry, "top", None) or {}
        _, pairs = lp_entry(top, tid)
        return float(entry.logprob), pairs
    if isinstance(entry, dict):
        pairs = [(int(k), _lp_value(v)) for k, v in entry.items()]
    else:
        pairs = [(int(k), _lp_value(v)) for k, v in entry]
    pairs.sort(key=lambda kv: -kv[1])
    own = next((lp for k, lp in pairs if k == tid), None)
    return own, pairs


def _chat_item(tokenizer: Any, tid: int, lp: float | None, as_ids: bool) -> dict:
    b = None if as_ids else token_bytes(tokenizer, tid)
    return {"token": token_str(tokenizer, tid, as_ids), "logprob": lp, "bytes": list(b) if b is not None else None}


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], entries: list[Any], top_n: int, as_ids: bool = False
) -> list[dict]:
    """OpenAI chat `logprobs.content` items (token, logprob, the token's raw bytes, top_logprobs) for
    generated tokens; `top_n` alternatives per token, best first; `as_ids`: ``token_id:N`` tokens."""
    out = []
    for tid, entry in zip(token_ids, entries, strict=False):
        own, pairs = lp_entry(entry, tid)
        item = _chat_item(tokenizer, tid, own, as_ids)
        item["top_logprobs"] = [_chat_item(tokenizer, k, lp, as_ids) for k, lp in pairs[:top_n]]
        out.append(item)
    return out


def prompt_logprobs(
    tokenizer: Any, token_ids: list[int], entries: list[Any] | None, top_n: int, as_ids: bool = False
) -> list[dict | None]:
    """vLLM's `prompt_logprobs` of a response: per prompt token, None for the first (nothing precedes it),
    else {str(token id): {"logprob", "rank", "decoded_token"}} holding the prompt token and the `top_n` most
    likely tokens at its position (so top_n or top_n + 1 entries). `rank` is 1-based in the vocabulary (the
    engine's TokenLogprobs.rank for the prompt token; 1 + the number of better ones for the others);
    `decoded_token` is the token's string in this module's notation. An entry the engine did not give is None.
    """
    entries = entries or []
    out: list[dict | None] = []
    for i, tid in enumerate(token_ids):
        entry = entries[i] if i < len(entries) else None
        if i == 0 or entry is None:
            out.append(None)
            continue
        own, pairs = lp_entry(entry, tid)
        own_rank = getattr(entry, "rank", None)
        if own_rank is None:
            own_rank = _rank(own, pairs)
        d = {str(int(tid)): _prompt_item(tokenizer, tid, own, own_rank, as_ids)}
        for k, lp in pairs[:top_n]:
            d.setdefault(str(k), _prompt_item(tokenizer, k, lp, _rank(lp, pairs), as_ids))
        out.append(d)
    return out


def _rank(lp: float | None, pairs: list[tuple[int, float]]) -> int | None:
    """1-based rank of a log-probability among the engine's top tokens `pairs` (all better ones are in it)."""
    return None if lp is None else 1 + sum(x > lp for _, x in pairs)


def _prompt_item(tokenizer: Any, tid: int, lp: float | None, rank: int | None, as_ids: bool) -> dict:
    return {"logprob": lp, "rank": rank, "decoded_token": token_str(tokenizer, tid, as_ids)}


def _is_skipped(tokenizer: Any, tid: int, skip_special_tokens: bool) -> bool:
    if not skip_special_tokens or tokenizer is None:
        return False
    is_special = getattr(tokenizer, "is_special", None)
    if is_special is not None:
        return bool(is_special(int(tid)))
    try:
        return tokenizer.decode([int(tid)], skip_special_tokens=True) == ""
    except Exception:
        return False


def text_decoder() -> Any:
    """The UTF-8 decoder that tracks which character of `text` each token's bytes start in; one per
    choice, kept across the deltas of a stream."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    entries: list[Any],
    top_n: int,
    offset0: int,
    skip_special_tokens: bool = True,
    as_ids: bool = False,
    decoder: Any = None,
) -> dict[str, Any]:
    """OpenAI completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset).

    `tokens[i]` is token i's own string (module docstring), special tokens included even where
    `skip_special_tokens` drops them from `text` (as vLLM);
    `text_offset[i]` is the index (counted from `offset0`) of the character of `text` that token i's first
    byte is part of, `text` being the tokens' bytes decoded as UTF-8 with each invalid sequence replaced by
    one U+FFFD: the bytes of one character split over several tokens share its offset, and an unfinished
    character that the next token does not complete is a U+FFFD of the tokens whose bytes it holds, so the
    next token starts after it. A token with no text (a skipped special token) gets the offset where the
    text goes on.
    `decoder` (from :func:`text_decoder`) carries an unfinished character over from the previous delta.
    """
    decoder = decoder or text_decoder()
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for tid, entry in zip(token_ids, entries, strict=False):
        own, pairs = lp_entry(entry, tid)
        skipped = _is_skipped(tokenizer, tid, skip_special_tokens)
        tokens.append(token_str(tokenizer, tid, as_ids))
        lps.append(own)
        tops.append({token_str(tokenizer, k, as_ids): lp for k, lp in pairs[:top_n]} if top_n else None)
        b = None if skipped else token_bytes(tokenizer, tid)
        if b:
            unfinished = decoder.getstate()[0]  # bytes of earlier tokens not decoded yet
            offs.append(off + (_char_of_byte(unfinished + b, len(unfinished)) if unfinished else 0))
            off += len(decoder.decode(b))
        else:
            offs.append(off)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def _char_of_byte(data: bytes, pos: int) -> int:
    """The index of the character of `data` decoded as UTF-8 with replacement (each invalid sequence one
    U+FFFD, Python's `errors="replace"`) that byte `pos` is part of; bytes after `pos` may end mid-character."""
    chars, i = 0, 0
    while True:
        try:
            data[i:].decode("utf-8")
            end = start = len(data)
        except UnicodeDecodeError as e:
            start, end = i + e.start, i + e.end
        if pos < start:  # inside the valid run data[i:start]: count the characters it completes before pos
            return chars + len(codecs.getincrementaldecoder("utf-8")().decode(data[i:pos]))
        if pos < end:
            return chars + len(data[i:start].decode("utf-8"))
        chars += len(data[i:start].decode("utf-8")) + 1
        i = end
