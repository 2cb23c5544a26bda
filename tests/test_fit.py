"""dsv3/train/fit.py: the same recipe, seed and thread count give bit-identical runs (losses, router biases and
saved weights), in separate run folders. (The race that broke this at 2 threads is guarded by test_moe.py.)"""

import hashlib

import pytest
import torch

from dsv3.config import load_recipe
from dsv3.stages import run_stage
from dsv3.store.manifest import sha256_path
from tests.conftest import RECIPES


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_smoke_pretraining_twice_is_bit_identical(tmp_path, two_threads, capfd):
    outcomes = []
    for folder in ("first", "second"):
        recipe = load_recipe(RECIPES / "smoke.yaml", ["pretrain.steps=4"])  # a checkpoint, then validation at the end
        run_stage("tokenizer", recipe, tmp_path / folder)
        outcomes.append(run_stage("pretrain", recipe, tmp_path / folder))
    printed = capfd.readouterr()
    # one training bar; validation is a log line, not a second bar (a line per batch in a pipe or log file)
    assert "Epoch 0" in printed.out + printed.err and "Validation" not in printed.out + printed.err
    first, second = (o.manifest.metrics for o in outcomes)
    for key in ("final_val_loss", "final_train_loss", "final_val_maxvio_global", "best_val_loss"):
        assert first[key] == second[key], key  # exactly, not approximately
    weights = [sha256_path(o.workdir / "model" / "model.safetensors") for o in outcomes]
    assert weights[0] == weights[1]
    biases = [hashlib.sha256((o.workdir / "ranks" / "rank0.json").read_bytes()).hexdigest() for o in outcomes]
    assert biases[0] == biases[1]
