"""The wheel a user pip-installs: built from this tree, installed outside it, run from elsewhere.

The wheel is built offline (``pip wheel --no-build-isolation``: setuptools comes from the test's
own environment) from a copy of the package sources, so that the build leaves no ``build/`` or
``*.egg-info`` in the checkout. It is installed with ``pip install --no-deps --target`` (the
dependencies are the running environment's) and every command runs with the working directory
outside the repository and ``PYTHONPATH`` set to the install folder only: what it imports is the
installed copy, never the checkout (the test checks ``ncfinetune.__file__``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ncfinetune"
# What a build reads besides the package: the project metadata (and the readme it names).
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp", ".*")


def source_files() -> set[str]:
    """Every file of the package as the wheel should hold it (``ncfinetune/...``)."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not p.name.startswith(".")
        and p.suffix not in (".pyc", ".tmp")
    }


def pip(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"pip {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the wheel, the folder it is installed in, an empty working folder outside the repo)."""
    pytest.importorskip("setuptools", reason="the offline wheel build uses the venv's setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(PACKAGE, src / "ncfinetune", ignore=JUNK)
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
        str(src), cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("ncfinetune-*.whl")
    site = tmp / "site"
    pip("install", "--no-deps", "--no-index", "--no-compile", "--target", str(site), str(wheel),
        cwd=tmp)  # fmt: skip
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, site, elsewhere


def run(installed, *args: str) -> subprocess.Popen:
    """Start a command with only the installed copy importable (besides the dependencies)."""
    _, site, cwd = installed
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONSTARTUP", None)
    return subprocess.Popen(
        list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finished(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args}\n{out[-2000:]}\n{err[-3000:]}"
    return out


def test_the_wheel_holds_every_package_file_and_declares_the_console_script(installed):
    wheel, site, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files() - names)
    assert not missing, f"package files left out of the wheel (pyproject package-data): {missing}"
    for pattern in (
        r"ncfinetune/assets/.+\.safetensors",
        r"ncfinetune/assets/.+\.json",
        r"ncfinetune/assets/.+\.md",
        r"ncfinetune/metrics/modules/.+/.+\.py",
        r"ncfinetune/recipes/configs/default\.yaml",
        r"ncfinetune/recipes/configs/pretrain/.+\.yaml",
    ):
        assert any(re.fullmatch(pattern, n) for n in names), pattern
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "recipes/"))]
    (dist,) = importlib.metadata.distributions(name="ncfinetune", path=[str(site)])
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"ncfinetune": "ncfinetune.cli:main"}


def test_the_installed_cli_runs_the_bundled_default_from_outside_the_repository(installed):
    _, site, cwd = installed
    out_dir = cwd / "run"
    py = sys.executable
    # the short commands run while the fine-tune does (each one starts torch: seconds of CPU)
    where = run(installed, py, "-c", "import ncfinetune; print(ncfinetune.__file__)")
    usage = run(installed, py, "-m", "ncfinetune", "--help")
    command_help = run(installed, py, "-m", "ncfinetune", "finetune", "--help")
    script = site / "bin" / "ncfinetune"  # pip --target installs the console script here
    by_script = run(installed, str(script), "--help") if script.is_file() else None
    # the bundled default, shortened: 1 epoch of 2 steps on 5 images per class (the NC1 pass
    # over all 1437 training images would double the run's time); the 360 test images all
    train = run(installed, py, "-m", "ncfinetune", "finetune", "--epochs", "1",
                "--max_steps", "2", "--per_class", "5", "--output_dir", str(out_dir))  # fmt: skip

    imported = Path(finished(where).strip()).resolve()
    assert imported.is_relative_to(site.resolve()), f"imported {imported}, not the installed copy"
    assert not imported.is_relative_to(ROOT)
    text = finished(usage)
    assert text.startswith("usage: ncfinetune <command>")
    for command in ("finetune", "select", "eval", "predict", "pretrain"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command
    text = finished(command_help)
    assert "--model" in text and "--epochs" in text and "--output_dir" in text
    if by_script is not None:
        assert finished(by_script).startswith("usage: ncfinetune <command>")
    text = finished(train)
    # the bundled default: the bundled resnet18 on digits, as configs/default.yaml sets it
    assert re.search(r"test accuracy \d+(\.\d+)?%", text), text[-2000:]
    assert "360 test images" in text
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert (metrics["model"], metrics["dataset"]) == ("resnet18_fmnist04", "digits")
    assert (out_dir / "tuned").is_dir() and any((out_dir / "tuned").iterdir())
    assert not (cwd / "runs").exists()  # nothing written outside --output_dir
