"""The pretrain stage on the smoke recipe: it trains, logs to MLflow, plots and writes a loadable model folder;
a rerun skips it; a run killed with SIGKILL part-way resumes from its last checkpoint and ends with exactly the
validation loss of an uninterrupted run; two torchrun processes over gloo keep identical router biases."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.stages import run_stage
from dsv3.stages.pretrain import RESULT
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import Tracker
from dsv3.train.checkpoints import LAST
from dsv3.train.module import CausalLMTraining
from dsv3.train.sharded import is_sharded
from tests.conftest import RECIPES, REPO, pickle_bomb

KILLABLE_RUN = """
import sys
from dsv3.config import load_recipe
from dsv3.stages import run_stage
recipe = load_recipe(sys.argv[1], sys.argv[3:])
run_stage("tokenizer", recipe, sys.argv[2])
run_stage("pretrain", recipe, sys.argv[2])
"""


def smoke(name: str, *overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", [f"name={name}", *overrides])


def start_killable_run(runs_dir: Path, name: str, *overrides: str) -> subprocess.Popen:
    """Tokenizer + pretrain in a subprocess (started from the calling thread, with this process's environment as it
    is now: not one a stage running here later sets, such as MLFLOW_RUN_ID)."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", KILLABLE_RUN, str(RECIPES / "smoke.yaml"), str(runs_dir), f"name={name}", *overrides]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_at(process: subprocess.Popen, last: Path) -> int:
    """SIGKILL `process` as soon as `last` (its first `last` checkpoint) exists; its exit status."""
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    return process.wait()


