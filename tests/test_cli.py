"""dsv3/cli.py and flows/cli.py: `--help` answers without importing the training stack."""

import subprocess
import sys

from tests.conftest import REPO


def test_help_imports_neither_torch_nor_transformers_nor_prefect():
    """The commands import what they use when they run, so `dsv3 --help` and `dsv3 run --help` take well under
    2 s (they took 15-19 s on a busy laptop while the recipe schema pulled in torch and transformers)."""
    probe = (
        "import sys, contextlib, io\n"
        "from flows.cli import main\n"
        "for argv in (['--help'], ['run', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'mlflow', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
