"""`EngineArgs`: everything that configures an engine instance (names follow vLLM's EngineArgs)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from parity.errors import RequestError
from parity.weight_bytes import WEIGHT_FORMATS


@dataclass
class EngineArgs:
    """Engine configuration.

    Attributes:
        model: checkpoint directory (transformers layout), a preset name ("tiny", ...: random weights,
            seeded by `seed`), or None for the bundled default miniature.
        device: "auto" | "cpu" | "cuda" | "npu" | ... (parity.devices.resolve).
        dtype: model dtype (torch.dtype or "float32"/"bfloat16"/"float16"); None = float32 on CPU,
            bfloat16 on accelerators that support it.
        max_num_seqs: most sequences in the running batch.
        max_model_len: context limit in tokens (prompt + output); None = the config's
            max_position_embeddings.
        max_num_batched_tokens: token budget per step (prefill chunks + decode tokens).
        cache_memory: cache pool size in bytes; None = cache_memory_fraction x free device memory.
        cache_memory_fraction: share of the free device memory (parity.devices.memory_info) for the pool.
        max_waiting: most sequences (prompts x n) waiting for admission; more -> EngineQueueFull.
        kv_cache_dtype: "bf16" (exact math) | "fp8" (official FP8 e4m3 rounding) | None = model default.
        seed: seed of random weights (preset models) and of unseeded sampling.
        quantization: weight format of a checkpoint after loading (`parity.weight_bytes.WEIGHT_FORMATS`:
            fp8 / fp4 as published, w8a8 / w4a8 INT8, bf16 dequantized); None / "auto" = as published,
            W8A8 on a device without FP8 (`parity.checkpoint.official_reader.load_official`).
        enable_prefix_caching: keep the state of full prompt blocks in the pool and restore it for later
            prompts with the same prefix (vLLM's flag, on by default; models without snapshot support and
            engines without a pool ignore it).
        prefix_block_tokens: tokens per prefix-cache block; None = the least common multiple of the
            compression ratios (128 for DeepSeek-V4); must be a multiple of every ratio.
        enforce_eager: True = run the model eagerly; False = the compiled decode step (`parity.model.decode_graph`);
            None = the ``PARITY_ENFORCE_EAGER`` environment variable, else the device default
            (`parity.devices.compile_by_default`).
        quantize_lm_head: with quantization w8a8 / w4a8, the LM head in int8 too (`Int8Linear`: per output
            channel, per-token int8 activations, fp32 logits; `parity.checkpoint.conversion.quantize_lm_head`).
        warm_up_in_background: compile the decode step's batch buckets in a background thread, so the
            engine starts at once and each bucket runs compiled from when it is warm (a server's choice);
            False = compile them all before the engine starts (offline runs and benchmarks).
    """

    model: str | None = None
    device: str = "auto"
    dtype: object = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    cache_memory: int | None = None
    cache_memory_fraction: float = 0.5
    max_waiting: int = 256
    kv_cache_dtype: str | None = None
    seed: int = 0
    quantization: str | None = None
    enable_prefix_caching: bool = True
    prefix_block_tokens: int | None = None
    enforce_eager: bool | None = None
    warm_up_in_background: bool = False
    quantize_lm_head: bool = False

    @classmethod
    def from_kwargs(cls, **kw) -> EngineArgs:
        """Build from keyword arguments. Raises RequestError naming an unknown argument."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise RequestError(f"unknown engine argument {bad[0]!r}: expected one of {', '.join(sorted(names))}")
        return cls(**kw)

    def validate(self) -> None:
        """Raises RequestError naming the argument and the expected value."""

        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RequestError(f"engine argument {name!r} must be a positive integer, got {v!r}")

        pos_int("max_num_seqs")
        pos_int("max_num_batched_tokens")
        pos_int("max_waiting")
        pos_int("max_model_len", allow_none=True)
        pos_int("cache_memory", allow_none=True)
        pos_int("prefix_block_tokens", allow_none=True)
        if not isinstance(self.enable_prefix_caching, bool):
            raise RequestError(
                f"engine argument 'enable_prefix_caching' must be true or false, got {self.enable_prefix_caching!r}"
            )
        f = self.cache_memory_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise RequestError(f"engine argument 'cache_memory_fraction' must be in (0, 1], got {f!r}")
        if self.kv_cache_dtype not in (None, "bf16", "fp8", "auto"):
            raise RequestError(f"engine argument 'kv_cache_dtype' must be 'bf16' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.quantization not in (None, "auto", *WEIGHT_FORMATS):
            raise RequestError(
                f"engine argument 'quantization' must be auto or one of {', '.join(WEIGHT_FORMATS)}, "
                f"got {self.quantization!r}"
            )
        if self.quantize_lm_head not in (True, False):
            raise RequestError(
                f"engine argument 'quantize_lm_head' must be True or False, got {self.quantize_lm_head!r}"
            )
        check_lm_head_quantization(self.quantize_lm_head, self.quantization)
        if self.warm_up_in_background not in (True, False):
            raise RequestError(
                f"engine argument 'warm_up_in_background' must be True or False, got {self.warm_up_in_background!r}"
            )
        if self.enforce_eager not in (None, True, False):
            raise RequestError(
                f"engine argument 'enforce_eager' must be True, False or None, got {self.enforce_eager!r}"
            )


def check_lm_head_quantization(quantize_lm_head: bool, quantization: str | None) -> None:
    """Raises RequestError when an int8 LM head is asked for without an INT8 weight format (w8a8 / w4a8)."""
    if quantize_lm_head and quantization not in ("w8a8", "w4a8"):
        raise RequestError(
            "--quantize-lm-head (engine argument 'quantize_lm_head') needs --quantization w8a8 or w4a8, "
            f"got {quantization or 'auto'}"
        )
