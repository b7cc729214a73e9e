"""`POST /v1/chat/completions`: `ServingChat` and the OpenAI message / tool / delta shapes it converts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from parity.errors import ParityError
from parity.server import protocol as P
from parity.server import request_options as R
from parity.server.choices import Choice
from parity.server.engine_client import EngineDelta
from parity.server.errors import bad_request, param_from_message
from parity.server.logprobs import chat_logprobs, prompt_logprobs
from parity.server.serving_base import Generation, OpenAIServing


@dataclass
class ChatGeneration(Generation):
    """A chat Generation: thinking/tool parsing choices, `top_n` logprobs (None: no logprobs), and the
    per-choice streaming state (parsers, tool-call ids seen, logprobs not yet sent)."""

    thinking: bool = False
    tools_enabled: bool = False
    top_n: int | None = None
    prompt_logprobs: int | None = None  # vLLM's `prompt_logprobs`: top-N per prompt token, on the response
    as_ids: bool = False
    think_end_id: int | None = None
    dsml_id: int | None = None
    tool_params: dict[str, list[str]] | None = None
    parsers: dict[int, Any] = field(default_factory=dict)
    seen_calls: dict[int, dict[int, str]] = field(default_factory=dict)
    pending_lp: dict[int, list[dict]] = field(default_factory=dict)

    def usage(self) -> dict:
        """`usage` with `completion_tokens_details.reasoning_tokens`: per choice, the tokens before the
        ``</think>`` that closes the reasoning block (the tag not counted); a choice that never closed it
        counts all its tokens when cut (`length`, `abort`) and, when it stopped (its text is the answer),
        the tokens before a tool-call block it opened, else none. 0 when the output starts outside a
        reasoning block (thinking off)."""
        out = super().usage()
        out["completion_tokens_details"] = {"reasoning_tokens": sum(self._reasoning_tokens(c) for c in self.choices)}
        return out

    def _reasoning_tokens(self, ch: Choice) -> int:
        if not self.thinking or self.think_end_id is None:
            return 0
        ids = ch.token_ids
        if self.think_end_id in ids:
            return ids.index(self.think_end_id)
        if ch.finish_reason != "stop":
            return len(ids)
        return ids.index(self.dsml_id) if self.dsml_id is not None and self.dsml_id in ids else 0


class ServingChat(OpenAIServing):
    """Chat completions: messages encoded with the chat format, output parsed into content, reasoning
    (`reasoning_content`) and tool calls; streams deltas as the parser releases them."""

    endpoint = "chat"
    request_cls = P.ChatCompletionRequest
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    async def prepare(self, req: P.ChatCompletionRequest, arrival_s: float) -> ChatGeneration:
        srv = self.server
        model = self.check_common(req)
        srv.check_num_seqs(1, req.n)
        thinking = R.thinking_enabled(req, srv.settings.default_thinking)
        tools, tools_enabled = chat_tools(req)
        if req.top_logprobs is not None:
            R.check_logprobs("top_logprobs", req.top_logprobs)
            if not req.logprobs:
                raise bad_request("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        messages = [message_dict(m, i) for i, m in enumerate(req.messages)]
        fmt = srv.chat_format
        template_kw = {}
        if not req.add_generation_prompt or req.continue_final_message:
            template_kw = {
                "add_generation_prompt": req.add_generation_prompt,
                "continue_final_message": req.continue_final_message,
            }
        try:
            prompt = fmt.encode(
                messages, tools if tools_enabled else None, thinking, req.reasoning_effort, **template_kw
            )
        except (ParityError, ValueError, TypeError, KeyError) as e:
            msg = str(e)
            raise bad_request(
                msg,
                param=getattr(e, "param", None)
                or param_from_message(msg, ("reasoning_effort", "continue_final_message")),
                code="invalid_value",
            ) from None
        # the output starts inside a reasoning block when the prompt leaves one open
        opens = getattr(fmt, "opens_reasoning", None)
        thinking = bool(opens(prompt)) if opens is not None else thinking
        prompt_ids = R.truncate_prompt(
            await srv.tokenize(prompt, "messages"), req.truncate_prompt_tokens, srv.max_model_len
        )
        if req.max_completion_tokens is not None:
            mt, mt_name = req.max_completion_tokens, "max_completion_tokens"
        else:
            mt, mt_name = req.max_tokens, "max_tokens"
        max_tokens = srv.resolve_max_tokens(mt, len(prompt_ids), mt_name, "messages")
        kw = R.sampling_kwargs(req, max_tokens=max_tokens, logprobs=top_n, vocab_size=srv.vocab_size)
        think_end_id = _token_id(srv.tokenizer, "think_end_id")
        if thinking and think_end_id is not None:
            kw["reasoning_end_token_id"] = think_end_id  # stop strings apply to the answer only
            if srv.settings.strict_thinking and not req.ignore_eos:
                kw["strict_thinking"] = True
        params = srv.per_choice_params(kw, req.n)
        rid, engine_rid = self.response_id("chatcmpl", req)
        choices = srv.runner.new_choices(engine_rid, req.n, len(prompt_ids), arrival_s)
        jobs = [(ch, prompt_ids, sp) for ch, sp in zip(choices, params, strict=True)]
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream_options is not None and not req.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        return ChatGeneration(
            rid=rid,
            model=model,
            created=created,
            choices=choices,
            jobs=jobs,
            prompt_tokens=len(prompt_ids),
            stream=bool(req.stream),
            include_usage=include_usage,
            continuous_usage=R.continuous_usage(req),
            thinking=thinking,
            tools_enabled=tools_enabled,
            top_n=top_n,
            prompt_logprobs=req.prompt_logprobs,
            as_ids=req.return_tokens_as_token_ids,
            think_end_id=think_end_id,
            dsml_id=_token_id(srv.tokenizer, "dsml_token_id"),
            tool_params=tool_params(tools),
        )

    def full_choices(self, gen: ChatGeneration) -> list[dict]:
        srv = self.server
        out = []
        for ch in gen.choices:
            text = "".join(ch.text)
            content, reasoning, calls = srv.chat_format.parse(
                text, gen.thinking, gen.tools_enabled, finish_reason=ch.finish_reason, tool_params=gen.tool_params
            )
            finish = ch.finish_reason
            if calls and finish == "stop":
                finish = "tool_calls"
            msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = calls
            lp = (
                {"content": chat_logprobs(srv.tokenizer, ch.token_ids, ch.logprobs, gen.top_n or 0, gen.as_ids)}
                if gen.top_n is not None
                else None
            )
            out.append(
                {
                    "index": ch.index,
                    "message": msg,
                    "logprobs": lp,
                    "finish_reason": finish,
                    "stop_reason": ch.stop_reason,
                }
            )
        return out

    def response_fields(self, gen: ChatGeneration) -> dict:
        """vLLM's response-level `prompt_logprobs` (the prompt is the same for every choice), when asked."""
        if gen.prompt_logprobs is None:
            return {}
        ch, ids, _ = gen.jobs[0]
        tok = self.server.tokenizer
        return {"prompt_logprobs": prompt_logprobs(tok, ids, ch.prompt_logprobs, gen.prompt_logprobs, gen.as_ids)}

    def stream_start(self, gen: ChatGeneration) -> Iterable[str]:
        fmt = self.server.chat_format
        for ch in gen.choices:
            gen.parsers[ch.index] = fmt.stream_parser(gen.thinking, gen.tools_enabled, tool_params=gen.tool_params)
            gen.seen_calls[ch.index] = {}
            gen.pending_lp[ch.index] = []
        return [
            self.chunk(
                gen,
                [
                    {
                        "index": ch.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                        "stop_reason": None,
                    }
                ],
            )
            for ch in gen.choices
        ]

    def _take_logprobs(self, gen: ChatGeneration, c: dict, index: int) -> None:
        """Attach choice `index`'s logprobs not yet sent to chunk choice `c`."""
        if gen.pending_lp[index]:
            c["logprobs"] = {"content": gen.pending_lp[index]}
            gen.pending_lp[index] = []

    def _delta_chunks(self, gen: ChatGeneration, ch: Choice, parsed: list[dict]) -> list[str]:
        out = []
        for item in parsed:
            delta = chat_delta(item, gen.seen_calls[ch.index])
            if delta is None:
                continue
            c = {"index": ch.index, "delta": delta, "logprobs": None, "finish_reason": None, "stop_reason": None}
            self._take_logprobs(gen, c, ch.index)
            out.append(self.chunk(gen, [c]))
        return out

    def stream_delta(self, gen: ChatGeneration, ch: Choice, d: EngineDelta, ids: list[int], text: str) -> Iterable[str]:
        if gen.top_n is not None and ids:
            lps = getattr(d, "logprobs", None) or []
            gen.pending_lp[ch.index].extend(chat_logprobs(self.server.tokenizer, ids, lps, gen.top_n, gen.as_ids))
        parser = gen.parsers[ch.index]
        out = self._delta_chunks(gen, ch, parser.feed(text) if text else [])
        if ch.finished:
            out += self._delta_chunks(gen, ch, parser.finish(ch.finish_reason))
            finish = ch.finish_reason
            if gen.seen_calls[ch.index] and finish == "stop":
                finish = "tool_calls"
            c = {
                "index": ch.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": ch.stop_reason,
            }
            self._take_logprobs(gen, c, ch.index)
            out.append(self.chunk(gen, [c]))
        return out


