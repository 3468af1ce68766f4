"""The package's layout stays what the README's map says: no import cycle (function-level imports
included, and between packages), no private name imported from another module, no name that hides a
module, every module readable in one sitting."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path

import pytest

import gpas_probe

ROOT = Path(gpas_probe.__file__).parent
CLI = ROOT.parent / "cli"
MAX_LINES = 400


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of ours: name -> (file, is a package)."""
    found = {}
    for folder, prefix in ((ROOT, ["gpas_probe"]), (CLI, ["gpas_probe", "cli"])):
        for path in folder.rglob("*.py"):
            parts = prefix + list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


MODULES = _modules()


def _owner(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> Iterable[tuple[str, str | None]]:
    """(module, imported name or None) for every import of ours anywhere in the file (functions included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpas_probe":
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gpas_probe":
                    yield alias.name, None


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (a ``from package import submodule`` counts as the submodule)."""
    graph = {}
    for name, (path, _) in MODULES.items():
        targets = set()
        for module, imported in _imports(path):
            full = f"{module}.{imported}"
            targets.add(full if imported and full in MODULES else _owner(module))
        graph[name] = targets - {name}
    return graph


def _package(name: str) -> str:
    """The package a module belongs to (a package is its own; top-level modules are their own)."""
    if MODULES[name][1] or name.count(".") == 1:
        return name
    return name.rpartition(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_the_top_level_package() -> None:
    # gpas_probe/__init__ gathers the public API; a library module that imported it would import everything
    offenders = [name for name, (path, _) in MODULES.items() if name != "gpas_probe"
                 and any(module == "gpas_probe" for module, _ in _imports(path))]
    assert offenders == []


def test_no_import_cycle_between_modules() -> None:
    graph = {m: targets - {"gpas_probe"} for m, targets in _graph().items() if m != "gpas_probe"}
    assert _cycles(graph) == []


def test_no_import_cycle_between_packages() -> None:
    # importing any module runs its package's __init__ first: packages that import each other can fail to
    # import depending on which is imported first
    graph: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == "gpas_probe":
            continue
        mine = _package(module)
        graph.setdefault(mine, set()).update(_package(t) for t in targets if t != "gpas_probe")
        graph[mine].discard(mine)
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [(name, module, imported) for name, (path, _) in MODULES.items()
               for module, imported in _imports(path)
               if imported and imported.startswith("_") and not imported.startswith("__")
               and f"{module}.{imported}" not in MODULES]
    assert private == []


@pytest.mark.parametrize("package", sorted(n for n, (_, pkg) in MODULES.items() if pkg))
def test_no_name_hides_a_module(package: str) -> None:
    # `import gpas_probe.x.y as m` gives the attribute y of gpas_probe.x: it must be the module y
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        assert getattr(pkg, info.name) is module, f"{package}.{info.name} is {getattr(pkg, info.name)!r}"


def test_every_module_reads_in_one_sitting() -> None:
    long = {name: n for name, (path, _) in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _mapped_files(text: str) -> list[str]:
    """The files the map's tree lists, as paths relative to the repository."""
    block = text.split("```")[1]
    folders: list[tuple[int, str]] = []
    files = []
    for line in block.splitlines()[1:]:
        name = line.strip().split(" ")[0]
        if not name or name.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name))
        else:
            files.append("".join(f for _, f in folders) + name)
    return files


def test_the_package_map_lists_every_module_once() -> None:
    mapped = _mapped_files((ROOT.parent / "docs" / "package-map.md").read_text())
    on_disk = sorted(str(p.relative_to(ROOT.parent)) for _, (p, _) in MODULES.items())
    assert sorted(mapped) == on_disk
