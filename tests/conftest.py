"""Test-wide settings: Prefect and MLflow state go to temporary folders, never to the user's home."""

import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

# One thread per process: the tests' models are tiny, and on a 2-core machine shared with subprocesses
# (torchrun, killed-and-resumed stages) more threads only contend; measured 27x slower with 2 threads.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

_STATE = Path(tempfile.mkdtemp(prefix="dsv3-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# flows called in this process start Prefect's ephemeral server once; on a loaded 2-core machine it took over the
# default 20 s to answer ("Timed out while attempting to connect to ephemeral Prefect API server", a full-suite run)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts at one thread (a test that sets more is set back): tiny models decode token by token,
    and on a shared 2-core machine one thread is ~10x faster than two."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


class _Bomb:
    """Unpickling this writes a file: proof that something was unpickled with code execution."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(marker: Path) -> bytes:
    """A pickle that creates `marker` when it is loaded by an unpickler that runs code."""
    return pickle.dumps(_Bomb(str(marker)))
