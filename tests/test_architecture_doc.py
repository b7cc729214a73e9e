"""docs/architecture.md is the map of the repository: every path it names must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def named_paths(text: str) -> list[str]:
    """Backticked repository paths in `text` (tokens starting with a top-level folder of the repository)."""
    tops = ("parity/", "tests/", "benchmarks/", "docs/", "scripts/", ".ci/")
    return [token for token in re.findall(r"`([^`\s]+)`", text) if token.startswith(tops)]


def test_every_path_in_the_architecture_map_exists():
    paths = named_paths(DOC.read_text(encoding="utf-8"))
    assert len(paths) > 40, "the map names the repository's modules"
    missing = [p for p in paths if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_named_paths_finds_backticked_paths_only():
    text = "see `parity/model/attention.py`, `parity plan` and `tests/conftest.py`; not parity/x.py"
    assert named_paths(text) == ["parity/model/attention.py", "tests/conftest.py"]
