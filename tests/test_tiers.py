"""The two test tiers: the lists in conftest.py name tests that exist, the markers are
registered, and a finer marker puts a test in the slow tier."""

import ast
from pathlib import Path

import pytest
from conftest import FINER_MARKERS, FIRST, GLOO_TESTS, SLOW_MODULES, SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_listed_module_and_test_exists():
    for module in [*SLOW_MODULES, *SLOW_TESTS]:
        assert (TESTS / module).is_file(), f"conftest.py lists {module}, which is gone"
    for module, names in SLOW_TESTS.items():
        tree = ast.parse((TESTS / module).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        stale = sorted(set(names) - defined)
        assert not stale, f"conftest.py SLOW_TESTS lists tests {module} no longer has: {stale}"
        for name, markers in names.items():
            assert set(markers) <= set(FINER_MARKERS), (module, name, markers)


def test_the_gloo_group_names_tests_that_exist():
    defined = {n.name for f in TESTS.glob("test_*.py") for n in ast.parse(f.read_text()).body
               if isinstance(n, ast.FunctionDef)}  # fmt: skip
    for names in (GLOO_TESTS, FIRST):
        assert names <= defined, f"conftest.py names tests that are gone: {names - defined}"


@pytest.mark.multiprocess
def test_a_multiprocess_test_joins_the_gloo_group(request):
    group = request.node.get_closest_marker("xdist_group")
    assert group is not None and group.args == ("gloo",)


def test_every_marker_is_registered(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert {"slow", *FINER_MARKERS} <= registered


@pytest.mark.e2e
def test_a_finer_marker_implies_slow(request):
    assert request.node.get_closest_marker("slow") is not None
