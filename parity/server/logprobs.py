"""Logprobs of generated tokens shaped as OpenAI's chat (`logprobs.content`) and completions objects.

Accepted engine entry shapes (one per generated token): {token_id: float | obj.logprob},
[(token_id, logprob), ...], an object with `.logprob` and `.top_logprobs`, or a bare float (the sampled
token's logprob). Logprobs are natural-log probabilities.
"""

from __future__ import annotations

from typing import Any


def token_str(tokenizer: Any, tid: int) -> str:
    """The string of token `tid` (special tokens included); "" when the tokenizer cannot decode it."""
    try:
        return tokenizer.decode([int(tid)], skip_special_tokens=False)
    except Exception:
        return ""


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


def chat_logprobs(tokenizer: Any, token_ids: list[int], entries: list[Any], top_n: int) -> list[dict]:
    """OpenAI chat `logprobs.content` items (token, logprob, UTF-8 bytes, top_logprobs) for generated tokens;
    `top_n` alternatives per token, best first."""
    out = []
    for tid, entry in zip(token_ids, entries, strict=False):
        own, pairs = lp_entry(entry, tid)
        s = token_str(tokenizer, tid)
        tops = []
        for k, lp in pairs[:top_n]:
            ks = token_str(tokenizer, k)
            tops.append({"token": ks, "logprob": lp, "bytes": list(ks.encode("utf-8"))})
        out.append({"token": s, "logprob": own,
                    "bytes": list(s.encode("utf-8")), "top_logprobs": tops})
    return out


def _text_piece(tokenizer: Any, tid: int, skip_special_tokens: bool) -> str:
    """What token `tid` contributes to the response text: "" for a special token that
    `skip_special_tokens` drops, else its string."""
    if skip_special_tokens:
        try:
            return tokenizer.decode([int(tid)], skip_special_tokens=True)
        except Exception:
            return ""
    return token_str(tokenizer, tid)


def completion_logprobs(tokenizer: Any, token_ids: list[int], entries: list[Any], top_n: int,
                        offset0: int, skip_special_tokens: bool = True) -> dict[str, Any]:
    """OpenAI completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset).

    `tokens[i]` is what token i contributes to `text`, so `text_offset` (characters, starting at `offset0`)
    indexes `text`: a special token dropped by `skip_special_tokens` is "" there (vLLM prints its string and
    so counts characters `text` lacks); `top_logprobs` keys stay the tokens' own strings.
    """
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for tid, entry in zip(token_ids, entries, strict=False):
        own, pairs = lp_entry(entry, tid)
        s = _text_piece(tokenizer, tid, skip_special_tokens)
        tokens.append(s)
        lps.append(own)
        tops.append({token_str(tokenizer, k): lp for k, lp in pairs[:top_n]} if top_n else None)
        offs.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
