"""The package's shape (issue 25): a few top-level modules, no module over 500 lines, no
function over 100 lines, in the package and in the recipe scripts. Read from the source (AST)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_TOP_LEVEL = 8  # besides __init__, __main__ and _version
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def sources() -> list[Path]:
    return sorted((ROOT / "ncfinetune").rglob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))


def long_functions(path: Path, limit: int, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_few_top_level_modules():
    top = sorted(
        p.name
        for p in (ROOT / "ncfinetune").glob("*.py")
        if p.name not in ("__init__.py", "__main__.py", "_version.py")
    )
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules: {top}"


def test_no_long_modules_or_functions():
    files = sources()
    assert len(files) > 30
    long_modules = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long = [f for p in files for f in long_functions(p, MAX_FUNCTION_LINES)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(101))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path / "m.py", MAX_FUNCTION_LINES, tmp_path) == ["m.py:1 f (102)"]
