"""`ChatEncoding`: the parts of DeepSeek-V4's chat format that a checkpoint may define for itself.

DeepSeek ships the format with each checkpoint (``encoding/`` in the Hugging Face repos); later V4
checkpoints change the reasoning-effort tiers (which ``reasoning_effort`` values exist and the text each
puts after BOS). parity reads them from the checkpoint's ``chat_encoding.json`` (written by
``parity.checkpoint.writer`` for miniature checkpoints; put one next to ``config.json`` for another
variant)::

    {"source": "where the texts come from",
     "reasoning_efforts": {"low": null, "high": "text...", "max": "text..."},
     "drop_thinking": true}

``null`` means the tier adds no text. Without the file, the published V4 table applies (:func:`default_encoding`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import CheckpointError

#: Prefix for ``reasoning_effort="max"`` - the verbatim text of DeepSeek-V4 ``encoding/README.md``,
#: section "Reasoning Effort" (a prompt string of the published format, quoted as data).
REASONING_EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

#: File name of a checkpoint's chat-encoding variant (in the checkpoint directory).
ENCODING_FILE = "chat_encoding.json"


@dataclass(frozen=True)
class ChatEncoding:
    """A chat-format variant.

    Attributes:
        reasoning_efforts: accepted ``reasoning_effort`` values -> the text put right after BOS in thinking
            mode ("" for none); None (no effort given) is always accepted and adds nothing.
        drop_thinking: default of ``encode_chat(drop_thinking=...)``.
        source: where the table comes from (a file path or the published format).
    """

    reasoning_efforts: Mapping[str, str] = field(default_factory=dict)
    drop_thinking: bool = True
    source: str = ""


def default_encoding() -> ChatEncoding:
    """DeepSeek-V4's published table (``encoding/README.md``, "Reasoning Effort"): only "max" adds text."""
    return ChatEncoding(
        {"low": "", "medium": "", "high": "", "max": REASONING_EFFORT_MAX_PREFIX},
        source="DeepSeek-V4 encoding/README.md",
    )


def load_encoding(model_dir: str | os.PathLike | None) -> ChatEncoding:
    """The chat encoding of a checkpoint directory: its ``chat_encoding.json``, else :func:`default_encoding`.

    Raises:
        CheckpointError: the file exists but is not valid (one line naming the file and the field).
    """
    if model_dir is None or not Path(model_dir).is_dir():
        return default_encoding()
    path = Path(model_dir) / ENCODING_FILE
    if not path.is_file():
        return default_encoding()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    efforts = data.get("reasoning_efforts") if isinstance(data, dict) else None
    if not isinstance(efforts, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in efforts.items()
    ):
        raise CheckpointError(f"{path}: 'reasoning_efforts' must map effort names to a text or null")
    drop = data.get("drop_thinking", True)
    if not isinstance(drop, bool):
        raise CheckpointError(f"{path}: 'drop_thinking' must be true or false, got {drop!r}")
    return ChatEncoding({k: v or "" for k, v in efforts.items()}, drop, str(data.get("source") or path))


__all__ = ["ENCODING_FILE", "REASONING_EFFORT_MAX_PREFIX", "ChatEncoding", "default_encoding", "load_encoding"]
