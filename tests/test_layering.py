"""The package's layering, checked from the source (AST only, nothing imported but ``__all__``).

Rules:

* No import cycles between ``ncfinetune`` modules (subpackages included). Imports inside
  functions count (a lazy import only hides a cycle, it does not remove it); imports under
  ``if TYPE_CHECKING:`` do not (they never run).
* Modules import from the module that defines a name, never from the package root
  ``ncfinetune`` (its ``__init__`` re-exports everything, so any such import is a back edge).
  ``ncfinetune/__init__.py`` itself may import anything.
* No module imports a private name (``_x``, not ``__x__``) or a private module
  (``ncfinetune._x``) of another module, or reaches one through a module alias
  (``data._pass_batch``); the one exception is ``ncfinetune._version`` (the version string),
  for ``ncfinetune/__init__.py`` and ``ncfinetune/checkpoint.py``.
* ``ncfinetune.__all__`` is small, and every name in it is importable and is defined in (or
  re-exported from) the module its ``__module__`` names.

The checker is a handful of functions taking a package directory, tested on fake packages
below, so a failure on the real package means a real violation.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE = "ncfinetune"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
# (private module, importing module) pairs that are allowed: the version string.
ALLOWED_PRIVATE_MODULES = frozenset(
    {
        ("ncfinetune._version", "ncfinetune"),
        ("ncfinetune._version", "ncfinetune.tuning.checkpoint"),
    }
)
MAX_PUBLIC_NAMES = 25
MAX_CYCLES_SHOWN = 200


# --------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Edge:
    """One import of ``target`` (a module of the package) by ``importer``.

    ``name`` is the attribute imported from ``target`` (``from target import name``), or None
    when the module itself is imported (``import target``, or ``from parent import target``).
    """

    importer: str
    target: str
    file: str  # relative to the folder holding the package, e.g. "ncfinetune/tuning.py"
    line: int
    name: str | None
    lazy: bool


def discover(package_dir: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST):
    """Yield (node, lazy) for every node that runs, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, lazy) for child in node.orelse)
            continue
        yield node, lazy
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _split_module(dotted: str, modules: dict[str, Path]) -> tuple[str | None, list[str]]:
    """The longest known module prefix of ``dotted`` and the attribute path after it."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in modules:
            return head, parts[i:]
    return None, parts


class _ModuleScan:
    """The package imports of one module, and its private attribute accesses via aliases."""

    def __init__(self, module: str, path: Path, modules: dict[str, Path], package: str):
        self.module, self.path, self.modules, self.package = module, path, modules, package
        is_package = path.name == "__init__.py"
        # The path from the folder that holds the package, e.g. "ncfinetune/backbones/vit.py".
        self.file = path.relative_to(path.parents[module.count(".") + is_package]).as_posix()
        self.edges: list[Edge] = []
        self.aliases: dict[str, str] = {}  # local name -> package module it is bound to
        self.attribute_uses: list[tuple[int, str]] = []  # (line, dotted attribute chain)
        self.here = module if is_package else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, lazy in _nodes(tree):
            if isinstance(node, ast.Import):
                self._import(node, lazy)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node, lazy)
            elif isinstance(node, ast.Call):
                self._import_module_call(node, lazy)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                dotted = _dotted(node)
                if dotted is not None:
                    self.attribute_uses.append((node.lineno, dotted))
        self.edges.sort(key=lambda e: (e.line, e.target, e.name or ""))
        self.attribute_uses.sort()

    def _inside(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def _add(self, target: str, line: int, name: str | None, lazy: bool) -> None:
        self.edges.append(Edge(self.module, target, self.file, line, name, lazy))

    def _import(self, node: ast.Import, lazy: bool) -> None:
        for alias in node.names:
            if not self._inside(alias.name):
                continue
            self._add(alias.name, node.lineno, None, lazy)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:  # ``import pkg.a.b`` binds ``pkg``; ``pkg.a.b.x`` is resolved from there
                self.aliases[self.package] = self.package

    def _import_from(self, node: ast.ImportFrom, lazy: bool) -> None:
        if node.level:
            base_parts = self.here.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not self._inside(base):
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.modules:
                self._add(submodule, node.lineno, None, lazy)
                self.aliases[alias.asname or alias.name] = submodule
            else:
                self._add(base, node.lineno, alias.name, lazy)

    def _import_module_call(self, node: ast.Call, lazy: bool) -> None:
        func = _dotted(node.func)
        if func not in ("importlib.import_module", "import_module", "__import__"):
            return
        if node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
            if isinstance(name, str) and self._inside(name):
                self._add(name, node.lineno, None, lazy)


def scan(package_dir: Path, package: str) -> tuple[dict[str, Path], list[_ModuleScan]]:
    """All modules of the package and the scan of each."""
    modules = discover(package_dir, package)
    return modules, [_ModuleScan(m, p, modules, package) for m, p in modules.items()]


def import_edges(package_dir: Path, package: str) -> list[Edge]:
    """Every import of a package module by a package module (self-imports dropped)."""
    _, scans = scan(package_dir, package)
    return [e for s in scans for e in s.edges if e.target != e.importer]


def root_imports(edges: list[Edge], package: str) -> list[Edge]:
    """Imports of the package root by modules other than the root itself."""
    return [e for e in edges if e.target == package and e.importer != package]


def find_cycles(edges: list[Edge], package: str) -> list[tuple[str, ...]]:
    """Every elementary cycle (first node smallest), up to MAX_CYCLES_SHOWN of them.

    Imports of the package root are left out: they are reported on their own (see
    :func:`root_imports`), and with them every module that imports the root would be on a
    cycle through ``__init__``.
    """
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.target != package:
            graph.setdefault(e.importer, set()).add(e.target)
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    order = {n: i for i, n in enumerate(nodes)}
    cycles: list[tuple[str, ...]] = []
    for start in nodes:  # cycles whose smallest node is ``start``
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path, on_path = [start], {start}
        while stack and len(cycles) < MAX_CYCLES_SHOWN:
            node, successors = stack[-1]
            nxt = next(successors, None)
            if nxt is None:
                stack.pop()
                on_path.discard(path.pop())
            elif nxt == start:
                cycles.append((*path, start))
            elif order[nxt] > order[start] and nxt not in on_path:
                path.append(nxt)
                on_path.add(nxt)
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
    return cycles


def private_imports(
    package_dir: Path, package: str, allowed_modules: frozenset[tuple[str, str]] = frozenset()
) -> list[str]:
    """``file:line name`` for each private name or private module one module takes from another.

    ``allowed_modules`` holds (private module, importer) pairs that are fine.
    """
    modules, scans = scan(package_dir, package)
    found = []

    def where(s: _ModuleScan, line: int) -> str:
        return f"{s.file}:{line}"

    for s in scans:
        for e in s.edges:
            if e.target == s.module:
                continue
            private_parts = [p for p in e.target.split(".")[1:] if _is_private(p)]
            if private_parts and (e.target, s.module) not in allowed_modules:
                found.append(f"{where(s, e.line)} {e.target} (private module)")
            if e.name is not None and _is_private(e.name):
                found.append(f"{where(s, e.line)} {e.name} (from {e.target})")
        for line, dotted in s.attribute_uses:
            head, _, rest = dotted.partition(".")
            if head not in s.aliases or not rest:
                continue
            module, attrs = _split_module(f"{s.aliases[head]}.{rest}", modules)
            if module is None or module == s.module or not attrs:
                continue
            if _is_private(attrs[0]):
                found.append(f"{where(s, line)} {attrs[0]} (attribute of {module})")
    return sorted(set(found), key=_violation_order)


def _violation_order(text: str) -> tuple[str, int, str]:
    location, _, rest = text.partition(" ")
    file, _, line = location.rpartition(":")
    return file, int(line), rest


def _short(module: str, package: str) -> str:
    return module.removeprefix(package + ".")


def _site(e: Edge, names: list[str] | None = None) -> str:
    names = names if names is not None else ([e.name] if e.name else [])
    what = f"from {e.target} import {', '.join(names)}" if names else f"import {e.target}"
    lazy = ", inside a function" if e.lazy else ""
    return f"{e.file}:{e.line} ({what}{lazy})"


def _sites(edges: list[Edge]) -> list[str]:
    """One entry per import statement, listing all the names it takes from its target."""
    grouped: dict[tuple, tuple[Edge, list[str]]] = {}
    for e in edges:
        _, names = grouped.setdefault((e.file, e.line, e.target, e.lazy), (e, []))
        if e.name:
            names.append(e.name)
    return [_site(e, names) for e, names in grouped.values()]


def describe_cycles(cycles: list[tuple[str, ...]], edges: list[Edge], package: str) -> str:
    """Each cycle as ``a -> b -> a``, followed by the import lines that make each of its edges."""
    if not cycles:
        return ""
    lines = [f"{len(cycles)} import cycle(s) between {package} modules:"]
    for cycle in cycles:
        lines.append("  " + " -> ".join(_short(m, package) for m in cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            sites = _sites([e for e in edges if (e.importer, e.target) == (a, b)])
            lines.append(f"      {_short(a, package)} -> {_short(b, package)}: " + "; ".join(sites))
    if len(cycles) >= MAX_CYCLES_SHOWN:
        lines.append(f"  (stopped after {MAX_CYCLES_SHOWN} cycles)")
    return "\n".join(lines)


def duplicate_public_names(pkg: ModuleType) -> list[str]:
    """Names listed more than once in ``pkg.__all__``."""
    names = list(pkg.__all__)
    return sorted({n for n in names if names.count(n) > 1})


def missing_public_names(pkg: ModuleType) -> list[str]:
    """Names in ``pkg.__all__`` that ``from pkg import name`` cannot find."""
    missing = []
    for name in pkg.__all__:
        if hasattr(pkg, name):
            continue
        try:  # ``from pkg import name`` also finds a submodule not imported yet
            importlib.import_module(f"{pkg.__name__}.{name}")
        except ImportError:
            missing.append(name)
    return missing


def misplaced_public_names(pkg: ModuleType) -> list[str]:
    """Classes/functions in ``pkg.__all__`` whose ``__module__`` lacks them under that name."""
    wrong = []
    for name in pkg.__all__:
        obj = getattr(pkg, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        try:
            home = importlib.import_module(obj.__module__)
        except ImportError:
            home = None
        if getattr(home, name, None) is not obj:
            wrong.append(f"{name} (__module__ = {obj.__module__!r})")
    return wrong


# --------------------------------------------------------------------------- the checker, tested


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path / "pkg"


CLEAN = {
    "__init__.py": """
        from pkg._version import __version__
        from pkg.a import thing
        from pkg.sub.c import other
        __all__ = ["__version__", "other", "thing"]
    """,
    "_version.py": "__version__ = '1'\n",
    "a.py": """
        from typing import TYPE_CHECKING
        import os
        from pkg import b
        from .b import helper
        if TYPE_CHECKING:
            from pkg.sub.c import other  # never runs: not an edge
        def thing():
            from pkg.b import helper as h  # lazy, but b does not import a: no cycle
            return b.helper() + h()
    """,
    "b.py": """
        import numpy
        def helper():
            return 1
    """,
    "sub/__init__.py": "",
    "sub/c.py": """
        from .. import a
        from ..b import helper
        from . import d
        def other():
            return a.thing() + helper() + d.value
    """,
    "sub/d.py": "value = 1\n",
    "ns/tool.py": "import pkg.sub.d as d\nprint(d.value)\n",  # a folder without __init__.py
}


def test_checker_passes_a_clean_package(tmp_path):
    pkg = _write_package(tmp_path, CLEAN)
    modules = discover(pkg, "pkg")
    assert set(modules) == {
        "pkg",
        "pkg._version",
        "pkg.a",
        "pkg.b",
        "pkg.sub",
        "pkg.sub.c",
        "pkg.sub.d",
        "pkg.ns.tool",
    }
    edges = import_edges(pkg, "pkg")
    pairs = {(e.importer, e.target) for e in edges}
    assert ("pkg.a", "pkg.b") in pairs  # from pkg import b: the submodule, not the root
    assert ("pkg.sub.c", "pkg.a") in pairs  # from .. import a
    assert ("pkg.sub.c", "pkg.b") in pairs  # from ..b import helper
    assert ("pkg.sub.c", "pkg.sub.d") in pairs  # from . import d
    assert ("pkg.ns.tool", "pkg.sub.d") in pairs
    assert ("pkg.a", "pkg.sub.c") not in pairs  # TYPE_CHECKING only
    assert [e.lazy for e in edges if e.importer == "pkg.a" and e.line == 9] == [True]
    assert find_cycles(edges, "pkg") == []
    assert root_imports(edges, "pkg") == []
    assert private_imports(pkg, "pkg", frozenset({("pkg._version", "pkg")})) == []


def test_checker_finds_cycles_lazy_ones_included(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            **CLEAN,
            # b -> a only inside a function: still a cycle a -> b -> a
            "b.py": """
                def helper():
                    from pkg.a import thing
                    return 1
            """,
            # a three-module cycle through relative imports: c -> d -> e -> c
            "sub/d.py": "from .e import x\nvalue = 1\n",
            "sub/e.py": "from . import c\nx = 1\n",
        },
    )
    edges = import_edges(pkg, "pkg")
    cycles = find_cycles(edges, "pkg")
    assert cycles == [
        ("pkg.a", "pkg.b", "pkg.a"),
        ("pkg.sub.c", "pkg.sub.d", "pkg.sub.e", "pkg.sub.c"),
    ]
    message = describe_cycles(cycles, edges, "pkg")
    assert "  a -> b -> a\n" in message
    assert "  sub.c -> sub.d -> sub.e -> sub.c" in message
    assert "b -> a: pkg/b.py:3 (from pkg.a import thing, inside a function)" in message


def test_checker_enumerates_every_cycle_of_a_tangle(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b, c\n",
            "b.py": "from pkg import a, c\n",
            "c.py": "from pkg import a\n",
        },
    )
    cycles = find_cycles(import_edges(pkg, "pkg"), "pkg")
    assert sorted(cycles) == [
        ("pkg.a", "pkg.b", "pkg.a"),
        ("pkg.a", "pkg.b", "pkg.c", "pkg.a"),
        ("pkg.a", "pkg.c", "pkg.a"),
    ]


def test_checker_reports_imports_of_the_package_root(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            **CLEAN,
            "b.py": "from pkg import thing\ndef helper():\n    import pkg\n    return 1\n",
        },
    )
    edges = import_edges(pkg, "pkg")
    found = [(e.importer, e.line, e.name) for e in root_imports(edges, "pkg")]
    assert found == [("pkg.b", 1, "thing"), ("pkg.b", 3, None)]
    # The root's own imports, and the cycle they would close through __init__, are not reported.
    assert find_cycles(edges, "pkg") == []


def test_checker_reports_private_names_and_modules(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            **CLEAN,
            "b.py": """
                from pkg.a import _secret, __version__
                from pkg import _version
                import pkg._version as v
                from pkg import a as mod_a
                def helper():
                    from . import _private_mod
                    return mod_a._hidden + mod_a.thing() + pkg.sub.d._x + v.__version__
                def _own():
                    return 1
                _own()
            """,
            "_private_mod.py": "",
        },
    )
    found = private_imports(pkg, "pkg", frozenset({("pkg._version", "pkg")}))
    assert found == [
        "pkg/b.py:2 _secret (from pkg.a)",
        "pkg/b.py:3 pkg._version (private module)",
        "pkg/b.py:4 pkg._version (private module)",
        "pkg/b.py:7 pkg._private_mod (private module)",
        "pkg/b.py:8 _hidden (attribute of pkg.a)",
    ]
    # ``pkg.sub.d._x`` is not flagged: b never imports pkg itself, so ``pkg`` is no alias there.


def test_checker_of_the_public_api(tmp_path, monkeypatch):
    files = {
        "__init__.py": """
            from fakeapi.core import Thing, make
            from fakeapi.core import make as build
            from fakeapi.reexport import helper
            LIMIT = 3
            __all__ = ["LIMIT", "Thing", "build", "helper", "make", "nowhere", "make", "sub"]
        """,
        "core.py": "class Thing:\n    pass\ndef make():\n    return Thing()\n",
        "reexport.py": "from fakeapi.core import make as helper\n",
        "sub.py": "",
    }
    for rel, text in files.items():
        path = tmp_path / "fakeapi" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pkg = importlib.import_module("fakeapi")
        assert duplicate_public_names(pkg) == ["make"]
        assert missing_public_names(pkg) == ["nowhere"]
        # ``build`` and ``helper`` are core.make, whose module has no ``build``/``helper``.
        assert misplaced_public_names(pkg) == [
            "build (__module__ = 'fakeapi.core')",
            "helper (__module__ = 'fakeapi.core')",
        ]
        pkg.__all__ = ["LIMIT", "Thing", "make", "sub"]  # a clean API passes
        assert duplicate_public_names(pkg) == missing_public_names(pkg) == []
        assert misplaced_public_names(pkg) == []
    finally:
        for name in [m for m in sys.modules if m == "fakeapi" or m.startswith("fakeapi.")]:
            del sys.modules[name]


# --------------------------------------------------------------------------- the real package


def test_no_import_cycles():
    edges = import_edges(PACKAGE_DIR, PACKAGE)
    assert edges, "no imports found: is PACKAGE_DIR right?"
    cycles = find_cycles(edges, PACKAGE)
    assert not cycles, describe_cycles(cycles, edges, PACKAGE)


def test_modules_import_from_the_defining_module_not_the_package_root():
    edges = import_edges(PACKAGE_DIR, PACKAGE)
    bad = root_imports(edges, PACKAGE)
    assert not bad, (
        f"{len(bad)} import(s) of the package root {PACKAGE!r} from inside the package; import "
        "from the module that defines the name instead:\n"
        + "\n".join("  " + site for site in _sites(bad))
    )


def test_no_private_imports_across_modules():
    found = private_imports(PACKAGE_DIR, PACKAGE, ALLOWED_PRIVATE_MODULES)
    assert not found, (
        f"{len(found)} private name(s) or module(s) taken from another {PACKAGE} module; make "
        "them public (with a docstring) in the module that owns them, or move them:\n"
        + "\n".join("  " + f for f in found)
    )


def test_public_api_is_small():
    pkg = importlib.import_module(PACKAGE)
    duplicates = duplicate_public_names(pkg)
    assert not duplicates, f"{PACKAGE}.__all__ lists these twice: {duplicates}"
    names = sorted(pkg.__all__)
    assert len(names) <= MAX_PUBLIC_NAMES, (
        f"{PACKAGE}.__all__ has {len(names)} names (at most {MAX_PUBLIC_NAMES}): {names}"
    )


def test_public_names_are_importable():
    missing = missing_public_names(importlib.import_module(PACKAGE))
    assert not missing, f"in {PACKAGE}.__all__ but not importable from {PACKAGE}: {missing}"


def test_public_names_live_in_the_module_they_claim():
    wrong = misplaced_public_names(importlib.import_module(PACKAGE))
    assert not wrong, (
        f"names in {PACKAGE}.__all__ that their __module__ does not define or re-export under "
        f"the same name: {wrong}"
    )
