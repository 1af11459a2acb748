"""The package's layering.

Most rules live in ``.importlinter`` at the repository root and are checked by import-linter
(``lint-imports``), which :func:`test_import_contracts` runs: the layers in order (errors,
files, messages, plotting -> backbones -> metrics -> data -> tuning -> training -> selection ->
inference -> recipes -> cli), every top-level module placed in a layer; nothing but the CLI
imports the run layer ``ncfinetune.recipes``; private modules (``metrics._core``) are imported
only from within their own package; no module imports the package root; no cycles between
siblings. Imports inside functions count, ``if TYPE_CHECKING:`` ones do not.

Three rules import-linter cannot express are checked here, on the import graph it builds
(grimp's) or on the source:

* No import cycles between modules. ``acyclic_siblings`` does not see an import of a module's
  own package ``__init__`` (``data.loaders -> data``), so a cycle through it would pass.
* No private *names* taken from another module (``from ncfinetune.x import _y``, or ``x._y``
  through a module alias): import-linter sees modules, not names, and ruff's PLC2701 skips
  imports within the package.
* ``ncfinetune.__all__`` is small (<= 25 names), importable, and each name lives in the module
  its ``__module__`` names.

Every check is also run on a fake package holding violations, so each one can fail.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import grimp
import pytest

PACKAGE = "ncfinetune"
REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / PACKAGE
MAX_PUBLIC_NAMES = 25


# --------------------------------------------------------------------------- the checks


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the package under ``root`` with ``root/.importlinter``."""
    script = Path(sys.executable).parent / "lint-imports"
    command = [str(script)] if script.exists() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run(
        [*command, ".importlinter", "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def import_graph(root: Path, package: str) -> grimp.ImportGraph:
    """grimp's graph of ``root/package`` (the one import-linter checks), lazy imports included.

    grimp finds the package with ``importlib.util.find_spec``, which answers from
    ``sys.modules`` first: the imported package is set aside meanwhile (nothing is imported).
    """
    imported = [m for m in sys.modules if m == package or m.startswith(package + ".")]
    saved = {m: sys.modules.pop(m) for m in imported}
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.find_spec(package)
        found = Path(spec.origin).parent if spec and spec.origin else None
        assert found == root / package, f"{package} resolves to {found}, not {root / package}"
        return grimp.build_graph(package, cache_dir=None, exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(root))
        sys.modules.update(saved)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The module sets that import one another in a circle: strongly connected components of
    more than one module (Tarjan's algorithm), each sorted, smallest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # the package has ~60 modules: recursion depth is no issue
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.find_modules_directly_imported_by(node)):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted(found)


def describe_cycle(graph: grimp.ImportGraph, component: list[str]) -> str:
    """One cycle of ``component`` with the lines that make each of its imports."""
    first, rest = component[0], set(component)
    chain = None
    for nxt in sorted(graph.find_modules_directly_imported_by(first) & rest):
        back = graph.find_shortest_chain(importer=nxt, imported=first)
        if back is not None:
            chain = (first, *back)
            break
    lines = ["  " + " -> ".join(chain or component)]
    for a, b in zip(chain or (), (chain or ())[1:], strict=False):
        details = graph.get_import_details(importer=a, imported=b)
        where = ", ".join(f"l.{d['line_number']}: {d['line_contents']}" for d in details)
        lines.append(f"      {a} -> {b} ({where})")
    return "\n".join(lines)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names(root: Path, package: str) -> list[str]:
    """``file:line name`` for each private name one module of the package takes from another.

    Private *modules* are import-linter's (``private_modules``); here only names: ``from m
    import _x``, and ``m._x`` where ``m`` is a module of the package reached through a name an
    import bound (``import pkg.m as m``, ``from pkg import m``, or ``pkg.m._x`` after
    ``import pkg.m``).
    """
    files = sorted((root / package).rglob("*.py"))
    modules = {}
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = []
    for module, path in modules.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        rel = path.relative_to(root).as_posix()
        aliases: dict[str, str] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if base not in modules:
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif _is_private(alias.name) and base != module:
                        found.append(f"{rel}:{node.lineno} {alias.name} (from {base})")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
                    elif alias.name in modules:  # ``import pkg.m`` binds ``pkg``
                        aliases[package] = package
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in aliases:
                continue
            target = ".".join([aliases[value.id], *chain])
            if target in modules and target != module and f"{target}.{node.attr}" not in modules:
                found.append(f"{rel}:{node.lineno} {node.attr} (attribute of {target})")
    return sorted(set(found), key=lambda f: (f.split(":")[0], int(f.split(":")[1].split()[0]), f))


def public_api_problems(pkg: ModuleType) -> list[str]:
    """What is wrong with ``pkg.__all__``: too long, repeated, unimportable or misplaced names."""
    names = list(pkg.__all__)
    problems = []
    if len(names) > MAX_PUBLIC_NAMES:
        problems.append(f"{len(names)} names (at most {MAX_PUBLIC_NAMES})")
    problems += [f"{n} listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for name in dict.fromkeys(names):
        if not hasattr(pkg, name):
            try:  # ``from pkg import name`` also finds a submodule not imported yet
                importlib.import_module(f"{pkg.__name__}.{name}")
            except ImportError:
                problems.append(f"{name} is not importable")
            continue
        obj = getattr(pkg, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            home = sys.modules.get(obj.__module__) or importlib.import_module(obj.__module__)
            if getattr(home, name, None) is not obj:
                problems.append(f"{name} is not defined under that name in {obj.__module__}")
    return problems


# --------------------------------------------------------------------------- the real package


def test_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles():
    graph = import_graph(REPO, PACKAGE)
    assert len(graph.modules) > 30, "too few modules found: is the package path right?"
    cycles = import_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) between {PACKAGE} modules:\n" + "\n".join(
        describe_cycle(graph, c) for c in cycles
    )


def test_no_private_names_across_modules():
    found = private_names(REPO, PACKAGE)
    assert not found, (
        f"{len(found)} private name(s) taken from another {PACKAGE} module; make them public "
        "(with a docstring) in the module that owns them, or move them:\n"
        + "\n".join("  " + f for f in found)
    )


def test_public_api_is_small_and_truthful():
    problems = public_api_problems(importlib.import_module(PACKAGE))
    assert not problems, f"{PACKAGE}.__all__: " + "; ".join(problems)


# --------------------------------------------------------------------------- the checks can fail


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory) -> Path:
    """A copy of the package's modules and its .importlinter, plus one violation of each rule."""
    root = tmp_path_factory.mktemp("layering")
    shutil.copy(REPO / ".importlinter", root / ".importlinter")
    for path in PACKAGE_DIR.rglob("*.py"):
        if "__pycache__" not in path.parts:
            target = root / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    _write(
        root,
        {
            "ncfinetune/data/spy.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from ncfinetune.cli import main  # never runs: no violation
                def peek():
                    from ncfinetune.recipes import engine  # lazy: counts all the same
                    from ncfinetune.metrics import _core
                    from ncfinetune.data.loaders import _secret
                    import ncfinetune
                    import ncfinetune.data.sources as src
                    import ncfinetune.data.labels
                    return engine, _core, _secret, src._hidden, ncfinetune.data.labels._odd
            """,
            # a cycle through the sub-package's own __init__ (invisible to acyclic_siblings)
            "ncfinetune/tuning/__init__.py": "from ncfinetune.tuning.ring import x\nSIZE = 1\n",
            "ncfinetune/tuning/ring.py": "def x():\n    from ncfinetune.tuning import SIZE\n",
            # a cycle between siblings
            "ncfinetune/training/ping.py": "from ncfinetune.training import pong\n",
            "ncfinetune/training/pong.py": "def f():\n    from ncfinetune.training import ping\n",
            "ncfinetune/unplaced.py": "",  # a top-level module in no layer
        },
    )
    return root


def test_import_contracts_can_fail(broken_copy):
    result = lint_imports(broken_copy)
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, out
    assert "Contracts: 0 kept, 5 broken" in out, out
    assert "ncfinetune.data.spy -> ncfinetune.recipes.engine" in out
    assert "ncfinetune.data.spy -> ncfinetune.metrics._core" in out
    assert "ncfinetune.data.spy -> ncfinetune (l.9)" in out
    assert "ncfinetune.unplaced" in out  # exhaustive: every module has a layer
    assert ".ping -> .pong" in out or ".pong -> .ping" in out
    assert "ncfinetune.cli" not in out.replace("but the CLI", "")  # TYPE_CHECKING skipped


def test_cycle_check_can_fail(broken_copy):
    graph = import_graph(broken_copy, PACKAGE)
    cycles = import_cycles(graph)
    assert ["ncfinetune.training.ping", "ncfinetune.training.pong"] in cycles
    assert any({"ncfinetune.tuning", "ncfinetune.tuning.ring"} <= set(c) for c in cycles)
    message = describe_cycle(graph, ["ncfinetune.training.ping", "ncfinetune.training.pong"])
    assert "ncfinetune.training.pong -> ncfinetune.training.ping (l.2:" in message


def test_private_name_check_can_fail(broken_copy):
    assert private_names(broken_copy, PACKAGE) == [
        "ncfinetune/data/spy.py:8 _secret (from ncfinetune.data.loaders)",
        "ncfinetune/data/spy.py:12 _hidden (attribute of ncfinetune.data.sources)",
        "ncfinetune/data/spy.py:12 _odd (attribute of ncfinetune.data.labels)",
    ]


def test_public_api_check_can_fail(tmp_path, monkeypatch):
    _write(
        tmp_path,
        {
            "fakeapi/__init__.py": """
                from fakeapi.core import Thing, make
                from fakeapi.core import make as build
                LIMIT = 3
                __all__ = ["LIMIT", "Thing", "build", "make", "nowhere", "make", "sub"]
            """,
            "fakeapi/core.py": "class Thing:\n    pass\ndef make():\n    return Thing()\n",
            "fakeapi/sub.py": "",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "MAX_PUBLIC_NAMES", 5)
    try:
        pkg = importlib.import_module("fakeapi")
        assert public_api_problems(pkg) == [
            "7 names (at most 5)",
            "make listed twice",
            "build is not defined under that name in fakeapi.core",
            "nowhere is not importable",
        ]
        pkg.__all__ = ["LIMIT", "Thing", "make", "sub"]
        assert public_api_problems(pkg) == []
    finally:
        for name in [m for m in sys.modules if m == "fakeapi" or m.startswith("fakeapi.")]:
            del sys.modules[name]
