"""The README's Python "Use" snippet runs as written, offline."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def use_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_snippet_runs_offline_as_written(tmp_path):
    code = use_snippet()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainable 924,170 of 11,181,642 (8.27%)" in proc.stdout
    assert (tmp_path / "out" / "digits-scl" / "tuned_config.json").is_file()


# Short flags appended to each line of the README's Recipes block: same commands, tiny budgets.
SHORT = {
    "finetune.py": ["--max_steps", "2", "--per_class", "5", "--select_max_images", "50"],
    "pretrain.py": ["--epochs", "1", "--max_steps", "2", "--nc1_samples", "100"]
    + ["--output_dir", "runs/pretrain_test"],
}


def recipes_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Recipes") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines, buf = [], ""
    for raw in block.splitlines():
        line = raw.split("  #")[0].rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        if (buf + line).strip():
            lines.append((buf + line).strip())
        buf = ""
    return lines


def short_command(line: str) -> list[str]:
    """The line's command with the tiny budget appended: 2 epochs unless the line sets them (or
    resumes a run, whose epochs are its own)."""
    args = shlex.split(line)
    # a recipe is named as a script (recipes/finetune.py) or as a command (ncfinetune finetune)
    extra = next(
        (v for k, v in SHORT.items() if any(a.endswith(k) or a == k[:-3] for a in args)), []
    )
    if extra is SHORT["finetune.py"] and not {"--epochs", "--resume"} & set(args):
        extra = [*extra, "--epochs", "2"]
    return args if "--help" in args else args + extra


def run_folder(cmd: list[str]) -> str | None:
    """The run folder a command writes or reads (--output_dir, or the run of --tuned)."""
    for key in ("--output_dir", "--tuned"):
        if key in cmd:
            value = cmd[len(cmd) - 1 - cmd[::-1].index(key) + 1]
            return value.split("/tuned")[0]
    return None


def chains(lines: list[str]) -> list[list[tuple[str, list[str]]]]:
    """The lines grouped by run folder, each group in README order (a resume after its run,
    eval and predict after the run they read); lines of different folders are independent."""
    groups: dict[str, list[tuple[str, list[str]]]] = {}
    for i, line in enumerate(lines):
        cmd = short_command(line)
        groups.setdefault(run_folder(cmd) or f"line {i}", []).append((line, cmd))
    return list(groups.values())


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="the README's config line uses Fashion-MNIST (apt-get install dataset-fashion-mnist)",
)
def test_recipes_block_runs_top_to_bottom(tmp_path):
    """Every line of the README's Recipes block with tiny budgets appended: the lines of one run
    folder in README order, two such chains at a time (most of each line is a fresh
    interpreter's imports, on one core)."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    images = tmp_path / "my_images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, dtype=np.uint8)).save(images / f"im {i}.png")
    bindir = Path(sys.executable).parent
    # PYTHONPATH: the commands import this checkout, whatever the venv's install points at
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path}  # fmt: skip

    def run_chain(chain):
        for line, cmd in chain:
            proc = subprocess.run(
                cmd[1:] if cmd[0].startswith("ACCELERATE_USE_CPU") else cmd,
                cwd=tmp_path,
                env={**env, "ACCELERATE_USE_CPU": "true"} if "ACCELERATE_USE_CPU" in line else env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        return len(chain)

    lines = recipes_block()
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the longest chain first: it sets the wall time
        ran = sum(pool.map(run_chain, sorted(chains(lines), key=len, reverse=True)))
    assert ran == len(lines) >= 8
    assert (tmp_path / "preds.csv").is_file()


HEADLINE = re.compile(
    r"\*\*([\d.]+)% test accuracy\*\*.*?\*\*NC1 ([\d.]+)\*\*, \*\*([\d.]+)% trainable\*\*", re.S
)
PRINTED = re.compile(
    r"test accuracy ([\d.]+)%\s+penultimate NC1 \(train\) ([\d.]+)\s+trainable ([\d.]+)%"
)


def test_readme_headline_is_what_the_default_run_prints(tmp_path):
    """The numbers at the top of the README are the default run's output, re-run here: the
    bundled default with no flags but an output folder (the README's first command), from a
    folder outside the checkout."""
    intro = (ROOT / "README.md").read_text().split("## Use")[0]
    quoted = HEADLINE.search(intro)
    assert quoted, "the README's headline (**A% test accuracy** ... **NC1 N**, **T% trainable**)"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ncfinetune", "finetune", "--output_dir", str(tmp_path / "run")],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = PRINTED.search(proc.stdout)
    assert printed, proc.stdout[-2000:]
    assert printed.groups() == quoted.groups(), (
        f"README says {quoted.groups()} (accuracy %, NC1, trainable %), the default run printed "
        f"{printed.groups()}: re-run it and update the README's headline"
    )
