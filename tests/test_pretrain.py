"""The pretrain stage on the smoke recipe: it trains, logs to MLflow, plots and writes a loadable model folder;
a rerun skips it; a run killed with SIGKILL part-way resumes from its last checkpoint and ends with exactly the
validation loss of an uninterrupted run; two torchrun processes over gloo keep identical router biases."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.stages.manifest import read_manifest
from dsv3.stages.runner import run_stage
from dsv3.stages.runs import run_root
from dsv3.tracking import Tracker
from tests.conftest import RECIPES, REPO, pickle_bomb

KILLABLE_RUN = """
import sys
from dsv3.config import load_recipe
from dsv3.stages.runner import run_stage
recipe = load_recipe(sys.argv[1], sys.argv[3:])
run_stage("tokenizer", recipe, sys.argv[2])
run_stage("pretrain", recipe, sys.argv[2])
"""


def smoke(name: str, *overrides: str):
    return load_recipe(RECIPES / "smoke.yaml", [f"name={name}", *overrides])


def kill_after_checkpoint(runs_dir: Path, name: str) -> int:
    """Run tokenizer + pretrain in a subprocess and SIGKILL it as soon as the first `last` checkpoint exists."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", KILLABLE_RUN, str(RECIPES / "smoke.yaml"), str(runs_dir), f"name={name}"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_root(runs_dir, smoke(name)) / "pretrain" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    return process.wait()


@pytest.mark.slow
def test_kill_resume_equals_uninterrupted_run(tmp_path):
    """Two runs folders: in one the runs would share their (equal) stage folders."""
    runs_dir, killed_runs = tmp_path / "whole", tmp_path / "killed"
    tracker = Tracker(runs_dir, experiment="dsv3-test-pretrain")
    whole = smoke("smoke-whole")
    run_stage("tokenizer", whole, runs_dir)
    uninterrupted = run_stage("pretrain", whole, runs_dir, tracker)
    assert uninterrupted.action == "ran"
    expected = uninterrupted.manifest.metrics

    assert kill_after_checkpoint(killed_runs, "smoke-killed") == -signal.SIGKILL
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