def _token_id(tokenizer: Any, attr: str) -> int | None:
    """A named V4 token id of the tokenizer (DeepseekV4Tokenizer's `think_end_id`, `dsml_token_id`), or None."""
    tid = getattr(tokenizer, attr, None)
    return int(tid) if isinstance(tid, int) else None


def tool_params(tools: list[dict] | None) -> dict[str, list[str]] | None:
    """Declared parameter names per tool name (None without tools)."""
    if not tools:
        return None
    out = {}
    for t in tools:
        fn = t.get("function", t)
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name", "")] = list(props)
    return out


def chat_tools(req: P.ChatCompletionRequest) -> tuple[list[dict] | None, bool]:
    """(tool definitions as dicts, whether tool calls are parsed) from `tools` / `tool_choice`.

    `tool_choice` "auto" (default with tools) and "none" (tools hidden from the prompt, as vLLM does) are
    supported; "required" and a named function need constrained decoding, which parity does not have:
    400 naming `tool_choice`.
    """
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if choice is None:
        return tools, bool(tools)
    if choice == "none":
        return None, False
    if choice == "auto":
        if not tools:
            raise bad_request("'tool_choice' is set but no 'tools' are given", param="tool_choice")
        return tools, True
    if choice == "required" or isinstance(choice, dict):
        raise bad_request(
            "tool_choice 'required' or a named function is not supported by parity (it needs "
            "constrained decoding); use 'auto' or 'none'",
            param="tool_choice",
            code="unsupported_parameter",
        )
    raise bad_request(
        f"Invalid value for 'tool_choice': {choice!r}; expected 'auto' or 'none'",
        param="tool_choice",
        code="invalid_value",
    )


