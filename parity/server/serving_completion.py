"""`POST /v1/completions`: `ServingCompletion` (text completions of one or more prompts).

Each choice carries its generated `token_ids` (and each stream chunk the ids of its delta) when the request
sets `return_token_ids` or the server runs without a tokenizer (`--skip-tokenizer-init`, where `text` is
empty); logprob tokens are then ``token_id:N`` strings, as with `return_tokens_as_token_ids` (vLLM's fields).

With `echo: true` and `logprobs: N`, `logprobs` lists the prompt tokens first (the first one's logprob and
top_logprobs null; the engine's `prompt_logprobs`), `text_offset` counting from the start of the echoed
text, as OpenAI's legacy API and vLLM; a stream sends the echo chunk with the first generated delta.
vLLM's `prompt_logprobs: N` puts each choice's prompt-token logprobs in its `prompt_logprobs` (from the same
engine `prompt_logprobs`, computed with the larger N when echo asks too).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from parity.server import protocol as P
from parity.server import request_options as R
from parity.server.choices import Choice, Job
from parity.server.engine_client import EngineDelta
from parity.server.errors import bad_request
from parity.server.logprobs import completion_logprobs, prompt_logprobs, text_decoder
from parity.server.serving_base import Generation, OpenAIServing
from parity.server.state import OpenAIServer


@dataclass
class CompletionGeneration(Generation):
    """A completions Generation: `logprobs` (top-N per token, None: no logprobs), the echoed prompt text
        per choice index, each streamed choice's character offset in its `text` so far, and the token ids and logprobs
    of its deltas that brought no text yet (`held`: sent with its next chunk)."""

    logprobs: int | None = None
    skip_special_tokens: bool = True
    as_ids: bool = False
    token_ids: bool = False
    echo_text: dict[int, str] = field(default_factory=dict)
    echo_ids: dict[int, list[int]] = field(default_factory=dict)
    echo_pending: set[int] = field(default_factory=set)  # streamed echo waiting for its prompt logprobs
    score_only: bool = False  # echo with max_tokens 0: the prompt (and its logprobs), no generated token
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs`: top-N per prompt token on each choice

    def completion_tokens(self) -> int:
        return 0 if self.score_only else super().completion_tokens()

    offsets: dict[int, int] = field(default_factory=dict)
    decoders: dict[int, Any] = field(default_factory=dict)
    held: dict[int, tuple[list[int], list[Any]]] = field(default_factory=dict)


class ServingCompletion(OpenAIServing):
    """Text completions: each prompt (text or token ids) runs `n` choices; choice index = prompt * n + i."""

    endpoint = "completions"
    request_cls = P.CompletionRequest
    response_object = "text_completion"
    chunk_object = "text_completion"

    async def prepare(self, req: P.CompletionRequest, arrival_s: float) -> CompletionGeneration:
        srv = self.server
        model = self.check_common(req)
        R.check_logprobs("logprobs", req.logprobs)
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        srv.check_num_seqs(prompt_count(req.prompt), req.n)
        prompts = await completion_prompts(srv, req.prompt)
        rid, engine_rid = self.response_id("cmpl", req)
        jobs: list[Job] = []
        echo_text: dict[int, str] = {}
        echo_ids: dict[int, list[int]] = {}
        # echo + max_tokens 0 scores the prompt (vLLM): the engine runs one token, which is not returned
        score_only = bool(req.echo) and req.max_tokens == 0
        prompt_total = 0  # usage.prompt_tokens: each prompt once, however many choices (n) it has (as OpenAI and vLLM)
        for pi, (ptext, full_ids) in enumerate(prompts):
            ids = R.truncate_prompt(full_ids, req.truncate_prompt_tokens, srv.max_model_len)
            if len(ids) < len(full_ids):
                ptext = None  # echo the prompt the model saw
            prompt_total += len(ids)
            pparam = "prompt" if len(prompts) == 1 else f"prompt.{pi}"
            max_tokens = srv.resolve_max_tokens(1 if score_only else req.max_tokens, len(ids), "max_tokens", pparam)
            kw = R.sampling_kwargs(req, max_tokens=max_tokens, logprobs=req.logprobs, vocab_size=srv.vocab_size)
            if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
                kw["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
            params = srv.per_choice_params(kw, req.n)
            new = srv.runner.new_choices(engine_rid, req.n, len(ids), arrival_s, base=pi * req.n)
            for ch, sp in zip(new, params, strict=True):
                jobs.append((ch, ids, sp))
                if req.echo:
                    if ptext is None and srv.tokenizer is None:
                        raise bad_request(
                            "'echo' of a token-id prompt needs a tokenizer; this server runs "
                            "without one (--skip-tokenizer-init)",
                            param="echo",
                            code="tokenizer_unavailable",
                        )
                    echo_text[ch.index] = ptext if ptext is not None else srv.tokenizer.decode(ids)
                    echo_ids[ch.index] = list(ids)
        return CompletionGeneration(
            rid=rid,
            model=model,
            created=int(time.time()),
            choices=[j[0] for j in jobs],
            jobs=jobs,
            prompt_tokens=prompt_total,
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            continuous_usage=R.continuous_usage(req),
            logprobs=req.logprobs,
            skip_special_tokens=req.skip_special_tokens,
            echo_text=echo_text,
            echo_ids=echo_ids,
            score_only=score_only,
            prompt_logprobs=req.prompt_logprobs,
            as_ids=req.return_tokens_as_token_ids or srv.tokenizer is None,
            token_ids=req.return_token_ids or srv.tokenizer is None,
        )

    def _lp_obj(
        self, gen: CompletionGeneration, ids: list[int], entries: list[Any], offset0: int, decoder: Any = None
    ) -> dict | None:
        if gen.logprobs is None:
            return None
        return completion_logprobs(
            self.server.tokenizer, ids, entries, gen.logprobs, offset0, gen.skip_special_tokens, gen.as_ids, decoder
        )

    def _echo_lp_obj(self, gen: CompletionGeneration, ch: Choice) -> dict | None:
        """The logprobs object of choice `ch`'s echoed prompt tokens (text_offset from 0; the first token's
        logprob and top_logprobs null, as OpenAI's legacy API and vLLM), or None without echo/logprobs."""
        if gen.logprobs is None or ch.index not in gen.echo_ids:
            return None
        ids = gen.echo_ids[ch.index]
        entries = ch.prompt_logprobs or [None] * len(ids)
        obj = self._lp_obj(gen, ids, entries, 0, text_decoder())
        if gen.logprobs:
            obj["top_logprobs"] = [None if e is None else t for e, t in zip(entries, obj["top_logprobs"], strict=True)]
        return obj

    def full_choices(self, gen: CompletionGeneration) -> list[dict]:
        out = []
        for ch, ids, _ in gen.jobs:
            prefix = gen.echo_text.get(ch.index, "")
            plp = {}
            if gen.prompt_logprobs is not None:
                plp["prompt_logprobs"] = prompt_logprobs(
                    self.server.tokenizer, ids, ch.prompt_logprobs, gen.prompt_logprobs, gen.as_ids
                )
            if gen.score_only:
                c = {"index": ch.index, "text": prefix, "logprobs": self._echo_lp_obj(gen, ch)}
                out.append({**c, "finish_reason": "length", "stop_reason": None, **_no_ids(gen), **plp})
                continue
            c = {
                "index": ch.index,
                "text": prefix + "".join(ch.text),
                "logprobs": _joined(
                    self._echo_lp_obj(gen, ch), self._lp_obj(gen, ch.token_ids, ch.logprobs, len(prefix))
                ),
                "finish_reason": ch.finish_reason,
                "stop_reason": ch.stop_reason,
            }
            if gen.token_ids:
                c["token_ids"] = list(ch.token_ids)
            out.append({**c, **plp})
        return out

    def stream_start(self, gen: CompletionGeneration) -> Iterable[str]:
        out = []
        for ch in gen.choices:
            gen.offsets[ch.index] = 0
            gen.decoders[ch.index] = text_decoder()
            if ch.index in gen.echo_text:
                gen.offsets[ch.index] = len(gen.echo_text[ch.index])
                if gen.logprobs is not None:  # sent with the first delta, which brings the prompt logprobs
                    gen.echo_pending.add(ch.index)
                    continue
                out.append(
                    self.chunk(
                        gen,
                        [
                            {
                                "index": ch.index,
                                "text": gen.echo_text[ch.index],
                                "logprobs": None,
                                "finish_reason": None,
                                "stop_reason": None,
                            }
                        ],
                    )
                )
        return out

    def stream_delta(
        self, gen: CompletionGeneration, ch: Choice, d: EngineDelta, ids: list[int], text: str
    ) -> Iterable[str]:
        out = []
        if ch.index in gen.echo_pending:
            gen.echo_pending.discard(ch.index)
            echo = {"index": ch.index, "text": gen.echo_text[ch.index], "logprobs": self._echo_lp_obj(gen, ch)}
            out.append(self.chunk(gen, [{**echo, "finish_reason": None, "stop_reason": None}]))
        if gen.score_only:
            if ch.finished:
                c = {"index": ch.index, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None}
                out.append(self.chunk(gen, [{**c, **_no_ids(gen)}]))
            return out
        lps = list(getattr(d, "logprobs", None) or [])
        if not text and not ch.finished and (not ids or self.server.tokenizer is not None):
            # no text yet (held back by stop-string matching, or part of a UTF-8 character): no empty chunk;
            # the ids and logprobs go with the next chunk (without a tokenizer text is always empty: ids go now)
            if ids:
                held_ids, held_lps = gen.held.setdefault(ch.index, ([], []))
                held_ids.extend(ids)
                held_lps.extend(lps)
            return out
        if ch.index in gen.held:
            held_ids, held_lps = gen.held.pop(ch.index)
            ids, lps = held_ids + list(ids), held_lps + lps
        c = {
            "index": ch.index,
            "text": text,
            "logprobs": self._lp_obj(gen, ids, lps, gen.offsets[ch.index], gen.decoders[ch.index]) if ids else None,
            "finish_reason": ch.finish_reason if ch.finished else None,
            "stop_reason": ch.stop_reason if ch.finished else None,  # on every chunk, as vLLM
        }
        if gen.token_ids:
            c["token_ids"] = list(ids)
        gen.offsets[ch.index] += len(text)
        return [*out, self.chunk(gen, [c])]


