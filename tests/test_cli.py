"""dsv3/cli.py and flows/cli.py: `--help` answers without importing the training stack."""

import subprocess
import sys
from pathlib import Path

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


def test_the_printed_launch_command_names_its_server_and_prefect(tmp_path):
    """`make serve` prints a command that works in a fresh shell: the API URL and the venv's prefect are spelled out,
    and it names the deployment `dsv3 serve` registers."""
    from flows.cli import launch_message

    command = launch_message("http://127.0.0.1:4200/api").splitlines()[-1].split()
    assert command[0] == "PREFECT_API_URL=http://127.0.0.1:4200/api"
    assert Path(command[1]).is_file() and command[1].endswith("/prefect")
    assert command[2:5] == ["deployment", "run", "dsv3-pipeline/dsv3"]
