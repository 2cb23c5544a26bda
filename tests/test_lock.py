"""dsv3/store/lock.py: one run per runs folder; the second is refused naming the holder; a killed holder's lock
is recovered at once."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dsv3.errors import InputError
from dsv3.store.lock import runs_lock
from tests.conftest import REPO

HOLD = """
import importlib.util, sys, time
from pathlib import Path
# dsv3/store/lock.py itself, by its path: the holder imports nothing else
spec = importlib.util.spec_from_file_location("lock", Path(sys.argv[2]) / "dsv3" / "store" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
runs_lock = lock.runs_lock
with runs_lock(Path(sys.argv[1]), "dsv3 run --recipe recipes/tiny.yaml"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_run_is_refused_and_a_killed_holder_is_recovered(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), str(REPO)], stdout=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=rf"is in use by pid {holder.pid} .*recipes/tiny.yaml"):
        with runs_lock(tmp_path, "dsv3 run --recipe recipes/smoke.yaml"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with runs_lock(tmp_path, "second"):
        assert time.monotonic() - started < 1


def test_the_lock_is_released_on_exit_and_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with runs_lock(tmp_path, "first"):
            raise RuntimeError("stage crashed")
    with runs_lock(tmp_path, "second"):
        pass


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with runs_lock(tmp_path, "dsv3 run"):
        with runs_lock(tmp_path, "the flow it starts"):
            pass
        other = subprocess.run(  # still held by the outer context, as another process sees it
            [sys.executable, "-c", HOLD, str(tmp_path), str(REPO)], env=os.environ | {"PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode != 0 and f"is in use by pid {os.getpid()}" in other.stderr
