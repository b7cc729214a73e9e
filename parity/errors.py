"""One exception type per pillar (config, checkpoint, device, request, bench, plan, parallel).

Every message names the offending field / tensor / parameter and what was expected, so that a
user can fix the input without reading a traceback.
"""


class ParityError(Exception):
    """Base class of every error parity raises on purpose."""


class ConfigError(ParityError, ValueError):
    """A model configuration (config.json or preset) is invalid. Message names the field."""


class CheckpointError(ParityError):
    """A checkpoint directory is unreadable or does not match the config (missing/unexpected
    tensors, wrong shapes or dtypes, bad shards)."""


class DeviceError(ParityError):
    """A requested device or dtype is not available on this machine."""


class RequestError(ParityError, ValueError):
    """A generation request is invalid (prompt, sampling parameters). Message names the parameter."""


class BenchError(ParityError):
    """`parity bench` input is invalid (URL, workload, SLO syntax, dataset file)."""


class PlanError(ParityError):
    """`parity plan/compare/validate` input is invalid (unknown hardware/model, impossible SLOs)."""


class ParallelError(ParityError, ValueError):
    """A parallel layout does not fit the model or the machine (TP/DP/EP sizes), or a rank failed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most `limit` characters): a compiler error's message holds
    the whole compiler output (e.g. hundreds of warnings when a Ctrl-C killed g++), a log wants its gist."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"
