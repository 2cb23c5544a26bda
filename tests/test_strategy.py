"""FSDP2 runs through Lightning and torchrun (dsv3.train.strategy; 2 processes over gloo): with MTP, loss-free
balancing and expert parallelism, a run killed with SIGKILL part-way and resumed ends with the weights, losses and
router biases of one uninterrupted process; its sharded checkpoint resumes on 1 process, and a one-process
checkpoint on 2, to the same weights. Also: a sharded checkpoint is read without running pickled code."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dsv3.config import load_recipe
from dsv3.stages import run_stage
from dsv3.stages.pretrain import RANKS, RESULT, train_rank
from dsv3.train.checkpoints import LAST, PREVIOUS, resume_point
from dsv3.train.launch import launch_torchrun, torchrun_command
from dsv3.train.sharded import DCP_INDEX, is_sharded
from tests.conftest import RECIPES, REPO, pickle_bomb

STEPS = 8
SHORT = [f"pretrain.steps={STEPS}", "pretrain.checkpoint_every_n_steps=2", "pretrain.val_every_n_steps=4",
         "pretrain.log_every_n_steps=1", "pretrain.accelerator=cpu"]  # fmt: skip
FSDP_EP = ["pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.expert_parallel=2"]
TOLERANCE = 1e-5


def recipe(*overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", ["name=smoke-fsdp", *SHORT, *overrides])


class Run:
    """What a training run left in its folder: the saved weights, its result (history) and the ranks' biases."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weights = load_file(folder / "model" / "model.safetensors")
        self.result = json.loads((folder / RESULT).read_text())
        self.biases = [json.loads(p.read_text())["router_bias"] for p in sorted((folder / RANKS).glob("rank*.json"))]

    def losses(self, key: str) -> list[float]:
        return [row[key] for row in self.result["history"] if key in row]


def assert_same_run(run: Run, reference: Run) -> None:
    assert run.weights.keys() == reference.weights.keys()
    worst = max(float((run.weights[k] - reference.weights[k]).abs().max()) for k in reference.weights)
    assert worst <= TOLERANCE, f"weights differ by {worst}"
    for key in ("train/ce", "train/mtp_loss_depth1", "val/loss"):
        assert run.losses(key) == pytest.approx(reference.losses(key), abs=TOLERANCE), key
    for biases in run.biases:  # every rank's router biases: identical to each other and to one process's
        torch.testing.assert_close(torch.tensor(biases), torch.tensor(reference.biases[0]), rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    return {"tokenizer": run_stage("tokenizer", recipe(), runs).workdir}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer) -> Run:
    folder = tmp_path_factory.mktemp("stages") / "one-process"
    train_rank(recipe(), folder, tokenizer)
    return Run(folder)


def kill_after_first_checkpoint(folder: Path, inputs: dict[str, Path]) -> int:
    """Start 2 FSDP ranks under torchrun and SIGKILL the agent once the first sharded last.ckpt is in place; the
    ranks (in sessions of their own) must die with it."""
    folder.mkdir(parents=True)
    sharded = recipe(*FSDP_EP)
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(json.dumps(sharded.model_dump(mode="json")))  # JSON is YAML
    command = torchrun_command(2, 1, "dsv3.stages.pretrain:train_rank", recipe_file, folder, inputs, folder / "failure.json")
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = folder / "checkpoints" / LAST
    deadline = time.time() + 240
    while not last.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    ranks = psutil.Process(job.pid).children(recursive=True)
    os.kill(job.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, "ranks kept training after their torchrun agent was killed"
    return job.wait()


@pytest.mark.slow
def test_fsdp_killed_and_resumed_equals_one_process_and_its_checkpoint_resumes_on_one(tmp_path, tokenizer, one_process):
    killed = tmp_path / "fsdp"
    assert kill_after_first_checkpoint(killed, tokenizer) == -signal.SIGKILL
    assert not (killed / RESULT).exists()  # killed part-way
    checkpoint, step = resume_point(killed / "checkpoints")
    assert is_sharded(checkpoint) and 0 < step < STEPS

    on_one = tmp_path / "two-to-one"
    shutil.copytree(checkpoint, on_one / "checkpoints" / LAST)
    train_rank(recipe(), on_one, tokenizer)  # the sharded checkpoint, resumed by one process
    resumed_on_one = Run(on_one)
    assert resumed_on_one.result["resumed_from_step"] == step
    assert_same_run(resumed_on_one, one_process)

    launch_torchrun(recipe(*FSDP_EP), killed, tokenizer, devices=2, num_nodes=1, entry=train_rank)  # the rerun: 2 ranks resume
    resumed = Run(killed)
    assert resumed.result["resumed_from_step"] == step and len(resumed.biases) == 2
    assert_same_run(resumed, one_process)
    assert is_sharded(killed / "checkpoints" / LAST) and is_sharded(killed / "checkpoints" / PREVIOUS)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_sharded_on_two(tmp_path, tokenizer, one_process):
    folder = tmp_path / "one-to-two"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(one_process.folder / "checkpoints" / PREVIOUS, folder / "checkpoints" / LAST)
    launch_torchrun(recipe("pretrain.devices=2", "pretrain.strategy=fsdp"), folder, tokenizer, devices=2, num_nodes=1, entry=train_rank)
    run = Run(folder)
    assert 0 < run.result["resumed_from_step"] < STEPS
    assert_same_run(run, one_process)



def test_a_tampered_sharded_index_is_set_aside_unexecuted(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    index = checkpoints / LAST / DCP_INDEX
    index.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    index.write_bytes(pickle_bomb(marker))
    torch.save({"global_step": 4}, checkpoints / LAST / "meta.pt")
    assert resume_point(checkpoints) == (None, 0)
    assert not marker.exists()
    assert "may not name" in capsys.readouterr().err
    assert [p.name.split(".corrupt-")[0] for p in checkpoints.iterdir()] == [LAST]