def prompt_count(prompt: Any) -> int:
    """Number of prompts in a completions `prompt` (a string or one token-id list is one)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt)):
        return 1
    return len(prompt)


async def completion_prompts(srv: OpenAIServer, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """[(prompt text or None, token ids)] for each prompt of a completions request.

    Strings are tokenized as the offline `LLM.generate` does (tokenizer defaults); token-id prompts are
    taken as given and checked against the vocabulary.

    Raises:
        OpenAIError(400) naming `prompt` (empty prompt, token id outside [0, vocab_size)).
    """
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("'prompt' must not be empty", param="prompt")
    out: list[Any] = []
    vocab = srv.vocab_size
    texts: list[tuple[int, str, str]] = []  # (position, text, param name), tokenized together below
    for i, it in enumerate(items):
        name = "prompt" if len(items) == 1 else f"prompt.{i}"
        if isinstance(it, str):
            if not it:
                raise bad_request(f"'{name}' must not be empty", param=name)
            texts.append((i, it, name))
            out.append(None)
        else:
            if not it:
                raise bad_request(f"'{name}' must not be empty", param=name)
            bad = None
            if min(it) < 0 or max(it) >= vocab:  # C-speed scan first: token-id prompts can be long
                bad = next((t for t in it if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(
                    f"'{name}' holds token id {bad}, outside [0, {vocab})", param=name, code="invalid_value"
                )
            out.append((None, list(it)))
    if texts:
        ids = await srv.tokenize_many([t for _, t, _ in texts], [n for _, _, n in texts])
        for (i, t, _), tids in zip(texts, ids, strict=True):
            out[i] = (t, tids)
    return out


def _joined(first: dict | None, second: dict | None) -> dict | None:
    """Two completions logprobs objects as one (lists concatenated); either may be None."""
    if first is None or second is None:
        return first or second
    return {k: first[k] + second[k] for k in first}


def _no_ids(gen: CompletionGeneration) -> dict:
    """The empty `token_ids` of a prompt-scoring choice, when the request returns token ids."""
    return {"token_ids": []} if gen.token_ids else {}