def message_dict(m: P.ChatMessage, index: int) -> dict[str, Any]:
    """An OpenAI message as the plain dict `encode_chat` takes; text parts are joined.

    Raises:
        OpenAIError(400): a content part that is not text, naming `messages.<i>.content.<j>.type`; a text part
            without `text`, naming `messages.<i>.content.<j>.text`; a null or
            missing content, naming `messages.<i>.content`, except in an assistant message that carries
            tool_calls (as OpenAI allows) or reasoning_content; an empty tool_calls list with no content,
            naming `messages.<i>.tool_calls`.
    """
    content = m.content
    if content is None and not (m.role == "assistant" and (m.tool_calls or m.reasoning_content is not None)):
        if m.role == "assistant" and m.tool_calls is not None:
            raise bad_request(
                f"messages[{index}].tool_calls is empty: an assistant message needs content or at least one tool call",
                param=f"messages.{index}.tool_calls",
                code="invalid_value",
            )
        needs = "content (a string or a list of text parts)"
        raise bad_request(
            f"messages[{index}].content: an assistant message needs {needs} or tool_calls"
            if m.role == "assistant"
            else f"messages[{index}].content: a {m.role} message needs {needs}; only an assistant message "
            "with tool_calls may leave it null",
            param=f"messages.{index}.content",
            code="invalid_value",
        )
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text":
                raise bad_request(
                    f"messages[{index}].content[{j}]: only 'text' content parts are supported (got type {part.type!r})",
                    param=f"messages.{index}.content.{j}.type",
                    code="unsupported_parameter",
                )
            if part.text is None:
                raise bad_request(
                    f"messages[{index}].content[{j}]: a 'text' content part needs a 'text' field (a string)",
                    param=f"messages.{index}.content.{j}.text",
                    code="missing_required_parameter",
                )
            texts.append(part.text)
        content = "".join(texts)
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for tc in m.tool_calls:
            args = tc.function.arguments
            calls.append(
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {
                        "name": tc.function.name,
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
            )
        d["tool_calls"] = calls
    return d


def chat_delta(item: dict[str, Any], seen: dict[int, str]) -> dict[str, Any] | None:
    """An OpenAI chat `delta` from one streaming-parser item; `seen` maps tool-call index -> id."""
    if "content" in item:
        return {"content": item["content"]} if item["content"] else None
    if "reasoning_content" in item:
        return {"reasoning_content": item["reasoning_content"]} if item["reasoning_content"] else None
    if "tool_call" in item:
        tc = item["tool_call"]
        idx = int(tc.get("index", 0))
        entry: dict[str, Any] = {"index": idx}
        fn: dict[str, Any] = {}
        if idx not in seen:
            seen[idx] = tc.get("id") or ("call_" + uuid.uuid4().hex[:24])
            entry["id"] = seen[idx]
            entry["type"] = "function"
            fn["name"] = tc.get("name") or ""
        args = tc.get("arguments")
        if args:
            fn["arguments"] = args if isinstance(args, str) else json.dumps(args)
        elif "name" in fn:
            fn["arguments"] = ""
        if not fn:
            return None
        entry["function"] = fn
        return {"tool_calls": [entry]}
    return None
