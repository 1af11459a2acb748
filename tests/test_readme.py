"""The README's Python "Use" snippet runs as written, offline."""

import re
import subprocess
import sys
from pathlib import Path

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
