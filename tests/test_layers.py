"""The package's architecture, checked statically: import layers, forbidden imports, import cycles, module size.

Imports are read with `ast` from the source files (nothing is imported): module-level imports (run when the
module is imported), function-level ones (run when the function is called) and ``importlib.import_module("...")``
calls with a literal name. Layers, lowest first::

    0  parity (the package root), parity.errors, parity.config, parity.shapes, parity.seeds
    1  parity.devices, parity.tokenizer
    2  parity.model
    3  parity.checkpoint
    4  parity.engine
    5  parity.server, parity.bench, parity.plan     (front ends)
    6  parity.cli                                   (dispatches to every front end)

A module may import modules of its own layer or a lower one. On top, `FORBIDDEN` bans some imports outright
(``parity.bench`` uses no torch and no engine), and the `TORCH_FREE` modules must not load torch when imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "parity"

#: Layer rank of each area (a module belongs to the longest area name that prefixes it).
LAYERS = {
    "parity": 0,
    "parity.errors": 0,
    "parity.config": 0,
    "parity.shapes": 0,
    "parity.seeds": 0,
    "parity.data": 0,
    "parity.openai_client": 0,
    "parity.weight_bytes": 0,
    "parity.devices": 1,
    "parity.distributed": 1.5,
    "parity.distributed.config": 0,
    "parity.tokenizer": 1,
    "parity.model": 2,
    "parity.checkpoint": 3,
    "parity.engine": 4,
    "parity.server": 5,
    "parity.bench": 5,
    "parity.plan": 5,
    "parity.cli": 6,
    "parity.__main__": 6,
}

#: Imports banned outright, per area (each banned name covers its submodules).
FORBIDDEN = {
    "parity.bench": ("torch", "torch_npu", "parity.model", "parity.checkpoint", "parity.engine", "parity.server"),
    "parity.plan": ("torch", "torch_npu", "parity.model", "parity.checkpoint", "parity.engine", "parity.server"),
    "parity.shapes": ("torch", "torch_npu"),
}

#: Areas whose modules must not load torch when imported (directly or through any module-level import chain).
TORCH_FREE = (
    "parity.bench",
    "parity.plan",
    "parity.shapes",
    "parity.config",
    "parity.errors",
    "parity.tokenizer",
    "parity.devices.energy",
    "parity.openai_client",
    "parity.weight_bytes",
    "parity.seeds",
)

#: Modules exempt from the layer rule as importers, with the reason.
LAYER_EXEMPT = {
    "parity": "the package root lazily re-exports the offline API (parity.engine's LLM, SamplingParams)",
}

#: Files over MAX_MODULE_LINES that are known and being split.
KNOWN_OVERSIZE: set[str] = set()

MAX_MODULE_LINES = 500


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `source` imports `target` at `path`:`line`."""

    source: str
    target: str
    path: str
    line: int
    module_level: bool  # runs when `source` is imported (not inside a function body)
    type_only: bool  # under `if TYPE_CHECKING:` (never runs)


