"""The README's Python "Use" snippet runs as written, offline."""

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
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


# The README's first Recipes line, the bundled default: run as written (no short budget), and
# its output must be the README's headline numbers.
DEFAULT_LINE = "ncfinetune finetune --output_dir runs/default"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


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
    if line == DEFAULT_LINE:
        return args
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


HEADLINE = re.compile(
    r"\*\*([\d.]+)% test accuracy\*\*.*?\*\*NC1 ([\d.]+)\*\*, \*\*([\d.]+)% trainable\*\*", re.S
)
PRINTED = re.compile(
    r"test accuracy ([\d.]+)%\s+penultimate NC1 \(train\) ([\d.]+)\s+trainable ([\d.]+)%"
)


def headline() -> tuple[str, ...]:
    """The numbers at the top of the README: (accuracy %, NC1, trainable %)."""
    intro = (ROOT / "README.md").read_text().split("## Use")[0]
    quoted = HEADLINE.search(intro)
    assert quoted, "the README's headline (**A% test accuracy** ... **NC1 N**, **T% trainable**)"
    return quoted.groups()


def test_recipes_block_runs_top_to_bottom_and_the_default_prints_the_headline(tmp_path):
    """Every line of the README's Recipes block, with tiny budgets appended except on the
    bundled default's line, which runs as written from this folder outside the checkout and
    must print the README's headline numbers. The lines of one run folder run in README order,
    two such chains at a time (most of each line is a fresh interpreter's imports, on one
    core). Without Fashion-MNIST (apt-get install dataset-fashion-mnist) its lines are left out
    with a warning."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    images = tmp_path / "my_images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, dtype=np.uint8)).save(images / f"im {i}.png")
    bindir = Path(sys.executable).parent
    # PYTHONPATH: the commands import this checkout, whatever the venv's install points at
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env = {**clean, "PATH": f"{bindir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}  # fmt: skip
    printed = {}

    def run_chain(chain):
        for line, cmd in chain:
            proc = subprocess.run(
                cmd[1:] if cmd[0].startswith("ACCELERATE_USE_CPU") else cmd,
                cwd=tmp_path,
                env={**env, "ACCELERATE_USE_CPU": "true"} if "ACCELERATE_USE_CPU" in line else env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
            printed[line] = proc.stdout
        return len(chain)

    lines = recipes_block()
    assert DEFAULT_LINE in lines, f"the Recipes block no longer starts with {DEFAULT_LINE!r}"
    if not FMNIST.is_dir():
        left = [x for x in lines if "fmnist" in x or "pretrain" in x]
        warnings.warn(f"no Fashion-MNIST: {len(left)} README line(s) not run: {left}", stacklevel=1)
        lines = [x for x in lines if x not in left]
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the longest chains first: they set the wall time
        ordered = sorted(chains(lines), key=lambda c: (DEFAULT_LINE not in c[0][0], -len(c)))
        ran = sum(pool.map(run_chain, ordered))
    assert ran == len(lines) >= 8
    assert (tmp_path / "preds.csv").is_file()
    out = PRINTED.search(printed[DEFAULT_LINE])
    assert out, printed[DEFAULT_LINE][-2000:]
    assert out.groups() == headline(), (
        f"README says {headline()} (accuracy %, NC1, trainable %), the default run printed "
        f"{out.groups()}: re-run it and update the README's headline"
    )
