"""The default miniature checkpoint: the `tiny` preset exported once into parity's cache, no network."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from parity.checkpoint import writer
from parity.checkpoint.layout import INDEX_FILE
from parity.errors import CheckpointError

#: Bumped when the exporter's output changes, so a stale cached miniature is not reused.
EXPORT_VERSION = 1


def cache_dir() -> Path:
    """parity's cache directory: ``$PARITY_CACHE_DIR`` or ``~/.cache/parity``."""
    env = os.environ.get("PARITY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parity"


def ensure_default_model(seed: int = 0) -> Path:
    """The default miniature checkpoint (``<cache>/models/tiny-seed<seed>-v<EXPORT_VERSION>``), exported
    on first use (`parity.checkpoint.writer.export_tiny`; a few seconds, no network).

    Safe against concurrent first use: each process exports into its own temporary directory in the
    same parent and renames it into place; a process that loses the race discards its copy.

    Returns:
        The checkpoint directory.
    Raises:
        CheckpointError: the cache directory is not writable.
    """
    target = cache_dir() / "models" / f"tiny-seed{int(seed)}-v{EXPORT_VERSION}"
    if (target / INDEX_FILE).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise CheckpointError(
            f"cannot create the default model under {target.parent} ({e}); set PARITY_CACHE_DIR to a writable directory"
        ) from None
    try:
        writer.export_tiny(tmp, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / INDEX_FILE).is_file():  # not a lost race: a real error
                raise CheckpointError(f"cannot move the default model into {target} ({e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