def _in_area(module: str, area: str) -> bool:
    return module == area or module.startswith(area + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def parse_imports(
    text: str, module: str, *, is_package: bool = False, known: set[str] = frozenset(), path: str = "<string>"
) -> list[Import]:
    """Every import in the source `text` of `module`.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module in `known`, else to ``pkg``.
    Relative imports are resolved against `module` (a package's ``__init__`` when `is_package`).
    """
    out: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def add(target: str, node: ast.AST, module_level: bool, type_only: bool) -> None:
        out.append(Import(module, target, path, node.lineno, module_level, type_only))

    def visit(node: ast.AST, module_level: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, module_level, type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node, module_level, type_only)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
        ):
            add(node.args[0].value, node, module_level, type_only)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, module_level, True)
            for child in node.orelse:
                visit(child, module_level, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, module_level, type_only)

    visit(ast.parse(text), True, False)
    return out


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Module name -> file for every .py file under `root` (a package's name maps to its ``__init__.py``)."""
    mods = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def package_imports(root: Path = PACKAGE_DIR) -> list[Import]:
    mods = package_modules(root)
    known = set(mods)
    out = []
    for name, p in mods.items():
        out += parse_imports(
            p.read_text(), name, is_package=p.name == "__init__.py", known=known, path=str(p.relative_to(root.parent))
        )
    return out


def layer_of(module: str) -> str | None:
    """The area `module` belongs to (longest matching key of LAYERS), None when it has none."""
    areas = [a for a in LAYERS if (module == a if a == "parity" else _in_area(module, a))]
    return max(areas, key=len) if areas else None


def layer_violations(imports: list[Import]) -> list[str]:
    """One line per import that breaks FORBIDDEN or goes up a layer (or whose module has no layer)."""
    bad = []
    for imp in imports:
        where = f"{imp.source} ({imp.path}:{imp.line}) imports {imp.target}"
        for area, banned in FORBIDDEN.items():
            hit = next((b for b in banned if _in_area(imp.target, b)), None)
            if _in_area(imp.source, area) and hit:
                bad.append(f"{where}: {area} must not import {hit}")
        if not _in_area(imp.target, "parity") or imp.source in LAYER_EXEMPT:
            continue
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is None or dst is None:
            missing = imp.source if src is None else imp.target
            bad.append(f"{where}: {missing} belongs to no layer; give its area a rank in LAYERS")
        elif LAYERS[dst] > LAYERS[src]:
            bad.append(f"{where}: layer {LAYERS[src]} ({src}) must not import layer {LAYERS[dst]} ({dst})")
    return bad


def torch_loaders(imports: list[Import], areas=TORCH_FREE) -> list[str]:
    """One line per module of `areas` that imports torch, directly anywhere or through module-level imports."""
    runtime = nx.DiGraph()
    bad = []
    for imp in imports:
        if imp.module_level and not imp.type_only:
            runtime.add_edge(imp.source, imp.target)
        if any(_in_area(imp.source, a) for a in areas) and _in_area(imp.target, "torch"):
            bad.append(f"{imp.source} ({imp.path}:{imp.line}) imports torch")
    for mod in sorted(n for n in runtime if any(_in_area(n, a) for a in areas)):
        reached = nx.descendants(runtime, mod)
        torch_mods = sorted(t for t in reached if _in_area(t, "torch"))
        if torch_mods and not any(_in_area(t, "torch") for t in runtime.successors(mod)):
            chain = nx.shortest_path(runtime, mod, torch_mods[0])
            bad.append(f"{mod} loads torch when imported: {' -> '.join(chain)}")
    return bad


def import_cycles(imports: list[Import], *, module_level_only: bool) -> list[set[str]]:
    """Strongly connected components of more than one parity module in the import graph.

    With `module_level_only` False, function-level (lazy) imports count too, except those of a package's
    ``__init__`` into its own submodules (a lazy facade re-exporting them).
    """
    g = nx.DiGraph()
    for imp in imports:
        if imp.type_only or not _in_area(imp.target, "parity") or imp.source == imp.target:
            continue
        if module_level_only and not imp.module_level:
            continue
        if not imp.module_level and imp.target.startswith(imp.source + "."):
            continue
        g.add_edge(imp.source, imp.target)
    return sorted((c for c in nx.strongly_connected_components(g) if len(c) > 1), key=sorted)


def _cycle_text(c: set[str], imports: list[Import]) -> str:
    edges = sorted(
        {
            f"{i.source} -> {i.target} ({i.path}:{i.line}{'' if i.module_level else ', lazy'})"
            for i in imports
            if i.source in c and i.target in c and not i.type_only
        }
    )
    return "import cycle among " + ", ".join(sorted(c)) + ":\n    " + "\n    ".join(edges)


# ------------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return package_imports()


def test_no_import_goes_up_a_layer_or_is_forbidden(imports):
    if bad := layer_violations(imports):
        pytest.fail("forbidden imports:\n  " + "\n  ".join(bad), pytrace=False)


def test_torch_free_modules_do_not_load_torch(imports):
    if bad := torch_loaders(imports):
        pytest.fail("torch-free modules loading torch:\n  " + "\n  ".join(bad), pytrace=False)


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "with-lazy-imports"])
def test_no_import_cycles(imports, module_level_only):
    if cycles := import_cycles(imports, module_level_only=module_level_only):
        pytest.fail("\n".join(_cycle_text(c, imports) for c in cycles), pytrace=False)


