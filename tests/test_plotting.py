"""ncfinetune.plotting: figures without pyplot or a backend switch, written atomically."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image

from ncfinetune.plotting import new_figure, save_figure

SCRIPT = """
import json, sys
import matplotlib
before = matplotlib.get_backend()
from ncfinetune.plotting import new_figure, save_figure
fig, (a, b) = new_figure(1, 2, figsize=(4, 2))
a.plot([0, 1], [1, 0]); b.bar([0, 1], [2, 3])
save_figure(fig, sys.argv[1])
print(json.dumps({"before": before, "after": matplotlib.get_backend(),
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_plotting_leaves_the_backend_alone_and_never_imports_pyplot(tmp_path):
    # a backend other than Agg, chosen by the caller: plotting must neither switch it nor
    # need it (the PNG is still rendered, by Agg, on save)
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = tmp_path / "a.png"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"before": "svg", "after": "svg", "pyplot": False}
    with PIL.Image.open(out) as image:
        assert image.format == "PNG" and image.size == (440, 220)  # 4 x 2 inches at 110 dpi


def test_save_figure_makes_folders_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "deep" / "er" / "plot.png"
    for values in ([1, 2, 3], [3, 1, 2]):
        fig, ax = new_figure(figsize=(3, 2))
        ax.plot(values)
        assert save_figure(fig, path, dpi=50) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["plot.png"]
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and image.size == (150, 100)
        assert np.asarray(image).std() > 0  # something was drawn
