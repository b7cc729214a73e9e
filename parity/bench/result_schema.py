"""The layout of a bench result: schema name and version, the notes every result carries, the environment."""

from __future__ import annotations

import os
import platform
import socket
import sys
from datetime import UTC, datetime

from parity import __version__
from parity.bench.tokenizer import BenchTokenizer

#: Version of the JSON result layout written by `parity bench --output` (bump on incompatible change).
RESULT_SCHEMA = "parity.bench.result"
RESULT_VERSION = 1
#: The ``schema`` field of a sweep index (``sweep.json`` of `parity bench sweep`).
SWEEP_SCHEMA = "parity.bench.sweep"

NOTES = [
    "TTFT = first token-carrying chunk - send (vLLM also counts a role-only first chunk; we do not).",
    "Tokens are counted, not chunks: a chunk carrying k tokens after a gap g adds k ITL values g/k; "
    "TPOT = (E2EL - TTFT) / (output_tokens - 1).",
    "Per-chunk token counts come from the server's streamed usage (continuous_usage_stats) when present, "
    "else from counting each chunk's text with the bench tokenizer; output_tokens from the final usage when present.",
    "E2EL = arrival of data: [DONE] (else end of stream) - send. Goodput = completed requests meeting every SLO "
    "/ duration.",
]


def environment(tokenizer: BenchTokenizer | None, meter_desc: str) -> dict:
    """Where the client ran (the server's hardware is the user's to record in the run label)."""
    import httpx

    return {
        "parity_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "httpx": httpx.__version__,
        "tokenizer": tokenizer.name if tokenizer else None,
        "energy_meter": meter_desc,
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