def test_no_module_over_the_size_limit():
    root = PACKAGE_DIR.parent
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in PACKAGE_DIR.rglob("*.py")}
    over = {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES and p not in KNOWN_OVERSIZE}
    assert not over, "\n".join(
        f"{p} has {n} lines (max {MAX_MODULE_LINES}): split it by concept" for p, n in sorted(over.items())
    )
    stale = sorted(p for p in KNOWN_OVERSIZE if sizes.get(p, 0) <= MAX_MODULE_LINES)
    assert not stale, f"within the limit or gone, remove from KNOWN_OVERSIZE: {stale}"


def test_every_area_has_a_layer():
    orphans = sorted(m for m in package_modules() if layer_of(m) is None)
    assert not orphans, f"modules in no layer (give their area a rank in LAYERS): {orphans}"


# ----------------------------------------------------------------------------------- the checker itself
KNOWN = {
    "parity.engine",
    "parity.engine.llm",
    "parity.bench",
    "parity.bench.runner",
    "parity.tokenizer",
    "parity.tokenizer.special",
    "parity.model",
    "parity.model.layers",
}


def _check(text: str, module: str) -> list[str]:
    return layer_violations(parse_imports(text, module, known=KNOWN, path=f"{module.replace('.', '/')}.py"))


def test_checker_catches_a_forbidden_import_at_any_level():
    assert _check("import json\nfrom parity.tokenizer import special\n", "parity.bench.fake") == []
    (msg,) = _check("import json\n\ndef f():\n    from parity.engine.llm import LLM\n", "parity.bench.fake")
    assert msg == (
        "parity.bench.fake (parity/bench/fake.py:4) imports parity.engine.llm: "
        "parity.bench must not import parity.engine"
    )
    (msg,) = _check("class A:\n    def f(self):\n        import torch.nn\n", "parity.plan.fake")
    assert "parity.plan.fake (parity/plan/fake.py:3) imports torch.nn: parity.plan must not import torch" == msg
    (msg,) = _check("import importlib\nm = importlib.import_module('torch')\n", "parity.shapes")
    assert "parity.shapes must not import torch" in msg


def test_checker_catches_an_import_up_a_layer():
    (msg,) = _check("from parity.engine import llm\n", "parity.model.fake")
    assert msg.startswith(
        "parity.model.fake (parity/model/fake.py:1) imports parity.engine.llm: layer 2 "
        "(parity.model) must not import layer 4 (parity.engine)"
    )
    assert _check("from parity.model import layers\n", "parity.engine.fake") == []
    assert (
        "parity.checkpoint.fake"
        in _check("from . import x\n\ndef f():\n    from parity.server import app\n", "parity.checkpoint.fake")[0]
    )
    assert "parity.newarea belongs to no layer" in _check("import parity.newarea\n", "parity.model.fake")[0]
    # type-only imports are still imports of that layer
    assert _check(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from parity.engine import llm\n", "parity.model.fake"
    )


def test_checker_resolves_relative_imports():
    (imp,) = parse_imports("from ..engine import llm\n", "parity.bench.fake", known=KNOWN)
    assert imp.target == "parity.engine.llm" and imp.module_level
    (imp,) = parse_imports("from . import runner\n", "parity.bench", is_package=True, known=KNOWN)
    assert imp.target == "parity.bench.runner"


def test_checker_finds_cycles_and_torch_chains():
    a = parse_imports("from parity.y import f\n", "parity.x")
    b = parse_imports("def g():\n    from parity.x import h\n", "parity.y")
    assert import_cycles(a + b, module_level_only=True) == []
    assert import_cycles(a + b, module_level_only=False) == [{"parity.x", "parity.y"}]
    lazy_facade = parse_imports(
        "def __getattr__(n):\n    from parity.x import core\n", "parity.x", is_package=True, known={"parity.x.core"}
    )
    core = parse_imports("from parity.x import CONST\n", "parity.x.core", known={"parity.x.core"})
    assert import_cycles(lazy_facade + core, module_level_only=False) == []
    chain = parse_imports("import parity.model.layers\n", "parity.bench.fake") + parse_imports(
        "import torch\n", "parity.model.layers"
    )
    assert torch_loaders(chain) == [
        "parity.bench.fake loads torch when imported: parity.bench.fake -> parity.model.layers -> torch"
    ]
