"""Architecture contracts, checked by parsing the sources (no module is imported).

* The engine (everything but the napari and CLI skins) imports no GUI toolkit
  and no skin.
* The npe2 contributions (``_reader``, ``_writer``, ``_sample_data``) never
  reach torch, and ``import napari_emseg`` does not either.
* No import cycle among the package's modules (module-level imports).
* No module imports another module's private names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "napari_emseg"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

GUI = ("napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6")
#: Modules (or packages, with all they hold) that are skins, not engine.
SKINS = ("_widgets", "cli", "_cli_", "_reader", "_writer", "_sample_data")
#: Skin packages the engine must not import.
SKIN_PACKAGES = ("_widgets", "cli", "_cli_")
NPE2 = ("_reader", "_writer", "_sample_data")

#: ``(importing module, imported module, name)`` allowed to cross the private
#: boundary, each with its reason.  Keep it empty where possible.
PRIVATE_ALLOWED: dict[tuple[str, str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One imported module (internal or external) of one module."""

    target: str  # absolute dotted name
    names: tuple[str, ...]  # names taken from it (``from target import names``)
    top: bool  # runs when the module is imported (not inside a function)
    typing_only: bool  # inside ``if TYPE_CHECKING:``
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


MODULES = _sources()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.imports: list[Import] = []
        self._depth = 0  # functions entered
        self._typing = 0  # ``if TYPE_CHECKING`` blocks entered

    def _add(self, target: str, names: tuple[str, ...], line: int) -> None:
        self.imports.append(Import(target, names, self._depth == 0, self._typing > 0, line))

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        typing = test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        self._typing += typing
        for child in node.body:
            self.visit(child)
        self._typing -= typing
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, node.level, node.module)
        if base == "__future__":
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:  # ``from package import submodule``
                self._add(sub, (), node.lineno)
            else:
                self._add(base, (alias.name,), node.lineno)


def _imports(module: str) -> list[Import]:
    collector = _Collector(module)
    collector.visit(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    return collector.imports


IMPORTS = {m: _imports(m) for m in MODULES}


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the first part of ``module`` (below the package) starts with a prefix."""
    first = _short(module).split(".")[0]
    return any(first == p or (p.endswith("_") and first.startswith(p)) for p in prefixes)


def _internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _where(module: str, imp: Import) -> str:
    return f"{MODULES[module].relative_to(SRC.parents[1])}:{imp.line}"


def _module_graph() -> dict[str, set[str]]:
    """Internal imports that run at import time (not in functions, not typing-only).

    An edge goes to the module named by the import (``from .io.voxel import x``:
    ``io.voxel``), not to the packages above it: a submodule importing a sibling
    while its package's ``__init__`` runs is no cycle.
    """
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, imports in IMPORTS.items():
        for imp in imports:
            if imp.top and not imp.typing_only and imp.target in MODULES:
                graph[module].add(imp.target)
    return graph


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` imports ``a`` and ``a.b`` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _reached(start: list[Import], graph: dict[str, set[str]]) -> set[str]:
    """Internal modules run by the imports ``start``, following module-level imports."""
    todo = [p for imp in start if imp.target in MODULES for p in _with_parents(imp.target)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        todo += [p for t in graph[module] for p in _with_parents(t)]
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1 or node in graph[node]:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# --------------------------------------------------------------------------- tests


def test_sources_found():
    assert f"{PACKAGE}.predict" in MODULES and f"{PACKAGE}._reader" in MODULES


def test_engine_imports_no_gui_and_no_skin():
    bad = []
    for module, imports in IMPORTS.items():
        if _in(module, SKINS):
            continue
        for imp in imports:
            gui = imp.target.split(".")[0] in GUI
            skin = _internal(imp.target) and imp.target != PACKAGE and \
                _in(imp.target, SKIN_PACKAGES)
            if gui or skin:
                bad.append(f"{_where(module, imp)} imports {imp.target}")
    assert not bad, "engine modules must stay free of napari/Qt and the skins:\n" + \
        "\n".join(bad)


def _torch_users(graph: dict[str, set[str]]) -> set[str]:
    """Internal modules that import torch when they are imported."""
    return {m for m, imports in IMPORTS.items()
            if any(i.top and not i.typing_only and i.target.split(".")[0] == "torch"
                   for i in imports)}


@pytest.mark.parametrize("name", NPE2)
def test_npe2_contribution_never_reaches_torch(name):
    """At any level in the module itself, then through what its imports run."""
    module = f"{PACKAGE}.{name}"
    graph = _module_graph()
    direct = [f"{_where(module, i)}" for i in IMPORTS[module]
              if i.target.split(".")[0] == "torch"]
    reached = _reached([i for i in IMPORTS[module] if not i.typing_only], graph)
    via = sorted(reached & _torch_users(graph))
    assert not direct, f"{name} imports torch: {direct}"
    assert not via, f"{name} imports torch through {via}"


def test_package_import_never_reaches_torch():
    graph = _module_graph()
    start = [i for i in IMPORTS[PACKAGE] if i.top and not i.typing_only]
    torch_top = [i for i in IMPORTS[PACKAGE] if i.top and i.target.split(".")[0] == "torch"]
    assert not torch_top
    assert not _reached(start, graph) & _torch_users(graph)


def test_no_import_cycles():
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles (module-level imports):\n" + \
        "\n".join(" -> ".join(_short(m) for m in c) for c in cycles)


def _private_from_imports(module: str) -> list[str]:
    bad = []
    for imp in IMPORTS[module]:
        if not _internal(imp.target):
            continue
        for name in imp.names:
            private = name.startswith("_") and not name.startswith("__")
            if private and (module, imp.target, name) not in PRIVATE_ALLOWED:
                bad.append(f"{_where(module, imp)} imports {name} from {_short(imp.target)}")
    return bad


def _private_attributes(module: str) -> list[str]:
    """``alias._name`` where ``alias`` is an internal module bound by an import."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            target = aliases[node.value.id]
            if (module, target, node.attr) not in PRIVATE_ALLOWED:
                path = MODULES[module].relative_to(SRC.parents[1])
                bad.append(f"{path}:{node.lineno} uses {_short(target)}.{node.attr}")
    return bad


def test_no_imports_of_private_names():
    bad = [line for module in MODULES
           for line in _private_from_imports(module) + _private_attributes(module)]
    assert not bad, "private names used across modules (give them public names):\n" + \
        "\n".join(bad)


def test_allow_list_entries_are_used():
    for module, target, name in PRIVATE_ALLOWED:
        used = any(imp.target == target and name in imp.names for imp in IMPORTS[module])
        assert used, f"stale allow-list entry {(module, target, name)}"


# --------------------------------------------------------------------------- the checker


def test_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_checker_tells_skins_from_engine():
    assert _in(f"{PACKAGE}._widgets.predict", SKINS)
    assert _in(f"{PACKAGE}.cli.train", SKINS) and _in(f"{PACKAGE}._cli_train", SKINS)
    assert _in(f"{PACKAGE}._reader", SKINS)
    assert not _in(f"{PACKAGE}.predict", SKINS) and not _in(f"{PACKAGE}.blockwise.grid", SKINS)
    assert not _in(PACKAGE, SKINS)


def test_checker_resolves_relative_imports():
    assert _resolve(f"{PACKAGE}.predict", 1, "io") == f"{PACKAGE}.io"
    assert _resolve(f"{PACKAGE}._widgets.predict", 2, None) == PACKAGE
    assert _resolve(f"{PACKAGE}.models", 1, "zoo") == f"{PACKAGE}.models.zoo"
