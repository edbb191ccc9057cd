"""The import rules of DESIGN.md, checked on the source: imports only ever point down the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"kernels": "plait.kernels", "server": "plait.server", "trainer": "plait.trainer", "cli": "plait.cli"}
LEAVES = ("plait.server.errors", "plait.server.metrics")  # import nothing of plait; any server layer may use them

# Module (or package) -> the plait modules it may import: a name allows itself and its submodules,
# except for "plait.server.engine", which allows only the package's exported names.
ALLOWED: dict[str, tuple[str, ...]] = {
    "plait.kernels": ("plait.kernels",),
    "plait.server": (),
    "plait.server.errors": (),
    "plait.server.metrics": (),
    "plait.server.base_model": (),
    "plait.server.fine_tuning.contract": (),
    "plait.server.engine": ("plait.kernels", "plait.server.engine.", *LEAVES),
    "plait.server.storage": ("plait.server.storage", *LEAVES),
    "plait.server.adapters": ("plait.kernels", "plait.server.adapters", "plait.server.storage", *LEAVES),
    "plait.server.fine_tuning": ("plait.server.fine_tuning", "plait.server.storage", *LEAVES),
    "plait.server.api": (
        "plait.server.api",
        "=plait.server.engine",
        "plait.server.adapters",
        "plait.server.fine_tuning",
        *LEAVES,
    ),
    "plait.server.serve": ("plait.server",),
    "plait.trainer": (
        "plait.kernels",
        "plait.trainer",
        "plait.server.base_model",
        "plait.server.adapters.format",
        "plait.server.fine_tuning.contract",
    ),
    "plait.cli": ("plait",),
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.append((name, path))
    return found


def _plait_imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            imported.add(module)
    return {m for m in imported if m == "plait" or m.startswith("plait.")}


def _rule(name: str) -> tuple[str, tuple[str, ...]]:
    owner = max((key for key in ALLOWED if name == key or name.startswith(key + ".")), key=len)
    return owner, ALLOWED[owner]


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        if entry.startswith("="):
            if module == entry[1:]:
                return True
        elif entry.endswith("."):
            if module.startswith(entry):
                return True
        elif module == entry or module.startswith(entry + "."):
            return True
    return False


@pytest.mark.parametrize(("name", "path"), _modules(), ids=[name for name, _ in _modules()])
def test_imports_point_down_the_layers(name, path):
    owner, allowed = _rule(name)
    wrong = sorted(m for m in _plait_imports(name, path) if not _allowed(m, allowed) and m != name)
    assert not wrong, f"{name} ({owner}'s rules) imports {wrong}"


def test_the_rules_catch_a_layer_reaching_around_another():
    assert not _allowed("plait.server.engine.engine", ALLOWED["plait.server.api"])
    assert _allowed("plait.server.engine", ALLOWED["plait.server.api"])
    assert not _allowed("plait.server.adapters.merge", ALLOWED["plait.server.engine"])
    assert not _allowed("plait.trainer.data", ALLOWED["plait.server.serve"])
    assert not _allowed("plait.server.errors", ALLOWED["plait.server.fine_tuning.contract"])
    assert _rule("plait.server.fine_tuning.contract")[0] == "plait.server.fine_tuning.contract"
