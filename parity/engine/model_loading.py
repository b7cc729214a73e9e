"""Loading the model and tokenizer an engine serves: a checkpoint directory, a preset or the bundled default."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from parity import devices
from parity.checkpoint import conversion
from parity.checkpoint.default_model import ensure_default_model
from parity.checkpoint.reader import from_pretrained
from parity.config import load_config
from parity.devices.huge_pages import place_on_huge_pages
from parity.engine.args import check_lm_head_quantization
from parity.errors import RequestError
from parity.model.build import DTYPES, build_model
from parity.model.weight_storage import describe_storage

log = logging.getLogger("parity.engine")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Model dtype: explicit (torch.dtype or name), else float32 on CPU and bfloat16 where supported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.bfloat16 in devices.supported_dtypes(device) else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise RequestError(f"engine argument 'dtype' is {dtype!r}: expected one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def _log_storage(model, source) -> None:
    log.info(
        "weights of %s: %s (format %s, compute dtype %s)",
        source,
        describe_storage(model),
        getattr(model, "weight_format", "bf16"),
        str(model.dtype).removeprefix("torch."),
    )


def load_model(
    model: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    quantization: str | None = None,
    parallel=None,
    quantize_lm_head: bool = False,
):
    """(model, checkpoint dir or None) for EngineArgs.model (directory, preset name or None = default);
    `quantization` reaches `from_pretrained` (checkpoints only: a preset is built in `dtype`; on the CPU a
    checkpoint's FP8/FP4/bf16 matrices are held in bf16 by default, `parity.model.weight_storage`);
    ``parallel``: a `parity.distributed.context.ParallelContext` to load this rank's part only;
    ``quantize_lm_head``: then the head in int8 (`parity.checkpoint.conversion.quantize_lm_head`; needs
    quantization w8a8 / w4a8). Logs the bytes held per stored dtype. On the CPU the weights then move onto
    transparent huge pages (`parity.devices.huge_pages.place_on_huge_pages`: decode streams them faster;
    ``PARITY_HUGE_PAGES=0`` leaves them).

    Raises:
        RequestError: a quantization other than auto / bf16 for a preset model; ``quantize_lm_head`` without
            w8a8 / w4a8.
    """
    check_lm_head_quantization(quantize_lm_head, quantization)
    kw = {} if parallel is None else {"parallel": parallel}
    if model is None or Path(str(model)).expanduser().is_dir():
        p = ensure_default_model() if model is None else Path(str(model)).expanduser()
        m = from_pretrained(p, device=device, dtype=dtype, quantization=quantization, **kw)
        if quantize_lm_head:
            conversion.quantize_lm_head(m)
        _log_storage(m, p)
        return _placed(m, device), p
    check_preset_quantization(model, quantization)
    return _placed(build_model(load_config(str(model)), device=device, dtype=dtype, seed=seed, **kw), device), None


def _placed(model, device: torch.device):
    if torch.device(device).type == "cpu":
        place_on_huge_pages(model)  # after every conversion: a weight replaced later would leave its pages held
    return model


def check_preset_quantization(model, quantization: str | None) -> None:
    """Raises RequestError when ``quantization`` needs a checkpoint but ``model`` names a preset (built with
    random float weights), naming the way to the bundled checkpoint."""
    if quantization not in (None, "auto", "bf16"):
        raise RequestError(
            f"engine argument 'quantization' {quantization!r} needs a checkpoint directory; preset {model!r} is "
            "built with random float weights (give no model for the bundled default miniature, a checkpoint in "
            "the published FP8/FP4 layout, or a directory written by `parity export-tiny`)"
        )


def load_tokenizer_for(model_dir: Path | None):
    """parity.tokenizer's tokenizer for a checkpoint (or the bundled V4 vocabulary); None if unavailable."""
    try:
        from parity.tokenizer import load_tokenizer  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return load_tokenizer(model_dir)
    except Exception as e:  # tokenizer trouble must not stop token-id generation
        log.warning("no tokenizer available (%s); text prompts and stop strings are disabled", e)
        return None
