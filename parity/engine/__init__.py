"""parity.engine: continuous-batching inference over DeepSeek-V4's compressed caches.

Public API (vLLM-shaped): `LLM`, `SamplingParams`, `AsyncEngine`, `EngineArgs`, `RequestOutput`,
`CompletionOutput`, `StreamDelta`, `EngineQueueFull`; docs/architecture.md maps the modules.
"""

from parity.engine.args import EngineArgs
from parity.engine.async_engine import AsyncEngine
from parity.engine.cache_pool import CachePool, CachePoolExhausted, SequenceCache
from parity.engine.llm import LLM
from parity.engine.llm_engine import EngineQueueFull, LLMEngine
from parity.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamDelta
from parity.engine.sampler import TokenLogprobs
from parity.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "AsyncEngine",
    "EngineArgs",
    "RequestOutput",
    "CompletionOutput",
    "StreamDelta",
    "RequestMetrics",
    "EngineQueueFull",
    "LLMEngine",
    "CachePool",
    "CachePoolExhausted",
    "SequenceCache",
    "TokenLogprobs",
]
