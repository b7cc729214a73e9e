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


def test_no_issue_numbers_or_outside_files_cited():
    """Code, tests and docs name concepts, not tracker numbers, and point only inside the repository."""
    cite = re.compile(r"\bissues?\s+#?\d+|\.\./shared/|DESIGN\.md", re.IGNORECASE)
    offenders = []
    for path in ROOT.glob("**/*"):
        if path.suffix not in (".py", ".md", ".toml", ".sh") or ".venv" in path.parts or "data" in path.parts:
            continue
        if path.name == "test_architecture_doc.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if cite.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not offenders, "cite the concept instead:\n" + "\n".join(offenders)