@pytest.mark.slow
def test_kill_resume_equals_uninterrupted_run(tmp_path):
    """Two runs folders: in one the runs would share their (equal) stage folders. The run to kill trains in its
    subprocess while the uninterrupted one trains here (one core each)."""
    runs_dir, killed_runs = tmp_path / "whole", tmp_path / "killed"
    process = start_killable_run(killed_runs, "smoke-killed")
    with ThreadPoolExecutor(1) as pool:
        last = run_root(killed_runs, smoke("smoke-killed")) / "pretrain" / "checkpoints" / "last.ckpt"
        killed = pool.submit(kill_at, process, last)
        tracker = Tracker(runs_dir, experiment="dsv3-test-pretrain")
        whole = smoke("smoke-whole")
        run_stage("tokenizer", whole, runs_dir)
        uninterrupted = run_stage("pretrain", whole, runs_dir, tracker)
    assert uninterrupted.action == "ran"
    expected = uninterrupted.manifest.metrics

    assert killed.result() == -signal.SIGKILL
    workdir = run_root(killed_runs, smoke("smoke-killed")) / "pretrain"
    assert read_manifest(workdir).status == "running"  # killed mid-stage, not finished
    resumed = run_stage("pretrain", smoke("smoke-killed"), killed_runs)
    assert resumed.action == "resumed"
    got = resumed.manifest.metrics
    assert 0 < got["resumed_from_step"] < got["steps"]
    assert got["final_val_loss"] == pytest.approx(expected["final_val_loss"], abs=1e-6)
    assert got["final_train_loss"] == pytest.approx(expected["final_train_loss"], abs=1e-6)

    # metrics and plots in the stage's MLflow run; a trained model well below its first loss
    client = MlflowClient(tracker.uri)
    run_id = uninterrupted.manifest.mlflow_run_id
    logged = client.get_run(run_id).data.metrics
    for key in ("train/loss", "train/mtp_loss_depth1", "train/balance", "train/lr", "train/tokens_seen",
                "train/tokens_per_s", "train/maxvio_batch", "val/loss", "val/bits_per_byte", "val/maxvio_global"):
        assert key in logged, key
    history = client.get_metric_history(run_id, "train/ce")
    assert [m.step for m in history] == sorted(m.step for m in history) and history[-1].step == expected["steps"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/loss_curves.png", "plots/expert_load.png", "plots/maxvio.png"} <= artifacts
    assert expected["final_train_loss"] < history[0].value - 0.3

    # the output folder loads with transformers alone; a second run skips the stage
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dsv3.model  # noqa: F401  (registers model_type dsv3)

    model_dir = run_root(runs_dir, whole) / "pretrain" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert any(float(g.e_score_correction_bias.abs().max()) > 0 for g in model.moe_gates())
    assert run_stage("pretrain", whole, runs_dir).action == "skipped"


@pytest.mark.slow
def test_two_torchrun_processes_keep_identical_router_biases(runs_dir):
    recipe = smoke("smoke-ddp", "pretrain.devices=2", "pretrain.accelerator=cpu", "pretrain.steps=6")
    run_stage("tokenizer", recipe, runs_dir)
    outcome = run_stage("pretrain", recipe, runs_dir)
    metrics = outcome.manifest.metrics
    assert metrics["ranks"] == 2 and metrics["steps"] == 6
    assert metrics["router_bias_rank_spread"] == 0.0
    assert (outcome.workdir / "model" / "model.safetensors").is_file()


def test_recipe_without_pretrain_section_is_refused(runs_dir):
    recipe = smoke("smoke-none", "pretrain=null")
    run_stage("tokenizer", recipe, runs_dir)
    with pytest.raises(ValueError, match="pretrain"):
        run_stage("pretrain", recipe, runs_dir)



def test_unreadable_checkpoints_are_set_aside_and_the_previous_one_resumes(tmp_path, capsys):

    import torch

    from dsv3.train.checkpoints import resume_point

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"global_step": 8}, checkpoints / "last.ckpt")
    torch.save({"global_step": 4}, checkpoints / "previous.ckpt")
    assert resume_point(checkpoints) == (checkpoints / "last.ckpt", 8)

    (checkpoints / "last.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:100])  # truncated
    assert resume_point(checkpoints) == (checkpoints / "previous.ckpt", 4)
    assert "is unreadable" in capsys.readouterr().err
    marker = tmp_path / "pwned"
    (checkpoints / "previous.ckpt").write_bytes(pickle_bomb(marker))  # tampered
    assert resume_point(checkpoints) == (None, 0)
    assert not marker.exists()
    aside = sorted(p.name.split(".corrupt-")[0] for p in checkpoints.glob("*.corrupt-*"))
    assert aside == ["last.ckpt", "previous.ckpt"]  # set aside, never deleted


@pytest.mark.slow
def test_a_nan_learning_rate_stops_training_keeps_the_last_checkpoint_and_a_rerun_resumes(runs_dir, monkeypatch):
    """LR NaN from step 7 on (checkpoints every 4 steps): the stage fails with the step, the cause and the LR, the
    weights of step 4's checkpoint stay finite, and the fixed rerun resumes from step 4 and completes."""
    import torch

    import dsv3.train.module as module
    from dsv3.errors import TrainingDiverged

    recipe = smoke("smoke-nan")
    run_stage("tokenizer", recipe, runs_dir)
    real = module.learning_rate
    monkeypatch.setattr(module, "learning_rate", lambda tokens, total, s: float("nan") if tokens >= 6 * 8 * 64 else real(tokens, total, s))
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 7: the learning rate is nan \(learning rate nan\)"):
        run_stage("pretrain", recipe, runs_dir)
    workdir = run_root(runs_dir, recipe) / "pretrain"
    manifest = read_manifest(workdir)
    assert manifest.status == "failed" and manifest.failure["kind"] == "diverged"
    checkpoint = torch.load(workdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())

    monkeypatch.setattr(module, "learning_rate", real)
    resumed = run_stage("pretrain", recipe, runs_dir)
    assert resumed.action == "resumed" and resumed.manifest.metrics["resumed_from_step"] == 4
    assert resumed.manifest.status == "completed"


HARDWARE_SHORT = ["pretrain.steps=12", "pretrain.checkpoint_every_n_steps=4", "pretrain.val_every_n_steps=4",
                  "pretrain.log_every_n_steps=4"]  # fmt: skip
ON_TWO = ["pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.expert_parallel=2", "pretrain.micro_batch_size=2",
          "pretrain.accelerator=cpu"]  # fmt: skip
ACROSS_WORLD_SIZES = 1e-5  # 1 vs 2 processes (FSDP2 + EP) after 12 steps: measured 3.0e-7 on the final validation loss, 0 on the training loss


def kill_at_first_sharded_checkpoint(process: subprocess.Popen, last: Path) -> None:
    """SIGKILL `process` (tokenizer and pretraining on 2 processes) once `last` is a sharded checkpoint."""
    deadline = time.time() + 240
    while not is_sharded(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)  # the torchrun agent and its ranks die with it
    process.wait()
    psutil.wait_procs(ranks, timeout=10)


@pytest.mark.slow
def test_a_stage_stopped_on_two_processes_resumes_on_one_and_back_through_the_runner(tmp_path, monkeypatch):
    """Hardware-only settings (devices, strategy, EP, micro-batch) are in neither the stage key nor the variant: a
    stage killed on 2 processes resumes on 1, stopped there resumes on 2, and ends with one process's loss."""
    reference = smoke("smoke-hw", *HARDWARE_SHORT)
    runs_dir = tmp_path / "runs"
    assert run_root(runs_dir, smoke("smoke-hw", *HARDWARE_SHORT, *ON_TWO)) == run_root(runs_dir, reference)
    folder = run_root(runs_dir, reference) / "pretrain"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", KILLABLE_RUN, str(RECIPES / "smoke.yaml"), str(runs_dir), "name=smoke-hw", *HARDWARE_SHORT, *ON_TWO]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with ThreadPoolExecutor(1) as pool:  # the 2 processes start (and are killed) while one process trains here
        killed = pool.submit(kill_at_first_sharded_checkpoint, process, folder / "checkpoints" / LAST)
        run_stage("tokenizer", reference, tmp_path / "reference")
        uninterrupted = run_stage("pretrain", reference, tmp_path / "reference").manifest.metrics
    killed.result()
    assert is_sharded(folder / "checkpoints" / LAST) and read_manifest(folder).status == "running"

    def stop_at_step_8(module, batch, batch_idx):
        if module.global_step == 8:
            raise RuntimeError("stopped at step 8")
        return train(module, batch, batch_idx)

    train = CausalLMTraining.training_step
    monkeypatch.setattr(CausalLMTraining, "training_step", stop_at_step_8)
    with pytest.raises(RuntimeError, match="stopped at step 8"):
        run_stage("pretrain", reference, runs_dir)  # on one process, from the 2 processes' step 4
    monkeypatch.undo()
    assert read_manifest(folder).status == "failed"

    outcome = run_stage("pretrain", smoke("smoke-hw", *HARDWARE_SHORT, *ON_TWO), runs_dir)  # on 2, from step 8
    metrics = outcome.manifest.metrics
    assert outcome.action == "resumed" and outcome.workdir.resolve() == folder.resolve() and outcome.manifest.attempts == 3
    assert metrics["resumed_from_step"] == 8 and metrics["ranks"] == 2
    history = json.loads((folder / RESULT).read_text())["history"]
    assert [row["step"] for row in history if "train/ce" in row] == [4.0, 8.0, 12.0]  # nothing lost, nothing twice
    for key in ("final_val_loss", "final_train_loss"):
        assert metrics[key] == pytest.approx(uninterrupted[key], abs=ACROSS_WORLD_SIZES), key
    assert run_stage("pretrain", reference, runs_dir).action == "skipped"  # and on one process it is the same stage
