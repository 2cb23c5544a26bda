"""`make ui` / `make serve` on Ctrl-C: the servers they start in the background stop, the make exits 130, and no
"Segmentation fault" or traceback reaches the terminal. Stand-in servers (shell scripts that sleep) take the place
of prefect, mlflow and dsv3, so the test runs in a second."""

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO

SERVER = "#!/bin/sh\n[ \"$1\" = runs ] && exit 0  # dsv3 runs, before the servers\necho started >> \"$0.log\"\nexec sleep 300\n"


@pytest.mark.parametrize("target", ["ui", "serve"])
def test_ctrl_c_stops_every_server_and_exits_130(tmp_path, target):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("prefect", "mlflow", "dsv3"):
        (bin_dir / name).write_text(SERVER)
        (bin_dir / name).chmod(0o755)
    make = subprocess.Popen(
        ["make", "--no-print-directory", target, f"BIN={bin_dir}", f"RUNS={tmp_path / 'runs'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    servers = 3 if target == "serve" else 2
    deadline = time.monotonic() + 20
    while sum((bin_dir / f"{n}.log").exists() for n in ("prefect", "mlflow", "dsv3")) < servers:
        assert time.monotonic() < deadline, "the servers did not start"
        time.sleep(0.1)
    os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the whole foreground group
    output, _ = make.communicate(timeout=20)
    assert make.returncode == -signal.SIGINT and "Error 130" in output, output  # a shell shows exit status 130
    assert "Segmentation fault" not in output and "Traceback" not in output, output
    left = subprocess.run(["pgrep", "-s", str(make.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"left running: {left}"
