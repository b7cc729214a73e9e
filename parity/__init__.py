"""parity: hardware-neutral DeepSeek-V4 inference, benchmarking and performance planning."""

__version__ = "0.1.0"

__all__ = ["__version__", "LLM", "SamplingParams"]


def __getattr__(name):  # lazy: `import parity` must stay cheap (plan never imports torch)
    if name in ("LLM", "SamplingParams"):
        from parity import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
