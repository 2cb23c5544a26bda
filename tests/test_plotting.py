"""dsv3/plotting.py: figures are drawn on the headless Agg backend and written as PNGs, whatever backend the environment
asks for (MPLBACKEND) and without a display."""

import os
import subprocess
import sys

from tests.conftest import REPO

SAVE = """
import sys
from dsv3.plotting import plt
fig, ax = plt.subplots()
ax.plot([0, 1], [1, 0])
fig.savefig(sys.argv[1])
print(plt.get_backend())
"""


def test_a_figure_is_drawn_on_agg_even_when_another_backend_is_asked_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env |= {"MPLBACKEND": "pdf", "PYTHONPATH": str(REPO)}
    out = tmp_path / "figure.png"
    done = subprocess.run([sys.executable, "-c", SAVE, str(out)], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().lower() == "agg"
    assert out.read_bytes().startswith(b"\x89PNG")
