"""The house rules of the package layout (README: Layout), checked on the source: no import
cycles, module- or function-level; few modules at the top; no file over 500 lines; the attention
backends' names switched on nowhere but in their own objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jinfer", "pallas_kernels")
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 8


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its
    __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions included), but its
    own ancestors (a submodule may read its package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def test_no_module_imports_itself_around_a_loop():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_top_level_keeps_only_the_public_faces():
    top = sorted(p.name for p in (ROOT / "jinfer").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("folder", [*PACKAGES, "scripts", "tests"])
def test_no_source_file_is_over_500_lines(folder):
    long = {
        str(f.relative_to(ROOT)): n
        for f in (ROOT / folder).rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_only_the_attention_backends_compare_against_their_names():
    """A backend's rules live on its object (attention/backend.py); code elsewhere asks it, and
    never branches on `attention_backend == "xla"`."""
    names = {"xla", "pallas"}
    found = []
    for name, path in _modules().items():
        if name.startswith("jinfer.attention."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(c.value in names for c in consts):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
