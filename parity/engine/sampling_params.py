"""`SamplingParams`: how one request turns logits into tokens, and when it stops.

Field names, defaults and meanings follow vLLM's `SamplingParams` (the convention OpenAI-compatible
servers and their users already know, https://docs.vllm.ai/en/latest/api/vllm/sampling_params.html):
`top_k` of -1 or 0 means "off", `temperature` 0 means greedy, penalties follow the OpenAI API
(presence/frequency, additive, on generated tokens) and the CTRL paper (repetition, multiplicative,
on prompt and generated tokens; Keskar et al. 2019, arXiv:1909.05858 §4.1).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from parity.errors import RequestError
from parity.seeds import SEED_MAX, SEED_MIN

#: Sampling with a temperature below this is treated as greedy (vLLM's `_SAMPLING_EPS`, 1e-5).
SAMPLING_EPS = 1e-5
#: Upper bound of top-N logprobs a request may ask for (vLLM's default `max_logprobs` is 20).
MAX_LOGPROBS = 20
#: `seed` range (SEED_MIN, SEED_MAX, defined in parity.seeds): with n > 1, choice i uses seed + i, so
#: seed + n - 1 must fit too.
#: Largest finite float32 (IEEE 754 binary32): the sampler computes in float32, so every float field must fit.
FLOAT32_MAX = 3.4028234663852886e38
#: `top_k` upper bound: a signed 32-bit integer; any value >= the vocabulary size means "keep every token",
#: so the bound only keeps the sampler's integer tensors in range.
TOP_K_MAX = 2**31 - 1
#: `repetition_penalty` range [1e-4, 1e4]: CTRL's recommended value is 1.2 (arXiv:1909.05858 §4.1); outside
#: this range a logit of magnitude 1e35 (float32's) would overflow, and the penalty is meaningless anyway.
REPETITION_PENALTY_MIN = 1e-4
REPETITION_PENALTY_MAX = 1e4
#: `n` upper bound per request in the engine (the OpenAI server caps `n` lower, see parity.server.protocol).
MAX_N = 1024


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite number that float32 can hold (the sampler's dtype)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    Attributes:
        n: completions per prompt, in [1, MAX_N] (each an independent sequence; seeded ones use seed + index).
        max_tokens: most tokens to generate (>= 1); None means up to max_model_len.
        min_tokens: EOS, stop_token_ids and stop strings are ignored until this many tokens exist.
        temperature: >= 0 and finite in float32; 0 means greedy (argmax).
        top_p: nucleus mass in (0, 1]. top_k: -1 or 0 = off, else in [1, TOP_K_MAX]. min_p: [0, 1].
        presence_penalty, frequency_penalty: in [-2, 2] (OpenAI API range), subtracted from logits of
            generated tokens (once / per occurrence).
        repetition_penalty: in [1e-4, 1e4]; logits of tokens seen in prompt or output are divided by it when
            positive and multiplied when negative (CTRL).
        seed: per-request seed: the same seed gives the same tokens. None = engine generator.
        stop: strings that end generation; the matched stop string is excluded from the text unless
            `include_stop_str_in_output` (vLLM's field of that name).
        stop_token_ids: token ids that end generation (besides EOS unless ignore_eos).
        ignore_eos: keep generating after EOS.
        logprobs: None, or the number N of top log-probabilities to return per generated token
            (the sampled token's log-probability is always included).
        prompt_logprobs: None, or the number N of top log-probabilities to return for each prompt token
            after the first (its log-probability given the tokens before it; vLLM's field). Such a
            request bypasses prefix-cache hits (every prompt position is computed).
        skip_special_tokens: drop special tokens from the detokenized text.
        reasoning_end_token_id: the output starts inside a reasoning block that this token closes
            (DeepSeek-V4's ``</think>``); stop strings then match only the text after it.
        strict_thinking: with `reasoning_end_token_id`, the EOS ids cannot be sampled until the reasoning
            block closes (SGLang's ``--enable-strict-thinking``); off with `ignore_eos`.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    reasoning_end_token_id: int | None = None
    strict_thinking: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        """Raises `RequestError` (a ValueError, as vLLM's constructor raises) for a field that is wrong on its
        own (`validate` without the model's context); limits that need the model are checked at submission."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature < 1e-5)."""
        return _is_num(self.temperature) and self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def max_stop_len(self) -> int:
        """Length in characters of the longest stop string (0 without stop strings)."""
        return max((len(s) for s in self.stop or ()), default=0)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ validation
    def validate(
        self, vocab_size: int | None = None, max_model_len: int | None = None, prompt_len: int | None = None
    ) -> None:
        """Check every field.

        Args:
            vocab_size: model vocabulary; stop_token_ids must lie in [0, vocab_size).
            max_model_len: context limit in tokens; with `prompt_len`, max_tokens must fit after the prompt.
            prompt_len: number of prompt tokens, if known.
        Raises:
            RequestError: naming the parameter and the expected value.
        """

        def bad(name: str, expected: str, got) -> RequestError:
            return RequestError(f"sampling parameter {name!r} {expected}, got {got!r}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}]", self.n)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a number in [0, {FLOAT32_MAX:.4g}]", self.temperature)
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)) or self.top_k > TOP_K_MAX:
            raise bad("top_k", f"must be -1 or 0 (off) or an integer in [1, {TOP_K_MAX}]", self.top_k)
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise bad(name, "must be in [-2, 2]", v)
        if (
            not _is_num(self.repetition_penalty)
            or not REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX
        ):
            raise bad(
                "repetition_penalty",
                f"must be a number in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}]",
                self.repetition_penalty,
            )
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None", self.seed)
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
            raise bad(
                "seed",
                f"must be None or an integer in [{SEED_MIN}, {SEED_MAX - (self.n - 1)}] "
                "(a signed 64-bit integer; completion i uses seed + i)",
                self.seed,
            )
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise bad("stop", "must be a list of strings", self.stop)
            if any(s == "" for s in self.stop):
                raise bad("stop", "must not contain empty strings", self.stop)
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be a boolean", self.include_stop_str_in_output)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) for t in self.stop_token_ids):
                raise bad("stop_token_ids", "must be a list of integers", self.stop_token_ids)
            for t in self.stop_token_ids:
                if t < 0 or t > SEED_MAX or (vocab_size is not None and t >= vocab_size):
                    raise bad(
                        "stop_token_ids",
                        f"must contain token ids in [0, {vocab_size}) (unknown token id {t})",
                        self.stop_token_ids,
                    )
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a boolean", self.ignore_eos)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        pl = self.prompt_logprobs
        if pl is not None and (not _is_int(pl) or not 0 <= pl <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]", pl)
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be a boolean", self.skip_special_tokens)
        rid = self.reasoning_end_token_id
        if rid is not None and (not _is_int(rid) or rid < 0 or (vocab_size is not None and rid >= vocab_size)):
            raise bad("reasoning_end_token_id", f"must be None or a token id in [0, {vocab_size})", rid)
        if not isinstance(self.strict_thinking, bool):
            raise bad("strict_thinking", "must be a boolean", self.strict_thinking)
        if self.strict_thinking and rid is None:
            raise bad(
                "strict_thinking",
                "needs 'reasoning_end_token_id' (the token that closes the reasoning block)",
                self.strict_thinking,
            )
        if max_model_len is not None and prompt_len is not None and self.max_tokens is not None:
            if prompt_len + self.max_tokens > max_model_len:
                raise RequestError(
                    f"sampling parameter 'max_tokens' ({self.max_tokens}) plus the prompt ({prompt_len} tokens) "
                    f"exceeds max_model_len ({max_model_len}): expected max_tokens <= {max_model_len - prompt_len}"
                )
