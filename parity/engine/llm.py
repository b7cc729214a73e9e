"""`LLM`: the offline API, shaped like vLLM's `vllm.LLM` (generate over a list of prompts)."""

from __future__ import annotations

from parity.engine.args import EngineArgs
from parity.engine.llm_engine import LLMEngine
from parity.engine.outputs import RequestOutput
from parity.engine.sampling_params import SamplingParams
from parity.errors import RequestError


class LLM:
    """Offline batch generation.

    Args:
        model: checkpoint dir, preset name, or None (bundled default miniature).
        device: "auto" | "cpu" | "cuda" | "npu" | ...; dtype: torch dtype or name (None = per device).
        **engine_args: any other EngineArgs field (max_num_seqs, cache_memory, ...); also `model_obj=`
            an already built model and `tokenizer=` a tokenizer object.
    Raises:
        RequestError: an unknown or invalid engine argument (named).
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype=None, **engine_args):
        model_obj = engine_args.pop("model_obj", None)
        tokenizer = engine_args.pop("tokenizer", "auto")
        args = EngineArgs.from_kwargs(model=model, device=device, dtype=dtype, **engine_args)
        self.engine = LLMEngine(args, model=model_obj, tokenizer=tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block (vLLM's ``LLM.reset_prefix_cache``); True when it is empty."""
        return self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: str | dict | list[str | dict] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[int] | list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt, all batched together; outputs in input order.

        Args:
            prompts: one prompt or a list of them. A prompt is, as in vLLM, a text (str, tokenized with the
                model's tokenizer), a text prompt dict {"prompt": str} or a tokens prompt dict
                {"prompt_token_ids": list[int]} (an optional "prompt" text there is kept for the output).
            sampling_params: one SamplingParams for all, or one per prompt (default SamplingParams()).
            prompt_token_ids: instead of prompts (vLLM's older spelling): one list of ids or a list of lists.
        Returns:
            list[RequestOutput], one per prompt, finished.
        Raises:
            RequestError: naming the bad parameter (and the prompt index), e.g. a prompt that is neither a
                str nor a prompt dict, a dict with unknown keys, or both `prompts` and `prompt_token_ids`;
                nothing is run then.
        """
        items = _prompt_items(prompts, prompt_token_ids)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(items):
                raise RequestError(
                    f"parameter 'sampling_params' has {len(sampling_params)} entries for "
                    f"{len(items)} prompts: expected one or {len(items)}"
                )
            plist = list(sampling_params)
        else:
            plist = [sampling_params or SamplingParams()] * len(items)
        eng = self.engine
        reqs = []
        try:
            for i, ((text, ids), sp) in enumerate(zip(items, plist, strict=False)):
                try:
                    reqs.append(
                        eng.add_request(
                            ids,
                            sp.clone() if isinstance(sp, SamplingParams) else sp,
                            prompt=text,
                            enforce_queue_limit=False,
                        )
                    )
                except RequestError as e:
                    raise type(e)(f"prompt {i}: {e}") from None
        except RequestError:
            for r in reqs:
                eng.abort(r.request_id)
            eng.step()  # flush the abort deltas
            raise
        while eng.has_unfinished():
            eng.step()
        eng._pending.clear()
        return [r.output() for r in reqs]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        tools: list[dict] | None = None,
        thinking: bool = False,
        reasoning_effort: str | None = None,
    ) -> list[RequestOutput]:
        """Chat completions for one conversation or a batch of them, like vLLM's `LLM.chat`.

        Each conversation is encoded with DeepSeek-V4's chat format (`parity.tokenizer.encode_chat`, BOS
        included, ending with the assistant prompt), all are generated together (`generate`), and every
        completion's text is parsed as the server does (`parity.tokenizer.parse_output`).

        Args:
            messages: one conversation (a list of OpenAI message dicts, `{"role", "content", ...}`) or a
                list of conversations.
            sampling_params: one SamplingParams for all, or one per conversation (default SamplingParams()).
            tools: OpenAI tool definitions offered to every conversation; tool calls in the output are
                parsed only when tools are given.
            thinking: thinking mode (the prompt ends with `<think>`; the output's reasoning goes to
                `reasoning_content`).
            reasoning_effort: None | "low" | "medium" | "high" | "max" ("max" changes V4's prompt).
        Returns:
            list[RequestOutput], one per conversation, in order. As in vLLM, `outputs[k].text` is the raw
            generated text; parity also sets `outputs[k].message`, the text parsed as an OpenAI assistant
            message: {"role": "assistant", "content": str, "reasoning_content": str (thinking mode only),
            "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON str}}] (only
            when calls were made)} - append it to the conversation to continue it.
        Raises:
            RequestError: no tokenizer loaded, or a `parity.tokenizer.ChatError` (a RequestError) naming
                the bad field, e.g. `messages[1].role`, or `messages[2][0].content` for the first message
                of the third conversation of a batch; bad sampling parameters as in `generate`. Nothing is
                run then.
        """
        from parity.tokenizer import ChatError, encode_chat, parse_output

        if self.tokenizer is None:
            raise RequestError("LLM.chat needs a tokenizer; this LLM has none (use generate with token ids)")
        batch = (
            isinstance(messages, (list, tuple))
            and len(messages) > 0
            and all(isinstance(m, (list, tuple)) for m in messages)
        )
        convs = list(messages) if batch else [messages]
        prompts = []
        for i, conv in enumerate(convs):
            try:
                prompts.append(encode_chat(conv, tools=tools, thinking=thinking, reasoning_effort=reasoning_effort))
            except ChatError as e:
                msg = str(e)
                if batch and msg.startswith("messages"):
                    msg = f"messages[{i}]" + msg[len("messages") :]
                raise ChatError(msg) from None
        outs = self.generate(prompts, sampling_params)
        for out in outs:
            for c in out.outputs:
                c.message = parse_output(
                    c.text, thinking=thinking, tools_enabled=bool(tools), finish_reason=c.finish_reason
                ).to_message()
        return outs


_PROMPT_KEYS = ("prompt", "prompt_token_ids")


def _prompt_items(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) per prompt from `LLM.generate`'s arguments; one of the two is None unless a
    tokens prompt dict also carries its text.

    Raises:
        RequestError: no prompts, both arguments, or a prompt of the wrong shape (named, with its index).
    """
    if prompts is None and prompt_token_ids is None:
        raise RequestError("parameter 'prompts' is missing: give prompts or prompt_token_ids")
    if prompts is not None and prompt_token_ids is not None:
        raise RequestError(
            "parameters 'prompts' and 'prompt_token_ids' were both given: expected one of them "
            "(for token ids in 'prompts', use {'prompt_token_ids': [...]})"
        )
    if prompt_token_ids is not None:
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise RequestError(
                "parameter 'prompt_token_ids' must be a list of ints or a list of lists of ints, "
                f"got {type(prompt_token_ids).__name__}"
            )
        if prompt_token_ids and not isinstance(prompt_token_ids[0], (list, tuple)):
            prompt_token_ids = [prompt_token_ids]
        return [(None, p) for p in prompt_token_ids]  # ids are checked by LLMEngine.add_request
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise RequestError(
            "parameter 'prompts' must be a str, a prompt dict ({'prompt': str} or "
            f"{{'prompt_token_ids': list[int]}}) or a list of them, got {type(prompts).__name__}"
        )
    items: list[tuple[str | None, list[int] | None]] = []
    for i, p in enumerate(prompts):
        where = "prompts" if len(prompts) == 1 else f"prompts[{i}]"
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, dict):
            unknown = sorted(str(k) for k in p if k not in _PROMPT_KEYS)
            if unknown:
                raise RequestError(
                    f"parameter {where!r} has unsupported keys {unknown}: expected "
                    "{'prompt': str} or {'prompt_token_ids': list[int]}"
                )
            text = p.get("prompt")
            if text is not None and not isinstance(text, str):
                raise RequestError(f"parameter '{where}[\"prompt\"]' must be a string, got {type(text).__name__}")
            ids = p.get("prompt_token_ids")
            if ids is None and text is None:
                raise RequestError(
                    f"parameter {where!r} is an empty prompt dict: expected "
                    "{'prompt': str} or {'prompt_token_ids': list[int]}"
                )
            if ids is not None and not isinstance(ids, (list, tuple)):
                raise RequestError(
                    f"parameter '{where}[\"prompt_token_ids\"]' must be a list of ints, got {type(ids).__name__}"
                )
            items.append((text, None if ids is None else list(ids)))
        else:
            raise RequestError(
                f"parameter {where!r} must be a str or a prompt dict ({{'prompt': str}} or "
                f"{{'prompt_token_ids': list[int]}}), got {type(p).__name__}"
            )
    return items
