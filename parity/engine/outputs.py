"""What the engine hands back: finished outputs (`RequestOutput`) and streaming deltas (`StreamDelta`).

Shapes follow vLLM's `RequestOutput` / `CompletionOutput` (vllm/outputs.py) so that code written for
vLLM's offline API reads naturally. Times are `time.monotonic()` seconds of this process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parity.engine.sampler import TokenLogprobs


@dataclass
class RequestMetrics:
    """Per-request timings (s, `time.monotonic()`) and counts.

    TTFT = first_token_time - arrival_time; E2EL = finished_time - arrival_time (vLLM bench conventions).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    #: prompt tokens restored from the prefix cache when the request was first scheduled (< num_prompt_tokens)
    num_cached_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2el_s(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One completion of a request.

    Attributes:
        index: completion index in [0, n). text: detokenized text (stop string excluded).
        token_ids: generated token ids (a stop token id / EOS that ended generation is included).
        finish_reason: "stop" | "length" | "abort" | None (still running).
        stop_reason: the stop string or stop token id that ended it (None for EOS / length).
        logprobs: one TokenLogprobs per generated token when requested, else None.
        message: set by `LLM.chat` only (else None): `text` parsed as an OpenAI assistant message
            {"role": "assistant", "content": str, "reasoning_content"?: str (thinking mode),
            "tool_calls"?: [{"id", "type": "function", "function": {"name", "arguments": JSON str}}]}.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    message: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Result of one request (all its completions).

    Attributes:
        prompt_logprobs: with SamplingParams.prompt_logprobs (vLLM's ``RequestOutput.prompt_logprobs``), one
            entry per prompt token: entry 0 None (nothing precedes it), entry i the TokenLogprobs of prompt
            token i given tokens < i (its rank and the prompt_logprobs most likely tokens); else None.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens restored from the prefix cache (vLLM's ``RequestOutput.num_cached_tokens``)."""
        return self.metrics.num_cached_tokens if self.metrics is not None else 0


@dataclass
class StreamDelta:
    """One streaming update of one completion (what `AsyncEngine.generate` yields).

    Attributes:
        request_id, index: which request / completion.
        new_token_ids: tokens generated since the previous delta of this completion.
        new_text: text released since the previous delta (UTF-8 safe; text that might be the start of a
            stop string is held back until it is known not to be one).
        finished: this completion is done; finish_reason / stop_reason as in CompletionOutput.
        request_finished: every completion of the request is done.
        logprobs: TokenLogprobs of new_token_ids (None unless requested).
        prompt_logprobs: with SamplingParams.prompt_logprobs, on the first delta only: one entry per
            prompt token (entry 0 None, entry i: token i given tokens < i); else None.
        num_prompt_tokens, num_output_tokens: counts so far (usage); num_cached_tokens: prompt tokens
            restored from the prefix cache (usage.prompt_tokens_details.cached_tokens).
        metrics: the request's RequestMetrics (shared object, updated in place).
        error: set when the engine failed this request (finish_reason "abort").
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    request_finished: bool
    logprobs: list[TokenLogprobs] | None
    num_prompt_tokens: int
    num_output_tokens: int
    metrics: RequestMetrics | None = None
    error: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    # RequestOutput-like conveniences
    @property
    def token_ids(self) -> list[int]:
        return self.new_token_ids

    @property
    def text(self) -> str:
        return self.new_text
